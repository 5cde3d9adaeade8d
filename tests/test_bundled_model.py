"""The bundled default model: present, small, self-checking, and its card reproducible."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from models import contract
from service.runtime import load_model

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"
CARD = json.loads((REPOSITORY / "dino_default" / "model_card.json").read_text())
MODEL = REPOSITORY / "dino_default" / CARD["file"]


def test_bundled_model_is_present_small_and_matches_its_card() -> None:
    assert contract.model_versions(REPOSITORY, "dino_default") == [CARD["version"]]
    assert MODEL.stat().st_size < 25 * 1024 * 1024
    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == CARD["onnx_sha256"]


def test_bundled_model_passes_the_service_self_check() -> None:
    model = load_model(MODEL, name="dino_default", version=CARD["version"], device="cpu")
    check = model.check_reference()
    assert check.cases == len(contract.REFERENCE_CASES)
    assert check.max_abs_error <= check.tolerance_abs
    meta = model.metadata
    arch = CARD["architecture"]
    assert (meta.patch_size, meta.embed_dim, meta.depth, meta.num_heads) == (
        arch["patch_size"],
        arch["embed_dim"],
        arch["depth"],
        arch["num_heads"],
    )
    assert meta.weights_sha256 == CARD["weights_sha256"]
    assert meta.resolution == arch["img_size"]


def _knn_top1(command: str) -> float:
    argv = command.split()
    assert argv[:3] == ["python", "-m", "training.eval_knn"]
    out = subprocess.run(
        [sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    (row,) = [r for r in results if r["k"] == 20]
    return float(row["top1"])


@pytest.mark.slow
def test_model_card_quick_check_is_reproducible() -> None:
    """Re-runs the card's stated k-NN command (a 10k/2k subset) and the raw-pixel baseline."""
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.fail("apt-get install dataset-fashion-mnist (installed by .ci/run)")
    quick = CARD["quick_check"]
    # One image of 2000 is 0.05 points: allow two for thread-count-dependent float rounding.
    assert _knn_top1(quick["command"]) == pytest.approx(quick["top1_k20"], abs=0.1)
    assert _knn_top1(quick["raw_pixels_command"]) == pytest.approx(
        quick["raw_pixels_top1_k20"], abs=0.1
    )
    assert quick["top1_k20"] > quick["raw_pixels_top1_k20"]
