"""Every option of ``python -m training.pretrain``: defaults, YAML file, then command line.

Flag names are those of the original ``main_dino.py`` (``--arch``, ``--out_dim``,
``--batch_size_per_gpu`` ...), so a DINO user's command line works unchanged; booleans take
``true/false`` values as there. ``--config FILE.yaml`` sets any option by its name; flags given on
the command line override the file. The merged result is saved as ``config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.contract import validate_model_name
from models.files import new_temp_file
from training.optim import OPTIMIZERS

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUGMENT_DEVICES = ("auto", "cpu", "gpu")
ARCHS = ("vit_tiny", "vit_small", "vit_base", "deit_tiny", "deit_small")


class ConfigError(ValueError):
    """An invalid option value or configuration file (a user mistake, reported without trace)."""


def _opt(default: Any, help_text: str, **extra: Any) -> Any:
    meta = {"help": help_text, **extra}
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class PretrainConfig:
    """All pretraining options (see ``docs/training.md`` for the table)."""

    # Model.
    arch: str = _opt("vit_small", "ViT size: vit_tiny, vit_small, vit_base (deit_* aliases).")
    patch_size: int = _opt(16, "Patch size in pixels.")
    embed_dim: int | None = _opt(None, "Custom token width (overrides --arch).")
    depth: int | None = _opt(None, "Custom number of blocks (overrides --arch).")
    num_heads: int | None = _opt(None, "Custom attention heads (overrides --arch).")
    out_dim: int = _opt(65536, "Dimension of the DINO head output.")
    norm_last_layer: bool = _opt(
        True,
        "Freeze the last layer's weight-norm gain g at 1 (false: g is trained; the layer is "
        "weight-normalised either way).",
    )
    momentum_teacher: float = _opt(0.996, "Base EMA momentum of the teacher (cosine to 1).")
    use_bn_in_head: bool = _opt(False, "BatchNorm in the projection head.")
    head_hidden_dim: int = _opt(2048, "Hidden width of the head MLP (2048 in the paper).")
    head_bottleneck_dim: int = _opt(256, "Bottleneck width of the head (256 in the paper).")
    drop_path_rate: float = _opt(0.1, "Stochastic depth rate of the student.")
    # Temperatures.
    warmup_teacher_temp: float = _opt(0.04, "Initial teacher temperature.")
    teacher_temp: float = _opt(0.04, "Teacher temperature after the warm-up.")
    warmup_teacher_temp_epochs: int = _opt(0, "Epochs of teacher temperature warm-up.")
    # Optimisation.
    precision: str = _opt(
        "auto",
        "bf16, fp16 (grad scaler) or fp32; auto: bf16 on GPUs that have it, fp16 on older GPUs, "
        "fp32 on the CPU.",
    )
    use_fp16: bool | None = _opt(
        None, "Compatibility: true/false means --precision fp16/fp32 (when --precision is auto)."
    )
    weight_decay: float = _opt(0.04, "Initial weight decay.")
    weight_decay_end: float = _opt(0.4, "Final weight decay (cosine).")
    clip_grad: float = _opt(3.0, "Per-tensor gradient norm clip; 0 disables.")
    batch_size_per_gpu: int = _opt(64, "Images per process and step.")
    epochs: int = _opt(100, "Training epochs.")
    freeze_last_layer: int = _opt(
        1,
        "Epochs during which the head's last layer is not trained (a warning when it covers "
        "every epoch).",
    )
    lr: float = _opt(0.0005, "Peak learning rate for a total batch of 256 (scaled linearly).")
    warmup_epochs: int = _opt(10, "Epochs of linear learning-rate warm-up.")
    min_lr: float = _opt(1e-6, "Final learning rate.")
    optimizer: str = _opt("adamw", "adamw, sgd or lars.")
    # Multi-crop.
    global_crops_scale: tuple[float, float] = _opt((0.4, 1.0), "Scale range of global crops.")
    local_crops_number: int = _opt(8, "Local crops per image; 0 disables multi-crop.")
    local_crops_scale: tuple[float, float] = _opt((0.05, 0.4), "Scale range of local crops.")
    global_crops_size: int = _opt(224, "Side of global crops in pixels (model image size).")
    local_crops_size: int = _opt(96, "Side of local crops in pixels.")
    augment_device: str = _opt(
        "auto",
        "Multi-crop on cpu (loader workers, PIL) or gpu (batched on the training device); "
        "auto: gpu when training on CUDA.",
    )
    canvas_size: int = _opt(
        0,
        "gpu augmentation: 0 (default): the loader cuts the crops as the reference and the "
        "device does the rest (Fashion-MNIST: whole images, cropped on the device); S > 0: "
        "the loader sends a random S x S square of the shorter-side-resized image and the "
        "device crops it (less loader CPU, but the crops then cover less of the photo).",
    )
    # Data and output.
    data_path: str = _opt("", "Image folder, or fashion-mnist:train / fashion-mnist:test.")
    max_image_pixels: int = _opt(
        89_478_485,
        "Images with more pixels are skipped (read from the header, before decoding); at most "
        "178956970, PIL's hard limit (0: that limit).",
    )
    output_dir: str = _opt(".", "Where checkpoints and logs go.")
    saveckp_freq: int = _opt(20, "Also keep checkpoint{epoch:04}.pth every N epochs.")
    seed: int = _opt(0, "Random seed (each rank, epoch and loader worker derives its own).")
    num_workers: int = _opt(10, "Data-loading processes per GPU.")
    # Tooling.
    device: str = _opt("auto", "auto, cuda or cpu.")
    compile: bool = _opt(
        False, "torch.compile the backbones (needs a working C++ compiler, such as g++)."
    )
    resume: bool = _opt(True, "Resume from output_dir/checkpoint.pth when it exists.")
    max_epochs_this_run: int = _opt(0, "Stop after this many epochs in this invocation (0: no).")
    log_every: int = _opt(10, "Steps between progress/log updates.")
    stop_timeout: float = _opt(
        20.0,
        "Under torchrun: seconds a process that received SIGTERM or Ctrl-C waits to stop "
        "together with the others before it exits on its own (one of them failed or is stuck).",
    )
    progress: bool = _opt(True, "Show a progress bar.")
    export_to: str | None = _opt(
        None,
        "Export the teacher at the end as a new version of the model folder REPOSITORY/NAME "
        "(a path, e.g. model_repository/dino_default; none: no export, overriding a config "
        "file).",
    )
    export_every: int = _opt(0, "Also export every K epochs (with --export_to).")
    dist_url: str = _opt("env://", "Accepted for compatibility; torchrun's env is used.")
    local_rank: int = _opt(0, "Accepted for compatibility; ignored.")

    def validate(self) -> None:
        """Check values that argparse cannot.

        Raises:
            ConfigError: An option is out of range.
        """
        if not self.data_path:
            raise ConfigError("--data_path is required (an image folder or fashion-mnist:train)")
        try:  # a name in another encoding reaches Python as surrogates (PEP 383)
            self.output_dir.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                f"--output_dir {os.fsencode(self.output_dir)!r} is not a valid UTF-8 path "
                "(TensorBoard cannot write under it); rename it or choose another folder"
            ) from None
        if self.arch not in ARCHS:
            raise ConfigError(f"--arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is not one of {PRECISIONS}")
        if self.augment_device not in AUGMENT_DEVICES:
            raise ConfigError(
                f"--augment_device {self.augment_device!r} is not one of {AUGMENT_DEVICES}"
            )
        if self.canvas_size < 0:
            raise ConfigError(f"--canvas_size must be >= 0, got {self.canvas_size}")
        if not 0 <= self.max_image_pixels <= 2 * 89_478_485:
            raise ConfigError(
                f"--max_image_pixels must be in [0, 178956970] (PIL refuses larger images "
                f"anyway), got {self.max_image_pixels}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        positive = (
            "patch_size",
            "out_dim",
            "head_hidden_dim",
            "head_bottleneck_dim",
            "batch_size_per_gpu",
            "epochs",
            "log_every",
        )
        if not 0 < self.stop_timeout <= 86_400:  # also refuses nan and inf
            raise ConfigError(
                f"--stop_timeout must be in (0, 86400] seconds, got {self.stop_timeout}"
            )
        for name in positive + ("global_crops_size", "local_crops_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        non_negative = (
            "local_crops_number",
            "num_workers",
            "warmup_epochs",
            "freeze_last_layer",
            "seed",
            "max_epochs_this_run",
            "warmup_teacher_temp_epochs",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.seed >= 2**32:  # the samplers and generators take 64-bit seeds plus the epoch
            raise ConfigError(f"--seed must be below 2**32 = {2**32}, got {self.seed}")
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"--warmup_epochs {self.warmup_epochs} > --epochs {self.epochs}")
        if self.warmup_teacher_temp_epochs > self.epochs:
            raise ConfigError("--warmup_teacher_temp_epochs exceeds --epochs")
        for name in ("global_crops_scale", "local_crops_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ConfigError(f"--{name} needs 0 < min <= max <= 1, got {low} {high}")
        if self.global_crops_size % self.patch_size:
            raise ConfigError(
                f"--global_crops_size {self.global_crops_size} must be a multiple of "
                f"--patch_size {self.patch_size}"
            )
        if self.local_crops_size < self.patch_size:
            raise ConfigError("--local_crops_size must be at least --patch_size")
        if self.export_every < 0 or self.saveckp_freq < 0:
            raise ConfigError("--export_every and --saveckp_freq must be >= 0")
        self._validate_numbers()
        if self.export_every and self.export_to is None:
            raise ConfigError("--export_every needs --export_to (the repository/NAME to write)")
        if self.export_to is not None:
            if self.export_to.endswith(("/", "\\")):
                raise ConfigError(
                    f"--export_to {self.export_to!r} ends with a slash; give the model's folder "
                    "inside the repository without one, e.g. model_repository/dino_default (a "
                    "repository itself, model_repository/, is not a model's folder)"
                )
            if Path(self.export_to).name in ("", ".", ".."):
                raise ConfigError(
                    f"--export_to {self.export_to!r} names a folder; give the model's folder "
                    "inside the repository, e.g. model_repository/dino_default"
                )
            target = Path(self.export_to)
            try:
                validate_model_name(target.name)
            except ValueError as err:
                raise ConfigError(f"--export_to {self.export_to!r}: {err}") from err

    def _validate_numbers(self) -> None:
        """Ranges of the optimisation and temperature options."""
        for name in ("lr", "warmup_teacher_temp", "teacher_temp"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name} must be a positive number, got {value}")
        for name in ("min_lr", "weight_decay", "weight_decay_end", "clip_grad"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name} must be >= 0, got {value}")
        if not 0 <= self.momentum_teacher <= 1:
            raise ConfigError(
                f"--momentum_teacher must be in [0, 1] (0.996 in the paper), "
                f"got {self.momentum_teacher}"
            )
        if not 0 <= self.drop_path_rate < 1:
            raise ConfigError(f"--drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def resolved_precision(self) -> str:
        """``precision`` with ``use_fp16`` applied (``auto`` is resolved per device later)."""
        if self.use_fp16 is not None and self.precision == "auto":
            return "fp16" if self.use_fp16 else "fp32"
        return self.precision

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples become lists) for YAML, JSON and checkpoints."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[no-any-return]


def bool_flag(value: str) -> bool:
    """Parse ``true/false/1/0/yes/no/on/off`` like the reference's ``bool_flag``."""
    lowered = str(value).lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {value!r} (use true or false)")


def _none_or(kind: type) -> Any:
    def parse(value: str) -> Any:
        return None if value.lower() in ("none", "null", "") else kind(value)

    return parse


def _export_target(value: str) -> str | None:
    """``--export_to``: a path, or ``none`` to turn a YAML file's export off; never empty (an
    unset shell variable would otherwise skip the export without a word)."""
    if not value.strip():
        raise argparse.ArgumentTypeError(
            "an empty value; give repository/NAME, or none to export nothing"
        )
    return None if value.lower() in ("none", "null") else value


# Path options: a leading ~ is the user's home. A shell expands it in `--flag ~/x` but not in
# a YAML file nor in `--flag=~/x`, so it is expanded here for all three.
_PATHS = ("data_path", "output_dir", "export_to")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (every default suppressed so YAML values are not overridden)."""
    parser = argparse.ArgumentParser(
        prog="python -m training.pretrain",
        description="DINO self-supervised pretraining of a Vision Transformer.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", type=Path, help="YAML file of options (CLI flags win).")
    for f in dataclasses.fields(PretrainConfig):
        default = (
            f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        )
        help_text = f"{f.metadata['help']} (default: {default})"
        names = [f"--{f.name}"]
        if "_" in f.name:
            names.append(f"--{f.name.replace('_', '-')}")
        if isinstance(default, bool) or f.name == "use_fp16":
            parser.add_argument(*names, dest=f.name, type=bool_flag, help=help_text)
        elif isinstance(default, tuple):
            parser.add_argument(*names, dest=f.name, type=float, nargs=2, help=help_text)
        elif f.name in ("embed_dim", "depth", "num_heads"):
            parser.add_argument(*names, dest=f.name, type=_none_or(int), help=help_text)
        elif f.name == "export_to":
            parser.add_argument(*names, dest=f.name, type=_export_target, help=help_text)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(*names, dest=f.name, type=kind, help=help_text)
    return parser


_NULLABLE = ("embed_dim", "depth", "num_heads", "use_fp16", "export_to")


def _coerce(name: str, value: Any, default: Any) -> Any:
    if name == "export_to" and isinstance(value, str) and value.lower() in ("none", "null"):
        value = None  # as on the command line (YAML reads `none` as a string)
    if value is None:
        if name in _NULLABLE:
            return None
        raise ConfigError(
            f"option {name}: no value (YAML null or an empty entry); give one or remove the "
            f"line for the default ({default})"
        )
    try:
        if isinstance(default, bool) or name == "use_fp16":
            return bool_flag(str(value)) if not isinstance(value, bool) else value
        if isinstance(value, bool):  # YAML's true/false for a number or a string
            raise ValueError("a boolean where a number or a string is expected")
        if isinstance(value, list | dict) and not isinstance(default, tuple):
            raise ValueError(f"a {type(value).__name__} where a single value is expected")
        if isinstance(default, tuple):
            low, high = value
            return (float(low), float(high))
        if isinstance(default, float):
            return float(value)
        if isinstance(default, int) or name in ("embed_dim", "depth", "num_heads"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")
            return int(value)
        return str(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"option {name}: invalid value {value!r} ({err})") from err


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the
    last one silently, so ``epochs: 300`` further up would be ignored without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`, merged by the parent
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if not isinstance(key, str):
                continue  # load_yaml reports keys that are no option names
            if key.replace("-", "_") in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"option {key!r} is given twice", key_node.start_mark
                )
            seen.add(key.replace("-", "_"))
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping of option names (dashes or underscores) to values.

    Raises:
        ConfigError: Missing file, invalid YAML, not a mapping, or an unknown option.
    """
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err.reason})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {path}: unknown option {key!r}")
        out[name] = value
    return out


def parse_config(argv: list[str] | None = None) -> PretrainConfig:
    """Defaults, then ``--config`` YAML, then command-line flags; validated.

    Raises:
        ConfigError: Invalid values or configuration file.
        SystemExit: argparse errors and ``--help`` (argparse's own behaviour).
    """
    namespace = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    if "config" in namespace:
        values.update(load_yaml(namespace.pop("config").expanduser()))
    values.update(namespace)
    defaults = PretrainConfig()
    coerced = {k: _coerce(k, v, getattr(defaults, k)) for k, v in values.items()}
    for name in _PATHS:
        if isinstance(coerced.get(name), str):
            coerced[name] = os.path.expanduser(coerced[name])
    config = dataclasses.replace(defaults, **coerced)
    config.validate()
    return config


def save_config(config: PretrainConfig, path: Path) -> None:
    """Write the merged configuration as YAML, atomically (a crash or a full disk leaves the
    previous file, never half of one)."""
    path = Path(path)
    tmp = new_temp_file(path.parent, f".{path.name}.", ".tmp")
    try:
        with tmp.open("w") as handle:
            handle.write(yaml.safe_dump(config.to_dict(), sort_keys=False))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
