#!/usr/bin/env bash
# Build, from PyPI, what bench/gpu_session.sh's serve stage carries to a lent GPU machine
# (Python 3.12 there, without network):
#   .device/ort/part-00 ..   onnxruntime-gpu's package directory as one tar.xz, cut in parts of
#                            $PART_MIB MiB (50: one part and the tree, about 12 MiB, fit a
#                            call's 64 MiB; 1.31.1 makes 4 parts, 194 MiB in all)
#   .device/ort/ort-gpu.tar.xz.sha256   the joined archive's digest, checked before extraction
#   .device/wheels/*.whl     the serve extra's packages that machine lacks (about 10 MiB)
# Versions come from constraints.txt, so the GPU run serves with what the tests ran.
# Usage: bash bench/prepare_device.sh   (a few minutes; downloads about 250 MB once, into
# .device/cache; rerunning rebuilds the parts and the wheel folder). Then, on the machine:
# PART=stage once per part (carry .device/ort/part-0N), then PART=serve (carry .device/wheels
# and .device/ort/ort-gpu.tar.xz.sha256); see bench/gpu_session.sh. ORT_PARTS there must equal
# the number of parts this prints (4 by default).
# A dry run of those calls without a GPU (about 1 min): put a Python 3.12 venv holding only the
# machine's packages first in PATH, set STAGE_DIR, ORT_DIR and OUT to scratch folders, run
# PART=stage four times, then PART=serve with SERVE_EXTRA="--device cpu --model-repository
# model_repository --model-name dino_default --concurrency 1 --seconds 2" (the serve stage
# installs the wheels into /tmp/svcdeps; remove it afterwards).
set -euo pipefail
PY=${PYTHON:-python3}
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
PART_MIB=${PART_MIB:-50}
ROOT=${DEVICE_DIR:-.device}
# The machine already has numpy, pillow, anyio, h11, click, httpx, prometheus-client, uvloop.
SERVE_WHEELS=(fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv
  python-multipart orjson uvicorn httptools annotated-types annotated-doc typing-inspection
  typing-extensions opentelemetry-api)

pin() {  # NAME -> NAME==VERSION from constraints.txt
  local version
  version=$(sed -n "s/^$1==//p" constraints.txt)
  [ -n "$version" ] || { echo "$1 is not pinned in constraints.txt" >&2; exit 1; }
  echo "$1==$version"
}
download() {  # DEST SPEC...: binary wheels for the machine's Python on manylinux x86_64
  "$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version "$DEVICE_PYTHON" --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --dest "$@"
}

mkdir -p "$ROOT/cache"
specs=()
for name in "${SERVE_WHEELS[@]}"; do specs+=("$(pin "$name")"); done
rm -rf "$ROOT/wheels" && mkdir -p "$ROOT/wheels"
download "$ROOT/wheels" "${specs[@]}"
echo "wheels: $(ls "$ROOT/wheels" | wc -l) files, $(du -sh "$ROOT/wheels" | cut -f1)"

ort=$(pin onnxruntime-gpu)
download "$ROOT/cache" "$ort"
wheel=$(ls "$ROOT"/cache/onnxruntime_gpu-"${ort#*==}"-*.whl | head -1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m zipfile -e "$wheel" "$work/pkg"
[ -f "$work/pkg/onnxruntime/__init__.py" ] || { echo "no onnxruntime package in $wheel" >&2; exit 1; }
tar -C "$work/pkg" -cJf "$work/ort-gpu.tar.xz" onnxruntime
rm -rf "$ROOT/ort" && mkdir -p "$ROOT/ort"
(cd "$work" && sha256sum ort-gpu.tar.xz) > "$ROOT/ort/ort-gpu.tar.xz.sha256"
split -b "${PART_MIB}M" -d -a 2 "$work/ort-gpu.tar.xz" "$ROOT/ort/part-"
parts=$(ls "$ROOT"/ort/part-* | wc -l)
echo "onnxruntime-gpu ${ort#*==}: $parts parts of at most $PART_MIB MiB"
if [ "$parts" -ne 4 ]; then
  echo "run bench/gpu_session.sh's stages with ORT_PARTS=$parts (its default is 4)"
fi
ls -la "$ROOT/ort"
