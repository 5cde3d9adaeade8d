"""Settings from DINO_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, misspelt_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DINO_"):
            monkeypatch.delenv(name)
    settings = Settings()
    assert settings.model_repository == Path("model_repository")
    assert settings.model_name == "dino_default"
    assert settings.device == "auto" and settings.api_keys == ()
    assert settings.version_policy == "latest"
    assert settings.max_batch_attention_bytes == 1024**3
    assert settings.max_body_bytes_in_flight == 4 * settings.max_body_bytes
    assert settings.body_timeout_s == 60 and settings.keep_alive_s == 5
    assert settings.cpu_memory_arena is False
    assert settings.decode_processes == 0  # decoding in threads unless asked
    assert settings.decode_timeout_s == 30 and settings.decode_time_limit() == 30


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DINO_API_KEYS", " k1 ,k2,, ")
    monkeypatch.setenv("DINO_WARMUP_BATCH_SIZES", "1,8")
    monkeypatch.setenv("DINO_DEVICE", "cpu")
    monkeypatch.setenv("DINO_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("DINO_DECODE_PROCESSES", "12")
    monkeypatch.setenv("DINO_DECODE_TIMEOUT_S", "0")
    settings = Settings()
    assert settings.decode_processes == 12
    assert settings.decode_timeout_s == 0 and settings.decode_time_limit() is None
    assert settings.api_keys == ("k1", "k2")
    assert settings.warmup_batch_sizes == (1, 8)
    assert settings.device == "cpu" and settings.max_batch_size == 7


@pytest.mark.parametrize(
    "env",
    [
        {"DINO_DEVICE": "tpu"},
        {"DINO_VERSION_POLICY": "pinned"},
        {"DINO_MODEL_NAME": "../etc"},
        {"DINO_MAX_IMAGES_PER_REQUEST": "300", "DINO_MAX_QUEUE_IMAGES": "10"},
        {"DINO_WARMUP_BATCH_SIZES": "0"},
        {"DINO_API_KEYS": "good,s\u00e9cret"},
        {"DINO_API_KEYS": "two words"},
        {"DINO_API_KEYS": 'quote"d'},
        {"DINO_MAX_BODY_BYTES": "100000", "DINO_MAX_BODY_BYTES_IN_FLIGHT": "50000"},
        {"DINO_BODY_TIMEOUT_S": "0"},
        {"DINO_INFERENCE_PIPELINE_DEPTH": "-1"},
        {"DINO_INFERENCE_PIPELINE_DEPTH": "9"},
        {"DINO_DECODE_PROCESSES": "-1"},
        {"DINO_DECODE_PROCESSES": "513"},
        {"DINO_DECODE_TIMEOUT_S": "-1"},
        {"DINO_DECODE_TIMEOUT_S": "inf"},
        {"DINO_DECODE_TIMEOUT_S": "86401"},
        {"DINO_LOG_LEVEL": "verbose"},
        {"DINO_LOG_LEVEL": "trace"},  # uvicorn's, but not Python logging's
    ],
)
def test_invalid_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    monkeypatch.delenv("DINO_MODEL_VERSION", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize("value", [",", " , ", "   ", ",,,"])
def test_api_keys_of_only_commas_or_spaces_fail_closed(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("DINO_API_KEYS", value)
    with pytest.raises(ValidationError, match="holds no key"):
        Settings()
    monkeypatch.setenv("DINO_API_KEYS", "")  # empty: authentication off, as documented
    assert Settings().api_keys == ()
    monkeypatch.setenv("DINO_API_KEYS", " k1 ,, k2 ,")  # empty entries among keys are dropped
    assert Settings().api_keys == ("k1", "k2")


def test_api_key_error_names_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DINO_API_KEYS", "ok-key_1.2~3+/==,n\u00f6pe")
    with pytest.raises(ValidationError, match="key 2 is not a valid bearer token"):
        Settings()
    monkeypatch.setenv("DINO_API_KEYS", "ok-key_1.2~3+/==")
    assert Settings().api_keys == ("ok-key_1.2~3+/==",)


def test_log_level_is_normalised_and_a_bad_one_exits_2(monkeypatch, capsys) -> None:
    monkeypatch.setenv("DINO_LOG_LEVEL", " WARNING ")
    assert Settings().log_level == "warning"
    monkeypatch.setenv("DINO_LOG_LEVEL", "verbose")
    from service.__main__ import main

    assert main([]) == 2  # before any model is loaded or port bound
    err = capsys.readouterr().err
    assert "DINO_LOG_LEVEL='verbose' is not a log level" in err and "Traceback" not in err


def test_a_misspelt_setting_is_named_not_silently_ignored(monkeypatch, capsys) -> None:
    environ = {
        "DINO_MAX_BATCHSIZE": "8",
        "dino_log_levl": "debug",
        "DINO_CPUS": "2",  # compose's own variable: resembles no setting
        "DINO_MAX_BATCH_SIZE": "8",
        "PATH": "/bin",
    }
    assert misspelt_settings(environ) == [
        "DINO_MAX_BATCHSIZE is not a setting (did you mean DINO_MAX_BATCH_SIZE?); it is ignored",
        "dino_log_levl is not a setting (did you mean DINO_LOG_LEVEL?); it is ignored",
    ]
    monkeypatch.setenv("DINO_MAX_QUEUE_DELAY", "5")
    monkeypatch.setenv("DINO_LOG_LEVEL", "verbose")  # stops main before anything starts
    from service.__main__ import main

    assert main([]) == 2
    err = capsys.readouterr().err
    hint = "warning: DINO_MAX_QUEUE_DELAY is not a setting (did you mean DINO_MAX_QUEUE_DELAY_MS?)"
    assert hint in err


def test_help_describes_the_settings_and_starts_nothing(capsys) -> None:
    from service.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "DINO_MODEL_REPOSITORY" in out and "DINO_PORT" in out


def test_every_setting_is_in_both_configuration_tables() -> None:
    root = Path(__file__).resolve().parents[2]
    for doc in ("README.md", "docs/api.md"):
        text = (root / doc).read_text()
        rows = {
            line.split("|")[1].strip().strip("`")
            for line in text.splitlines()
            if line.startswith("| `DINO_")
        }
        fields = {f"DINO_{name.upper()}" for name in Settings.model_fields}
        assert fields <= rows, (doc, sorted(fields - rows))
        row_text = {
            line.split("|")[1].strip().strip("`"): line
            for line in text.splitlines()
            if line.startswith("| `DINO_")
        }
        for name, field in Settings.model_fields.items():
            # A lower bound beyond the obvious (non-negative, positive) must be in the table.
            for bound in field.metadata:
                minimum = getattr(bound, "ge", None)
                if minimum is not None and minimum > 1:
                    assert f"at least `{minimum}`" in row_text[f"DINO_{name.upper()}"], (doc, name)
