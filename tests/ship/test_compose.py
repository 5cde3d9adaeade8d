"""docker-compose.yml and its CPU override: valid for docker compose, and what they promise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.ship.conftest import ComposeLoader
from tests.ship.dockerfile import Stage
from tests.ship.tools import REPO, run_tool

GPU = ["docker-compose.yml"]
CPU = ["docker-compose.yml", "docker-compose.cpu.yml"]
VARIANTS = {
    "gpu": (GPU, ()),
    "cpu": (CPU, ()),
    "gpu+train": (GPU, ("train",)),
    "cpu+train": (CPU, ("train",)),
}


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    devices: list[dict[str, Any]] = reservations.get("devices", [])
    return devices


@pytest.mark.parametrize("variant", VARIANTS)
def test_compose_config_is_valid(docker_compose: str, variant: str) -> None:
    files, profiles = VARIANTS[variant]
    args = [docker_compose]
    for name in files:
        args += ["-f", name]
    for profile in profiles:
        args += ["--profile", profile]
    result = run_tool([*args, "config", "-q"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_compose_config_reports_problems(docker_compose: str, tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        (REPO / "docker-compose.yml").read_text().replace("restart: unless-stopped", "restart: 3")
    )
    result = run_tool([docker_compose, "-f", str(broken), "config", "-q"], cwd=tmp_path)
    assert result.returncode != 0
    assert "restart" in result.stderr


def test_service_serves_port_8000_from_the_mounted_repository(
    compose_config: ComposeLoader,
) -> None:
    config = compose_config(GPU)
    assert set(config["services"]) == {"dino"}  # `docker compose up` starts the service only
    dino = config["services"]["dino"]
    assert dino["build"]["target"] == "serve"
    assert [(p["target"], p["published"]) for p in dino["ports"]] == [(8000, "8000")]
    (volume,) = dino["volumes"]
    assert volume["type"] == "bind"
    assert Path(volume["source"]) == REPO / "model_repository"
    assert volume["target"] == "/models"
    assert volume.get("read_only") is True
    assert dino["environment"]["DINO_MODEL_REPOSITORY"] == "/models"
    assert dino["environment"]["DINO_PORT"] == "8000"
    assert dino["environment"]["DINO_HOST"] == "0.0.0.0"


def test_service_health_restart_and_limits(compose_config: ComposeLoader) -> None:
    dino = compose_config(GPU)["services"]["dino"]
    test = dino["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]  # exec form, no shell, no curl
    assert "http://127.0.0.1:8000/readyz" in test[3]
    assert dino["restart"] == "unless-stopped"
    limits = dino["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) > 0
    assert int(limits["memory"]) >= 1 << 30


def test_gpu_variant_reserves_an_nvidia_gpu(compose_config: ComposeLoader) -> None:
    config = compose_config(GPU, ("train",))
    for name in ("dino", "train"):
        (device,) = _gpu_devices(config["services"][name])
        assert device["driver"] == "nvidia"
        assert device["capabilities"] == ["gpu"]
    assert config["services"]["dino"]["environment"]["DINO_DEVICE"] == "auto"


def test_cpu_variant_needs_no_nvidia_runtime(compose_config: ComposeLoader) -> None:
    config = compose_config(CPU, ("train",))
    for name, service in config["services"].items():
        assert _gpu_devices(service) == [], name
        assert service.get("runtime") is None, name
    assert config["services"]["dino"]["environment"]["DINO_DEVICE"] == "cpu"
    # Everything else is the GPU variant's.
    gpu_dino = compose_config(GPU)["services"]["dino"]
    cpu_dino = config["services"]["dino"]
    for key in ("ports", "volumes", "healthcheck", "restart", "build", "image"):
        assert cpu_dino[key] == gpu_dino[key], key


def test_train_profile_writes_into_the_served_repository(
    compose_config: ComposeLoader, stages: dict[str, Stage]
) -> None:
    config = compose_config(GPU, ("train",))
    train = config["services"]["train"]
    assert train["profiles"] == ["train"]
    assert train["build"]["target"] == "train"
    assert config["services"]["dino"]["build"]["target"] in stages
    assert train["build"]["target"] in stages
    mounts = {v["target"]: v for v in train["volumes"]}
    served = config["services"]["dino"]["volumes"][0]
    assert mounts["/models"]["source"] == served["source"]  # the same repository, writable
    assert not mounts["/models"].get("read_only", False)
    assert train.get("restart", "no") == "no"
    assert train.get("entrypoint") is None  # `docker compose run --rm train python -m ...`


def test_compose_settings_are_known_to_the_service(compose_config: ComposeLoader) -> None:
    from service.settings import Settings

    fields = {f"DINO_{name.upper()}" for name in Settings.model_fields}
    for files in (GPU, CPU):
        environment = compose_config(files)["services"]["dino"]["environment"]
        unknown = set(environment) - fields
        assert not unknown, f"{files}: variables the service does not read: {unknown}"
        settings = Settings(**{k.removeprefix("DINO_").lower(): v for k, v in environment.items()})
        assert settings.port == 8000


def test_train_bind_mounts_exist_in_a_fresh_clone(compose_config: ComposeLoader) -> None:
    """A bind-mount source that does not exist is created by the Docker daemon as root, and
    the non-root train user could not write into it: every writable one is in the repository."""
    import subprocess

    train = compose_config(GPU, ("train",))["services"]["train"]
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for volume in train["volumes"]:
        if volume["type"] != "bind" or volume.get("read_only"):
            continue
        folder = Path(volume["source"]).relative_to(REPO).as_posix()
        assert any(name.startswith(folder + "/") for name in tracked), folder


def test_service_threads_follow_the_cpu_limit_not_the_host(compose_config: ComposeLoader) -> None:
    for files in (GPU, CPU):
        service = compose_config(files)["services"]["dino"]
        environment = service["environment"]
        cpus = float(service["deploy"]["resources"]["limits"]["cpus"])
        for name in ("DINO_INTRA_OP_THREADS", "DINO_DECODE_WORKERS"):
            assert 0 < int(environment[name]) <= cpus, (files, name)
