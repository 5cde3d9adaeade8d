from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models import contract


def test_contract_imports_only_the_standard_library() -> None:
    code = (
        "import sys; import models.contract; "
        "bad = [m for m in ('torch', 'numpy', 'onnx', 'onnxruntime', 'PIL') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_output_order_and_dynamic_axes_follow_specs() -> None:
    assert contract.OUTPUT_NAMES == ("cls_embedding", "patch_features", "attention_maps")
    for spec in (*contract.INPUTS, *contract.OUTPUTS):
        table = {**contract.DYNAMIC_INPUT_AXES, **contract.DYNAMIC_OUTPUT_AXES}[spec.name]
        assert all(spec.axes[i] == name for i, name in table.items())
    assert contract.PIXEL_VALUES.dynamic_axes() == {0: "batch", 2: "height", 3: "width"}


def test_reference_images_are_deterministic() -> None:
    a = contract.reference_image_rgb(0)
    assert a == contract.reference_image_rgb(0)
    width, height, data = a
    assert (width, height) == contract.REFERENCE_CASES[0]
    assert len(data) == width * height * 3
    assert contract.reference_image_rgb(1)[2] != data


def test_recipe_json_round_trip_and_errors() -> None:
    recipe = contract.PreprocessingRecipe.for_resolution(224)
    assert recipe.resize_size == 256
    assert contract.PreprocessingRecipe.from_json(recipe.to_json()) == recipe
    with pytest.raises(ValueError, match="invalid preprocessing recipe"):
        contract.PreprocessingRecipe.from_json('{"resolution": 224}')


def test_reference_metadata_validation() -> None:
    text = contract.reference_metadata(
        resolution=32, cls_embeddings=[[0.5], [1.0]], precision="float32"
    )
    data = contract.parse_reference_metadata(text)
    assert data["cases"][1]["cls_embedding"] == [1.0]
    with pytest.raises(ValueError, match="invalid reference"):
        contract.parse_reference_metadata('{"cases": [{"cls_embedding": [NaN]}]}')


def test_model_versions_only_count_complete_numeric_dirs(tmp_path: Path) -> None:
    root = tmp_path / "m"
    for version, complete in ((1, True), (2, False), (10, True)):
        (root / str(version)).mkdir(parents=True)
        if complete:
            (root / str(version) / contract.MODEL_FILENAME).write_bytes(b"x")
    (root / "latest").mkdir()
    assert contract.model_versions(tmp_path, "m") == [1, 10]
    assert contract.model_versions(tmp_path, "absent") == []
    assert contract.model_path(tmp_path, "m", 10) == root / "10" / "model.onnx"


def test_model_versions_count_broken_links_so_their_load_says_why(tmp_path: Path) -> None:
    root = tmp_path / "m"
    for version in (1, 2, 3):
        (root / str(version)).mkdir(parents=True)
    (root / "1" / contract.MODEL_FILENAME).symlink_to(tmp_path / "gone.onnx")  # dangling
    loop = root / "2" / contract.MODEL_FILENAME
    loop.symlink_to(loop)
    (root / "3" / contract.MODEL_FILENAME).symlink_to(root / "3")  # a folder: not a model
    assert contract.model_versions(tmp_path, "m") == [1, 2]


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".", "..", "-x", "dino\n", "1", "007"])
def test_model_names_are_single_safe_components(name: str) -> None:
    with pytest.raises(ValueError, match="invalid model name"):
        contract.validate_model_name(name)


def test_model_versions_ignore_non_ascii_digit_dirs(tmp_path: Path) -> None:
    root = tmp_path / "m"
    for name in ("2", "²", "٣", "0", "7x", "03", "007"):  # "03" would be read from "3/"
        (root / name).mkdir(parents=True)
        (root / name / contract.MODEL_FILENAME).write_bytes(b"x")
    assert contract.model_versions(tmp_path, "m") == [2]  # no ValueError from int("²")


def test_ignored_version_folders_say_why(tmp_path: Path) -> None:
    root = tmp_path / "m"
    names = ["2", "²", "0", "03", "+4", str(contract.MAX_VERSION), str(contract.MAX_VERSION + 1)]
    for name in [*names, "2.old", "latest"]:
        (root / name).mkdir(parents=True)
        (root / name / contract.MODEL_FILENAME).write_bytes(b"x")
    assert contract.model_versions(tmp_path, "m") == [2, contract.MAX_VERSION]
    ignored = contract.ignored_version_folders(tmp_path, "m")
    assert set(ignored) == {"²", "0", "03", "+4", str(contract.MAX_VERSION + 1)}
    assert ignored["03"] == "write the version without leading zeros (3)"
    assert ignored["0"] == "versions start at 1"
    assert "ASCII digits" in ignored["²"] and "ASCII digits" in ignored["+4"]
    assert "at most 9007199254740991" in ignored[str(contract.MAX_VERSION + 1)]
    assert contract.ignored_version_folders(tmp_path, "absent") == {}
    assert contract.version_number("12") == 12 and contract.version_number("012") is None


def test_model_versions_count_version_dirs_that_cannot_be_looked_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another user's umask-077 export: is_file() raises PermissionError (Python 3.11/3.12).
    # The version counts, so whoever loads it reports "permission denied" instead of the scan
    # failing; an unreadable model folder is an OSError for the caller to report.
    root = tmp_path / "m"
    for version in (1, 2):
        (root / str(version)).mkdir(parents=True)
        (root / str(version) / contract.MODEL_FILENAME).write_bytes(b"x")
    (root / "3").mkdir()
    real_is_file = Path.is_file

    def is_file(path: Path) -> bool:
        if path.parent.name == "2":
            raise PermissionError(13, "Permission denied", str(path))
        return real_is_file(path)

    monkeypatch.setattr(Path, "is_file", is_file)
    assert contract.model_versions(tmp_path, "m") == [1, 2]

    def iterdir(path: Path) -> object:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(PermissionError):
        contract.model_versions(tmp_path, "m")
