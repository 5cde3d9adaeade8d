"""The OpenAPI document is a committed snapshot: API changes show up in review."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from service.app import create_app
from service.settings import Settings

SNAPSHOT = Path(__file__).with_name("openapi.json")
REGENERATE = "python -m service.openapi > tests/service/openapi.json"


def test_openapi_matches_the_committed_snapshot() -> None:
    current = create_app(Settings.model_construct()).openapi()
    committed = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    assert current == committed, (
        f"the OpenAPI document changed; if intended, regenerate the snapshot with `{REGENERATE}`"
        " and review the diff"
    )


def test_the_regeneration_command_reproduces_the_snapshot() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.openapi"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.stdout == SNAPSHOT.read_text(encoding="utf-8")
