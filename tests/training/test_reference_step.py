"""Training steps of ``training.pretrain`` against the reference recipe, written out here.

The oracle restates the original ``main_dino.py`` loop (dino-reference.md, sections 1.1 and
1.5): lr on every parameter group and weight decay on group 0 only, both from per-iteration
schedules indexed by ``epoch * niter + i``; the teacher on the 2 global crops only; the centred
loss; per-tensor clipping with the 1e-6 epsilon; last-layer gradients set to None while
``epoch < freeze_last_layer``; the optimizer (and grad scaler) step; then the EMA teacher over
all parameters with ``momentum_schedule[it]``. Schedules, parameter groups, loss, clipping,
freeze and EMA are re-derived in this file, not imported from ``training``. Only the forward
pass is shared: the reference networks are deep copies of the project's initial student, run
one resolution at a time as the reference's ``MultiCropWrapper`` does. Everything is float32 on
the CPU, so the two runs agree to rounding.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import training.pretrain as pretrain
from models.layers import DropPath
from tests.training.conftest import tiny_args, write_images
from training.config import PretrainConfig, parse_config
from training.distributed import DistInfo
from training.heads import DINOHead
from training.multicrop import MultiCropWrapper
from training.pretrain import Trainer, build_networks, build_vit_config

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
BATCH = 4  # --batch_size_per_gpu, and the images per step of the synthetic crops
NITER = 2  # iterations per epoch: 2 * BATCH images, drop_last
LOCAL_CROPS = 2  # tiny_args' --local_crops_number
GLOBAL_SIZE, LOCAL_SIZE = 32, 16  # tiny_args' crop sizes
# Three epochs: epoch 0 is the lr warm-up with the last layer frozen, the teacher temperature
# reaches its final value at epoch 1 (warm-up of 2 epochs). A low clip (some tensors are
# clipped, some not), a low teacher momentum and a high lr and weight decay make every rule of the
# step move the weights by far more than the rounding noise.
STEP_OPTIONS = (
    "--epochs", "3", "--warmup_epochs", "1", "--freeze_last_layer", "1",
    "--norm_last_layer", "false", "--drop_path_rate", "0", "--batch_size_per_gpu", str(BATCH),
    "--lr", "0.5", "--min_lr", "1e-4", "--weight_decay", "0.1", "--weight_decay_end", "0.5",
    "--clip_grad", "0.3", "--momentum_teacher", "0.9",
    "--warmup_teacher_temp", "0.04", "--teacher_temp", "0.07", "--warmup_teacher_temp_epochs", "2",
)  # fmt: skip
# Loss and weights: float32 rounding of two evaluation orders (packed vs per-resolution forward,
# fused vs for-loop AdamW), amplified a little by Adam's normalisation.
WEIGHT_RTOL, WEIGHT_ATOL = 1e-6, 5e-6
# The key part of the qkv bias has no gradient in exact arithmetic (the softmax ignores a shift
# of every score of a query), so it only moves by rounding noise that Adam scales up: compared
# apart, loosely (3e-5 seen here; one Adam step at the peak lr of 0.5 * 4 / 256 is ~8e-3).
KEY_BIAS_ATOL = 1e-3
LOSS_RTOL, LOSS_ATOL = 1e-6, 1e-6
POISONED = "backbone.blocks.0.mlp.fc1.weight"  # the tensor whose gradient is made infinite


def reference_cosine(
    base: float, final: float, epochs: int, niter: int, warmup_epochs: int = 0
) -> npt.NDArray[np.float64]:
    """The reference's ``utils.cosine_scheduler``: linear warm-up from 0, then a half cosine."""
    warmup_iters = warmup_epochs * niter
    warmup = np.linspace(0.0, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    j = np.arange(epochs * niter - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * j / len(j)))
    return np.concatenate((warmup, cosine))


def reference_teacher_temps(
    warmup_temp: float, temp: float, warmup_epochs: int, epochs: int
) -> npt.NDArray[np.float64]:
    """Per-epoch teacher temperature: ``linspace`` warm-up (both ends included), then constant."""
    return np.concatenate(
        (np.linspace(warmup_temp, temp, warmup_epochs), np.full(epochs - warmup_epochs, temp))
    )


def reference_loss(
    student_output: Tensor, teacher_output: Tensor, center: Tensor, teacher_temp: float
) -> tuple[Tensor, Tensor]:
    """The reference ``DINOLoss.forward`` as a loop over crop pairs; returns (loss, new centre)."""
    num_crops = len(student_output) // (len(teacher_output) // 2)
    student = (student_output / 0.1).chunk(num_crops)
    teacher = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total = torch.zeros(())
    terms = 0
    for iq, q in enumerate(teacher):
        for v, s in enumerate(student):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
            terms += 1
    batch_center = teacher_output.detach().sum(dim=0, keepdim=True) / len(teacher_output)
    return total / terms, center * 0.9 + batch_center * 0.1


class ReferenceRun:
    """Student, teacher, AdamW, schedules and centre of one reference run.

    Args:
        student: The project's initial student; copied, never modified.
        config: Options of the run.
        niter: Iterations per epoch.
        scaler: A grad scaler (the reference's fp16 path), or None.
    """

    def __init__(
        self,
        student: MultiCropWrapper,
        config: PretrainConfig,
        niter: int,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.config = config
        self.scaler = scaler
        self.student = copy.deepcopy(student)
        # The reference teacher loads the student's state dict and has no trainable parameter.
        self.teacher = copy.deepcopy(student)
        for net in (self.student, self.teacher):
            net.pack_crops = False  # one backbone call per run of same-size crops
        for param in self.teacher.parameters():
            param.requires_grad = False
        regularized: list[nn.Parameter] = []
        not_regularized: list[nn.Parameter] = []
        for name, param in self.student.named_parameters():
            if not param.requires_grad:
                continue
            if name.endswith(".bias") or len(param.shape) == 1:
                not_regularized.append(param)
            else:
                regularized.append(param)
        groups: list[dict[str, Any]] = [
            {"params": regularized},
            {"params": not_regularized, "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            groups,
            foreach=False,  # the plain for-loop AdamW
        )
        epochs = config.epochs
        peak = config.lr * config.batch_size_per_gpu * 1 / 256.0  # one process
        self.lr = reference_cosine(peak, config.min_lr, epochs, niter, config.warmup_epochs)
        self.wd = reference_cosine(config.weight_decay, config.weight_decay_end, epochs, niter)
        self.momentum = reference_cosine(config.momentum_teacher, 1.0, epochs, niter)
        self.teacher_temps = reference_teacher_temps(
            config.warmup_teacher_temp,
            config.teacher_temp,
            config.warmup_teacher_temp_epochs,
            epochs,
        )
        self.center = torch.zeros(1, config.out_dim)

    def step(self, crops: list[Tensor], epoch: int, it: int) -> Tensor:
        """One iteration of ``main_dino.train_one_epoch``; returns the loss."""
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lr[it]
            if i == 0:
                group["weight_decay"] = self.wd[it]
        teacher_output = self.teacher(crops[:2])
        student_output = self.student(crops)
        loss, self.center = reference_loss(
            student_output, teacher_output, self.center, float(self.teacher_temps[epoch])
        )
        self.optimizer.zero_grad()
        if self.scaler is None:
            loss.backward()  # type: ignore[no-untyped-call]
        else:
            self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            self.scaler.unscale_(self.optimizer)
        for param in self.student.parameters():
            if param.grad is not None:
                clip_coef = self.config.clip_grad / (param.grad.norm(2) + 1e-6)
                if clip_coef < 1:
                    param.grad.mul_(clip_coef)
        if epoch < self.config.freeze_last_layer:
            for name, param in self.student.named_parameters():
                if "last_layer" in name:
                    param.grad = None
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        m = float(self.momentum[it])
        with torch.no_grad():
            for ps, pt in zip(self.student.parameters(), self.teacher.parameters(), strict=True):
                pt.mul_(m).add_((1 - m) * ps.detach())
        return loss.detach()


def synthetic_crops(it: int) -> list[Tensor]:
    """``[global_1, global_2, local_1, local_2]`` of BATCH images, seeded by the iteration."""
    g = torch.Generator().manual_seed(1000 + it)
    sizes = [GLOBAL_SIZE] * 2 + [LOCAL_SIZE] * LOCAL_CROPS
    return [torch.randn(BATCH, 3, s, s, generator=g) for s in sizes]


def assert_same_parameters(ours: nn.Module, reference: nn.Module, what: str) -> None:
    theirs = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        got, expected = param.detach(), theirs[name].detach()
        if name.endswith("attn.qkv.bias"):  # [query, key, value] biases
            query, key, value = got.chunk(3)
            ref_query, ref_key, ref_value = expected.chunk(3)
            torch.testing.assert_close(key, ref_key, rtol=0.0, atol=KEY_BIAS_ATOL, msg=name)
            got, expected = torch.cat((query, value)), torch.cat((ref_query, ref_value))
        torch.testing.assert_close(
            got, expected, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=f"{what} {name}"
        )


def group_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in group["params"]} for group in optimizer.param_groups]


def last_layer(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "last_layer" in n}


def infinite(grad: Tensor) -> Tensor:
    return torch.full_like(grad, math.inf)


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def trainer(tmp_path: Path) -> Iterator[Trainer]:
    """A real CPU ``Trainer`` (fp32, fused AdamW) of STEP_OPTIONS on 2 * BATCH images."""
    images = write_images(tmp_path / "images", NITER * BATCH)
    config = parse_config(tiny_args(images, tmp_path / "run", *STEP_OPTIONS))
    run = Trainer(config, CPU)
    try:
        assert run.niter == NITER and run.precision == "fp32" and run.scaler is None
        yield run
    finally:
        run.log.close()


def run_against_reference(
    trainer: Trainer, reference: ReferenceRun, poisoned_it: int | None = None
) -> None:
    """Every iteration of the run, compared with the reference after each step."""
    config = trainer.config
    student = trainer.nets.student
    assert group_names(trainer.optimizer, student) == group_names(
        reference.optimizer, reference.student
    )
    frozen_start = {n: p.detach().clone() for n, p in last_layer(student).items()}
    for epoch in range(config.epochs):
        for i in range(NITER):
            it = epoch * NITER + i
            crops = synthetic_crops(it)
            handles = []
            if it == poisoned_it:
                for net in (student, reference.student):
                    param = net.get_parameter(POISONED)
                    handles.append(param.register_hook(infinite))  # type: ignore[no-untyped-call]
                before, teacher_before = snapshot(student), snapshot(trainer.nets.teacher)
            loss = trainer.train_step(crops, epoch, it)
            ref_loss = reference.step(crops, epoch, it)
            for handle in handles:
                handle.remove()

            torch.testing.assert_close(
                loss, ref_loss, rtol=LOSS_RTOL, atol=LOSS_ATOL, msg=f"loss at iteration {it}"
            )
            for j, group in enumerate(trainer.optimizer.param_groups):
                assert group["lr"] == pytest.approx(reference.lr[it], rel=1e-12)
                wd = reference.wd[it] if j == 0 else 0.0
                assert group["weight_decay"] == pytest.approx(wd, rel=1e-12, abs=0.0)
            assert_same_parameters(student, reference.student, f"student, iteration {it}:")
            assert_same_parameters(trainer.nets.teacher, reference.teacher, f"teacher, it {it}:")
            torch.testing.assert_close(
                trainer.dino_loss.center,
                reference.center,
                rtol=WEIGHT_RTOL,
                atol=WEIGHT_ATOL,
                msg="centre",
            )
            if epoch < config.freeze_last_layer:
                for name, param in last_layer(student).items():
                    assert torch.equal(param, frozen_start[name]), f"{name} moved while frozen"
            if it == poisoned_it:
                assert trainer.scaler is not None and reference.scaler is not None
                assert reference.scaler.get_scale() == trainer.scaler.get_scale() == 2.0**9
                for name, param in student.named_parameters():
                    assert torch.equal(param, before[name]), f"{name} moved on a skipped step"
                # The EMA still ran (after a skipped step, as in the reference).
                moved = [
                    name
                    for name, param in trainer.nets.teacher.named_parameters()
                    if not torch.equal(param, teacher_before[name])
                ]
                assert moved
    # The run did train: the last layer after the freeze, everything else all along.
    for name, param in last_layer(student).items():
        assert not torch.equal(param, frozen_start[name]), name


def test_train_step_matches_the_reference_step(trainer: Trainer) -> None:
    reference = ReferenceRun(trainer.nets.student, trainer.config, trainer.niter)
    run_against_reference(trainer, reference)


def test_train_step_with_a_grad_scaler_matches_and_skips_a_non_finite_step(
    trainer: Trainer,
) -> None:
    """The fp16 path's GradScaler (a CPU one: same logic, no GPU needed) with an injected
    infinite gradient at iteration 3 (epoch 1): both runs skip that optimizer step (no
    weight, moment or step-count change), halve the scale, still update the teacher, and
    continue identically."""
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    reference = ReferenceRun(
        trainer.nets.student,
        trainer.config,
        trainer.niter,
        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10),
    )
    run_against_reference(trainer, reference, poisoned_it=3)


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "grad scaler"])
def test_train_step_clips_each_raw_gradient_then_drops_the_last_layer(
    trainer: Trainer, scaled: bool
) -> None:
    """What the optimizer receives inside ``train_step`` is, bit for bit, the reference's
    per-tensor clip ``g * clip / (||g|| + 1e-6)`` (when that is < 1) of the raw (unscaled)
    gradients, with the last layer's gradients None while frozen. The end-to-end comparison
    cannot see the 1e-6: Adam normalises it away."""
    scale = 2.0**10
    if scaled:
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    student = trainer.nets.student
    raw: dict[str, Tensor] = {}
    received: dict[str, Tensor | None] = {}

    def keep_raw(name: str) -> Any:
        def hook(param: Tensor) -> None:
            assert param.grad is not None
            raw[name] = param.grad.detach().clone() / (scale if scaled else 1.0)  # exact

        return hook

    for name, param in student.named_parameters():
        param.register_post_accumulate_grad_hook(keep_raw(name))  # type: ignore[no-untyped-call]

    def keep_received(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for name, param in student.named_parameters():
            received[name] = None if param.grad is None else param.grad.detach().clone()

    trainer.optimizer.register_step_pre_hook(keep_received)
    clip = trainer.config.clip_grad
    clipped = kept = 0
    for epoch, it in ((0, 0), (1, NITER)):  # frozen, then not
        raw.clear()
        received.clear()
        trainer.train_step(synthetic_crops(it), epoch, it)
        for name, grad in raw.items():
            got = received[name]
            if epoch < trainer.config.freeze_last_layer and "last_layer" in name:
                assert got is None, name
                continue
            clip_coef = clip / (grad.norm(2) + 1e-6)
            expected = grad * clip_coef if clip_coef < 1 else grad
            clipped, kept = clipped + bool(clip_coef < 1), kept + bool(clip_coef >= 1)
            assert got is not None and torch.equal(got, expected), name
    assert clipped and kept  # both branches of the per-tensor rule were taken


class RecordingHead(DINOHead):
    """A DINOHead that remembers the ``norm_last_layer`` it was built with."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__(
            in_dim, out_dim, use_bn, norm_last_layer, nlayers, hidden_dim, bottleneck_dim
        )
        self.built_with_norm_last_layer = norm_last_layer


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_networks_teacher_head_drop_path_and_gradients(
    monkeypatch: pytest.MonkeyPatch, norm_last_layer: bool
) -> None:
    """Reference section 1.3: the teacher head always gets ``norm_last_layer=True``; the teacher
    has no drop path and no trainable parameter and starts as a copy of the student; the
    student's drop path rises linearly from 0 (block 0) to ``drop_path_rate`` (last block)."""
    monkeypatch.setattr(pretrain, "DINOHead", RecordingHead)
    flag = "true" if norm_last_layer else "false"
    options = ("--depth", "4", "--drop_path_rate", "0.3", "--norm_last_layer", flag)
    config = parse_config(tiny_args(Path("unused"), Path("unused"), *options))
    torch.manual_seed(0)
    nets = build_networks(config, build_vit_config(config), CPU)

    assert isinstance(nets.teacher.head, RecordingHead)
    assert isinstance(nets.student.head, RecordingHead)
    assert nets.teacher.head.built_with_norm_last_layer is True
    assert nets.student.head.built_with_norm_last_layer is norm_last_layer
    assert nets.student.head.last_layer.weight_g.requires_grad is not norm_last_layer

    assert not any(p.requires_grad for p in nets.teacher.parameters())
    assert nets.teacher.training  # never switched to eval(), as in the reference
    student_state, teacher_state = nets.student.state_dict(), nets.teacher.state_dict()
    assert student_state.keys() == teacher_state.keys()
    assert all(torch.equal(student_state[k], teacher_state[k]) for k in student_state)

    def rates(net: nn.Module) -> list[float]:
        return [m.drop_prob for m in net.modules() if isinstance(m, DropPath)]

    assert rates(nets.student) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert rates(nets.teacher) == [0.0] * 4
    # In train mode only the student is stochastic.
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(8, 3, GLOBAL_SIZE, GLOBAL_SIZE, generator=g) for _ in range(2)]
    with torch.no_grad():
        assert torch.equal(nets.teacher(crops), nets.teacher(crops))
        assert not torch.equal(nets.student(crops), nets.student(crops))


def test_fused_adamw_of_training_freezes_the_last_layer_and_matches_the_for_loop_adamw(
    trainer: Trainer,
) -> None:
    """The optimizer ``Trainer`` builds (fused AdamW on CPU and CUDA) inside ``train_step``:
    while ``epoch < freeze_last_layer`` the last layer is not moved and gets no state (no
    weight decay, no step count); on the same gradients and hyper-parameters it agrees with the
    for-loop ``torch.optim.AdamW``, including the step count of the last layer once unfrozen."""
    optimizer = trainer.optimizer
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    student = trainer.nets.student
    mirror = copy.deepcopy(student)
    mirror_params = dict(mirror.named_parameters())
    names = {id(p): n for n, p in student.named_parameters()}
    reference = torch.optim.AdamW(
        [
            {"params": [mirror_params[names[id(p)]] for p in group["params"]]}
            for group in optimizer.param_groups
        ],
        foreach=False,
    )

    def copy_inputs(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for name, param in student.named_parameters():
            grad = param.grad
            mirror_params[name].grad = None if grad is None else grad.detach().clone()
        for ours, theirs in zip(opt.param_groups, reference.param_groups, strict=True):
            theirs["lr"], theirs["weight_decay"] = ours["lr"], ours["weight_decay"]

    def step_reference(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        reference.step()

    optimizer.register_step_pre_hook(copy_inputs)
    optimizer.register_step_post_hook(step_reference)
    frozen = last_layer(student)
    start = {n: p.detach().clone() for n, p in frozen.items()}
    for epoch in range(2):  # freeze_last_layer = 1
        for i in range(NITER):
            it = epoch * NITER + i
            trainer.train_step(synthetic_crops(it), epoch, it)
            if epoch == 0:
                for name, param in frozen.items():
                    assert torch.equal(param, start[name]), name
                    assert not optimizer.state.get(param), f"{name} has optimizer state"
            for name, param in student.named_parameters():
                torch.testing.assert_close(
                    param, mirror_params[name], rtol=1e-6, atol=1e-7, msg=name
                )
    for name, param in frozen.items():
        assert not torch.equal(param, start[name]), name
        assert float(optimizer.state[param]["step"]) == NITER  # only the unfrozen steps count
    assert float(optimizer.state[student.get_parameter("backbone.cls_token")]["step"]) == 2 * NITER
