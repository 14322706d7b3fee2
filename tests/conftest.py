"""Shared pytest configuration.

Tests marked `docker` run two bitmig containers; they are skipped, with the reason
shown, when no Docker engine (or no Compose tool) answers on this machine.
"""

from __future__ import annotations

import functools
import shutil
import subprocess

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("docker")]
    if not marked:
        return
    reason = docker_unavailable()
    if reason:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def demo_capture(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One capture of the documented demo, shared by the pcap and tshark tests."""
    from capture import capture_demo

    return capture_demo(tmp_path_factory.mktemp("demo-capture"))
