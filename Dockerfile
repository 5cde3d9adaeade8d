# syntax=docker/dockerfile:1
#
# Two targets:
#   serve  the feature service: the `serve` extra only (no torch), onnxruntime-gpu on a
#          CUDA 13 / cuDNN 9 runtime so the CUDA execution provider binds; the bundled model
#          repository at /models. `docker build --target serve -t dino-features:serve .`
#   train  torch + torchvision for `python -m training.pretrain`, `python -m models.export`
#          and `python -m training.eval_knn`. `docker build --target train -t dino-features:train .`
#
# Each target installs the pins of its extra (read from pyproject.toml, i.e. `pip install .[serve]`
# or `.[train]` split in two), every indirect dependency held at its version in constraints.txt
# (`make lock`), in a layer of their own, so editing the code does not reinstall them, and then
# the project itself with --no-deps.

# ---------------------------------------------------------------------------------------------
# serve: build the virtual environment on the same base the runtime stage uses (same Python).
FROM nvidia/cuda:13.3.0-cudnn-runtime-ubuntu24.04 AS serve-build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['serve']))" > /tmp/requirements-serve.txt \
    && pip install --no-cache-dir -r /tmp/requirements-serve.txt -c constraints.txt
# README.md (the package's long description) comes with the code: editing it reinstalls nothing.
COPY README.md LICENSE ./
COPY models/ models/
COPY service/ service/
RUN pip install --no-cache-dir --no-deps .

# ---------------------------------------------------------------------------------------------
# serve: the runtime image. Python from the base's distribution, the venv, the bundled model.
FROM nvidia/cuda:13.3.0-cudnn-runtime-ubuntu24.04 AS serve
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 dino \
    && useradd --system --uid 10001 --gid dino --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin dino
COPY --from=serve-build /opt/venv /opt/venv
COPY model_repository/ /models/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DINO_HOST=0.0.0.0 \
    DINO_PORT=8000 \
    DINO_MODEL_REPOSITORY=/models
WORKDIR /srv
USER 10001:10001
EXPOSE 8000
# Ready means loaded, self-checked and warm; urllib raises (exit 1) on anything but 2xx.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('DINO_PORT', '8000') + '/readyz', timeout=4)"]
CMD ["python", "-m", "service"]

# ---------------------------------------------------------------------------------------------
# train: torch's wheels bring their own CUDA libraries, so a slim Python base is enough.
FROM python:3.12.11-slim-bookworm AS train-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['train']))" > /tmp/requirements-train.txt \
    && pip install --no-cache-dir -r /tmp/requirements-train.txt -c constraints.txt
COPY README.md LICENSE ./
COPY models/ models/
COPY training/ training/
COPY service/ service/
RUN pip install --no-cache-dir --no-deps .

FROM python:3.12.11-slim-bookworm AS train
# Fashion-MNIST (Debian's dataset-fashion-mnist, 30 MB) backs `--data_path fashion-mnist:train`
# and `training.eval_knn --dataset fashion-mnist` with no download. g++ is for `--compile true`:
# torch's inductor compiles C++ (the CPU) and Triton a small C launcher (CUDA) when the step is
# first compiled (the image's Python already has its headers).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        dataset-fashion-mnist=0.0~git20200523.55506a9-1 g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 dino \
    && useradd --system --uid 10001 --gid dino --create-home --home-dir /home/dino \
        --shell /bin/bash dino \
    && mkdir -p /cache /workspace \
    && chmod 1777 /cache /workspace
COPY --from=train-build /opt/venv /opt/venv
# The shipped recipes, so `--config configs/pretrain/...` works without a mount.
COPY configs/ /workspace/configs/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/cache \
    TORCH_HOME=/cache/torch \
    DINO_MODEL_REPOSITORY=/models
WORKDIR /workspace
USER 10001:10001
# Generic: `docker run ... dino-features:train python -m training.pretrain --help`.
CMD ["python", "-m", "training.pretrain", "--help"]
