# tunepipe on a CUDA machine.
#
#   docker build -t tunepipe .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/workspace/runs" tunepipe run examples/quickstart.yaml
#   docker run --gpus all --ipc=host tunepipe stage tokenize examples/quickstart.yaml --workdir s3://bucket/runs
#
# --ipc=host: NCCL and DataLoader workers share tensors through /dev/shm, which Docker caps at 64 MB.
# The CUDA base only has to match the torch wheel's CUDA (the wheel brings its own CUDA and cuDNN
# libraries); change both build args together, e.g. --build-arg CUDA_IMAGE=... --build-arg TORCH_CUDA=cu126.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# python3.11-dev and build-essential: DeepSpeed compiles its ops (e.g. cpu_adam for ZeRO-Offload)
# just in time, on first use, and needs a C++ compiler and Python.h for that.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv "$VIRTUAL_ENV" \
    && pip install --upgrade pip

# torch first and from the CUDA index, in its own layer: `pip install .` accepts any torch>=2.4,
# so it keeps this build instead of pulling PyPI's default one, and code changes do not re-download it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"

WORKDIR /opt/tunepipe
# README.m[d]: pyproject.toml names it as the long description, but the build need not fail without it.
COPY pyproject.toml setup.py README.m[d] ./
COPY pipeline ./pipeline
COPY flows ./flows
COPY deepspeed_configs ./deepspeed_configs
# The check runs outside the source folder so that it imports the installed package, and fails
# the build if anything replaced the CUDA torch.
# The gpu extra: bitsandbytes, for QLoRA's 4-bit bases.
RUN pip install ".[gpu]" \
    && cd / && tunepipe --help > /dev/null \
    && python -c "from pipeline.train.parallel.zero_config import config_path; [config_path(n) for n in ('zero1', 'zero2', 'zero3', 'zero3_offload')]" \
    && python -c "import torch; assert torch.__version__ == '${TORCH_VERSION}+${TORCH_CUDA}', torch.__version__"

# The example presets are referred to by paths relative to the working directory; the DeepSpeed
# presets ship inside the package (train.deepspeed_config: zero2 resolves anywhere).
WORKDIR /workspace
COPY examples ./examples

ENTRYPOINT ["tunepipe"]
CMD ["--help"]
