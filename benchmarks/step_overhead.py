"""Training step time: our compiled model against a stock keras-retinanet model, side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/step_overhead.py --size 256 --repeats 8

Both models use keras-retinanet's ResNet-50 backbone with random weights, 256 FPN/head
channels, the same 9 anchors per position, the same image batch and the same targets. Ours is
built by `fgl_retinanet.model.build_training_model` and compiled by
`fgl_retinanet.train.compile_training_model` (logit head, our FL or FGL, smooth L1, legacy Adam
with clipnorm) from the VOC configuration; the stock one is
`keras_retinanet.models.backbone("resnet50").retinanet(...)` compiled with its own `focal()`
and `smooth_l1()` and legacy Adam(1e-5, clipnorm 0.001), as keras-retinanet's train.py does.
Each step is `train_on_batch` (the compiled train function `fit` runs); calls alternate between
the models and the median is reported.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from fgl_retinanet.distributed import tensorflow_environment

# The TensorFlow options our entry points set (quiet start-up, BFC CPU allocator), before
# TensorFlow is imported; a value already in the environment wins, e.g.
# TF_CPU_ALLOCATOR_USE_BFC=false for TensorFlow's default allocator.
tensorflow_environment()

import tensorflow as tf  # noqa: E402
from keras_retinanet import losses as kr_losses  # noqa: E402
from keras_retinanet import models as kr_models  # noqa: E402

from fgl_retinanet import distributed  # noqa: E402
from fgl_retinanet.config import load_config  # noqa: E402
from fgl_retinanet.losses import build_loss  # noqa: E402
from fgl_retinanet.model import build_training_model  # noqa: E402
from fgl_retinanet.train import compile_training_model  # noqa: E402


def targets(anchors: int, classes: int, batch: int, seed: int = 0):
    """Regression (batch, anchors, 5) and classification (batch, anchors, classes + 1) targets."""
    rng = np.random.default_rng(seed)
    states = rng.choice([-1.0, 0.0, 1.0], size=(batch, anchors), p=[0.01, 0.985, 0.005])
    labels = np.zeros((batch, anchors, classes), np.float32)
    rows, cols = np.nonzero(states == 1.0)
    labels[rows, cols, rng.integers(classes, size=rows.size)] = 1.0
    regression = rng.normal(0.0, 0.2, size=(batch, anchors, 4)).astype(np.float32)
    regression = np.concatenate([regression, states[..., None]], axis=-1).astype(np.float32)
    classification = np.concatenate([labels, states[..., None]], axis=-1).astype(np.float32)
    return regression, classification


def ours(loss_name: str, backbone: str):
    """Our training model, compiled exactly as `fgl-train` compiles it."""
    config = load_config("configs/voc2012_focal.yaml", [
        f"loss.name={loss_name}", f"model.backbone={backbone}", "model.weights=none",
    ])  # fmt: skip
    model = build_training_model(config, len(config.data.classes))
    loss = build_loss(config.loss.name, alpha=config.loss.alpha, gamma=config.loss.gamma,
                      from_logits=config.loss.from_logits)  # fmt: skip
    compile_training_model(model, config, distributed.Context(), loss, config.train.base_lr)
    return model


def stock(backbone: str, classes: int):
    """keras-retinanet's own model and losses."""
    model = kr_models.backbone(backbone).retinanet(classes)
    model.compile(
        loss={"regression": kr_losses.smooth_l1(), "classification": kr_losses.focal()},
        optimizer=tf.keras.optimizers.legacy.Adam(learning_rate=1e-5, clipnorm=0.001),
    )
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="square image side in pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--repeats", type=int, default=8, help="timed steps per model")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    classes = 20
    tf.keras.utils.set_random_seed(0)
    models = {
        "keras-retinanet (focal)": stock(args.backbone, classes),
        "ours FL": ours("focal", args.backbone),
        "ours FGL": ours("focal_gradient", args.backbone),
    }
    images = np.random.default_rng(1).normal(0, 50, (args.batch, args.size, args.size, 3))
    images = images.astype(np.float32)
    anchors = int(models["ours FL"].predict_on_batch(images)[0].shape[1])
    regression, classification = targets(anchors, classes, args.batch)

    # Two untimed steps each (tracing, first allocations), then alternate the timed ones.
    for model in models.values():
        for _ in range(2):
            model.train_on_batch(images, [regression, classification])
    times = {name: [] for name in models}
    losses = {}
    for _ in range(args.repeats):
        for name, model in models.items():
            started = time.perf_counter()
            losses[name] = model.train_on_batch(images, [regression, classification])
            times[name].append(time.perf_counter() - started)

    baseline = statistics.median(times["keras-retinanet (focal)"])
    rows = [
        {"model": name, "median_s": round(statistics.median(samples), 4),
         "min_s": round(min(samples), 4),
         "ratio": round(statistics.median(samples) / baseline, 3),
         "loss": [round(float(v), 4) for v in np.atleast_1d(losses[name])]}
        for name, samples in times.items()
    ]  # fmt: skip
    result = {
        "backbone": args.backbone, "image": [args.size, args.size], "batch": args.batch,
        "anchors": anchors, "repeats": args.repeats, "load_average": os.getloadavg(), "rows": rows,
    }  # fmt: skip
    print(f"{args.backbone}, {args.size}x{args.size}, batch {args.batch}, {anchors} anchors, "
          f"{args.repeats} interleaved steps each, load {result['load_average'][0]:.2f}")
    print("| model | median s/step | min s/step | x keras-retinanet |")
    print("|:---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['median_s']} | {row['min_s']} | {row['ratio']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
