# A Triton node: NVIDIA's Triton Inference Server container with the LLaVA models and
# their Python dependencies baked in, so that a GPU host needs nothing but the image
# and a checkpoint directory (no pip at start, no package index on the GPU host).
#
#   docker build -f deploy/triton-node.Dockerfile -t llava-triton-node .
#   docker run --gpus 1 --shm-size 1g -p 8000-8002:8000-8002 \
#       -v /srv/llava-1.5-7b-hf:/checkpoints/llava:ro llava-triton-node
#
# TRITON_VERSION is the NGC release. 24.10 is Triton 2.51.0, the server that the tests
# run (the nvidia-pytriton 0.7.0 wheel). Its Python backend stub is built for the
# image's own Python, TRITON_PYTHON: 3.10 (the 23.05 to 24.11 images are Ubuntu 22.04
# with Python 3.10; from 24.12 on, Ubuntu 24.04 and Python 3.12). The model code must
# run on that Python: tests/deploy/test_images.py checks the two ARGs below against
# the local Triton and the model code against TRITON_PYTHON.
ARG TRITON_VERSION=24.10
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3
ARG TRITON_PYTHON=3.10

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

COPY deploy/triton-node.requirements.txt /opt/llava/requirements.txt
RUN python3 -c "import sys; v = '%d.%d' % sys.version_info[:2]; assert v == '${TRITON_PYTHON}', v" \
    && python3 -m pip install -r /opt/llava/requirements.txt

# The model code imports llava_node and llava_wire; the stub finds them through PYTHONPATH.
COPY llava_wire/ /opt/llava/llava_wire/
COPY llava_node/ /opt/llava/llava_node/
COPY model_repository/ /models/

ENV PYTHONPATH=/opt/llava \
    LLAVA_CHECKPOINT=/checkpoints/llava \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_NO_ADVISORY_WARNINGS=1 \
    TOKENIZERS_PARALLELISM=false

EXPOSE 8000 8001 8002

# HTTP 8000, gRPC 8001, metrics 8002: Triton's defaults, which the control plane
# relies on to find gRPC and metrics from the HTTP address.
CMD ["tritonserver", \
     "--model-repository=/models", \
     "--strict-readiness=true", \
     "--allow-metrics=true", \
     "--backend-config=python,shm-default-byte-size=4194304", \
     "--backend-config=python,shm-growth-byte-size=4194304"]
