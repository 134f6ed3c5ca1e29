# GPU image: TensorFlow 2.15.1, keras-retinanet 1.0.0, Horovod 0.28.1 (NCCL), fgl-retinanet.
# First version (issue 1/7): not built in CI, which has no Docker engine; issue 7/7 finishes it.
#   docker build -t fgl-retinanet .
#   docker run --gpus all -v /data/VOCdevkit:/data fgl-retinanet \
#     --config configs/voc2012_fgl.yaml data.root=/data/VOC2012
FROM tensorflow/tensorflow:2.15.0-gpu

WORKDIR /opt/fgl-retinanet
COPY requirements/ requirements/
COPY setup.py README.md ./
COPY fgl_retinanet/ fgl_retinanet/
COPY configs/ configs/
COPY scripts/ scripts/

# The base image ships TF 2.15.0; pin 2.15.1 like the CPU install, then the rest of the stack.
RUN pip install --no-cache-dir tensorflow==2.15.1 -r requirements/base.txt \
        -c requirements/constraints.txt \
    && pip install --no-cache-dir --no-build-isolation keras-retinanet==1.0.0 \
        -c requirements/constraints.txt \
    && pip install --no-cache-dir --no-deps -e .

RUN HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 \
    HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1 \
    pip install --no-cache-dir --no-build-isolation horovod==0.28.1 -c requirements/constraints.txt

ENTRYPOINT ["fgl-train"]
