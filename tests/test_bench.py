"""Smoke runs of the benchmark scripts (tiny settings): they run and report what they promise.

The figures are not checked (speed is measured, never asserted); the structure is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def test_train_throughput_reports_every_variant_against_the_reference() -> None:
    result = _run("bench/train_throughput.py", "--tiny", "--variants", "bf16,fp16")
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    by_name = {r["bench"]: r for r in records}
    for name in ("train_step_reference", "train_step_optimised_bf16", "train_step_optimised_fp16"):
        assert "error" not in by_name[name] and by_name[name]["img_per_s"] > 0, by_name[name]
    assert by_name["train_step_optimised_fp16"]["over_reference"] > 0
    # The reference reads the loss and every gradient norm on the host; ours reads nothing.
    assert by_name["train_step_reference"]["host_syncs_per_step"] > 0
    assert by_name["train_step_optimised_bf16"]["host_syncs_per_step"] == 0
    modes = {(r["setting"], r["mode"]) for r in records if r["bench"] == "batched_augmentation"}
    assert ("2x224+10x96", "photometric") in modes and ("2x224+10x96", "whole") in modes
    cpu = [r for r in records if r["bench"] == "cpu_augmentation"]
    assert all(r["geometry_ms_per_image_per_core"] > 0 for r in cpu) and len(cpu) == 2
    assert _run("bench/train_throughput.py", "--variants", "warp").returncode == 2


def test_serve_throughput_compares_the_service_with_the_raw_session(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    result = _run(
        "bench/serve_throughput.py", "--tiny", "--concurrency", "1,4", "--requests", "8",
        "--seconds", "2", "--json-out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert len(report["results"]) == 8  # 2 outputs x 2 encodings x 2 concurrencies
    for level in report["results"]:
        assert level["failures"] == 0 and level["images_per_s"] > 0
        assert level["raw_images_per_s"] > 0 and level["ratio"] > 0
    assert report["hardware"]["execution_provider"] == "CPUExecutionProvider"
