"""End to end across two containers: docker-compose.yml's `source` and `destination`.

Run with `python -m pytest -m docker tests/test_docker.py`. The images are built once
per session by docker/build-images.sh; every test uses its own Compose project (own
network and volumes) and removes it afterwards, also when it fails.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import build_images, compose_command, docker_unavailable

from bitmig.tools.trace_cli import read_trace

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
BITMAP = ("drive0", "bitmap0")

# Small and quick: 16 TiB disk (32 MiB bitmap), 1 % dirty, 1000 writes/s.
HAPPY_ENV = {"BITMIG_DISK_SIZE": "16T", "BITMIG_FILL": "0.01", "BITMIG_WORKLOAD_RATE": "1000"}
# Long enough to disrupt, by design rather than by load: the source keeps doing dirty
# passes (3000 writes/s) until the test releases the freeze over the control socket,
# once the disruption is over. (A downtime target it could hardly meet, with up to 400
# passes, made a loaded machine pass for minutes before completing.) A 64 MiB bitmap:
# filling and hashing a larger one took tens of seconds on a busy machine and proves
# nothing more. Short timeouts so a dead peer is noticed within seconds, and enough
# retries (1, 2, 4, 8, 16 s apart) to outlast the outage.
BUSY_ENV = {
    "BITMIG_DISK_SIZE": "32T", "BITMIG_FILL": "0.001", "BITMIG_WORKLOAD_RATE": "3000",
    "BITMIG_WAIT_FOR_COMPLETE": "1",
    "BITMIG_IO_TIMEOUT": "3", "BITMIG_CONNECT_TIMEOUT": "3",
    "BITMIG_RETRIES": "6", "BITMIG_RETRY_DELAY": "1",
}


def run(cmd: list[str], timeout: float = 120, check: bool = True,
        **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\n"
                             f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}")
    return r


class Project:
    """One Compose project of docker-compose.yml with its own name and settings."""

    def __init__(self, tag: str, env: dict[str, str]) -> None:
        self.name = f"bitmigt{tag}{uuid.uuid4().hex[:8]}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BITMIG_")}
        self.env.update(env)
        self.env.pop("COMPOSE_PROJECT_NAME", None)
        cmd = compose_command()
        assert cmd is not None
        self.base = [*cmd, "-f", str(ROOT / "docker-compose.yml"), "-p", self.name]

    def compose(self, *args: str, timeout: float = 120,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([*self.base, *args], timeout=timeout, check=check, cwd=ROOT, env=self.env)

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-a", "-q", service, check=False).stdout.split() \
            or self.compose("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"expected one {service} container, got {ids}"
        return ids[0]

    def network(self) -> str:
        r = run(["docker", "network", "ls", "--filter",
                 f"label=com.docker.compose.project={self.name}", "--format", "{{.Name}}"])
        names = r.stdout.split()
        assert len(names) == 1, names
        return names[0]

    def wait_healthy(self, service: str, timeout: float = 120) -> None:
        """Follow the container's health events (docker events), not a polling loop."""
        cid = self.container(service)
        since = run(["docker", "inspect", "-f", "{{.State.StartedAt}}", cid]).stdout.strip()
        status = run(["docker", "inspect", "-f", "{{.State.Health.Status}}", cid]).stdout
        if status.strip() == "healthy":
            return
        # Events since the container started, so a health change between the inspect
        # above and this call is not missed.
        follow(["docker", "events", "--since", since, "--filter", f"container={cid}",
                "--format", "{{.Status}}"],
               (": healthy",), f"{service} healthy", timeout)

    def wait_exit(self, service: str, timeout: float = 150) -> int:
        return int(run(["docker", "wait", self.container(service)], timeout=timeout).stdout)

    def source_results(self) -> list[dict[str, Any]]:
        """The source's JSON lines (one per attempt), from its stdout only."""
        out = run(["docker", "logs", self.container("source")]).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def query(self) -> dict[str, Any]:
        node, name = BITMAP
        r = self.compose("exec", "-T", "destination", "bitmig", "ctl", "/run/bitmig/dest.sock",
                         "query", f"node={node}", f"name={name}")
        return json.loads(r.stdout)

    def release(self) -> None:
        """Let the source's migration freeze (BITMIG_WAIT_FOR_COMPLETE=1): it does so at
        its next decision, in the attempt under way or the next one."""
        r = self.compose("exec", "-T", "source", "bitmig", "ctl", "/run/bitmig/source.sock",
                         "complete")
        assert json.loads(r.stdout) == {"released": True}, r.stdout

    def copy_traces(self, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        run(["docker", "cp", f"{self.container('destination')}:/traces/.", str(dest)])
        return dest

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "200", check=False).stdout

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "-t", "3", check=False, timeout=120)


@pytest.fixture(scope="session")
def images() -> None:
    """Build bitmig:latest (and the base image if missing) once per session."""
    if docker_unavailable():
        pytest.skip(docker_unavailable() or "")
    error = build_images()  # once per session, shared with test_docker_qemu.py
    assert error is None, error


@contextmanager
def project(tag: str, env: dict[str, str]) -> Iterator[Project]:
    p = Project(tag, env)
    try:
        yield p
    except BaseException:
        print(p.logs())
        raise
    finally:
        p.down()


def wait_for_line(p: Project, service: str, needles: tuple[str, ...],
                  timeout: float = 60) -> str:
    """Follow a container's output until a line contains one of needles; return it."""
    return follow(["docker", "logs", "-f", p.container(service)], needles, service, timeout)


def follow(cmd: list[str], needles: tuple[str, ...], what: str, timeout: float) -> str:
    """Run a following command (docker logs -f, docker events) until a line of its output
    contains one of needles; return that line. The timeout only bounds a hang."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {needles} from {what} in {timeout}s") from None
            if line is None:
                raise AssertionError(f"{what} ended before printing any of {needles}")
            if any(n in line for n in needles):
                return line
    finally:
        proc.kill()
        proc.wait()


def handoff(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The handed-off bitmap of the last (successful) attempt."""
    assert results, "the source printed no result"
    last = results[-1]
    assert last["ok"], last
    (b,) = last["bitmaps"]
    assert b["ok"] and (b["node"], b["name"]) == BITMAP, b
    assert len(b["sha256"]) == 64
    return b


def show_attempts(results: list[dict[str, Any]]) -> None:
    print("attempts (n, ok, error, passes, seconds):",
          [(r["attempt"], r["ok"], r["error"], r["passes"], round(r["duration_s"], 1))
           for r in results])


def assert_same_on_destination(p: Project, b: dict[str, Any]) -> None:
    q = p.query()
    assert q["sha256"] == b["sha256"], "destination digest differs from the source's handoff"
    assert q["count"] == b["count"]


# -- happy path (one migration, shared by the digest and trace checks) ----------------


@pytest.fixture(scope="module")
def happy(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with project("ok", HAPPY_ENV) as p:
        t0 = time.monotonic()
        # exactly the documented command
        r = p.compose("up", "--abort-on-container-exit", "--exit-code-from", "source",
                      timeout=240, check=False)
        took = time.monotonic() - t0
        assert r.returncode == 0, f"compose up exited {r.returncode}\n{r.stdout[-4000:]}"
        results = p.source_results()
        traces = p.copy_traces(tmp_path_factory.mktemp("traces"))
        # the stored bitmap survives a restart: query it from the named state volume
        p.compose("start", "destination")
        p.wait_healthy("destination")
        yield {"project": p, "results": results, "traces": traces, "up_s": took}


def test_happy_path_digest_matches(happy: dict[str, Any]) -> None:
    results = happy["results"]
    assert len(results) == 1 and results[0]["attempt"] == 1, results
    b = handoff(results)
    assert_same_on_destination(happy["project"], b)


def frames_of(records: list[dict[str, Any]], direction: str) -> list[tuple[Any, ...]]:
    return [(r["kind"], json.dumps(r["fields"], sort_keys=True), r.get("payload_len"),
             r.get("payload_crc32"), r["bytes"])
            for r in records if r.get("type") == "frame" and (r["dir"] == "send") ==
            (direction == "send")]


def successful_source_attempt(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    attempts: list[list[dict[str, Any]]] = []
    for r in records:
        if r.get("type") == "migration":
            attempts.append([])
        if attempts:
            attempts[-1].append(r)
    ok = [a for a in attempts if any(r.get("type") == "outcome" and r.get("ok") for r in a)]
    assert len(ok) == 1, f"{len(ok)} successful attempts in the source trace"
    return ok[0]


def successful_dest_connection(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    peers = [r["peer"] for r in records if r.get("type") == "outcome" and r.get("ok")]
    assert len(peers) == 1, f"successful connections in the destination trace: {peers}"
    return [r for r in records if r.get("peer") == peers[0]]


def test_traces_frames_sent_equal_frames_received(happy: dict[str, Any]) -> None:
    src = successful_source_attempt(read_trace(str(happy["traces"] / "source.jsonl")))
    dst = successful_dest_connection(read_trace(str(happy["traces"] / "dest.jsonl")))
    src_sent, src_recv = frames_of(src, "send"), frames_of(src, "recv")
    dst_sent, dst_recv = frames_of(dst, "send"), frames_of(dst, "recv")
    assert src_sent and dst_sent
    assert Counter(f[0] for f in src_sent) == Counter(f[0] for f in dst_recv)
    assert Counter(f[0] for f in dst_sent) == Counter(f[0] for f in src_recv)
    assert src_sent == dst_recv
    assert dst_sent == src_recv
    kinds = {f[0] for f in src_sent}
    assert {"hello", "start", "bits", "complete", "end"} <= kinds, kinds
    assert sum(f[4] for f in src_sent) == happy["results"][-1]["bytes_sent"]


# -- disruptions ------------------------------------------------------------------------


@pytest.fixture
def busy(images: None) -> Iterator[Project]:
    with project("busy", BUSY_ENV) as p:
        yield p


def start_busy_migration(p: Project) -> tuple[str, str]:
    """Start both services; return (destination container, network) once the source is
    sending its bulk pass."""
    p.compose("up", "-d", "destination")
    p.wait_healthy("destination")
    dest, net = p.container("destination"), p.network()
    p.compose("up", "-d", "--no-deps", "source")
    line = wait_for_line(p, "source", ("phase bulk", "phase dirty", '"attempt"'))
    assert "phase bulk" in line or "phase dirty" in line, f"migration already over: {line}"
    return dest, net


def test_destination_killed_mid_migration(busy: Project) -> None:
    p = busy
    dest, _ = start_busy_migration(p)
    run(["docker", "kill", dest])
    # The source has seen its first attempt fail (it prints one JSON line per attempt)
    # before the destination comes back, so a retry is what completes the migration.
    wait_for_line(p, "source", ('"attempt"',))
    p.compose("start", "destination")
    p.release()
    assert p.wait_exit("source") == 0, p.source_results()
    results = p.source_results()
    show_attempts(results)
    assert len(results) >= 2 and not results[0]["ok"], results
    assert results[0]["error"], results[0]
    assert all(not r["ok"] for r in results[:-1])
    assert [r["attempt"] for r in results] == list(range(1, len(results) + 1))
    assert_same_on_destination(p, handoff(results))


def test_network_cut_mid_migration(busy: Project) -> None:
    p = busy
    dest, net = start_busy_migration(p)
    run(["docker", "network", "disconnect", net, dest])
    # Both sides give the connection up (3 s I/O timeout) before the network is back:
    # the source's first attempt ends, and the destination logs why it dropped the peer.
    wait_for_line(p, "source", ('"attempt"',))
    wait_for_line(p, "destination", ("timed out", "Connection reset", "Broken pipe"))
    run(["docker", "network", "connect", "--alias", "destination", net, dest])
    p.release()
    assert p.wait_exit("source") == 0, p.source_results()
    results = p.source_results()
    show_attempts(results)
    for r in results[:-1]:  # a failed attempt failed cleanly: said why, handed nothing off
        assert not r["ok"] and r["error"], r
        assert not any(b["ok"] for b in r["bitmaps"]), r
    assert_same_on_destination(p, handoff(results))
