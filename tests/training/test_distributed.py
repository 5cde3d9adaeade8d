"""Two gloo processes on CPU through torchrun: ranks in sync, centre over the global batch."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.conftest import default_signals, tiny_args
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
from training.distributed import max_over_ranks
assert max_over_ranks([rank, 5 - rank, 0], torch.device("cpu")) == [1, 5, 0], rank
print("max-ok", rank, flush=True)
dist.destroy_process_group()
"""


NAN_ON_RANK_1_SCRIPT = """
import os, signal, sys
from training import pretrain
from training.monitor import RunLog
step, close = pretrain.Trainer.train_step, RunLog.close
steps = []
def nan_on_rank_1(self, crops, epoch, it):
    steps.append(it)
    loss = step(self, crops, epoch, it)
    return loss * float("nan") if os.environ["RANK"] == "1" and it == 4 else loss
def signalled_close(self):  # as torchrun's agent, once rank 1 has failed (not at the start)
    if sys.argv[1] == "signal at close" and os.environ["RANK"] == "0" and steps:
        os.kill(os.getpid(), signal.SIGTERM)
    close(self)
pretrain.Trainer.train_step = nan_on_rank_1
RunLog.close = signalled_close
sys.exit(pretrain.main(sys.argv[2:]))
"""


STUCK_RANK_1_SCRIPT = """
import os, sys, time
from pathlib import Path
from training import pretrain
step = pretrain.Trainer.train_step
def stuck_on_rank_1(self, crops, epoch, it):
    if os.environ["RANK"] == "1" and it == 3:
        Path(sys.argv[1]).write_text("stuck")
        while True:  # a signal's handler runs, then the sleep goes on (PEP 475)
            time.sleep(1)
    return step(self, crops, epoch, it)
pretrain.Trainer.train_step = stuck_on_rank_1
sys.exit(pretrain.main(sys.argv[2:]))
"""


SIGNAL_INSIDE_SCRIPT = """
import os, signal, sys
from training import pretrain
where, argv = sys.argv[1], sys.argv[2:]
rank = os.environ["RANK"]
step, save, start = pretrain.Trainer.train_step, pretrain.Trainer.save, pretrain.start_workers
def logged_step(self, crops, epoch, it):
    os.write(2, f"rank {rank} step {epoch} {it}\\n".encode())  # one write: lines stay whole
    return step(self, crops, epoch, it)
def signalled_save(self, epoch):  # rank 0 only writes; the others return at once
    if where == "save" and rank == "0" and epoch == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    if where == "save fails" and rank == "0" and epoch == 1:
        raise pretrain.TrainingError("cannot write the checkpoint (injected)")
    save(self, epoch)
starts = []
def signalled_start(loader, **kwargs):
    starts.append(1)
    if where == "workers" and rank == "0" and len(starts) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return start(loader, **kwargs)
resume = pretrain.Trainer.resume
def signalled_resume(self):  # the start-up's collectives are behind
    resume(self)
    if where == "resume" and rank == "1":
        os.kill(os.getpid(), signal.SIGTERM)
pretrain.Trainer.resume = signalled_resume
pretrain.Trainer.train_step = logged_step
pretrain.Trainer.save = signalled_save
pretrain.start_workers = signalled_start
sys.exit(pretrain.main(argv))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun_command(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a 2-process torchrun job on this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        str(TORCHRUN),
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        *args,
    ]
    return cmd, env


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd, env = _torchrun_command(args)
    process = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            _kill_job(process)
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def _kill_job(process: subprocess.Popen[str]) -> None:
    """SIGKILL a torchrun job still running: its agent and every process under it. The ranks
    run in sessions of their own, so killing the agent or its process group would leave them
    training on (and slowing the tests after this one)."""
    found, pending = [], [process.pid]
    while pending:  # before any kill: an orphan's parent is no longer the agent
        pid = pending.pop()
        found.append(pid)
        pending.extend(_children(pid))
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):  # a pipe a stray process still holds
        process.communicate(timeout=30)
    process.wait()


def _start_torchrun(args: list[str]) -> subprocess.Popen[str]:
    """Start a torchrun job in a session of its own, with SIGINT and SIGTERM at their defaults
    (as in a terminal, also when the test runner ignores them)."""
    cmd, env = _torchrun_command(args)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=default_signals,
    )  # fmt: skip


def test_center_all_reduce_uses_global_batch(tmp_path):
    script = tmp_path / "center.py"
    script.write_text(CENTER_SCRIPT)
    result = _torchrun([str(script)], ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("center-ok") == 2
    assert result.stdout.count("union-ok") == 2
    assert result.stdout.count("max-ok") == 2


def test_two_process_ddp_run_stays_in_sync(tmp_path, image_dir):
    out = tmp_path / "ddp"
    # A teacher this hot is uniform from the first step: the collapse watch warns, once for
    # the job (rank 0), not once per rank. The temperatures leave the checks below alone.
    hot = ("--warmup_teacher_temp", "100", "--teacher_temp", "100")
    # --canvas_size does nothing on the CPU: that too is said once, not once per rank
    extra = ("--canvas_size", "64", *hot)
    args = tiny_args(image_dir, out, "--epochs", "1", "--warmup_epochs", "0", *extra)
    result = _torchrun(["-m", "training.pretrain", *args], ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("collapse watch: teacher entropy") == 1
    assert output.count("--canvas_size 64 is ignored") == 1
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


@pytest.mark.parametrize("when", ["plain", "signal at close"])
def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, image_dir, when):
    """Only rank 1's loss is NaN: it names the iteration, and rank 0 stops at the same log
    point saying why, instead of waiting in the next step's collective for a rank that has
    gone (with NCCL, until the process group's timeout). The SIGTERM torchrun's agent sends
    rank 0 once rank 1 has failed does not replace rank 0's reason."""
    script = tmp_path / "nan.py"
    script.write_text(NAN_ON_RANK_1_SCRIPT)
    args = tiny_args(image_dir, tmp_path / "run", "--epochs", "10", "--log_every", "3")
    result = _torchrun([str(script), when, *args], ROOT)
    assert result.returncode != 0
    own = "\n".join(line for line in result.stderr.splitlines() if line.startswith("20"))
    assert own.count(" ERROR error: loss is nan at iteration 4; stopping") == 1, own
    assert own.count(" ERROR error: the loss is not finite in another process of this run") == 1
    assert "another process of this run stopped" not in own, own
    assert "exitcode  : 1 " in result.stderr


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc; none where there is no /proc)."""
    found: list[int] = []
    if not Path("/proc/self/stat").exists():
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _rank_pid(torchrun_pid: int, rank: int) -> int | None:
    """The pid of the trainer process of ``rank`` started by torchrun (under its agent)."""
    pending = [torchrun_pid]
    while pending:
        pid = pending.pop()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if pid != torchrun_pid and f"RANK={rank}".encode() in environ:
            return pid
        pending.extend(_children(pid))
    return None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through /proc")
@pytest.mark.parametrize(
    ("target", "signame", "log_every"),
    [("rank 1", "SIGTERM", "1"), ("rank 1 twice", "SIGTERM", "3"),
     ("every process", "SIGTERM", "3"), ("torchrun", "SIGINT", "3")],
)  # fmt: skip
def test_a_signal_stops_every_rank_together_each_in_one_line(
    tmp_path, image_dir, target, signame, log_every
):
    """A signal reaches the ranks at different moments: torchrun's agent forwards the one it
    got (Ctrl-C in a terminal, `docker stop`), Slurm signals every process of the job (so each
    rank receives it twice: from Slurm and from the agent), ``kill PID`` reaches one rank. A
    rank stopping on its own would leave the others waiting in a collective for a peer that
    has gone (with NCCL, until torchrun kills them), and a repeated signal must not kill a
    rank before it says why it stopped: the ranks agree where to stop, each in one line."""
    import time

    sent = getattr(signal, signame)
    out = tmp_path / "run"
    args = tiny_args(image_dir, out, "--epochs", "500", "--log_every", log_every)
    process = _start_torchrun(["-m", "training.pretrain", *args])
    try:
        deadline = time.monotonic() + 180
        steps = out / "log_steps.jsonl"
        while time.monotonic() < deadline and process.poll() is None:
            if steps.exists() and steps.read_text().count("\n") >= 2:
                break
            time.sleep(0.1)
        ranks = {rank: _rank_pid(process.pid, rank) for rank in (0, 1)}
        assert None not in ranks.values(), f"ranks not found: {ranks}"
        if target.startswith("rank 1"):
            os.kill(ranks[1], sent)
            if target == "rank 1 twice":  # as a rank Slurm and torchrun's agent both signal
                time.sleep(0.05)  # two at once would be one: a signal does not queue
                os.kill(ranks[1], sent)
        else:  # torchrun's process group (the ranks run in sessions of their own)
            os.killpg(process.pid, sent)
            if target == "every process":
                for pid in ranks.values():
                    os.kill(pid, sent)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            _kill_job(process)
    assert process.returncode != 0
    # The ranks' own lines (torchrun's report of how they ended, or of the signal it got
    # itself, is its own, traceback included).
    lines = stderr.splitlines()
    own = "\n".join(line for line in lines if line.startswith("20"))  # the trainer's format
    foreign = [
        lines[i + 1] if i + 1 < len(lines) else line
        for i, line in enumerate(lines)
        if "Traceback" in line and not (i + 1 < len(lines) and "bin/torchrun" in lines[i + 1])
    ]
    assert not foreign and "Exception ignored" not in stderr, stderr[-3000:]
    assert "another process of this run stopped" not in own, stderr[-3000:]
    assert "exitcode  : 1 " not in stderr, stderr[-3000:]
    assert "exitcode  : -" not in stderr, stderr[-3000:]  # no rank killed by a signal
    if signame == "SIGINT":
        assert own.count(" ERROR interrupted") == 2, stderr[-3000:]
    elif target == "every process":
        assert own.count(" ERROR terminated (SIGTERM") == 2, stderr[-3000:]
    else:  # rank 0 was not signalled: it stops because rank 1 was, and says so
        assert own.count(" ERROR terminated (SIGTERM); resume later from") == 1, stderr
        line = " ERROR terminated (SIGTERM in another process of this run); resume later from"
        assert own.count(line) == 1, stderr[-3000:]
        assert "exitcode  : 143" in stderr, stderr[-3000:]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through /proc")
def test_a_rank_that_cannot_stop_together_exits_by_itself_after_the_stop_timeout(
    tmp_path, image_dir
):
    """Rank 1 is stuck (in Python); rank 0 waits for it in a collective, inside C++, where
    Python never runs its signal handler. Both were signalled (as Slurm does): each exits on
    its own once --stop_timeout has passed, with one line, instead of waiting for SIGKILL."""
    import time

    script = tmp_path / "stuck.py"
    script.write_text(STUCK_RANK_1_SCRIPT)
    marker = tmp_path / "stuck"
    args = tiny_args(image_dir, tmp_path / "run", "--epochs", "50", "--stop_timeout", "3")
    process = _start_torchrun([str(script), str(marker), *args])
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None and not marker.exists():
            time.sleep(0.1)
        time.sleep(1.0)  # rank 0 is in the next collective by now
        ranks = {rank: _rank_pid(process.pid, rank) for rank in (0, 1)}
        assert None not in ranks.values(), f"ranks not found: {ranks}"
        signalled = time.monotonic()
        for pid in ranks.values():
            os.kill(pid, signal.SIGTERM)  # type: ignore[arg-type]
        _, stderr = process.communicate(timeout=90)
        took = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            _kill_job(process)
    line = " ERROR terminated (SIGTERM), but this process did not stop within 3 s (--stop_timeout)"
    own = "\n".join(line for line in stderr.splitlines() if line.startswith("20"))
    # Rank 1 (stuck in Python) exits by its deadline. Rank 0 does too, unless rank 1's exit
    # ends its collective first (gloo reports the closed connection): then it stops with its
    # own line.
    assert own.count(line) >= 1, stderr[-3000:]
    assert own.count(" ERROR terminated (SIGTERM") == 2, stderr[-3000:]
    assert "exitcode  : 143" in stderr and "exitcode  : -" not in stderr, stderr[-3000:]
    assert took < 60, took  # not torchrun's or the process group's timeout


@pytest.mark.parametrize("where", ["save", "workers", "resume"])
def test_a_signal_to_one_rank_in_its_own_work_stops_both_ranks_at_the_next_agreement(
    tmp_path, image_dir, where
):
    """SIGTERM to rank 0 while it saves the epoch's checkpoint (only rank 0 writes): the
    ranks agree after the save, before the next epoch starts. While an epoch's workers start:
    it is recorded, not raised there on rank 0 alone, and the ranks stop at the next log
    point. To rank 1 once its checkpoint is loaded (rank 0 may be in the first epoch
    already): the ranks agree before the first epoch."""
    script = tmp_path / "inside.py"
    script.write_text(SIGNAL_INSIDE_SCRIPT)
    out = tmp_path / "run"
    args = tiny_args(image_dir, out, "--epochs", "5", "--log_every", "1", "--num_workers", "1")
    result = _torchrun([str(script), where, *args], ROOT)
    own = "\n".join(line for line in result.stderr.splitlines() if line.startswith("20"))
    # Before the first checkpoint (where == "resume") a rerun starts over.
    then = "no checkpoint was written yet in" if where == "resume" else "resume later from"
    assert own.count(f" ERROR terminated (SIGTERM); {then}") == 1, result.stderr
    line = f" ERROR terminated (SIGTERM in another process of this run); {then}"
    assert own.count(line) == 1, result.stderr[-3000:]
    assert "another process of this run stopped" not in result.stderr, result.stderr[-3000:]
    steps = set(re.findall(r"rank \d step \d+ \d+", result.stderr))
    if where == "save":  # epoch 1 is saved and kept; no step of epoch 2 ran
        assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 2
        assert steps == {f"rank {r} step {e} {it}" for r in (0, 1) for e, it in
                         ((0, 0), (0, 1), (1, 2), (1, 3))}  # fmt: skip
    elif where == "resume":  # no step ran
        assert steps == set() and not (out / "checkpoint.pth").exists()
    else:  # both ranks ran the first step of epoch 1 and stopped at its log point
        assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1
        assert steps == {f"rank {r} step {e} {it}" for r in (0, 1) for e, it in
                         ((0, 0), (0, 1), (1, 2))}  # fmt: skip


def test_rank_0_failing_to_save_stops_every_rank_at_once_each_in_one_line(tmp_path, image_dir):
    """Only rank 0 saves; when that fails the ranks agree to stop after the epoch, instead of
    the others waiting for rank 0 in their next collective (with NCCL, until the deadline)."""
    script = tmp_path / "inside.py"
    script.write_text(SIGNAL_INSIDE_SCRIPT)
    out = tmp_path / "run"
    args = tiny_args(image_dir, out, "--epochs", "5", "--log_every", "1")
    result = _torchrun([str(script), "save fails", *args], ROOT)
    own = "\n".join(line for line in result.stderr.splitlines() if line.startswith("20"))
    assert own.count(" ERROR error: cannot write the checkpoint (injected)") == 1, own
    line = " ERROR error: another process of this run failed (its own error says why); stopping"
    assert own.count(line) == 1, result.stderr[-3000:]
    assert "another process of this run stopped" not in result.stderr, result.stderr[-3000:]
    assert "exitcode  : 1 " in result.stderr and "exitcode  : -" not in result.stderr
    steps = set(re.findall(r"rank \d step \d+ \d+", result.stderr))
    assert not any(" step 2 " in step for step in steps), steps  # no step of epoch 2 ran
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1  # epoch 0's is kept
