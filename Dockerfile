# kvr: one image for every component (router, worker, monitor); docker-compose.yml picks the command.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    KVR_LOG_LEVEL=INFO

WORKDIR /opt/kvr
# Metadata first so the dependency layer is cached across source edits.
COPY pyproject.toml README.md constraints.txt ./
COPY core ./core
COPY bus ./bus
COPY router ./router
COPY worker ./worker
COPY monitor ./monitor
COPY cluster ./cluster
COPY sim ./sim
COPY cli ./cli
COPY bench ./bench
RUN pip install -c constraints.txt . && kvr --help >/dev/null

# Not root at run time.
RUN useradd --create-home --uid 10001 kvr && mkdir -p /data && chown kvr /data
USER kvr
WORKDIR /data
CMD ["kvr", "--help"]
