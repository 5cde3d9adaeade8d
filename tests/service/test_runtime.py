"""Loading a model: contract check, metadata, load-time self-check, device selection."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest

from models.contract import CONTRACT_VERSION, MetadataKey, model_path
from service.attention import attention_bytes
from service.runtime import (
    CPU,
    DeviceUnavailableError,
    ModelLoadError,
    RunControl,
    gpu_present,
    load_model,
    requested_providers,
)
from tests.conftest import TINY_MODEL_NAME
from tests.service.conftest import png_bytes

no_gpu = pytest.mark.skipif(gpu_present(), reason="needs a machine without an NVIDIA GPU")


@pytest.fixture(scope="module")
def tiny_path(tiny_model_repository: Path) -> Path:
    return model_path(tiny_model_repository, TINY_MODEL_NAME, 1)


def _variant(source: Path, destination: Path, edit: object) -> Path:
    proto = onnx.load(str(source))
    edit(proto)  # type: ignore[operator]
    onnx.save(proto, str(destination))
    return destination


def _set_meta(proto: onnx.ModelProto, key: str, value: str | None) -> None:
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != key]
    del proto.metadata_props[:]
    for k, v in kept + ([(key, value)] if value is not None else []):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def test_load_checks_and_runs(tiny_path: Path) -> None:
    model = load_model(tiny_path, name="tiny", version=1, device="cpu", warmup_batch_sizes=(1, 3))
    assert model.provider == CPU
    assert model.self_check is not None and model.self_check.cases == 2
    assert model.self_check.max_abs_error < 1e-4 and model.self_check.min_cosine > 0.9999
    assert (model.metadata.patch_size, model.metadata.embed_dim, model.metadata.num_heads) == (
        8,
        32,
        2,
    )
    out = model.run(np.zeros((2, 3, 40, 24), np.float32), ("cls_embedding", "attention_maps"))
    assert out["cls_embedding"].shape == (2, 32)
    assert out["attention_maps"].shape == (2, 2, 15)  # (B, heads, 5 x 3 patches)


def test_a_terminated_run_control_stops_the_call(tiny_path: Path) -> None:
    model = load_model(tiny_path, name="tiny", version=1, device="cpu", warmup_batch_sizes=(1,))
    pixels = np.zeros((2, 3, 40, 24), np.float32)
    control = RunControl()
    assert not control.terminated
    assert model.run(pixels, ("cls_embedding",), control)["cls_embedding"].shape == (2, 32)
    control.terminate()
    assert control.terminated
    with pytest.raises(Exception, match="terminate"):  # onnxruntime's own Fail error
        model.run(pixels, ("cls_embedding",), control)
    assert model.run(pixels, ("cls_embedding",), RunControl())["cls_embedding"].shape == (2, 32)


def test_cpu_memory_arena_is_off_unless_asked_for(tiny_path: Path) -> None:
    default = load_model(tiny_path, name="tiny", version=1, device="cpu")
    assert default.session.get_session_options().enable_cpu_mem_arena is False
    kept = load_model(tiny_path, name="tiny", version=1, device="cpu", cpu_memory_arena=True)
    assert kept.session.get_session_options().enable_cpu_mem_arena is True


def test_intra_op_threads_do_not_spin_unless_asked_to(tiny_path: Path) -> None:
    key = "session.intra_op.allow_spinning"
    default = load_model(tiny_path, name="tiny", version=1, device="cpu")
    assert default.session.get_session_options().get_session_config_entry(key) == "0"
    spinning = load_model(tiny_path, name="tiny", version=1, device="cpu", intra_op_spinning=True)
    assert spinning.session.get_session_options().get_session_config_entry(key) == "1"


def test_onnxruntime_process_wide_notes_do_not_reach_the_log(tiny_path: Path) -> None:
    # On a GPU, onnxruntime 1.31's process-wide logger warns at every CUDA session that no
    # plugin CUDA device is registered, then binds its built-in CUDA provider. That logger is
    # not the session's: turned up to verbose here, it shows whether load_model quiets it.
    # At DINO_LOG_LEVEL=debug its warnings stay (verbose notes go: severity 2).
    script = (
        "import logging, sys, onnxruntime as ort\n"
        "from pathlib import Path\n"
        "from service.runtime import load_model\n"
        "logging.getLogger('service').setLevel(sys.argv[2])\n"
        "ort.set_default_logger_severity(0)\n"
        "load_model(Path(sys.argv[1]), name='tiny', version=1, device='cpu')\n"
        "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
    )
    logged = {}
    for level in ("INFO", "DEBUG"):
        done = subprocess.run(
            [sys.executable, "-c", script, str(tiny_path), level],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        assert done.returncode == 0, done.stderr
        logged[level] = done.stderr
    assert "onnxruntime:Default" not in logged["INFO"], logged["INFO"][:2000]
    assert "[I:onnxruntime:Default" not in logged["DEBUG"]


def test_tampered_reference_outputs_are_refused(tiny_path: Path, tmp_path: Path) -> None:
    def tamper(proto: onnx.ModelProto) -> None:
        reference = json.loads(
            {p.key: p.value for p in proto.metadata_props}[MetadataKey.REFERENCE]
        )
        reference["cases"][0]["cls_embedding"][0] += 0.01
        _set_meta(proto, MetadataKey.REFERENCE, json.dumps(reference))

    path = _variant(tiny_path, tmp_path / "tampered.onnx", tamper)
    with pytest.raises(ModelLoadError, match="self-check failed"):
        load_model(path, name="tiny", version=1, device="cpu")


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        (MetadataKey.PREPROCESSING, None, "metadata lacks"),
        (MetadataKey.CONTRACT_VERSION, CONTRACT_VERSION + "9", "contract version"),
        (MetadataKey.PATCH_SIZE, "seven", "malformed metadata"),
        (MetadataKey.RESOLUTION, "36", "disagree"),
        (MetadataKey.REFERENCE, "{}", "malformed metadata"),
        # json reads 1e999 as infinity: int() of it is an OverflowError, not a ValueError
        (
            MetadataKey.REFERENCE,
            '{"cases": [], "max_abs_error": 1, "min_cosine": 1, "resolution": 1e999}',
            "malformed metadata",
        ),
        (MetadataKey.PREPROCESSING, "[" * 100_000, "malformed metadata"),  # RecursionError
        # Responses, /v1/models and a metric label repeat the digest: a 16 MiB one made every
        # answer 16.8 MB.
        (MetadataKey.WEIGHTS_SHA256, "x" * 100_000, "is not a SHA-256 digest"),
        (MetadataKey.WEIGHTS_SHA256, "", "is not a SHA-256 digest"),
        (MetadataKey.PRECISION, "float8", "unknown precision"),
    ],
)
def test_bad_metadata_is_refused(
    tiny_path: Path, tmp_path: Path, key: str, value: str | None, fragment: str
) -> None:
    path = _variant(tiny_path, tmp_path / "bad.onnx", lambda p: _set_meta(p, key, value))
    with pytest.raises(ModelLoadError, match=fragment):
        load_model(path, name="tiny", version=1, device="cpu")


def test_contract_mismatch_is_refused(tiny_path: Path, tmp_path: Path) -> None:
    def rename(proto: onnx.ModelProto) -> None:
        for node in proto.graph.node:
            node.output[:] = ["cls" if o == "cls_embedding" else o for o in node.output]
        for output in proto.graph.output:
            if output.name == "cls_embedding":
                output.name = "cls"

    path = _variant(tiny_path, tmp_path / "renamed.onnx", rename)
    with pytest.raises(ModelLoadError, match="'cls_embedding' is missing"):
        load_model(path, name="tiny", version=1, device="cpu")


def test_a_model_whose_outputs_are_nan_is_refused(tiny_path: Path, tmp_path: Path) -> None:
    # NaN weights: max() and min() skip NaN, so the tolerance comparison alone passed it.
    def nan_cls(proto: onnx.ModelProto) -> None:
        for node in proto.graph.node:
            node.output[:] = ["raw_cls" if o == "cls_embedding" else o for o in node.output]
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(np.array(np.nan, np.float32), "nan")
        )
        proto.graph.node.append(onnx.helper.make_node("Mul", ["raw_cls", "nan"], ["cls_embedding"]))

    path = _variant(tiny_path, tmp_path / "nan.onnx", nan_cls)
    with pytest.raises(ModelLoadError, match="are not finite"):
        load_model(path, name="tiny", version=1, device="cpu")


def _reroute(proto: onnx.ModelProto, output: str, nodes: list[onnx.NodeProto]) -> None:
    """Make ``output`` the result of ``nodes`` applied to what the graph computed for it."""
    for node in proto.graph.node:
        node.output[:] = [f"{output}_raw" if o == output else o for o in node.output]
    proto.graph.node.extend(nodes)


@pytest.mark.parametrize("output", ["patch_features", "attention_maps"])
def test_a_model_whose_dense_outputs_are_not_finite_is_refused(
    tiny_path: Path, tmp_path: Path, output: str
) -> None:
    # The reference check sees only CLS: such a model was ready, and every request for these
    # outputs failed with a 500 and a traceback (JSON) or got NaN silently (base64).
    def nan_output(proto: onnx.ModelProto) -> None:
        nan = onnx.numpy_helper.from_array(np.array(np.nan, np.float32), "nan")
        proto.graph.initializer.append(nan)
        _reroute(proto, output, [onnx.helper.make_node("Mul", [f"{output}_raw", "nan"], [output])])

    path = _variant(tiny_path, tmp_path / "nan.onnx", nan_output)
    with pytest.raises(ModelLoadError, match=f"{output} on a .* is not finite"):
        load_model(path, name="tiny", version=1, device="cpu")


def test_outputs_that_are_not_floats_are_refused(tiny_path: Path, tmp_path: Path) -> None:
    def integer_attention(proto: onnx.ModelProto) -> None:
        cast = onnx.helper.make_node(
            "Cast", ["attention_maps_raw"], ["attention_maps"], to=onnx.TensorProto.INT64
        )
        _reroute(proto, "attention_maps", [cast])
        for declared in proto.graph.output:
            if declared.name == "attention_maps":
                declared.type.tensor_type.elem_type = onnx.TensorProto.INT64

    path = _variant(tiny_path, tmp_path / "int.onnx", integer_attention)
    with pytest.raises(ModelLoadError, match="'attention_maps' is a tensor\\(int64\\), not floats"):
        load_model(path, name="tiny", version=1, device="cpu")


def test_a_graph_that_never_ends_is_stopped_by_the_load_timeout(
    tiny_path: Path, tmp_path: Path
) -> None:
    # A Loop of 10^15 iterations whose result is multiplied by 0 and added to the CLS output:
    # before, the load (and every later refresh, and the shutdown) waited for it forever.
    def endless(proto: onnx.ModelProto) -> None:
        body = onnx.helper.make_graph(
            [
                onnx.helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                onnx.helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
            ],
            "body",
            [
                onnx.helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
                onnx.helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
                onnx.helper.make_tensor_value_info("acc_in", onnx.TensorProto.FLOAT, []),
            ],
            [
                onnx.helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
                onnx.helper.make_tensor_value_info("acc_out", onnx.TensorProto.FLOAT, []),
            ],
            [onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one")],
        )
        proto.graph.initializer.extend(
            [
                onnx.numpy_helper.from_array(np.array(10**15, np.int64), "trips"),
                onnx.numpy_helper.from_array(np.array(True), "go"),
                onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            ]
        )
        _reroute(
            proto,
            "cls_embedding",
            [
                onnx.helper.make_node("Loop", ["trips", "go", "zero"], ["spun"], body=body),
                onnx.helper.make_node("Mul", ["spun", "zero"], ["nothing"]),
                onnx.helper.make_node("Add", ["cls_embedding_raw", "nothing"], ["cls_embedding"]),
            ],
        )

    path = _variant(tiny_path, tmp_path / "endless.onnx", endless)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="did not finish within 1 s"):
        load_model(path, name="tiny", version=1, device="cpu", timeout_s=1.0)
    assert time.monotonic() - started < 30
    control = RunControl()  # the service shutting down stops it as well
    threading.Timer(0.5, control.terminate).start()
    with pytest.raises(ModelLoadError, match="stopped \\(the service is shutting down\\)"):
        load_model(path, name="tiny", version=1, device="cpu", control=control)


def test_load_time_runs_stay_within_the_attention_budget(tiny_path: Path, tmp_path: Path) -> None:
    # A default resolution the model could not serve (every plain request a 413) was warmed up
    # anyway, allocating whatever the metadata asked for.
    model = load_model(tiny_path, name="tiny", version=1, device="cpu", max_attention_bytes=10**9)
    assert model.self_check is not None
    one = attention_bytes(width=32, height=32, patch_size=8, num_heads=2)  # tiny: 32 px, 2 heads
    with pytest.raises(ModelLoadError, match="over DINO_MAX_BATCH_ATTENTION_BYTES"):
        load_model(tiny_path, name="tiny", version=1, device="cpu", max_attention_bytes=one - 1)
    # Warm-up batches are cut to what fits, as the batcher cuts request batches.
    warmed = load_model(
        tiny_path,
        name="tiny",
        version=1,
        device="cpu",
        warmup_batch_sizes=(64,),
        max_attention_bytes=4 * one + 4 * one,  # the reference batch (2 cases) and 8 of warm-up
    )
    assert warmed.self_check is not None


def test_a_file_cannot_loosen_its_own_self_check(tiny_path: Path, tmp_path: Path) -> None:
    # Expected outputs negated with min_cosine -1 and a huge max_abs_error: loaded before.
    def loosen(proto: onnx.ModelProto) -> None:
        props = {p.key: p.value for p in proto.metadata_props}
        reference = json.loads(props[MetadataKey.REFERENCE])
        for case in reference["cases"]:
            case["cls_embedding"] = [-v for v in case["cls_embedding"]]
        reference["min_cosine"], reference["max_abs_error"] = -1.0, 100.0
        _set_meta(proto, MetadataKey.REFERENCE, json.dumps(reference))

    path = _variant(tiny_path, tmp_path / "loose.onnx", loosen)
    with pytest.raises(ModelLoadError, match="self-check failed"):
        load_model(path, name="tiny", version=1, device="cpu")


def test_a_fifo_or_a_device_is_not_read(tmp_path: Path) -> None:
    # A FIFO as model.onnx blocked the scan forever (no writer), and /dev/zero never ends.
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(ModelLoadError, match="is not a regular file"):
            load_model(path, name="tiny", version=1, device="cpu")


def test_a_fixed_input_size_is_refused(tiny_path: Path, tmp_path: Path) -> None:
    # Requests may ask for any patch-multiple size: a graph frozen at 32x32 would fail them.
    def freeze(proto: onnx.ModelProto) -> None:
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        for axis in (2, 3):
            dims[axis].ClearField("dim_param")
            dims[axis].dim_value = 32

    path = _variant(tiny_path, tmp_path / "fixed.onnx", freeze)
    with pytest.raises(ModelLoadError, match="fixed height of 32"):
        load_model(path, name="tiny", version=1, device="cpu")


def test_outputs_off_the_patch_grid_are_refused(tiny_path: Path, tmp_path: Path) -> None:
    # patch_features[:, 1:, :]: every declared axis is right, only a run shows one token missing.
    def drop_first_token(proto: onnx.ModelProto) -> None:
        for node in proto.graph.node:
            node.output[:] = ["raw" if o == "patch_features" else o for o in node.output]
        proto.graph.initializer.extend(
            onnx.numpy_helper.from_array(np.array([value], np.int64), name)
            for name, value in (("start", 1), ("end", 2**62), ("axis", 1))
        )
        proto.graph.node.append(
            onnx.helper.make_node("Slice", ["raw", "start", "end", "axis"], ["patch_features"])
        )

    path = _variant(tiny_path, tmp_path / "dropped.onnx", drop_first_token)
    with pytest.raises(ModelLoadError, match=r"'patch_features' has shape \[1, 14, 32\]"):
        load_model(path, name="tiny", version=1, device="cpu")


def test_a_model_that_fails_on_an_odd_patch_count_is_refused(
    tiny_path: Path, tmp_path: Path
) -> None:
    # Reshaping the patch tokens into pairs fails when their number is odd: the square warm-up
    # (4 x 4 patches) passes, so the probe of other sizes must use an odd grid.
    def pair_tokens(proto: onnx.ModelProto) -> None:
        for node in proto.graph.node:
            node.output[:] = ["raw" if o == "patch_features" else o for o in node.output]
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(np.array([0, -1, 2, 32], np.int64), "pairs_shape")
        )
        proto.graph.node.extend(
            [
                onnx.helper.make_node("Shape", ["raw"], ["raw_shape"]),
                onnx.helper.make_node("Reshape", ["raw", "pairs_shape"], ["pairs"]),
                onnx.helper.make_node("Reshape", ["pairs", "raw_shape"], ["patch_features"]),
            ]
        )

    path = _variant(tiny_path, tmp_path / "pairs.onnx", pair_tokens)
    with pytest.raises(ModelLoadError, match="fails on a 24x40 input"):
        load_model(path, name="tiny", version=1, device="cpu")


def test_unreadable_files_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(garbage, name="tiny", version=1, device="cpu")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(tmp_path / "absent.onnx", name="tiny", version=1, device="cpu")


def test_cpu_device_requests_only_the_cpu() -> None:
    assert requested_providers("cpu") == [CPU]


@no_gpu
def test_auto_uses_the_cpu_quietly_without_a_gpu(tiny_path: Path) -> None:
    assert requested_providers("auto") == [CPU]
    code = (
        "from pathlib import Path; from service.runtime import load_model; "
        f"m = load_model(Path({str(tiny_path)!r}), name='t', version=1, device='auto'); "
        "print(m.provider)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == CPU
    assert result.stderr.strip() == ""  # no error-level noise from a CUDA provider


def _run_service(
    arguments: list[str], repository: Path, **settings: str
) -> subprocess.CompletedProcess[str]:
    """Run the Python interpreter on ``arguments`` with the tiny model's ``DINO_*`` settings."""
    env = {
        **os.environ,
        "DINO_DEVICE": "cpu",
        "DINO_HOST": "127.0.0.1",
        "DINO_PORT": "0",
        "DINO_MODEL_REPOSITORY": str(repository),
        "DINO_MODEL_NAME": TINY_MODEL_NAME,
        **settings,
    }
    return subprocess.run(
        [sys.executable, *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


@no_gpu
def test_cuda_device_fails_at_start_without_a_gpu(
    tiny_path: Path, tiny_model_repository: Path
) -> None:
    with pytest.raises(DeviceUnavailableError, match="DINO_DEVICE=cuda"):
        load_model(tiny_path, name="tiny", version=1, device="cuda")
    result = _run_service(["-m", "service"], tiny_model_repository, DINO_DEVICE="cuda")
    assert result.returncode == 3
    assert "DINO_DEVICE=cuda" in result.stderr and "Traceback" not in result.stderr


def test_a_port_already_taken_exits_3_with_the_reason(
    tiny_model_repository: Path,
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = _run_service(["-m", "service"], tiny_model_repository, DINO_PORT=port)
    assert result.returncode == 3, result.stderr[-2000:]  # uvicorn's startup-failure status
    assert "address already in use" in result.stderr and "Traceback" not in result.stderr


def test_a_device_that_cannot_be_bound_at_load_stops_the_server(
    tiny_model_repository: Path,
) -> None:
    # The CUDA provider is there but binding it fails when the session is created (a driver
    # or cuDNN mismatch): found only by the first load, after the server started listening.
    # python -m service then stops with status 3, one line, no traceback.
    script = (
        "import functools, sys\n"
        "import service.__main__ as entry\n"
        "from service.app import create_app\n"
        "from service.runtime import DeviceUnavailableError\n"
        "def loader(path, **kwargs):\n"
        "    raise DeviceUnavailableError('DINO_DEVICE=cuda: CUDA could not be bound (test)')\n"
        "entry.cuda_unavailable_reason = lambda: None\n"
        "entry.create_app = functools.partial(create_app, loader=loader)\n"
        "sys.exit(entry.main([]))\n"
    )
    result = _run_service(["-c", script], tiny_model_repository, DINO_DEVICE="cuda")
    assert result.returncode == 3, result.stderr[-2000:]
    assert "CUDA could not be bound (test)" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_invalid_settings_exit_with_a_message() -> None:
    env = {**os.environ, "DINO_VERSION_POLICY": "pinned"}
    env.pop("DINO_MODEL_VERSION", None)
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert "DINO_MODEL_VERSION" in result.stderr


def _service_env(repository: Path, **settings: str) -> tuple[dict[str, str], int]:
    """Environment for ``python -m service`` on a free loopback port (and that port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "DINO_DEVICE": "cpu",
        "DINO_HOST": "127.0.0.1",
        "DINO_PORT": str(port),
        "DINO_MODEL_REPOSITORY": str(repository),
        "DINO_MODEL_NAME": TINY_MODEL_NAME,
        **settings,
    }
    return env, port


def _start_service(env: dict[str, str]) -> subprocess.Popen[str]:
    """``python -m service`` with ``env``; its stderr is piped, its stdout dropped."""
    return subprocess.Popen(
        [sys.executable, "-m", "service"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_until_ready(process: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail("the service did not become ready")


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_the_server_without_a_traceback(
    tiny_model_repository: Path, signal_number: int
) -> None:
    env, port = _service_env(tiny_model_repository)
    process = _start_service(env)
    try:
        _wait_until_ready(process, port)
        process.send_signal(signal_number)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # Ctrl-C: 130, the shell's convention; SIGTERM, the normal stop: 0 (uvicorn raises it
    # again after its graceful shutdown, which used to kill the process: status 143).
    expected = 130 if signal_number == signal.SIGINT else 0
    assert process.returncode == expected, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert "Finished server process" in stderr


def test_a_client_that_never_reads_its_answer_cannot_hold_a_stop(
    tiny_model_repository: Path,
) -> None:
    """uvicorn waited without limit for a connection to finish sending a large answer that its
    client never read: SIGTERM never ended the process (a container was SIGKILLed)."""
    env, port = _service_env(tiny_model_repository, DINO_SHUTDOWN_TIMEOUT_S="2")
    process = _start_service(env)
    image = png_bytes(300, 200)
    boundary = "b0undary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in (("resolution", "256"), ("outputs", "cls,patch"))
    ]
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
        'filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    ).encode()
    parts += [head + image + b"\r\n"] * 16  # about 10 MB of JSON to send back
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = (
        f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        _wait_until_ready(process, port)
        client.connect(("127.0.0.1", port))
        client.sendall(request + body)  # and never read the answer
        time.sleep(3)  # answered and stuck in sending
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        took = time.monotonic() - stopped_at
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr[-2000:]
    assert took < 20, took  # the 2 s limit and the lifespan's own stop; not without end
    assert "Traceback" not in stderr, stderr[-2000:]


def test_a_stop_does_not_wait_for_a_model_load_in_progress(tiny_model_repository: Path) -> None:
    """A load cannot be interrupted (reading the file, building the session): the stopping
    process waited for it, and a second SIGTERM could not end that wait."""
    env, _ = _service_env(tiny_model_repository)
    script = (
        "import sys, time\n"
        "import service.__main__ as entry\n"
        "from service.app import create_app\n"
        "def slow_loader(*args, **kwargs):\n"
        "    print('loading', flush=True)\n"
        "    time.sleep(60)\n"
        "entry.create_app = lambda settings, on_fatal=None: create_app(\n"
        "    settings, on_fatal=on_fatal, loader=slow_loader)\n"
        "sys.exit(entry.main([]))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "loading"  # the load thread is busy
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        took = time.monotonic() - stopped_at
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr[-2000:]
    assert took < 20, took
    assert "Finished server process" in stderr
