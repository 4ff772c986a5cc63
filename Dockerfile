# One image for every crossgrad process: the bootstrap and the peers differ only in `command:`
# (see docker-compose.yml). The entrypoint is the `crossgrad` command, so
#
#   docker build -t crossgrad .
#   docker run --rm crossgrad --help
#   docker run --rm crossgrad simulate --rounds 20
#
# torch comes first, pinned, from TORCH_INDEX when one is given (pip's configured index, PyPI
# by default, when it is empty), so that `pip install .` finds it satisfied and never pulls
# another build. Runs are on the CPU unless a peer is given `--device cuda`.
#
#   GPU image:  docker build --build-arg TORCH_INDEX=<PyTorch's CUDA wheel index for your CUDA
#               version> -t crossgrad:cuda .     (then run the peers with --device cuda and a GPU)
#   slim CPU:   docker build --build-arg TORCH_INDEX=<PyTorch's CPU-only wheel index> .
#               (PyPI's Linux x86_64 torch wheel carries CUDA libraries: it runs on the CPU too,
#               the image is only larger)
#   other torch: --build-arg TORCH_SPEC=torch==X.Y.Z
#
# No HEALTHCHECK here: the bootstrap and the peers listen on different ports, so each service of
# the compose file declares its own, with `python -m crossgrad.healthcheck 127.0.0.1:PORT`.
FROM python:3.11-slim

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"

# Only what the distribution is built from (README.md is its long description).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY crossgrad ./crossgrad
COPY peer ./peer
COPY bootstrap ./bootstrap
RUN pip install . && rm -rf /src

# A non-root user. /state (the bootstrap's SQLite), /runs (the peers' results) and /certs (the
# TLS overlay's certificates, docker-compose.tls.yml) belong to it, so that the named volumes
# docker creates over them start with the same owner.
RUN useradd --create-home --uid 10001 crossgrad \
    && mkdir -p /state /runs /certs \
    && chown crossgrad:crossgrad /state /runs /certs
USER crossgrad
WORKDIR /home/crossgrad

# The bootstrap's and a peer's default ports (`--bind`).
EXPOSE 50050 50051

ENTRYPOINT ["crossgrad"]
CMD ["--help"]
