"""VOC-layout data: annotation parsing, the embedded toy dataset and the training generator.

The parsing and the toy dataset use only numpy/OpenCV; TensorFlow and keras-retinanet are
imported only when a training generator is built.
"""

import dataclasses
import json
import logging
import math
import os
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from fgl_retinanet.config import resolve_path

logger = logging.getLogger(__name__)

TOY_CLASSES = ("circle", "square", "triangle")


class DataError(ValueError):
    """A dataset problem that stops training before it starts.

    Attributes:
        report: the DataReport of the split, every problem included (None if not parsed).
    """

    def __init__(self, message: str, report: "DataReport | None" = None):
        super().__init__(message)
        self.report = report


@dataclass
class ImageRecord:
    """One image and its objects, boxes 0-based (devkit pixel 1 is our 0), float32."""

    image_id: str
    image_path: Path
    width: int  # of the image file (a disagreeing <size> is reported)
    height: int
    boxes: np.ndarray  # (objects, 4) x1, y1, x2, y2
    labels: np.ndarray  # (objects,) int class index
    difficult: np.ndarray  # (objects,) bool
    truncated: np.ndarray  # (objects,) bool
    poses: tuple = ()  # (objects,) str; a missing or empty <pose> is "Unspecified"


@dataclass
class DataReport:
    """What parsing found: counts and every problem, so nothing is dropped silently."""

    root: str = ""
    split: str = ""
    images: int = 0
    objects: int = 0
    per_class: dict = field(default_factory=dict)
    difficult: int = 0
    truncated: int = 0
    problems: list = field(default_factory=list)  # (file, message): images or objects left out
    notes: list = field(default_factory=list)  # (file, message): fixed, e.g. boxes clipped
    errors: list = field(default_factory=list)  # policy violations that stop training
    skipped_objects: int = 0  # named outside the class list, skipped by policy
    unknown_names: dict = field(default_factory=dict)  # unknown class name -> object count
    bad_boxes: int = 0  # no box, several boxes, or nothing left inside the image
    clipped_boxes: int = 0  # crossing the image border, clipped (kept)
    size_mismatches: int = 0  # <size> disagrees with the image file; the file wins
    unreadable_images: int = 0  # listed but missing or not decodable, left out
    missing_annotations: int = 0  # listed in the split without an XML file, left out
    malformed_annotations: int = 0  # XML that does not parse, left out
    images_without_objects: int = 0  # kept: every anchor background (skipped objects included)

    @property
    def can_train(self) -> bool:
        """Whether the configured policies let training start on this split."""
        return not self.errors

    def summary(self, limit: int | None = 20) -> str:
        """A readable report: counts, objects per class, problems and notes, the verdict.

        Args:
            limit: problems and notes listed at most (None: all of them).
        """
        name = f"{Path(self.root).name}/{self.split}: " if self.split else ""
        lines = [
            f"{name}{_count(self.images, 'image')}, {_count(self.objects, 'object')} "
            f"({self.difficult} difficult, {self.truncated} truncated)"
        ]
        if self.per_class:
            counts = ", ".join(f"{name} {count}" for name, count in self.per_class.items())
            lines += textwrap.wrap(
                f"objects per class: {counts}", width=100, subsequent_indent="  "
            )
        counts = [
            (self.skipped_objects, "object", "with an unknown class name skipped"),
            (self.bad_boxes, "object", "without a usable box skipped"),
            (self.clipped_boxes, "box", "crossing the border clipped"),
            (self.size_mismatches, "image", "whose <size> disagrees with the file"),
            (self.unreadable_images, "image", "missing or unreadable, left out"),
            (self.missing_annotations, "listed id", "without an annotation file, left out"),
            (self.malformed_annotations, "malformed annotation file", "left out"),
            (self.images_without_objects, "image", "without objects, kept (all background)"),
        ]
        lines += [f"{_count(count, noun)} {what}" for count, noun, what in counts if count]
        if self.unknown_names:
            names = ", ".join(f"{n!r} x{c}" for n, c in sorted(self.unknown_names.items()))
            lines.append(f"unknown class names: {names}")
        for title, items in (("problems", self.problems), ("notes", self.notes)):
            if not items:
                continue
            lines.append(f"{title} ({len(items)}):")
            shown = items if limit is None else items[:limit]
            lines += [f"  {path}: {message}" for path, message in shown]
            if len(shown) < len(items):
                lines.append(f"  ... and {len(items) - len(shown)} more (all in the JSON report)")
        if self.errors:
            lines.append("training cannot proceed:")
            lines += [f"  {error}" for error in self.errors]
        else:
            lines.append("training can proceed")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"can_train": self.can_train}


def _count(count: int, noun: str) -> str:
    """'1 image', '2 images', '3 boxes'."""
    plural = noun + ("es" if noun.endswith(("s", "x")) else "s")
    return f"{count} {noun if count == 1 else plural}"


def write_data_report(path, reports: dict) -> dict:
    """Writes the reports of several splits as one JSON file.

    Args:
        path: output file.
        reports: split name -> DataReport.

    Returns:
        What was written: {"can_train": bool, "splits": {split: report dict}}.
    """
    content = {
        "can_train": all(report.can_train for report in reports.values()),
        "splits": {split: report.to_dict() for split, report in reports.items()},
    }
    text = json.dumps(content, indent=2)
    Path(path).write_text(text + "\n")
    return json.loads(text)


class VocDataset:
    """The images of one ImageSets/Main split of a VOC directory, parsed once up front.

    Every image file is opened (header only) so that missing or undecodable images and a wrong
    `<size>` are found before training, not inside a data-loading thread at step 4,000.

    Args:
        root: directory with Annotations/, JPEGImages/ and ImageSets/Main/.
        split: name of the list file, e.g. "train" for ImageSets/Main/train.txt.
        classes: class names; the label of a class is its index here.
        unknown_classes: objects named outside `classes`: "error" stops with one message naming
            every offending file and name; "skip" leaves them out and counts them.
        bad_boxes: objects with no usable box (missing, several, x2 <= x1 or y2 <= y1 after
            clipping to the image): "error" or "skip", as above.
        raise_errors: raise DataError when a policy says error; False records the errors in
            `report.errors` instead (what fgl-check-data uses to report everything).
    """

    def __init__(
        self,
        root,
        split: str,
        classes,
        unknown_classes: str = "error",
        bad_boxes: str = "error",
        raise_errors: bool = True,
    ):
        self.root = Path(root)
        self.split = split
        self.classes = list(classes)
        self.report = DataReport(
            root=str(self.root), split=split, per_class={name: 0 for name in self.classes}
        )

        # Read the split list; a VOC line may carry a second column (per-class lists).
        list_path = self.root / "ImageSets" / "Main" / f"{split}.txt"
        ids = [line.split()[0] for line in list_path.read_text().splitlines() if line.strip()]

        # Parse every annotation now, so problems surface before the first training step.
        self.records = []
        unknown, bad = [], []
        for image_id in ids:
            record = self._parse(image_id, unknown, bad)
            if record is not None:
                self.records.append(record)
        self.report.images = len(self.records)

        # Policies: stop with every offender named, or count what was skipped.
        errors = []
        if unknown and unknown_classes == "error":
            errors.append(
                _offenders(f"objects in {split} with class names outside data.classes", unknown)
                + " (set data.unknown_classes=skip to skip them)"
            )
        if bad and bad_boxes == "error":
            errors.append(
                _offenders(f"objects in {split} without a usable box", bad)
                + " (set data.bad_boxes=skip to skip them)"
            )
        self.report.skipped_objects = len(unknown)
        self.report.bad_boxes = len(bad)
        self.report.problems += [(path, f"skipped object: {what}") for path, what in unknown + bad]
        self.report.errors = errors
        if errors and raise_errors:
            raise DataError("; ".join(errors), self.report)

    def __len__(self) -> int:
        return len(self.records)

    def _parse(self, image_id: str, unknown: list, bad: list) -> ImageRecord | None:
        xml_path = self.root / "Annotations" / f"{image_id}.xml"
        image_path = self.root / "JPEGImages" / f"{image_id}.jpg"
        if not xml_path.is_file():
            self.report.missing_annotations += 1
            self.report.problems.append((str(xml_path), "listed in the split but missing"))
            return None
        try:
            root = ET.parse(xml_path).getroot()
        except ET.ParseError as e:
            self.report.malformed_annotations += 1
            self.report.problems.append((str(xml_path), f"malformed XML: {e}"))
            return None

        # The image file decides the size; <size> is checked against it.
        try:
            with Image.open(image_path) as image:
                width, height = image.size
            if truncated_jpeg(image_path):
                raise OSError("truncated JPEG: no end-of-image marker (the file was cut short)")
        except (OSError, UnidentifiedImageError) as e:
            self.report.unreadable_images += 1
            self.report.problems.append((str(image_path), f"missing or unreadable image: {e}"))
            return None
        declared = (_int_text(root.find("size/width")), _int_text(root.find("size/height")))
        if declared != (0, 0) and declared != (width, height):
            self.report.size_mismatches += 1
            self.report.notes.append(
                (str(xml_path), f"<size> says {declared[0]}x{declared[1]}, image is "
                 f"{width}x{height}; boxes are clipped to the image")
            )  # fmt: skip

        boxes, labels, difficult, truncated, poses = [], [], [], [], []
        # Only direct <object> children: <part> sub-boxes of person layout are not objects.
        for index, obj in enumerate(root.findall("object")):
            name = (obj.findtext("name") or "").strip()
            if name not in self.classes:
                unknown.append((str(xml_path), f"object {index} named {name!r}"))
                self.report.unknown_names[name] = self.report.unknown_names.get(name, 0) + 1
                continue
            if len(obj.findall("bndbox")) != 1:
                bad.append((str(xml_path), f"object {index} ({name}) has "
                            f"{len(obj.findall('bndbox'))} boxes"))  # fmt: skip
                continue
            box = _parse_box(obj.find("bndbox"))
            clipped = None if box is None else _clip(box, width, height)
            if clipped is None or clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                bad.append((str(xml_path), f"object {index} ({name}) has no usable box "
                            f"inside the {width}x{height} image"))  # fmt: skip
                continue
            if clipped != box:
                self.report.clipped_boxes += 1
                self.report.notes.append(
                    (str(xml_path), f"object {index} ({name}) clipped to the image border")
                )
            boxes.append(clipped)
            labels.append(self.classes.index(name))
            difficult.append(_int_text(obj.find("difficult")) == 1)
            truncated.append(_int_text(obj.find("truncated")) == 1)
            poses.append((obj.findtext("pose") or "").strip() or "Unspecified")
            self.report.per_class[name] += 1

        self.report.objects += len(boxes)
        self.report.images_without_objects += not boxes
        self.report.difficult += sum(difficult)
        self.report.truncated += sum(truncated)
        return ImageRecord(
            image_id=image_id,
            image_path=image_path,
            width=width,
            height=height,
            boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.array(labels, dtype=np.int64),
            difficult=np.array(difficult, dtype=bool),
            truncated=np.array(truncated, dtype=bool),
            poses=tuple(poses),
        )

    def ground_truth(self) -> dict:
        """Ground truth in the layout of fgl_retinanet.evaluation.average_precisions."""
        return {
            record.image_id: [
                {"box": box.tolist(), "label": self.classes[label], "difficult": bool(hard)}
                for box, label, hard in zip(record.boxes, record.labels, record.difficult)
            ]
            for record in self.records
        }


def dataset_root(config) -> Path:
    """The VOC directory to read; the toy dataset is generated there on first use."""
    if config.data.dataset == "toy":
        toy = config.data.toy
        name = f"toy_{toy.image_size}px_{toy.num_train}_{toy.num_val}_seed{toy.seed}"
        root = resolve_path(config.data.root or "data/generated") / name
        return generate_toy_dataset(root, toy.num_train, toy.num_val, toy.image_size, toy.seed)
    return resolve_path(config.data.root)


def load_split(root, split: str, config, raise_errors: bool = True) -> VocDataset:
    """A split parsed with the policies of `config.data` (see VocDataset)."""
    return VocDataset(
        root,
        split,
        config.data.classes,
        config.data.unknown_classes,
        config.data.bad_boxes,
        raise_errors=raise_errors,
    )


def truncated_jpeg(path: Path, tail: int = 4096) -> bool:
    """True for a JPEG file whose end-of-image marker is missing: the file was cut short.

    Decoders accept such files: OpenCV fills the missing rows with grey and only libjpeg's
    stderr says "Premature end of JPEG file", so the image would train with boxes on grey.
    Inside a JPEG's compressed data every 0xFF byte is stuffed (followed by 0x00), so the
    marker bytes 0xFF 0xD9 near the end are the end-of-image marker. Some writers append
    bytes after it, hence a search of the last `tail` bytes rather than of the last two.
    Files that do not start like a JPEG are left to the decoder.
    """
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return False
        size = f.seek(0, os.SEEK_END)
        f.seek(max(2, size - tail))
        return b"\xff\xd9" not in f.read()


def read_image_bgr(path: Path) -> np.ndarray:
    """Reads an image as uint8 BGR (the channel order keras-retinanet's preprocessing expects).

    The EXIF orientation tag is ignored, as keras-retinanet's PIL reader and the VOC devkit
    do: annotations refer to the stored pixels, whose size the header check recorded.

    Raises:
        DataError: for a file that cannot be decoded or a truncated JPEG (`truncated_jpeg`).
    """
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise DataError(f"cannot read image {path}")
    if truncated_jpeg(path):
        raise DataError(f"truncated JPEG {path}: no end-of-image marker")
    return image


def make_generator(dataset: VocDataset, config, training: bool, rank: int = 0, world: int = 1):
    """Builds the keras-retinanet generator for a dataset (imports keras-retinanet lazily)."""
    from fgl_retinanet.pipeline import VocSequence

    return VocSequence(dataset, config, training=training, rank=rank, world=world)


def generate_toy_dataset(root, num_train: int, num_val: int, image_size: int, seed: int) -> Path:
    """Writes a deterministic VOC-layout dataset of coloured shapes on textured backgrounds.

    Three classes (circle, square, triangle), one to four objects per image, 14 to 48 pixels
    across at `image_size` 128, partly overlapping the border sometimes, so a small detector
    learns them on a CPU in minutes. The same arguments always give the same files.

    Returns:
        The dataset directory (holding Annotations/, JPEGImages/, ImageSets/Main/).
    """
    root = Path(root)
    marker = root / "ImageSets" / "Main" / "trainval.txt"
    if marker.is_file():
        return root
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    ids = [f"{i:06d}" for i in range(num_train + num_val)]
    for image_id in ids:
        image, objects = _draw_toy_image(rng, image_size)
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), image,
                    [cv2.IMWRITE_JPEG_QUALITY, 95])  # fmt: skip
        (root / "Annotations" / f"{image_id}.xml").write_text(
            _voc_xml(image_id, image_size, image_size, objects)
        )

    # Write the lists last: their presence marks a complete dataset.
    lists = {"train": ids[:num_train], "val": ids[num_train:], "trainval": ids}
    for name, members in lists.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(members) + "\n")
    logger.info("generated toy dataset: %d train, %d val images in %s", num_train, num_val, root)
    return root


def _draw_toy_image(rng: np.random.Generator, size: int):
    # Smooth random background: low-resolution noise upsampled, so edges come from objects.
    coarse = rng.integers(40, 200, size=(4, 4, 3)).astype(np.uint8)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)

    objects = []
    taken = []
    for _ in range(int(rng.integers(1, 5))):
        # Retry placement a few times to limit overlaps between objects.
        for _attempt in range(10):
            side = int(rng.integers(14, 49)) * size // 128
            x1 = int(rng.integers(-side // 4, size - 3 * side // 4))
            y1 = int(rng.integers(-side // 4, size - 3 * side // 4))
            box = (x1, y1, x1 + side, y1 + side)
            if all(_overlap(box, other) < 0.2 for other in taken):
                break
        else:
            continue
        taken.append(box)
        name = TOY_CLASSES[int(rng.integers(len(TOY_CLASSES)))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        _draw_shape(image, name, box, colour)

        # Ground truth in VOC's 1-based inclusive pixels, clipped to the image.
        x1, y1, x2, y2 = box
        clipped = (max(x1, 0) + 1, max(y1, 0) + 1, min(x2, size - 1) + 1, min(y2, size - 1) + 1)
        truncated = clipped != (x1 + 1, y1 + 1, x2 + 1, y2 + 1)
        objects.append((name, clipped, truncated))
    return image, objects


def _draw_shape(image: np.ndarray, name: str, box, colour) -> None:
    x1, y1, x2, y2 = box
    if name == "circle":
        centre = ((x1 + x2) // 2, (y1 + y2) // 2)
        cv2.circle(image, centre, (x2 - x1) // 2, colour, thickness=-1, lineType=cv2.LINE_AA)
    elif name == "square":
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, thickness=-1)
    else:
        points = np.array([[(x1 + x2) // 2, y1], [x2, y2], [x1, y2]], dtype=np.int32)
        cv2.fillPoly(image, [points], colour, lineType=cv2.LINE_AA)


def _overlap(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def _voc_xml(image_id: str, width: int, height: int, objects) -> str:
    parts = [
        "<annotation>",
        "  <folder>toy</folder>",
        f"  <filename>{image_id}.jpg</filename>",
        f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
    ]
    for name, (x1, y1, x2, y2), truncated in objects:
        parts += [
            "  <object>",
            f"    <name>{name}</name><pose>Unspecified</pose>",
            f"    <truncated>{int(truncated)}</truncated><difficult>0</difficult>",
            f"    <bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
            "</bndbox>",
            "  </object>",
        ]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def _offenders(what: str, items: list) -> str:
    # Every offender, so that one run of the check finds them all.
    listed = ", ".join(f"{path}: {detail}" for path, detail in items)
    return f"{len(items)} {what}: {listed}"


def _clip(box: list, width: int, height: int) -> list:
    # 0-based pixel indices: the last column is width - 1.
    x1, y1, x2, y2 = box
    return [
        min(max(x1, 0.0), width - 1.0),
        min(max(y1, 0.0), height - 1.0),
        min(max(x2, 0.0), width - 1.0),
        min(max(y2, 0.0), height - 1.0),
    ]


def _int_text(node) -> int:
    # Missing or empty tags mean 0 (VOC: not difficult / not truncated / size unknown).
    if node is None or node.text is None or not node.text.strip():
        return 0
    try:
        return int(float(node.text.strip()))
    except ValueError:
        return 0


def _parse_box(node) -> list | None:
    if node is None:
        return None
    try:
        # Floats, never truncated; shift VOC's 1-based pixels to 0-based.
        coords = [float(node.findtext(tag)) - 1.0 for tag in ("xmin", "ymin", "xmax", "ymax")]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(c) for c in coords):
        return None
    if coords[2] <= coords[0] or coords[3] <= coords[1]:
        return None
    return coords
