"""Tests for VOC parsing and the generated toy dataset in fgl_retinanet.data.

The real input is a 13-image VOC2007 sample in the shared checkout; everything else is written
into pytest's tmp_path. Nothing here imports TensorFlow.
"""

import collections
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest

from fgl_retinanet.config import VOC_CLASSES
from fgl_retinanet.data import (
    TOY_CLASSES,
    DataError,
    VocDataset,
    generate_toy_dataset,
    read_image_bgr,
    write_data_report,
)
from shared_paths import VOC_SAMPLE

SAMPLE_ROOT = VOC_SAMPLE

# Counts of the trainval list of the sample, read off its XML once by hand.
SAMPLE_PER_CLASS = {
    "chair": 13,
    "car": 8,
    "person": 7,
    "aeroplane": 5,
    "horse": 2,
    "diningtable": 1,
    "dog": 1,
    "pottedplant": 1,
    "sofa": 1,
    "train": 1,
    "tvmonitor": 1,
}

# Tiny images are enough: the parser never decodes them.
IMAGE_WIDTH, IMAGE_HEIGHT = 64, 48


@pytest.fixture(scope="module")
def sample_root() -> Path:
    if not (SAMPLE_ROOT / "Annotations").is_dir():
        pytest.skip(f"VOC2007 sample not found at {SAMPLE_ROOT}; the shared/ checkout is absent")
    return SAMPLE_ROOT


@pytest.fixture(scope="module")
def sample(sample_root) -> VocDataset:
    return VocDataset(sample_root, "trainval", VOC_CLASSES)


def split_ids(root: Path, split: str) -> list[str]:
    text = (root / "ImageSets" / "Main" / f"{split}.txt").read_text()
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def xml_objects(root: Path, image_id: str) -> list[dict]:
    """The objects of one annotation, read with ElementTree independently of the package."""
    tree = ET.parse(root / "Annotations" / f"{image_id}.xml").getroot()
    objects = []
    for obj in tree.findall("object"):
        bndbox = obj.find("bndbox")
        objects.append(
            {
                "name": obj.findtext("name").strip(),
                "box": [float(bndbox.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")],
                "difficult": obj.findtext("difficult", "0").strip() == "1",
                "truncated": obj.findtext("truncated", "0").strip() == "1",
                "width": float(tree.findtext("size/width")),
                "height": float(tree.findtext("size/height")),
            }
        )
    return objects


def object_xml(name, box, difficult="0", truncated="0", inner="") -> str:
    """One <object>; difficult/truncated None leaves the tag out; inner goes before <bndbox>."""
    tags = "".join(
        f"<{tag}>{value}</{tag}>"
        for tag, value in (("difficult", difficult), ("truncated", truncated))
        if value is not None
    )
    coords = "".join(
        f"<{tag}>{value}</{tag}>" for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box)
    )
    return f"<object><name>{name}</name>{tags}{inner}<bndbox>{coords}</bndbox></object>"


def annotation_xml(*objects: str) -> str:
    size = f"<size><width>{IMAGE_WIDTH}</width><height>{IMAGE_HEIGHT}</height><depth>3</depth>"
    return f"<annotation><filename>x.jpg</filename>{size}</size>{''.join(objects)}</annotation>"


def write_voc(root: Path, annotations: dict, without_image=(), split="train") -> Path:
    """A VOC tree listing every id of `annotations` (id -> XML text, None for no XML file)."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    image = np.full((IMAGE_HEIGHT, IMAGE_WIDTH, 3), 127, dtype=np.uint8)
    for image_id, text in annotations.items():
        if text is not None:
            (root / "Annotations" / f"{image_id}.xml").write_text(text)
        if image_id not in without_image:
            assert cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), image)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(annotations) + "\n")
    return root


def only_record(dataset: VocDataset):
    assert len(dataset.records) == 1
    return dataset.records[0]


# The VOC2007 sample


def test_sample_counts(sample, sample_root):
    assert len(sample) == 13
    assert sample.report.images == 13
    assert sample.report.objects == 41
    assert sample.report.difficult == 6
    assert sample.report.truncated == 14
    assert sample.report.per_class == {name: SAMPLE_PER_CLASS.get(name, 0) for name in VOC_CLASSES}
    assert sample.report.problems == []
    assert sample.report.skipped_objects == 0

    # The same numbers, counted straight from the XML.
    objects = [
        obj
        for image_id in split_ids(sample_root, "trainval")
        for obj in xml_objects(sample_root, image_id)
    ]
    assert len(objects) == sample.report.objects
    assert sum(obj["difficult"] for obj in objects) == sample.report.difficult
    assert sum(obj["truncated"] for obj in objects) == sample.report.truncated
    assert collections.Counter(obj["name"] for obj in objects) == SAMPLE_PER_CLASS

    # ...and from the records themselves.
    assert sum(len(record.boxes) for record in sample.records) == 41
    assert sum(int(record.difficult.sum()) for record in sample.records) == 6
    assert sum(int(record.truncated.sum()) for record in sample.records) == 14


def test_sample_splits(sample_root):
    train = VocDataset(sample_root, "train", VOC_CLASSES)
    val = VocDataset(sample_root, "val", VOC_CLASSES)
    trainval_ids = split_ids(sample_root, "trainval")
    assert len(train) == 9
    assert len(val) == 4

    # Records keep the order of the list file; train and val partition trainval.
    train_ids = [record.image_id for record in train.records]
    val_ids = [record.image_id for record in val.records]
    assert train_ids == split_ids(sample_root, "train")
    assert val_ids == split_ids(sample_root, "val")
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == sorted(trainval_ids)
    assert train.report.objects + val.report.objects == 41


def test_sample_boxes_are_zero_based_floats(sample):
    record = next(record for record in sample.records if record.image_id == "000001")
    assert (record.width, record.height) == (353, 500)
    assert record.image_path.is_file()
    assert record.boxes.dtype == np.float32

    # 000001.xml: the dog is <xmin>48 <ymin>240 <xmax>195 <ymax>371, truncated, not difficult.
    np.testing.assert_array_equal(record.boxes[0], [47.0, 239.0, 194.0, 370.0])
    assert record.labels[0] == VOC_CLASSES.index("dog")
    assert bool(record.truncated[0]) and not record.difficult[0]


def test_box_on_the_border_ends_at_width_minus_one(sample, sample_root):
    # 000004.xml: a car with <xmax>500 in an image 500 pixels wide.
    record = next(record for record in sample.records if record.image_id == "000004")
    car = VOC_CLASSES.index("car")
    on_border = [
        box
        for box, label in zip(record.boxes, record.labels)
        if label == car and box[2] == record.width - 1
    ]
    assert len(on_border) == 1
    np.testing.assert_array_equal(on_border[0], [361.0, 329.0, 499.0, 388.0])
    assert any(obj["box"][2] == obj["width"] for obj in xml_objects(sample_root, "000004"))


def test_every_sample_box_matches_the_xml(sample, sample_root):
    for record in sample.records:
        expected = xml_objects(sample_root, record.image_id)
        assert [VOC_CLASSES[label] for label in record.labels] == [o["name"] for o in expected]
        np.testing.assert_array_equal(
            record.boxes, np.array([o["box"] for o in expected], dtype=np.float32) - 1
        )
        assert record.difficult.tolist() == [o["difficult"] for o in expected]
        assert record.truncated.tolist() == [o["truncated"] for o in expected]
        assert (record.boxes[:, 2] <= record.width - 1).all()
        assert (record.boxes[:, 3] <= record.height - 1).all()


def test_ground_truth_layout(sample):
    ground_truth = sample.ground_truth()
    assert list(ground_truth) == [record.image_id for record in sample.records]
    assert ground_truth["000001"] == [
        {"box": [47.0, 239.0, 194.0, 370.0], "label": "dog", "difficult": False},
        {"box": [7.0, 11.0, 351.0, 497.0], "label": "person", "difficult": False},
    ]
    entries = [entry for objects in ground_truth.values() for entry in objects]
    assert len(entries) == 41
    assert sum(entry["difficult"] for entry in entries) == 6
    for entry in entries:
        assert set(entry) == {"box", "label", "difficult"}
        assert len(entry["box"]) == 4 and all(type(c) is float for c in entry["box"])
        assert entry["label"] in SAMPLE_PER_CLASS
        assert type(entry["difficult"]) is bool


# Annotation edge cases, on VOC trees written here


def test_float_coordinates_stay_floats(tmp_path):
    box = ["10.7", "5.25", "30.5", 40]
    root = write_voc(tmp_path, {"a": annotation_xml(object_xml("dog", box))})
    record = only_record(VocDataset(root, "train", VOC_CLASSES))
    np.testing.assert_allclose(record.boxes[0], [9.7, 4.25, 29.5, 39.0], rtol=0, atol=1e-5)


def test_missing_or_empty_flags_mean_zero(tmp_path):
    objects = [
        object_xml("dog", [1, 1, 10, 10], difficult=None, truncated=None),
        object_xml("dog", [1, 1, 10, 10], difficult="", truncated=" "),
        object_xml("dog", [1, 1, 10, 10], difficult="1", truncated="1"),
    ]
    dataset = VocDataset(write_voc(tmp_path, {"a": annotation_xml(*objects)}), "train", VOC_CLASSES)
    record = only_record(dataset)
    assert record.difficult.tolist() == [False, False, True]
    assert record.truncated.tolist() == [False, False, True]
    assert (dataset.report.difficult, dataset.report.truncated) == (1, 1)


def test_class_names_are_stripped(tmp_path):
    root = write_voc(tmp_path, {"a": annotation_xml(object_xml("\n\t  dog  \n", [1, 1, 10, 10]))})
    dataset = VocDataset(root, "train", VOC_CLASSES)
    assert only_record(dataset).labels.tolist() == [VOC_CLASSES.index("dog")]
    assert dataset.report.per_class["dog"] == 1
    assert dataset.report.problems == []


def unknown_class_tree(root: Path) -> Path:
    return write_voc(
        root,
        {
            "a": annotation_xml(object_xml("zebra", [1, 1, 9, 9]), object_xml("dog", [2, 2, 8, 8])),
            "b": annotation_xml(object_xml("cat", [1, 1, 9, 9])),
            "c": annotation_xml(object_xml("unicorn", [3, 3, 9, 9])),
        },
    )


def test_unknown_class_error_names_every_file_and_name(tmp_path):
    root = unknown_class_tree(tmp_path)
    with pytest.raises(DataError) as info:
        VocDataset(root, "train", VOC_CLASSES)
    message = str(info.value)
    assert message.startswith("2 objects in train with class names outside data.classes")
    assert f"{root / 'Annotations' / 'a.xml'}: object 0 named 'zebra'" in message
    assert f"{root / 'Annotations' / 'c.xml'}: object 0 named 'unicorn'" in message
    assert "b.xml" not in message
    assert "data.unknown_classes=skip" in message


def test_unknown_class_skip_counts_the_objects(tmp_path):
    dataset = VocDataset(unknown_class_tree(tmp_path), "train", VOC_CLASSES, unknown_classes="skip")
    assert dataset.report.skipped_objects == 2
    assert dataset.report.objects == 2
    assert [len(record.boxes) for record in dataset.records] == [1, 1, 0]
    assert dataset.report.per_class["dog"] == 1 and dataset.report.per_class["cat"] == 1
    assert "zebra" not in dataset.report.per_class
    summary = dataset.report.summary()
    assert "2 objects with an unknown class name skipped" in summary
    # The names and files are reported, so a typo like 'persn' cannot hide.
    assert dataset.report.unknown_names == {"zebra": 1, "unicorn": 1}
    assert "'unicorn' x1" in summary and "a.xml: skipped object: object 0 named 'zebra'" in summary


def test_person_parts_are_not_objects(tmp_path):
    # Person-layout annotations put <part> boxes inside the person, here before its own box.
    parts = "".join(
        f"<part><name>{name}</name><bndbox><xmin>{x}</xmin><ymin>3</ymin>"
        f"<xmax>{x + 4}</xmax><ymax>7</ymax></bndbox></part>"
        for name, x in (("head", 5), ("hand", 12))
    )
    person = object_xml("person", [2, 2, 30, 40], inner=parts)
    root = write_voc(tmp_path, {"a": annotation_xml(person)})
    dataset = VocDataset(root, "train", VOC_CLASSES)
    record = only_record(dataset)
    assert record.labels.tolist() == [VOC_CLASSES.index("person")]
    np.testing.assert_array_equal(record.boxes, [[1.0, 1.0, 29.0, 39.0]])
    assert dataset.report.objects == 1
    assert dataset.report.problems == []


def test_unusable_boxes_are_reported_and_dropped(tmp_path):
    objects = [
        object_xml("dog", [5, 5, 20, 20]),
        object_xml("cat", [20, 5, 20, 30]),  # x2 == x1
        object_xml("cat", [20, 5, 10, 30]),  # x2 < x1
        object_xml("cat", [5, 30, 20, 12]),  # y2 < y1
        object_xml("cat", [5, "abc", 20, 12]),  # not a number
        "<object><name>cat</name></object>",  # no box at all
    ]
    root = write_voc(tmp_path, {"a": annotation_xml(*objects)})
    xml_path = str(root / "Annotations" / "a.xml")

    # Default policy: stop, naming the file and every object.
    with pytest.raises(DataError) as info:
        VocDataset(root, "train", VOC_CLASSES)
    message = str(info.value)
    assert message.startswith("5 objects in train without a usable box")
    assert all(f"object {index} (cat)" in message for index in (1, 2, 3, 4, 5))
    assert "data.bad_boxes=skip" in message

    # skip: left out, counted and named.
    dataset = VocDataset(root, "train", VOC_CLASSES, bad_boxes="skip")
    record = only_record(dataset)
    np.testing.assert_array_equal(record.boxes, [[4.0, 4.0, 19.0, 19.0]])
    assert record.labels.tolist() == [VOC_CLASSES.index("dog")]
    assert [path for path, _ in dataset.report.problems] == [xml_path] * 5
    assert dataset.report.bad_boxes == 5
    assert dataset.report.objects == 1
    assert dataset.report.per_class["cat"] == 0


def test_border_boxes_are_clipped_not_dropped(tmp_path):
    objects = [
        object_xml("dog", [-4, 5, 20, 20]),  # crosses the left border
        object_xml("cat", [5, 5, IMAGE_WIDTH + 30, IMAGE_HEIGHT]),  # crosses right, touches bottom
        object_xml("cat", [IMAGE_WIDTH + 5, 5, IMAGE_WIDTH + 30, 20]),  # entirely outside
    ]
    root = write_voc(tmp_path, {"a": annotation_xml(*objects)})
    dataset = VocDataset(root, "train", VOC_CLASSES, bad_boxes="skip")
    record = only_record(dataset)
    np.testing.assert_array_equal(
        record.boxes,
        [[0.0, 4.0, 19.0, 19.0], [4.0, 4.0, IMAGE_WIDTH - 1.0, IMAGE_HEIGHT - 1.0]],
    )
    assert dataset.report.clipped_boxes == 2
    assert dataset.report.bad_boxes == 1
    assert "2 boxes crossing the border clipped" in dataset.report.summary()


def test_size_tag_disagreeing_with_the_image(tmp_path):
    text = annotation_xml(object_xml("dog", [1, 1, 10, 10])).replace(
        f"<width>{IMAGE_WIDTH}</width>", f"<width>{IMAGE_WIDTH * 2}</width>"
    )
    dataset = VocDataset(write_voc(tmp_path, {"a": text}), "train", VOC_CLASSES)
    record = only_record(dataset)
    assert (record.width, record.height) == (IMAGE_WIDTH, IMAGE_HEIGHT)
    assert dataset.report.size_mismatches == 1
    assert "a.xml: <size> says" in dataset.report.summary()


def test_undecodable_image_is_named_and_left_out(tmp_path):
    good = annotation_xml(object_xml("dog", [1, 1, 10, 10]))
    root = write_voc(tmp_path, {"good": good, "text": good})
    (root / "JPEGImages" / "text.jpg").write_text("not an image")
    dataset = VocDataset(root, "train", VOC_CLASSES)
    assert [record.image_id for record in dataset.records] == ["good"]
    assert dataset.report.unreadable_images == 1
    (problem,) = dataset.report.problems
    assert problem[0].endswith("text.jpg") and "unreadable" in problem[1]


def test_broken_and_missing_files_are_reported(tmp_path):
    good = annotation_xml(object_xml("dog", [1, 1, 10, 10]))
    root = write_voc(
        tmp_path,
        {
            "good": good,
            "malformed": "<annotation><object><name>dog</name></annotation>",
            "no_xml": None,
            "no_jpeg": good,
        },
        without_image=("no_jpeg",),
    )
    dataset = VocDataset(root, "train", VOC_CLASSES)
    assert [record.image_id for record in dataset.records] == ["good"]
    assert dataset.report.images == 1
    assert dataset.report.objects == 1

    problems = dict(dataset.report.problems)
    assert len(problems) == 3
    report = dataset.report
    assert (report.malformed_annotations, report.missing_annotations) == (1, 1)
    assert report.unreadable_images == 1
    assert problems[str(root / "Annotations" / "malformed.xml")].startswith("malformed XML")
    assert problems[str(root / "Annotations" / "no_xml.xml")] == "listed in the split but missing"
    assert "missing or unreadable image" in problems[str(root / "JPEGImages" / "no_jpeg.jpg")]
    assert "malformed.xml" in dataset.report.summary()


def test_missing_or_empty_pose_is_unspecified(tmp_path):
    objects = [
        object_xml("dog", [1, 1, 10, 10]),
        object_xml("dog", [1, 1, 10, 10], inner="<pose>  </pose>"),
        object_xml("dog", [1, 1, 10, 10], inner="<pose> Left </pose>"),
    ]
    dataset = VocDataset(write_voc(tmp_path, {"a": annotation_xml(*objects)}), "train", VOC_CLASSES)
    assert only_record(dataset).poses == ("Unspecified", "Unspecified", "Left")
    assert dataset.report.problems == []


def test_object_with_several_boxes_follows_the_box_policy(tmp_path):
    second = "<bndbox><xmin>3</xmin><ymin>3</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>"
    objects = [object_xml("dog", [1, 1, 10, 10], inner=second), object_xml("cat", [2, 2, 8, 8])]
    root = write_voc(tmp_path, {"a": annotation_xml(*objects)})
    with pytest.raises(DataError, match=r"a\.xml: object 0 \(dog\) has 2 boxes"):
        VocDataset(root, "train", VOC_CLASSES)
    dataset = VocDataset(root, "train", VOC_CLASSES, bad_boxes="skip")
    assert only_record(dataset).labels.tolist() == [VOC_CLASSES.index("cat")]
    assert dataset.report.bad_boxes == 1
    assert "object 0 (dog) has 2 boxes" in dataset.report.problems[0][1]


def test_error_lists_every_offender(tmp_path):
    # More offenders than any display limit: one message still names each of them.
    annotations = {f"{i:03d}": annotation_xml(object_xml("persn", [1, 1, 9, 9])) for i in range(70)}
    root = write_voc(tmp_path, annotations)
    with pytest.raises(DataError) as info:
        VocDataset(root, "train", VOC_CLASSES)
    message = str(info.value)
    assert message.startswith("70 objects in train with class names outside data.classes")
    assert all(f"{i:03d}.xml: object 0 named 'persn'" in message for i in range(70))
    # The exception carries the whole report.
    assert info.value.report.unknown_names == {"persn": 70}
    assert not info.value.report.can_train


def test_policy_errors_recorded_without_raising(tmp_path):
    objects = [object_xml("zebra", [1, 1, 9, 9]), object_xml("dog", [20, 5, 10, 30])]
    other = annotation_xml(object_xml("dog", [1, 1, 9, 9]))
    root = write_voc(tmp_path, {"a": annotation_xml(*objects), "b": other})
    dataset = VocDataset(root, "train", VOC_CLASSES, raise_errors=False)
    report = dataset.report
    assert not report.can_train and len(report.errors) == 2
    assert "class names outside data.classes" in report.errors[0]
    assert "without a usable box" in report.errors[1]
    assert (report.images, report.objects, report.skipped_objects, report.bad_boxes) == (2, 1, 1, 1)
    summary = report.summary()
    assert summary.startswith("train: 2 images, 1 object ") or "/train: 2 images" in summary
    assert "training cannot proceed:" in summary and "data.unknown_classes=skip" in summary
    assert "objects per class: aeroplane 0" in summary and "dog 1" in summary

    # Skip policies: the same objects counted, training can proceed.
    skipped = VocDataset(root, "train", VOC_CLASSES, unknown_classes="skip", bad_boxes="skip")
    assert skipped.report.can_train and skipped.report.summary().endswith("training can proceed")


def test_data_report_json(tmp_path):
    root = write_voc(
        tmp_path / "voc",
        {"a": annotation_xml(object_xml("dog", [-3, 1, 10, 10])), "gone": None},
    )
    report = VocDataset(root, "train", VOC_CLASSES).report
    written = write_data_report(tmp_path / "report.json", {"train": report})
    loaded = json.loads((tmp_path / "report.json").read_text())
    assert loaded == written
    assert loaded["can_train"] is True
    split = loaded["splits"]["train"]
    assert (split["images"], split["objects"], split["clipped_boxes"]) == (1, 1, 1)
    assert split["missing_annotations"] == 1
    annotations = root / "Annotations"
    assert split["problems"] == [[str(annotations / "gone.xml"), "listed in the split but missing"]]
    assert split["notes"] == [
        [str(annotations / "a.xml"), "object 0 (dog) clipped to the image border"]
    ]
    assert split["per_class"]["dog"] == 1 and split["split"] == "train"


def test_exif_orientation_is_ignored(tmp_path):
    # A JPEG whose EXIF says "rotate 90": annotations refer to the stored pixels, as for
    # keras-retinanet's PIL reader, so the size check and the decoded image must agree.
    from PIL import Image

    pixels = np.zeros((IMAGE_HEIGHT, IMAGE_WIDTH, 3), dtype=np.uint8)
    pixels[:, : IMAGE_WIDTH // 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif)
    image = read_image_bgr(path)
    assert image.shape == (IMAGE_HEIGHT, IMAGE_WIDTH, 3)
    np.testing.assert_array_equal(image, np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1])


def test_image_without_objects_is_kept(tmp_path):
    dataset = VocDataset(write_voc(tmp_path, {"empty": annotation_xml()}), "train", VOC_CLASSES)
    record = only_record(dataset)
    assert record.boxes.shape == (0, 4) and record.boxes.dtype == np.float32
    assert record.labels.shape == (0,)
    assert (record.width, record.height) == (IMAGE_WIDTH, IMAGE_HEIGHT)
    assert dataset.report.images == 1 and dataset.report.objects == 0
    assert dataset.ground_truth() == {"empty": []}
    # Kept, and counted: a split where many images lost their objects should show it.
    assert dataset.report.images_without_objects == 1
    summary = dataset.report.summary()
    assert "1 image, 0 objects" in summary
    assert "1 image without objects, kept (all background)" in summary


def test_split_list_with_a_second_column(tmp_path):
    xml = annotation_xml(object_xml("dog", [1, 1, 10, 10]))
    root = write_voc(tmp_path, {"a": xml, "b": xml})
    (root / "ImageSets" / "Main" / "dog_train.txt").write_text("a  1\n\nb -1\n")
    dataset = VocDataset(root, "dog_train", VOC_CLASSES)
    assert [record.image_id for record in dataset.records] == ["a", "b"]


# The generated toy dataset


def tree_bytes(root: Path) -> dict:
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*.*")}


def test_toy_dataset_is_deterministic(tmp_path):
    first = generate_toy_dataset(tmp_path / "a", 6, 3, 128, seed=7)
    second = generate_toy_dataset(tmp_path / "b", 6, 3, 128, seed=7)
    other = generate_toy_dataset(tmp_path / "c", 6, 3, 128, seed=8)
    assert first == tmp_path / "a"

    files = tree_bytes(first)
    assert len(files) == 2 * 9 + 3
    assert files == tree_bytes(second)

    # Another seed changes the pictures and the annotations, not the lists.
    changed = {name for name, data in tree_bytes(other).items() if files[name] != data}
    assert any(name.endswith(".jpg") for name in changed)
    assert any(name.endswith(".xml") for name in changed)
    assert not any(name.endswith(".txt") for name in changed)


def test_toy_dataset_layout(tmp_path):
    root = generate_toy_dataset(tmp_path / "toy", 5, 3, 96, seed=0)
    train, val = split_ids(root, "train"), split_ids(root, "val")
    assert len(train) == 5 and len(val) == 3
    assert split_ids(root, "trainval") == train + val
    assert not set(train) & set(val)
    for image_id in train + val:
        image = cv2.imread(str(root / "JPEGImages" / f"{image_id}.jpg"))
        assert image.shape == (96, 96, 3)
        tree = ET.parse(root / "Annotations" / f"{image_id}.xml").getroot()
        assert (tree.findtext("size/width"), tree.findtext("size/height")) == ("96", "96")


@pytest.mark.parametrize("size", [64, 128])
def test_toy_boxes_lie_inside_the_image(tmp_path, size):
    root = generate_toy_dataset(tmp_path / "toy", 30, 10, size, seed=1)
    for image_id in split_ids(root, "trainval"):
        for obj in xml_objects(root, image_id):
            x1, y1, x2, y2 = obj["box"]
            assert all(c == int(c) for c in obj["box"])
            assert 1 <= x1 < x2 <= size and 1 <= y1 < y2 <= size, (image_id, obj["box"])

            # Truncated objects were clipped, so they touch the border.
            if obj["truncated"]:
                assert x1 == 1 or y1 == 1 or x2 == size or y2 == size, (image_id, obj["box"])


def test_toy_dataset_parses_back(tmp_path):
    root = generate_toy_dataset(tmp_path / "toy", 24, 8, 128, seed=0)
    dataset = VocDataset(root, "trainval", TOY_CLASSES)
    assert len(dataset) == 32
    assert dataset.report.problems == []
    counts = [len(record.boxes) for record in dataset.records]
    assert min(counts) >= 1 and max(counts) <= 4
    assert len(set(counts)) > 1
    assert dataset.report.objects == sum(counts)
    assert all(dataset.report.per_class[name] > 0 for name in TOY_CLASSES)
    assert sum(dataset.report.per_class.values()) == dataset.report.objects
    assert not any(record.difficult.any() for record in dataset.records)


# Import weight


def test_parsing_does_not_import_tensorflow():
    script = (
        "import sys\n"
        "import fgl_retinanet.data\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_truncated_jpeg_is_named_and_left_out(tmp_path, voc_sample):
    # A genuine VOC JPEG cut to a third decodes without error (grey rows below the cut) and
    # PIL reads its header; only the missing end-of-image marker shows it. It must be counted
    # and named, not trained with its boxes over grey.
    import shutil

    from fgl_retinanet.data import DataError, read_image_bgr, truncated_jpeg

    root = tmp_path / "VOC2007"
    shutil.copytree(voc_sample, root)
    image_id = (root / "ImageSets" / "Main" / "trainval.txt").read_text().split()[0]
    path = root / "JPEGImages" / f"{image_id}.jpg"
    assert not truncated_jpeg(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    assert truncated_jpeg(path)
    with pytest.raises(DataError, match="truncated JPEG"):
        read_image_bgr(path)

    dataset = VocDataset(root, "trainval", VOC_CLASSES)
    assert image_id not in [record.image_id for record in dataset.records]
    assert dataset.report.unreadable_images == 1
    problems = dict(dataset.report.problems)
    assert "truncated JPEG" in problems[str(path)]


def test_bytes_after_the_end_marker_are_not_truncation(tmp_path, voc_sample):
    from fgl_retinanet.data import truncated_jpeg

    source = next((voc_sample / "JPEGImages").glob("*.jpg"))
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(source.read_bytes() + b"\x00" * 100)
    assert not truncated_jpeg(padded)
    other = tmp_path / "not_a_jpeg.jpg"
    other.write_text("not an image")
    assert not truncated_jpeg(other)  # left to the decoder, which reports it
