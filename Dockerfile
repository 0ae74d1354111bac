# The diffrep environment: Python 3.11, the project installed with the README's install step
# (`make setup`: .venv + `pip install -e '.[dev]'`, the same target CI's `make test` runs first).
#
#   docker build -t diffrep:cpu .                                   # CPU base (python:3.11-slim)
#   docker build -t diffrep:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
#
# The CUDA variant is the same image with torch's CUDA wheels (they carry the CUDA runtime; the GPU
# node supplies only the NVIDIA driver). With TORCH_INDEX_URL empty, pip takes torch from PyPI,
# whose Linux x86_64 wheels are CUDA builds too; https://download.pytorch.org/whl/cpu gives a
# smaller CPU-only image. See docs/orchestration.md, "Retraining on GPUs".
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# make: the install step is a Makefile target; git: lineage records the checkout's commit,
# and DVC needs the checkout to be a git repository.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make git \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory '*'

ARG TORCH_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    DVC_NO_ANALYTICS=1 \
    GX_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PYTHONUNBUFFERED=1

WORKDIR /opt/diffrep
# What the install needs first (a code-only change then reuses the dependency layer)
COPY pyproject.toml README.md Makefile ./
COPY src ./src
RUN make setup
COPY . .

# The venv's tools (python, prefect, dvc, diffrep) first on PATH, as after `source .venv/bin/activate`
ENV PATH=/opt/diffrep/.venv/bin:${PATH}
CMD ["prefect", "--help"]
