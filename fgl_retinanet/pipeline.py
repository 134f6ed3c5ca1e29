"""Training input pipeline: keras-retinanet's Generator over a parsed VocDataset.

keras-retinanet supplies resizing, augmentation transforms and anchor targets; this subclass
supplies the data (already validated by fgl_retinanet.data), a deterministic per-epoch order
that can be sharded across processes, border clipping instead of dropping, and partial batches
so one epoch is exactly one pass over the list.
"""

import logging

import numpy as np
from keras_retinanet.preprocessing.generator import Generator
from keras_retinanet.utils.anchors import (
    AnchorParameters,
    anchor_targets_bbox,
    anchors_for_shape,
    compute_gt_annotations,
    guess_shapes,
)
from keras_retinanet.utils.image import adjust_transform_for_image, preprocess_image
from keras_retinanet.utils.transform import random_transform_generator

from fgl_retinanet.data import DataError, VocDataset, read_image_bgr

logger = logging.getLogger(__name__)

ANCHOR_STRIDES = (8, 16, 32, 64, 128)


def anchor_parameters(sizes) -> AnchorParameters:
    """keras-retinanet's default anchors (3 ratios x 3 scales) with configurable sizes."""
    default = AnchorParameters.default
    return AnchorParameters(list(sizes), list(ANCHOR_STRIDES), default.ratios, default.scales)


class VocSequence(Generator):
    """A keras Sequence of (images, [regression targets, classification targets]) batches.

    Args:
        dataset: parsed split.
        config: the run's Config (data, model and train sections are read).
        training: shuffle each epoch and augment; otherwise fixed order, no augmentation.
        rank, world: this process's share of every epoch under Horovod.
    """

    def __init__(self, dataset: VocDataset, config, training: bool, rank: int = 0, world: int = 1):
        self.dataset = dataset
        self.training = training
        self.rank = rank
        self.world = world
        self.seed = config.train.seed
        self.epoch = 0
        self.ignore_difficult = config.data.difficult == "ignore"
        self.anchor_params = anchor_parameters(config.model.anchor_sizes)
        # Images that passed the header check but failed to decode during training.
        self.unreadable_images = set()

        # Augmentation: keras-retinanet's transform generator, seeded per rank.
        transforms = None
        if training and config.data.flip_chance > 0:
            prng = np.random.RandomState(self.seed * 1000 + rank)
            transforms = random_transform_generator(
                prng=prng, flip_x_chance=config.data.flip_chance
            )

        super().__init__(
            transform_generator=transforms,
            batch_size=config.train.batch_size,
            group_method="none",
            shuffle_groups=False,
            image_min_side=config.data.image_min_side,
            image_max_side=config.data.image_max_side,
            compute_anchor_targets=self._anchor_targets,
            preprocess_image=lambda image: preprocess_image(image, mode="caffe"),
        )

    # --- the data source keras-retinanet's Generator asks for ---

    def size(self) -> int:
        return len(self.dataset)

    def num_classes(self) -> int:
        return len(self.dataset.classes)

    def has_label(self, label) -> bool:
        return 0 <= label < len(self.dataset.classes)

    def has_name(self, name) -> bool:
        return name in self.dataset.classes

    def name_to_label(self, name) -> int:
        return self.dataset.classes.index(name)

    def label_to_name(self, label) -> str:
        return self.dataset.classes[label]

    def image_aspect_ratio(self, image_index) -> float:
        record = self.dataset.records[image_index]
        return record.width / record.height if record.height else 1.0

    def image_path(self, image_index) -> str:
        return str(self.dataset.records[image_index].image_path)

    def load_image(self, image_index) -> np.ndarray:
        record = self.dataset.records[image_index]
        try:
            return read_image_bgr(record.image_path)
        except DataError:
            # A corrupt file body (the header was fine at start-up) must not end a long run:
            # train on a blank image without objects, and name the file once.
            if image_index not in self.unreadable_images:
                logger.warning("cannot decode %s: used as a blank image", record.image_path)
            self.unreadable_images.add(image_index)
            return np.zeros((record.height, record.width, 3), np.uint8)

    def load_annotations(self, image_index) -> dict:
        record = self.dataset.records[image_index]
        if image_index in self.unreadable_images:
            return {key: np.zeros((0, 4)) for key in ("bboxes", "ignore_bboxes")} | {
                "labels": np.zeros((0,))
            }
        keep = ~record.difficult if self.ignore_difficult else np.ones(len(record.boxes), bool)
        return {
            "labels": record.labels[keep].astype(np.float64),
            "bboxes": record.boxes[keep].astype(np.float64),
            "ignore_bboxes": record.boxes[~keep].astype(np.float64),
        }

    # --- deterministic, shardable epochs ---

    def group_images(self):
        """Splits this rank's share of the epoch's order into batches (the last may be short)."""
        count = self.size()
        if self.training:
            # Every rank draws the same permutation from (seed, epoch), then takes its slice.
            order = np.random.default_rng([self.seed, self.epoch]).permutation(count)
        else:
            order = np.arange(count)

        # Horovod needs the same number of steps on every rank: pad short shards by wrapping.
        per_rank = -(-count // self.world)
        shard = np.resize(order[self.rank :: self.world], per_rank) if count else order
        self.images_per_rank = per_rank
        self.groups = [
            shard[i : i + self.batch_size].tolist() for i in range(0, len(shard), self.batch_size)
        ]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.group_images()

    def on_epoch_end(self):
        self.set_epoch(self.epoch + 1)

    # --- batch assembly ---

    def next_transform(self):
        """The next random transform (None without augmentation); not thread-safe."""
        return next(self.transform_generator) if self.transform_generator else None

    def build_batch(self, group: list, transforms: list):
        """Images and [regression, classification] targets for a group of image indices."""
        images = self.load_image_group(group)
        annotations = self.load_annotations_group(group)
        images, annotations = self.filter_annotations(images, annotations, group)
        for index, transform in enumerate(transforms):
            if transform is not None:
                transform = adjust_transform_for_image(
                    transform, images[index], self.transform_parameters.relative_translation
                )
                images[index], annotations[index] = self.random_transform_group_entry(
                    images[index], annotations[index], transform
                )
        images, annotations = self.preprocess_group(images, annotations)
        return self.compute_inputs(images), self.compute_targets(images, annotations)

    def filter_annotations(self, image_group, annotations_group, group):
        """Keeps every box: VocDataset already clipped them to the image and reported it.

        keras-retinanet's version drops boxes that touch or cross the border, which would
        silently remove objects from training.
        """
        return image_group, annotations_group

    def random_transform_group_entry(self, image, annotations, transform=None):
        # The base class transforms "bboxes" only; difficult boxes must follow the flip too.
        ignore = annotations.pop("ignore_bboxes")
        count = len(annotations["bboxes"])
        annotations["bboxes"] = np.concatenate([annotations["bboxes"], ignore])
        image, annotations = super().random_transform_group_entry(image, annotations, transform)
        annotations["ignore_bboxes"] = annotations["bboxes"][count:]
        annotations["bboxes"] = annotations["bboxes"][:count]
        return image, annotations

    def preprocess_group_entry(self, image, annotations):
        """Resizes, normalises (caffe mode) and scales every box by the resize factor."""
        image, scale = self.resize_image(image)
        image = self.preprocess_image(image).astype(np.float32)
        for key in ("bboxes", "ignore_bboxes"):
            annotations[key] = annotations[key] * scale
        return image, annotations

    def compute_inputs(self, image_group):
        """Zero-pads the group's images to a common size (the group may be short)."""
        shape = tuple(max(image.shape[axis] for image in image_group) for axis in range(3))
        batch = np.zeros((len(image_group),) + shape, dtype=np.float32)
        for index, image in enumerate(image_group):
            batch[index, : image.shape[0], : image.shape[1]] = image
        return batch

    def generate_anchors(self, image_shape):
        return anchors_for_shape(
            image_shape, anchor_params=self.anchor_params, shapes_callback=guess_shapes
        )

    def _anchor_targets(self, anchors, image_group, annotations_group, num_classes):
        regression, labels = anchor_targets_bbox(
            anchors, image_group, annotations_group, num_classes
        )
        if not self.ignore_difficult:
            return regression, labels

        # Anchors that would be background but overlap a difficult object become "ignore".
        for index, annotations in enumerate(annotations_group):
            if not len(annotations["ignore_bboxes"]):
                continue
            positive, ignore, _ = compute_gt_annotations(anchors, annotations["ignore_bboxes"])
            near = (positive | ignore) & (labels[index, :, -1] == 0)
            labels[index, near, -1] = -1
            regression[index, near, -1] = -1
        return regression, labels
