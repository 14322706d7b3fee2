"""End to end with QEMU in two containers: docker-compose.qemu.yml.

`qemu-source` runs qemu-storage-daemon on a qcow2 image with three persistent bitmaps
and `bitmig source --qmp`; `qemu-destination` runs qemu-storage-daemon on an empty image
of the same size and `bitmig dest --qmp`. The checks ask QEMU, not bitmig: over a QMP
monitor of each qemu-storage-daemon, the bitmaps (name, granularity, recording,
persistent, count) and `x-debug-block-dirty-bitmap-sha256`, and after the destination's
qemu-storage-daemon stopped, `qemu-img info` of its image.

Run with `python -m pytest -m docker tests/test_docker_qemu.py`. The images come from
docker/build-images.sh --qemu, once per session (conftest.build_images).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import base_image_unbuildable, build_images, docker_unavailable
from test_docker import ROOT, Project, follow, run

pytestmark = pytest.mark.docker
NEEDS_QEMU_IMAGES = True  # conftest: the session's image build adds --qemu

COMPOSE_FILE = ROOT / "docker-compose.qemu.yml"
NODE = "disk0"
QMP = "/run/qemu/qmp.sock"  # the monitor bitmig does not use
EXPECTED = {  # what docker/qemu/source.sh makes: name -> (granularity, recording)
    "daily": (64 * 1024, True),
    "weekly": (1024 * 1024, False),
    "fresh": (1024 * 1024, True),
}


class QemuProject(Project):
    """A Compose project of docker-compose.qemu.yml."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__("qemu", env)
        self.base[self.base.index(str(ROOT / "docker-compose.yml"))] = str(COMPOSE_FILE)

    def wait_healthy_or_exit(self, service: str, timeout: float = 300) -> None:
        """Follow the container's events until it is healthy; fail at once with its exit
        code when it dies (or turns unhealthy) first."""
        cid = self.container(service)
        since = run(["docker", "inspect", "-f", "{{.State.StartedAt}}", cid]).stdout.strip()
        line = follow(["docker", "events", "--since", since, "--filter", f"container={cid}",
                       "--filter", "event=health_status", "--filter", "event=die",
                       "--format", "{{.Status}}"],
                      (": healthy", ": unhealthy", "die"), f"{service} healthy", timeout)
        if ": healthy" not in line:
            state = run(["docker", "inspect", "-f", "{{.State.Status}} exit {{.State.ExitCode}}",
                         cid]).stdout.strip()
            raise AssertionError(f"{service} did not become healthy: {line.strip()} ({state})")

    def qemu_bitmaps(self, service: str) -> dict[str, dict[str, Any]]:
        """QEMU's bitmaps on NODE, asked over QMP inside the container."""
        r = self.compose("exec", "-T", service, "python3", "/opt/bitmig-qemu/qmp-bitmaps.py",
                         QMP)
        nodes = json.loads(r.stdout)
        assert set(nodes) <= {NODE}, f"bitmaps on other nodes in {service}: {nodes}"
        return nodes.get(NODE, {})

    def source_results(self) -> list[dict[str, Any]]:
        out = run(["docker", "logs", self.container("qemu-source")]).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def qemu_images() -> None:
    if docker_unavailable():
        pytest.skip(docker_unavailable() or "")
    why = base_image_unbuildable("bitmig-base-qemu:bookworm")
    if why:
        pytest.skip(why)
    error = build_images()
    assert error is None, error


@pytest.fixture(scope="module")
def migrated(qemu_images: None) -> Iterator[dict[str, Any]]:
    p = QemuProject({"BITMIG_QEMU_WRITES": "40"})
    try:
        p.compose("up", "-d", timeout=300)
        p.wait_healthy("qemu-destination")
        p.wait_healthy_or_exit("qemu-source")
        before = json.loads(p.compose("exec", "-T", "qemu-source", "cat",
                                      "/run/qemu/before.json").stdout)
        state = {"project": p, "before": before.get(NODE, {}),
                 "source": p.qemu_bitmaps("qemu-source"),
                 "dest": p.qemu_bitmaps("qemu-destination"),
                 "results": p.source_results()}
        # qemu-storage-daemon stores persistent bitmaps into the image when it closes it
        cid = p.container("qemu-destination")
        p.compose("stop", "qemu-destination", timeout=120)
        assert p.wait_exit("qemu-destination") == 0
        info = run(["docker", "run", "--rm", "--volumes-from", cid, "--entrypoint", "qemu-img",
                    p.env.get("BITMIG_QEMU_IMAGE", "bitmig-qemu:latest"), "info",
                    "--output=json", "/images/disk.qcow2"]).stdout
        state["image"] = json.loads(info)
        yield state
    except BaseException:
        print(p.logs())
        raise
    finally:
        p.down()


def test_source_image_has_the_bitmaps_asked_for(migrated: dict[str, Any]) -> None:
    before = migrated["before"]
    assert {n: (b["granularity"], b["recording"]) for n, b in before.items()} == EXPECTED
    assert all(b["persistent"] for b in before.values())
    assert before["daily"]["count"] > 0 and before["weekly"]["count"] > 0
    assert before["fresh"]["count"] == 0


def test_bitmig_reports_every_bitmap_handed_off(migrated: dict[str, Any]) -> None:
    results = migrated["results"]
    assert results and results[-1]["ok"], results
    handed = {b["name"]: b for b in results[-1]["bitmaps"]}
    assert set(handed) == set(EXPECTED) and all(b["ok"] for b in handed.values()), handed
    # daily (1T at 64 KiB: 2 MiB) goes through the live phase, which waits for `complete`;
    # the 1 MiB-granularity ones (128 KiB) are small enough to be sent whole
    assert [n for n, b in handed.items() if b["live"]] == ["daily"], handed


def test_destination_qemu_has_the_source_bitmaps(migrated: dict[str, Any]) -> None:
    src, dst = migrated["before"], migrated["dest"]
    assert set(dst) == set(src), f"destination has {sorted(dst)}, source {sorted(src)}"
    for name in src:
        for field in ("granularity", "recording", "persistent", "count", "sha256"):
            assert dst[name][field] == src[name][field], (name, field, dst[name], src[name])


def test_source_qemu_bitmaps_unchanged(migrated: dict[str, Any]) -> None:
    # equal as a whole: also no bitmig-... bitmap left behind in the source's QEMU
    assert migrated["source"] == migrated["before"]


def test_destination_image_holds_them_after_qemu_closed_it(migrated: dict[str, Any]) -> None:
    """The delivered bitmaps are persistent: QEMU wrote them into the image on close."""
    data = migrated["image"]["format-specific"]["data"]
    stored = {b["name"]: (b["granularity"], "auto" in b["flags"], "in-use" in b["flags"])
              for b in data.get("bitmaps", [])}
    assert stored == {n: (g, rec, False) for n, (g, rec) in EXPECTED.items()}
    assert not data.get("corrupt")
