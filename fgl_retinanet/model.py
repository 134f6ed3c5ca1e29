"""RetinaNet through keras-retinanet, with a logits classification head, and inference.

The training model outputs `regression` (batch, anchors, 4) and `classification_logits`
(batch, anchors, classes); the inference model applies the sigmoid and keras-retinanet's box
decoding and NMS. With `loss.from_logits: false` the stock probability head is kept instead.
"""

import functools
import logging

import numpy as np
import tensorflow as tf
from keras_retinanet import layers as kr_layers
from keras_retinanet import models as kr_models
from keras_retinanet.models import retinanet as kr_retinanet
from keras_retinanet.utils.image import preprocess_image, resize_image
from keras_retinanet.utils.model import freeze as freeze_model

from fgl_retinanet.data import read_image_bgr
from fgl_retinanet.pipeline import anchor_parameters

logger = logging.getLogger(__name__)

keras = tf.keras
LOGITS_OUTPUT = "classification_logits"
PROBABILITY_OUTPUT = "classification"
# keras-retinanet names this function with a leading double underscore; it is module level,
# so no name mangling applies and it can be reused with a different feature width.
_pyramid_features = getattr(kr_retinanet, "__create_pyramid_features")


def classification_output_name(config) -> str:
    return LOGITS_OUTPUT if config.loss.from_logits else PROBABILITY_OUTPUT


def build_training_model(config, num_classes: int) -> keras.Model:
    """Builds the RetinaNet training model named by `config.model`.

    Returns:
        A model from images (batch, height, width, 3) to [regression (batch, anchors, 4),
        classification (batch, anchors, classes)], the latter logits or probabilities.
    """
    width = config.model.head_width
    num_anchors = anchor_parameters(config.model.anchor_sizes).num_anchors()

    # keras-retinanet's heads, with the final sigmoid removed when we train on logits.
    regression = kr_retinanet.default_regression_model(
        4, num_anchors, pyramid_feature_size=width, regression_feature_size=width
    )
    classification = kr_retinanet.default_classification_model(
        num_classes,
        num_anchors,
        pyramid_feature_size=width,
        classification_feature_size=width,
        prior_probability=config.model.prior_probability,
    )
    if config.loss.from_logits:
        classification = keras.Model(
            classification.inputs,
            classification.get_layer("pyramid_classification_reshape").output,
            name="classification_logits_submodel",
        )
    submodels = [("regression", regression), (classification_output_name(config), classification)]
    pyramid = functools.partial(_pyramid_features, feature_size=width)

    # XLA has no kernel for the gradient of keras-retinanet's nearest-neighbour upsampling;
    # the same upsampling written as gathers compiles (and gives the same values).
    if config.train.jit_compile:
        pyramid = functools.partial(_with_gather_upsampling, pyramid)

    # Backbone: keras-retinanet's (ResNet and others) or our small CPU one.
    modifier = freeze_model if config.model.freeze_backbone else None
    if config.model.backbone == "tiny":
        inputs = keras.layers.Input(shape=(None, None, 3))
        backbone_layers = tiny_backbone(inputs, trainable=not config.model.freeze_backbone)
        model = kr_retinanet.retinanet(
            inputs=inputs,
            backbone_layers=backbone_layers,
            num_classes=num_classes,
            num_anchors=num_anchors,
            submodels=submodels,
            create_pyramid_features=pyramid,
        )
    else:
        model = kr_models.backbone(config.model.backbone).retinanet(
            num_classes,
            num_anchors=num_anchors,
            submodels=submodels,
            create_pyramid_features=pyramid,
            modifier=modifier,
        )
    if keras.mixed_precision.global_policy().compute_dtype != "float32":
        model = _float32_outputs(model)
    return model


def tiny_backbone(inputs, trainable: bool = True) -> dict:
    """A five-stage conv/BN/ReLU backbone for CPU runs: C3, C4, C5 at strides 8, 16, 32."""
    x = inputs
    outputs = {}
    for stage, filters in enumerate((16, 32, 64, 96, 128), start=1):
        # Each stage halves the resolution once, then refines at that resolution.
        for index, stride in enumerate((2, 1)):
            x = keras.layers.Conv2D(
                filters, 3, strides=stride, padding="same", use_bias=False,
                name=f"tiny_stage{stage}_conv{index}", trainable=trainable,
            )(x)  # fmt: skip
            x = keras.layers.BatchNormalization(
                name=f"tiny_stage{stage}_bn{index}", trainable=trainable
            )(x)
            x = keras.layers.ReLU(name=f"tiny_stage{stage}_relu{index}")(x)
        if stage >= 3:
            outputs[f"C{stage}"] = x
    return outputs


def load_weights(model: keras.Model, config) -> str:
    """Loads the configured initial weights; returns a description for the log."""
    weights = config.model.weights
    if weights == "none":
        return "random initialisation"
    if weights == "imagenet":
        # keras-retinanet's download, cached under ~/.keras/models after the first time.
        try:
            path = kr_models.backbone(config.model.backbone).download_imagenet()
        except Exception as e:  # noqa: BLE001 - any network failure gets the same advice
            raise RuntimeError(
                f"could not fetch ImageNet weights for {config.model.backbone} ({e}); "
                "download them once on a connected machine or set model.weights=PATH|none"
            ) from None
    else:
        path = weights

    # Load by layer name, skipping shape mismatches as keras-retinanet does, but say how much
    # was really loaded: a snapshot of another architecture would otherwise load nothing.
    try:
        matched, total = _matching_layers(model, path)
        model.load_weights(path, by_name=True, skip_mismatch=True)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot load weights from {path}: {e}") from None
    if matched == 0:
        raise RuntimeError(
            f"no layer of the {config.model.backbone} model matches the weights in {path} "
            "(wrong file or backbone?)"
        )
    if matched < total:
        logger.warning("weights from %s fit %d of %d layers; the rest start random",
                       path, matched, total)  # fmt: skip
    return f"{path} ({matched} of {total} layers with weights)"


def _matching_layers(model: keras.Model, path: str) -> tuple[int, int]:
    """How many of the model's layers with weights find same-named, same-shaped weights."""
    import h5py

    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        saved = {}
        for name in group.attrs.get("layer_names", []):
            name = name.decode() if isinstance(name, bytes) else name
            layer = group[name]
            names = [n.decode() if isinstance(n, bytes) else n
                     for n in layer.attrs.get("weight_names", [])]  # fmt: skip
            saved[name] = [tuple(layer[n].shape) for n in names]
    layers = [layer for layer in _flat_layers(model) if layer.weights]
    matched = sum(
        saved.get(layer.name) == [tuple(w.shape) for w in layer.weights] for layer in layers
    )
    return matched, len(layers)


def _flat_layers(model: keras.Model) -> list:
    # Submodels (the heads) are saved as one h5 group holding all their layers' weights.
    return list(model.layers)


class GatherUpsampleLike(kr_layers.UpsampleLike):
    """keras-retinanet's `UpsampleLike` as two gathers, which XLA can differentiate.

    The indices are those of TF1's nearest-neighbour resize that `UpsampleLike` calls
    (no align_corners, no half-pixel centres): ``min(floor(i * in / out), in - 1)``.
    """

    def call(self, inputs, **kwargs):
        source, target = inputs
        for axis in (1, 2):
            size_in = tf.shape(source)[axis]
            size_out = tf.shape(target)[axis]
            scale = tf.cast(size_in, tf.float32) / tf.cast(size_out, tf.float32)
            index = tf.cast(tf.floor(tf.cast(tf.range(size_out), tf.float32) * scale), tf.int32)
            source = tf.gather(source, tf.minimum(index, size_in - 1), axis=axis)
        return source


def _with_gather_upsampling(create_pyramid_features, *args, **kwargs):
    # NOTE: keras-retinanet's pyramid function looks `layers.UpsampleLike` up when it runs, so
    # swapping the module attribute for the call changes only the layers built here.
    original = kr_retinanet.layers.UpsampleLike
    kr_retinanet.layers.UpsampleLike = GatherUpsampleLike
    try:
        return create_pyramid_features(*args, **kwargs)
    finally:
        kr_retinanet.layers.UpsampleLike = original


def _float32_outputs(model: keras.Model) -> keras.Model:
    """Returns the model with each output cast to float32 under its original name.

    Under mixed precision the heads compute in float16; the losses, the sigmoid and the box
    decoding need float32 (box coordinates up to 1333 px have a 1 px step in float16).
    """
    outputs = []
    for tensor in model.outputs:
        layer = tensor._keras_history.layer
        name = layer.name
        # The loss dictionary and snapshots address outputs by name: the cast takes it over.
        layer._name = f"{name}_compute"
        outputs.append(keras.layers.Activation("linear", dtype="float32", name=name)(tensor))
    return keras.Model(model.inputs, outputs, name=model.name)


def build_inference_model(training_model: keras.Model, config) -> keras.Model:
    """Wraps a training model (sharing its weights) with sigmoid, box decoding and NMS.

    Returns:
        A model from images to [boxes (batch, max_detections, 4), scores, labels], padded with
        score -1 where fewer detections remain.
    """
    # The layers added here (sigmoid, anchors, box decoding, NMS) compute in float32 whatever
    # the training precision: the policy is only consulted when a layer is created.
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        regression, classification = training_model.outputs[:2]
        if config.loss.from_logits:
            probabilities = keras.layers.Activation("sigmoid", name=PROBABILITY_OUTPUT)(
                classification
            )
            training_model = keras.Model(training_model.inputs, [regression, probabilities])
        return kr_retinanet.retinanet_bbox(
            model=training_model,
            anchor_params=anchor_parameters(config.model.anchor_sizes),
            nms_threshold=config.eval.nms_threshold,
            score_threshold=config.eval.score_threshold,
            max_detections=config.eval.max_detections,
        )
    finally:
        keras.mixed_precision.set_global_policy(policy)


def detect(
    inference_model: keras.Model, dataset, config, batch_size: int = 8, progress: bool = False
) -> dict:
    """Runs inference over a dataset, batching images that resize to the same shape.

    Args:
        progress: show a Keras progress bar (the evaluation script does; training does not).

    Returns:
        {image_id: [{"box": [x1, y1, x2, y2], "score": float, "label": str}]} in the dataset's
        0-based pixel frame, the layout of fgl_retinanet.evaluation.average_precisions.
    """
    detections = {}
    pending = []

    def flush():
        images = np.stack([image for _, image, _ in pending])
        boxes, scores, labels = inference_model.predict_on_batch(images)[:3]
        for (image_id, _, scale), b, s, lab in zip(pending, boxes, scores, labels):
            keep = s >= config.eval.score_threshold
            detections[image_id] = [
                {"box": (box / scale).tolist(), "score": float(score),
                 "label": dataset.classes[int(label)]}
                for box, score, label in zip(b[keep], s[keep], lab[keep])
            ]  # fmt: skip
        if bar is not None:
            bar.add(len(pending))
        pending.clear()

    # Visit images grouped by their annotated size, so equal shapes meet in one batch.
    bar = keras.utils.Progbar(len(dataset.records), unit_name="image") if progress else None
    for record in sorted(dataset.records, key=lambda r: (r.height, r.width)):
        image = read_image_bgr(record.image_path)
        image, scale = resize_image(
            image, min_side=config.data.image_min_side, max_side=config.data.image_max_side
        )
        image = preprocess_image(image, mode="caffe").astype(np.float32)
        if pending and (pending[0][1].shape != image.shape or len(pending) == batch_size):
            flush()
        pending.append((record.image_id, image, scale))
    if pending:
        flush()
    return detections
