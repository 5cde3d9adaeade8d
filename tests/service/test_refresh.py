"""Model repository watching: zero-downtime refresh, refused broken versions, readiness."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

import service.repository as repository_module
from models.contract import MAX_VERSION, MODEL_FILENAME, model_path
from models.export import export_to_repository
from service.runtime import ModelLoadError, load_model
from tests.conftest import TINY_MODEL_NAME, make_tiny_vit
from tests.service.conftest import (
    LiveServer,
    copy_repository,
    png_bytes,
    run_server,
    tiny_settings,
    wait_for,
)


def _models(server: LiveServer) -> dict[str, Any]:
    body: dict[str, Any] = server.client.get("/v1/models").json()
    return body


def _states(server: LiveServer) -> dict[int, str]:
    return {row["version"]: row["state"] for row in _models(server)["versions"]}


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".incoming")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_refresh_during_a_stream_of_requests(tiny_model_repository: Path, tmp_path: Path) -> None:
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    settings = tiny_settings(repository, poll_interval_s=0.1)
    with run_server(settings) as server:
        stop = threading.Event()
        statuses: Counter[int] = Counter()
        versions: Counter[int] = Counter()
        cls_by_version: dict[int, list[float]] = {}
        blob = png_bytes(seed=7)

        def stream() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                while not stop.is_set():
                    response = client.post(
                        "/embed", files=[("images", ("a.png", blob, "image/png"))]
                    )
                    statuses[response.status_code] += 1
                    if response.status_code == 200:
                        body = response.json()
                        version = body["model"]["version"]
                        versions[version] += 1
                        cls_by_version[version] = body["results"][0]["cls_embedding"]

        threads = [threading.Thread(target=stream) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: versions[1] >= 5)
            export_to_repository(
                make_tiny_vit(seed=1),
                repository,
                TINY_MODEL_NAME,
                resolution=32,
                weights_sha256="1" * 64,
                source="tests: second version",
            )
            wait_for(lambda: versions[2] >= 5)
            assert _states(server) == {1: "available", 2: "serving"}

            # A corrupt version 3 and a half-written version 4 never replace version 2.
            good = model_path(repository, TINY_MODEL_NAME, 2).read_bytes()
            _write_atomically(model_path(repository, TINY_MODEL_NAME, 3), b"not an onnx file")
            half = model_path(repository, TINY_MODEL_NAME, 4)
            half.parent.mkdir()
            half.write_bytes(good[: len(good) // 2])
            wait_for(
                lambda: _states(server).get(3) == "failed" and _states(server).get(4) == "failed"
            )
            served_before = versions[2]
            wait_for(lambda: versions[2] >= served_before + 5)
            models = _models(server)
            assert models["ready"] and models["loaded"]["version"] == 2
            assert "version 4" in models["last_error"] or "version 3" in models["last_error"]
            assert server.client.get("/readyz").json()["version"] == 2

            # Once the half-written file is complete it is picked up.
            half.write_bytes(good)
            wait_for(lambda: versions[4] >= 3)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert set(statuses) == {200}, statuses
        assert set(versions) == {1, 2, 4}
        assert cls_by_version[1] != cls_by_version[2]
        assert server.metric("dino_model_loads_total", {"outcome": "failed"}) == 2
        assert server.metric("dino_model_info", {"version": "4"}) == 1
        assert server.metric("dino_model_info", {"version": "2"}) == 0


def test_readiness_follows_the_repository(tiny_model_repository: Path, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    repository.mkdir()
    with run_server(tiny_settings(repository, poll_interval_s=0.1)) as server:
        ready = server.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False
        embed = server.client.post(
            "/embed", files=[("images", ("a.png", png_bytes(), "image/png"))]
        )
        assert embed.status_code == 503
        assert embed.json()["error"]["code"] == "not_ready"
        assert server.client.get("/healthz").status_code == 200
        assert server.metric("dino_model_ready") == 0

        # A broken model keeps the service not ready, with the reason visible.
        _write_atomically(model_path(repository, TINY_MODEL_NAME, 1), b"\x08\x01garbage")
        wait_for(lambda: _states(server).get(1) == "failed")
        ready = server.client.get("/readyz")
        assert ready.status_code == 503 and "version 1" in ready.json()["reason"]

        source = model_path(tiny_model_repository, TINY_MODEL_NAME, 1)
        _write_atomically(model_path(repository, TINY_MODEL_NAME, 2), source.read_bytes())
        wait_for(lambda: server.client.get("/readyz").status_code == 200)
        assert server.client.get("/readyz").json()["version"] == 2
        assert server.metric("dino_model_ready") == 1
        embed = server.client.post(
            "/embed", files=[("images", ("a.png", png_bytes(), "image/png"))]
        )
        assert embed.status_code == 200


def test_admin_reload_pinned_and_rollback(tiny_model_repository: Path, tmp_path: Path) -> None:
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    source = model_path(repository, TINY_MODEL_NAME, 1)
    with run_server(tiny_settings(repository)) as server:  # polling off
        shutil.copytree(source.parent, source.parent.with_name("2"))
        assert server.client.get("/readyz").json()["version"] == 1
        reload = server.client.post("/admin/reload").json()
        assert reload == {"changed": True, "serving_version": 2, "error": None, "errors": []}
        # Deleting the serving version rolls back to the newest remaining one.
        shutil.rmtree(source.parent.with_name("2"))
        assert server.client.post("/admin/reload").json()["serving_version"] == 1
        # A broken newer version is refused, and reported by the reload.
        _write_atomically(model_path(repository, TINY_MODEL_NAME, 5), b"junk")
        reload = server.client.post("/admin/reload").json()
        assert reload["changed"] is False and reload["serving_version"] == 1
        assert "version 5" in reload["error"]
    pinned = tiny_settings(repository, version_policy="pinned", model_version=1)
    shutil.copytree(source.parent, source.parent.with_name("3"))
    with run_server(pinned) as server:
        models = _models(server)
        assert models["loaded"]["version"] == 1 and models["version_policy"] == "pinned"
        assert server.client.post("/admin/reload").json()["serving_version"] == 1
    assert (source.parent.with_name("3") / MODEL_FILENAME).is_file()


def test_in_flight_requests_finish_on_the_old_model(
    tiny_model_repository: Path, tmp_path: Path
) -> None:
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    settings = tiny_settings(
        repository, max_queue_delay_ms=3000, wait_when_idle=True, max_batch_size=64
    )
    with run_server(settings) as server:
        result: dict[str, Any] = {}

        def slow_request() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                files = [("images", ("a.png", png_bytes(), "image/png"))]
                result["response"] = client.post("/embed", files=files)

        thread = threading.Thread(target=slow_request)
        thread.start()
        wait_for(lambda: server.metric("dino_queue_depth") == 1)
        source = model_path(repository, TINY_MODEL_NAME, 1)
        shutil.copytree(source.parent, source.parent.with_name("2"))
        started = time.monotonic()
        assert server.client.post("/admin/reload").json()["serving_version"] == 2
        thread.join()
        assert time.monotonic() - started < 30  # not held up by the reload
        response = result["response"]
        assert response.status_code == 200
        assert response.json()["model"]["version"] == 1  # queued before the swap


def test_deleted_failed_versions_are_forgotten(tiny_model_repository: Path, tmp_path: Path) -> None:
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    with run_server(tiny_settings(repository)) as server:  # polling off
        broken = model_path(repository, TINY_MODEL_NAME, 3)
        _write_atomically(broken, b"junk")
        reload = server.client.post("/admin/reload").json()
        assert reload["changed"] is False and "version 3" in reload["error"]
        assert _states(server) == {1: "serving", 3: "failed"}
        assert "version 3" in _models(server)["last_error"]

        shutil.rmtree(broken.parent)
        reload = server.client.post("/admin/reload").json()
        assert reload == {"changed": False, "serving_version": 1, "error": None, "errors": []}
        models = _models(server)
        assert _states(server) == {1: "serving"}
        assert models["last_error"] is None

        # A version directory named with non-ASCII digits is ignored, not a 500.
        (repository / TINY_MODEL_NAME / "\u00b2").mkdir()
        (repository / TINY_MODEL_NAME / "\u00b2" / MODEL_FILENAME).write_bytes(b"x")
        assert server.client.post("/admin/reload").status_code == 200
        assert server.client.get("/v1/models").status_code == 200


def test_a_model_folder_that_cannot_be_listed_is_reported_not_a_500(
    tiny_model_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    real = repository_module.model_versions
    broken = {"on": True}

    def model_versions(root: Path, name: str) -> list[int]:
        if broken["on"]:
            raise PermissionError(13, "Permission denied", str(root / name))
        return real(root, name)

    monkeypatch.setattr(repository_module, "model_versions", model_versions)
    with run_server(tiny_settings(repository)) as server:  # starts, not ready
        ready = server.client.get("/readyz")
        assert ready.status_code == 503
        assert (
            ready.json()["reason"]
            == f"cannot list {repository / TINY_MODEL_NAME}: Permission denied"
        )
        models = server.client.get("/v1/models")
        assert models.status_code == 200 and "Permission denied" in models.json()["last_error"]
        reload = server.client.post("/admin/reload")
        assert reload.status_code == 200 and "cannot list" in reload.json()["error"]
        broken["on"] = False
        reload = server.client.post("/admin/reload").json()
        assert reload == {"changed": True, "serving_version": 1, "error": None, "errors": []}
        assert _models(server)["last_error"] is None
        # Serving: a listing failure now keeps the model and says so.
        broken["on"] = True
        assert server.client.post("/admin/reload").json()["serving_version"] == 1
        assert server.client.get("/readyz").status_code == 200
        assert server.client.get("/v1/models").status_code == 200


def test_a_version_that_breaks_the_loader_is_refused_and_the_scan_goes_on(
    tiny_model_repository: Path, tmp_path: Path
) -> None:
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    source = model_path(repository, TINY_MODEL_NAME, 1)
    for version in (2, 3):
        shutil.copytree(source.parent, source.parent.with_name(str(version)))

    def loader(path: Path, **kwargs: Any) -> Any:
        if kwargs["version"] == 3:
            raise RecursionError("maximum recursion depth exceeded")  # not a ModelLoadError
        return load_model(path, **kwargs)

    with run_server(tiny_settings(repository), loader=loader) as server:
        assert server.client.get("/readyz").json()["version"] == 2
        assert _states(server) == {1: "available", 2: "serving", 3: "failed"}
        assert "RecursionError" in _models(server)["last_error"]
        reload = server.client.post("/admin/reload")
        assert reload.status_code == 200 and "version 3" in reload.json()["error"]


def test_readiness_reasons(tiny_model_repository: Path, tmp_path: Path) -> None:
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    source = model_path(repository, TINY_MODEL_NAME, 1)
    shutil.copytree(source.parent, source.parent.with_name("2"))
    pinned = tiny_settings(repository, version_policy="pinned", model_version=5)
    with run_server(pinned) as server:
        reason = server.client.get("/readyz").json()["reason"]
        assert reason == (
            f"the pinned version 5 is not in {repository / TINY_MODEL_NAME} (versions there: 1, 2)"
        )
        # The pinned version appears after the last scan (polling off): found, not loaded yet.
        shutil.copytree(source.parent, source.parent.with_name("5"))
        reason = server.client.get("/readyz").json()["reason"]
        assert reason.startswith("version 5 (of 1, 2, 5) found in") and "not loaded yet" in reason
        assert server.client.post("/admin/reload").json()["serving_version"] == 5
    shutil.rmtree(source.parent.with_name("5"))
    # /readyz needs no key: with keys set it names no path or error, /v1/models does.
    keyed = tiny_settings(repository, version_policy="pinned", model_version=5, api_keys="k1")
    with run_server(keyed) as server:
        reason = server.client.get("/readyz").json()["reason"]
        assert str(repository) not in reason and "/v1/models" in reason
        assert server.client.get("/v1/models").status_code == 401
        models = server.client.get("/v1/models", headers={"Authorization": "Bearer k1"})
        assert models.status_code == 200
        # the reason /readyz withholds, word for word as it is given without keys
        assert models.json()["reason"] == (
            f"the pinned version 5 is not in {repository / TINY_MODEL_NAME} (versions there: 1, 2)"
        )


def _export_second_model(repository: Path) -> bytes:
    """The bytes of a valid tiny model with other weights than version 1's."""
    report = export_to_repository(
        make_tiny_vit(seed=1),
        repository,
        TINY_MODEL_NAME,
        resolution=32,
        weights_sha256="1" * 64,
        source="tests: other weights",
    )
    return report.path.read_bytes()


def test_a_serving_version_whose_file_changes_is_reloaded_or_kept(
    tiny_model_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    other = _export_second_model(tmp_path / "scratch")
    serving = model_path(repository, TINY_MODEL_NAME, 1)
    original = serving.read_bytes()
    with run_server(tiny_settings(repository)) as server:  # polling off
        assert _models(server)["loaded"]["weights_sha256"] == "0" * 64
        # Replaced by a valid file: reloaded under the same number, the weights tell them apart.
        _write_atomically(serving, other)
        reload = server.client.post("/admin/reload").json()
        assert reload == {"changed": True, "serving_version": 1, "error": None, "errors": []}
        assert _models(server)["loaded"]["weights_sha256"] == "1" * 64
        assert "version 1 of tiny changed on disk and was reloaded" in caplog.text
        # Replaced by a broken file: the copy in memory keeps serving, the row says why.
        _write_atomically(serving, b"junk")
        reload = server.client.post("/admin/reload").json()
        assert reload["changed"] is False and reload["serving_version"] == 1
        assert "version 1" in reload["error"]
        models = _models(server)
        (row,) = models["versions"]
        assert row["state"] == "serving" and "changed on disk" in row["error"]
        assert "version 1" in models["last_error"]
        assert models["loaded"]["weights_sha256"] == "1" * 64
        embed = server.client.post(
            "/embed", files=[("images", ("a.png", png_bytes(), "image/png"))]
        )
        assert embed.status_code == 200
        assert server.client.get("/readyz").status_code == 200
        # Fixed in place (not atomically): picked up, the error is gone.
        serving.write_bytes(original)
        reload = server.client.post("/admin/reload").json()
        assert reload == {"changed": True, "serving_version": 1, "error": None, "errors": []}
        models = _models(server)
        assert models["versions"] == [{"version": 1, "state": "serving", "error": None}]
        assert models["last_error"] is None and models["loaded"]["weights_sha256"] == "0" * 64
        # Unchanged: a forced reload does not load the serving file again, nor does a change
        # of its status alone (a hard link by a backup tool, a chown or chmod: only ctime).
        assert server.client.post("/admin/reload").json()["changed"] is False
        os.link(serving, tmp_path / "backup.onnx")
        serving.chmod(serving.stat().st_mode)
        assert server.client.post("/admin/reload").json()["changed"] is False
        assert server.metric("dino_model_loads_total", {"outcome": "loaded"}) == 3


def test_a_removed_serving_version_keeps_serving_and_says_so(
    tiny_model_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    with run_server(tiny_settings(repository)) as server:  # polling off
        shutil.rmtree(model_path(repository, TINY_MODEL_NAME, 1).parent)
        for _ in range(2):
            reload = server.client.post("/admin/reload").json()
            assert reload == {"changed": False, "serving_version": 1, "error": None, "errors": []}
        (row,) = _models(server)["versions"]
        assert row["state"] == "serving" and "removed from the repository" in row["error"]
        assert caplog.text.count("version 1 was removed from the repository") == 1
        embed = server.client.post(
            "/embed", files=[("images", ("a.png", png_bytes(), "image/png"))]
        )
        assert embed.status_code == 200


def test_a_refused_version_is_retried_when_its_file_changes(
    tiny_model_repository: Path, tmp_path: Path
) -> None:
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    good = model_path(repository, TINY_MODEL_NAME, 1).read_bytes()
    refused = model_path(repository, TINY_MODEL_NAME, 2)
    _write_atomically(refused, good)
    refused.chmod(0o600)
    calls: Counter[int] = Counter()

    def loader(path: Path, **kwargs: Any) -> Any:
        # Tests run as root, who reads any file: refuse what the service user could not read.
        calls[kwargs["version"]] += 1
        if not path.stat().st_mode & 0o004:
            raise ModelLoadError(f"cannot read {path}: Permission denied")
        return load_model(path, **kwargs)

    settings = tiny_settings(repository, poll_interval_s=0.05)
    with run_server(settings, loader=loader) as server:
        assert _states(server) == {1: "serving", 2: "failed"}
        time.sleep(0.5)  # several scans: an unchanged failure is not retried
        assert calls[2] == 1
        refused.chmod(0o644)  # changes neither the size nor the mtime
        wait_for(lambda: server.client.get("/readyz").json()["version"] == 2)
        assert calls[2] == 2

        # A version below the serving one that failed, then fixed, is no longer "failed".
        _write_atomically(model_path(repository, TINY_MODEL_NAME, 3), b"junk")
        wait_for(lambda: _states(server).get(3) == "failed")
        _write_atomically(model_path(repository, TINY_MODEL_NAME, 4), good)
        wait_for(lambda: _states(server).get(4) == "serving")
        assert _states(server)[3] == "failed"
        assert "version 3" in _models(server)["last_error"]
        _write_atomically(model_path(repository, TINY_MODEL_NAME, 3), good)
        wait_for(lambda: _states(server)[3] == "available")
        assert _models(server)["last_error"] is None


def test_a_version_removed_while_it_loads_is_not_swapped_in(
    tiny_model_repository: Path, tmp_path: Path
) -> None:
    # Before, it served until the next poll noticed, then rolled back: two swaps for nothing.
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    good = model_path(repository, TINY_MODEL_NAME, 1).read_bytes()
    calls: Counter[int] = Counter()

    def loader(path: Path, **kwargs: Any) -> Any:
        calls[kwargs["version"]] += 1
        model = load_model(path, **kwargs)
        if kwargs["version"] == 2:
            shutil.rmtree(path.parent)  # deleted while its checks ran
        return model

    settings = tiny_settings(repository, poll_interval_s=0.05)
    with run_server(settings, loader=loader) as server:
        swaps = server.metric("dino_model_loads_total", {"outcome": "loaded"})
        _write_atomically(model_path(repository, TINY_MODEL_NAME, 2), good)
        wait_for(lambda: calls[2] == 1)
        time.sleep(0.3)  # several more scans
        assert server.client.get("/readyz").json()["version"] == 1
        assert server.metric("dino_model_loads_total", {"outcome": "loaded"}) == swaps


def test_shutdown_stops_a_load_in_progress(tiny_model_repository: Path) -> None:
    # A load's checks run in a worker thread that cancelling the scan does not stop: the
    # process waited for a graph that never ends (SIGTERM then needed SIGKILL).
    started = threading.Event()

    def endless_loader(path: Path, **kwargs: Any) -> Any:
        control = kwargs["control"]
        started.set()
        deadline = time.monotonic() + 120
        while not control.terminated and time.monotonic() < deadline:
            time.sleep(0.01)
        raise ModelLoadError("the load was stopped")

    settings = tiny_settings(tiny_model_repository)
    with run_server(settings, loader=endless_loader, wait_for_first_scan=False):
        assert started.wait(30)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 10


def test_folders_that_are_not_version_numbers_are_named_in_the_log(
    tiny_model_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    source = model_path(repository, TINY_MODEL_NAME, 1).parent
    for name in ("02", "0", str(MAX_VERSION + 1), "2.old"):
        shutil.copytree(source, source.with_name(name))
    with run_server(tiny_settings(repository, poll_interval_s=0.05)) as server:
        assert _states(server) == {1: "serving"}
        time.sleep(0.3)  # several scans: each name is named once
    assert caplog.text.count("ignoring '02'") == 1
    assert "write the version without leading zeros (2)" in caplog.text
    assert "ignoring '0'" in caplog.text and "versions start at 1" in caplog.text
    assert f"ignoring '{MAX_VERSION + 1}'" in caplog.text
    assert "2.old" not in caplog.text  # not a number: a folder set aside, not a mistake


def test_readiness_reasons_for_a_missing_or_empty_model_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = tmp_path / "repo"
    repository.mkdir()
    folder = repository / TINY_MODEL_NAME
    with run_server(tiny_settings(repository)) as server:
        for _ in range(3):
            embed = server.client.post(
                "/embed", files=[("images", ("a.png", png_bytes(), "image/png"))]
            )
            assert embed.status_code == 503
        # Ordinary while no model serves: not an error line per request.
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        reason = server.client.get("/readyz").json()["reason"]
        assert reason == (
            f"the model folder {folder} does not exist (DINO_MODEL_REPOSITORY / DINO_MODEL_NAME)"
        )
        (folder / "01").mkdir(parents=True)
        reason = server.client.get("/readyz").json()["reason"]
        assert reason == (
            f"no model version found in {folder} (a version is a folder 1, 2, ... that holds "
            f"{MODEL_FILENAME})"
        )


def test_the_server_answers_while_the_first_model_loads(
    tiny_model_repository: Path, tmp_path: Path
) -> None:
    # A large model takes a while to load, check and warm up: meanwhile the replica is alive
    # (a liveness probe must not kill it) and says what it is doing.
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    release = threading.Event()

    def slow_loader(path: Path, **kwargs: Any) -> Any:
        assert release.wait(timeout=60)
        return load_model(path, **kwargs)

    settings = tiny_settings(repository)
    with run_server(settings, loader=slow_loader, wait_for_first_scan=False) as server:
        assert server.client.get("/healthz").status_code == 200
        ready = server.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["reason"] == f"loading version 1 of {repository / TINY_MODEL_NAME}"
        embed = server.client.post(
            "/embed", files=[("images", ("a.png", png_bytes(), "image/png"))]
        )
        assert embed.status_code == 503 and embed.json()["error"]["code"] == "not_ready"
        release.set()
        wait_for(lambda: server.client.get("/readyz").status_code == 200)
        assert server.client.get("/readyz").json()["version"] == 1


def test_a_version_copied_in_place_is_loaded_when_complete_not_reported_failed(
    tiny_model_repository: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`cp` into the version folder (no rename): the polls see a half-written file."""
    monkeypatch.setattr(repository_module, "SETTLE_S", 3.0)  # far above the pauses below
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    good = model_path(repository, TINY_MODEL_NAME, 1).read_bytes()
    target = model_path(repository, TINY_MODEL_NAME, 2)
    calls: Counter[int] = Counter()

    def loader(path: Path, **kwargs: Any) -> Any:
        calls[kwargs["version"]] += 1
        return load_model(path, **kwargs)

    settings = tiny_settings(repository, poll_interval_s=0.05)
    caplog.set_level(logging.INFO, logger="service.repository")
    with run_server(settings, loader=loader) as server:
        caplog.clear()
        target.parent.mkdir()
        chunk = len(good) // 4 + 1
        with target.open("wb") as out:
            for start in range(0, len(good), chunk):
                out.write(good[start : start + chunk])
                out.flush()
                time.sleep(0.3)  # several polls see each partial file
                assert _states(server).get(2) != "failed"
        wait_for(lambda: server.client.get("/readyz").json().get("version") == 2)
        assert calls[2] >= 2  # tried while it was being written, then loaded
        assert server.metric("dino_model_loads_total", {"outcome": "failed"}) == 0
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors == []
    held = [r for r in caplog.records if "may still be being written" in r.getMessage()]
    assert len(held) == 1, held  # once for the whole copy, not at every poll
    assert held[0].levelname == "INFO"


def test_a_broken_file_that_stays_put_is_refused_once_it_settles_and_loaded_once(
    tiny_model_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repository_module, "SETTLE_S", 1.0)
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    calls: Counter[int] = Counter()

    def loader(path: Path, **kwargs: Any) -> Any:
        calls[kwargs["version"]] += 1
        return load_model(path, **kwargs)

    settings = tiny_settings(repository, poll_interval_s=0.05)
    with run_server(settings, loader=loader) as server:
        written = time.time()
        _write_atomically(model_path(repository, TINY_MODEL_NAME, 2), b"not an onnx model")
        wait_for(lambda: _states(server).get(2) == "failed")
        assert time.time() - written >= 0.9  # held back while the file was new
        assert calls[2] == 1  # the same bytes are not loaded a second time
        assert server.metric("dino_model_loads_total", {"outcome": "failed"}) == 1
        assert "version 2" in _models(server)["last_error"]

        # POST /admin/reload reports a new file's failure at once (and every other one).
        _write_atomically(model_path(repository, TINY_MODEL_NAME, 3), b"junk")
        reload = server.client.post("/admin/reload")
        assert reload.status_code == 200
        body = reload.json()
        assert [e.split(":")[0] for e in body["errors"]] == ["version 3", "version 2"]
        assert body["error"] == "; ".join(body["errors"])
        assert _states(server)[3] == "failed"


def _counting_loader(calls: Counter[int], first_call: Any = None) -> Any:
    def loader(path: Path, **kwargs: Any) -> Any:
        calls[kwargs["version"]] += 1
        if first_call is not None and calls[kwargs["version"]] == 1:
            first_call(path, kwargs["version"])
        return load_model(path, **kwargs)

    return loader


def test_a_held_back_version_with_a_future_mtime_is_refused_by_the_services_clock(
    tiny_model_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An mtime ahead of this clock (tar, cp -p from a host whose clock is ahead) looked
    "just modified" until the clock caught up: the broken version went unreported."""
    monkeypatch.setattr(repository_module, "SETTLE_S", 1.5)  # the note must be seen first
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    calls: Counter[int] = Counter()
    settings = tiny_settings(repository, poll_interval_s=0.05)
    with run_server(settings, loader=_counting_loader(calls)) as server:
        broken = model_path(repository, TINY_MODEL_NAME, 2)
        _write_atomically(broken, b"junk")
        os.utime(broken, (time.time() + 3600, time.time() + 3600))
        wait_for(lambda: (_models(server)["versions"][-1]["error"] or "").startswith("not loaded"))
        assert _states(server)[2] == "available"  # held back, and it says so
        wait_for(lambda: _states(server)[2] == "failed", timeout=10)
        assert calls[2] == 1
        assert server.metric("dino_model_loads_total", {"outcome": "failed"}) == 1


def test_a_file_that_keeps_changing_is_refused_after_the_cap(
    tiny_model_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount that reports mtime as "now", or a periodic toucher."""
    monkeypatch.setattr(repository_module, "SETTLE_S", 5.0)
    monkeypatch.setattr(repository_module, "SETTLE_CAP_S", 1.0)
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    settings = tiny_settings(repository, poll_interval_s=0.05)
    with run_server(settings) as server:
        broken = model_path(repository, TINY_MODEL_NAME, 2)
        _write_atomically(broken, b"junk")
        deadline = time.monotonic() + 15
        while _states(server)[2] != "failed":
            assert time.monotonic() < deadline, "never reported"
            os.utime(broken)  # touched again and again
            time.sleep(0.1)


def test_a_file_completed_during_its_failed_load_is_loaded_at_the_next_poll(
    tiny_model_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure was of bytes no longer on disk: not a reason to refuse the file."""
    monkeypatch.setattr(repository_module, "SETTLE_S", 3.0)
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    good = model_path(repository, TINY_MODEL_NAME, 1).read_bytes()
    calls: Counter[int] = Counter()

    def finish_the_copy(path: Path, version: int) -> None:
        if version == 2:
            path.write_bytes(good)  # the copy ends while the half file is being loaded
            raise ModelLoadError(f"{path}: truncated (half of it was read)")

    settings = tiny_settings(repository, poll_interval_s=0.05)
    with run_server(settings, loader=_counting_loader(calls, finish_the_copy)) as server:
        _write_atomically(model_path(repository, TINY_MODEL_NAME, 2), good[: len(good) // 2])
        wait_for(lambda: server.client.get("/readyz").json().get("version") == 2, timeout=10)
        assert calls[2] == 2
        assert server.metric("dino_model_loads_total", {"outcome": "failed"}) == 0


def test_an_old_broken_file_is_refused_at_once_and_a_held_back_one_by_reload(
    tiny_model_repository: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(repository_module, "SETTLE_S", 30.0)
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    calls: Counter[int] = Counter()
    caplog.set_level(logging.INFO, logger="service.repository")
    settings = tiny_settings(repository, poll_interval_s=0.05)
    with run_server(settings, loader=_counting_loader(calls)) as server:
        old = model_path(repository, TINY_MODEL_NAME, 2)
        old.parent.mkdir()
        incoming = old.with_name(".incoming")
        incoming.write_bytes(b"junk")
        os.utime(incoming, (time.time() - 3600, time.time() - 3600))  # cp -p of an old file
        os.replace(incoming, old)
        wait_for(lambda: _states(server)[2] == "failed", timeout=5)
        assert not any("may still be being written" in r.getMessage() for r in caplog.records)

        # A new broken file is held back (30 s here); POST /admin/reload loads it again.
        _write_atomically(model_path(repository, TINY_MODEL_NAME, 3), b"junk")
        wait_for(lambda: calls[3] == 1)
        time.sleep(0.3)
        assert _states(server)[3] == "available" and calls[3] == 1
        reload = server.client.post("/admin/reload")
        assert "version 3" in reload.json()["error"] and calls[3] == 2
        assert _states(server)[3] == "failed"


def test_a_held_back_version_below_the_serving_one_is_still_refused_once_settled(
    tiny_model_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a newer version serves it is no longer tried: its note would have stayed for
    ever instead of the failure it is."""
    monkeypatch.setattr(repository_module, "SETTLE_S", 1.0)
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    good = model_path(repository, TINY_MODEL_NAME, 1).read_bytes()
    calls: Counter[int] = Counter()
    settings = tiny_settings(repository, poll_interval_s=0.05)
    with run_server(settings, loader=_counting_loader(calls)) as server:
        # A copy that stopped half way (renamed in: a poll must not see it grow, or it would
        # be loaded twice; the half-written file is what this is about).
        _write_atomically(model_path(repository, TINY_MODEL_NAME, 2), good[: len(good) // 2])
        wait_for(lambda: calls[2] >= 1)
        _write_atomically(model_path(repository, TINY_MODEL_NAME, 3), good)
        wait_for(lambda: _states(server).get(3) == "serving")
        wait_for(lambda: _states(server)[2] == "failed", timeout=10)
        assert calls[2] == 1


def test_the_repository_is_read_off_the_event_loop(
    tiny_model_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing and fingerprinting run in worker threads: a repository of thousands of
    versions (or a slow network file system) never stalls the loop that answers requests."""
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    for version in (2, 3):  # failed versions are fingerprinted at every scan
        _write_atomically(model_path(repository, TINY_MODEL_NAME, version), b"junk")
    on_loop: list[str] = []

    def off_loop(name: str, real: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass  # a worker thread
            else:
                on_loop.append(name)
            return real(*args)

        return wrapper

    for name in ("model_versions", "ignored_version_folders", "_fingerprint"):
        monkeypatch.setattr(
            repository_module, name, off_loop(name, getattr(repository_module, name))
        )
    with run_server(tiny_settings(repository, poll_interval_s=0.05)) as server:
        wait_for(lambda: _states(server) == {1: "serving", 2: "failed", 3: "failed"})
        # A new file that fails: held back by the polls until it settles.
        _write_atomically(model_path(repository, TINY_MODEL_NAME, 4), b"junk")
        wait_for(lambda: _states(server).get(4) == "failed", timeout=15)
        assert server.client.post("/admin/reload").json()["serving_version"] == 1
        assert server.client.get("/readyz").status_code == 200
    with run_server(tiny_settings(tmp_path / "empty")) as server:  # not ready: says why
        assert "does not exist" in server.client.get("/readyz").json()["reason"]
    assert on_loop == []


def test_versions_whose_file_is_a_broken_link_are_refused_with_the_reason(
    tiny_model_repository: Path, tmp_path: Path
) -> None:
    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    dangling = model_path(repository, TINY_MODEL_NAME, 2)
    dangling.parent.mkdir()
    dangling.symlink_to(tmp_path / "elsewhere" / MODEL_FILENAME)
    loop = model_path(repository, TINY_MODEL_NAME, 3)
    loop.parent.mkdir()
    loop.symlink_to(loop)
    with run_server(tiny_settings(repository)) as server:
        rows = {row["version"]: row for row in _models(server)["versions"]}
        assert rows[1]["state"] == "serving"
        assert rows[2]["state"] == "failed" and rows[2]["error"] == (
            f"cannot read {dangling}: a symbolic link to {tmp_path / 'elsewhere' / MODEL_FILENAME}"
            " that leads to no file (No such file or directory)"
        )
        assert rows[3]["state"] == "failed"
        assert "a symbolic link to" in rows[3]["error"]
        assert "Too many levels of symbolic links" in rows[3]["error"]


def test_a_file_replaced_while_another_version_loads_is_recorded_as_loaded(
    tiny_model_repository: Path, tmp_path: Path
) -> None:
    """Each load takes its file's fingerprint just before it: with the scan's (older) one, a
    file replaced during a newer candidate's load was loaded again at the next scan, with a
    false "changed on disk" warning."""
    from service.metrics import Metrics
    from service.repository import ModelManager

    repository = copy_repository(tiny_model_repository, tmp_path / "repo")
    first = model_path(repository, TINY_MODEL_NAME, 1)
    _write_atomically(model_path(repository, TINY_MODEL_NAME, 2), b"junk")
    loads: list[int] = []

    def loader(path: Path, **kwargs: Any) -> Any:
        loads.append(kwargs["version"])
        if kwargs["version"] == 2:  # meanwhile, version 1 is published again (same bytes)
            _write_atomically(first, first.read_bytes())
            raise ModelLoadError("junk")
        return load_model(path, **kwargs)

    async def scans() -> list[bool]:
        manager = ModelManager(tiny_settings(repository), Metrics(), loader)
        return [(await manager.refresh()).changed for _ in range(2)]

    assert asyncio.run(scans()) == [True, False]
    assert loads == [2, 1]
