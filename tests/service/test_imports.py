"""The service never imports torch (nor the exporter's onnx package)."""

from __future__ import annotations

import subprocess
import sys


def test_service_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import service.app, service.__main__, service.runtime, service.repository\n"
        "app = service.app.create_app(service.settings.Settings())\n"
        "bad = sorted(m for m in ('torch', 'torchvision', 'onnx', 'models.vit', 'training')"
        " if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
