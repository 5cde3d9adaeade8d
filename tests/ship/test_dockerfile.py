"""The Dockerfile: hadolint-clean, and the promises of its two targets, read from the file."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.ship.dockerfile import Stage, ancestry, exec_form
from tests.ship.tools import REPO, run_tool


def _extras() -> dict[str, list[str]]:
    with (REPO / "pyproject.toml").open("rb") as handle:
        extras: dict[str, list[str]] = tomllib.load(handle)["project"]["optional-dependencies"]
    return extras


def _env(stage: Stage) -> dict[str, str]:
    values: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for pair in instruction.args.split():
            key, _, value = pair.partition("=")
            values[key] = value
    return values


def _pip_installs(chain: list[Stage]) -> list[str]:
    return [
        command.strip()
        for stage in chain
        for run in stage.all("RUN")
        for command in run.args.split("&&")
        if re.search(r"\bpip install\b", command)
    ]


def test_hadolint_is_clean(hadolint: str) -> None:
    result = run_tool([hadolint, "--config", ".hadolint.yaml", "--no-color", "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_config_still_reports_problems(hadolint: str, tmp_path: Path) -> None:
    """The config silences only what it justifies: an info-level finding alone fails."""
    config = str(REPO / ".hadolint.yaml")
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM ubuntu:latest\n"
        "RUN pip install requests\n"
        "USER root\n"
        "HEALTHCHECK CMD curl -f http://localhost:8000/readyz || exit 1\n"
        "CMD python -m service\n"
    )
    result = run_tool([hadolint, "--config", config, "--no-color", str(bad)])
    assert result.returncode != 0
    for code in ("DL3007", "DL3013", "DL3042", "DL3002", "DL3025"):
        assert code in result.stdout, result.stdout

    info_only = tmp_path / "Dockerfile.info"
    info_only.write_text(
        'FROM python:3.12.11-slim-bookworm\nRUN true\nRUN true\nUSER 10001\nCMD ["python"]\n'
    )
    result = run_tool([hadolint, "--config", config, "--no-color", str(info_only)])
    assert "DL3059" in result.stdout  # "multiple consecutive RUN", an info-level rule
    assert result.returncode != 0


def test_every_ignored_rule_is_justified() -> None:
    text = (REPO / ".hadolint.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["failure-threshold"] == "style"
    lines = text.splitlines()
    for code in config.get("ignored", []):
        (index,) = [i for i, line in enumerate(lines) if re.fullmatch(rf"\s*-\s*{code}\s*", line)]
        comment: list[str] = []
        for line in reversed(lines[:index]):
            if not line.strip().startswith("#"):
                break
            comment.append(line.strip("# "))
        justification = " ".join(reversed(comment))
        assert code in justification, f"{code} is ignored without a comment naming it"
        assert len(justification.split()) >= 20, f"{code}: the justification is too thin"


def test_both_targets_exist(stages: dict[str, Stage]) -> None:
    assert {"serve", "train"} <= stages.keys()


def test_serve_target_never_installs_torch(stages: dict[str, Stage]) -> None:
    chain = ancestry(stages, "serve")
    for stage in chain:
        for instruction in stage.instructions:
            if instruction.keyword in ("RUN", "COPY", "ADD"):
                text = instruction.args.lower()
                assert "torch" not in text, f"line {instruction.line}: {instruction.args}"
                assert "training" not in text, f"line {instruction.line}: {instruction.args}"
    installs = _pip_installs(chain)
    assert installs, "the serve target installs nothing"
    for command in installs:
        # Either the requirements generated from the serve extra, or the project without deps.
        assert "--no-deps ." in command or "requirements-serve" in command, command
    extraction = " ".join(run.args for stage in chain for run in stage.all("RUN"))
    assert "['optional-dependencies']['serve']" in extraction
    assert "'train'" not in extraction and "'dev'" not in extraction
    serve_pins = _extras()["serve"]
    assert not [r for r in serve_pins if re.match(r"(torch|torchvision|onnx)\b", r)]
    assert any(r.startswith("onnxruntime-gpu==") for r in serve_pins)


def test_train_target_installs_the_train_extra(stages: dict[str, Stage]) -> None:
    chain = ancestry(stages, "train")
    extraction = " ".join(run.args for stage in chain for run in stage.all("RUN"))
    assert "['optional-dependencies']['train']" in extraction
    train_pins = _extras()["train"]
    assert "torch==2.14.1" in train_pins
    assert "torchvision==0.29.1" in train_pins
    copied = " ".join(copy.args for stage in chain for copy in stage.all("COPY"))
    for package in ("models/", "training/"):
        assert package in copied
    assert stages["train"].all("ENTRYPOINT") == []  # generic: `python -m ...` as the command
    cmd = stages["train"].last("CMD")
    assert cmd is not None and exec_form(cmd.args) == [
        "python",
        "-m",
        "training.pretrain",
        "--help",
    ]


def test_train_target_can_compile_the_step(stages: dict[str, Stage]) -> None:
    """``--compile true`` needs a C++ compiler at run time (inductor's C++, Triton's launcher)."""
    installed = " ".join(run.args for run in stages["train"].all("RUN"))
    assert re.search(r"apt-get install [^&]*\bg\+\+=", installed), installed


def test_base_images_are_pinned(stages: dict[str, Stage]) -> None:
    external = [stage.base for stage in stages.values() if stage.base not in stages]
    assert external
    for image in external:
        assert re.search(r":\d+\.\d+\.\d+", image), f"{image} is not pinned to a version"
        assert "latest" not in image
    assert re.fullmatch(
        r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", stages["serve"].base
    ), "serve must run on a CUDA 13 / cuDNN 9 runtime so the CUDA provider binds"


@pytest.mark.parametrize("target", ["serve", "train"])
def test_targets_run_as_a_numeric_non_root_user(stages: dict[str, Stage], target: str) -> None:
    user = stages[target].last("USER")
    assert user is not None, f"{target} runs as root"
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) != 0, user.args
    assert not gid or (gid.isdigit() and int(gid) != 0), user.args
    last_instruction = max(i.line for i in stages[target].instructions if i.keyword == "RUN")
    assert user.line > last_instruction, "USER must come after the last RUN"


def test_serve_healthcheck_is_exec_form_on_readyz(stages: dict[str, Stage]) -> None:
    (healthcheck,) = stages["serve"].all("HEALTHCHECK")
    options, _, command = healthcheck.args.partition("CMD ")
    argv = exec_form(command)
    assert argv is not None, "HEALTHCHECK CMD must be a JSON array (exec form)"
    assert argv[:2] == ["python", "-c"]  # no curl in the image: the stdlib does the request
    assert "/readyz" in argv[2] and "urlopen" in argv[2]
    flags = dict(re.findall(r"--([a-z-]+)=(\S+)", options))
    assert {"interval", "timeout", "start-period", "retries"} <= flags.keys()


def test_serve_runtime_contract(stages: dict[str, Stage], monkeypatch: pytest.MonkeyPatch) -> None:
    serve = stages["serve"]
    assert [e.args for e in serve.all("EXPOSE")] == ["8000"]
    cmd = serve.last("CMD")
    assert cmd is not None and exec_form(cmd.args) == ["python", "-m", "service"]
    env = _env(serve)
    expected = {"DINO_HOST": "0.0.0.0", "DINO_PORT": "8000", "DINO_MODEL_REPOSITORY": "/models"}
    assert {key: env.get(key) for key in expected} == expected
    assert any(
        copy.args.split()[-1].rstrip("/") == "/models" and "model_repository" in copy.args
        for copy in serve.all("COPY")
    ), "the bundled model repository must be copied to /models"

    # The service reads exactly these variables.
    from service.settings import Settings

    for key, value in expected.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert (settings.host, settings.port, str(settings.model_repository)) == (
        "0.0.0.0",
        8000,
        "/models",
    )


def test_dockerignore_admits_exactly_what_is_copied(stages: dict[str, Stage]) -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "the context is an allow-list"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = {
        source.rstrip("/").removeprefix("./")
        for stage in stages.values()
        for copy in stage.all("COPY")
        if "--from=" not in copy.args
        for source in copy.args.split()[:-1]
        if not source.startswith("--")
    }
    assert sources <= admitted, f"copied but ignored: {sources - admitted}"
    for private in (".git", ".venv", "tests", "artifacts", "runs", ".env"):
        assert private not in admitted


def test_copied_sources_exist_including_the_bundled_model(stages: dict[str, Stage]) -> None:
    sources = {
        source.rstrip("/")
        for stage in stages.values()
        for copy in stage.all("COPY")
        if "--from=" not in copy.args
        for source in copy.args.split()[:-1]
    }
    missing = sorted(s for s in sources if not (REPO / s).exists())
    assert not missing, f"the build would fail: {missing} missing from the repository"
    bundled = sorted((REPO / "model_repository").glob("dino_default/*/model.onnx"))
    assert bundled, "the serve image bundles model_repository/dino_default/<version>/model.onnx"


@pytest.mark.parametrize("target", ["serve", "train"])
def test_dependencies_install_before_anything_that_changes_often(
    stages: dict[str, Stage], target: str
) -> None:
    """Only pyproject.toml and constraints.txt precede the dependency layer: editing the code
    or the README reuses the cached torch/onnxruntime layer."""
    for stage in ancestry(stages, target):
        order = [i for i in stage.instructions if i.keyword in ("COPY", "RUN")]
        installs = [n for n, i in enumerate(order) if "requirements-" in i.args]
        if not installs:
            continue
        before = [i.args for i in order[: installs[0]] if i.keyword == "COPY"]
        assert before == ["pyproject.toml constraints.txt ./"], before
        after = " ".join(i.args for i in order[installs[0] :] if i.keyword == "COPY")
        assert "README.md" in after and "models/" in after
