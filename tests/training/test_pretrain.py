"""End-to-end tiny runs of ``training.pretrain`` on CPU: layout, resume, corruption, export."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.checkpoint import file_sha256
from models.contract import MetadataKey, model_path, model_versions
from models.export import read_metadata
from tests.training.conftest import default_signals, tiny_args
from training.checkpoint import CheckpointCorruptError, load_checkpoint, output_dir_lock
from training.config import parse_config
from training.distributed import cleanup_distributed, init_distributed
from training.pretrain import Trainer, canvas_warnings, main


def test_full_run_resume_is_exact_and_exports(tmp_path, image_dir, caplog):
    (image_dir / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(tiny_args(image_dir, full)) == 0
    assert "--freeze_last_layer" not in caplog.text  # 1 of 2 epochs: no warning
    assert main(tiny_args(image_dir, split, "--max_epochs_this_run", "1")) == 0
    assert load_checkpoint(split / "checkpoint.pth")["epoch"] == 1
    repo = tmp_path / "repo"
    assert main(tiny_args(image_dir, split, "--export-to", str(repo / "tiny"))) == 0

    a = load_checkpoint(full / "checkpoint.pth")
    b = load_checkpoint(split / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 2
    for key in ("student", "teacher"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key} {name} differs after resume"
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])

    # Official full-checkpoint layout, weights-only loadable, plus vit_config.
    assert (
        "module.backbone.cls_token" in a["student"] and "module.head.mlp.0.weight" in a["student"]
    )
    assert "backbone.pos_embed" in a["teacher"] and "head.last_layer.weight_g" in a["teacher"]
    assert "head.last_layer.weight_v" in a["teacher"]
    assert isinstance(a["args"], dict) and a["args"]["out_dim"] == 64
    assert a["vit_config"]["embed_dim"] == 32 and a["vit_config"]["img_size"] == 32
    assert a["dino_loss"]["center"].shape == (1, 64)
    assert (full / "checkpoint0000.pth").is_file() and (full / "config.yaml").is_file()

    epochs = [json.loads(line) for line in (full / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert {"train_loss", "train_lr", "train_wd"} <= epochs[0].keys()
    assert epochs[-1]["skipped_images"] == 1  # the broken file, skipped and counted
    steps = (full / "log_steps.jsonl").read_text().splitlines()
    assert len(steps) == 8 and "momentum" in json.loads(steps[0])  # 18 images // 4 = 4 steps x 2

    # The teacher was exported as a new model version.
    assert model_versions(repo, "tiny") == [1]

    # TensorBoard scalars (tensorboard is in the dev extra): the logged steps and epochs.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(full / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/loss", "step/lr", "step/momentum"} <= tags
    assert len(events.Scalars("step/loss")) == 8
    assert events.Scalars("step/loss")[0].value == pytest.approx(json.loads(steps[0])["loss"])


def test_truncated_checkpoint_is_detected(tmp_path, image_dir, caplog):
    out = tmp_path / "run"
    assert main(tiny_args(image_dir, out, "--max_epochs_this_run", "1")) == 0
    ckpt = out / "checkpoint.pth"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    assert main(tiny_args(image_dir, out)) == 1
    assert "does not match its recorded digest" in caplog.text
    # Without the digest sidecar the torch reader still reports a clear error.
    (out / "checkpoint.pth.sha256").unlink()
    try:
        load_checkpoint(ckpt)
    except CheckpointCorruptError as err:
        assert "truncated or corrupted" in str(err)
    else:
        raise AssertionError("truncated checkpoint loaded")


def test_user_errors_exit_cleanly(tmp_path, capsys):
    assert main(["--data_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path)]) == 1
    assert main(["--data_path", "x", "--precision", "fp17"]) == 2
    assert "precision" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RANK": "1"}, "RANK=1 is not in [0, 1) (WORLD_SIZE unset (1)); start a run of several"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2 is not in [0, 2) (WORL"),
        ({"WORLD_SIZE": "2", "RANK": "1"}, "WORLD_SIZE=2 but LOCAL_RANK is not set; start"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK and LOCAL_RANK are not set"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 is not a number of processes"),
        ({"RANK": "one"}, "RANK='one' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1 is not in [0, 2)"),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"},
         "LOCAL_RANK=3 is not in [0, 2) (WORLD_SIZE=4, LOCAL_WORLD_SIZE=2)"),
    ],
)  # fmt: skip
def test_torchrun_variables_that_do_not_fit_together_are_one_line(
    tmp_path, image_dir, capsys, monkeypatch, env, expected
):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(tiny_args(image_dir, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1, err
    assert "unset them to train in one process" in err
    assert not (tmp_path / "run").exists()


def test_compile_trains_the_same_weights_as_eager(tmp_path, image_dir):
    """``--compile`` (inductor on the CPU here) changes speed only: same steps, same keys.

    Drop path is off because compiled code draws its random numbers differently.
    """
    from torch._dynamo.utils import counters

    counters.clear()
    runs = {}
    for mode in ("eager", "compiled"):
        out = tmp_path / mode
        extra = ["--epochs", "1", "--drop_path_rate", "0"]
        extra += ["--compile", "true"] if mode == "compiled" else []
        assert main(tiny_args(image_dir, out, *extra)) == 0
        runs[mode] = load_checkpoint(out / "checkpoint.pth")
    # Whole-backbone graphs: the position-embedding resampling does not break the graph.
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 2  # one per crop resolution
    eager, compiled = runs["eager"], runs["compiled"]
    for key in ("student", "teacher"):
        assert eager[key].keys() == compiled[key].keys()  # no "_orig_mod." in the checkpoint
        for name, value in eager[key].items():
            got = compiled[key][name]
            if name.endswith("attn.qkv.bias"):
                # The key bias cancels in the softmax: its gradient is rounding noise, which
                # Adam scales up to lr-sized steps of either sign. Compare it apart, within the
                # run's total step, the sum of its lr schedule (1.56e-3 here).
                dim = value.shape[0] // 3
                torch.testing.assert_close(
                    got[dim : 2 * dim], value[dim : 2 * dim], atol=2 * 1.56e-3, rtol=0
                )
                got, value = (
                    torch.cat((got[:dim], got[2 * dim :])),
                    torch.cat((value[:dim], value[2 * dim :])),
                )
            torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(compiled["dino_loss"]["center"], eager["dino_loss"]["center"])
    losses = {
        mode: [json.loads(line)["loss"] for line in (tmp_path / mode / "log_steps.jsonl").open()]
        for mode in runs
    }
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)


def test_resume_with_other_options_names_them_and_keeps_the_run(tmp_path, image_dir, caplog):
    out = tmp_path / "run"
    assert main(tiny_args(image_dir, out, "--max_epochs_this_run", "1")) == 0
    config_before = (out / "config.yaml").read_text()
    caplog.clear()
    argv = tiny_args(image_dir, out, "--embed_dim", "64", "--optimizer", "sgd")
    assert main([*argv, "--global_crops_size", "48"]) == 1
    assert "--embed_dim: 32 -> 64" in caplog.text and "--optimizer: adamw -> sgd" in caplog.text
    assert "--global_crops_size: 32 -> 48" in caplog.text  # the flag, not the ViT's img_size
    assert "Traceback" not in caplog.text
    # The failed attempt changed nothing: its options are not saved over the run's.
    assert (out / "config.yaml").read_text() == config_before
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1


def test_logs_are_not_repeated_by_a_resume_or_a_fresh_start(tmp_path, image_dir):
    out = tmp_path / "run"
    assert main(tiny_args(image_dir, out, "--max_epochs_this_run", "1")) == 0
    # As if the process had died in epoch 1 after logging two steps, one of them cut short.
    with open(out / "log_steps.jsonl", "a") as handle:
        handle.write(json.dumps({"iteration": 4, "epoch": 1, "loss": 1.0}) + "\n")
        handle.write('{"iteration": 5, "ep')
    with open(out / "log.txt", "ab") as binary:  # a damaged line (not UTF-8)
        binary.write(b"\xff\xfe x\n")
    assert main(tiny_args(image_dir, out)) == 0
    steps = [json.loads(line) for line in (out / "log_steps.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in steps] == list(range(8))
    epochs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert (out / "log.txt.damaged").read_bytes() == b"\xff\xfe x\n"  # set aside, not lost
    assert (out / "log_steps.jsonl.damaged").read_bytes() == b'{"iteration": 5, "ep\n'
    assert epochs[0]["ranks_in_sync"] is True and epochs[0]["img_per_s"] > 0

    assert main(tiny_args(image_dir, out, "--resume", "false", "--epochs", "1")) == 0
    epochs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0]


def test_a_finished_run_exports_what_its_export_to_lacks_once(
    tmp_path, image_dir, caplog, monkeypatch
):
    out = tmp_path / "run"
    argv = tiny_args(image_dir, out, "--epochs", "1", "--warmup_epochs", "0")
    assert main(argv) == 0
    assert "--freeze_last_layer 1 >= --epochs 1: the head's last layer is never trained" in (
        caplog.text
    )
    # Asked again with --export-to: the finished checkpoint's teacher is exported.
    caplog.clear()
    repo = tmp_path / "repo"
    assert main([*argv, "--export-to", str(repo / "m")]) == 0
    assert "holds no export of its checkpoint (no version at all): exporting it now" in (
        caplog.text
    )
    assert model_versions(repo, "m") == [1]
    digest = file_sha256(out / "checkpoint.pth")
    recorded = read_metadata(model_path(repo, "m", 1))[MetadataKey.WEIGHTS_SHA256]
    assert recorded == digest
    # Once it is there, nothing to do.
    caplog.clear()
    assert main([*argv, "--export-to", str(repo / "m")]) == 0
    assert "nothing to do" in caplog.text and f"already exported to {repo / 'm'}" in caplog.text
    assert model_versions(repo, "m") == [1]
    # Without --export-to: nothing to do.
    caplog.clear()
    assert main(argv) == 0
    assert "nothing to do" in caplog.text and "exporting" not in caplog.text


def test_a_final_export_cut_short_is_completed_by_running_the_command_again(
    tmp_path, image_dir, caplog, monkeypatch
):
    # The rerun of a run stopped during its final export said "nothing to do" and exited 0:
    # the export was lost for good, and the repository kept serving an older version.
    import models.export as export_module

    out, repo = tmp_path / "run", tmp_path / "repo"
    argv = tiny_args(image_dir, out, "--export_every", "1", "--export-to", str(repo / "m"))
    real = export_module.check_parity
    calls = []

    def stopped_in_the_second_export(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the final export (the first is epoch 0's periodic one)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(export_module, "check_parity", stopped_in_the_second_export)
    assert main(argv) == 130
    assert model_versions(repo, "m") == [1]  # epoch 0's teacher only
    monkeypatch.setattr(export_module, "check_parity", real)
    caplog.clear()
    assert main(argv) == 0
    assert "exporting it now" in caplog.text
    assert model_versions(repo, "m") == [1, 2]
    digest = file_sha256(out / "checkpoint.pth")
    assert read_metadata(model_path(repo, "m", 2))[MetadataKey.WEIGHTS_SHA256] == digest


def test_a_crash_between_the_checkpoint_and_its_copy_keeps_the_epochs_log_line(
    tmp_path, image_dir, monkeypatch
):
    # checkpoint.pth was replaced before the epoch's log.txt line was written: a crash in
    # between (here while the checkpoint0001.pth copy is published) lost the line for good.
    from training import checkpoint as checkpoint_module

    out = tmp_path / "run"
    argv = tiny_args(image_dir, out, "--saveckp_freq", "1")
    real = checkpoint_module._publish

    def crash_at_the_copy(tmp, target):
        if target.name == "checkpoint0001.pth":
            raise KeyboardInterrupt
        real(tmp, target)

    monkeypatch.setattr(checkpoint_module, "_publish", crash_at_the_copy)
    assert main(argv) == 130
    monkeypatch.setattr(checkpoint_module, "_publish", real)
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 2
    assert main(argv) == 0  # finished: nothing to do
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1]


def test_a_dataloader_worker_error_is_reported_without_its_traceback(tmp_path, caplog):
    data = tmp_path / "broken"
    data.mkdir()
    for i in range(6):
        (data / f"img{i}.png").write_bytes(b"not a png")
    argv = tiny_args(data, tmp_path / "run", "--num_workers", "1")
    assert main(argv) == 1
    message = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    assert message.startswith("error: none of the 6 images under")
    assert f"is readable: 6 not an image (e.g. {data / 'img0.png'}: " in message
    assert "Traceback" not in message


def _worker_died(signal: str) -> RuntimeError:
    """The error torch raises when a loader worker dies: the signal is in the wrapped cause."""
    err = RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
    err.__cause__ = RuntimeError(f"DataLoader worker (pid 4242) is killed by signal: {signal}. ")
    return err


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (_worker_died("Killed"), "(killed by signal: Killed), usually for lack of memory"),
        (RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. "), "memory"),
        (_worker_died("Bus error"), "shm_size"),
        (MemoryError(), "out of memory; try a smaller --batch_size_per_gpu"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "memory (CUDA"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"), "out of memory ("),
    ],
)
def test_a_killed_worker_or_lack_of_memory_is_one_line(
    tmp_path, image_dir, caplog, monkeypatch, failure, expected
):
    def run(self):
        raise failure

    monkeypatch.setattr(Trainer, "run", run)
    assert main(tiny_args(image_dir, tmp_path / "run")) == 1
    message = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    assert expected in message  # and what a rerun does (here, before any checkpoint):
    assert message.endswith(f"(no checkpoint was written yet in {tmp_path / 'run'}, so a rerun "
                            "starts over)")  # fmt: skip


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("a bug"),
        _worker_died("Segmentation fault"),  # a crash in a decoder: not a lack of memory
        RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly"),  # no signal known
        RuntimeError("   "),
    ],
)
def test_other_runtime_errors_keep_their_traceback(tmp_path, image_dir, monkeypatch, failure):
    def run(self):
        raise failure

    monkeypatch.setattr(Trainer, "run", run)
    with pytest.raises(RuntimeError):
        main(tiny_args(image_dir, tmp_path / "run"))


def _no_cxx_compiler(chained: bool) -> RuntimeError:
    """What inductor raises at the first compiled step when no C++ compiler works (as with
    PATH=/path/to/venv/bin): its InductorError wrapping InvalidCxxCompiler."""
    from torch._inductor.exc import InductorError, InvalidCxxCompiler

    inner = InvalidCxxCompiler()
    err = InductorError(inner, None)
    if chained:
        err.__context__ = inner
    return err


@pytest.mark.parametrize("chained", [True, False])
def test_compile_without_a_cxx_compiler_is_one_line(
    tmp_path, image_dir, monkeypatch, caplog, chained
):
    def compile_fails(self, crops, epoch, it):
        raise _no_cxx_compiler(chained)

    monkeypatch.setattr(Trainer, "train_step", compile_fails)
    assert main(tiny_args(image_dir, tmp_path / "run", "--compile", "true")) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert errors[0].startswith(
        "error: --compile true needs a working C++ compiler, and torch found none (No working "
        "C++ compiler found in torch._inductor.config.cpp.cxx: "
    )
    assert errors[0].endswith("install one (such as g++: apt-get install g++) or run without "
                              "--compile")  # fmt: skip


# Operators that copy a device value to the host (or need its value to size a result): each one
# stalls the CPU until the GPU catches up, so a step must run none of them.
_HOST_SYNC_OPS = frozenset(
    {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique_consecutive"}
)


class _SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket.__name__ in _HOST_SYNC_OPS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("augment_device", "optimizer"),
    [("cpu", "adamw"), ("gpu", "adamw"), ("cpu", "sgd"), ("cpu", "lars")],
)
def test_a_training_step_never_waits_for_the_device(tmp_path, image_dir, augment_device, optimizer):
    # On a GPU every `.item()`, `float(t)` or data-dependent shape is a host sync; the eager
    # step (augmentation on the device included) must queue its work without one. The loss is
    # read only at log points.
    config = parse_config(
        tiny_args(
            image_dir,
            tmp_path / "run",
            "--augment_device",
            augment_device,
            "--optimizer",
            optimizer,
        )
    )
    trainer = Trainer(config, init_distributed("cpu"))
    try:
        batch, _ = next(iter(trainer.loader))
        trainer.train_step(trainer.device_crops(batch), 0, 0)  # lazy optimiser state
        with _SyncCounter() as counter:
            crops = trainer.device_crops(batch)
            trainer.train_step(crops, 1, 1)  # epoch 1: the last layer trains too
        assert counter.seen == []
    finally:
        trainer.log.close()
        cleanup_distributed()


def test_a_non_finite_loss_stops_the_run_naming_the_first_iteration(
    tmp_path, image_dir, caplog, monkeypatch
):
    # Logged (and read) every 3 steps; the loss of iteration 1 alone is NaN. As the reference,
    # the run stops on it, and names it rather than the step that happened to be read.
    real = Trainer.train_step

    def nan_at_1(self, crops, epoch, it):
        loss = real(self, crops, epoch, it)
        return loss * float("nan") if it == 1 else loss

    monkeypatch.setattr(Trainer, "train_step", nan_at_1)
    out = tmp_path / "run"
    assert main(tiny_args(image_dir, out, "--log_every", "3")) == 1
    assert "loss is nan at iteration 1; stopping" in caplog.text
    assert "Traceback" not in caplog.text
    assert not (out / "checkpoint.pth").exists()  # nothing of the diverged epoch is saved


def test_an_unwritable_export_target_fails_before_training(tmp_path, image_dir, caplog):
    out = tmp_path / "run"
    (tmp_path / "afile").write_text("x")
    assert main(tiny_args(image_dir, out, "--export-to", str(tmp_path / "afile" / "m"))) == 1
    assert "cannot write model versions into" in caplog.text and "Traceback" not in caplog.text
    assert not (out / "checkpoint.pth").exists()  # no epoch was spent first


def test_a_failed_periodic_export_warns_and_training_goes_on(
    tmp_path, image_dir, caplog, monkeypatch
):
    from models.export import ExportError
    from training import pretrain

    real = pretrain.export_teacher
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ExportError("parity check failed: cls_embedding differs")
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "export_teacher", fails_once)
    repo = tmp_path / "repo"
    argv = tiny_args(image_dir, tmp_path / "run", "--export-to", str(repo / "m"))
    assert main([*argv, "--export_every", "1"]) == 0
    assert "the export to" in caplog.text and "training goes on" in caplog.text
    assert len(calls) == 2 and model_versions(repo, "m") == [1]  # the final export made it


def test_a_failed_final_export_is_one_line_with_the_command_to_retry(
    tmp_path, image_dir, caplog, monkeypatch
):
    from models.export import ExportError
    from training import pretrain

    def always_fails(*args, **kwargs):
        raise ExportError("the ONNX checker refused the exported graph: bad")

    monkeypatch.setattr(pretrain, "export_teacher", always_fails)
    out, repo = tmp_path / "run", tmp_path / "repo"
    argv = tiny_args(image_dir, out, "--epochs", "1", "--warmup_epochs", "0")
    assert main([*argv, "--export-to", str(repo / "m")]) == 1
    assert "Traceback" not in caplog.text and "ONNX checker refused" in caplog.text
    assert f"python -m models.export --weights {out / 'checkpoint.pth'}" in caplog.text
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1  # the training is not lost


@pytest.mark.parametrize(
    ("signalled", "status", "said"),
    [("Ctrl-C", 130, "interrupted"), ("SIGTERM", 143, "terminated (SIGTERM)")],
)
def test_a_signal_in_the_first_epoch_says_that_a_rerun_starts_over(
    tmp_path, image_dir, caplog, monkeypatch, signalled, status, said
):
    """No checkpoint exists yet: "resume later from checkpoint.pth" would name a file that is
    not there. Once an epoch is saved, it is the one to resume from."""
    from training.interrupts import Terminated

    out = tmp_path / "run"
    real = Trainer.train_step

    def interrupted_in_epoch_1(self, crops, epoch, it):
        if epoch == 1 or self.config.max_epochs_this_run == 0:
            raise KeyboardInterrupt if signalled == "Ctrl-C" else Terminated()
        return real(self, crops, epoch, it)

    monkeypatch.setattr(Trainer, "train_step", interrupted_in_epoch_1)
    assert main(tiny_args(image_dir, out)) == status
    assert f"{said}; no checkpoint was written yet in {out}, so a rerun starts over" in (
        caplog.text
    )
    assert "resume later" not in caplog.text and not (out / "checkpoint.pth").exists()
    caplog.clear()
    assert main(tiny_args(image_dir, out, "--max_epochs_this_run", "2")) == status
    assert f"{said}; resume later from {out / 'checkpoint.pth'}" in caplog.text


def test_sigterm_while_a_checkpoint_is_written_keeps_that_checkpoint(
    tmp_path, image_dir, caplog, monkeypatch
):
    """docker stop while the epoch's checkpoint is written: it is finished, then the run stops
    (raised inside the save, the exception threw that epoch's work away)."""
    import os
    import signal

    out = tmp_path / "run"
    assert main(tiny_args(image_dir, out, "--max_epochs_this_run", "1")) == 0
    save = Trainer.save

    def terminated_mid_save(self, epoch):
        os.kill(os.getpid(), signal.SIGTERM)
        save(self, epoch)

    monkeypatch.setattr(Trainer, "save", terminated_mid_save)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert main(tiny_args(image_dir, out, "--epochs", "3")) == 128 + signal.SIGTERM
    assert "terminated (SIGTERM); resume later from" in caplog.text
    assert "Traceback" not in caplog.text
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 2  # epoch 1 finished and kept
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again


def test_sigterm_during_the_final_export_stops_at_once_and_publishes_nothing(
    tmp_path, image_dir, caplog, monkeypatch
):
    import os
    import signal

    from models import export

    real = export._trace

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)  # the temporary file is written, then docker stop
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the export went on after SIGTERM")

    monkeypatch.setattr(export, "_trace", interrupted)
    out, repo = tmp_path / "run", tmp_path / "repo"
    argv = tiny_args(image_dir, out, "--export-to", str(repo / "m"))
    assert main(argv) == 128 + signal.SIGTERM
    assert "terminated (SIGTERM); resume later from" in caplog.text
    assert "Traceback" not in caplog.text
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 2  # the training is kept
    assert not (repo / "m").exists() or list((repo / "m").iterdir()) == []


@pytest.mark.parametrize(("signame", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_while_the_finished_runs_log_closes_is_still_reported(
    tmp_path, image_dir, caplog, monkeypatch, signame, status
):
    """The work is done and kept, but whoever sent it (a loop over --max_epochs_this_run
    chunks, say) is told that it arrived."""
    import os
    import signal

    from training.monitor import RunLog

    close = RunLog.close

    def signalled_close(self):
        if self.writer is not None:  # the close at the end (rewind() closes first, too)
            os.kill(os.getpid(), getattr(signal, signame))
        close(self)

    monkeypatch.setattr(RunLog, "close", signalled_close)
    out = tmp_path / "run"
    assert main(tiny_args(image_dir, out)) == status
    assert "resume later from" in caplog.text and "Traceback" not in caplog.text
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(("signame", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_inside_the_step_log_stops_the_run_at_the_next_step(
    tmp_path, image_dir, monkeypatch, signame, status
):
    """Not inside the logging (TensorBoard's writer shares a queue with its thread, and an
    exception raised in it hung the run on its way out)."""
    import os
    import signal

    from training.monitor import RunLog

    out = tmp_path / "run"
    step = RunLog.step
    sent_at: list[int] = []

    def signalled_step(self, iteration, record):
        if iteration == 2:
            sent_at.append(iteration)
            os.kill(os.getpid(), getattr(signal, signame))
        step(self, iteration, record)

    monkeypatch.setattr(RunLog, "step", signalled_step)
    assert main(tiny_args(image_dir, out, "--epochs", "3")) == status
    lines = (out / "log_steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2]
    assert sent_at == [2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_killed_saves_temporary_files_are_removed_at_the_next_start(tmp_path, image_dir, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.pth.0123456789ab.tmp").write_bytes(b"x" * 1000)  # SIGKILL mid-save
    argv = tiny_args(image_dir, out, "--epochs", "1", "--warmup_epochs", "0")
    assert main(argv) == 0
    assert not list(out.glob(".*.tmp"))
    assert "removed 1 temporary file(s)" in caplog.text


def test_a_checkpoint_path_that_is_a_folder_fails_before_training(tmp_path, image_dir, caplog):
    out = tmp_path / "run"
    (out / "checkpoint.pth").mkdir(parents=True)
    assert main(tiny_args(image_dir, out)) == 1
    assert "checkpoint.pth is not a file" in caplog.text
    assert not (out / "log.txt").exists()


def test_a_checkpoint_longer_than_the_run_says_so(tmp_path, image_dir, caplog):
    out = tmp_path / "run"
    assert main(tiny_args(image_dir, out)) == 0
    caplog.clear()
    assert main(tiny_args(image_dir, out, "--epochs", "1", "--warmup_epochs", "0")) == 0
    assert "has trained 2 epochs, more than --epochs 1" in caplog.text


def test_a_checkpoint_with_foreign_values_is_one_line(tmp_path, image_dir, caplog):
    from training.checkpoint import save_checkpoint

    out = tmp_path / "run"
    assert main(tiny_args(image_dir, out, "--max_epochs_this_run", "1")) == 0
    state = load_checkpoint(out / "checkpoint.pth")
    state["dino_loss"] = {"center": "not a tensor"}
    save_checkpoint(state, out / "checkpoint.pth")
    caplog.clear()
    assert main(tiny_args(image_dir, out)) == 1
    assert "does not match this run's configuration" in caplog.text
    assert "Traceback" not in caplog.text


def test_a_broken_collective_reads_as_another_process_stopping():
    from training.pretrain import peer_failure

    gloo = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:29500: "
        "Connection reset by peer"
    )
    message = peer_failure(gloo)
    assert message is not None and message.startswith("another process of this run stopped")
    assert "Connection reset by peer" in message
    assert peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert peer_failure(ValueError("Connection reset by peer")) is None  # not a collective's


def test_sigterm_caught_inside_torch_save_still_exits_143(tmp_path, image_dir, caplog, monkeypatch):
    """torch.save's C++ writer turns the exception raised by the signal handler into its own
    RuntimeError; the interruption behind it is still reported as one."""
    import signal

    from training import checkpoint as ckpt_module
    from training.interrupts import Terminated

    out = tmp_path / "run"
    assert main(tiny_args(image_dir, out, "--max_epochs_this_run", "1")) == 0
    before = (out / "checkpoint.pth").read_bytes()

    def save_cut_by_sigterm(*args, **kwargs):
        try:
            raise Terminated
        except Terminated:
            # as the C++ writer does: its own error, the interruption only as the context
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")  # noqa: B904

    monkeypatch.setattr(ckpt_module.torch, "save", save_cut_by_sigterm)
    assert main(tiny_args(image_dir, out)) == 128 + signal.SIGTERM
    assert "terminated (SIGTERM)" in caplog.text and "Traceback" not in caplog.text
    assert (out / "checkpoint.pth").read_bytes() == before
    assert not list(out.glob(".*.tmp"))


def test_a_sigterm_a_finalizer_swallowed_still_stops_the_run(
    tmp_path, image_dir, caplog, monkeypatch
):
    """Python only prints an exception raised in a finalizer; the flag carries it on."""
    import signal

    from training import interrupts

    out = tmp_path / "run"
    train_epoch = Trainer.train_epoch

    def swallowed_at_the_end(self, epoch):
        stats = train_epoch(self, epoch)
        if epoch == 1:  # the last epoch: no step of another epoch would notice
            interrupts.SIGTERM_SEEN.set()  # as if the handler's exception was lost in a __del__
        return stats

    monkeypatch.setattr(Trainer, "train_epoch", swallowed_at_the_end)
    exported = []
    monkeypatch.setattr(Trainer, "export", lambda self, final: exported.append(final))
    argv = tiny_args(image_dir, out, "--epochs", "2", "--export-to", str(tmp_path / "repo" / "m"))
    assert main(argv) == 128 + signal.SIGTERM
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 2  # the finished epoch is kept
    assert exported == []
    assert "terminated (SIGTERM); resume later from" in caplog.text


def test_a_failed_epoch_shuts_its_loader_workers_down_at_once(tmp_path, caplog):
    """Not at interpreter exit, when the traceback cycle holding the loader is collected
    (after multiprocessing has killed the workers: torch then prints a traceback)."""
    import gc
    import multiprocessing

    data = tmp_path / "broken"
    data.mkdir()
    for i in range(6):
        (data / f"img{i}.png").write_bytes(b"not a png")
    gc.disable()  # as at the end of a run: nothing collects the cycle before exit
    try:
        assert main(tiny_args(data, tmp_path / "run", "--num_workers", "2")) == 1
        assert multiprocessing.active_children() == []
    finally:
        gc.enable()
    assert "none of the 6 images" in caplog.text


def test_skip_warnings_print_once_above_the_progress_bar(tmp_path, image_dir):
    import subprocess
    import sys

    (image_dir / "zz_empty.png").write_bytes(b"")
    argv = tiny_args(image_dir, tmp_path / "run", "--epochs", "1", "--warmup_epochs", "0")
    argv[argv.index("--progress") + 1] = "true"
    result = subprocess.run(
        [sys.executable, "-m", "training.pretrain", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "skipped image" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    # A line of its own, with the log format (not glued onto the bar's line)
    assert " WARNING skipped image " in warnings[0] and warnings[0].startswith("20")
    assert "empty file (0 bytes)" in warnings[0]


@pytest.mark.parametrize(
    ("signame", "status", "line"),
    [
        # 3 of an epoch's 4 steps are logged: the signal may come before or after its save
        ("SIGTERM", 143, r"terminated \(SIGTERM\); (resume later from|no checkpoint was written)"),
        ("SIGINT", 130, r"interrupted; (resume later from|no checkpoint was written yet in)"),
    ],
)
def test_a_signal_to_the_whole_process_group_is_one_line(
    tmp_path, image_dir, signame, status, line
):
    """Slurm, `timeout` and `kill -- -PGID` (SIGTERM) or Ctrl-C in a terminal (SIGINT) signal
    the trainer and its loader workers; the workers ignore it and the trainer stops them."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sent = getattr(signal, signame)

    out = tmp_path / "run"
    argv = tiny_args(image_dir, out, "--num_workers", "2", "--epochs", "500")
    process = subprocess.Popen(
        [sys.executable, "-m", "training.pretrain", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # As a terminal would: a runner started in the background (`pytest &` in a script)
        # ignores SIGINT, and its children would inherit that.
        preexec_fn=default_signals,
    )
    try:
        deadline = time.monotonic() + 120
        steps = out / "log_steps.jsonl"
        while time.monotonic() < deadline and process.poll() is None:
            if steps.exists() and steps.read_text().count("\n") >= 3:
                break
            time.sleep(0.1)
        os.killpg(process.pid, sent)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == status, stderr[-3000:]
    assert re.search(line, stderr), stderr[-3000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]


def test_a_finished_run_needs_no_writable_output_dir(tmp_path, image_dir, caplog, monkeypatch):
    from training import pretrain

    out = tmp_path / "run"
    argv = tiny_args(image_dir, out, "--epochs", "1", "--warmup_epochs", "0")
    assert main(argv) == 0

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pretrain, "new_temp_file", read_only)
    shutil.rmtree(out / "tensorboard")
    assert main(argv) == 0 and "nothing to do" in caplog.text
    assert not (out / "tensorboard").exists()  # no log is opened: nothing is written there
    assert main([*argv, "--epochs", "2"]) == 1  # more to train: refused before the epoch
    assert "is not writable (Permission denied)" in caplog.text


def test_a_second_run_in_a_live_runs_output_dir_is_refused(tmp_path, image_dir, caplog) -> None:
    out = tmp_path / "run"
    out.mkdir()
    argv = tiny_args(image_dir, out, "--epochs", "1", "--warmup_epochs", "0")
    with output_dir_lock(out):  # a first run, alive
        assert main(argv) == 1
    assert f"--output_dir {out} is in use by another run (pid {os.getpid()}" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing read, nothing written
    assert main(argv) == 0  # once it has ended, the folder is free
    assert (out / "checkpoint.pth").is_file()
    assert (out / ".lock").read_text().strip() == str(os.getpid())


def test_a_run_with_many_unreadable_files_warns_that_its_sampling_is_skewed(
    tmp_path, image_dir, caplog
):
    argv = tiny_args(image_dir, tmp_path / "few", "--epochs", "1", "--warmup_epochs", "0")
    (image_dir / "one_bad.png").write_bytes(b"")  # 1 of 19: no warning
    assert main(argv) == 0
    assert "are unreadable" not in caplog.text
    bad = image_dir / "corrupt_class"
    bad.mkdir()
    for i in range(8):
        (bad / f"x{i}.png").write_bytes(b"not a png")
    argv = tiny_args(image_dir, tmp_path / "many", "--epochs", "2", "--warmup_epochs", "0")
    assert main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if "are unreadable" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once a run
    assert "of the 27 files under --data_path" in warnings[0]


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_output_dir_that_cannot_be_a_folder_is_named(tmp_path, image_dir, caplog, where):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" if where == "a file" else tmp_path / "afile" / "run"
    assert main(tiny_args(image_dir, out)) == 1
    reason = "it exists and is not a folder" if where == "a file" else "cannot create it"
    assert f"--output_dir {out}: {reason}" in caplog.text
    assert "Traceback" not in caplog.text


def test_an_output_dir_whose_name_is_not_utf8_is_refused_before_anything_is_written(
    tmp_path, image_dir, capsys
):
    """TensorBoard cannot write under such a name (a traceback after config.yaml was written):
    refused as a bad option, nothing created."""
    import os

    out = os.fsdecode(os.fsencode(tmp_path) + b"/out\xff")  # as sys.argv holds it
    assert main(tiny_args(image_dir, Path(out))) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: --output_dir {os.fsencode(out)!r} is not a valid UTF-8 path (TensorBoard "
        "cannot write under it); rename it or choose another folder\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_a_signal_while_an_error_is_reported_does_not_cut_the_report_short(
    tmp_path, image_dir, caplog, monkeypatch
):
    """The report of why a run stopped is written with interruptions deferred: a SIGTERM that
    arrives meanwhile (torchrun's agent signals the ranks still running once one stopped)
    must not replace that one line with a traceback."""
    import os
    import signal

    from training import pretrain

    message = pretrain.user_message

    def signalled_while_reporting(err: BaseException) -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        return message(err)

    monkeypatch.setattr(pretrain, "user_message", signalled_while_reporting)
    (tmp_path / "afile").write_text("x")
    assert main(tiny_args(image_dir, tmp_path / "afile")) == 1
    assert "--output_dir" in caplog.text and "it exists and is not a folder" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_log_that_cannot_be_written_still_saves_the_epochs_checkpoint(
    tmp_path, image_dir, monkeypatch, caplog
):
    import errno

    from training.monitor import RunLog

    out = tmp_path / "run"
    real = RunLog.epoch

    def full_at_epoch_one(self, epoch, record):
        if epoch == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "log.txt"))
        real(self, epoch, record)

    monkeypatch.setattr(RunLog, "epoch", full_at_epoch_one)
    assert main(tiny_args(image_dir, out)) == 1
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 2  # the epoch's work is kept
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert not any(r.exc_info for r in caplog.records)


def test_a_full_disk_during_the_checkpoint_write_is_one_line(
    tmp_path, image_dir, monkeypatch, caplog
):
    # torch reports the failed write as "RuntimeError: [enforce fail at inline_container.cc]
    # unexpected pos": the run ended in a two-exception traceback.
    import errno
    import io

    class FullDisk(io.RawIOBase):
        def __init__(self, handle):
            self.handle, self.room = handle, 2000

        def writable(self):
            return True

        def write(self, data):
            self.room -= len(data)
            if self.room < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

    out = tmp_path / "run"
    assert main(tiny_args(image_dir, out, "--epochs", "1", "--warmup_epochs", "0")) == 0
    before = (out / "checkpoint.pth").read_bytes()
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, handle: real(obj, FullDisk(handle)))
    caplog.clear()
    assert main(tiny_args(image_dir, out, "--resume", "false", "--epochs", "1")) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "cannot write the checkpoint of epoch 0" in errors[0]
    assert "No space left on device" in errors[0]
    assert not any(r.exc_info for r in caplog.records)
    assert (out / "checkpoint.pth").read_bytes() == before


def test_canvas_size_that_cannot_do_as_asked_is_named() -> None:
    def warnings(*extra: str, device: str = "gpu") -> list[str]:
        config = parse_config(["--data_path", "x", *extra])
        return canvas_warnings(config, device)

    assert warnings() == []  # no canvas
    assert warnings("--canvas_size", "256") == []  # larger than the 224 and 96 crops
    assert warnings("--canvas_size", "224") == []
    [small] = warnings("--canvas_size", "128")
    assert small.startswith("--canvas_size 128 is smaller than the crops (224 pixels)")
    [local] = warnings(
        "--canvas_size", "64", "--global_crops_size", "32", "--local_crops_size", "96"
    )
    assert "(96 pixels)" in local
    [ignored] = warnings("--canvas_size", "256", "--augment_device", "cpu", device="cpu")
    assert ignored.startswith("--canvas_size 256 is ignored")
    assert ignored.endswith("(--augment_device cpu)")
    [auto] = warnings("--canvas_size", "256", device="cpu")  # auto resolved to cpu, no CUDA
    assert auto.endswith("(--augment_device auto)")


def test_the_canvas_warning_reaches_the_log_at_start(tmp_path, image_dir, caplog) -> None:
    config = parse_config(tiny_args(image_dir, tmp_path / "run", "--canvas_size", "64"))
    trainer = Trainer(config, init_distributed("cpu"))  # cpu: augment_device auto -> cpu
    try:
        assert "--canvas_size 64 is ignored" in caplog.text
    finally:
        trainer.log.close()
        cleanup_distributed()


def test_a_min_lr_above_the_peak_lr_is_named(tmp_path, image_dir, caplog) -> None:
    # peak = 0.05 x 4 / 256 = 7.8e-4 (the linear scaling rule on a batch of 4)
    for min_lr, warned in (("1e-6", False), ("1e-3", True)):
        caplog.clear()
        args = tiny_args(image_dir, tmp_path / min_lr, "--min_lr", min_lr)
        trainer = Trainer(parse_config(args), init_distributed("cpu"))
        try:
            assert ("above the peak learning rate 0.00078125" in caplog.text) is warned
            # as the warning says: the schedule ends above its peak when min_lr is above it
            assert bool(trainer.lr_schedule[-1] > 0.05 * 4 / 256) is warned
        finally:
            trainer.log.close()
            cleanup_distributed()
