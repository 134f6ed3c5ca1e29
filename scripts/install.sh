#!/usr/bin/env bash
# Creates or updates the project virtualenv with every pinned dependency, Horovod included.
#
#   scripts/install.sh                       # CPU: tensorflow-cpu, Horovod with Gloo
#   TF_PACKAGE=tensorflow scripts/install.sh # GPU: full TensorFlow (see README for NCCL)
#
# Safe to re-run: it exits early when the virtualenv already matches the requirement files.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
TF_PACKAGE=${TF_PACKAGE:-tensorflow-cpu}
TF_VERSION=2.15.1
HOROVOD_VERSION=0.28.1

stamp="$VENV/.fgl-installed"
want="$(cat requirements/*.txt setup.py scripts/install.sh | sha1sum | cut -c1-12) $TF_PACKAGE"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if ! command -v "$PYTHON" >/dev/null; then
  echo "install: $PYTHON not found; TensorFlow $TF_VERSION needs Python 3.9-3.11 (set PYTHON=...)" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
$pip install -q --upgrade "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0"

# 1. TensorFlow and the pinned stack. The constraints keep numpy<2 and opencv-python<4.11:
#    keras-retinanet asks for any opencv-python, and the newest needs numpy 2, which breaks TF.
echo "install: $TF_PACKAGE==$TF_VERSION and pinned requirements"
$pip install -q "$TF_PACKAGE==$TF_VERSION" -r requirements/base.txt -r requirements/dev.txt \
  -c requirements/constraints.txt

# 2. keras-retinanet compiles a Cython extension against the numpy installed above.
echo "install: keras-retinanet 1.0.0"
$pip install -q --no-build-isolation "keras-retinanet==1.0.0" -c requirements/constraints.txt

# 3. This package, editable, without letting pip re-resolve the pins.
$pip install -q --no-deps --no-build-isolation -e .

# 4. Horovod, compiled against this TensorFlow (about 3 minutes on 2 cores; pip caches the wheel).
if ! "$VENV/bin/python" -c "import horovod.tensorflow" 2>/dev/null; then
  echo "install: building horovod $HOROVOD_VERSION (a few minutes)"
  export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
  export HOROVOD_WITH_GLOO=1
  if [ "$TF_PACKAGE" = "tensorflow" ] && command -v nvcc >/dev/null; then
    # GPU: NCCL all-reduce; MPI is optional there (horovodrun --gloo works without it).
    export HOROVOD_GPU_OPERATIONS=${HOROVOD_GPU_OPERATIONS:-NCCL}
  else
    export HOROVOD_WITHOUT_MPI=1
  fi
  $pip install -q --no-build-isolation "horovod==$HOROVOD_VERSION" -c requirements/constraints.txt
fi

# 5. Fail now, not mid-run, if the stack does not import together.
"$VENV/bin/python" - <<'PY'
import cv2, numpy, tensorflow as tf, keras_retinanet, horovod.tensorflow.keras  # noqa: F401
assert numpy.__version__.startswith("1."), numpy.__version__
assert tf.__version__ == "2.15.1", tf.__version__
print(f"install: ok (TensorFlow {tf.__version__}, numpy {numpy.__version__}, OpenCV {cv2.__version__})")
PY
echo "$want" > "$stamp"
