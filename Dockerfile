# The control plane image: FastAPI + uvicorn, SQLAlchemy with the SQLite and PostgreSQL
# drivers, tritonclient for gRPC streaming, and the wire package it shares with the nodes.
# No torch, no Triton and no node code: nodes run elsewhere.
#
#   docker build -t llava-control-plane .
#   docker run -p 21001:21001 -e LLAVA_CP_ADMIN_TOKEN=$(openssl rand -hex 24) \
#     -e LLAVA_CP_WORKERS=http://gpu-host:8000 llava-control-plane
#
# Every setting is an environment variable LLAVA_CP_* (control_plane/config.py).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY deploy/control-plane.requirements.txt /app/requirements.txt
RUN python -m pip install -r /app/requirements.txt

COPY llava_wire/ /app/llava_wire/
COPY control_plane/ /app/control_plane/

# An unprivileged user; /data holds the SQLite file when no database URL is given.
RUN useradd --system --uid 10001 --home-dir /data llava \
    && mkdir -p /data && chown 10001 /data
USER 10001

ENV PYTHONPATH=/app \
    LLAVA_CP_HOST=0.0.0.0 \
    LLAVA_CP_PORT=21001 \
    LLAVA_CP_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 21001

ENTRYPOINT ["python", "-m", "control_plane"]
CMD ["serve"]
