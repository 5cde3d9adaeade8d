"""Load ViT backbones from every checkpoint format DINO users have.

Supported layouts:

* official backbone-only files (``dino_deitsmall16_pretrain.pth``): a plain teacher state dict;
* official full training checkpoints: ``{"student": {"module.backbone.*", "module.head.*"},
  "teacher": {"backbone.*", "head.*"}, "optimizer", "args", ...}``;
* this project's checkpoints (the same full layout plus ``vit_config``).

Files are read with ``torch.load(weights_only=True)``. Official full checkpoints pickle an
``argparse.Namespace`` and numpy scalars; those few types are allow-listed. Anything else needs
``trust=True``, which a user should only pass for files from a source they trust.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.vit import (
    ARCH_ALIASES,
    ARCHITECTURES,
    VisionTransformer,
    ViTConfig,
    arch_name,
    infer_num_heads,
)

_PREFIXES = ("module.", "backbone.")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


class CheckpointError(Exception):
    """A checkpoint file cannot be read or does not match the architecture."""


@dataclass
class LoadedBackbone:
    """A backbone loaded from a file.

    Attributes:
        model: The ViT in eval mode on the CPU.
        config: Its architecture.
        sha256: Hex digest of the source file.
        source: Human-readable description of where the weights came from.
    """

    model: VisionTransformer
    config: ViTConfig
    sha256: str
    source: str


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_globals() -> list[Any]:
    """Types the official full checkpoints pickle besides tensors."""
    allowed: list[Any] = [argparse.Namespace, np.dtype, np.ndarray]
    for name in ("float64", "float32", "int64", "int32", "bool_"):
        scalar_type = getattr(np, name)
        allowed.append(scalar_type)
        allowed.append(type(np.dtype(scalar_type)))
    try:
        from numpy._core.multiarray import _reconstruct, scalar

        # Checkpoints written with numpy 1.x name these numpy.core.multiarray.*.
        allowed.extend([scalar, _reconstruct])
        allowed.append((scalar, "numpy.core.multiarray.scalar"))
        allowed.append((_reconstruct, "numpy.core.multiarray._reconstruct"))
    except ImportError:  # pragma: no cover - older numpy
        pass
    return allowed


def read_checkpoint(path: Path, *, trust: bool = False) -> Any:
    """Read a ``.pth`` file safely.

    Args:
        path: File to read.
        trust: Allow arbitrary pickled objects (``weights_only=False``). Only for trusted files.

    Raises:
        CheckpointError: The file is missing, cannot be read (permissions: said as such),
            is truncated/corrupt, or needs ``trust``.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"cannot read {path}: it is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:  # a file that cannot be opened (permissions) is not a corrupt one
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as err:
        raise CheckpointError(cannot_read(path, err)) from err
    if trust:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any failure means an unreadable file
            raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    try:
        with torch.serialization.safe_globals(_safe_globals()), warnings.catch_warnings():
            # torch warns that it checks a sparse tensor; such a file is refused right after
            warnings.filterwarnings("ignore", "Validating sparse tensor invariants")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch's unpickler raises KeyError, EOFError, ...
        refused = weights_only_refusal(err)
        if refused:
            raise CheckpointError(
                f"{path} {refused}. Loading it would run code from the file. "
                "If you trust its source, pass --trust-checkpoint (trust=True)."
            ) from err
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is not a torch.save file, or it is "
            f"truncated or corrupt ({load_failure(err)})"
        ) from err


def cannot_read(path: Path, err: OSError) -> str:
    """``cannot read PATH: permission denied``: an operating-system error on one line."""
    reason = err.strerror or type(err).__name__
    return f"cannot read {path}: {reason[:1].lower()}{reason[1:]}"


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(err: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, without terminal colour codes.

    A line longer than ``limit`` characters ends with the last whole sentence that fits (torch
    follows its fact with advice), or else is cut at a word, or else at ``limit``, with an
    ellipsis; a cut never keeps less than half of ``limit`` (a long path stays).
    """
    lines = [line.strip() for line in _ANSI_ESCAPE.sub("", str(err)).splitlines()]
    text = next((line for line in lines if line), "")
    if len(text) > limit:
        least = limit // 2
        end = text.rfind(". ", least - 1, limit)
        if end >= least - 1:
            text = text[: end + 1]
        else:
            cut = text.rfind(" ", least, limit - 2)
            text = text[: cut if cut >= least else limit - 3].rstrip() + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def weights_only_refusal(err: BaseException) -> str | None:
    """Why ``torch.load(weights_only=True)`` refused a file, as a clause; ``None`` when ``err``
    is another failure (a truncated or corrupt file).

    torch's own message is a page of advice that ends in the fact that matters (which Python
    object the file needs); this keeps that fact.
    """
    text = _ANSI_ESCAPE.sub("", str(err))
    if not isinstance(err, pickle.UnpicklingError) or "Weights only load failed" not in text:
        return None
    needed = re.search(r"GLOBAL ([\w.]+)", text)
    if needed:
        return (
            f"needs the Python object {needed.group(1)}, which a safe load "
            "(torch.load weights_only=True) refuses"
        )
    if re.search(r"Unsupported operand", text):
        return None  # random bytes and a plain pickle alike: not a torch.save file
    return "holds Python objects that a safe load (torch.load weights_only=True) refuses"


def load_failure(err: BaseException) -> str:
    """One line on why ``torch.load`` could not read a file that it did not refuse for its
    Python objects (see :func:`weights_only_refusal`)."""
    operand = re.search(r"Unsupported operand (\d+)", _ANSI_ESCAPE.sub("", str(err)))
    if operand:
        return f"{type(err).__name__}: unknown pickle operation {operand.group(1)}"
    return first_line(err)


def extract_backbone_state_dict(
    checkpoint: Any, *, checkpoint_key: str = "teacher"
) -> dict[str, Tensor]:
    """The backbone weights of a checkpoint, with official key names.

    Takes ``checkpoint[checkpoint_key]`` when present, strips every ``module.`` and
    ``backbone.`` prefix and drops the DINO head (``head.*``), as the reference
    ``load_pretrained_weights`` does.

    Raises:
        CheckpointError: The object holds no state dict, or ``checkpoint_key`` is missing from
            a full checkpoint.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"expected a state dict, got {type(checkpoint).__name__}")
    state: Any = checkpoint
    if checkpoint_key in checkpoint:
        state = checkpoint[checkpoint_key]
    elif "student" in checkpoint or "teacher" in checkpoint:
        keys = sorted(k for k in ("student", "teacher") if k in checkpoint)
        raise CheckpointError(f"checkpoint has no {checkpoint_key!r} entry; it has {keys}")
    else:
        nested = [k for k in ("state_dict", "model") if isinstance(checkpoint.get(k), Mapping)]
        if nested:
            state = checkpoint[nested[0]]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"entry {checkpoint_key!r} is not a state dict")
    result: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        name = str(key)
        for prefix in _PREFIXES:
            name = name.replace(prefix, "")
        if name.startswith("head.") or name.startswith("fc."):
            continue
        problem = _tensor_problem(value)
        if problem is not None:
            raise CheckpointError(
                f"{key!r} is {problem}; the weights must be dense floating-point tensors"
            )
        result[name] = value
    if not result:
        raise CheckpointError("the checkpoint holds no tensors")
    return result


def _tensor_problem(value: Tensor) -> str | None:
    """What makes ``value`` unusable as a weight, or None."""
    if value.is_meta:
        return "a meta tensor (it holds no data)"
    if value.layout != torch.strided:
        return f"a sparse tensor ({value.layout})"
    if not value.is_floating_point():
        return f"a {str(value.dtype).removeprefix('torch.')} tensor"
    return None


def infer_config(
    state_dict: Mapping[str, Tensor],
    *,
    arch: str = "auto",
    patch_size: int | None = None,
    num_heads: int | None = None,
    stored: Mapping[str, Any] | None = None,
) -> ViTConfig:
    """Architecture of a backbone state dict.

    ``embed_dim``, depth, patch size, MLP ratio, qkv bias and the training image size are read
    from the weights; ``num_heads`` comes from the stored config (an argument must agree with
    it), else the argument, the named arch, or ``embed_dim / 64``.

    Raises:
        CheckpointError: Required tensors are missing, or the values (or ``num_heads`` and the
            stored config) contradict each other.
    """
    for key in ("pos_embed", "patch_embed.proj.weight", "cls_token"):
        if key not in state_dict:
            raise CheckpointError(
                f"not a ViT backbone: key {key!r} missing (found {sorted(state_dict)[:8]}...)"
            )
    pos_embed = state_dict["pos_embed"]
    proj = state_dict["patch_embed.proj.weight"]
    if pos_embed.dim() != 3 or pos_embed.shape[1] < 2:
        raise CheckpointError(
            f"pos_embed has shape {tuple(pos_embed.shape)}: not [1, 1 + patches, embed_dim]"
        )
    if proj.dim() != 4:
        raise CheckpointError(
            f"patch_embed.proj.weight has shape {tuple(proj.shape)}: not a 2-D convolution's "
            "[embed_dim, channels, patch, patch]"
        )
    embed_dim = int(pos_embed.shape[-1])
    weight_patch = int(proj.shape[-1])
    if patch_size is not None and patch_size != weight_patch:
        raise CheckpointError(
            f"--patch-size {patch_size} contradicts the weights (patch_embed kernel {weight_patch})"
        )
    if embed_dim < 1:
        raise CheckpointError(f"pos_embed has shape {tuple(pos_embed.shape)}: no embedding width")
    depth = _block_count(state_dict)
    num_patches = int(pos_embed.shape[1]) - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise CheckpointError(f"pos_embed holds {num_patches} patch entries, not a square grid")
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None and (fc1.dim() != 2 or fc1.shape[0] < 1 or fc1.shape[1] != embed_dim):
        raise CheckpointError(
            f"blocks.0.mlp.fc1.weight has shape {tuple(fc1.shape)}: not [hidden, {embed_dim}]"
        )
    mlp_ratio = float(fc1.shape[0]) / embed_dim if fc1 is not None else 4.0
    qkv_bias = "blocks.0.attn.qkv.bias" in state_dict
    name = ARCH_ALIASES.get(arch, arch)
    if name != "auto":
        if name not in ARCHITECTURES:
            raise CheckpointError(f"unknown arch {arch!r}; choose auto or {sorted(ARCHITECTURES)}")
        want_dim, want_depth, want_heads = ARCHITECTURES[name]
        if (want_dim, want_depth) != (embed_dim, depth):
            raise CheckpointError(
                f"--arch {arch} expects embed_dim {want_dim} and depth {want_depth}, but the "
                f"weights have embed_dim {embed_dim} and depth {depth}"
            )
    # Heads do not show in the weights: what the checkpoint recorded (its training may have
    # overridden the --arch family's count), which an explicit --num-heads must agree with,
    # else --num-heads, else --arch.
    if stored is not None and "num_heads" in stored:
        try:
            recorded = int(stored["num_heads"])
        except (TypeError, ValueError):
            raise CheckpointError(
                f"the checkpoint's vit_config.num_heads {stored['num_heads']!r} is not a number"
            ) from None
        if num_heads is not None and num_heads != recorded:
            raise CheckpointError(
                f"--num-heads {num_heads} contradicts the checkpoint, which records "
                f"{recorded} heads (vit_config.num_heads): drop --num-heads"
            )
        num_heads = recorded
    if num_heads is None and name != "auto":
        num_heads = want_heads
    if num_heads is None:
        try:
            num_heads = infer_num_heads(embed_dim)
        except ValueError as err:
            raise CheckpointError(str(err)) from err
    try:
        return ViTConfig(
            patch_size=weight_patch,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            img_size=side * weight_patch,
            in_chans=int(proj.shape[1]),
            norm_eps=_norm_eps(stored, qkv_bias=qkv_bias),
            arch=arch_name(embed_dim, depth, num_heads),
        )
    except ValueError as err:
        raise CheckpointError(f"inconsistent architecture: {err}") from err


def _block_count(state_dict: Mapping[str, Tensor]) -> int:
    """The number of transformer blocks: their indices must be exactly ``0 .. depth - 1``.

    Checked before any model is built: a stray ``blocks.2000.*`` key would otherwise build a
    2001-block model (gigabytes) only to report the missing keys.
    """
    indices = {int(m.group(1)) for k in state_dict if (m := _BLOCK_RE.match(k))}
    if not indices:
        raise CheckpointError("not a ViT backbone: no blocks.* keys")
    depth = len(indices)
    if max(indices) != depth - 1:  # distinct indices from 0: only 0..depth-1 has this maximum
        stray = sorted(i for i in indices if i >= depth)
        shown = ", ".join(map(str, stray[:5])) + (", ..." if len(stray) > 5 else "")
        raise CheckpointError(
            f"the blocks are not numbered 0..{depth - 1}: {depth} block indices, up to "
            f"{max(indices)} (beyond {depth - 1}: {shown})"
        )
    return depth


def _norm_eps(stored: Mapping[str, Any] | None, *, qkv_bias: bool) -> float:
    """LayerNorm epsilon: the one a checkpoint of ours records, else the reference's.

    The reference's factories (every released model) build qkv with a bias and eps 1e-6; a
    backbone without the qkv bias can only come from its bare ``VisionTransformer`` class,
    whose LayerNorm keeps PyTorch's eps 1e-5 (reference pitfall 6.3).
    """
    if stored is not None and "norm_eps" in stored:
        value = stored["norm_eps"]
        try:
            eps = float(value)
        except (TypeError, ValueError):
            raise CheckpointError(
                f"the checkpoint's vit_config.norm_eps {value!r} is not a number"
            ) from None
        if not (math.isfinite(eps) and eps > 0):
            raise CheckpointError(f"the checkpoint's vit_config.norm_eps {value!r} is not positive")
        return eps
    return 1e-6 if qkv_bias else 1e-5


def load_state_dict_strict(model: VisionTransformer, state_dict: Mapping[str, Tensor]) -> None:
    """``load_state_dict(strict=True)`` with an error naming every missing/unexpected/bad key.

    Raises:
        CheckpointError: The keys or shapes do not match the model.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listed(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {_listed(mismatched)}")
        raise CheckpointError("weights do not match the architecture: " + "; ".join(parts))
    model.load_state_dict(dict(state_dict), strict=True)


def _listed(items: list[str], shown: int = 10) -> str:
    """The first ``shown`` items, and how many more there are."""
    text = str(items[:shown])
    return text if len(items) <= shown else f"{text} (and {len(items) - shown} more)"


def load_backbone(
    path: Path,
    *,
    checkpoint_key: str = "teacher",
    arch: str = "auto",
    patch_size: int | None = None,
    num_heads: int | None = None,
    trust: bool = False,
) -> LoadedBackbone:
    """Build a ViT and load a checkpoint into it strictly.

    Args:
        path: A backbone-only file, an official full checkpoint or one of ours.
        checkpoint_key: Which network of a full checkpoint (``teacher`` or ``student``).
        arch: ``auto`` (infer from the weights) or a factory name that must match them.
        patch_size: Optional check of the patch size.
        num_heads: Head count when the file records none (``embed_dim / 64`` otherwise); it
            must agree with the count the file records.
        trust: Allow unsafe unpickling (only for trusted files).

    Raises:
        CheckpointError: With a message naming the problem.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, trust=trust)
    state_dict = extract_backbone_state_dict(checkpoint, checkpoint_key=checkpoint_key)
    stored = checkpoint.get("vit_config") if isinstance(checkpoint, Mapping) else None
    config = infer_config(
        state_dict,
        arch=arch,
        patch_size=patch_size,
        num_heads=num_heads,
        stored=stored if isinstance(stored, Mapping) else None,
    )
    model = VisionTransformer(config)
    load_state_dict_strict(model, {k: v.float() for k, v in state_dict.items()})
    model.eval()
    key_note = f" [{checkpoint_key}]" if checkpoint_key in checkpoint else ""
    return LoadedBackbone(
        model=model, config=config, sha256=file_sha256(path), source=f"{path.name}{key_note}"
    )
