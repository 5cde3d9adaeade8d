"""Finding and running the container linters that the dev extra installs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def find_tool(name: str) -> str | None:
    """The binary beside this interpreter (the virtualenv's bin), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def clean_env() -> dict[str, str]:
    """This environment less COMPOSE_*, DOCKER_* and DINO_* variables, so defaults apply."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COMPOSE_", "DOCKER_", "DINO_"))
    }


def run_tool(args: list[str], *, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run a linter with a clean environment; never raises on a non-zero exit."""
    return subprocess.run(
        args, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=120, check=False
    )
