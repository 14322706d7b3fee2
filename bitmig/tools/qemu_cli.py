"""`bitmig qemu list|export|import`: offline moves between qcow2 images and a daemon's
store, and the `--qcow2` attachment of `bitmig source` (wired from bitmig/cli.py).

Every command prints a result (JSON with --json) and exits 0, or prints one line
`bitmig qemu CMD: reason` on stderr (and {"error": ...} with --json) and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# bitmig.qemu (and numpy) are imported when a command runs, not when the parser is built.

MAP_HELP = ("rename on the way: SRC_NODE[:NAME]=[DST_NODE][:NAME] (repeatable), or @FILE "
            "with a JSON list of {node, name, dest-node, dest-name}; see docs/qemu.md")


def add_parser(sub: Any, formatter: Any) -> None:
    q = sub.add_parser(
        "qemu", formatter_class=formatter,
        help="qcow2 images: list their bitmaps, export them to a store, import from one",
        description="Offline work with the persistent bitmaps of closed qcow2 images.\n"
        "Images are read directly (read-only); they are changed only through qemu-img.")
    qs = q.add_subparsers(dest="qemu_command", required=True, metavar="QEMU_COMMAND")

    ls = qs.add_parser("list", formatter_class=formatter,
                       help="the persistent bitmaps an image holds",
                       description="Name, granularity, flags, set bits and sha256 (QEMU's "
                       "x-debug-block-dirty-bitmap-sha256) of each bitmap of IMAGE.")
    ls.add_argument("image", metavar="IMAGE")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_list)

    ex = qs.add_parser("export", formatter_class=formatter,
                       help="copy an image's bitmaps into a source's state directory",
                       description="Read IMAGE's persistent bitmaps (refusing in_use ones) and "
                       "store them under\n--state-dir, where `bitmig source --state-dir DIR` "
                       "loads them at start.\nThe image is not changed.")
    ex.add_argument("image", metavar="IMAGE")
    ex.add_argument("--state-dir", required=True, help="the source's state directory")
    ex.add_argument("--node", default=None,
                    help="node name to store them under (default: IMAGE's file name without "
                    "extension)")
    ex.add_argument("--bitmap", action="append", default=None, metavar="NAME",
                    help="only this bitmap (repeatable); default: all")
    ex.add_argument("--replace", action="store_true",
                    help="overwrite a bitmap of the same node/name already stored")
    ex.add_argument("--json", action="store_true", help="print JSON")
    ex.set_defaults(func=cmd_export)

    im = qs.add_parser("import", formatter_class=formatter,
                       help="bring a destination's received bitmaps into an image",
                       description="Bring the bitmaps stored under --state-dir (what `bitmig "
                       "dest` received)\ninto IMAGE as persistent bitmaps, through qemu-img, "
                       "each verified by\nsha256 and undone on failure. The image must be "
                       "closed (no QEMU using it).")
    im.add_argument("image", metavar="IMAGE")
    im.add_argument("--state-dir", required=True, help="the destination's state directory")
    im.add_argument("--map", action="append", default=None, metavar="RULE", help=MAP_HELP)
    im.add_argument("--node", default=None, help="only bitmaps stored under this node")
    im.add_argument("--bitmap", action="append", default=None, metavar="NAME",
                    help="only this stored bitmap (repeatable); default: all")
    im.add_argument("--replace", action="store_true",
                    help="replace a bitmap of the same name in IMAGE (else refused)")
    im.add_argument("--json", action="store_true", help="print JSON")
    im.set_defaults(func=cmd_import)


def _fail(a: argparse.Namespace, msg: str) -> int:
    print(f"bitmig qemu {a.qemu_command}: {msg}", file=sys.stderr)
    if a.json:
        print(json.dumps({"error": msg}))
    return 1


def _guard(fn: Any) -> Any:
    def run(a: argparse.Namespace) -> int:
        from bitmig.core.store import StoreError
        from bitmig.qemu.mapping import MappingError
        from bitmig.qemu.qcow2 import Qcow2Error

        try:
            return fn(a)
        except (Qcow2Error, StoreError, MappingError) as e:
            return _fail(a, str(e))
        except OSError as e:
            return _fail(a, f"{e.filename or ''}: {e.strerror}".lstrip(": "))
    return run


@_guard
def cmd_list(a: argparse.Namespace) -> int:
    from bitmig.core.units import format_size
    from bitmig.qemu import image as qimage

    info = qimage.list_image(a.image)
    if a.json:
        print(json.dumps(info))
        return 0
    print(f"{info['image']}: virtual size {format_size(info['virtual_size'])}, "
          f"{len(info['bitmaps'])} bitmap(s)")
    for b in info["bitmaps"]:
        flags = ("enabled" if b["enabled"] else "disabled") + (", IN USE" if b["in_use"] else "")
        bits = f"{b['count']} bits set, sha256 {b['sha256']}" if "count" in b else "bits stale"
        print(f"  {b['name']}: granularity {format_size(b['granularity'])}, {flags}; {bits}")
    return 0


@_guard
def cmd_export(a: argparse.Namespace) -> int:
    from bitmig.qemu import image as qimage

    out = qimage.export_to_store(a.image, a.state_dir, a.node, a.bitmap, a.replace)
    if a.json:
        print(json.dumps({"image": a.image, "state_dir": a.state_dir, "bitmaps": out}))
        return 0
    for b in out:
        print(f"exported {b['node']}/{b['name']} ({b['count']} bits set, sha256 "
              f"{b['sha256']}) to {a.state_dir}")
    return 0


@_guard
def cmd_import(a: argparse.Namespace) -> int:
    from bitmig.qemu import image as qimage
    from bitmig.qemu.mapping import Mapping

    mapping = Mapping.parse(a.map)
    out = qimage.import_from_store(a.state_dir, a.image, mapping, a.replace, a.node, a.bitmap)
    if a.json:
        print(json.dumps({"image": a.image, "state_dir": a.state_dir, "bitmaps": out}))
        return 0
    for b in out:
        verb = "replaced" if b["replaced"] else "added"
        print(f"{verb} {b['image_name']} in {a.image} from {b['node']}/{b['name']} "
              f"({b['count']} bits set, sha256 {b['sha256']}, verified)")
    return 0


def load_source_images(daemon: Any, images: list[str], node: str | None,
                       names: list[str] | None) -> str | None:
    """`bitmig source --qcow2`: the images' bitmaps into the daemon's registry (each image
    read, never changed). An error message, or None when all were loaded."""
    from bitmig.qemu import image as qimage
    from bitmig.qemu.qcow2 import Qcow2Error

    if node and len(images) > 1:
        return "--node names one image's node; give one --qcow2 with it"
    loaded = []
    try:
        for img in images:
            loaded += qimage.load_image_bitmaps(img, node, names)
    except Qcow2Error as e:
        return str(e)
    for lb in loaded:
        key = (lb.node, lb.image.name)
        if key in daemon.registry.entries:
            return (f"{lb.node}/{lb.image.name} is both in the state directory and in "
                    "the image; start with one of them (or another --node)")
        daemon.registry.add(lb.node, lb.image.name, lb.bitmap.disk_size, lb.bitmap.granularity,
                            lb.bitmap.chunk_size, lb.image.enabled, True, bitmap=lb.bitmap)
    return None


def image_target(image: str, maps: list[str] | None, replace: bool) -> tuple[Any, str | None]:
    """`bitmig dest --qcow2 IMAGE [--map RULE] [--replace]`: the daemon's BitmapTarget,
    or an error message (image missing or not qcow2, bad mapping)."""
    from bitmig.qemu.image import ImageTarget
    from bitmig.qemu.mapping import Mapping, MappingError
    from bitmig.qemu.qcow2 import Qcow2Error

    try:
        return ImageTarget(image, Mapping.parse(maps), replace), None
    except (Qcow2Error, MappingError) as e:
        return None, str(e)
