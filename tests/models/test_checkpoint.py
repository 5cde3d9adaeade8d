from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import CheckpointError, first_line, infer_config, load_backbone
from models.vit import VisionTransformer, ViTConfig, vit_config


def _head_state(dim: int) -> dict[str, torch.Tensor]:
    """Keys of the official DINOHead (out_dim kept small)."""
    return {
        "mlp.0.weight": torch.randn(16, dim),
        "mlp.0.bias": torch.zeros(16),
        "mlp.2.weight": torch.randn(16, 16),
        "mlp.2.bias": torch.zeros(16),
        "mlp.4.weight": torch.randn(8, 16),
        "mlp.4.bias": torch.zeros(8),
        "last_layer.weight_g": torch.ones(32, 1),
        "last_layer.weight_v": torch.randn(32, 8),
    }


def _full_checkpoint(student: VisionTransformer, teacher: VisionTransformer) -> dict[str, object]:
    """The official full-checkpoint layout (main_dino.py save_dict)."""
    dim = student.embed_dim
    return {
        "student": {
            **{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
            **{f"module.head.{k}": v for k, v in _head_state(dim).items()},
        },
        "teacher": {
            **{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
            **{f"head.{k}": v for k, v in _head_state(dim).items()},
        },
        "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(1e-3), "params": [0]}]},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536),
        "dino_loss": {"center": torch.zeros(1, 32)},
    }


def test_official_backbone_only_file_loads_strictly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = VisionTransformer(vit_config("vit_small", 16))
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(model.state_dict(), path)
    loaded = load_backbone(path)
    assert loaded.config == vit_config("vit_small", 16)
    assert not loaded.model.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert len(loaded.sha256) == 64


def test_official_full_checkpoint_teacher_default_and_student_key(
    tmp_path: Path, tiny_vit_config: ViTConfig
) -> None:
    torch.manual_seed(1)
    student, teacher = VisionTransformer(tiny_vit_config), VisionTransformer(tiny_vit_config)
    path = tmp_path / "checkpoint.pth"
    torch.save(_full_checkpoint(student, teacher), path)
    by_teacher = load_backbone(path, num_heads=2)
    by_student = load_backbone(path, checkpoint_key="student", num_heads=2)
    assert torch.equal(by_teacher.model.pos_embed, teacher.pos_embed)
    assert torch.equal(by_student.model.pos_embed, student.pos_embed)
    assert "teacher" in by_teacher.source


def test_our_checkpoint_restores_config_from_vit_config(tmp_path: Path) -> None:
    config = ViTConfig(patch_size=4, embed_dim=48, depth=3, num_heads=3, img_size=32, arch="custom")
    model = VisionTransformer(config)
    path = tmp_path / "ours.pth"
    ckpt = _full_checkpoint(model, model)
    ckpt["vit_config"] = config.to_dict()
    torch.save(ckpt, path)
    assert load_backbone(path).config == config


def test_missing_teacher_key_is_named(tmp_path: Path, tiny_vit: VisionTransformer) -> None:
    path = tmp_path / "student_only.pth"
    torch.save({"student": tiny_vit.state_dict()}, path)
    with pytest.raises(CheckpointError, match="no 'teacher' entry"):
        load_backbone(path, num_heads=2)


def test_mismatching_file_names_keys_and_shapes(
    tmp_path: Path, tiny_vit: VisionTransformer
) -> None:
    sd = dict(tiny_vit.state_dict())
    del sd["norm.weight"]
    sd["blocks.0.attn.extra"] = torch.zeros(3)
    sd["blocks.1.mlp.fc2.bias"] = torch.zeros(5)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_backbone(path, num_heads=2)
    message = str(info.value)
    assert "missing keys ['norm.weight']" in message
    assert "unexpected keys ['blocks.0.attn.extra']" in message
    assert "blocks.1.mlp.fc2.bias: file (5,) vs model (32,)" in message


def test_truncated_file_is_reported(tmp_path: Path, tiny_vit: VisionTransformer) -> None:
    path = tmp_path / "cut.pth"
    torch.save(tiny_vit.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_backbone(path, num_heads=2)


def test_a_file_cut_before_its_zip_directory_gets_torchs_reason_in_whole_sentences(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cut.pth"
    torch.save({"weight": torch.zeros(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_backbone(path)
    # torch's fact in whole sentences: the advice after them ran past 200 characters and was
    # cut mid-sentence ("... that your checkpoint file is)")
    message = str(info.value)
    assert "failed finding central directory." in message
    assert message.endswith("This is an internal miniz error.)")


def test_a_long_reason_keeps_whole_sentences_or_ends_in_an_ellipsis() -> None:
    facts = "The archive lacks its central directory. " + "It was cut short while written. " * 2
    advice = facts + "then advice " * 30
    assert first_line(RuntimeError(advice)) == f"RuntimeError: {facts.strip()}"
    words = "word " * 60  # no sentence end: cut at a word
    cut = first_line(ValueError(words))
    assert cut.endswith("word...") and len(cut) <= len("ValueError: ") + 200
    assert first_line(OSError("x" * 300)) == "OSError: " + "x" * 197 + "..."
    assert first_line(KeyError()) == "KeyError"  # no message
    # a short first sentence or word is no place to stop: the path after it stays
    path = "/data/" + "d" * 300
    assert first_line(RuntimeError(f"Error. {path}")) == f"RuntimeError: Error. {path[:190]}..."
    assert first_line(OSError(f"Failed: {path}")) == f"OSError: Failed: {path[:189]}..."
    assert first_line(RuntimeError("\x1b[31m\n  short\x1b[0m\nnext")) == "RuntimeError: short"


class _Untrusted:
    """A pickled object that a weights-only load must refuse."""

    def __init__(self) -> None:
        self.value = 1


def test_unsafe_pickle_needs_trust(tmp_path: Path, tiny_vit: VisionTransformer) -> None:
    path = tmp_path / "needs_trust.pth"
    torch.save({"teacher": tiny_vit.state_dict(), "extra": _Untrusted()}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_backbone(path, num_heads=2)
    assert load_backbone(path, num_heads=2, trust=True).config.embed_dim == 32


def test_missing_file_and_non_vit(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone(tmp_path / "nope.pth")
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a ViT backbone"):
        load_backbone(path)


def test_infer_config_checks(tiny_vit: VisionTransformer) -> None:
    sd = tiny_vit.state_dict()
    with pytest.raises(CheckpointError, match="cannot infer num_heads"):
        infer_config(sd)
    with pytest.raises(CheckpointError, match="--patch-size 16 contradicts"):
        infer_config(sd, patch_size=16, num_heads=2)
    with pytest.raises(CheckpointError, match="expects embed_dim 384"):
        infer_config(sd, arch="vit_small")
    config = infer_config(sd, num_heads=2)
    assert (config.patch_size, config.embed_dim, config.depth, config.img_size) == (8, 32, 2, 32)


def test_numpy1_era_pickle_names_load(tmp_path: Path, tiny_vit: VisionTransformer) -> None:
    """Official checkpoints were pickled with numpy 1.x: ``numpy.core.multiarray.scalar``."""
    import zipfile

    path = tmp_path / "old.pth"
    torch.save(_full_checkpoint(tiny_vit, tiny_vit), path)
    old = tmp_path / "old_numpy.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(info, data)
    loaded = load_backbone(old, num_heads=2)
    assert torch.equal(loaded.model.cls_token, tiny_vit.cls_token)


@pytest.mark.parametrize("data", [b"hello", b"not a checkpoint", b"PK\x03\x04broken zip"])
def test_garbage_is_reported_as_corrupt_not_as_needing_trust(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_backbone(path)
    assert "--trust-checkpoint" not in str(info.value)


def test_nested_model_entry_loads(tmp_path: Path, tiny_vit: VisionTransformer) -> None:
    path = tmp_path / "nested.pth"
    torch.save({"model": tiny_vit.state_dict()}, path)
    assert torch.equal(load_backbone(path, num_heads=2).model.cls_token, tiny_vit.cls_token)


class _RunsCode:
    """Unpickling this calls a function: what a malicious checkpoint does."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("touch /nonexistent-dir/pwned",))


def test_a_pickle_that_would_run_code_is_refused_and_named(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"teacher": {}, "x": _RunsCode()}, path)
    with pytest.raises(CheckpointError) as info:
        load_backbone(path)
    message = str(info.value)
    assert "needs the Python object" in message and "system" in message
    assert "--trust-checkpoint" in message and "corrupt" not in message
    assert "\n" not in message and "\x1b" not in message  # torch's page of advice is not pasted


def test_garbage_names_the_pickle_operation_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as info:
        load_backbone(path)
    assert "unknown pickle operation 110" in str(info.value)  # b"n"
    assert "\n" not in str(info.value) and "weights_only` set" not in str(info.value)


def test_the_stored_head_count_beats_the_arch_family_default() -> None:
    # A vit_tiny-sized run trained with --num_heads 6: heads do not show in the weights, and
    # --arch vit_tiny (3 heads) must not silently rebuild it with the family's count.
    with torch.device("meta"):
        model = VisionTransformer(vit_config("vit_tiny", 16, num_heads=6, img_size=32))
    sd = model.state_dict()
    stored = {"num_heads": 6}
    assert infer_config(sd, arch="vit_tiny", stored=stored).num_heads == 6
    assert infer_config(sd, arch="vit_tiny", stored=None).num_heads == 3  # family default
    assert infer_config(sd, arch="vit_tiny", num_heads=6, stored=stored).num_heads == 6
    with pytest.raises(CheckpointError, match=r"vit_config.num_heads 'two' is not a number"):
        infer_config(sd, stored={"num_heads": "two"})


def test_an_empty_position_embedding_is_refused_not_a_math_error() -> None:
    sd = dict(VisionTransformer(vit_config("vit_tiny", 16, depth=1, img_size=32)).state_dict())
    for shape in [(1, 0, 192), (192,), ()]:
        sd["pos_embed"] = torch.zeros(shape)
        with pytest.raises(CheckpointError, match=r"pos_embed has shape \("):
            infer_config(sd)


def test_a_num_heads_that_contradicts_the_recorded_count_is_refused() -> None:
    # An explicit --num-heads 4 rebuilt a model recorded with 2 heads as another model (the
    # export then recorded 4 heads); it must agree with the file, and stays needed where the
    # file records nothing.
    with torch.device("meta"):
        sd = VisionTransformer(vit_config("vit_tiny", 8, embed_dim=32, depth=2, num_heads=2,
                                          img_size=32)).state_dict()  # fmt: skip
    with pytest.raises(CheckpointError) as info:
        infer_config(sd, num_heads=4, stored={"num_heads": 2})
    assert str(info.value) == (
        "--num-heads 4 contradicts the checkpoint, which records 2 heads "
        "(vit_config.num_heads): drop --num-heads"
    )
    assert infer_config(sd, num_heads=2, stored={"num_heads": "2"}).num_heads == 2
    assert infer_config(sd, num_heads=4, stored={"embed_dim": 32}).num_heads == 4


@pytest.mark.parametrize("trust", [False, True])
def test_an_unreadable_file_is_said_to_be_unreadable_not_corrupt(
    tmp_path: Path, tiny_vit: VisionTransformer, monkeypatch: pytest.MonkeyPatch, trust: bool
) -> None:
    path = tmp_path / "locked.pth"
    torch.save(tiny_vit.state_dict(), path)

    real_open = open

    def denied(file: object, *args: object, **kwargs: object) -> object:
        if Path(str(file)) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    # root reads any file: the open fails here as it would for another user
    monkeypatch.setattr("builtins.open", denied)
    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(CheckpointError) as info:
        load_backbone(path, num_heads=2, trust=trust)
    assert str(info.value) == f"cannot read {path}: permission denied"


def test_an_unreadable_file_and_a_folder_are_named_as_such(
    tmp_path: Path, tiny_vit: VisionTransformer
) -> None:
    with pytest.raises(CheckpointError, match="it is a directory, not a checkpoint file"):
        load_backbone(tmp_path)
    if os.geteuid() == 0:  # root reads any file
        return
    path = tmp_path / "locked.pth"
    torch.save(tiny_vit.state_dict(), path)
    path.chmod(0)
    with pytest.raises(CheckpointError, match="permission denied$") as info:
        load_backbone(path, num_heads=2)
    assert "corrupt" not in str(info.value)


def test_block_indices_must_run_from_zero_without_gaps_and_are_checked_before_building(
    tiny_vit: VisionTransformer,
) -> None:
    stray = dict(tiny_vit.state_dict())
    stray["blocks.100000.norm1.weight"] = torch.ones(32)  # would build a 100001-block model
    with pytest.raises(
        CheckpointError, match=r"not numbered 0\.\.2: 3 block indices, up to 100000"
    ):
        infer_config(stray, num_heads=2)
    gap = {k: v for k, v in tiny_vit.state_dict().items() if not k.startswith("blocks.0.")}
    with pytest.raises(CheckpointError, match=r"not numbered 0\.\.0: 1 block indices, up to 1"):
        infer_config(gap, num_heads=2)


def test_a_long_list_of_key_problems_is_cut_short(
    tmp_path: Path, tiny_vit: VisionTransformer
) -> None:
    sd = dict(tiny_vit.state_dict())
    for i in range(40):
        sd[f"extra.{i:02d}"] = torch.zeros(1)
    path = tmp_path / "many.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \[.*\] \(and 30 more\)") as info:
        load_backbone(path, num_heads=2)
    assert "extra.09" in str(info.value) and "extra.10" not in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "blocks.0.mlp.fc1.weight",
            torch.tensor(1.0),
            r"fc1.weight has shape \(\): not \[hidden, 32\]",
        ),
        ("blocks.0.mlp.fc1.weight", torch.zeros(64, 31), r"fc1.weight has shape \(64, 31\)"),
        ("pos_embed", torch.zeros(1, 17, 0), "no embedding width"),
    ],
)
def test_malformed_shapes_are_named_not_a_traceback(
    tiny_vit: VisionTransformer, key: str, value: torch.Tensor, message: str
) -> None:
    sd = dict(tiny_vit.state_dict())
    sd[key] = value
    with pytest.raises(CheckpointError, match=message):
        infer_config(sd, num_heads=2)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.zeros(32, dtype=torch.int64), "'norm.bias' is a int64 tensor"),
        (torch.zeros(32, dtype=torch.bool), "'norm.bias' is a bool tensor"),
        (torch.zeros(32, dtype=torch.complex64), "'norm.bias' is a complex64 tensor"),
        (torch.zeros(32).to_sparse(), "'norm.bias' is a sparse tensor"),
        (torch.zeros(32, device="meta"), "'norm.bias' is a meta tensor"),
    ],
)
@pytest.mark.filterwarnings("error")  # one line: not even a warning from torch
def test_weights_that_are_not_dense_floats_are_refused(
    tmp_path: Path, tiny_vit: VisionTransformer, value: torch.Tensor, message: str
) -> None:
    sd = dict(tiny_vit.state_dict())
    sd["norm.bias"] = value
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=message):
        load_backbone(path, num_heads=2)


def test_layer_norm_eps_follows_the_reference_or_the_recorded_value(
    tiny_vit_config: ViTConfig,
) -> None:
    with_bias = VisionTransformer(tiny_vit_config).state_dict()
    bare = VisionTransformer(dataclasses.replace(tiny_vit_config, qkv_bias=False)).state_dict()
    assert infer_config(with_bias, num_heads=2).norm_eps == 1e-6  # the reference's factories
    assert infer_config(bare, num_heads=2).norm_eps == 1e-5  # its bare class (pitfall 6.3)
    assert infer_config(bare, num_heads=2, stored={"norm_eps": 1e-6}).norm_eps == 1e-6
    for stored, message in [
        ({"norm_eps": None}, "norm_eps None is not a number"),
        ({"norm_eps": [1e-6]}, r"norm_eps \[1e-06\] is not a number"),
        ({"norm_eps": -1.0}, "norm_eps -1.0 is not positive"),
        ({"norm_eps": "nan"}, "norm_eps 'nan' is not positive"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            infer_config(with_bias, num_heads=2, stored=stored)


def test_a_bare_class_backbone_loads_with_its_layer_norm_eps(
    tmp_path: Path, tiny_vit_config: ViTConfig
) -> None:
    torch.manual_seed(0)
    config = dataclasses.replace(tiny_vit_config, qkv_bias=False, norm_eps=1e-5)
    model = VisionTransformer(config).eval()
    path = tmp_path / "bare.pth"
    torch.save(model.state_dict(), path)
    loaded = load_backbone(path, num_heads=config.num_heads)
    norms = [m for m in loaded.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and {m.eps for m in norms} == {1e-5}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
