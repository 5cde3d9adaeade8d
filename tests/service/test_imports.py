"""The service never imports torch (nor the exporter's onnx package); its decode worker process
imports neither onnxruntime nor the web stack."""

from __future__ import annotations

import subprocess
import sys

from service.decode_pool import WORKER_COMMAND


def _loaded(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter holds after running ``code``."""
    script = f"import sys\n{code}\nprint(','.join(m for m in {modules!r} if m in sys.modules))\n"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return [name for name in result.stdout.strip().split(",") if name]


def test_service_imports_no_torch() -> None:
    code = (
        "import service.app, service.__main__, service.runtime, service.repository\n"
        "app = service.app.create_app(service.settings.Settings())"
    )
    assert _loaded(code, ("torch", "torchvision", "onnx", "models.vit", "training")) == []


def test_the_decode_worker_imports_neither_onnxruntime_nor_the_web_stack() -> None:
    assert WORKER_COMMAND[-1] == "service.decode_worker"
    heavy = ("onnxruntime", "fastapi", "uvicorn", "starlette", "torch")
    assert _loaded("import service.decode_worker", heavy) == []
