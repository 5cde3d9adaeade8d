"""Two gloo processes on CPU through torchrun: ranks in sync, centre over the global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.conftest import tiny_args
from training.checkpoint import load_checkpoint

TORCHRUN = Path(sys.executable).with_name("torchrun")
ROOT = Path(__file__).resolve().parents[2]

CENTER_SCRIPT = """
import torch, torch.distributed as dist
from training.loss import DINOLoss
dist.init_process_group("gloo")
rank = dist.get_rank()
loss = DINOLoss(4, 2, 0.04, 0.04, 0, 1)
teacher = torch.full((6, 4), float(rank + 1)) * torch.arange(1, 5)
loss(torch.randn(6, 4), teacher, 0)
# global mean over both ranks' 6 rows: rows of rank0 = 1*[1..4], rank1 = 2*[1..4] -> 1.5*[1..4]
expected = 0.1 * 1.5 * torch.arange(1, 5, dtype=torch.float32)
assert torch.allclose(loss.center[0], expected), (rank, loss.center)
print("center-ok", rank, flush=True)
from training.distributed import union_over_ranks
mine = {"shared.png", f"rank{rank}.png"}  # a file both ranks skipped counts once
assert union_over_ranks(mine) == {"shared.png", "rank0.png", "rank1.png"}, rank
print("union-ok", rank, flush=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        str(TORCHRUN),
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_center_all_reduce_uses_global_batch(tmp_path):
    script = tmp_path / "center.py"
    script.write_text(CENTER_SCRIPT)
    result = _torchrun([str(script)], ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("center-ok") == 2
    assert result.stdout.count("union-ok") == 2


def test_two_process_ddp_run_stays_in_sync(tmp_path, image_dir):
    out = tmp_path / "ddp"
    args = tiny_args(image_dir, out, "--epochs", "1", "--warmup_epochs", "0")
    result = _torchrun(["-m", "training.pretrain", *args], ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    # Fingerprints of student, teacher and centre were compared across ranks (bitwise equal);
    # the ranks saw different images, so equal centres mean the global batch was averaged.
    assert record["world_size"] == 2 and record["ranks_in_sync"] is True
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["args"]["batch_size_per_gpu"] == 4
    steps = [json.loads(line) for line in (out / "log_steps.jsonl").read_text().splitlines()]
    assert len(steps) == 18 // (4 * 2)  # iterations per epoch use the global batch
    # The peak lr (iteration 0 without warm-up) follows the linear scaling rule with the
    # total batch of 8, not the batch of 4 per process.
    assert steps[0]["lr"] == pytest.approx(0.05 * 8 / 256, rel=1e-12)
    assert steps[-1]["lr"] < steps[0]["lr"]
    assert torch.isfinite(ckpt["dino_loss"]["center"]).all()


def test_two_process_ddp_run_with_compiled_backbones(tmp_path, image_dir):
    """``torchrun ... --compile true``: DDP around compiled backbones keeps the ranks in sync."""
    out = tmp_path / "ddp_compiled"
    extra = ("--epochs", "1", "--warmup_epochs", "0", "--compile", "true", "--drop_path_rate", "0")
    result = _torchrun(["-m", "training.pretrain", *tiny_args(image_dir, out, *extra)], ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["world_size"] == 2 and record["ranks_in_sync"] is True
    assert load_checkpoint(out / "checkpoint.pth")["args"]["compile"] is True


def test_one_rank_failing_ends_the_others_with_one_line(tmp_path, image_dir):
    """Only rank 0 creates --output_dir; when that fails, rank 1 sees its collective broken
    and says that another process stopped, instead of a gloo traceback."""
    (tmp_path / "afile").write_text("x")
    args = tiny_args(image_dir, tmp_path / "afile", "--epochs", "1", "--warmup_epochs", "0")
    result = _torchrun(["-m", "training.pretrain", *args], ROOT)
    assert result.returncode != 0
    assert "it exists and is not a folder" in result.stderr  # rank 0's own error
    assert "another process of this run stopped" in result.stderr
    assert "[rank1]: Traceback" not in result.stderr
