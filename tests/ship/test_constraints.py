"""constraints.txt: every installed package held at one version, and every install path uses it."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

import pytest

from tests.ship.dockerfile import Stage, ancestry
from tests.ship.tools import REPO

_PIN = re.compile(r"([a-z0-9][a-z0-9-]*)==(\S+)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, line in enumerate((REPO / "constraints.txt").read_text().splitlines(), start=1):
        if not line or line.startswith("#"):
            continue
        match = _PIN.fullmatch(line)
        assert match is not None, f"constraints.txt:{number}: not a canonical name==version: {line}"
        assert match[1] not in pins, f"constraints.txt:{number}: {match[1]} pinned twice"
        pins[match[1]] = match[2]
    return pins


def _requirements() -> list[str]:
    with (REPO / "pyproject.toml").open("rb") as handle:
        extras: dict[str, list[str]] = tomllib.load(handle)["project"]["optional-dependencies"]
    return [r for name, reqs in extras.items() for r in reqs if not r.startswith("dino-features")]


def test_constraints_are_sorted_canonical_exact_pins() -> None:
    pins = _constraints()
    assert list(pins) == sorted(pins)
    assert "dino-features" not in pins  # the project itself is never pinned
    for heavy in ("torch", "torchvision", "onnxruntime-gpu", "numpy", "starlette", "pydantic-core"):
        assert heavy in pins, f"{heavy} (a direct or an indirect dependency) is not held"


def test_every_requirement_of_pyproject_is_held_at_its_own_pin() -> None:
    """A pin edited in pyproject.toml without `make lock` would make every install fail with a
    resolver conflict; this says which line to fix first."""
    pins = _constraints()
    requirements = _requirements()
    assert len(requirements) > 20
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?(?:==(\S+))?", requirement)
        assert match is not None, f"unexpected requirement form: {requirement}"
        name = _canonical(match[1])
        assert name in pins, f"{requirement} is missing from constraints.txt: run `make lock`"
        if match[2] is not None:
            assert pins[name] == match[2], (
                f"pyproject.toml pins {requirement}, constraints.txt {name}=={pins[name]}: "
                "run `make lock`"
            )


def test_this_test_environment_is_the_locked_one() -> None:
    """The suite runs in the venv `make test` builds with `-c constraints.txt`: what it tests is
    what the constraints name, indirect dependencies included."""
    drift = []
    for name, version in _constraints().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            drift.append(f"{name}: not installed")
            continue
        if installed != version:
            drift.append(f"{name}: {installed} installed, {version} in constraints.txt")
    assert not drift, "`make test` reinstalls from a newer constraints.txt: " + "; ".join(drift)


def test_make_installs_both_venvs_with_the_constraints() -> None:
    makefile = (REPO / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if re.search(r"pip install .*-e ", line)]
    assert len(installs) == 2, installs  # .venv (dev) and .venv-serve (serve)
    for line in installs:
        assert line.rstrip().endswith("-c constraints.txt"), line
    stamps = [line for line in makefile.splitlines() if re.match(r"\$\((SERVE_)?STAMP\):", line)]
    assert len(stamps) == 2
    for line in stamps:
        assert "constraints.txt" in line.split(":", 1)[1], f"a new lock must rebuild: {line}"
    assert "make test" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("target", ["serve", "train"])
def test_docker_targets_install_with_the_constraints(stages: dict[str, Stage], target: str) -> None:
    chain = ancestry(stages, target)
    commands = [
        command.strip()
        for stage in chain
        for run in stage.all("RUN")
        for command in run.args.split("&&")
        if re.search(r"\bpip install\b.*\s-r\s", command)
    ]
    assert commands, f"the {target} target installs no requirements"
    for command in commands:
        assert command.endswith("-c constraints.txt"), command
    copied = [copy.args.split()[:-1] for stage in chain for copy in stage.all("COPY")]
    assert any("constraints.txt" in sources for sources in copied)
    admitted = (REPO / ".dockerignore").read_text().splitlines()
    assert "!constraints.txt" in admitted
