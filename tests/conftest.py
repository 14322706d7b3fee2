"""Shared pytest configuration.

Tests marked `docker` run two bitmig containers; they are skipped, with the reason
shown, when no Docker engine (or no Compose tool) answers on this machine.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest


@functools.cache
def compose_command() -> tuple[str, ...] | None:
    """`docker compose` (v2 plugin) when it works, else `docker-compose` (v1), else None."""
    try:
        if subprocess.run(["docker", "compose", "version"], capture_output=True,
                          timeout=30).returncode == 0:
            return ("docker", "compose")
    except (OSError, subprocess.TimeoutExpired):
        pass
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    return None


@functools.cache
def docker_unavailable() -> str | None:
    """Why the docker tests cannot run here, or None when they can."""
    if shutil.which("docker") is None:
        return "docker tests need the docker CLI, which is not installed"
    try:
        r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "docker tests need a Docker engine: `docker info` timed out"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return f"docker tests need a Docker engine: `docker info` failed ({last})"
    if compose_command() is None:
        return "docker tests need Docker Compose (`docker compose` or `docker-compose`)"
    return None


# Set at collection: a selected test module says NEEDS_QEMU_IMAGES = True, so the one
# image build of the session (build_images) also makes the QEMU images.
_qemu_images_needed = False


@functools.cache
def build_images() -> str | None:
    """Run docker/build-images.sh once per session (with --qemu when a selected test
    needs bitmig-qemu:latest); None on success, else why the images are missing."""
    root = Path(__file__).resolve().parents[1]
    cmd = [str(root / "docker" / "build-images.sh")]
    if _qemu_images_needed:
        cmd.append("--qemu")
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return f"{' '.join(cmd)} failed (exit {r.returncode}):\n{r.stderr[-4000:]}"
    print(f"\nimages built in {time.monotonic() - t0:.1f}s ({' '.join(cmd[1:]) or 'plain'})")
    return None


def base_image_unbuildable(image: str) -> str | None:
    """Why build-base.sh cannot make `image` here (it is missing and debootstrap cannot
    run), or None."""
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True,
                      timeout=60).returncode == 0:
        return None
    if shutil.which("debootstrap") is None:
        return f"{image} is missing and debootstrap (to build it) is not installed"
    if os.geteuid() != 0:
        return f"{image} is missing and debootstrap (to build it) needs root"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    global _qemu_images_needed
    marked = [item for item in items if item.get_closest_marker("docker")]
    if not marked:
        return
    _qemu_images_needed = any(getattr(getattr(item, "module", None), "NEEDS_QEMU_IMAGES",
                                      False) for item in marked)
    reason = docker_unavailable()
    if reason:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def demo_capture(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One capture of the documented demo, shared by the pcap and tshark tests."""
    from capture import capture_demo

    return capture_demo(tmp_path_factory.mktemp("demo-capture"))


# A demo whose writes outrun every pass, so its completion is forced after 3 passes: the
# trace summary and plot tests read the same run.
FORCED_DEMO_ARGS = ("--disk-size", "2T", "--dirty", "0.002", "--write-rate", "300000",
                    "--downtime-ms", "1", "--max-passes", "3")


def run_demo(trace: Path, *args: str) -> dict:
    """`bitmig demo --json --trace trace ARGS`: its report (both traces are written)."""
    out = subprocess.run([sys.executable, "-m", "bitmig", "demo", "--json", "--trace",
                          str(trace), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="session")
def forced_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(trace path, report) of one run of the demo with FORCED_DEMO_ARGS."""
    trace = tmp_path_factory.mktemp("forced-demo") / "t.jsonl"
    return trace, run_demo(trace, *FORCED_DEMO_ARGS)
