"""A process that stores rounds of bitmaps with group commits and kills itself (SIGKILL)
at a chosen step of one commit: `python batchchild.py STATE LOG STEP N`.

Each round replaces every bitmap `n/b<i>` with new content. Before a batch starts, the
digests it may store are logged ("try"); after it returned, those it stored ("done").
STEP is one of seal, flush, publish, dirsync: the N-th call of that step (counted over
the whole run) does not return."""

from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bitmig.core import store as st
from bitmig.core.bitmap import DirtyBitmap
from bitmig.core.digest import tree_digest

DISK, GRAN, CHUNK = 1 << 34, 65536, 1024  # 32 KiB serialized
NAMES, ROUNDS = 12, 6


def main() -> None:
    state, log_path, step, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    calls = {"left": n}
    real = {"seal": st.Spool.seal, "flush": st.Spool.flush, "publish": st.Spool.publish}

    def die_at_nth() -> None:
        calls["left"] -= 1
        if calls["left"] == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    if step == "dirsync":
        fsync_dir = st._fsync_dir

        def dirsync(path) -> None:
            die_at_nth()
            fsync_dir(path)
        st._fsync_dir = dirsync
    else:
        fn = real[step]

        def wrapped(self, *a):
            die_at_nth()
            return fn(self, *a)
        setattr(st.Spool, step, wrapped)

    store = st.Store(state)
    seed = int.from_bytes(os.urandom(4), "little")
    with open(log_path, "a") as log, ThreadPoolExecutor(4) as pool:
        for r in range(ROUNDS):
            items = []
            for i in range(NAMES):
                bm = DirtyBitmap(DISK, GRAN, CHUNK)
                bm.fill_random(0.2, np.random.default_rng([seed, r, i]))
                spool = store.begin("n", f"b{i}", bm.serialized_size)
                spool.write(0, memoryview(bm.words).cast("B"))
                meta = st.StoredMeta(node="n", name=f"b{i}", disk_size=DISK, granularity=GRAN,
                                     chunk_size=CHUNK, enabled=True, persistent=True,
                                     count=bm.count(), digest=tree_digest(bm.words.data),
                                     stored_at=0.0, origin="test")
                items.append((spool, meta))
            for _, m in items:
                log.write(f"try {m.name} {m.digest.hex()}\n")
            log.flush()
            os.fsync(log.fileno())
            outs = st.commit_batch(store, items, pool.map)
            for (_, m), out in zip(items, outs, strict=True):
                if isinstance(out, st.StoreError):
                    raise out
                log.write(f"done {m.name} {m.digest.hex()}\n")
            log.flush()
            os.fsync(log.fileno())


if __name__ == "__main__":
    main()
