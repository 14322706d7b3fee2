from bitmig.cli import main

raise SystemExit(main())
