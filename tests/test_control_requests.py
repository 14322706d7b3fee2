"""Issue 9 item 7: every control request gets an answer (bad_request with a message),
never a closed connection and a traceback."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from bitmig.daemon.control import attach_control
from bitmig.daemon.service import Daemon

BAD = {
    "bitmaps_int_pair": ({"cmd": "migrate", "host": "127.0.0.1", "port": 9, "bitmaps": [[1]]},
                         "bitmaps[0]"),
    "bitmaps_empty_pair": ({"cmd": "migrate", "host": "127.0.0.1", "port": 9,
                            "bitmaps": [[]]}, "bitmaps[0]"),
    "bitmaps_not_list": ({"cmd": "migrate", "host": "127.0.0.1", "port": 9, "bitmaps": "n/b"},
                         "bitmaps"),
    "bitmaps_bad_name": ({"cmd": "migrate", "host": "127.0.0.1", "port": 9,
                          "bitmaps": [["n", "b\u0000"]]}, "NUL"),
    "port_70000": ({"cmd": "migrate", "host": "127.0.0.1", "port": 70000}, "'port'"),
    "port_zero": ({"cmd": "migrate", "host": "127.0.0.1", "port": 0}, "'port'"),
    "port_bool": ({"cmd": "migrate", "host": "127.0.0.1", "port": True}, "'port'"),
    "host_empty": ({"cmd": "migrate", "host": "", "port": 9}, "'host'"),
    "host_nul": ({"cmd": "migrate", "host": "a\u0000b", "port": 9}, "'host'"),
    "downtime_negative": ({"cmd": "migrate", "host": "h", "port": 9, "downtime_ms": -1},
                          "'downtime_ms'"),
    "max_passes_float": ({"cmd": "migrate", "host": "h", "port": 9, "max_passes": 1.5},
                         "'max_passes'"),
    "small_threshold_neg": ({"cmd": "migrate", "host": "h", "port": 9,
                             "small_threshold": -5}, "'small_threshold'"),
    "add_long_name": ({"cmd": "add", "node": "n", "name": "x" * 5000, "disk_size": 1 << 30},
                      "5000 bytes"),
    "add_name_number": ({"cmd": "add", "node": "n", "name": 7, "disk_size": 1 << 30},
                        "'name'"),
    "add_fill_2": ({"cmd": "add", "node": "n", "name": "f", "disk_size": 1 << 30, "fill": 2},
                   "'fill'"),
    "add_seed_negative": ({"cmd": "add", "node": "n", "name": "f", "disk_size": 1 << 30,
                           "fill": 0.5, "seed": -1}, "'seed'"),
    "add_disk_zero": ({"cmd": "add", "node": "n", "name": "z", "disk_size": 0}, "'disk_size'"),
    "add_gran_huge": ({"cmd": "add", "node": "n", "name": "z", "disk_size": 1 << 30,
                       "granularity": 1 << 70}, "'granularity'"),
    "add_enabled_str": ({"cmd": "add", "node": "n", "name": "z", "disk_size": 1 << 30,
                         "enabled": "yes"}, "'enabled'"),
    "set_offset_negative": ({"cmd": "set", "node": "n", "name": "b", "offset": -1,
                             "length": 1}, "'offset'"),
    "set_length_huge": ({"cmd": "set", "node": "n", "name": "b", "offset": 0,
                         "length": 1 << 80}, "'length'"),
    "query_node_list": ({"cmd": "query", "node": ["n"], "name": "b"}, "'node'"),
    "cmd_number": ({"cmd": 5}, "cmd"),
    "not_object": ([1, 2], "cmd"),
}


async def _ask(path: str, line: bytes) -> dict:
    r, w = await asyncio.open_unix_connection(path, limit=1 << 22)
    try:
        w.write(line + b"\n")
        await w.drain()
        answer = await asyncio.wait_for(r.readline(), 30)
    finally:
        w.close()
    assert answer.endswith(b"\n"), f"no answer to {line[:80]!r}"
    return json.loads(answer)


@pytest.fixture
async def ctl(tmp_path: Path):
    d = Daemon("source")
    d.registry.add("n", "b", 1 << 30, 65536, 1024)
    path = str(tmp_path / "c.sock")
    await attach_control(d, path)
    yield d, path
    await d.close()


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_request_is_answered(ctl, case: str,
                                       caplog: pytest.LogCaptureFixture) -> None:
    d, path = ctl
    req, needle = BAD[case]
    ans = await _ask(path, json.dumps(req).encode())
    assert ans["ok"] is False and ans["code"] == "bad_request", ans
    assert needle in ans["error"], ans
    assert "Traceback" not in caplog.text
    # The connection's daemon is unharmed: the bitmap is still there and unchanged.
    assert d.registry.get("n", "b").bitmap.count() == 0
    assert d.active_migration is None


async def test_deeply_nested_and_oversized_requests_are_answered(
        ctl, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _, path = ctl
    deep = b"[" * 100_000 + b"]" * 100_000
    ans = await _ask(path, deep)
    assert ans["code"] == "bad_request" and "nested" in ans["error"], ans
    ans = await _ask(path, b'{"cmd": "ping", "pad": "' + b"x" * (2 << 20) + b'"}')
    assert ans["code"] == "bad_request" and "longer than" in ans["error"], ans
    ans = await _ask(path, b"not json")
    assert ans["code"] == "bad_request", ans
    assert (await _ask(path, b'{"cmd": "ping"}'))["ok"] is True
    assert "Traceback" not in caplog.text


async def test_several_requests_on_one_connection_each_answered(ctl) -> None:
    _, path = ctl
    r, w = await asyncio.open_unix_connection(path)
    lines = [json.dumps(BAD["port_70000"][0]), json.dumps({"cmd": "ping"}),
             json.dumps(BAD["bitmaps_int_pair"][0]), "[" * 5000]
    w.write("\n".join(lines).encode() + b"\n")
    await w.drain()
    answers = [json.loads(await asyncio.wait_for(r.readline(), 30)) for _ in lines]
    w.close()
    assert [a["ok"] for a in answers] == [False, True, False, False]
