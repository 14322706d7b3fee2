"""The control interface: JSON lines over a Unix socket that only its owner may use.

Each request is one JSON object with a "cmd" key; each answer is one JSON object,
{"ok": true, "result": ...} or {"ok": false, "code": "...", "error": "..."}.
Commands are listed in COMMANDS and documented in docs/control.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitmig import __version__
from bitmig.core.store import make_private_dir
from bitmig.core.units import parse_size
from bitmig.daemon.registry import RegistryError
from bitmig.protocol import spec
from bitmig.session.source import OPTION_NAMES, OptionsError, build_options

if TYPE_CHECKING:
    from bitmig.daemon.service import Daemon

MAX_REQUEST = 1 << 20
DRAIN_TIMEOUT = 30.0  # seconds an over-long request's sender has to close
# Names in one `migrate` request: the session opens further connections past
# spec.MAX_BITMAPS; this only bounds the request (MAX_REQUEST bounds its bytes anyway).
MAX_MIGRATE_BITMAPS = 65536
log = logging.getLogger("bitmig.control")

Handler = Callable[["Daemon", dict[str, Any]], Awaitable[Any]]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn
    return deco


def _arg(req: dict[str, Any], key: str, typ: type | tuple[type, ...], default: Any = ...,
         lo: float | None = None, hi: float | None = None) -> Any:
    """A checked argument: its type (booleans are not numbers), and for numbers a finite
    value within [lo, hi]. Every failure is a bad_request naming the argument."""
    if key not in req:
        if default is ...:
            raise RegistryError("bad_request", f"missing argument {key!r}")
        return default
    v = req[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    if int in types and isinstance(v, str):
        try:
            v = parse_size(v)
        except ValueError as e:
            raise RegistryError("bad_request", f"{key}: {e}") from None
    if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
        names = " or ".join("a number" if t is float else t.__name__ for t in types)
        raise RegistryError("bad_request", f"argument {key!r} must be {names}, "
                                           f"got {type(v).__name__}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise RegistryError("bad_request", f"argument {key!r} = {v} is outside {bounds}")
    return v


def _name(req: dict[str, Any], key: str) -> str:
    v = _arg(req, key, str)
    problem = spec.name_problem(v, key)
    if problem:
        raise RegistryError("bad_request", problem)
    return v


def _key(req: dict[str, Any]) -> tuple[str, str]:
    return _name(req, "node"), _name(req, "name")


def _keys(req: dict[str, Any]) -> list[tuple[str, str]] | None:
    """`bitmaps`: absent/null for every owned bitmap, else a list of [node, name] pairs."""
    v = req.get("bitmaps")
    if v is None:
        return None
    if not isinstance(v, list) or len(v) > MAX_MIGRATE_BITMAPS:
        raise RegistryError("bad_request", "argument 'bitmaps' must be a list of at most "
                                           f"{MAX_MIGRATE_BITMAPS} [node, name] pairs")
    out = []
    for i, k in enumerate(v):
        if not isinstance(k, list) or len(k) != 2:
            raise RegistryError("bad_request", f"bitmaps[{i}] must be a [node, name] pair, "
                                               f"got {json.dumps(k)[:80]}")
        out.append(_key({"node": k[0], "name": k[1]}))
    return out


@command("ping")
async def _ping(d: Daemon, req: dict[str, Any]) -> Any:
    return {"side": d.side, "version": __version__, "pid": os.getpid()}


@command("list")
async def _list(d: Daemon, req: dict[str, Any]) -> Any:
    return [e.describe() for e in d.registry.entries.values()]


@command("query")
async def _query(d: Daemon, req: dict[str, Any]) -> Any:
    from bitmig.core.digest import tree_digest

    e = d.registry.get(*_key(req))
    out = e.describe()
    words = e.bitmap.words
    out["sha256"] = (await asyncio.to_thread(e.bitmap.sha256)).hex()
    out["tree_digest"] = (await asyncio.to_thread(tree_digest, words.data)).hex()
    return out


@command("add")
async def _add(d: Daemon, req: dict[str, Any]) -> Any:
    node, name = _key(req)
    if d.holds(node, name):  # owned, stored, or arriving from a source right now
        raise RegistryError("exists", f"bitmap {node}/{name} already exists")
    disk_size = _arg(req, "disk_size", int, lo=1, hi=spec.MAX_U64)
    granularity = _arg(req, "granularity", int, 65536, lo=1, hi=spec.MAX_U64)
    chunk_size = _arg(req, "chunk_size", int, 1024, lo=1, hi=spec.MAX_U64)
    enabled = _arg(req, "enabled", bool, True)
    persistent = _arg(req, "persistent", bool, False)
    fill = float(_arg(req, "fill", (int, float), 0, lo=0, hi=1))
    seed = _arg(req, "seed", int, 0, lo=0, hi=spec.MAX_U64)
    e = d.registry.add(node, name, disk_size, granularity, chunk_size, enabled, persistent)
    if fill:
        e.bitmap.fill_random(fill, np.random.default_rng(seed))
    return e.describe()


@command("remove")
async def _remove(d: Daemon, req: dict[str, Any]) -> Any:
    node, name = _key(req)
    entry = d.registry.remove(node, name)
    if d.store is not None:
        d.store.remove(node, name)
        d.stored.pop((node, name), None)
    return entry.describe()


def _range(req: dict[str, Any]) -> tuple[int, int]:
    return (_arg(req, "offset", int, lo=0, hi=spec.MAX_U64),
            _arg(req, "length", int, lo=0, hi=spec.MAX_U64))


@command("set")
async def _set(d: Daemon, req: dict[str, Any]) -> Any:
    n, b = _key(req)
    return {"changed": await d.registry.mutate(n, b, "set", *_range(req))}


@command("reset")
async def _reset(d: Daemon, req: dict[str, Any]) -> Any:
    n, b = _key(req)
    return {"changed": await d.registry.mutate(n, b, "reset", *_range(req))}


@command("clear")
async def _clear(d: Daemon, req: dict[str, Any]) -> Any:
    n, b = _key(req)
    e = d.registry.get(n, b)
    return {"changed": await d.registry.mutate(n, b, "reset", 0, e.bitmap.disk_size)}


@command("migrate")
async def _migrate(d: Daemon, req: dict[str, Any]) -> Any:
    host = _arg(req, "host", str)
    if not 1 <= len(host) <= 253 or any(c.isspace() or c == "\0" for c in host):
        raise RegistryError("bad_request", f"argument 'host' is not a host name or address: "
                                           f"{host[:80]!r}")
    port = _arg(req, "port", int, lo=1, hi=65535)
    keys = _keys(req)
    # Options not given keep the daemon's (its command line's) values.
    try:
        opts = build_options({k: req[k] for k in MIGRATE_OPTIONS if k in req}, d.options)
    except OptionsError as e:
        raise RegistryError("bad_request", str(e)) from None
    result = await d.migrate(host, port, keys, options=opts)
    return result.to_dict()


MIGRATE_OPTIONS = tuple(n for n in OPTION_NAMES if n != "frame_payload")


@command("complete")
async def _complete(d: Daemon, req: dict[str, Any]) -> Any:
    """Let the running migration freeze (it waits for this under wait_for_complete)."""
    if not d.release_freeze():
        raise RegistryError("not_found", "no migration is running")
    return {"released": True}


@command("status")
async def _status(d: Daemon, req: dict[str, Any]) -> Any:
    m = d.active_migration
    return {
        "side": d.side,
        "migrating": None if m is None else {"phase": m.phase, "pass": m.pass_no,
                                             "destination": m.result.destination},
        "last": d.migrations[-1].to_dict() if d.migrations else None,
        "errors": dict(d.errors),
        "memory_budget_used": d.budget_used,
        "bitmaps": len(d.registry.entries),
    }


@command("shutdown")
async def _shutdown(d: Daemon, req: dict[str, Any]) -> Any:
    asyncio.get_running_loop().call_soon(d.stop)
    return {"stopping": True}


async def handle_request(d: Daemon, line: bytes) -> dict[str, Any]:
    """The answer to one request line: always one JSON object, never an exception."""
    try:
        try:
            req = json.loads(line)
        except RecursionError:  # e.g. an array nested 100,000 deep
            raise RegistryError("bad_request", "request nested too deeply") from None
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            raise RegistryError("bad_request", 'a request is a JSON object with a "cmd" string')
        fn = COMMANDS.get(req["cmd"])
        if fn is None:
            raise RegistryError("bad_request", f"unknown command {req['cmd']!r}; commands: "
                                               f"{', '.join(sorted(COMMANDS))}")
        return {"ok": True, "result": await fn(d, req)}
    except RegistryError as e:
        return {"ok": False, "code": e.code, "error": str(e)}
    except (ValueError, TypeError) as e:
        return {"ok": False, "code": "bad_request", "error": str(e)[:4096]}
    except Exception as e:  # a bug here must not cost the client its answer
        log.error("control request failed: %s: %s", type(e).__name__, e)
        return {"ok": False, "code": "internal", "error": f"{type(e).__name__}: {e}"[:4096]}


async def attach_control(d: Daemon, path: str) -> None:
    """Serve the control socket at `path` for `d`, closed when the daemon closes."""
    d.add_server(await serve_control(d, path))


async def serve_control(d: Daemon, path: str) -> asyncio.AbstractServer:
    """Listen on a Unix socket with mode 0600: only the daemon's user may connect."""
    p = Path(path)
    make_private_dir(p.parent)  # what we create is 0700; an existing parent is left alone
    if p.is_socket():
        p.unlink()

    async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await r.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    # Over MAX_REQUEST: answered; what follows is read and dropped until
                    # the client closes (closing with unread data would reset the
                    # connection, and the client could lose the answer).
                    w.write(json.dumps({"ok": False, "code": "bad_request", "error":
                                        f"request longer than {MAX_REQUEST} bytes"}).encode()
                            + b"\n")
                    await w.drain()
                    with contextlib.suppress(TimeoutError):
                        while await asyncio.wait_for(r.read(1 << 16), DRAIN_TIMEOUT):
                            pass
                    break
                if not line:
                    break
                w.write(json.dumps(await handle_request(d, line)).encode() + b"\n")
                await w.drain()
        except ConnectionError:
            pass
        except asyncio.CancelledError:
            pass  # the daemon is shutting down; the client sees the socket close
        finally:
            w.close()

    old = os.umask(0o177)  # the socket is created 0600, never briefly wider
    try:
        server = await asyncio.start_unix_server(client, path, limit=MAX_REQUEST)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


def call(path: str, cmd: str, timeout: float | None = 600, **args: Any) -> Any:
    """One blocking request; returns the result or raises RegistryError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                raise ConnectionError("control socket closed before answering")
            buf += chunk
    resp = json.loads(buf)
    if not resp.get("ok"):
        raise RegistryError(resp.get("code", "error"), resp.get("error", "unknown error"))
    return resp["result"]


async def acall(path: str, cmd: str, **args: Any) -> Any:
    r, w = await asyncio.open_unix_connection(path, limit=MAX_REQUEST)
    try:
        w.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        await w.drain()
        resp = json.loads(await r.readline())
    finally:
        w.close()
    if not resp.get("ok"):
        raise RegistryError(resp.get("code", "error"), resp.get("error", "unknown error"))
    return resp["result"]
