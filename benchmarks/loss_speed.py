"""Loss kernel speed: keras-retinanet's focal against our FL and FGL, forward + backward.

    PYTHONPATH=. .venv/bin/python benchmarks/loss_speed.py --repeats 15 --json loss_speed.json

The VOC shape (batch 2, 160,956 anchors, 20 classes) with anchor states drawn like real
targets: mostly background, a small share positive (one-hot label), some ignored. Every
implementation runs as a `tf.function` (as under `model.compile`) in one process; the repeats
are interleaved (A, B, C, A, B, C, ...) so that drifts of a shared machine hit all alike, and the
median is reported. keras-retinanet's loss receives probabilities and is differentiated with
respect to them (its model applies the sigmoid inside the head); ours receive logits.

The memory-bound estimate is the least any implementation must move: read the targets and the
predictions, write the gradient, divided by the copy bandwidth measured here with numpy.
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
from keras_retinanet.losses import focal as retinanet_focal  # noqa: E402

from fgl_retinanet.losses import FocalGradientLoss, FocalLoss  # noqa: E402

# Anchors of an 800 x 1067 VOC image (P3-P7, 9 anchors per position), as in the issue.
VOC_ANCHORS = 160_956


def make_targets(batch: int, anchors: int, classes: int, seed: int = 0,
                 positive: float = 0.005, ignore: float = 0.01):  # fmt: skip
    """Returns (y_true, logits) drawn like keras-retinanet's targets for a trained-ish model.

    Shapes: y_true (batch, anchors, classes + 1), logits (batch, anchors, classes). Positives get
    a one-hot label; logits are mostly confident background (N(-4, 2)) as after a few epochs.
    """
    rng = np.random.default_rng(seed)
    states = rng.choice([-1.0, 0.0, 1.0], size=(batch, anchors),
                        p=[ignore, 1.0 - ignore - positive, positive])  # fmt: skip
    labels = np.zeros((batch, anchors, classes), np.float32)
    rows, cols = np.nonzero(states == 1.0)
    labels[rows, cols, rng.integers(classes, size=rows.size)] = 1.0
    y_true = np.concatenate([labels, states[..., None].astype(np.float32)], axis=-1)
    logits = rng.normal(-4.0, 2.0, size=(batch, anchors, classes)).astype(np.float32)
    return y_true, logits


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large numpy copy (read + write counted), best of `repeats`."""
    source = np.ones(megabytes * 2**20 // 4, np.float32)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best


def value_and_gradient_fn(loss):
    """A tf.function returning the loss and its gradient with respect to the predictions."""

    @tf.function
    def step(y_true, y_pred):
        with tf.GradientTape() as tape:
            tape.watch(y_pred)
            value = loss(y_true, y_pred)
        return value, tape.gradient(value, y_pred)

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--anchors", type=int, default=VOC_ANCHORS)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per implementation")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    y_true_np, logits_np = make_targets(args.batch, args.anchors, args.classes)
    y_true = tf.constant(y_true_np)
    logits = tf.constant(logits_np)
    probabilities = tf.sigmoid(logits)
    cases = {
        "keras-retinanet focal": (value_and_gradient_fn(retinanet_focal()), probabilities),
        "ours FL": (value_and_gradient_fn(FocalLoss()), logits),
        "ours FGL": (value_and_gradient_fn(FocalGradientLoss()), logits),
    }

    # Trace and warm every case once, then interleave the timed calls.
    values = {}
    for name, (fn, y_pred) in cases.items():
        value, gradient = fn(y_true, y_pred)
        values[name] = float(value)
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (fn, y_pred) in cases.items():
            started = time.perf_counter()
            value, gradient = fn(y_true, y_pred)
            gradient.numpy()
            times[name].append(time.perf_counter() - started)

    # The least traffic: targets and predictions read once, the gradient written once.
    elements = args.batch * args.anchors * args.classes
    minimal_bytes = 4 * (args.batch * args.anchors * (args.classes + 1) + 2 * elements)
    bandwidth = copy_bandwidth()
    bound = minimal_bytes / bandwidth

    baseline = statistics.median(times["keras-retinanet focal"])
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append({
            "implementation": name,
            "median_ms": round(1e3 * median, 2),
            "min_ms": round(1e3 * min(samples), 2),
            "ratio_to_keras_retinanet": round(median / baseline, 3),
            "ratio_to_memory_bound": round(median / bound, 2),
            "loss": values[name],
        })  # fmt: skip
    result = {
        "shape": [args.batch, args.anchors, args.classes],
        "repeats": args.repeats,
        "positive_anchors": int((y_true_np[..., -1] == 1).sum()),
        "ignored_anchors": int((y_true_np[..., -1] == -1).sum()),
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "minimal_megabytes": round(minimal_bytes / 1e6, 1),
        "memory_bound_ms": round(1e3 * bound, 2),
        "memory_bound_ratio_to_keras_retinanet": round(bound / baseline, 3),
        "load_average": os.getloadavg(),
        "tf_cpu_allocator_use_bfc": os.environ["TF_CPU_ALLOCATOR_USE_BFC"],
        "rows": rows,
    }

    print(f"shape {result['shape']}, {result['positive_anchors']} positive and "
          f"{result['ignored_anchors']} ignored anchors, {args.repeats} interleaved repeats, "
          f"load {result['load_average'][0]:.2f}, TF_CPU_ALLOCATOR_USE_BFC="
          f"{result['tf_cpu_allocator_use_bfc']}")  # fmt: skip
    print("| implementation | median ms | min ms | x keras-retinanet | x memory bound |")
    print("|:---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['implementation']} | {row['median_ms']} | {row['min_ms']} | "
              f"{row['ratio_to_keras_retinanet']} | {row['ratio_to_memory_bound']} |")  # fmt: skip
    print(f"memory bound: {result['minimal_megabytes']} MB at {result['copy_bandwidth_gb_s']} "
          f"GB/s = {result['memory_bound_ms']} ms "
          f"({result['memory_bound_ratio_to_keras_retinanet']}x keras-retinanet)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
