from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import contract, export, files
from models.export import ExportError, export_model, export_to_repository, read_metadata
from models.vit import VisionTransformer, ViTConfig, vit_config
from tests.conftest import TINY_MODEL_NAME


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, x: torch.Tensor) -> list[np.ndarray]:
    return session.run(list(contract.OUTPUT_NAMES), {contract.PIXEL_VALUES.name: x.numpy()})


def test_graph_follows_contract(tiny_model_repository: Path) -> None:
    path = contract.model_path(tiny_model_repository, TINY_MODEL_NAME, 1)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    inputs = [i.name for i in proto.graph.input]
    assert inputs == [contract.PIXEL_VALUES.name]
    assert [o.name for o in proto.graph.output] == list(contract.OUTPUT_NAMES)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    # The sizes that follow from the model are fixed in the signature, the rest named as the
    # contract names them (the exporter alone left e.g. "Castcls_embedding_dim_1").
    signature = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in proto.graph.output
    }
    embed_dim, heads = 32, 2  # the tiny test model
    assert signature == {
        "cls_embedding": ["batch", embed_dim],
        "patch_features": ["batch", "num_patches", embed_dim],
        "attention_maps": ["batch", heads, "num_patches"],
    }
    session = _session(path)
    assert [o.shape for o in session.get_outputs()] == list(signature.values())


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize(("height", "width"), [(32, 32), (48, 40), (24, 64)])
def test_onnx_matches_pytorch(
    tiny_model_repository: Path, batch: int, height: int, width: int
) -> None:
    from tests.conftest import make_tiny_vit

    model = make_tiny_vit()
    session = _session(contract.model_path(tiny_model_repository, TINY_MODEL_NAME, 1))
    x = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        expected = model.forward_features(x)
    for got, exp, tol in zip(_run(session, x), expected, (1e-4, 1e-4, 1e-6), strict=True):
        assert got.shape == tuple(exp.shape)
        np.testing.assert_allclose(got, exp.numpy(), rtol=0, atol=tol)


def test_metadata_round_trips(tiny_model_repository: Path) -> None:
    from tests.conftest import make_tiny_vit

    meta = read_metadata(contract.model_path(tiny_model_repository, TINY_MODEL_NAME, 1))
    assert set(contract.MetadataKey.REQUIRED) <= set(meta)
    key = contract.MetadataKey
    assert meta[key.CONTRACT_VERSION] == contract.CONTRACT_VERSION
    assert (meta[key.PATCH_SIZE], meta[key.EMBED_DIM], meta[key.NUM_HEADS]) == ("8", "32", "2")
    assert (meta[key.DEPTH], meta[key.RESOLUTION], meta[key.PRECISION]) == ("2", "32", "float32")
    assert json.loads(meta[key.IMAGE_MEAN]) == list(contract.IMAGE_MEAN)
    recipe = contract.PreprocessingRecipe.from_json(meta[key.PREPROCESSING])
    assert recipe == contract.PreprocessingRecipe.for_resolution(32)
    reference = contract.parse_reference_metadata(meta[key.REFERENCE])
    model = make_tiny_vit()
    assert len(reference["cases"]) == len(contract.REFERENCE_CASES)
    for case in reference["cases"]:
        with torch.no_grad():
            cls = model(export.reference_pixels(recipe, case["case"]))[0].numpy()
        np.testing.assert_allclose(case[contract.CLS_EMBEDDING.name], cls, atol=1e-6)


def test_reference_pixels_follow_the_dino_eval_transform() -> None:
    recipe = contract.PreprocessingRecipe.for_resolution(224)
    assert recipe.resize_size == 256
    pixels = export.reference_pixels(recipe, 0)
    assert pixels.shape == (1, 3, 224, 224)
    # normalised values: the synthetic image spans the full 0..255 range
    assert pixels.min() < -1.5 and pixels.max() > 2.0


def test_repository_versions_increase_and_are_atomic(
    tmp_path: Path, tiny_vit: VisionTransformer
) -> None:
    common = {"resolution": 32, "weights_sha256": "a" * 64, "source": "test"}
    first = export_to_repository(tiny_vit, tmp_path, "m", **common)
    second = export_to_repository(tiny_vit, tmp_path, "m", **common)
    assert first.path == tmp_path / "m" / "1" / "model.onnx"
    assert second.path == tmp_path / "m" / "2" / "model.onnx"
    assert contract.model_versions(tmp_path, "m") == [1, 2]
    leftovers = [p.name for p in (tmp_path / "m").rglob("*") if p.name.startswith(".export")]
    assert leftovers == []


def test_next_version_skips_numbers_the_service_ignores(tmp_path: Path) -> None:
    root = tmp_path / "m"
    (root / "07").mkdir(parents=True)  # meant as 7: never reused
    (root / str(contract.MAX_VERSION + 5)).mkdir()  # beyond what the service reads
    assert export.next_version_dir(tmp_path, "m") == root / "8"
    (root / str(contract.MAX_VERSION)).mkdir()
    with pytest.raises(ExportError, match="no free version number"):
        export.next_version_dir(tmp_path, "m")


def test_version_folders_that_killed_exports_left_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "m"
    owner = files.owner_tag()
    gone = subprocess.Popen(["true"])  # a process id that no process has any more
    gone.wait()
    hour_ago = time.time() - 2 * files.ABANDONED_AFTER_S

    def folder(version: int, *names: str, old: bool = False) -> Path:
        path = root / str(version)
        path.mkdir(parents=True)
        for name in names:
            (path / name).write_bytes(b"partial onnx")
            if old:
                os.utime(path / name, (hour_ago, hour_ago))
        if old:
            os.utime(path, (hour_ago, hour_ago))
        return path

    folder(1, "model.onnx")
    folder(2, f".export.{owner}.{gone.pid}.0a1b2c3d4e5f.onnx.tmp")  # its process is gone
    folder(3, f".export.{owner}.{os.getpid()}.0a1b2c3d4e5f.onnx.tmp")  # being written
    folder(4, ".export.otherhost-1.12.0a1b2c3d4e5f.onnx.tmp")  # another host's, fresh
    folder(5, ".export.otherhost-1.12.0a1b2c3d4e5f.onnx.tmp", old=True)  # unwritten for hours
    folder(6, ".export-0a1b2c3d4e5f.onnx.tmp", old=True)  # an older version's name, old
    folder(7)  # empty, fresh: an export may just have created it
    folder(8, old=True)  # empty for hours
    folder(9, "model.onnx", f".export.{owner}.{gone.pid}.0a1b2c3d4e5f.onnx.tmp")  # a version
    folder(10, f".export.{owner}.{gone.pid}.0a1b2c3d4e5f.onnx.tmp", "notes.txt")  # someone's
    (root / "\u00b2").mkdir()  # a digit, but not a version number: not looked at
    said: list[str] = []
    assert export.next_version_dir(tmp_path, "m", said.append) == root / "11"
    kept = {p.name for p in root.iterdir()}
    assert kept == {"1", "3", "4", "7", "9", "10", "11", "\u00b2"}
    assert said == [
        f"removed the version folder(s) 2, 5, 6, 8 that interrupted exports left in {root}"
    ]
    assert export.remove_abandoned_versions(root) == []


def test_failed_parity_publishes_nothing(
    tmp_path: Path, tiny_vit: VisionTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(export.FP32_MAX_ABS, contract.CLS_EMBEDDING.name, 0.0)
    with pytest.raises(ExportError, match="parity check failed: cls_embedding"):
        export_to_repository(
            tiny_vit, tmp_path, "m", resolution=32, weights_sha256="a" * 64, source="t"
        )
    assert contract.model_versions(tmp_path, "m") == []
    assert list((tmp_path / "m").iterdir()) == []


def test_fp16_export_reports_drift(tmp_path: Path, tiny_vit: VisionTransformer) -> None:
    report = export_model(
        tiny_vit,
        tmp_path / "half.onnx",
        resolution=32,
        precision="float16",
        weights_sha256="a" * 64,
        source="t",
    )
    assert read_metadata(report.path)[contract.MetadataKey.PRECISION] == "float16"
    cosines = [row["cls_embedding_min_cosine"] for row in report.parity]
    assert len(cosines) == 4 and min(cosines) > 0.999
    assert max(row["cls_embedding_max_abs"] for row in report.parity) > 0  # really half


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_leaves_the_callers_model_as_it_was(
    tmp_path: Path, tiny_vit: VisionTransformer, dtype: torch.dtype
) -> None:
    """A model exported mid-training keeps its mode and precision (and its weights)."""
    model = tiny_vit.to(dtype).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = export_model(
        model, tmp_path / "m.onnx", resolution=32, weights_sha256="a" * 64, source="t"
    )
    assert report.path.is_file()
    assert model.training and all(m.training for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {dtype}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert read_metadata(report.path)[contract.MetadataKey.PRECISION] == "float32"


def test_resolution_must_be_patch_multiple(tmp_path: Path, tiny_vit: VisionTransformer) -> None:
    with pytest.raises(ExportError, match="not a multiple"):
        export_model(tiny_vit, tmp_path / "x.onnx", resolution=30, weights_sha256="", source="")


def test_vit_small_onnx_matches_pytorch_at_224_and_320x256(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = VisionTransformer(vit_config("vit_small", 16)).eval()
    report = export_model(
        model, tmp_path / "s16.onnx", resolution=224, weights_sha256="b" * 64, source="t"
    )
    sizes = {(row["height"], row["width"]) for row in report.parity}
    assert sizes == {(224, 224), (320, 256)}
    for row in report.parity:
        assert row["cls_embedding_max_abs"] <= 1e-4
        assert row["patch_features_max_abs"] <= 1e-4
        assert row["attention_maps_max_abs"] <= 1e-6


def test_cli_exports_checkpoint_into_repository(tmp_path: Path, tiny_vit_config: ViTConfig) -> None:
    model = VisionTransformer(tiny_vit_config)
    weights = tmp_path / "ckpt.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, weights)
    repo = tmp_path / "repo"
    argv = ["--weights", str(weights), "--num-heads", "2", "--repository", str(repo)]
    assert export.main([*argv, "--name", "cli"]) == 0
    assert contract.model_versions(repo, "cli") == [1]
    meta = read_metadata(contract.model_path(repo, "cli", 1))
    assert meta[contract.MetadataKey.RESOLUTION] == "32"
    assert "ckpt.pth [teacher]" in meta[contract.MetadataKey.SOURCE]


def test_cli_reports_bad_input_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert export.main(["--weights", str(bad), "--output", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()


def test_exported_files_are_readable_by_other_users(
    tmp_path: Path, tiny_vit: VisionTransformer
) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        report = export_to_repository(
            tiny_vit, tmp_path, "m", resolution=32, weights_sha256="a" * 64, source="t"
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(report.path.stat().st_mode) == 0o644


def test_onnx_matches_the_reference_forward_at_sizes_that_are_not_patch_multiples(
    tiny_model_repository: Path,
) -> None:
    """The reference drops the rows/columns that do not fill a patch; so must the graph."""
    from tests.conftest import make_tiny_vit
    from tests.models import reference_vit as ref

    sd = {k: v.detach() for k, v in make_tiny_vit().state_dict().items()}
    session = _session(contract.model_path(tiny_model_repository, TINY_MODEL_NAME, 1))
    x = torch.randn(2, 3, 45, 38)
    cls, patches, attn = _run(session, x)
    with torch.no_grad():
        want_cls = ref.forward(sd, x, 8, 2)
        want_tokens = ref.get_intermediate_layers(sd, x, 8, 2)
        want_attn = ref.get_last_selfattention(sd, x, 8, 2)
    assert patches.shape == (2, 5 * 4, 32)
    np.testing.assert_allclose(cls, want_cls.numpy(), atol=1e-4)
    np.testing.assert_allclose(patches, want_tokens[:, 1:].numpy(), atol=1e-4)
    np.testing.assert_allclose(attn, want_attn[:, :, 0, 1:].numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "extra",
    [["--resolution", "0"], ["--resolution", "-8"], ["--name", "x"]],
)
def test_cli_rejects_bad_arguments(tmp_path: Path, extra: list[str]) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"unused")
    with pytest.raises(SystemExit) as info:
        export.main(["--weights", str(weights), "--output", str(tmp_path / "x.onnx"), *extra])
    assert info.value.code == 2


def test_cli_unwritable_output_is_an_error_not_a_traceback(
    tmp_path: Path, tiny_vit_config: ViTConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = _weights_file(tmp_path, tiny_vit_config)
    target = tmp_path / "a_directory"
    target.mkdir()
    argv = ["--weights", str(weights), "--num-heads", "2", "--output", str(target)]
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "is a directory" in err and "Traceback" not in err
    # A file where the output's folder should be.
    (tmp_path / "afile").write_text("x")
    argv = [
        "--weights",
        str(weights),
        "--num-heads",
        "2",
        "--output",
        str(tmp_path / "afile/m.onnx"),
    ]
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot create the folder of" in err and "a file is in the way" in err


def test_parity_tolerance_grows_with_the_values(tmp_path: Path) -> None:
    """float32 rounding is relative: a model whose features are in the hundreds exports (its
    absolute error is above 1e-4), and its recorded self-check tolerance scales alike."""
    from tests.conftest import make_tiny_vit

    model = make_tiny_vit()
    with torch.no_grad():
        model.norm.weight.mul_(300.0)
        model.norm.bias.mul_(300.0)
    report = export_to_repository(
        model, tmp_path, "m", resolution=32, weights_sha256="a" * 64, source="t"
    )
    worst = max(row["patch_features_max_abs"] for row in report.parity)
    assert worst > export.FP32_MAX_ABS[contract.PATCH_FEATURES.name]  # the old rule failed it
    reference = json.loads(report.metadata[contract.MetadataKey.REFERENCE])
    largest = max(abs(v) for case in reference["cases"] for v in case["cls_embedding"])
    assert largest > 100
    assert reference["max_abs_error"] == pytest.approx(
        contract.REFERENCE_MAX_ABS_ERROR["float32"] * largest
    )


def test_a_real_parity_failure_still_fails(
    tmp_path: Path, tiny_vit: VisionTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relative rule does not excuse an ONNX graph that computes something else."""
    real = export.check_parity

    def perturbed(session, model, **kwargs):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            model.blocks[0].mlp.fc1.bias.add_(0.5)  # PyTorch now differs from the file
        return real(session, model, **kwargs)

    monkeypatch.setattr(export, "check_parity", perturbed)
    with pytest.raises(ExportError, match="parity check failed"):
        export_to_repository(
            tiny_vit, tmp_path, "m", resolution=32, weights_sha256="a" * 64, source="t"
        )


def test_a_graph_the_onnx_checker_refuses_is_an_export_error(
    tmp_path: Path, tiny_vit: VisionTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(_proto: object) -> None:
        raise onnx.checker.ValidationError("Field 'shape' of 'type' is required\n==> Context: x")

    monkeypatch.setattr(onnx.checker, "check_model", refuse)
    with pytest.raises(ExportError, match="the ONNX checker refused .*Field 'shape'") as info:
        export_to_repository(
            tiny_vit, tmp_path, "m", resolution=32, weights_sha256="a" * 64, source="t"
        )
    assert "\n" not in str(info.value)
    assert contract.model_versions(tmp_path, "m") == []


def test_repository_target_is_checked_before_a_long_job(tmp_path: Path) -> None:
    import os

    root = export.check_repository_target(tmp_path / "repo", "m")
    assert root == tmp_path / "repo" / "m" and root.is_dir() and list(root.iterdir()) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="cannot write model versions into"):
        export.check_repository_target(tmp_path / "afile", "m")
    with pytest.raises(ExportError, match="invalid model name"):
        export.check_repository_target(tmp_path, "a/b")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ExportError, match="Permission denied"):
            export.check_repository_target(locked, "m")


def test_export_never_changes_the_process_umask(
    tmp_path: Path, tiny_vit: VisionTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    def no_umask(_mask: int) -> int:
        raise AssertionError("os.umask called: it changes the mode of other threads' files")

    monkeypatch.setattr(os, "umask", no_umask)
    export_to_repository(
        tiny_vit, tmp_path, "m", resolution=32, weights_sha256="a" * 64, source="t"
    )
    assert contract.model_versions(tmp_path, "m") == [1]


def _weights_file(tmp_path: Path, config: ViTConfig) -> Path:
    """A backbone-only checkpoint of a fresh model (``w.pth``)."""
    path = tmp_path / "w.pth"
    torch.save(VisionTransformer(config).state_dict(), path)
    return path


def _nan_checkpoint(tmp_path: Path, config: ViTConfig) -> Path:
    model = VisionTransformer(config)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("fp16", [False, True])
def test_non_finite_weights_are_refused_not_exported(
    tmp_path: Path, tiny_vit_config: ViTConfig, capsys: pytest.CaptureFixture[str], fp16: bool
) -> None:
    # NaN compares false with any tolerance: without an explicit check the parity test passed
    # and the file was published.
    weights = _nan_checkpoint(tmp_path, tiny_vit_config)
    repo = tmp_path / "repo"
    argv = ["--weights", str(weights), "--num-heads", "2", "--repository", str(repo)]
    assert export.main([*argv, *(["--fp16"] if fp16 else [])]) == 2
    err = capsys.readouterr().err
    assert "is not finite" in err and "Traceback" not in err
    assert contract.model_versions(repo, "dino_default") == []


def test_a_non_finite_onnx_output_fails_the_parity_check(
    tmp_path: Path, tiny_vit: VisionTransformer
) -> None:
    class NanSession:
        def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            with torch.no_grad():
                outputs = tiny_vit.forward_features(torch.from_numpy(feeds["pixel_values"]))
            return [np.full(t.shape, np.nan, np.float32) for t in outputs]

    with pytest.raises(ExportError, match="cls_embedding from ONNX Runtime is not finite"):
        export.check_parity(NanSession(), tiny_vit, resolution=32, precision="float32")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--name", ""], "--name: invalid model name ''"),
        (["--name", "a/b"], "--name: invalid model name"),
    ],
)
def test_cli_refuses_an_empty_or_unsafe_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"unused")
    with pytest.raises(SystemExit) as info:
        export.main(["--weights", str(weights), "--repository", str(tmp_path / "r"), *extra])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_pretrained_refuses_an_explicit_zero_num_heads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        export.main(["--pretrained", "dino_vits16", "--num-heads", "0", "--output", "x.onnx"])
    assert "--pretrained fixes the architecture" in capsys.readouterr().err


def test_cli_repository_in_the_way_is_one_line(
    tmp_path: Path, tiny_vit_config: ViTConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = _weights_file(tmp_path, tiny_vit_config)
    (tmp_path / "afile").write_text("x")
    argv = ["--weights", str(weights), "--num-heads", "2", "--repository", str(tmp_path / "afile")]
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write model versions into") and "Traceback" not in err


def test_an_engine_failure_is_one_line(
    tmp_path: Path,
    tiny_vit_config: ViTConfig,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    weights = _weights_file(tmp_path, tiny_vit_config)

    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 8 GB\nmore")

    monkeypatch.setattr(export, "_trace", out_of_memory)
    argv = ["--weights", str(weights), "--num-heads", "2", "--output", str(tmp_path / "x.onnx")]
    assert export.main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert (
        err[-1]
        == "error: the export failed: DefaultCPUAllocator: can't allocate memory: you tried 8 GB"
    )
    assert not any("Traceback" in line for line in err)
    assert list(tmp_path.glob(".export*")) == []


def test_a_checkpoint_for_other_than_rgb_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, in_chans=1)
    weights = tmp_path / "gray.pth"
    torch.save(VisionTransformer(config).state_dict(), weights)
    argv = ["--weights", str(weights), "--num-heads", "2", "--output", str(tmp_path / "x.onnx")]
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert "takes 1 input channels" in err and "Traceback" not in err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_export_publishes_nothing_and_leaves_no_file(
    tmp_path: Path,
    tiny_vit_config: ViTConfig,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    signum: int,
) -> None:
    weights = _weights_file(tmp_path, tiny_vit_config)
    real = export._trace

    def interrupted(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)  # the temporary file is written, then the signal arrives
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(export, "_trace", interrupted)
    repo = tmp_path / "repo"
    argv = ["--weights", str(weights), "--num-heads", "2", "--repository", str(repo)]
    assert export.main(argv) == 128 + signum
    err = capsys.readouterr().err
    assert "interrupted" in err and "nothing was published" in err and "Traceback" not in err
    assert list((repo / "dino_default").iterdir()) == []  # no version folder, no temp file
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_a_signal_after_the_publication_says_what_was_published(
    tmp_path: Path,
    tiny_vit_config: ViTConfig,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SIGTERM during the final fsync, after the rename: the version is live and stays so; the
    # message must not tell a retrying scheduler that nothing was published.
    weights = _weights_file(tmp_path, tiny_vit_config)
    real = export.fsync_folder

    def late_signal(path: Path) -> None:
        real(path)
        if contract.model_versions(tmp_path / "repo", "m"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(export, "fsync_folder", late_signal)
    argv = ["--weights", str(weights), "--num-heads", "2", "--repository", str(tmp_path / "repo")]
    assert export.main([*argv, "--name", "m"]) == 143
    err = capsys.readouterr().err.splitlines()[-1]
    assert (
        err == f"error: interrupted (SIGTERM); version 1 of {tmp_path / 'repo' / 'm'} was published"
    )
    assert contract.model_versions(tmp_path / "repo", "m") == [1]


def test_an_output_that_is_the_weights_file_is_refused_before_the_work(
    tmp_path: Path, tiny_vit_config: ViTConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    # --output ck.pth replaced the checkpoint with the ONNX file, with exit status 0.
    weights = _weights_file(tmp_path, tiny_vit_config)
    before = weights.read_bytes()
    (tmp_path / "link.onnx").symlink_to(weights)
    for output in (weights, tmp_path / "link.onnx", tmp_path / "." / "w.pth"):
        with pytest.raises(SystemExit) as info:
            export.main(["--weights", str(weights), "--num-heads", "2", "--output", str(output)])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in err
        assert f"--output {output} is the --weights file {weights}: the export would" in err
        assert weights.read_bytes() == before


def test_an_output_link_is_written_through(tmp_path: Path, tiny_vit: VisionTransformer) -> None:
    # The link was replaced by a plain file and its target left as it was (eval_knn's --output
    # writes through links).
    models = tmp_path / "models"
    models.mkdir()
    old = models / "current.onnx"
    old.write_bytes(b"an older model")
    link = tmp_path / "link.onnx"
    link.symlink_to(os.path.join("models", "current.onnx"))  # relative, as ln -s makes them
    report = export_model(tiny_vit, link, resolution=32, weights_sha256="a" * 64, source="t")
    assert link.is_symlink() and os.readlink(link) == os.path.join("models", "current.onnx")
    assert report.path == link and report.size_bytes == old.stat().st_size
    assert read_metadata(old)[contract.MetadataKey.NUM_HEADS] == "2"
    assert sorted(p.name for p in models.iterdir()) == ["current.onnx"]  # no temp file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.onnx", "models"]


def test_a_num_heads_that_contradicts_the_checkpoint_is_refused(
    tmp_path: Path, tiny_vit: VisionTransformer, capsys: pytest.CaptureFixture[str]
) -> None:
    # --num-heads 4 on a 2-head checkpoint exported another model that recorded 4 heads.
    weights = tmp_path / "ck.pth"
    teacher = {f"backbone.{k}": v for k, v in tiny_vit.state_dict().items()}
    torch.save({"teacher": teacher, "vit_config": {"num_heads": 2}}, weights)
    output = tmp_path / "x.onnx"
    argv = ["--weights", str(weights), "--num-heads", "4", "--output", str(output)]
    assert export.main(argv) == 2
    assert capsys.readouterr().err == (
        "error: --num-heads 4 contradicts the checkpoint, which records 2 heads "
        "(vit_config.num_heads): drop --num-heads\n"
    )
    assert not output.exists()


def test_an_unreadable_checkpoint_is_said_to_be_unreadable(
    tmp_path: Path,
    tiny_vit_config: ViTConfig,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It was "not a torch.save file, or it is truncated or corrupt (PermissionError ...)".
    import builtins

    weights = _weights_file(tmp_path, tiny_vit_config)
    real_open = builtins.open

    def denied(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(weights):  # root reads any file: fail as another user's open does
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    monkeypatch.setattr(torch, "load", denied)
    argv = ["--weights", str(weights), "--num-heads", "2", "--output", str(tmp_path / "x.onnx")]
    assert export.main(argv) == 2
    assert capsys.readouterr().err == f"error: cannot read {weights}: permission denied\n"


def test_read_metadata_walks_the_file_instead_of_parsing_the_graph(
    tiny_model_repository: Path, tmp_path: Path
) -> None:
    path = contract.model_path(tiny_model_repository, TINY_MODEL_NAME, 1)
    proto = onnx.load(str(path))
    expected = {entry.key: entry.value for entry in proto.metadata_props}
    assert read_metadata(path) == expected and contract.MetadataKey.WEIGHTS_SHA256 in expected
    # Non-ASCII values, an empty one, and a repeated key (the last one counts, as in onnx).
    proto.metadata_props.add(key="note", value="caf\u00e9 \u2713")
    proto.metadata_props.add(key="empty", value="")
    proto.metadata_props.add(key="note", value="last")
    edited = tmp_path / "edited.onnx"
    onnx.save(proto, str(edited))
    assert read_metadata(edited) == {**expected, "note": "last", "empty": ""}
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="past the end"):
        read_metadata(cut)
    text = tmp_path / "notes.onnx"
    text.write_bytes(b"\x0f" * 64)  # wire type 7: not protobuf
    with pytest.raises(ValueError, match="not an ONNX model"):
        read_metadata(text)
