"""DINO pretraining: ``python -m training.pretrain`` (one process, or ``torchrun`` for DDP).

The recipe is the reference ``main_dino.py`` (Caron et al., 2021): multi-crop augmentation,
student/teacher ViTs with DINO heads, the centred and sharpened cross-entropy, per-iteration
cosine schedules of lr / weight decay / teacher momentum, per-tensor clipping, last-layer freeze
and the EMA teacher. See ``docs/training.md`` for usage.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from models.checkpoint import file_sha256
from models.files import new_temp_file
from models.vit import VisionTransformer, ViTConfig, arch_name, vit_config
from training.augment import DataAugmentationDINO, MultiCropGeometry
from training.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointCorruptError,
    OutputDirInUseError,
    load_checkpoint,
    output_dir_lock,
    remove_stale_temps,
    save_checkpoint,
)
from training.config import ConfigError, PretrainConfig, parse_config, save_config
from training.data import (
    FASHION_MNIST_PREFIX,
    DataError,
    Transform,
    build_dataset,
    canvas_transform,
    collate_canvases,
    collate_crops,
)
from training.distributed import (
    DistInfo,
    all_reduce_mean,
    cleanup_distributed,
    init_distributed,
    max_over_ranks,
    ranks_agree,
    union_over_ranks,
)
from training.ema import ParameterEMA
from training.gpu_augment import BatchedMultiCrop
from training.heads import DINOHead
from training.interrupts import (
    ELSEWHERE,
    SIGTERM_SEEN,
    Interruption,
    Terminated,
    ignore_interrupts_in_worker,
    interruptions_deferred,
    kill_workers_now,
    mark_stopping,
    pending_interruption,
    raise_if_interrupted,
    raise_interruption,
    sigterm_unwinds,
    start_workers,
    stop_deadline,
    stop_workers,
)
from training.loss import DINOLoss
from training.monitor import CollapseWatch, RunLog
from training.multicrop import MultiCropWrapper
from training.optim import (
    build_optimizer,
    cancel_gradients_last_layer,
    clip_gradients,
    get_params_groups,
)
from training.schedules import cosine_scheduler

logger = logging.getLogger("training")


UNREADABLE_WARN_FRACTION = 0.1
"""Share of unreadable files above which a run warns that its sampling is skewed."""


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite loss, mismatching checkpoint, too little data)."""


def resolve_precision(config: PretrainConfig, device: torch.device) -> str:
    """``bf16``/``fp16``/``fp32`` for this device (``auto``: bf16 on GPUs that have it).

    Raises:
        ConfigError: fp16 requested without a CUDA device.
    """
    precision = config.resolved_precision
    if precision == "auto":
        if device.type == "cuda":
            # Native bf16 only (Ampere and later): pre-Ampere GPUs would emulate it, slowly,
            # where fp16 with loss scaling (the reference's choice) runs on their tensor cores.
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            return "bf16" if native else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "--precision fp16 (or --use_fp16 true) needs a CUDA GPU; use bf16 or fp32"
        )
    return precision


def resolve_augment_device(config: PretrainConfig, device: torch.device) -> str:
    """``cpu`` or ``gpu`` (the batched path on the training device; ``auto``: gpu on CUDA)."""
    if config.augment_device == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return config.augment_device


def resolve_gpu_input(config: PretrainConfig) -> str:
    """What the loader sends to the device-side augmentation.

    ``images``: whole images (Fashion-MNIST's are all 28x28), cropped on the device;
    ``canvas``: ``--canvas_size`` squares, cropped on the device; ``crops``: the crops
    themselves, cut by the loader exactly as the reference (image folders, the default).
    """
    if config.canvas_size:
        return "canvas"
    if config.data_path.startswith(FASHION_MNIST_PREFIX):
        return "images"
    return "crops"


def canvas_warnings(config: PretrainConfig, augment_device: str) -> list[str]:
    """What ``--canvas_size`` will not do as asked, given the resolved augmentation device.

    Each message is one line; the run goes on (a configuration written for a GPU still runs on
    the CPU).
    """
    if not config.canvas_size:
        return []
    if augment_device != "gpu":
        return [
            f"--canvas_size {config.canvas_size} is ignored: it applies to gpu augmentation, "
            f"and this run augments on the cpu (--augment_device {config.augment_device})"
        ]
    largest = max(config.global_crops_size, config.local_crops_size)
    if config.canvas_size < largest:
        return [
            f"--canvas_size {config.canvas_size} is smaller than the crops "
            f"({largest} pixels): every crop is upsampled from the canvas"
        ]
    return []


def build_vit_config(config: PretrainConfig) -> ViTConfig:
    """Architecture from ``--arch`` with optional custom ``embed_dim``/``depth``/``num_heads``.

    Raises:
        ConfigError: Inconsistent sizes.
    """
    overrides: dict[str, Any] = {"img_size": config.global_crops_size}
    for name in ("embed_dim", "depth", "num_heads"):
        if getattr(config, name) is not None:
            overrides[name] = getattr(config, name)
    try:
        vit = vit_config(config.arch, config.patch_size, **overrides)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    name = arch_name(vit.embed_dim, vit.depth, vit.num_heads)
    return ViTConfig.from_dict({**vit.to_dict(), "arch": name})


def seed_everything(seed: int, rank: int, epoch: int) -> int:
    """Seed Python, NumPy and torch from (seed, rank, epoch); returns a derived loader seed.

    Each epoch starts from a state that depends only on these three numbers, so a resumed run
    draws exactly the same random numbers as an uninterrupted one.
    """
    import random

    state = np.random.SeedSequence([seed, rank, epoch + 1]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[0]))
    torch.manual_seed(int(state[0]))
    return int(state[1])


def augment_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of the device-side augmentation generator for (seed, rank, epoch)."""
    return int(np.random.SeedSequence([seed, rank, epoch + 1]).generate_state(3)[2])


def _seed_worker(_worker_id: int) -> None:
    import random

    ignore_interrupts_in_worker()  # the trainer stops its workers (see training.interrupts)
    seed = torch.initial_seed() % 2**32  # base seed + worker id, distinct per worker
    random.seed(seed)
    np.random.seed(seed)


@dataclass
class Networks:
    """The networks of a run."""

    student: MultiCropWrapper  # unwrapped
    student_ddp: nn.Module  # DDP-wrapped when distributed, else the same module
    teacher: MultiCropWrapper


def build_networks(config: PretrainConfig, vit: ViTConfig, info: DistInfo) -> Networks:
    """Student (drop path) and teacher (none) with DINO heads; the teacher copies the student."""

    def head(norm_last_layer: bool) -> DINOHead:
        return DINOHead(
            vit.embed_dim,
            config.out_dim,
            use_bn=config.use_bn_in_head,
            norm_last_layer=norm_last_layer,
            hidden_dim=config.head_hidden_dim,
            bottleneck_dim=config.head_bottleneck_dim,
        )

    student = MultiCropWrapper(
        VisionTransformer(vit, drop_path_rate=config.drop_path_rate),
        head(config.norm_last_layer),
    )
    teacher = MultiCropWrapper(VisionTransformer(vit), head(True))
    if config.use_bn_in_head and info.distributed and info.device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)  # type: ignore[no-untyped-call]
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)  # type: ignore[no-untyped-call]
    elif config.use_bn_in_head and info.distributed:
        logger.warning(
            "--use_bn_in_head on %s processes of the CPU: BatchNorm statistics stay per process "
            "(SyncBatchNorm needs CUDA), so the head normalises each rank's batch alone",
            info.world_size,
        )
    student.to(info.device)
    teacher.to(info.device)
    teacher.load_state_dict(student.state_dict())
    for param in teacher.parameters():
        param.requires_grad = False
    # The teacher stays in train mode, as in the reference (only matters with BatchNorm).
    if config.compile:
        # Static shapes: one graph for the packed student pass, one for the teacher's.
        student.backbone.compile(dynamic=False)
        teacher.backbone.compile(dynamic=False)
    student_ddp: nn.Module = student
    if info.distributed:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        student_ddp = DistributedDataParallel(student, device_ids=device_ids)
    return Networks(student, student_ddp, teacher)


def checkpoint_state(
    *,
    config: PretrainConfig,
    vit: ViTConfig,
    nets: Networks,
    optimizer: torch.optim.Optimizer,
    dino_loss: DINOLoss,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
) -> dict[str, Any]:
    """The official full-checkpoint layout plus ``vit_config`` (all weights-only loadable)."""
    state: dict[str, Any] = {
        "student": {f"module.{k}": v for k, v in nets.student.state_dict().items()},
        "teacher": nets.teacher.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch + 1,
        "args": config.to_dict(),
        "dino_loss": dino_loss.state_dict(),
        "vit_config": vit.to_dict(),
    }
    if scaler is not None:
        state["fp16_scaler"] = scaler.state_dict()
    return state


# Options that change the shapes or the kind of the saved state: a resume must keep them.
STATE_OPTIONS = (
    "out_dim",
    "use_bn_in_head",
    "norm_last_layer",
    "head_hidden_dim",
    "head_bottleneck_dim",
    "optimizer",
)


# Backbone sizes as the flags that set them (img_size follows --global_crops_size).
_VIT_FLAGS = {
    "img_size": "--global_crops_size",
    "patch_size": "--patch_size",
    "embed_dim": "--embed_dim",
    "depth": "--depth",
    "num_heads": "--num_heads",
    "arch": "--arch",
}


def _change(key: str, old: object, new: object) -> str:
    """``key: old -> new``, with quotes where the two would otherwise read the same (``'32'``
    against ``32``)."""
    if str(old) == str(new):
        return f"{key}: {old!r} -> {new!r}"
    return f"{key}: {old} -> {new}"


def checkpoint_differences(
    state: dict[str, Any], config: PretrainConfig, vit: ViTConfig
) -> list[str]:
    """Options of this run that differ from those ``state`` was written with (``name: old ->
    new``); empty when the checkpoint records no options (then loading decides)."""
    differences = []
    saved_vit = state.get("vit_config")
    if isinstance(saved_vit, dict):
        current = vit.to_dict()
        for key, value in current.items():
            if key in saved_vit and saved_vit[key] != value:
                differences.append(_change(_VIT_FLAGS.get(key, key), saved_vit[key], value))
    saved_args = state.get("args")
    if isinstance(saved_args, dict):
        current_args = config.to_dict()
        for key in STATE_OPTIONS:
            if key in saved_args and saved_args[key] != current_args[key]:
                differences.append(_change(f"--{key}", saved_args[key], current_args[key]))
    return differences


def restore(
    state: dict[str, Any],
    *,
    config: PretrainConfig,
    vit: ViTConfig,
    nets: Networks,
    optimizer: torch.optim.Optimizer,
    dino_loss: DINOLoss,
    scaler: torch.amp.GradScaler | None,
    path: Path,
) -> int:
    """Load a checkpoint into the run; returns the epoch to start from.

    Raises:
        TrainingError: The checkpoint was written for another model, head or optimizer (named
            from the options it records, else from the state that does not load).
    """
    differences = checkpoint_differences(state, config, vit)
    if differences:
        raise TrainingError(
            f"{path} was written with other options than this run: {'; '.join(differences)}. "
            "Rerun with the checkpoint's options (its config.yaml) or use another --output_dir."
        )
    student = {k.removeprefix("module."): v for k, v in state["student"].items()}
    try:
        nets.student.load_state_dict(student)
        nets.teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        dino_loss.load_state_dict(state["dino_loss"])
        if scaler is not None and "fp16_scaler" in state:
            scaler.load_state_dict(state["fp16_scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        # a foreign or damaged file's values: any of these from load_state_dict
        detail = " ".join(line.strip() for line in str(err).splitlines()[:4] if line.strip())
        raise TrainingError(
            f"{path} does not match this run's configuration (arch, out_dim, head or optimizer "
            f"options differ): {detail[:600]}. Use another --output_dir or the options the "
            "checkpoint was written with (its config.yaml)."
        ) from err
    return int(state["epoch"])


def export_teacher(
    config: PretrainConfig, vit: ViTConfig, teacher: MultiCropWrapper, ckpt: Path, digest: str
) -> None:
    """Export the teacher backbone into ``--export_to`` (a new model version)."""
    from models.export import export_to_repository

    assert config.export_to is not None
    target = Path(config.export_to)
    model = VisionTransformer(vit)
    model.load_state_dict(
        {k: v.detach().float().cpu() for k, v in teacher.backbone.state_dict().items()}
    )
    model.eval()
    report = export_to_repository(
        model,
        target.parent,
        target.name,
        resolution=config.global_crops_size,
        weights_sha256=digest,
        source=f"training.pretrain teacher of {ckpt}",
    )
    logger.info("exported the teacher backbone to %s", report.path)


class Trainer:
    """One run: data, networks, optimiser, schedules and the epoch loop."""

    def __init__(self, config: PretrainConfig, info: DistInfo) -> None:
        self.config = config
        self.info = info
        self.device = info.device
        self.precision = resolve_precision(config, info.device)
        self.vit = build_vit_config(config)
        self.output_dir = Path(config.output_dir)
        crop_args = (
            tuple(config.global_crops_scale),
            tuple(config.local_crops_scale),
            config.local_crops_number,
            config.global_crops_size,
            config.local_crops_size,
        )
        self.augment_device = resolve_augment_device(config, info.device)
        # gpu: the loader decodes and cuts the crops (or sends whole same-size images); the
        # colour operations, blur and solarisation run on the device in batches.
        self.gpu_augment: BatchedMultiCrop | None = None
        self.gpu_input = resolve_gpu_input(config) if self.augment_device == "gpu" else ""
        for message in canvas_warnings(config, self.augment_device) if info.is_main else []:
            logger.warning(message)  # the same on every rank: said once
        self.augment_generator = torch.Generator(device=self.device)
        if self.augment_device == "gpu":
            self.gpu_augment = BatchedMultiCrop(*crop_args)  # type: ignore[arg-type]
            collate: Any = collate_canvases
            if self.gpu_input == "crops":
                self.transform: Transform = MultiCropGeometry(*crop_args)  # type: ignore[arg-type]
                collate = collate_crops
            elif self.gpu_input == "canvas":
                self.transform = canvas_transform(config.canvas_size)
            else:
                self.transform = canvas_transform(None)
        else:
            self.transform = DataAugmentationDINO(*crop_args)  # type: ignore[arg-type]
            collate = collate_crops
        self.dataset = build_dataset(config.data_path, self.transform, config.max_image_pixels)
        self.sampler: DistributedSampler[Any] = DistributedSampler(
            self.dataset,
            num_replicas=info.world_size,
            rank=info.rank,
            shuffle=True,
            seed=config.seed,
        )
        self.loader_generator = torch.Generator()
        self.loader = DataLoader(
            self.dataset,
            sampler=self.sampler,
            batch_size=config.batch_size_per_gpu,
            num_workers=config.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            collate_fn=collate,
            worker_init_fn=_seed_worker,
            generator=self.loader_generator,
        )
        self.num_images = len(self.sampler.dataset)  # type: ignore[arg-type]
        self.niter = len(self.loader)
        if self.niter == 0:
            raise DataError(
                f"{self.num_images} images give no full batch of {config.batch_size_per_gpu} "
                f"per process over {info.world_size} process(es); lower --batch_size_per_gpu"
            )
        # Same initial weights on every rank (the teacher copies the student before DDP
        # broadcasts rank 0's student); the per-rank seeds are set per epoch.
        seed_everything(config.seed, 0, -1)
        self.nets = build_networks(config, self.vit, info)
        self.ncrops = config.local_crops_number + 2
        self.dino_loss = DINOLoss(
            config.out_dim,
            self.ncrops,
            config.warmup_teacher_temp,
            config.teacher_temp,
            config.warmup_teacher_temp_epochs,
            config.epochs,
        ).to(self.device)
        self.optimizer = build_optimizer(
            config.optimizer,
            get_params_groups(self.nets.student),
            fused=self.device.type in ("cuda", "cpu"),  # both have the fused AdamW kernel
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        total_batch = config.batch_size_per_gpu * info.world_size
        peak_lr = config.lr * total_batch / 256.0  # the linear scaling rule
        if config.min_lr > peak_lr and info.is_main:  # accepted, as by the reference
            logger.warning(
                "--min_lr %g is above the peak learning rate %g (--lr %g x total batch %d / "
                "256): the schedule rises after the warm-up instead of decaying",
                config.min_lr, peak_lr, config.lr, total_batch,
            )  # fmt: skip
        self.lr_schedule = cosine_scheduler(
            peak_lr,
            config.min_lr,
            config.epochs,
            self.niter,
            warmup_epochs=config.warmup_epochs,
        )
        self.wd_schedule = cosine_scheduler(
            config.weight_decay, config.weight_decay_end, config.epochs, self.niter
        )
        self.momentum_schedule = cosine_scheduler(
            config.momentum_teacher, 1.0, config.epochs, self.niter
        )
        self.ema = ParameterEMA(self.nets.student, self.nets.teacher)
        self.log = RunLog(self.output_dir, enabled=info.is_main)
        self.watch = CollapseWatch(config.out_dim)
        self.skipped: set[str] = set()
        self.warned_unreadable = False
        self.start_epoch = 0
        self.last_digest = ""

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed-precision context for the forward passes and the loss."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def resume(self) -> None:
        """Continue from ``output_dir/checkpoint.pth`` when it exists."""
        path = self.output_dir / CHECKPOINT_NAME
        if path.exists() and not path.is_file():
            raise TrainingError(f"{path} is not a file; move it away or use another --output_dir")
        if not (self.config.resume and path.is_file()):
            return
        state = load_checkpoint(path)
        self.start_epoch = restore(
            state,
            config=self.config,
            vit=self.vit,
            nets=self.nets,
            optimizer=self.optimizer,
            dino_loss=self.dino_loss,
            scaler=self.scaler,
            path=path,
        )
        self.last_digest = file_sha256(path)  # what an export of it records as its weights
        logger.info("resumed from %s at epoch %d", path, self.start_epoch)

    @torch.no_grad()
    def device_crops(self, batch: Any) -> list[Tensor]:
        """The loader's batch as crops on the device (augmented here on the gpu path)."""
        if self.gpu_augment is None:
            return [c.to(self.device, non_blocking=True) for c in batch]
        if self.gpu_input == "crops":
            crops = [c.to(self.device, non_blocking=True) for c in batch]  # uint8 [B, 3, S, S]
            return self.gpu_augment.photometric(crops, self.augment_generator)
        canvases = batch.to(self.device, non_blocking=True)  # [B, 3, H, W] uint8
        return self.gpu_augment(canvases, self.augment_generator)

    def train_step(self, crops: list[Tensor], epoch: int, it: int) -> Tensor:
        """One optimisation step; returns the (detached) loss without synchronising."""
        config = self.config
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.lr_schedule[it])
            if i == 0:  # only the regularised group is decayed
                group["weight_decay"] = float(self.wd_schedule[it])
        with self.autocast():
            teacher_output = self.nets.teacher(crops[:2])  # only the 2 global views
            student_output = self.nets.student_ddp(crops)
            loss = self.dino_loss(student_output, teacher_output, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        student = self.nets.student
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if config.clip_grad:
                self.scaler.unscale_(self.optimizer)
                clip_gradients(student, config.clip_grad)
            cancel_gradients_last_layer(epoch, student, config.freeze_last_layer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if config.clip_grad:
                clip_gradients(student, config.clip_grad)
            cancel_gradients_last_layer(epoch, student, config.freeze_last_layer)
            self.optimizer.step()
        self.ema.update(float(self.momentum_schedule[it]))
        detached: Tensor = loss.detach()
        return detached

    def _note_skipped(self, bad: list[tuple[str, str]]) -> None:
        for path, reason in bad:
            if path not in self.skipped:
                self.skipped.add(path)
                logger.warning(
                    "skipped image %s: %s (%d skipped so far)", path, reason, len(self.skipped)
                )

    def _warn_if_mostly_unreadable(self, skipped: int) -> None:
        """Once a run: the next readable file stands in for each bad one, so with many bad
        files some images are seen several times an epoch (a whole corrupt class folder
        becomes copies of one image)."""
        if self.warned_unreadable or skipped <= UNREADABLE_WARN_FRACTION * self.num_images:
            return
        self.warned_unreadable = True
        logger.warning(
            "%d of the %d files under --data_path (%.0f%%) are unreadable: readable images stand "
            "in for them, so some are seen several times an epoch; check the data",
            skipped,
            self.num_images,
            100 * skipped / self.num_images,
        )

    def _check_finite(
        self, loss: float, it: int, first_bad: tuple[Tensor, Tensor] | None = None
    ) -> None:
        """Stop on a non-finite loss, named at the first iteration that had one.

        Args:
            loss: The loss read now (at iteration ``it``).
            it: Global iteration of ``loss``.
            first_bad: ``(iteration, loss)`` device scalars of the first non-finite loss since
                the last check (iteration -1: none), tracked without a host sync per step.
        """
        if first_bad is not None and int(first_bad[0]) >= 0:
            it, loss = int(first_bad[0]), float(first_bad[1])
        if not math.isfinite(loss):
            raise TrainingError(
                f"loss is {loss} at iteration {it}; stopping. Try --precision fp32 or bf16, "
                "a lower --lr, or a longer warm-up (the last checkpoint is intact)."
            )

    def stop_together(self, *, bad_loss: bool = False, failed: bool = False) -> None:
        """In a distributed run: stop every rank here if one of them must stop.

        Each rank stopping on its own at its next step would leave the others waiting in a
        collective for a rank that has gone (with NCCL, until torchrun's grace period ends
        and it kills them). A signal reaches the ranks at different moments (torchrun's agent
        forwards its own; a scheduler signals each process), or only one of them (``kill``),
        so the ranks agree here, at a point they all reach, on the interruption to act on, on
        a non-finite loss, and on a failure of the work one rank does alone (rank 0 saves).

        Args:
            bad_loss: This rank had a non-finite loss since the last agreement (its own
                check reports it, with the iteration).
            failed: This rank's own work failed (the caller raises its error after this).

        Raises:
            TrainingError: Another rank failed or had a non-finite loss.
            KeyboardInterrupt: A rank received Ctrl-C.
            Terminated: A rank received SIGTERM.
        """
        if not self.info.distributed:
            raise_if_interrupted()
            return
        stop, bad, failure = max_over_ranks(
            [pending_interruption(), int(bad_loss), int(failed)], self.device
        )
        if failure:
            if not failed:
                raise TrainingError(
                    "another process of this run failed (its own error says why); stopping "
                    "(the last complete checkpoint is kept)"
                )
            return
        if bad and not bad_loss:
            raise TrainingError(
                f"the loss is not finite {ELSEWHERE} (its own error names the iteration); "
                "stopping (the last checkpoint is intact)"
            )
        if not bad:
            raise_interruption(Interruption(stop))

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch; returns its averaged metrics."""
        config = self.config
        loader_seed = seed_everything(config.seed, self.info.rank, epoch)
        self.loader_generator.manual_seed(loader_seed)
        self.augment_generator.manual_seed(augment_seed(config.seed, self.info.rank, epoch))
        self.sampler.set_epoch(epoch)
        self.nets.student.train()
        self.nets.teacher.train()
        images_per_step = config.batch_size_per_gpu * self.info.world_size
        loss_sum = torch.zeros((), device=self.device)
        # The first non-finite loss (iteration, value), read at log points only: the reference
        # stops at once, and a check that reads every step would make the host wait each time.
        bad_it = torch.full((), -1, dtype=torch.long, device=self.device)
        bad_loss = torch.zeros((), device=self.device)
        bar = tqdm(
            total=self.niter,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not (self.info.is_main and config.progress),
            dynamic_ncols=True,
        )
        tick, tick_step = time.perf_counter(), 0
        epoch_start = tick
        img_per_s = 0.0
        together = self.info.distributed  # ranks stop where they agree to (stop_together)
        batches = start_workers(self.loader, check=not together)
        try:
            # Log lines (skipped files, the collapse watch) go above the bar, not onto it.
            redirect = contextlib.nullcontext() if bar.disable else logging_redirect_tqdm([logger])
            with redirect:
                for i, (batch, bad) in enumerate(batches):
                    if not together:
                        raise_if_interrupted()
                    it = epoch * self.niter + i
                    self._note_skipped(bad)
                    crops = self.device_crops(batch)
                    loss = self.train_step(crops, epoch, it)
                    loss_sum += loss
                    first = (bad_it < 0) & ~torch.isfinite(loss)
                    bad_it = torch.where(first, it, bad_it)
                    bad_loss = torch.where(first, loss.detach().float(), bad_loss)
                    bar.update(1)
                    if (i + 1) % config.log_every == 0 or i + 1 == self.niter:
                        loss_value = float(loss)
                        if together:
                            bad_here = int(bad_it) >= 0 or not math.isfinite(loss_value)
                            self.stop_together(bad_loss=bad_here)
                        self._check_finite(loss_value, it, (bad_it, bad_loss))
                        now = time.perf_counter()
                        img_per_s = (i + 1 - tick_step) * images_per_step / max(now - tick, 1e-9)
                        tick, tick_step = now, i + 1
                        entropy = float(self.dino_loss.last_teacher_entropy)
                        record = {
                            "epoch": epoch,
                            "loss": loss_value,
                            "lr": float(self.lr_schedule[it]),
                            "wd": float(self.wd_schedule[it]),
                            "momentum": float(self.momentum_schedule[it]),
                            "teacher_entropy": entropy,
                            "img_per_s": img_per_s,
                        }
                        postfix: dict[str, object] = {
                            "loss": f"{loss_value:.4f}",
                            "lr": f"{record['lr']:.2e}",
                            "wd": f"{record['wd']:.3f}",
                            "m": f"{record['momentum']:.4f}",
                            "img_s": f"{img_per_s:.0f}",
                        }
                        if self.skipped:
                            postfix["skipped"] = len(self.skipped)
                        bar.set_postfix(postfix)
                        self.log.step(it, record)
                        if self.info.is_main:  # one warning per job, not one per rank
                            self.watch.observe(
                                epoch=epoch, loss=loss_value, teacher_entropy=entropy
                            )
        finally:
            # Now, not when a traceback's frames are collected; after a full epoch torch has
            # stopped them, and this only kills one that outlived that.
            stop_workers(batches)
            bar.close()
        epoch_img_per_s = (
            self.niter * images_per_step / max(time.perf_counter() - epoch_start, 1e-9)
        )
        in_sync = self.check_ranks_in_sync()
        mean_loss = float(all_reduce_mean(loss_sum / self.niter))
        self._check_finite(mean_loss, (epoch + 1) * self.niter - 1)
        last = (epoch + 1) * self.niter - 1
        return {
            "train_loss": mean_loss,
            "train_lr": float(np.mean(self.lr_schedule[epoch * self.niter : last + 1])),
            "train_wd": float(np.mean(self.wd_schedule[epoch * self.niter : last + 1])),
            "train_momentum": float(self.momentum_schedule[last]),
            "teacher_entropy": float(self.dino_loss.last_teacher_entropy),
            "img_per_s": epoch_img_per_s,
            "skipped_images": len(union_over_ranks(self.skipped)),  # each file once, run-wide
            "world_size": self.info.world_size,
            "ranks_in_sync": in_sync,
        }

    @torch.no_grad()
    def check_ranks_in_sync(self) -> bool:
        """Verify that student, teacher and centre are bitwise identical on every rank.

        The centre is identical only if every rank averaged the same global batch of teacher
        outputs (each rank sees different images).

        Raises:
            TrainingError: The ranks diverged.
        """
        if not self.info.distributed:
            return True
        fingerprint = torch.stack(
            [
                torch.stack([p.double().sum() for p in self.nets.student.parameters()]).sum(),
                torch.stack([p.double().sum() for p in self.nets.teacher.parameters()]).sum(),
                self.dino_loss.center.double().sum(),
                self.dino_loss.center.double().square().sum(),
            ]
        )
        if not ranks_agree(fingerprint):
            raise TrainingError("the ranks' weights or loss centres diverged; stopping")
        return True

    def save(self, epoch: int) -> None:
        """Write ``checkpoint.pth`` (and ``checkpoint{epoch:04}.pth`` every saveckp_freq)."""
        if not self.info.is_main:
            return
        state = checkpoint_state(
            config=self.config,
            vit=self.vit,
            nets=self.nets,
            optimizer=self.optimizer,
            dino_loss=self.dino_loss,
            scaler=self.scaler,
            epoch=epoch,
        )
        try:
            self.last_digest = save_checkpoint(state, self.output_dir / CHECKPOINT_NAME)
            if self.config.saveckp_freq and epoch % self.config.saveckp_freq == 0:
                save_checkpoint(state, self.output_dir / f"checkpoint{epoch:04}.pth")
        except OSError as err:
            raise TrainingError(
                f"cannot write the checkpoint of epoch {epoch} into {self.output_dir} "
                f"({err.strerror or err}); the last complete checkpoint there is kept"
            ) from err

    def _save_and_log(self, epoch: int, stats: dict[str, Any]) -> Exception | None:
        """Save and log the finished epoch (rank 0 writes).

        Returns:
            ``None``, or in a distributed run the error that stopped it, for the caller to
            raise once the ranks have agreed to stop (stop_together): raised at once, it would
            leave the others waiting for rank 0 in their next collective. In one process the
            error is raised here.
        """
        try:
            # The log line first: a crash before the checkpoint is replaced leaves a line for
            # an epoch that the resume runs again (its rewind drops the line); the other order
            # lost the epoch's line for good. A log that cannot be written still lets the
            # epoch's checkpoint be saved before the error stops the run.
            try:
                self.log.epoch(epoch, stats)
            except OSError:
                self.save(epoch)
                raise
            self.save(epoch)
        except Exception as err:
            if not self.info.distributed:
                raise
            return err
        logger.info(
            "epoch %d: %s",
            epoch,
            {k: round(v, 6) if isinstance(v, float) else v for k, v in stats.items()},
        )
        return None

    def check_export_target(self) -> None:
        """Fail before training, not after it, when ``--export_to`` cannot be written."""
        if not (self.info.is_main and self.config.export_to):
            return
        from models.export import ExportError, check_repository_target

        target = Path(self.config.export_to)
        try:
            check_repository_target(target.parent, target.name)
        except ExportError as err:
            raise TrainingError(f"--export_to {self.config.export_to}: {err}") from err

    def export(self, *, final: bool) -> None:
        """Export the teacher (main rank only).

        A periodic export that fails is reported and training goes on (the next one tries
        again); the final one's failure stops the run with the command that retries it.

        Raises:
            TrainingError: The final export failed (the checkpoint is saved).
        """
        if not (self.info.is_main and self.config.export_to):
            return
        from models.checkpoint import CheckpointError
        from models.export import ExportError

        ckpt = self.output_dir / CHECKPOINT_NAME
        try:
            export_teacher(self.config, self.vit, self.nets.teacher, ckpt, self.last_digest)
        except (ExportError, CheckpointError, OSError, ValueError) as err:
            message = user_message(err).strip().splitlines()[0] if str(err).strip() else ""
            message = message or type(err).__name__
            if not final:
                logger.warning(
                    "the export to %s failed (%s); training goes on and the next export tries "
                    "again",
                    self.config.export_to,
                    message,
                )
                return
            target = Path(self.config.export_to)
            raise TrainingError(
                f"the export to {self.config.export_to} failed ({message}); the checkpoint "
                f"{ckpt} is saved: export it with python -m models.export --weights {ckpt} "
                f"--repository {target.parent} --name {target.name}"
            ) from err

    def _final_export_missing(self) -> str | None:
        """Why ``--export_to`` lacks the finished checkpoint's teacher (no version records its
        digest), or None when it holds it or there is no ``--export_to`` (or not rank 0)."""
        config = self.config
        if not (self.info.is_main and config.export_to):
            return None
        from models.contract import MetadataKey, model_path, model_versions
        from models.export import read_metadata

        target = Path(config.export_to)
        try:
            versions = model_versions(target.parent, target.name)
        except (OSError, ValueError):
            return "its folder cannot be listed"  # the export then says why, in one line
        for version in reversed(versions):
            try:
                recorded = read_metadata(model_path(target.parent, target.name, version))
            except Exception:  # a version that cannot be read is not this checkpoint's export
                continue
            if recorded.get(MetadataKey.WEIGHTS_SHA256) == self.last_digest:
                return None
        if not versions:
            return "no version at all"
        return f"none of its {len(versions)} version(s) records the checkpoint's digest"

    def _say_nothing_to_do(self) -> None:
        """Log why a run whose checkpoint has all its epochs trains nothing."""
        config = self.config
        if self.start_epoch > config.epochs:
            logger.warning(
                "the checkpoint has trained %d epochs, more than --epochs %d: nothing to do "
                "(its schedules were those of its own --epochs; give that to continue it)",
                self.start_epoch,
                config.epochs,
            )
        else:
            logger.info("nothing to do: the checkpoint already finished %d epochs", config.epochs)
            if config.export_to:
                logger.info("its teacher is already exported to %s", config.export_to)
                return
        if config.export_to:
            target = Path(config.export_to)
            logger.info(
                "to export it: python -m models.export --weights %s --repository %s --name %s",
                self.output_dir / CHECKPOINT_NAME,
                target.parent,
                target.name,
            )

    def run(self) -> int:
        """The epoch loop; returns the exit status."""
        config = self.config
        logger.info(
            "training %s (%s) on %s x%d, %s, %d images, %d iterations/epoch, %d crops (%s "
            "augmentation%s)",
            self.vit.arch,
            f"dim {self.vit.embed_dim}, depth {self.vit.depth}, patch {self.vit.patch_size}",
            self.device,
            self.info.world_size,
            self.precision,
            self.num_images,
            self.niter,
            self.ncrops,
            self.augment_device,
            {"crops": ", crops cut by the loader", "canvas": ", canvas", "": ""}.get(
                self.gpu_input, ""
            ),
        )
        if config.freeze_last_layer >= config.epochs:
            logger.warning(
                "--freeze_last_layer %d >= --epochs %d: the head's last layer is never trained "
                "(the reference freezes it for 1 epoch)",
                config.freeze_last_layer,
                config.epochs,
            )
        # One process: SIGTERM and Ctrl-C are raised at once before the epochs, at each step's
        # start during them (see training.interrupts), and one that arrives while the epoch is
        # saved is raised once it is saved and logged. Several (torchrun): from here on, with
        # the start-up's collectives behind, they are deferred, and the ranks stop together
        # where they agree to (stop_together: before the first epoch, at log points and after
        # each epoch), since every step has collectives; after the loop there are none left.
        together = self.info.distributed
        with interruptions_deferred() if together else contextlib.nullcontext():
            if self.info.is_main:
                stale = remove_stale_temps(self.output_dir)
                if stale:
                    logger.info(
                        "removed %d temporary file(s) an interrupted checkpoint save left in %s",
                        stale,
                        self.output_dir,
                    )
            self.resume()
            if self.start_epoch == config.epochs and (missing := self._final_export_missing()):
                # An earlier run was stopped during its final export (or exported nowhere):
                # the rerun of its command completes it instead of saying there is nothing to do.
                logger.info(
                    "the run has finished its %d epochs, but %s holds no export of its "
                    "checkpoint (%s): exporting it now",
                    config.epochs,
                    config.export_to,
                    missing,
                )
                self.export(final=True)
                return 0
            if self.start_epoch >= config.epochs:
                self._say_nothing_to_do()
                return 0
            if self.info.is_main:
                try:  # before an epoch of work, not after it
                    new_temp_file(self.output_dir, ".write-check-", ".tmp").unlink()
                except OSError as err:
                    raise TrainingError(
                        f"--output_dir {self.output_dir} is not writable ({err.strerror or err})"
                    ) from err
            self.check_export_target()
            if self.info.is_main:  # only once the checkpoint (if any) is known to fit these options
                save_config(config, self.output_dir / "config.yaml")
            with interruptions_deferred(check=not together):
                self.log.rewind(self.start_epoch, self.start_epoch * self.niter)
            if together:
                self.stop_together()
            for done_this_run, epoch in enumerate(range(self.start_epoch, config.epochs), start=1):
                with interruptions_deferred(check=not together):
                    stats = self.train_epoch(epoch)
                    failure = self._save_and_log(epoch, stats)
                final = epoch + 1 == config.epochs
                periodic = config.export_every and (epoch + 1) % config.export_every == 0
                if failure is None:
                    self._warn_if_mostly_unreadable(int(stats["skipped_images"]))
                    if periodic and not final:
                        self.export(final=False)
                if together:
                    self.stop_together(failed=failure is not None)
                if failure is not None:
                    raise failure
                limit = config.max_epochs_this_run
                if limit and done_this_run >= limit and not final:
                    logger.info("stopping after %d epochs (--max_epochs_this_run)", done_this_run)
                    return 0
        self.export(final=True)
        return 0


def user_message(err: BaseException) -> str:
    """The error's own message; for one re-raised by a DataLoader worker (whose text embeds
    the worker's traceback), only the original message."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return last.removeprefix(prefix).removeprefix(f"{type(err).__name__}: ")


_MEMORY_ADVICE = (
    "try a smaller --batch_size_per_gpu, fewer --num_workers or a lower --max_image_pixels"
)


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the errors it was raised from or during, nearest first (at most 8: a short
    chain; a cycle is not followed forever)."""
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def _worker_signal(err: BaseException) -> str | None:
    """The signal that killed a loader worker, from the error or the errors it wraps."""
    for cause in _causes(err):
        found = re.search(r"killed by signal: ([^.\n]+)", str(cause))
        if found:
            return found.group(1).strip()
    return None


def resource_failure(err: BaseException) -> str | None:
    """A one-line account, with advice, of a run stopped by lack of memory or by a loader
    worker killed for it; ``None`` for anything else (a crash or a bug, whose traceback is the
    report)."""
    lines = user_message(err).strip().splitlines()
    first = lines[0].rstrip(". ") if lines else ""
    if isinstance(err, MemoryError) or (
        isinstance(err, RuntimeError)
        and (isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err))
    ):
        return (
            f"out of memory ({first}); {_MEMORY_ADVICE}"
            if first
            else f"out of memory; {_MEMORY_ADVICE}"
        )
    if not (isinstance(err, RuntimeError) and "DataLoader worker" in str(err)):
        return None
    signal = _worker_signal(err)
    if signal == "Killed":  # SIGKILL: the kernel's out-of-memory killer, as a rule
        return f"{first} (killed by signal: Killed), usually for lack of memory; {_MEMORY_ADVICE}"
    if signal == "Bus error":  # shared memory (/dev/shm) ran out
        return (
            f"{first} (killed by signal: Bus error): the shared memory (/dev/shm) that loader "
            "workers pass batches through ran out; give the container more (docker run "
            "--shm-size, compose shm_size) or use fewer --num_workers"
        )
    return None  # another signal (a crash in a decoder?) or none: the traceback says more


def compiler_failure(err: BaseException) -> str | None:
    """A one-line account of ``--compile`` failing for want of a working C++ compiler
    (inductor builds its CPU kernels, and its CUDA kernels' launchers, with one); ``None``
    for anything else."""
    for cause in _causes(err):
        inner = getattr(cause, "inner_exception", None)  # inductor's wrapper of the error
        for found in (cause, inner) if isinstance(inner, BaseException) else (cause,):
            text = str(found).strip()
            if type(found).__name__ == "InvalidCxxCompiler" or "No working C++ compiler" in text:
                detail = text.splitlines()[0] if text else type(found).__name__
                return (
                    f"--compile true needs a working C++ compiler, and torch found none "
                    f"({detail.removeprefix('InvalidCxxCompiler: ')}); install one (such as g++: "
                    "apt-get install g++) or run without --compile"
                )
    return None


_PEER_GONE = re.compile(
    r"Connection (reset|closed) by peer|Broken pipe|NCCL communicator was aborted",
    re.IGNORECASE,
)


def peer_failure(err: BaseException) -> str | None:
    """One line for a collective that failed because another process of the run stopped
    (its own error, logged by that process, is the report); ``None`` for anything else."""
    if not (isinstance(err, RuntimeError) and _PEER_GONE.search(str(err))):
        return None
    lines = str(err).strip().splitlines()
    first = lines[0][:200] if lines else type(err).__name__
    return (
        f"another process of this run stopped, so this one cannot go on ({first}); its own "
        "error says why"
    )


def _interrupt_behind(err: BaseException) -> BaseException | None:
    """The Ctrl-C or SIGTERM that caused ``err`` (C++ code that catches the Python exception
    raised in it, as torch.save's writer does, reports its own error instead)."""
    return next((c for c in _causes(err) if isinstance(c, KeyboardInterrupt | Terminated)), None)


def _resume_hint(config: PretrainConfig) -> str:
    """What a rerun does: resume from the checkpoint, or start over when none was written yet
    (a run stopped in its first epoch)."""
    ckpt = Path(config.output_dir) / CHECKPOINT_NAME
    try:
        written = ckpt.exists()
    except OSError:  # cannot tell: the usual advice
        written = True
    if written:
        return f"resume later from {ckpt}"
    return f"no checkpoint was written yet in {config.output_dir}, so a rerun starts over"


def _interrupted(config: PretrainConfig, err: BaseException) -> int:
    """Log an interruption in one line; returns the exit status (130 or 143, as the shell)."""
    # ELSEWHERE, in a rank that stops because another rank of its run was signalled
    where = "".join(f" {arg}" for arg in err.args)
    if isinstance(err, Terminated):
        logger.error("terminated (SIGTERM%s); %s", where, _resume_hint(config))
        return 128 + signal.SIGTERM
    logger.error("interrupted%s; %s", f" (Ctrl-C{where})" if where else "", _resume_hint(config))
    return 130


_LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s")


def _setup_logging(is_main: bool) -> None:
    """Log INFO on rank 0 and warnings only elsewhere, to stderr (once per process)."""
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_LOG_FORMAT)
        logger.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run pretraining; returns the process exit status (0 ok, 1 failure, 2 bad options)."""
    try:
        config = parse_config(list(argv) if argv is not None else None)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        info = init_distributed(config.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _setup_logging(info.is_main)
    # In a torchrun job a repeated signal is torchrun's agent forwarding its own, and the
    # agent signals the ranks still running once one has failed (see sigterm_unwinds).
    together = info.distributed
    with (
        sigterm_unwinds(repeats_stop=not together, then_ignored=together),
        stop_deadline(config.stop_timeout, _stop_now(config))
        if together
        else contextlib.nullcontext(),
    ):
        return _run(config, info)


def _stop_now(config: PretrainConfig) -> Callable[[int], None]:
    """What a rank does when it has not stopped ``--stop_timeout`` seconds after a signal:
    one line, then exit at once (see training.interrupts.stop_deadline)."""

    def expire(signum: int) -> None:
        what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted (Ctrl-C)"
        message = (
            f"{what}, but this process did not stop within {config.stop_timeout:g} s "
            "(--stop_timeout): another process of this run failed or is stuck (this one waits "
            "for it in a collective), or the work up to the point where the processes stop "
            "together takes longer (the steps to the next log point, a checkpoint save or an "
            f"export, the start-up); stopping it without clean-up; {_resume_hint(config)}"
        )
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, (), None)
        # Not through the logging handlers: the blocked main thread may hold their lock.
        with contextlib.suppress(OSError):
            os.write(2, (_LOG_FORMAT.format(record) + "\n").encode())
        kill_workers_now()  # os._exit skips the reaper at exit
        os._exit(128 + signum)

    return expire


def _make_output_dir(folder: Path) -> None:
    """Create ``--output_dir``; raises TrainingError naming the option when it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if folder.exists() and not folder.is_dir():
            reason = "it exists and is not a folder"
        else:
            reason = f"cannot create it: {err.strerror or err}"
            if err.filename and str(err.filename) != str(folder):
                reason += f" ({err.filename})"
        raise TrainingError(f"--output_dir {folder}: {reason}") from err


def _run(config: PretrainConfig, info: DistInfo) -> int:
    """Train with ``config`` in this process; returns the exit status.

    The report and the clean-up run with interruptions deferred: a signal that arrives while
    the run unwinds (torchrun's agent sends SIGTERM to the ranks still running once one has
    stopped) must not cut the one line that says why it stopped.
    """
    try:
        return _train(config, info)
    except BaseException as err:
        mark_stopping()
        with interruptions_deferred(check=False):
            status = _exit_status(config, info, err)
        if status is None:
            raise  # a bug: its traceback is the report
        return status
    finally:
        with interruptions_deferred(check=False):
            cleanup_distributed()


def _train(config: PretrainConfig, info: DistInfo) -> int:
    """Build the trainer and run it; returns the exit status of a run that ends normally."""
    with contextlib.ExitStack() as owned:
        if info.is_main:
            _make_output_dir(Path(config.output_dir))
            try:
                owned.enter_context(output_dir_lock(Path(config.output_dir)))
            except OutputDirInUseError as err:
                raise TrainingError(str(err)) from None
        trainer = Trainer(config, info)
        try:
            return trainer.run()
        finally:
            mark_stopping()
            # No exception inside TensorBoard's writer. One that came meanwhile is raised after
            # for a run that finished (its work is done, but whoever sent it is told it arrived:
            # 143 or 130), not in place of the error or interruption that stopped a run.
            with interruptions_deferred(check=sys.exception() is None):
                trainer.log.close()


def _exit_status(config: PretrainConfig, info: DistInfo, err: BaseException) -> int | None:
    """Report ``err`` in one line; returns the exit status, or ``None`` for an error that is
    not the user's or the machine's (its traceback is the report)."""
    if isinstance(err, ConfigError):
        logger.error("error: %s", err)
        return 2
    if isinstance(err, DataError | CheckpointCorruptError | TrainingError | OSError):
        # In one process SIGTERM is raised wherever the run is, and the code it lands in may
        # report something else instead. Under torchrun it is raised only where the ranks
        # agree to stop: such an error is the error (the agent's SIGTERM came after it).
        if SIGTERM_SEEN.is_set() and not info.distributed:  # e.g. a file cut short by it
            return _interrupted(config, Terminated())
        logger.error("error: %s", user_message(err))
        return 1
    if isinstance(err, MemoryError | RuntimeError):
        interrupt = _interrupt_behind(err)
        if interrupt is not None:  # torch.save's writer turns it into a RuntimeError
            return _interrupted(config, interrupt)
        # E.g. an error torch raised while the run stopped; under torchrun, a collective that
        # failed because a rank stopped or was killed after this one was signalled.
        if SIGTERM_SEEN.is_set():
            return _interrupted(config, Terminated())
        compiler = compiler_failure(err)
        if compiler is not None:
            logger.error("error: %s", compiler)
            return 1
        message = resource_failure(err)
        if message is None and info.distributed:
            message = peer_failure(err)
        if message is None:
            return None
        logger.error("error: %s (%s)", message, _resume_hint(config))
        return 1
    if isinstance(err, KeyboardInterrupt | Terminated):
        return _interrupted(config, err)
    return None


if __name__ == "__main__":
    sys.exit(main())
