"""Command line and YAML configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.config import ConfigError, parse_config, save_config


def test_reference_flags_and_defaults():
    config = parse_config(
        [
            "--arch",
            "deit_small",
            "--patch_size",
            "8",
            "--out_dim",
            "4096",
            "--norm_last_layer",
            "false",
            "--momentum_teacher",
            "0.9995",
            "--use_bn_in_head",
            "False",
            "--warmup_teacher_temp",
            "0.04",
            "--teacher_temp",
            "0.07",
            "--warmup_teacher_temp_epochs",
            "30",
            "--use_fp16",
            "true",
            "--weight_decay",
            "0.04",
            "--weight_decay_end",
            "0.4",
            "--clip_grad",
            "0",
            "--batch_size_per_gpu",
            "32",
            "--epochs",
            "300",
            "--freeze_last_layer",
            "1",
            "--lr",
            "0.0005",
            "--warmup_epochs",
            "10",
            "--min_lr",
            "1e-6",
            "--optimizer",
            "lars",
            "--drop_path_rate",
            "0.1",
            "--global_crops_scale",
            "0.25",
            "1.0",
            "--local_crops_number",
            "10",
            "--local_crops_scale",
            "0.05",
            "0.25",
            "--data_path",
            "/data",
            "--output_dir",
            "/out",
            "--saveckp_freq",
            "5",
            "--seed",
            "3",
            "--num_workers",
            "4",
            "--dist_url",
            "env://",
        ]
    )
    assert config.norm_last_layer is False and config.use_fp16 is True
    assert config.resolved_precision == "fp16"
    assert config.global_crops_scale == (0.25, 1.0)
    assert config.local_crops_number == 10 and config.optimizer == "lars"
    default = parse_config(["--data_path", "x"])
    assert (default.out_dim, default.epochs, default.warmup_teacher_temp_epochs) == (65536, 100, 0)
    assert default.resolved_precision == "auto"


def test_yaml_then_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"epochs": 17, "lr": 0.001, "data-path": "/d", "out_dim": 128}))
    config = parse_config(["--config", str(path), "--epochs", "19"])
    assert (config.epochs, config.lr, config.data_path, config.out_dim) == (19, 0.001, "/d", 128)
    save_config(config, tmp_path / "merged.yaml")
    assert yaml.safe_load((tmp_path / "merged.yaml").read_text())["epochs"] == 19


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--data_path", "x", "--precision", "fp8"], "precision"),
        (["--data_path", "x", "--global_crops_size", "30"], "multiple"),
        (["--data_path", "x", "--global_crops_scale", "0.5", "0.2"], "global_crops_scale"),
        (["--epochs", "30"], "data_path"),
        (["--data_path", "x", "--lr", "-1"], "--lr must be a positive"),
        (["--data_path", "x", "--teacher_temp", "0"], "--teacher_temp must be a positive"),
        (["--data_path", "x", "--momentum_teacher", "1.5"], "momentum_teacher"),
        (["--data_path", "x", "--drop_path_rate", "2"], "drop_path_rate"),
        (["--data_path", "x", "--clip_grad", "-1"], "clip_grad"),
        (["--data_path", "x", "--weight_decay_end", "nan"], "weight_decay_end"),
        (["--data_path", "x", "--export-to", "repo/bad name!"], "invalid model name"),
    ],
)
def test_invalid_values(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("data_path: x\nepochs: true\n", "boolean"),
        ("data_path: [x]\n", "single value"),
        ("data_path: x\nlr: {a: 1}\n", "single value"),
    ],
)
def test_yaml_values_of_the_wrong_kind(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        parse_config(["--config", str(path)])


def test_bad_yaml_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match="unknown option"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[2] / "configs" / "pretrain").glob("*.yaml"))
)
def test_shipped_configs_parse(path):
    config = parse_config(["--config", str(path), "--data_path", "x"])
    assert config.global_crops_size % config.patch_size == 0


def _doc_default(value: object) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, tuple):
        return "`" + " ".join(str(v) for v in value) + "`"
    return f"`{value}`"


def test_docs_option_table_matches_the_config():
    """docs/training.md lists every option with the code's default and help text."""
    import dataclasses

    from training.config import PretrainConfig

    expected = []
    for f in dataclasses.fields(PretrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name == "use_fp16":
            default = None
        expected.append(f"| `--{f.name}` | {_doc_default(default)} | {f.metadata['help']} |")
    doc = (Path(__file__).parents[2] / "docs" / "training.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `--")]
    rows = rows[: len(expected)]
    assert rows == expected
