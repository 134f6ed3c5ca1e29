"""Training input pipeline: keras-retinanet's Generator over a parsed VocDataset.

keras-retinanet supplies the resize rule, augmentation transforms and the anchor layout; this
subclass supplies the data (already validated by fgl_retinanet.data), a deterministic per-epoch
order that can be sharded across processes, augmentation drawn per image slot from (seed, rank,
epoch, position) so a resumed run repeats an uninterrupted one, border clipping instead of
dropping, and partial batches so one epoch is exactly one pass over the list.

The per-image work is keras-retinanet's arithmetic without its overheads, and produces the
same inputs and targets bit for bit (tests/test_pipeline.py compares them): anchors are cached
per feature-map shape, a plain flip is array slicing instead of warpAffine, caffe
normalisation is a 256-entry lookup table, and anchor-box overlaps are computed only for the
anchor rows that can touch a box (keras-retinanet's compute_overlap calls into Python once per
overlapping pair). Any other transform takes keras-retinanet's own path.
"""

import collections
import logging
import threading

import cv2
import numpy as np
from keras_retinanet.preprocessing.generator import Generator
from keras_retinanet.utils.anchors import (
    AnchorParameters,
    anchor_targets_bbox,
    compute_gt_annotations,
    generate_anchors,
    guess_shapes,
)
from keras_retinanet.utils.image import (
    adjust_transform_for_image,
    apply_transform,
    preprocess_image,
)
from keras_retinanet.utils.transform import random_transform, transform_aabb

from fgl_retinanet.data import DataError, VocDataset, read_image_bgr

logger = logging.getLogger(__name__)

ANCHOR_STRIDES = (8, 16, 32, 64, 128)
PYRAMID_LEVELS = (3, 4, 5, 6, 7)
# keras-retinanet's caffe-mode means (BGR) and its box regression normalisation.
CAFFE_MEANS = [103.939, 116.779, 123.68]
REGRESSION_STD = 0.2
# keras-retinanet's IoU thresholds: >= 0.5 positive, (0.4, 0.5) ignored, the rest background.
POSITIVE_OVERLAP = 0.5
NEGATIVE_OVERLAP = 0.4


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
        transform_generator: any keras-retinanet transform generator (rotation, shear, scaling,
            translation, flips), read as one stream: its draw number epoch x images_per_rank +
            position goes to that image slot, whatever order threads ask in, and a resumed run
            skips the draws of earlier epochs. So a generator with a fixed-seed prng reproduces
            an uninterrupted run; one that draws from numpy's global state does not. None: the
            horizontal flips of `data.flip_chance` when training, drawn per image from (seed,
            rank, epoch, position) alone.
        anchor_cache_size: anchor sets kept, one per feature-map shape (about 12 MiB each at
            800 x 1333).
    """

    def __init__(
        self,
        dataset: VocDataset,
        config,
        training: bool,
        rank: int = 0,
        world: int = 1,
        transform_generator=None,
        anchor_cache_size: int = 8,
    ):
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

        self.anchor_cache = AnchorCache(self.anchor_params, anchor_cache_size)
        # keras-retinanet's caffe normalisation of every uint8 value, as a lookup table.
        values = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2)
        self.normalisation = preprocess_image(values, mode="caffe")

        # Augmentation: keras-retinanet's random_transform, seeded per image slot (see
        # transform_at), or a caller's transform generator read in slot order. keras-retinanet's
        # Generator gets none, so none of its own methods can consume the stream out of order.
        self.flip_chance = config.data.flip_chance if training else 0.0
        self.transform_stream = transform_generator
        self._stream_lock = threading.Lock()
        self._stream_next = 0
        self._stream_floor = 0
        self._stream_pending = {}

        super().__init__(
            transform_generator=None,
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
        # Stream draws held for slots of earlier epochs that never asked are not needed again.
        with self._stream_lock:
            self._stream_floor = epoch * self.images_per_rank
            self._stream_pending = {
                k: v for k, v in self._stream_pending.items() if k >= self._stream_floor
            }

    def on_epoch_end(self):
        self.set_epoch(self.epoch + 1)

    # --- augmentation: a pure function of the image slot ---

    def transform_at(self, epoch: int, position: int):
        """The transform of one image slot of this rank's epoch (None without augmentation).

        The same (seed, rank, epoch, position) gives the same transform, however many epochs
        ran before in this process and whichever thread asks, so a resumed run and any number
        of loader threads see the transforms of an uninterrupted run. Thread-safe.

        Args:
            epoch: 0-based epoch.
            position: the image's place in this rank's share of the epoch, 0-based
                (step x batch_size + place in the batch).

        Returns:
            A 3x3 keras-retinanet transform matrix, or None.
        """
        if self.transform_stream is not None:
            return self._stream_draw(epoch * self.images_per_rank + position)
        if self.flip_chance <= 0:
            return None
        prng = np.random.default_rng([self.seed, self.rank, epoch, position])
        return random_transform(prng=prng, flip_x_chance=self.flip_chance)

    def batch_transforms(self, step: int, epoch: int | None = None) -> list:
        """One transform (or None) per image of batch `step` of `epoch` (default: the current).

        Batches have the same sizes in every epoch, so step alone gives the positions.
        """
        epoch = self.epoch if epoch is None else epoch
        first = step * self.batch_size
        last = min(first + self.batch_size, self.images_per_rank)
        return [self.transform_at(epoch, position) for position in range(first, last)]

    def _stream_draw(self, index: int):
        # A caller's generator is one stream: draws are taken in slot order and held until
        # their slot asks, so threads asking out of order still get their own draw.
        with self._stream_lock:
            if index < self._stream_next and index not in self._stream_pending:
                raise RuntimeError(
                    f"transform_generator draw {index} was already used: a generator stream "
                    "gives each image slot of each epoch one transform, in order"
                )
            while self._stream_next <= index:
                draw = next(self.transform_stream)
                # Draws of epochs before the current one (a resumed run) are skipped, not held.
                if self._stream_next >= self._stream_floor or self._stream_next == index:
                    self._stream_pending[self._stream_next] = draw
                self._stream_next += 1
            return self._stream_pending.pop(index)

    # --- batch assembly ---

    def build_batch(self, group: list, transforms: list):
        """Images and [regression, classification] targets for a group of image indices.

        Args:
            group: image indices.
            transforms: one 3x3 keras-retinanet transform (or None) per image.

        Returns:
            images: (batch, height, width, 3) float32, caffe-normalised, zero-padded;
            [regression (batch, anchors, 5), classification (batch, anchors, classes + 1)],
            float32, as keras-retinanet's anchor_targets_bbox lays them out.
        """
        images, annotations = [], []
        for index, transform in zip(group, transforms):
            image = self.load_image(index)
            boxes = self.load_annotations(index)
            if transform is not None:
                image, boxes = self.transform_entry(image, boxes, transform)
            image, scale = self.resize_image(image)
            for key in ("bboxes", "ignore_bboxes"):
                boxes[key] = boxes[key] * scale
            images.append(image)
            annotations.append(boxes)
        return self.compute_inputs(images), self.compute_targets(images, annotations)

    def __getitem__(self, step: int):
        """The keras Sequence entry point: batch `step` of the current epoch."""
        return self.build_batch(self.groups[step], self.batch_transforms(step))

    def compute_input_output(self, group):
        """keras-retinanet's entry point for a group of the current epoch, via build_batch."""
        return self[self.groups.index(list(group))]

    def filter_annotations(self, image_group, annotations_group, group):
        """Keeps every box: VocDataset already clipped them to the image and reported it.

        keras-retinanet's version drops boxes that touch or cross the border, which would
        silently remove objects from training.
        """
        return image_group, annotations_group

    def transform_entry(self, image: np.ndarray, annotations: dict, transform: np.ndarray):
        """keras-retinanet's transform of one image and its boxes, difficult boxes included.

        A horizontal flip or the identity (what `data.flip_chance` draws) is done by slicing;
        the result equals warpAffine's, which maps output column x to input column width - x
        and so repeats the last input column at x = 0 (BORDER_REPLICATE). Every other
        transform goes through keras-retinanet's warpAffine and transform_aabb.
        """
        params = self.transform_parameters
        matrix = adjust_transform_for_image(transform, image, params.relative_translation)
        width = image.shape[1]
        default_params = params.fill_mode == "nearest" and params.interpolation == "linear"
        if default_params and np.array_equal(matrix[:2], [[1, 0, 0], [0, 1, 0]]):
            return image, annotations
        if default_params and np.array_equal(matrix[:2], [[-1, 0, width], [0, 1, 0]]):
            flipped = np.empty_like(image)
            flipped[:, 1:] = image[:, :0:-1]
            flipped[:, 0] = image[:, -1]
            for key in ("bboxes", "ignore_bboxes"):
                boxes = annotations[key].copy()
                boxes[:, 0] = width - annotations[key][:, 2]
                boxes[:, 2] = width - annotations[key][:, 0]
                annotations[key] = boxes
            return flipped, annotations
        image = apply_transform(matrix, image, params)
        for key in ("bboxes", "ignore_bboxes"):
            annotations[key] = np.array([transform_aabb(matrix, box) for box in annotations[key]])
            annotations[key] = annotations[key].reshape(-1, 4).astype(np.float64)
        return image, annotations

    def compute_inputs(self, image_group):
        """Normalises uint8 BGR images (caffe mode) into a zero-padded float32 batch."""
        shape = tuple(max(image.shape[axis] for image in image_group) for axis in range(3))
        # Zeros only where padding is needed: every slot is overwritten otherwise.
        padded = any(image.shape != shape for image in image_group)
        batch = (np.zeros if padded else np.empty)((len(image_group),) + shape, np.float32)
        for index, image in enumerate(image_group):
            slot = batch[index, : image.shape[0], : image.shape[1]]
            # The table lookup writes into the batch directly when the slot is contiguous.
            result = cv2.LUT(image, self.normalisation, dst=slot)
            if not np.shares_memory(result, slot):
                slot[...] = result
        return batch

    def generate_anchors(self, image_shape):
        return self.anchor_cache.get(image_shape).anchors()

    def compute_targets(self, image_group, annotations_group):
        """[regression (batch, anchors, 5), classification (batch, anchors, classes + 1)].

        The values of keras-retinanet's anchor_targets_bbox (IoU >= 0.5 positive, 0.4 to 0.5
        ignored, anchors centred outside the image ignored); with `data.difficult=ignore`,
        background anchors overlapping a difficult object by more than 0.4 become ignored.
        """
        shape = tuple(max(image.shape[axis] for image in image_group) for axis in range(3))
        anchors = self.anchor_cache.get(shape)
        count = anchors.count
        regression = np.zeros((len(image_group), count, 5), dtype=np.float32)
        labels = np.zeros((len(image_group), count, self.num_classes() + 1), dtype=np.float32)
        for index, (image, annotations) in enumerate(zip(image_group, annotations_group)):
            boxes = annotations["bboxes"]
            if len(boxes):
                best, nearest = anchors.overlaps(boxes)
                positive = np.flatnonzero(best >= POSITIVE_OVERLAP)
                ignore = np.flatnonzero((best > NEGATIVE_OVERLAP) & (best < POSITIVE_OVERLAP))
                for state, where in ((-1, ignore), (1, positive)):
                    labels[index, where, -1] = state
                    regression[index, where, -1] = state
                classes = annotations["labels"][nearest[positive]].astype(int)
                labels[index, positive, classes] = 1
                anchors.regression_targets(boxes, nearest, out=regression[index, :, :4])

            # Anchors centred outside this image (padding of a batch, or the ragged edge).
            outside = np.flatnonzero(
                (anchors.centre_x >= image.shape[1]) | (anchors.centre_y >= image.shape[0])
            )
            labels[index, outside, -1] = -1
            regression[index, outside, -1] = -1

            # Difficult objects under data.difficult=ignore: no background near them.
            if self.ignore_difficult and len(annotations["ignore_bboxes"]):
                best, _ = anchors.overlaps(annotations["ignore_bboxes"])
                near = (best > NEGATIVE_OVERLAP) & (labels[index, :, -1] == 0)
                labels[index, near, -1] = -1
                regression[index, near, -1] = -1
        return [regression, labels]

    def _anchor_targets(self, anchors, image_group, annotations_group, num_classes):
        # keras-retinanet's own target function with the difficult rule: the reference that
        # compute_targets is tested against.
        regression, labels = anchor_targets_bbox(
            anchors, image_group, annotations_group, num_classes
        )
        if not self.ignore_difficult:
            return regression, labels
        for index, annotations in enumerate(annotations_group):
            if not len(annotations["ignore_bboxes"]):
                continue
            positive, ignore, _ = compute_gt_annotations(anchors, annotations["ignore_bboxes"])
            near = (positive | ignore) & (labels[index, :, -1] == 0)
            labels[index, near, -1] = -1
            regression[index, near, -1] = -1
        return regression, labels


class AnchorSet:
    """The anchors of one padded image shape, stored by column, and what targets reuse.

    Values equal keras-retinanet's anchors_for_shape with guess_shapes: locations row by row
    per pyramid level, 9 anchors per location.

    Attributes:
        count: number of anchors.
        x1, y1, x2, y2, widths, heights, areas, centre_x, centre_y: (anchors,) float64.
        levels: per pyramid level: its slice of the anchors, its (rows, columns, anchors)
            shape, the smallest y1 and largest y2 per row of locations, the smallest x1 and
            largest x2 per column, and (rows, columns, anchors) views of x1, y1, x2, y2, areas.
    """

    def __init__(self, image_shape, params: AnchorParameters):
        grids, bounds, start = [], [], 0
        for level, shape in enumerate(guess_shapes(image_shape, PYRAMID_LEVELS)):
            rows, columns = int(shape[0]), int(shape[1])
            base = generate_anchors(params.sizes[level], params.ratios, params.scales)
            shift_x = (np.arange(0, columns) + 0.5) * params.strides[level]
            shift_y = (np.arange(0, rows) + 0.5) * params.strides[level]
            # (rows, columns, anchors, 4): the same sums as keras-retinanet's shift().
            grid = np.empty((rows, columns, len(base), 4))
            grid[..., 0::2] = base[:, 0::2] + shift_x[None, :, None, None]
            grid[..., 1::2] = base[:, 1::2] + shift_y[:, None, None, None]
            # The extent of each row and column of locations, increasing along the grid.
            bounds.append(
                (start, (rows, columns, len(base)),
                 grid[..., 1].min(axis=(1, 2)), grid[..., 3].max(axis=(1, 2)),
                 grid[..., 0].min(axis=(0, 2)), grid[..., 2].max(axis=(0, 2)))
            )  # fmt: skip
            grids.append(grid.reshape(-1, 4))
            start += grid.size // 4
        anchors = np.concatenate(grids)
        self.count = len(anchors)
        self.x1, self.y1, self.x2, self.y2 = (np.ascontiguousarray(c) for c in anchors.T)
        self.widths = self.x2 - self.x1
        self.heights = self.y2 - self.y1
        self.areas = self.widths * self.heights
        self.centre_x = (self.x1 + self.x2) / 2
        self.centre_y = (self.y1 + self.y2) / 2
        self.levels = [
            (part, shape, *extents, *(self._grid(a, part, shape) for a in self._columns()))
            for part, shape, *extents in (
                (slice(begin, begin + int(np.prod(shape))), shape, *rest)
                for begin, shape, *rest in bounds
            )
        ]

    def _columns(self) -> tuple:
        return self.x1, self.y1, self.x2, self.y2, self.areas

    @staticmethod
    def _grid(values: np.ndarray, part: slice, shape: tuple) -> np.ndarray:
        # A (rows, columns, anchors) view of one level's anchors.
        return values[part].reshape(shape)

    def anchors(self) -> np.ndarray:
        """(anchors, 4) x1, y1, x2, y2 float64."""
        return np.stack([self.x1, self.y1, self.x2, self.y2], axis=1)

    def overlaps(self, boxes: np.ndarray):
        """Every anchor's best IoU and its box, as keras-retinanet's compute_overlap and argmax.

        Per box and pyramid level, only the window of anchor locations whose extent meets the
        box is computed; anchors outside it cannot overlap the box. A later box replaces an
        earlier one only when strictly better, so ties go to the first box, as with argmax.

        Args:
            boxes: (boxes, 4) x1, y1, x2, y2 float64.

        Returns:
            best: (anchors,) float64 IoU with the best box (0 when none overlaps);
            nearest: (anchors,) int index of that box (0 when none overlaps).
        """
        best = np.zeros(self.count)
        nearest = np.zeros(self.count, dtype=np.int64)
        for k, (bx1, by1, bx2, by2) in enumerate(np.asarray(boxes, dtype=np.float64)):
            box_area = (bx2 - bx1) * (by2 - by1)
            for level in self.levels:
                part, shape, row_y1, row_y2, column_x1, column_x2, x1, y1, x2, y2, areas = level
                rows = slice(
                    int(np.searchsorted(row_y2, by1, side="right")),
                    int(np.searchsorted(row_y1, by2, side="left")),
                )
                columns = slice(
                    int(np.searchsorted(column_x2, bx1, side="right")),
                    int(np.searchsorted(column_x1, bx2, side="left")),
                )
                if rows.start >= rows.stop or columns.start >= columns.stop:
                    continue
                window = (rows, columns)
                iw = np.minimum(x2[window], bx2) - np.maximum(x1[window], bx1)
                ih = np.minimum(y2[window], by2) - np.maximum(y1[window], by1)
                inter = iw * ih
                union = areas[window] + box_area - inter
                # Same operations in the same order as compute_overlap, so the same bits.
                iou = np.divide(inter, union, out=np.zeros_like(inter), where=(iw > 0) & (ih > 0))
                level_best = best[part].reshape(shape)[window]
                better = iou > level_best
                level_best[better] = iou[better]
                nearest[part].reshape(shape)[window][better] = k
        return best, nearest

    def regression_targets(self, boxes: np.ndarray, nearest: np.ndarray, out: np.ndarray):
        """keras-retinanet's bbox_transform of every anchor against its nearest box.

        Args:
            boxes: (boxes, 4) float64.
            nearest: (anchors,) index of each anchor's best-overlapping box.
            out: (anchors, 4) float32, written.
        """
        buffer = np.empty(self.count)
        others = np.flatnonzero(nearest)
        columns = (
            (self.x1, self.widths), (self.y1, self.heights),
            (self.x2, self.widths), (self.y2, self.heights),
        )  # fmt: skip
        for column, (corner, size) in enumerate(columns):
            # ((box - anchor) / anchor size - mean 0) / std, in float64 like bbox_transform;
            # most anchors have box 0 as nearest (no overlap at all), the rest are redone.
            np.subtract(boxes[0, column], corner, out=buffer)
            np.divide(buffer, size, out=buffer)
            np.divide(buffer, REGRESSION_STD, out=buffer)
            if len(others):
                part = boxes[nearest[others], column] - corner[others]
                buffer[others] = part / size[others] / REGRESSION_STD
            out[:, column] = buffer


class AnchorCache:
    """AnchorSets by feature-map shapes, least recently used first out; thread-safe.

    Args:
        params: anchor sizes, strides, ratios and scales.
        size: sets kept (each about 12 MiB for an 800 x 1333 image).
    """

    def __init__(self, params: AnchorParameters, size: int = 8):
        self.params = params
        self.size = max(1, size)
        self.sets = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, image_shape) -> AnchorSet:
        # Anchors depend on the image shape only through the feature-map shapes.
        key = tuple(tuple(int(v) for v in s) for s in guess_shapes(image_shape, PYRAMID_LEVELS))
        with self.lock:
            found = self.sets.get(key)
            if found is not None:
                self.sets.move_to_end(key)
                return found
        built = AnchorSet(image_shape, self.params)
        with self.lock:
            self.sets[key] = built
            while len(self.sets) > self.size:
                self.sets.popitem(last=False)
        return built
