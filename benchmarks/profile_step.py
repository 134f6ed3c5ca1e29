"""Where one CPU training step of the VOC configuration spends its time.

    PYTHONPATH=. .venv/bin/python benchmarks/profile_step.py --repeats 3

The VOC configuration (ResNet-50 with random weights, 256-channel FPN and heads, batch 1) on
images of the shared VOC2007 sample, resized to 800 px on the short side by our pipeline. Each
part is timed on its own, median of `--repeats` after one untimed call (the backbone, the
whole network and the real step alternating), all in one process:

- input: `VocSequence.build_batch` for one image (read, augment, resize, normalise) minus the
  anchor targets, which are timed alone (keras-retinanet's anchor_targets_bbox via our
  `compute_targets`);
- backbone: forward + backward of the ResNet-50 part (a stand-in loss, the sum of C3-C5);
- FPN and heads: forward + backward of the whole network minus the backbone's;
- loss: our classification loss (FL or FGL) and smooth L1, forward + backward, on the outputs;
- the full `train_on_batch` step; its remainder after the parts above is the optimizer
  (Adam with clipnorm) and Keras' step overhead.
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
from keras_retinanet.losses import smooth_l1  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from shared_paths import VOC_SAMPLE  # noqa: E402

from fgl_retinanet import distributed  # noqa: E402
from fgl_retinanet.config import load_config  # noqa: E402
from fgl_retinanet.data import load_split, make_generator  # noqa: E402
from fgl_retinanet.losses import build_loss  # noqa: E402
from fgl_retinanet.model import build_training_model  # noqa: E402
from fgl_retinanet.train import compile_training_model  # noqa: E402


def timed(function, repeats: int) -> float:
    """Median seconds of `repeats` calls after one untimed call."""
    function()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def interleaved(functions: list, repeats: int) -> list:
    """Median seconds of each function, calls alternating so that load drifts hit all alike."""
    for function in functions:
        function()
    samples = [[] for _ in functions]
    for _ in range(repeats):
        for function, times in zip(functions, samples):
            started = time.perf_counter()
            function()
            times.append(time.perf_counter() - started)
    return [statistics.median(times) for times in samples]


def gradient_step(model, outputs_to_loss):
    """A tf.function computing the gradient of a stand-in loss over the model's weights."""

    @tf.function(reduce_retracing=True)
    def step(images):
        with tf.GradientTape() as tape:
            loss = outputs_to_loss(model(images, training=True))
        return tape.gradient(loss, model.trainable_variables)

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="focal_gradient", help="focal or focal_gradient")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    config = load_config("configs/voc2012_focal.yaml", [
        f"data.root={VOC_SAMPLE}", "data.train_split=trainval", "model.weights=none",
        f"loss.name={args.loss}",
    ])  # fmt: skip
    dataset = load_split(VOC_SAMPLE, "trainval", config)
    batches = make_generator(dataset, config, training=True)
    group = batches.groups[0]

    # Input: the whole batch, then the anchor targets alone on the same images.
    def build():
        return batches.build_batch(group, batches.batch_transforms(0))

    images, targets = build()
    input_seconds = timed(build, args.repeats)
    image_group = batches.load_image_group(group)
    annotations = batches.load_annotations_group(group)
    image_group, annotations = batches.preprocess_group(image_group, annotations)
    target_seconds = timed(lambda: batches.compute_targets(image_group, annotations), args.repeats)

    # Network parts: backbone alone, then the whole network, each forward + backward.
    model = build_training_model(config, len(config.data.classes))
    backbone_outputs = [model.get_layer(name).output for name in
                        ("res3d_relu", "res4f_relu", "res5c_relu")]  # fmt: skip
    backbone = tf.keras.Model(model.inputs, backbone_outputs)

    def total(outputs):
        return tf.add_n([tf.reduce_sum(tf.cast(output, tf.float32)) for output in outputs])

    backbone_step = gradient_step(backbone, total)
    network_step = gradient_step(model, total)
    batch = tf.constant(images)

    # Losses on the network's outputs, forward + backward with respect to them.
    outputs = [tf.constant(o) for o in model.predict_on_batch(images)]
    classification_loss = build_loss(config.loss.name, alpha=config.loss.alpha,
                                     gamma=config.loss.gamma)  # fmt: skip
    regression_loss = smooth_l1(config.loss.regression_sigma)
    regression_target, classification_target = (tf.constant(t) for t in targets)

    @tf.function
    def loss_step(regression, classification):
        with tf.GradientTape() as tape:
            tape.watch([regression, classification])
            value = regression_loss(regression_target, regression) + classification_loss(
                classification_target, classification
            )
        return tape.gradient(value, [regression, classification])

    loss_seconds = timed(lambda: loss_step(*outputs), args.repeats)

    # The real step, compiled as fgl-train compiles it, alternating with the two stand-ins.
    compile_training_model(model, config, distributed.Context(), classification_loss,
                           config.train.base_lr)  # fmt: skip
    backbone_seconds, network_seconds, step_seconds = interleaved([
        lambda: backbone_step(batch), lambda: network_step(batch),
        lambda: model.train_on_batch(images, list(targets)),
    ], args.repeats)  # fmt: skip

    parts = {
        "input (read, augment, resize, normalise)": input_seconds - target_seconds,
        "anchor targets": target_seconds,
        "backbone (ResNet-50), forward + backward": backbone_seconds,
        "FPN + heads, forward + backward": network_seconds - backbone_seconds,
        "losses, forward + backward": loss_seconds,
        "optimizer and step overhead (remainder)": step_seconds - network_seconds - loss_seconds,
    }
    whole = input_seconds + step_seconds
    result = {
        "image": list(images.shape[1:3]), "anchors": int(outputs[0].shape[1]),
        "loss": config.loss.name, "repeats": args.repeats, "load_average": os.getloadavg(),
        "train_on_batch_s": round(step_seconds, 3), "input_s": round(input_seconds, 3),
        "parts": {name: round(seconds, 3) for name, seconds in parts.items()},
    }  # fmt: skip
    print(f"image {result['image']}, {result['anchors']} anchors, {config.loss.name}, median of "
          f"{args.repeats}, load {result['load_average'][0]:.2f}")  # fmt: skip
    print("| part | seconds | share of input + step |")
    print("|:---|---:|---:|")
    for name, seconds in parts.items():
        print(f"| {name} | {seconds:.3f} | {100 * seconds / whole:.1f} % |")
    print(f"| train_on_batch (all but input) | {step_seconds:.3f} | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
