"""The bitmig command line: source, dest, demo, info, ctl, trace, bench, qemu.

Every daemon option can also be given as an environment variable BITMIG_<OPTION>
(upper case, dashes as underscores), e.g. BITMIG_LISTEN=0.0.0.0:7800; a flag on the
command line wins over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from typing import Any

from bitmig import __version__
from bitmig.core import defaults
from bitmig.core.units import format_size, parse_size


def _env(name: str, default: Any) -> Any:
    return os.environ.get("BITMIG_" + name.upper().replace("-", "_"), default)


def _env_flag(name: str) -> bool:
    """A boolean environment variable: 1/true/yes/on are true, 0/false/no/off/empty false."""
    v = str(_env(name, "")).strip().lower()
    if v in ("", "0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on"):
        return True
    raise SystemExit(f"bitmig: BITMIG_{name.upper()} must be 1/0, true/false, yes/no or on/off")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or defaults.LISTEN_HOST, int(port)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _add_common(p: argparse.ArgumentParser, side: str) -> None:
    from bitmig.daemon.service import control_path_default

    p.add_argument("--control", default=_env("control", control_path_default(side)),
                   help="path of the JSON-lines control socket (mode 0600: this user only)")
    p.add_argument("--trace", default=_env("trace", None), metavar="PATH",
                   help="append a JSON-lines protocol trace of every frame and event to PATH")
    p.add_argument("--log-level", default=_env("log_level", "info"),
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--io-timeout", type=float, default=float(_env("io_timeout",
                   defaults.IO_TIMEOUT)), help="seconds any single wait for the peer may take")
    p.add_argument("--connect-timeout", type=float, default=float(_env("connect_timeout",
                   defaults.CONNECT_TIMEOUT)), help="seconds to connect and exchange hello")
    p.add_argument("--metrics", type=_hostport, default=_env("metrics", None), metavar="HOST:PORT",
                   help="serve Prometheus metrics over HTTP at HOST:PORT/metrics")


def _add_tls(p: argparse.ArgumentParser, client: bool) -> None:
    g = p.add_argument_group(
        "mutual TLS", "give --tls-cert, --tls-key and --tls-ca together (or none): both "
        "sides present a certificate signed by the CA and verify the other's against it")
    g.add_argument("--tls-cert", default=_env("tls_cert", None), metavar="PEM",
                   help="this daemon's certificate (chain), PEM")
    g.add_argument("--tls-key", default=_env("tls_key", None), metavar="PEM",
                   help="the private key of --tls-cert, PEM")
    g.add_argument("--tls-ca", default=_env("tls_ca", None), metavar="PEM",
                   help="CA certificate(s) the peer's certificate must chain to, PEM")
    if client:
        g.add_argument("--tls-server-name", default=_env("tls_server_name", None),
                       metavar="NAME", help="name the destination's certificate must carry "
                       "(default: the host connected to, DNS name or IP address)")


def _add_migration_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--downtime-ms", type=float, default=float(_env("downtime_ms",
                   defaults.DOWNTIME_MS)), help="target for each frozen window: dirty passes "
                   "continue while the pending bytes would take longer at the measured "
                   "bandwidth, and bitmaps complete in groups that fit it")
    p.add_argument("--max-passes", type=int, default=int(_env("max_passes", defaults.MAX_PASSES)),
                   help="dirty passes before completion is forced (reported as forced)")
    p.add_argument("--small-threshold", type=_size, default=_size(str(_env(
                   "small_threshold", defaults.SMALL_THRESHOLD))),
                   help="bitmaps whose serialized size is at or below this skip the live phase "
                   "and are sent once, whole, at completion")
    _add_retry_opts(p)


def _add_retry_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retries", type=int, default=int(_env("retries", defaults.RETRIES)),
                   help="attempts for a migration before giving up")
    p.add_argument("--retry-delay", type=float, default=float(_env("retry_delay",
                   defaults.RETRY_DELAY)), help="seconds before the first retry; doubles")


def _options(a: argparse.Namespace) -> Any:
    """MigrationOptions from the parsed arguments; raises OptionsError."""
    from bitmig.session.source import OPTION_NAMES, build_options

    return build_options({k: getattr(a, k) for k in OPTION_NAMES if hasattr(a, k)})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bitmig", formatter_class=_Formatter,
        description="Live migration of block dirty bitmaps between hosts.\n\n"
        "Run `bitmig dest` on the receiving host and `bitmig source` on the sending one;\n"
        "`bitmig demo` runs both on loopback with a built-in write workload.")
    p.add_argument("--version", action="version", version=f"bitmig {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("dest", formatter_class=_Formatter,
                       help="destination daemon: receive, verify, store, acknowledge",
                       description="Listen for migrations; rebuild each bitmap, verify its "
                       "digest and count,\nstore it durably under --state-dir, then acknowledge. "
                       "Prints one line\n'listening on HOST:PORT' when ready.")
    d.add_argument("--listen", type=_hostport, default=_hostport(str(_env(
        "listen", f"{defaults.LISTEN_HOST}:{defaults.PORT}"))), metavar="HOST:PORT",
        help="address to accept migrations on (port 0 picks a free one)")
    d.add_argument("--state-dir", default=_env("state_dir", "./bitmig-state"),
                   help="directory for stored bitmaps (created if missing)")
    d.add_argument("--memory-budget", type=_size, default=_size(str(_env(
        "memory_budget", defaults.MEMORY_BUDGET))),
        help="bytes of bitmaps rebuilt at once; a start beyond it is refused with 'limit'")
    d.add_argument("--max-connections", type=int, default=int(_env(
        "max_connections", defaults.MAX_CONNECTIONS)),
        help="incoming connections served at once; more are closed at accept (before TLS)")
    d.add_argument("--max-connections-per-peer", type=int, default=int(_env(
        "max_connections_per_peer", defaults.MAX_CONNECTIONS_PER_PEER)),
        help="of those, from one peer address")
    d.add_argument("--max-bitmaps", type=int, default=int(_env(
        "max_bitmaps", defaults.MAX_HELD_BITMAPS)),
        help="bitmaps held at once (arriving or parked), all connections; a start beyond "
             "it is refused with 'limit'")
    d.add_argument("--insecure", action="store_true",
                   default=None,
                   help="allow listening on a non-loopback address without TLS (and "
                   "--metrics on a non-loopback address)")
    d.add_argument("--qcow2", default=None, metavar="IMAGE",
                   help="deliver each received bitmap into this closed qcow2 image (through "
                   "qemu-img, verified) before acknowledging it; see docs/qemu.md")
    d.add_argument("--qmp", default=_env("qmp", None), metavar="SOCK",
                   help="also give each verified bitmap to the running QEMU (or "
                   "qemu-storage-daemon) at this QMP socket before acknowledging it; see "
                   "docs/qemu.md")
    d.add_argument("--map", action="append", default=None, metavar="RULE",
                   help="with --qcow2 or --qmp: node/bitmap names there, SRC_NODE[:NAME]="
                   "[DST_NODE][:NAME] (repeatable) or @FILE (JSON); see docs/qemu.md")
    d.add_argument("--replace", action="store_true",
                   help="with --qcow2 or --qmp: replace a bitmap of the same name (else "
                   "refused)")
    _add_tls(d, client=False)
    _add_common(d, "dest")
    _add_migration_opts(d)

    s = sub.add_parser("source", formatter_class=_Formatter,
                       help="source daemon: own bitmaps, accept writes, migrate them",
                       description="Own bitmaps (created here or via the control socket), apply "
                       "set/reset\nwhile running, and migrate them live to a destination.")
    s.add_argument("--create", action="append", default=[], metavar="NODE/NAME",
                   help="create a bitmap at start (repeatable); geometry from the options below")
    s.add_argument("--disk-size", type=_size, default=_size(str(_env("disk_size", "16T"))),
                   help="disk size of bitmaps made by --create")
    s.add_argument("--granularity", type=_size, default=_size(str(_env(
        "granularity", defaults.GRANULARITY))), help="bytes of disk per bit")
    s.add_argument("--chunk-size", type=_size, default=_size(str(_env(
        "chunk_size", defaults.CHUNK_SIZE))), help="serialized bytes per meta bit")
    s.add_argument("--fill", type=float, default=float(_env("fill", 0.0)),
                   help="fraction of clusters set at random in bitmaps made by --create")
    s.add_argument("--workload-rate", type=float, default=float(_env("workload_rate", 0)),
                   help="random cluster writes per second applied while running")
    s.add_argument("--migrate-to", type=_hostport, default=None, metavar="HOST:PORT",
                   help="migrate every owned bitmap there at start, print the result as JSON "
                   "and exit 0 when all were acknowledged (1 otherwise)")
    s.add_argument("--state-dir", default=_env("state_dir", None),
                   help="keep owned bitmaps here: loaded at start, stored at exit (so a "
                   "failed migration loses nothing); none: bitmaps live in memory only")
    s.add_argument("--insecure", action="store_true", default=None,
                   help="allow migrating in plain TCP to a non-loopback destination (and "
                   "--metrics on a non-loopback address)")
    s.add_argument("--wait-for-complete", action="store_true", default=None,
                   help="keep doing dirty passes and freeze only when released by the control "
                   "command 'complete' (live QEMU sources)")
    s.add_argument("--qcow2", action="append", default=[], metavar="IMAGE",
                   help="own the persistent bitmaps of this closed qcow2 image (repeatable; "
                   "read only, the image is not changed); see docs/qemu.md")
    s.add_argument("--node", default=None,
                   help="node name of --qcow2's bitmaps (default: the image file's name "
                   "without extension); with --qmp: only this QEMU node's bitmaps")
    s.add_argument("--bitmap", action="append", default=None, metavar="NAME",
                   help="only this bitmap of the --qcow2 image or --qmp node (repeatable); "
                   "default: all")
    s.add_argument("--qmp", default=_env("qmp", None), metavar="SOCK",
                   help="own the bitmaps of the running QEMU (or qemu-storage-daemon) at this "
                   "QMP socket, kept current while it writes (--node, --bitmap select); the "
                   "migration freezes only after `complete`; see docs/qemu.md")
    s.add_argument("--poll-interval", type=float, default=float(_env("poll_interval", 1.0)),
                   metavar="S", help="with --qmp: seconds between reads of QEMU's new writes")
    _add_tls(s, client=True)
    _add_common(s, "source")
    _add_migration_opts(s)

    m = sub.add_parser("demo", formatter_class=_Formatter,
                       help="live migration on loopback with a built-in workload",
                       description="Start a destination (a separate process) and a source on "
                       "loopback, create\na bitmap, dirty part of it, migrate it while a "
                       "workload writes, and\nprint a summary. Exit status 0 when verified.")
    m.add_argument("--disk-size", type=_size, default=defaults.DEMO_DISK_SIZE)
    m.add_argument("--granularity", type=_size, default=defaults.GRANULARITY)
    m.add_argument("--chunk-size", type=_size, default=defaults.CHUNK_SIZE)
    m.add_argument("--dirty", type=float, default=defaults.DEMO_DIRTY,
                   help="fraction of clusters set before the migration")
    m.add_argument("--write-rate", type=float, default=defaults.DEMO_WRITE_RATE,
                   help="random cluster writes per second during the migration")
    m.add_argument("--bitmaps", type=int, default=1, help="number of bitmaps to migrate")
    m.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    m.add_argument("--trace", default=None, metavar="PATH",
                   help="source trace file; the destination's goes to PATH.dest")
    m.add_argument("--downtime-ms", type=float, default=defaults.DOWNTIME_MS)
    m.add_argument("--max-passes", type=int, default=defaults.MAX_PASSES)
    m.add_argument("--small-threshold", type=_size, default=defaults.SMALL_THRESHOLD)
    _add_retry_opts(m)
    m.add_argument("--seed", type=int, default=1)
    m.add_argument("--port", type=int, default=0,
                   help="destination's loopback port, to capture it (0: any free port)")

    i = sub.add_parser("info", formatter_class=_Formatter,
                       help="sizes of a bitmap: serialized bytes, chunks, area per meta bit")
    i.add_argument("--disk-size", type=_size, required=True)
    i.add_argument("--granularity", type=_size, default=defaults.GRANULARITY)
    i.add_argument("--chunk-size", type=_size, default=defaults.CHUNK_SIZE,
                   help="any power of two here; migration needs at least 8")
    i.add_argument("--json", action="store_true")

    c = sub.add_parser("ctl", formatter_class=_Formatter,
                       help="send one command to a daemon's control socket",
                       description="Examples:\n  bitmig ctl SOCK list\n  bitmig ctl SOCK add "
                       "node=drive0 name=b0 disk_size=1T\n  bitmig ctl SOCK set node=drive0 "
                       "name=b0 offset=0 length=64K\n  bitmig ctl SOCK migrate host=10.0.0.2 "
                       "port=7800\nValues are parsed as JSON when they can be, else kept as "
                       "strings.")
    c.add_argument("socket")
    c.add_argument("cmd")
    c.add_argument("args", nargs="*", metavar="KEY=VALUE")

    from bitmig.tools.trace_cli import add_trace_parser
    add_trace_parser(sub, _Formatter)
    from bitmig.tools.bench_cli import add_bench_parser
    add_bench_parser(sub, _Formatter)
    from bitmig.tools.qemu_cli import add_parser as add_qemu_parser
    add_qemu_parser(sub, _Formatter)
    return p


def cmd_info(a: argparse.Namespace) -> int:
    from bitmig.protocol import geometry, spec

    # info explains any power-of-two geometry; whether it can migrate is the daemon's check
    if not spec.is_power_of_two(a.granularity):
        print("bitmig info: granularity must be a power of two", file=sys.stderr)
        return 2
    if not spec.is_power_of_two(a.chunk_size):
        print("bitmig info: chunk size must be a power of two", file=sys.stderr)
        return 2
    try:
        geometry.check_geometry(a.disk_size, a.granularity, a.chunk_size)
        why_not = None
    except geometry.GeometryError as e:
        why_not = str(e)
    nbits = geometry.bit_count(a.disk_size, a.granularity)
    size = geometry.serialized_size(a.disk_size, a.granularity)
    out = {
        "disk_size": a.disk_size, "granularity": a.granularity, "chunk_size": a.chunk_size,
        "bits": nbits, "serialized_bytes": size,
        "chunks": geometry.chunk_count(size, a.chunk_size),
        "meta_bit_covers_bytes": a.chunk_size * 8 * a.granularity,
        "small": size <= defaults.SMALL_THRESHOLD,
        "migratable": why_not is None,
    }
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"disk {format_size(a.disk_size)} at {format_size(a.granularity)} granularity: "
          f"{nbits} bits")
    print(f"serialized bitmap: {format_size(size)} ({size} bytes)"
          + ("  [small: sent whole at completion]" if out["small"] else ""))
    print(f"chunks of {format_size(a.chunk_size)}: {out['chunks']}")
    print(f"one meta bit covers: {format_size(out['meta_bit_covers_bytes'])} of disk")
    if why_not:
        print(f"note: this geometry cannot be migrated: {why_not}")
    return 0


def cmd_ctl(a: argparse.Namespace) -> int:
    from bitmig.daemon.control import call
    from bitmig.daemon.registry import RegistryError

    args: dict[str, Any] = {}
    for kv in a.args:
        k, sep, v = kv.partition("=")
        if not sep:
            print(f"bitmig ctl: expected KEY=VALUE, got {kv!r}", file=sys.stderr)
            return 2
        try:
            args[k] = json.loads(v)
        except json.JSONDecodeError:
            args[k] = v
    try:
        result = call(a.socket, a.cmd, **args)
        print(json.dumps(result, indent=2))
        if a.cmd == "migrate" and not result.get("ok"):
            return 1  # the command worked, the migration did not: scripts must see that
    except RegistryError as e:
        print(f"bitmig ctl: {e.code}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"bitmig ctl: cannot reach {a.socket}: {e}", file=sys.stderr)
        return 1
    return 0


def _tls(a: argparse.Namespace) -> tuple[Any, Any]:
    """(server, client) SSL contexts from the --tls-* options, or (None, None) without
    them. Raises TLSConfigError when only some are given or a file is unusable."""
    from bitmig.daemon.tls import contexts

    return contexts(a.tls_cert, a.tls_key, a.tls_ca, getattr(a, "tls_server_name", None))


async def _run_dest(a: argparse.Namespace) -> int:
    from bitmig.core.store import StoreError
    from bitmig.daemon.service import Daemon, is_loopback
    from bitmig.daemon.tls import TLSConfigError
    from bitmig.protocol.spec import Role

    host, port = a.listen
    try:
        server_ssl, _ = _tls(a)
    except TLSConfigError as e:
        print(f"bitmig dest: {e}", file=sys.stderr)
        return 2
    insecure = a.insecure or _env_flag("insecure")  # read here: a bad value breaks only dest
    if not is_loopback(host) and server_ssl is None and not insecure:
        print(f"bitmig dest: refusing to listen on {host} without TLS; pass --insecure to "
              "allow plain TCP on a non-loopback address", file=sys.stderr)
        return 2
    if not _metrics_allowed("dest", a, insecure):
        return 2
    if a.max_connections < 1 or a.max_connections_per_peer < 1:
        print("bitmig dest: --max-connections and --max-connections-per-peer must be at "
              "least 1", file=sys.stderr)
        return 2
    target = None
    if a.qcow2 and a.qmp:
        print("bitmig dest: --qcow2 and --qmp exclude each other (one delivery target)",
              file=sys.stderr)
        return 2
    if a.qcow2:
        from bitmig.tools.qemu_cli import image_target

        target, err = image_target(a.qcow2, a.map, a.replace)
        if err:
            print(f"bitmig dest: {err}", file=sys.stderr)
            return 2
    if a.qmp:
        from bitmig.tools.qemu_live_cli import make_target

        try:
            target = make_target(a.qmp, a.map, a.replace)
        except ValueError as e:
            print(f"bitmig dest: --map: {e}", file=sys.stderr)
            return 2
    try:
        daemon = Daemon(Role.DESTINATION, a.state_dir, a.trace, _options(a), a.memory_budget,
                        a.io_timeout, a.connect_timeout, server_ssl=server_ssl,
                        max_connections=a.max_connections,
                        max_connections_per_peer=a.max_connections_per_peer,
                        max_bitmaps=a.max_bitmaps, target=target)
    except (StoreError, ValueError) as e:  # ValueError: OptionsError
        print(f"bitmig dest: {e}", file=sys.stderr)
        return 2
    h, p = await daemon.listen(host, port)
    from bitmig.daemon.control import attach_control

    await attach_control(daemon, a.control)
    if a.metrics:
        from bitmig.daemon.metrics import serve_metrics
        await serve_metrics(daemon, *a.metrics, allow_public=insecure)
    print(f"listening on {h}:{p} control {a.control} state {a.state_dir}", flush=True)
    _stop_on_signals(daemon)
    await daemon.serve_forever()
    return _report_unstored("dest", await daemon.close(), 0)


def _report_unstored(cmd: str, failed: list[str], rc: int) -> int:
    """Exit status after close: 1 when an owned bitmap could not be stored (named)."""
    for msg in failed:
        print(f"bitmig {cmd}: not stored: {msg}", file=sys.stderr)
    return 1 if failed else rc


def _metrics_allowed(cmd: str, a: argparse.Namespace, insecure: bool) -> bool:
    """--metrics follows --listen's policy: plain HTTP off loopback only with --insecure."""
    from bitmig.daemon.service import is_loopback

    if a.metrics and not is_loopback(a.metrics[0]) and not insecure:
        print(f"bitmig {cmd}: refusing to serve metrics on {a.metrics[0] or 'every address'} "
              "(not loopback); pass --insecure to allow plain HTTP there", file=sys.stderr)
        return False
    return True


def _stop_on_signals(daemon: Any) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.stop)


async def _run_source(a: argparse.Namespace) -> int:
    from bitmig.daemon.registry import RegistryError
    from bitmig.daemon.service import Daemon
    from bitmig.daemon.tls import TLSConfigError
    from bitmig.protocol.spec import Role
    from bitmig.tools.workload import Workload

    try:
        _, client_ssl = _tls(a)
    except TLSConfigError as e:
        print(f"bitmig source: {e}", file=sys.stderr)
        return 2
    from bitmig.daemon.service import is_loopback, plain_tcp_refusal

    insecure = a.insecure or _env_flag("insecure")
    if a.migrate_to and client_ssl is None and not insecure and not is_loopback(
            a.migrate_to[0]):
        print(f"bitmig source: {plain_tcp_refusal(a.migrate_to[0])}", file=sys.stderr)
        return 2
    if not _metrics_allowed("source", a, insecure):
        return 2
    from bitmig.core.store import StoreError

    a.wait_for_complete = a.wait_for_complete or _env_flag("wait_for_complete")
    try:
        daemon = Daemon(Role.SOURCE, a.state_dir, a.trace, _options(a), io_timeout=a.io_timeout,
                        connect_timeout=a.connect_timeout, client_ssl=client_ssl,
                        insecure=insecure)
    except (StoreError, ValueError) as e:  # ValueError: OptionsError
        print(f"bitmig source: {e}", file=sys.stderr)
        return 2
    for spec_ in a.create:
        node, sep, name = spec_.partition("/")
        if not sep:
            print(f"bitmig source: --create wants NODE/NAME, got {spec_!r}", file=sys.stderr)
            return 2
        if (node, name) in daemon.stored:
            print(f"bitmig source: {node}/{name} loaded from {a.state_dir}; not created again",
                  file=sys.stderr)
            continue
        try:
            e = daemon.registry.add(node, name, a.disk_size, a.granularity, a.chunk_size)
        except RegistryError as err:
            print(f"bitmig source: {err}", file=sys.stderr)
            return 2
        if a.fill:
            import numpy as np

            e.bitmap.fill_random(a.fill, np.random.default_rng(len(daemon.registry.entries)))
    if a.qcow2:
        from bitmig.tools.qemu_cli import load_source_images

        err = load_source_images(daemon, a.qcow2, a.node, a.bitmap)
        if err:
            print(f"bitmig source: {err}", file=sys.stderr)
            return 2
    live = None
    if a.qmp:
        from bitmig.tools.qemu_live_cli import attach_source

        live = await attach_source(daemon, a.qmp, a.node, a.bitmap, a.poll_interval,
                                   a.chunk_size)
        if isinstance(live, str):
            print(f"bitmig source: --qmp {a.qmp}: {live}", file=sys.stderr)
            return 2
        daemon.options.wait_for_complete = True  # freeze only after `complete`
    from bitmig.daemon.control import attach_control

    await attach_control(daemon, a.control)
    if a.metrics:
        from bitmig.daemon.metrics import serve_metrics
        await serve_metrics(daemon, *a.metrics, allow_public=insecure)
    print(f"control {a.control}", flush=True)
    workload = None
    if a.workload_rate > 0:
        workload = Workload(list(daemon.registry.entries.values()), a.workload_rate,
                            reset_fraction=0.05)
        workload.start()
    _stop_on_signals(daemon)
    rc = 0
    if a.migrate_to:
        # SIGINT/SIGTERM stop the retries too: whatever was not acknowledged stays owned
        # here (and is stored at exit with --state-dir).
        job = asyncio.ensure_future(_migrate_at_start(daemon, a))
        stop = asyncio.ensure_future(daemon.serve_forever())
        await asyncio.wait({job, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if job.done():
            rc = job.result()
        else:
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
            print("bitmig source: stopped before the migration finished; the bitmaps stay "
                  "here", file=sys.stderr)
            rc = 1
    else:
        await daemon.serve_forever()
    if workload:
        await workload.stop()
    if live is not None:
        await live.close()  # bitmig's recording bitmaps leave QEMU
    return _report_unstored("source", await daemon.close(), rc)


async def _migrate_at_start(daemon: Any, a: argparse.Namespace) -> int:
    """--migrate-to: every owned bitmap; the daemon retries as --retries says. One JSON
    line per attempt on stdout."""
    keys = [(e.node, e.name) for e in daemon.registry.owned()]
    if not keys:
        return 1

    def attempt_done(r: Any, retry_in: float | None) -> None:
        print(json.dumps({"attempt": r.attempt, **r.to_dict()}), flush=True)
        if retry_in is not None:
            print(f"bitmig source: attempt {r.attempt} failed ({r.error}); retrying in "
                  f"{round(retry_in, 2):g}s", file=sys.stderr)

    from bitmig.tools.progress import progress_printer

    result = await daemon.migrate(*a.migrate_to, keys, progress=progress_printer(sys.stderr),
                                  on_attempt=attempt_done)
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(getattr(a, "log_level", "info")).upper()),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if a.command == "info":
            return cmd_info(a)
        if a.command == "ctl":
            return cmd_ctl(a)
        if a.command == "dest":
            return asyncio.run(_run_dest(a))
        if a.command == "source":
            return asyncio.run(_run_source(a))
        if a.command == "demo":
            from bitmig.tools.demo import run_demo
            return run_demo(a)
        return a.func(a)
    except KeyboardInterrupt:
        return 130
