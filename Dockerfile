# GPU image: TensorFlow 2.15.1, keras-retinanet 1.0.0, Horovod 0.28.1 (NCCL, Gloo), fgl-retinanet.
# Not built here (no Docker engine); tests/test_docker.py keeps its pins equal to
# scripts/install.sh and setup.py and lints it with hadolint when that binary is installed.
#   docker build -t fgl-retinanet .
#   docker run --gpus all --rm -v /data/VOCdevkit:/data -v "$PWD/runs:/opt/fgl-retinanet/runs" \
#     --entrypoint horovodrun fgl-retinanet -np 4 -H localhost:4 \
#     fgl-train --config configs/voc2012_fgl.yaml data.root=/data/VOC2012
FROM tensorflow/tensorflow:2.15.0-gpu

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Horovod compiles against CUDA and NCCL: the base image has their runtimes, not the compiler or
# headers. CUDA 12.2 matches TensorFlow 2.15's build; NCCL comes from the same NVIDIA repository
# the base image is set up with, at whatever 2.x it offers for CUDA 12 (hence no version pin).
# OpenCV's wheel needs libGL and GLib.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential cmake git cuda-nvcc-12-2 cuda-cudart-dev-12-2 libnccl2 libnccl-dev \
        libgl1 libglib2.0-0 openssh-client \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/fgl-retinanet

# Dependencies first, so that editing the package does not rebuild Horovod.
COPY requirements/ requirements/
RUN pip install --no-cache-dir tensorflow==2.15.1 -r requirements/base.txt \
        -c requirements/constraints.txt \
    && pip install --no-cache-dir --no-build-isolation keras-retinanet==1.0.0 \
        -c requirements/constraints.txt

# Horovod against this TensorFlow, NCCL for GPU all-reduce, Gloo for horovodrun without MPI.
# The import check fails the build if NCCL or TensorFlow support did not make it in.
RUN HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 \
    HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    pip install --no-cache-dir --no-build-isolation horovod==0.28.1 \
        -c requirements/constraints.txt \
    && python -c "import horovod.tensorflow as hvd; assert hvd.nccl_built(), 'no NCCL'" \
    && horovodrun --check-build

COPY setup.py README.md ./
COPY fgl_retinanet/ fgl_retinanet/
COPY configs/ configs/
COPY scripts/ scripts/
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e .

ENTRYPOINT ["fgl-train"]
CMD ["--help"]
