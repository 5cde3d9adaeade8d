"""Command line and YAML configuration."""

from __future__ import annotations

import os
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
        (["--data_path", "x", "--export-to", "repo/m1/1"], "digits only name a version folder"),
        (["--data_path", "x", "--export-to", "repo/m1/"], "ends with a slash"),
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


# The original README's two ViT-S/16 commands (dino-reference.md, section 3): the shipped
# configs that name them must be exactly those flags on top of main_dino.py's defaults.
_README_COMMANDS = {
    "vit_small_imagenet.yaml": ["--arch", "vit_small"],
    "vit_small_boosted.yaml": [
        "--arch",
        "vit_small",
        "--epochs",
        "300",
        "--teacher_temp",
        "0.07",
        "--warmup_teacher_temp_epochs",
        "30",
        "--norm_last_layer",
        "false",
    ],
}


@pytest.mark.parametrize("name", sorted(_README_COMMANDS))
def test_reference_recipe_configs_are_the_readme_commands(name):
    import dataclasses

    path = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / name
    from_file = parse_config(["--config", str(path), "--data_path", "x", "--output_dir", "o"])
    from_flags = parse_config([*_README_COMMANDS[name], "--data_path", "x", "--output_dir", "o"])
    assert dataclasses.asdict(from_file) == dataclasses.asdict(from_flags)


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


@pytest.mark.parametrize(
    "yaml_text",
    ["epochs:\n", "epochs: ~\n", "lr: null\n", "output_dir:\n", "seed: null\n", "resume: null\n"],
)
def test_yaml_null_values_are_a_clear_error(tmp_path, yaml_text):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match="no value") as info:
        parse_config(["--config", str(path), "--data_path", "x"])
    assert yaml_text.split(":")[0] in str(info.value)


def test_yaml_null_is_allowed_where_it_means_the_default(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("embed_dim: null\nuse_fp16: ~\nexport_to: null\n")
    config = parse_config(["--config", str(path), "--data_path", "x"])
    assert config.embed_dim is None and config.use_fp16 is None and config.export_to is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--seed", str(2**64)], "--seed must be below 2\\*\\*32"),
        (["--warmup_teacher_temp_epochs", "-1"], "--warmup_teacher_temp_epochs must be >= 0"),
        (["--head_hidden_dim", "0"], "--head_hidden_dim must be positive"),
        (["--head_bottleneck_dim", "-1"], "--head_bottleneck_dim must be positive"),
        (["--max_epochs_this_run", "-1"], "--max_epochs_this_run must be >= 0"),
        (["--export_every", "2"], "--export_every needs --export_to"),
        (["--export_to", "model_repository/"], "ends with a slash"),
        (["--export_to", "repo/.."], "names a folder"),
        (["--stop_timeout", "0"], "--stop_timeout must be in \\(0, 86400\\]"),
        (["--stop_timeout", "-1"], "--stop_timeout must be in"),
        (["--stop_timeout", "nan"], "--stop_timeout must be in"),
        (["--stop_timeout", "inf"], "--stop_timeout must be in"),
        (["--stop_timeout", "1e12"], "--stop_timeout must be in"),
    ],
)
def test_out_of_range_options_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["--data_path", "x", *flags])


def test_saved_config_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(parse_config(["--data_path", "x", "--epochs", "30"]), path)
    before = path.read_text()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(yaml, "safe_dump", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_config(parse_config(["--data_path", "x", "--epochs", "40"]), path)
    assert path.read_text() == before  # the previous file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left
    assert parse_config(["--config", str(path)]).epochs == 30


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 300\nlr: 0.001\nepochs: 1\n")
    with pytest.raises(ConfigError, match="option 'epochs' is given twice"):
        parse_config(["--config", str(path), "--data_path", "x"])
    path.write_text("export_every: 1\nexport-every: 2\n")  # the same option, two spellings
    with pytest.raises(ConfigError, match="given twice"):
        parse_config(["--config", str(path), "--data_path", "x"])


def test_a_config_file_that_is_not_text_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00e")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        parse_config(["--config", str(path), "--data_path", "x"])


def test_yaml_merge_keys_still_work(tmp_path):
    """`<<: *base` is no duplicate: a file may merge a mapping and override one of its keys."""
    path = tmp_path / "c.yaml"
    path.write_text("<<: {epochs: 50, lr: 0.1}\nlr: 0.2\n")
    config = parse_config(["--config", str(path), "--data_path", "x"])
    assert (config.epochs, config.lr) == (50, 0.2)


def test_paths_in_a_config_file_expand_the_home_folder(tmp_path, monkeypatch):
    # A shell expands ~ on the command line, not in a YAML file: without this, ~/runs/x
    # would train into a folder literally named "~" under the current one.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "c.yaml"
    path.write_text("data_path: ~/images\noutput_dir: ~/runs/x\nexport_to: ~/repo/m\n")
    config = parse_config(["--config", str(path)])
    home = tmp_path / "home"
    assert config.data_path == str(home / "images")
    assert config.output_dir == str(home / "runs" / "x")
    assert config.export_to == str(home / "repo" / "m")
    assert parse_config(["--data_path", "x", "--output_dir=~/y"]).output_dir == str(home / "y")


def test_an_empty_export_target_is_refused_and_none_turns_it_off(tmp_path, capsys):
    # An unset shell variable ($MODEL) must not skip the export without a word.
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--data_path", "x", "--export-to", ""])
    assert exit_info.value.code == 2
    assert "an empty value; give repository/NAME" in capsys.readouterr().err
    path = tmp_path / "c.yaml"
    path.write_text("export_to: repo/m\n")
    assert parse_config(["--config", str(path), "--data_path", "x"]).export_to == "repo/m"
    off = parse_config(["--config", str(path), "--data_path", "x", "--export_to", "none"])
    assert off.export_to is None
    path.write_text("export_to: none\n")  # the same spelling in a file: no folder "./none"
    assert parse_config(["--config", str(path), "--data_path", "x"]).export_to is None


def test_an_output_dir_that_is_not_utf8_is_refused():
    """A name in another encoding (sys.argv holds it with surrogates) that TensorBoard cannot
    write under; a UTF-8 name outside ASCII is fine."""
    undecodable = os.fsdecode(b"runs/out\xff")
    with pytest.raises(ConfigError, match=r"--output_dir b'runs/out\\xff' is not a valid UTF-8"):
        parse_config(["--data_path", "x", "--output_dir", undecodable])
    assert parse_config(["--data_path", "x", "--output_dir", "runs/ütf"]).output_dir == "runs/ütf"
