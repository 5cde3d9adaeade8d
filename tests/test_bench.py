"""Smoke runs of the benchmark scripts (tiny settings): they run and report what they promise.

The figures are not checked (speed is measured, never asserted); the structure is.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_train_throughput_reports_every_variant_against_the_reference() -> None:
    result = _run("bench/train_throughput.py", "--tiny", "--variants", "bf16,fp16")
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    by_name = {r["bench"]: r for r in records}
    for name in ("train_step_reference", "train_step_optimised_bf16", "train_step_optimised_fp16"):
        assert "error" not in by_name[name] and by_name[name]["img_per_s"] > 0, by_name[name]
    assert by_name["train_step_optimised_fp16"]["over_reference"] > 0
    # The reference reads the loss and every gradient norm on the host; ours reads nothing.
    assert by_name["train_step_reference"]["host_syncs_per_step"] > 0
    assert by_name["train_step_optimised_bf16"]["host_syncs_per_step"] == 0
    modes = {(r["setting"], r["mode"]) for r in records if r["bench"] == "batched_augmentation"}
    assert ("2x224+10x96", "photometric") in modes and ("2x224+10x96", "whole") in modes
    cpu = [r for r in records if r["bench"] == "cpu_augmentation"]
    assert all(r["geometry_ms_per_image_per_core"] > 0 for r in cpu) and len(cpu) == 2
    assert all(r["cpu_cores_equivalent"] > 0 for r in records if "cpu_cores_equivalent" in r)
    assert by_name["setup"]["cpu"]  # the machine the per-core figures are for
    assert _run("bench/train_throughput.py", "--variants", "warp").returncode == 2


def test_train_throughput_reports_a_failing_variant_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_bench", ROOT / "bench/train_throughput.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def broken(*args: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench, "make_optimised_step", broken)
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--tiny", "--variants", "bf16"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 1
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {r["bench"]: r for r in records}
    assert "illegal memory access" in by_name["train_step_optimised_bf16"]["error"]
    assert "error" not in by_name["train_step_reference"]
    assert any(r["bench"] == "cpu_augmentation" for r in records)  # the rest still ran


def test_serve_throughput_compares_the_service_with_the_raw_session(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    result = _run(
        "bench/serve_throughput.py", "--tiny", "--concurrency", "1,4", "--requests", "8",
        "--seconds", "2", "--raw-seconds", "0.5", "--server-switch-interval-ms", "2",
        "--check-every", "1", "--json-out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"]["server_switch_interval_ms"] == 2.0  # the service ran with it
    assert report["settings"]["check_every"] == 1  # every answer matched the raw session
    assert len(report["results"]) == 8  # 2 outputs x 2 encodings x 2 concurrencies
    for level in report["results"]:
        assert level["failures"] == 0 and level["images_per_s"] > 0
        assert level["raw_images_per_s"] > 0 and level["ratio"] > 0
        assert level["raw_batch"] == max(1, round(level["mean_batch"]))
        # beside it, the session at the largest batch the service may form (32 by default)
        assert level["full_batch"] == 32 and level["raw_full_batch_images_per_s"] > 0
        assert level["ratio_full_batch"] == pytest.approx(
            level["images_per_s"] / level["raw_full_batch_images_per_s"]
        )
        assert level["server_cpu_ms_per_image"] > 0  # the service's main process, from /proc
    assert report["settings"]["max_batch_size"] == 32
    assert report["hardware"]["execution_provider"] == "CPUExecutionProvider"
    assert report["settings"]["decode_processes"] == "0"


def test_serve_throughput_names_failed_requests_and_exits_1(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    result = _run(
        "bench/serve_throughput.py", "--tiny", "--concurrency", "1", "--requests", "2",
        "--seconds", "1", "--json-out", str(out),
        env={"DINO_MAX_IMAGE_PIXELS": "100"},  # every 400x300 upload is refused with 413
    )  # fmt: skip
    assert result.returncode == 1
    assert "image_too_large" in result.stderr
    report = json.loads(out.read_text())  # strict JSON: no NaN for the empty levels
    for level in report["results"]:
        assert level["failure_statuses"] == {"413": 2} and level["requests"] == 0
        assert level["p50_ms"] is None and level["raw_images_per_s"] is None
        assert level["raw_full_batch_images_per_s"] is None and level["ratio_full_batch"] is None


def _gpu_session(work: Path, part: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    environment = {
        **os.environ,
        "PART": part,
        "OUT": str(work / "out"),
        "STAGE_DIR": str(work / "stage"),
        "ORT_DIR": str(work / "ortgpu"),
        "SERVE_TIMEOUT_S": "1",  # the service bench itself needs a GPU: stop it at once
        "FMNIST_RUN_DIR": str(work / "run"),  # not the device's /tmp/run, shared by tests
        "FMNIST_REPO_DIR": str(work / "model_repository"),
        # the script's python3 is this interpreter, as on the device it is the one with torch
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **env,
    }
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_session.sh")],
        cwd=work / "repo",
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,  # the fmnist stage takes ~25 s here; a busy CI machine took over 120 s
        check=False,
    )


def _split_archive(work: Path, parts: int) -> list[bytes]:
    """A tar.xz holding a stand-in ``onnxruntime`` package, cut in ``parts`` pieces, plus the
    sha256 file in the layout the session carries (``.device/ort``)."""
    import hashlib
    import io
    import tarfile

    source = work / "pkg" / "onnxruntime"
    source.mkdir(parents=True)
    (source / "__init__.py").write_text(
        "__version__ = 'stand-in'\n\ndef get_available_providers():\n    return ['CUDA?']\n"
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as archive:
        archive.add(source, arcname="onnxruntime")
    data = buffer.getvalue()
    ort = work / "repo" / ".device" / "ort"
    ort.mkdir(parents=True)
    digest = hashlib.sha256(data).hexdigest()
    (ort / "ort-gpu.tar.xz.sha256").write_text(f"{digest}  ort-gpu.tar.xz\n")
    size = -(-len(data) // parts)
    return [data[i * size : (i + 1) * size] for i in range(parts)]


def _carry(work: Path, index: int, piece: bytes) -> None:
    ort = work / "repo" / ".device" / "ort"
    for old in ort.glob("part-0*"):
        old.unlink()  # each call carries one part
    (ort / f"part-0{index}").write_bytes(piece)


def test_gpu_session_stages_parts_across_calls_and_extracts_once(tmp_path: Path) -> None:
    """The onnxruntime-gpu archive travels one part per call; the serve stage joins, checks
    and extracts it, and refuses a partial staging instead of reusing half an extraction."""
    pieces = _split_archive(tmp_path, 4)
    for index, piece in enumerate(pieces[:3]):
        _carry(tmp_path, index, piece)
        assert _gpu_session(tmp_path, "stage").returncode == 0
    result = _gpu_session(tmp_path, "serve")  # part-03 never arrived
    assert result.returncode == 1 and "only 3 of 4 parts are staged" in result.stdout
    assert not (tmp_path / "ortgpu").exists()

    _carry(tmp_path, 3, pieces[3])
    assert _gpu_session(tmp_path, "stage").returncode == 0
    for part in (tmp_path / "repo" / ".device" / "ort").glob("part-0*"):
        part.unlink()  # the serve call carries the wheels and the digest, no part
    result = _gpu_session(tmp_path, "serve")
    assert "ort-gpu.tar.xz: OK" in result.stdout, result.stdout + result.stderr
    assert (tmp_path / "ortgpu" / ".complete").is_file()
    assert "stand-in" in (tmp_path / "out" / "env.txt").read_text()  # imported from there
    assert (tmp_path / "out" / "serve.log.tail").is_file()  # kept for a post-mortem


def test_gpu_session_refuses_a_corrupted_archive(tmp_path: Path) -> None:
    pieces = _split_archive(tmp_path, 2)
    pieces[1] = bytes([pieces[1][0] ^ 0xFF]) + pieces[1][1:]
    for index, piece in enumerate(pieces):
        _carry(tmp_path, index, piece)
        assert _gpu_session(tmp_path, "stage", ORT_PARTS="2").returncode == 0
    result = _gpu_session(tmp_path, "serve", ORT_PARTS="2")
    assert result.returncode == 1 and "archive digest mismatch" in result.stdout
    assert not (tmp_path / "ortgpu").exists()


def test_gpu_session_fmnist_stage_trains_exports_and_evaluates(tmp_path: Path) -> None:
    """The bundled model's stage end to end on a tiny synthetic Fashion-MNIST (on the CPU
    here): probe, a run sized to the budget, export, k-NN; at most 8 files come back."""
    from tests.training.conftest import write_fashion_mnist

    (tmp_path / "repo").mkdir()
    for name in ("configs", "models", "training", "service", "pyproject.toml"):
        (tmp_path / "repo" / name).symlink_to(ROOT / name)
    data = write_fashion_mnist(tmp_path / "fm", n_train=64, n_test=32)
    result = _gpu_session(
        tmp_path,
        "fmnist",
        TRAIN_BUDGET_S="20",
        MAX_EPOCHS="2",
        DINO_FASHION_MNIST_ROOT=str(data),
        FMNIST_EXTRA="--batch_size_per_gpu 16 --num_workers 0 --device cpu",
    )
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "env.txt",
        "fmnist_config.yaml",
        "fmnist_log.txt",
        "knn.json",
        "model.onnx",
        "steps.log",
        "train_fmnist.tail",
    ], result.stdout[-3000:]
    assert "of warm-up" in (out / "steps.log").read_text()
    assert [r["k"] for r in json.loads((out / "knn.json").read_text())] == [10, 20, 100, 200]


@pytest.fixture
def serve_bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    """bench/serve_throughput.py imported by its own name, so that the client processes it
    spawns (which get this sys.path) can import their entry point too."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module("serve_throughput")


def test_serve_throughput_splits_workers_and_requests_evenly(serve_bench: Any) -> None:
    assert serve_bench._split_workers(64, 3) == [22, 21, 21]
    assert serve_bench._split_workers(2, 4) == [1, 1]  # never a process without a worker
    assert serve_bench._split_workers(5, 1) == [5]
    assert serve_bench._split(1, 2) == [1, 0]  # --requests below the processes
    assert serve_bench._split(12, 2) == [6, 6]
    # --requests follows the workers: a process with half the workers gets half the requests
    assert serve_bench._split_requests(12, [2, 1]) == [8, 4]
    assert serve_bench._split_requests(1, [1, 1]) == [1, 0]
    assert serve_bench._auto_processes(64, cpu_count=16) == 4
    assert serve_bench._auto_processes(2, cpu_count=16) == 2
    assert serve_bench._auto_processes(64, cpu_count=2) == 1  # this 2-core machine: unchanged
    assert serve_bench._auto_processes(64, cpu_count=None) >= 1


@pytest.mark.parametrize(
    "args",
    [
        ["--client-processes", "0"],
        ["--client-processes", "two"],
        ["--images-per-request", "0"],
        ["--concurrency", "4,0"],
        ["--check-every", "-1"],
    ],
)
def test_serve_throughput_refuses_a_wrong_value_before_starting(
    serve_bench: Any, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        serve_bench.main(["--tiny", *args])
    assert exit_info.value.code == 2
    assert args[0] in capsys.readouterr().err
    # main() called from other code leaves the caller's signals alone (a SIGTERM handler left
    # behind here once turned a later test's SIGTERM into an interrupt of the whole run)
    assert signal.getsignal(signal.SIGTERM) is handler


def test_the_answer_check_accepts_the_raw_sessions_numbers_in_every_encoding(
    serve_bench: Any,
) -> None:
    import base64

    rng = np.random.default_rng(3)
    want = [rng.normal(size=8), rng.normal(size=8)]

    def body(values: list[Any]) -> bytes:
        return json.dumps({"results": [{"cls_embedding": v} for v in values]}).encode()

    def b64(value: np.ndarray, dtype: str) -> dict[str, Any]:
        raw = value.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
        return {
            "encoding": "base64",
            "dtype": dtype,
            "shape": [8],
            "data": base64.b64encode(raw).decode(),
        }

    check = serve_bench.check_answer
    assert check(body([w.tolist() for w in want]), want) is None
    assert check(body([(w * 1.0001 + 1e-5).tolist() for w in want]), want) is None  # rounding
    assert check(body([b64(w, "float32") for w in want]), want) is None
    assert check(body([b64(w, "float16") for w in want]), want) is None
    twins = [want[0], want[0] * 0.9995 + want[1] * 0.02]  # nearly parallel, as tiny models give
    assert check(body([t.tolist() for t in twins]), twins) is None
    crossed = check(body([twins[1].tolist(), twins[0].tolist()]), twins)
    assert crossed is not None and "closer to image 1" in crossed
    swapped = check(body([want[1].tolist(), want[0].tolist()]), want)
    assert swapped is not None and swapped.startswith("image 0: cosine similarity")
    garbage = body([want[0].tolist(), rng.normal(size=8).tolist()])
    assert "image 1: cosine similarity" in (check(garbage, want) or "")
    nan = np.full(8, np.nan)
    assert "image 0" in (check(body([b64(nan, "float32"), b64(want[1], "float32")]), want) or "")
    assert check(body([want[0].tolist()]), want) == "1 results for 2 images"
    assert "shape (4,)" in (check(body([w[:4].tolist() for w in want]), want) or "")
    assert "cannot be read" in (check(b"not json", want) or "")
    assert "cannot be read" in (check(json.dumps({"results": [{}, {}]}).encode(), want) or "")


def test_serve_throughput_counts_answers_that_differ_from_the_raw_session(
    serve_bench: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = serve_bench.RawSession.cls_embeddings
    monkeypatch.setattr(  # as if the service answered other numbers than the model gives
        serve_bench.RawSession, "cls_embeddings", lambda self: [-v for v in real(self)]
    )
    code = serve_bench.main(
        ["--tiny", "--device", "cpu", "--concurrency", "1", "--requests", "4", "--seconds", "2",
         "--raw-seconds", "0.1", "--check-every", "2"]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "wrong_answer: image 0: cosine similarity -1.000000" in err


def test_serve_throughput_reports_a_failing_client_process(serve_bench: Any) -> None:
    """A client process that raises ends the run with its traceback, without a hang."""
    job = serve_bench._ClientJob(
        urls=["http://127.0.0.1:9"], first_worker=0, blobs=[], params={}, workers=1,
        requests=None, seconds=60,
        images_per_request=1, first_blob=0,
    )  # fmt: skip
    with pytest.raises(SystemExit, match="ZeroDivisionError"):  # no blob to upload
        serve_bench._run_clients([job, job])


def test_serve_throughput_merges_several_client_processes(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    result = _run(
        "bench/serve_throughput.py", "--tiny", "--device", "cpu", "--concurrency", "1,3",
        "--client-processes", "2", "--images-per-request", "2", "--requests", "12",
        "--seconds", "60", "--raw-seconds", "0.2", "--max-batch-size", "2",
        "--json-out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"]["client_processes"] == 2
    assert report["settings"]["images_per_request"] == 2
    assert len(report["results"]) == 8  # 2 outputs x 2 encodings x 2 concurrencies
    for level in report["results"]:
        processes = min(2, level["concurrency"])
        assert level["failures"] == 0 and level["client_processes"] == processes
        assert level["images_per_request"] == 2
        # --requests is a cap over all processes, shared by workers; the merge keeps every one
        assert level["client_requests"] == {1: [12], 3: [8, 4]}[level["concurrency"]]
        assert level["requests"] == sum(level["client_requests"]) == 12
        assert level["server_images"] == 2 * level["requests"]  # what the service inferred
        assert level["images_per_s"] == pytest.approx(2 * 12 / level["wall_s"])
        assert level["p50_ms"] > 0 and level["raw_images_per_s"] > 0
        # two images per request fill the largest batch (2): the raw session runs it once
        assert level["raw_batch"] == level["full_batch"] == 2
        assert level["raw_full_batch_images_per_s"] == level["raw_images_per_s"]
        assert level["client_cpu_ms_per_request"] > 0 and level["client_cpu_busy"] > 0


def test_gpu_session_fmnist_stage_resumes_a_run_longer_than_one_call(tmp_path: Path) -> None:
    """FMNIST_EPOCHS fixes the schedule; a call that stops early exports its last checkpoint
    as a new version, and FMNIST_RESUME=1 continues the same run in the next call."""
    from models.export import read_metadata
    from tests.training.conftest import write_fashion_mnist
    from training.checkpoint import load_checkpoint

    (tmp_path / "repo").mkdir()
    for name in ("configs", "models", "training", "service", "pyproject.toml"):
        (tmp_path / "repo" / name).symlink_to(ROOT / name)
    data = write_fashion_mnist(tmp_path / "fm", n_train=64, n_test=32)
    common = {"TRAIN_BUDGET_S": "20", "SKIP_KNN": "1", "DINO_FASHION_MNIST_ROOT": str(data)}
    flags = "--batch_size_per_gpu 16 --num_workers 0 --device cpu"
    one_epoch = f"{flags} --max_epochs_this_run 1"  # stops as the call's time limit would
    model_dir = tmp_path / "model_repository" / "dino_default"

    def call(**env: str) -> str:
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        result = _gpu_session(tmp_path, "fmnist", **common, **env)
        steps = (tmp_path / "out" / "steps.log").read_text()
        assert result.returncode == 0, result.stdout[-3000:] + steps
        return steps

    def newest_is_returned(version: str) -> None:
        assert sorted(p.name for p in model_dir.iterdir() if p.is_dir())[-1] == version
        returned = (tmp_path / "out" / "model.onnx").read_bytes()
        assert returned == (model_dir / version / "model.onnx").read_bytes()

    steps = call(FMNIST_EPOCHS="3", FMNIST_EXTRA=one_epoch)
    assert "training 3 epochs (2 of warm-up; FMNIST_EPOCHS" in steps
    assert "exporting its last checkpoint" in steps  # the stop left no export of its own
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["epoch"] == 1
    newest_is_returned("1")

    # Resumed and stopped early again: this call's epoch is exported, not version 1 returned.
    steps = call(FMNIST_RESUME="1", FMNIST_EXTRA=one_epoch)
    assert "run towards 3 epochs (2 of warm-up)" in steps  # the length read from the run
    assert "exporting its last checkpoint" in steps
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["epoch"] == 2
    newest_is_returned("2")

    steps = call(FMNIST_RESUME="1", FMNIST_EPOCHS="3", FMNIST_EXTRA=flags)
    assert "exporting its last checkpoint" not in steps  # the finished run exported itself
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["epoch"] == 3
    newest_is_returned("3")
    assert read_metadata(tmp_path / "out" / "model.onnx")  # a whole exported model

    other = _gpu_session(tmp_path, "fmnist", **common, FMNIST_RESUME="1", FMNIST_EPOCHS="5")
    assert other.returncode == 1 and "has a schedule of 3 epochs" in other.stdout
    shutil.rmtree(tmp_path / "run")
    lost = _gpu_session(tmp_path, "fmnist", **common, FMNIST_RESUME="1", FMNIST_EXTRA=flags)
    assert lost.returncode == 1 and "/run/checkpoint.pth (machine released?)" in lost.stdout


def test_gpu_session_trains_detached_and_collects_in_a_later_call(tmp_path: Path) -> None:
    """fmnist_start returns while the run goes on in its own process session (so the calls
    after it can stage files); fmnist_collect waits for it and brings back what fmnist does."""
    import os
    import signal

    from models.export import read_metadata
    from tests.training.conftest import write_fashion_mnist
    from training.checkpoint import load_checkpoint

    (tmp_path / "repo").mkdir()
    for name in ("configs", "models", "training", "service", "pyproject.toml"):
        (tmp_path / "repo" / name).symlink_to(ROOT / name)
    data = write_fashion_mnist(tmp_path / "fm", n_train=64, n_test=32)
    common = {"DINO_FASHION_MNIST_ROOT": str(data), "SKIP_KNN": "1"}
    early = _gpu_session(tmp_path, "fmnist_collect", **common)
    assert early.returncode == 1 and "no detached run" in early.stdout

    started = _gpu_session(
        tmp_path, "fmnist_start", **common, FMNIST_EPOCHS="2", FMNIST_WATCH_S="0",
        FMNIST_EXTRA="--batch_size_per_gpu 16 --num_workers 0 --device cpu",
    )  # fmt: skip
    pid = int((tmp_path / "run.pid").read_text())
    try:
        assert started.returncode == 0, started.stdout[-3000:]
        assert "training detached: python3 -m training.pretrain" in started.stdout
        # FMNIST_EPOCHS with fewer warm-up epochs, then FMNIST_EXTRA instead of "--compile true"
        assert "--epochs 2 --warmup_epochs 1 --batch_size_per_gpu 16" in started.stdout
        assert not (tmp_path / "out" / "model.onnx").exists()  # nothing collected yet
        collected = _gpu_session(tmp_path, "fmnist_collect", **common, COLLECT_WAIT_S="240")
        assert collected.returncode == 0, collected.stdout[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # a failed assertion leaves no training behind
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "env.txt",
        "fmnist_config.yaml",
        "fmnist_log.txt",
        "model.onnx",
        "steps.log",
        "train_fmnist.tail",
    ]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["epoch"] == 2
    assert read_metadata(out / "model.onnx")
    exported = tmp_path / "model_repository" / "dino_default" / "1" / "model.onnx"
    assert (out / "model.onnx").read_bytes() == exported.read_bytes()


def test_serve_throughput_spreads_the_workers_over_several_replicas(tmp_path: Path) -> None:
    """--replicas starts several services; the workers take them in turn, as a load balancer
    would, and each replica's inferred images are counted from its own /metrics."""
    out = tmp_path / "serve.json"
    result = _run(
        "bench/serve_throughput.py", "--tiny", "--device", "cpu", "--concurrency", "2",
        "--replicas", "2", "--requests", "8", "--seconds", "60", "--raw-seconds", "0.2",
        "--decode-processes", "1", "--json-out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"]["replicas"] == 2
    assert report["settings"]["decode_processes"] == "1"
    for level in report["results"]:
        assert level["failures"] == 0 and level["requests"] == 8
        # one worker on each replica; they share the 8 requests as they finish them
        assert sum(level["replica_images"]) == 8 and min(level["replica_images"]) >= 1
        assert level["server_images"] == 8


# Stands in for ``python3`` in bench/prepare_device.sh: ``-m pip download`` writes stand-in
# wheels (the onnxruntime-gpu one a real zip of an ``onnxruntime`` package with 2.5 MB of
# incompressible bytes) and logs its arguments; anything else runs the real interpreter.
FAKE_PYTHON = """
import os, sys, zipfile
args = sys.argv[1:]
if args[:3] != ["-m", "pip", "download"]:
    os.execv(REAL, [REAL, *args])
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
dest = args[args.index("--dest") + 1]
for spec in args[args.index("--dest") + 2 :]:
    name, version = spec.split("==")
    wheel = os.path.join(dest, f"{name.replace('-', '_')}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(wheel, "w") as archive:
        if name == "onnxruntime-gpu":
            archive.writestr("onnxruntime/__init__.py", "__version__ = 'stand-in'\\n")
            archive.writestr("onnxruntime/capi/blob.bin", os.urandom(2_500_000))
        archive.writestr(f"{name}.dist-info/METADATA", f"Name: {name}\\n")
"""


def test_prepare_device_builds_the_parts_and_wheels_that_the_gpu_session_joins(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "constraints.txt", repo / "constraints.txt")
    fake = tmp_path / "python3"
    fake.write_text(f"#!{sys.executable}\nREAL = {sys.executable!r}\n{FAKE_PYTHON}")
    fake.chmod(0o755)
    log = tmp_path / "pip.log"
    import os

    env = {**os.environ, "PYTHON": str(fake), "FAKE_PIP_LOG": str(log), "PART_MIB": "1"}
    prepared = subprocess.run(
        ["bash", str(ROOT / "bench" / "prepare_device.sh")],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and all("--python-version 3.12" in call for call in calls)
    assert all("--only-binary=:all:" in call and "--no-deps" in call for call in calls)
    assert "onnxruntime-gpu==1.31.1" in calls[1]  # the pinned version
    wheels = sorted(p.name for p in (repo / ".device" / "wheels").iterdir())
    assert "fastapi-0.165.0-py3-none-any.whl" in wheels and len(wheels) == 15
    parts = sorted((repo / ".device" / "ort").glob("part-*"))
    assert [p.name for p in parts] == ["part-00", "part-01", "part-02"]  # 2.5 MB in 1 MiB parts
    assert "3 parts of at most 1 MiB" in prepared.stdout
    assert "with ORT_PARTS=3" in prepared.stdout  # not the session's default of 4

    # the session stages them one per call, then joins, checks and extracts them
    carried = {p.name: p.read_bytes() for p in parts}
    for name, piece in carried.items():
        for old in (repo / ".device" / "ort").glob("part-*"):
            old.unlink()
        (repo / ".device" / "ort" / name).write_bytes(piece)
        assert _gpu_session(tmp_path, "stage", ORT_PARTS="3").returncode == 0
    result = _gpu_session(tmp_path, "serve", ORT_PARTS="3")
    assert "ort-gpu.tar.xz: OK" in result.stdout, result.stdout + result.stderr
    assert (tmp_path / "ortgpu" / "onnxruntime" / "capi" / "blob.bin").stat().st_size == 2_500_000


def test_prepare_device_refuses_a_package_missing_from_the_constraints(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "constraints.txt").write_text("fastapi==0.165.0\n")
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "prepare_device.sh")],
        cwd=repo,
        env={"PATH": "/usr/bin:/bin", "PYTHON": "false"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "starlette is not pinned in constraints.txt" in result.stderr
    assert not (repo / ".device" / "wheels").exists()


def test_the_service_command_sets_the_switch_interval_before_the_module_runs(
    tmp_path: Path, serve_bench: Any
) -> None:
    import os

    assert serve_bench.server_command(None) == [sys.executable, "-m", "service"]
    # a stand-in for the service: reports what it runs under, as ``python -m`` would run it
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "__init__.py").write_text("")
    (tmp_path / "probe" / "__main__.py").write_text(
        "import sys\nprint(__name__, sys.getswitchinterval(), sys.argv[1:])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for interval, expected in ((None, 0.005), (0.5, 0.0005)):
        command = serve_bench.server_command(interval, module="probe")
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        assert result.stdout.split() == ["__main__", str(expected), "[]"]
    for bad in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(SystemExit):
            serve_bench._parser().parse_args(["--server-switch-interval-ms", bad])


def test_batch_assembly_times_both_ways_and_the_round_trip() -> None:
    result = _run(
        "-m",
        "bench.batch_assembly",
        "--size",
        "40x24",
        "--batch",
        "4",
        "--queued",
        "8",
        "--seconds",
        "0.05",
        "--decode-processes",
        "1",
        "--round-trip-images",
        "16",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert (report["size"], report["batch"], report["busy_threads"]) == ([40, 24], 4, 1)
    for condition in ("alone", "busy"):
        times = report["assembly"][condition]
        assert times["stack_ms"] > 0 and times["copy_ms"] > 0
        assert times["ratio"] == pytest.approx(times["stack_ms"] / times["copy_ms"])
    trip = report["round_trip"]
    assert trip["processes"] == 1 and trip["images"] == 16
    assert trip["cpu_ms_per_image"] > 0 and trip["wall_ms_per_image"] > 0
    refused = _run("-m", "bench.batch_assembly", "--size", "40by24")
    assert refused.returncode == 2 and "not WxH" in refused.stderr


def test_fanout_bench_times_both_hand_overs_on_the_same_work() -> None:
    result = _run(
        "-m", "bench.fanout", "--threads", "2", "--concurrency", "3",
        "--images-per-request", "4", "--images", "120",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert (report["threads"], report["concurrency"], report["images_per_request"]) == (2, 3, 4)
    for way in ("executor", "fanout"):
        times = report[way]
        assert times["images"] >= 120 and times["images"] % 4 == 0
        assert times["loop_cpu_us_per_image"] >= 0
        assert times["cpu_us_per_image"] >= times["loop_cpu_us_per_image"]  # a thread of it
        assert times["wall_us_per_image"] > 0
    for key, ratio in report["ratio"].items():
        assert ratio == pytest.approx(report["executor"][key] / report["fanout"][key])
    refused = _run("-m", "bench.fanout", "--threads", "0")
    assert refused.returncode == 2 and "at least 1" in refused.stderr


def test_resize_crop_bench_times_both_ways_on_equal_results() -> None:
    result = _run("-m", "bench.resize_crop", "--sizes", "64x48,40x90", "--seconds", "0.2")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert (report["resolution"], report["interpolation"]) == (224, "bicubic")
    assert [r["source"] for r in report["results"]] == [[64, 48], [40, 90]]
    for row in report["results"]:
        for way in ("pillow", "split"):
            assert row[f"{way}_ms"] > 0 and row[f"prepare_{way}_ms"] > 0
        assert row["ratio"] == pytest.approx(row["pillow_ms"] / row["split_ms"], rel=0.05)
        assert row["prepare_ratio"] == pytest.approx(
            row["prepare_pillow_ms"] / row["prepare_split_ms"], rel=0.05
        )
    assert report["results"][0]["resized"] == [341, 256]  # shorter side to 256 (upscaled)
    for args, why in [
        (("--sizes", "64by48"), "not WxH"),
        (("--sizes", ","), "no size given"),
        (("--seconds", "0"), "positive number of seconds"),
        (("--seconds", "nan"), "positive number of seconds"),
        (("--interpolation", "nearest"), "invalid choice"),
    ]:
        refused = _run("-m", "bench.resize_crop", *args)
        assert refused.returncode == 2 and why in refused.stderr, (args, refused.stderr)
    too_long = _run("-m", "bench.resize_crop", "--sizes", "40000x10", "--seconds", "0.1")
    assert too_long.returncode == 1 and "EXACT_RESIZE_MAX_PIXELS" in too_long.stderr


def test_resize_crop_bench_stops_when_the_ways_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.resize_crop as bench

    def off_by_one_column(image: Any, size: Any, box: Any, resample: Any) -> Any:
        left, top, right, bottom = box
        return image.resize(size, resample).crop((left + 1, top, right + 1, bottom))

    monkeypatch.setattr(bench, "resize_then_crop", off_by_one_column)
    with pytest.raises(SystemExit, match="disagree on 400x300"):
        bench.compare((400, 300), resolution=224, interpolation="bicubic", seconds=0.1)
