"""Tests for VOC AP (devkit rules) and the result tables in fgl_retinanet.evaluation."""

import contextlib
import io
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest

from fgl_retinanet import evaluation
from fgl_retinanet.evaluation import (
    average_precisions,
    average_precisions_all,
    coco_average_precision,
    comparison_table,
    csv_header,
    csv_line,
    per_class_table,
)
from shared_paths import SHARED_DIR

VECTOR_DIR = SHARED_DIR / "ap_vectors"
VECTOR_FILES = sorted(VECTOR_DIR.glob("*.json")) if VECTOR_DIR.is_dir() else []

# A lone None stands in when the vectors are absent, so the run reports a skip with a reason
# instead of an empty parameter set.
VECTOR_CASES = VECTOR_FILES or [None]

# Names used by the reference vectors for our two metrics.
REFERENCE_KEYS = {"area": "voc2010_area", "11point": "voc07_11point"}

# Where the vectors record keras-retinanet 1.0.0's report on all detections of a case.
KERAS_RETINANET_KEY = "keras_retinanet_1_0_0"


def gt_box(box, label="cat", difficult=False):
    return {"box": box, "label": label, "difficult": difficult}


def det_box(box, score, label="cat"):
    return {"box": box, "score": score, "label": label}


def single_class_ap(ground_truth, detections, metric="area", **kwargs):
    """AP of class "cat" alone."""
    return average_precisions(ground_truth, detections, ["cat"], metric, **kwargs)["per_class"][
        "cat"
    ]


# Reference vectors


@pytest.mark.parametrize("metric", ["area", "11point"])
@pytest.mark.parametrize("path", VECTOR_CASES, ids=lambda path: path.stem if path else "absent")
def test_reference_vectors(path, metric):
    if path is None:
        pytest.skip(f"no AP reference vectors at {VECTOR_DIR}; the shared/ checkout is absent")
    case = json.loads(path.read_text())
    ground_truth = {image["id"]: image["gt"] for image in case["images"]}
    detections = {image["id"]: image["detections"] for image in case["images"]}
    expected = case["expected"]["reference"][REFERENCE_KEYS[metric]]

    result = average_precisions(
        ground_truth, detections, case["classes"], metric, case["iou_threshold"]
    )

    assert set(result["per_class"]) == set(case["classes"])
    for name in case["classes"]:
        want = expected["per_class_ap"].get(name)
        if want is None:
            assert result["per_class"][name] is None, name
        else:
            assert result["per_class"][name] == pytest.approx(want, abs=1e-6), name
    if expected["mAP"] is None:
        assert result["mAP"] is None
    else:
        assert result["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert {name: counts["gt"] for name, counts in result["counts"].items()} == case[
        "expected"
    ]["reference"]["npos"]


def _load_case(path):
    case = json.loads(path.read_text())
    ground_truth = {image["id"]: image["gt"] for image in case["images"]}
    detections = {image["id"]: image["detections"] for image in case["images"]}
    return case, ground_truth, detections


@pytest.mark.parametrize("path", VECTOR_CASES, ids=lambda path: path.stem if path else "absent")
def test_keras_retinanet_convention_reproduces_recorded_reports(path):
    if path is None:
        pytest.skip(f"no AP reference vectors at {VECTOR_DIR}; the shared/ checkout is absent")
    case, ground_truth, detections = _load_case(path)
    expected = case["expected"][KERAS_RETINANET_KEY]["core_all_detections"]

    result = average_precisions(
        ground_truth, detections, case["classes"], iou_threshold=case["iou_threshold"],
        convention="keras-retinanet",
    )  # fmt: skip

    # keras-retinanet gives a class without annotations AP 0 and leaves it out of its mean;
    # we report None for it.
    for name in case["classes"]:
        if expected["num_annotations"][name] == 0:
            assert result["per_class"][name] is None, name
        else:
            want = expected["per_class_ap"][name]
            assert result["per_class"][name] == pytest.approx(want, abs=1e-12), name
    assert result["mAP"] == pytest.approx(expected["mAP"], abs=1e-12)
    assert {name: counts["gt"] for name, counts in result["counts"].items()} == {
        name: int(count) for name, count in expected["num_annotations"].items()
    }


def test_keras_retinanet_convention_without_difficult_objects_matches_recorded_report():
    # The vectors also record keras-retinanet on the same input with difficult objects
    # removed (what its skip_difficult option is meant to do); then their detections are FP.
    cases = [(path, *_load_case(path)) for path in VECTOR_FILES]
    recorded = [
        entry for entry in cases
        if "difficult_gt_removed" in entry[1]["expected"][KERAS_RETINANET_KEY]
    ]  # fmt: skip
    if not recorded:
        pytest.skip(f"no vector at {VECTOR_DIR} records keras-retinanet without difficult GT")
    for path, case, ground_truth, detections in recorded:
        expected = case["expected"][KERAS_RETINANET_KEY]["difficult_gt_removed"]
        easy_only = {
            image: [item for item in items if not item["difficult"]]
            for image, items in ground_truth.items()
        }

        result = average_precisions(
            easy_only, detections, case["classes"], convention="keras-retinanet"
        )

        for name, want in expected["per_class_ap"].items():
            assert result["per_class"][name] == pytest.approx(want, abs=1e-12), path.stem
        assert result["mAP"] == pytest.approx(expected["mAP"], abs=1e-12), path.stem


# Matching rules


def test_plus_one_convention_decides_match():
    # Sides with +1: GT 2x2, detection 2x3, overlap 2x2, IoU 4/6 > 0.5 (TP). Without +1 the
    # IoU would be 1/2, not above the threshold.
    ground_truth = {"img": [gt_box([0, 0, 1, 1])]}
    detections = {"img": [det_box([0, 0, 1, 2], 0.9)]}

    assert single_class_ap(ground_truth, detections) == 1.0


def test_plus_one_convention_applies_to_float_boxes():
    # Both boxes are 2.5 x 2.5 with +1 and overlap 2 x 2.5: IoU 5 / 7.5 = 2/3 (TP). Without
    # +1: 1 x 1.5 / (2.25 + 2.25 - 1.5) = 1/2, not a match.
    ground_truth = {"img": [gt_box([0.0, 0.0, 1.5, 1.5])]}
    detections = {"img": [det_box([0.5, 0.0, 2.0, 1.5], 0.9)]}

    assert single_class_ap(ground_truth, detections) == 1.0


def test_iou_threshold_is_strict():
    # With +1 the GT covers 10x10 pixels and the detection 10x5 inside it: IoU exactly 0.5.
    ground_truth = {"img": [gt_box([0, 0, 9, 9])]}
    detections = {"img": [det_box([0, 0, 9, 4], 0.9)]}

    assert single_class_ap(ground_truth, detections) == 0.0
    assert single_class_ap(ground_truth, detections, iou_threshold=0.49) == 1.0


def test_detections_on_difficult_objects_are_ignored():
    # The difficult object draws the top and the bottom detection (a duplicate); both leave
    # the ranking, so the one true positive alone gives AP 1. Counted as FP they would give 0.5.
    ground_truth = {"img": [gt_box([0, 0, 99, 99]), gt_box([200, 0, 299, 99], difficult=True)]}
    detections = {
        "img": [
            det_box([200, 0, 299, 99], 0.9),
            det_box([0, 0, 99, 99], 0.8),
            det_box([201, 1, 299, 99], 0.7),
        ]
    }

    result = average_precisions(ground_truth, detections, ["cat"])

    assert result["per_class"]["cat"] == 1.0
    assert result["counts"]["cat"] == {"gt": 1, "difficult": 1, "detections": 3}


def test_difficult_objects_do_not_count_as_positives():
    # One of two objects is difficult and never detected: recall still reaches 1.
    ground_truth = {"img": [gt_box([0, 0, 99, 99]), gt_box([200, 0, 299, 99], difficult=True)]}
    detections = {"img": [det_box([0, 0, 99, 99], 0.8)]}

    assert single_class_ap(ground_truth, detections) == 1.0


def test_duplicate_detection_is_false_positive():
    # Ranking TP, FP (duplicate), TP over 2 objects: recall 1/2, 1/2, 1; precision 1, 1/2,
    # 2/3; envelope 1, 2/3, 2/3; area 1/2 * 1 + 1/2 * 2/3 = 5/6.
    ground_truth = {"a": [gt_box([0, 0, 49, 49])], "b": [gt_box([0, 0, 49, 49])]}
    detections = {
        "a": [det_box([0, 0, 49, 49], 0.9), det_box([1, 1, 49, 49], 0.8)],
        "b": [det_box([0, 0, 49, 49], 0.7)],
    }

    assert single_class_ap(ground_truth, detections) == pytest.approx(5 / 6)


def test_no_fallback_to_second_best_object():
    # The second detection's best object is already taken; the other object (IoU 0.85) is
    # free but not tried, so the ranking is TP, FP over 2 objects: AP 1/2, not 1.
    ground_truth = {"img": [gt_box([0, 0, 100, 100]), gt_box([0, 0, 100, 120])]}
    detections = {"img": [det_box([0, 0, 100, 100], 0.95), det_box([0, 0, 100, 102], 0.5)]}

    assert single_class_ap(ground_truth, detections) == pytest.approx(0.5)


def test_iou_tie_goes_to_object_listed_first():
    # Two identical annotations, the first difficult: the detection's best match is the
    # first, so it is ignored and the class has no true positive (AP 0, not 1).
    ground_truth = {"img": [gt_box([0, 0, 49, 49], difficult=True), gt_box([0, 0, 49, 49])]}
    detections = {"img": [det_box([0, 0, 49, 49], 0.9)]}

    assert single_class_ap(ground_truth, detections) == 0.0


def test_equal_scores_keep_input_order():
    # Same score: the false positive listed first (image "b" comes first in the dict) ranks
    # first, giving precision 0 then 1/2 at recall 1, AP 1/2; the reverse order gives AP 1.
    ground_truth = {"a": [gt_box([0, 0, 49, 49])]}
    false_first = {"b": [det_box([0, 0, 49, 49], 0.5)], "a": [det_box([0, 0, 49, 49], 0.5)]}
    true_first = {"a": false_first["a"], "b": false_first["b"]}

    assert single_class_ap(ground_truth, false_first) == pytest.approx(0.5)
    assert single_class_ap(ground_truth, true_first) == 1.0


def test_detections_on_images_without_ground_truth_are_false_positives():
    ground_truth = {"a": [gt_box([0, 0, 49, 49])]}
    detections = {"a": [det_box([0, 0, 49, 49], 0.5)], "unknown": [det_box([0, 0, 9, 9], 0.9)]}

    assert single_class_ap(ground_truth, detections) == pytest.approx(0.5)


def test_other_class_objects_are_not_matched():
    ground_truth = {"img": [gt_box([0, 0, 49, 49], label="dog")], "b": [gt_box([0, 0, 9, 9])]}
    detections = {"img": [det_box([0, 0, 49, 49], 0.9, label="cat")]}

    result = average_precisions(ground_truth, detections, ["cat", "dog"])

    assert result["per_class"] == {"cat": 0.0, "dog": 0.0}


def test_labels_outside_classes_are_skipped():
    # The person entries come first, so reading a box from the wrong entry would put the cat
    # object or the cat detection on the person's box and break the match.
    person = [100, 100, 149, 149]
    ground_truth = {"img": [gt_box(person, "person"), gt_box([0, 0, 49, 49])]}
    detections = {"img": [det_box(person, 0.95, "person"), det_box([0, 0, 49, 49], 0.9)]}

    result = average_precisions(ground_truth, detections, ["cat"])

    assert result["per_class"] == {"cat": 1.0}
    assert result["counts"] == {"cat": {"gt": 1, "difficult": 0, "detections": 1}}


# Undefined and empty cases


def test_class_without_ground_truth_is_undefined_and_left_out_of_mean():
    ground_truth = {"img": [gt_box([0, 0, 49, 49]), gt_box([60, 60, 99, 99], "bird", True)]}
    detections = {
        "img": [det_box([0, 0, 49, 49], 0.9), det_box([0, 0, 49, 49], 0.8, label="dog")]
    }

    result = average_precisions(ground_truth, detections, ["cat", "dog", "bird"])

    assert result["per_class"] == {"cat": 1.0, "dog": None, "bird": None}
    assert result["mAP"] == 1.0
    assert result["undefined"] == ["dog", "bird"]


def test_class_without_detections_has_zero_ap():
    ground_truth = {"img": [gt_box([0, 0, 49, 49]), gt_box([0, 0, 49, 49], "dog")]}
    detections = {"img": [det_box([0, 0, 49, 49], 0.9)]}

    result = average_precisions(ground_truth, detections, ["cat", "dog"])

    assert result["per_class"] == {"cat": 1.0, "dog": 0.0}
    assert result["mAP"] == 0.5


@pytest.mark.parametrize("metric", ["area", "11point"])
@pytest.mark.parametrize(
    "ground_truth, detections, classes",
    [
        ({}, {}, ["cat"]),
        ({}, {}, []),
        ({"img": []}, {"img": []}, ["cat"]),
        ({}, {"img": [det_box([0, 0, 9, 9], 0.9)]}, ["cat"]),
    ],
    ids=["no-images", "no-classes", "empty-lists", "detections-only"],
)
def test_nothing_to_evaluate_gives_undefined_map(ground_truth, detections, classes, metric, caplog):
    with caplog.at_level(logging.WARNING, logger=evaluation.__name__):
        result = average_precisions(ground_truth, detections, classes, metric)

    assert result["mAP"] is None
    assert result["per_class"] == dict.fromkeys(classes)
    assert "mAP is undefined" in caplog.text


def test_unknown_metric_raises():
    with pytest.raises(ValueError, match="unknown AP metric"):
        average_precisions({}, {}, ["cat"], metric="voc2012")


# Metrics


def test_area_and_11point_on_hand_computed_ranking():
    # Ranking TP, FP, TP, FP, TP over 3 objects: recall 1/3, 1/3, 2/3, 2/3, 1; precision
    # 1, 1/2, 2/3, 1/2, 3/5; envelope 1, 2/3, 2/3, 3/5, 3/5.
    # Area: (1 + 2/3 + 3/5) / 3 = 34/45.
    # 11-point: thresholds 0..0.3 -> 1, 0.4..0.6 -> 2/3, 0.7..1 -> 3/5: (4 + 2 + 2.4) / 11.
    ground_truth = {f"img{i}": [gt_box([0, 0, 49, 49])] for i in range(3)}
    far = [100, 100, 149, 149]
    detections = {
        "img0": [det_box([0, 0, 49, 49], 0.9), det_box(far, 0.8)],
        "img1": [det_box([0, 0, 49, 49], 0.7), det_box(far, 0.6)],
        "img2": [det_box([0, 0, 49, 49], 0.5)],
    }

    assert single_class_ap(ground_truth, detections, "area") == pytest.approx(34 / 45)
    assert single_class_ap(ground_truth, detections, "11point") == pytest.approx(8.4 / 11)


def test_11point_thresholds_follow_python_devkit_ports():
    # Recall stops at exactly 3/10. The ports' float thresholds put "0.3" one ulp above it, so
    # only 0, 0.1 and 0.2 are reached: 3/11. Exact tenths would give 4/11.
    ground_truth = {f"img{i}": [gt_box([0, 0, 49, 49])] for i in range(10)}
    detections = {f"img{i}": [det_box([0, 0, 49, 49], 0.9)] for i in range(3)}

    assert single_class_ap(ground_truth, detections, "11point") == pytest.approx(3 / 11)


# Vectorised implementation against a direct transcription of the rules


def _rules_ap(ground_truth, detections, label, metric, threshold=0.5):
    """AP of one class, computed detection by detection straight from the written rules."""
    objects = {
        image: [item for item in items if item["label"] == label]
        for image, items in ground_truth.items()
    }
    positives = sum(not item["difficult"] for items in objects.values() for item in items)
    if positives == 0:
        return None
    ranked = [
        (item["score"], image, item["box"])
        for image, items in detections.items()
        for item in items
        if item["label"] == label
    ]
    ranked.sort(key=lambda entry: -entry[0])
    taken, flags = set(), []
    for _, image, box in ranked:
        overlaps = [_rules_iou(box, item["box"]) for item in objects.get(image, [])]
        if not overlaps or max(overlaps) <= threshold:
            flags.append(False)
            continue
        best = overlaps.index(max(overlaps))
        if objects[image][best]["difficult"]:
            continue
        flags.append((image, best) not in taken)
        taken.add((image, best))
    true_positives = 0
    points = []
    for rank, flag in enumerate(flags, start=1):
        true_positives += flag
        points.append((true_positives / positives, true_positives / rank))
    if metric == "11point":
        return sum(
            max([p for r, p in points if r >= t], default=0.0) for t in np.arange(11) * 0.1
        ) / 11
    area, previous_recall = 0.0, 0.0
    for index, (recall, _) in enumerate(points):
        area += (recall - previous_recall) * max(p for _, p in points[index:])
        previous_recall = recall
    return area


def _rules_iou(box, other):
    width = max(min(box[2], other[2]) - max(box[0], other[0]) + 1, 0)
    height = max(min(box[3], other[3]) - max(box[1], other[1]) + 1, 0)
    inter = width * height
    area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    other_area = (other[2] - other[0] + 1) * (other[3] - other[1] + 1)
    return inter / (area + other_area - inter)


def _random_case(seed, num_images=30, classes=("cat", "dog", "bird")):
    """Crowded random images with near-duplicate boxes, difficult objects and tied scores."""
    rng = random.Random(seed)

    def random_box():
        x, y = rng.randint(0, 60), rng.randint(0, 60)
        return [x, y, x + rng.randint(10, 40), y + rng.randint(10, 40)]

    def jitter(box):
        return [coordinate + rng.randint(-4, 4) for coordinate in box]

    ground_truth, detections = {}, {}
    for image in range(num_images):
        objects = [
            gt_box(random_box(), rng.choice(classes), rng.random() < 0.2)
            for _ in range(rng.randint(0, 5))
        ]
        found = [
            det_box(jitter(item["box"]), rng.choice([0.3, 0.5, rng.random()]), item["label"])
            for item in objects
            for _ in range(rng.randint(0, 2))
        ]
        found += [
            det_box(random_box(), rng.random(), rng.choice(classes))
            for _ in range(rng.randint(0, 3))
        ]
        rng.shuffle(found)
        if image % 7 != 3:
            ground_truth[f"img{image}"] = objects
        detections[f"img{image}"] = found
    return ground_truth, detections, list(classes)


@pytest.mark.parametrize("metric", ["area", "11point"])
@pytest.mark.parametrize("seed", range(5))
def test_matches_rule_by_rule_evaluation_on_random_cases(seed, metric):
    ground_truth, detections, classes = _random_case(seed)

    result = average_precisions(ground_truth, detections, classes, metric)

    for name in classes:
        expected = _rules_ap(ground_truth, detections, name, metric)
        if expected is None:
            assert result["per_class"][name] is None
        else:
            assert result["per_class"][name] == pytest.approx(expected, abs=1e-12), name


def test_chunked_overlap_search_gives_same_result(monkeypatch):
    ground_truth, detections, classes = _random_case(seed=11, num_images=60)
    whole = average_precisions(ground_truth, detections, classes)

    # A tiny chunk limit forces a boundary after nearly every detection.
    monkeypatch.setattr(evaluation, "_MAX_PAIRS_PER_CHUNK", 3)
    chunked = average_precisions(ground_truth, detections, classes)

    assert chunked["per_class"] == whole["per_class"]


# keras-retinanet convention


def keras_ap(ground_truth, detections, **kwargs):
    """AP of class "cat" alone under keras-retinanet 1.0.0's rules."""
    result = average_precisions(
        ground_truth, detections, ["cat"], convention="keras-retinanet", **kwargs
    )
    return result["per_class"]["cat"]


def test_keras_retinanet_convention_has_no_plus_one_and_inclusive_threshold():
    # Sides without +1: GT 10x10, detection 10x5 inside it, IoU exactly 0.5, a match since
    # keras-retinanet needs IoU >= 0.5. With +1 the IoU would be 66/121 and still match at
    # 0.51, so the second assertion fails if +1 sneaks in.
    ground_truth = {"img": [gt_box([0, 0, 10, 10])]}
    detections = {"img": [det_box([0, 0, 10, 5], 0.9)]}

    assert keras_ap(ground_truth, detections) == 1.0
    assert keras_ap(ground_truth, detections, iou_threshold=0.51) == 0.0


def test_keras_retinanet_convention_counts_difficult_objects_as_ordinary():
    # The difficult object is a positive: missing it halves recall; finding it is a TP.
    ground_truth = {"img": [gt_box([0, 0, 99, 99]), gt_box([200, 0, 299, 99], difficult=True)]}
    one = {"img": [det_box([0, 0, 99, 99], 0.8)]}
    both = {"img": [det_box([200, 0, 299, 99], 0.9), det_box([0, 0, 99, 99], 0.8)]}

    result = average_precisions(ground_truth, one, ["cat"], convention="keras-retinanet")

    assert result["per_class"]["cat"] == 0.5
    assert result["counts"]["cat"] == {"gt": 2, "difficult": 1, "detections": 1}
    assert keras_ap(ground_truth, both) == 1.0


def test_keras_retinanet_convention_gives_zero_area_boxes_zero_overlap():
    # keras-retinanet's overlap skips pairs without positive width and height; dividing
    # would give 0 / 0 for two identical points.
    ground_truth = {"img": [gt_box([5, 5, 5, 5])]}
    detections = {"img": [det_box([5, 5, 5, 5], 0.9)]}

    assert keras_ap(ground_truth, detections) == 0.0


def test_keras_retinanet_convention_class_without_objects_is_undefined():
    ground_truth = {"img": [gt_box([0, 0, 49, 49])]}
    detections = {"img": [det_box([0, 0, 49, 49], 0.9), det_box([0, 0, 9, 9], 0.8, "dog")]}

    result = average_precisions(
        ground_truth, detections, ["cat", "dog"], convention="keras-retinanet"
    )

    assert result["per_class"] == {"cat": 1.0, "dog": None}
    assert result["mAP"] == 1.0


def test_keras_retinanet_convention_has_no_11point_metric():
    with pytest.raises(ValueError, match="no 11-point"):
        average_precisions({}, {}, ["cat"], metric="11point", convention="keras-retinanet")


def test_unknown_convention_raises():
    with pytest.raises(ValueError, match="unknown AP convention"):
        average_precisions({}, {}, ["cat"], convention="coco")


def test_overlap_without_plus_one_equals_keras_retinanet_compute_overlap():
    from keras_retinanet.utils.compute_overlap import compute_overlap

    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 50, (2, 500, 2))
    boxes, others = (np.c_[corner, corner + rng.uniform(0, 30, (500, 2))] for corner in corners)
    # Shared edges and identical boxes are the borderline cases worth covering.
    others[:100] = boxes[:100]
    others[100:200, 0] = boxes[100:200, 2]

    expected = np.array([compute_overlap(box[None], other[None])[0, 0]
                         for box, other in zip(boxes, others)])  # fmt: skip

    np.testing.assert_array_equal(evaluation._iou_without_plus_one(boxes, others), expected)


class _StoredGenerator:
    """The parts of a keras-retinanet generator its evaluate() calls, over stored data."""

    def __init__(self, ground_truth, image_ids, classes):
        self.classes = classes
        self.annotations = []
        for image in image_ids:
            objects = ground_truth.get(image, [])
            # keras-retinanet's overlap code accepts float64 boxes only.
            boxes = np.array([item["box"] for item in objects], dtype=np.float64)
            labels = np.array([classes.index(item["label"]) for item in objects])
            self.annotations.append({"bboxes": boxes.reshape(-1, 4), "labels": labels})

    def size(self):
        return len(self.annotations)

    def num_classes(self):
        return len(self.classes)

    def has_label(self, label):
        return label < len(self.classes)

    def load_image(self, index):
        # The "image" carries its index to the model.
        return np.full((1, 1, 1), float(index))

    def resize_image(self, image):
        return image, 1.0

    def preprocess_image(self, image):
        return image

    def load_annotations(self, index):
        return self.annotations[index]


class _StoredModel:
    """Answers predict_on_batch with stored detections of the image whose index it is fed."""

    def __init__(self, detections, image_ids, classes):
        self.outputs = []
        for image in image_ids:
            found = detections.get(image, [])
            self.outputs.append((
                np.array([item["box"] for item in found], dtype=np.float64).reshape(1, -1, 4),
                np.array([[item["score"] for item in found]], dtype=np.float64).reshape(1, -1),
                np.array([[classes.index(item["label"]) for item in found]]).reshape(1, -1),
            ))  # fmt: skip

    def predict_on_batch(self, batch):
        boxes, scores, labels = self.outputs[int(batch[0, 0, 0, 0])]
        return boxes.copy(), scores, labels


@pytest.mark.parametrize("seed", range(3))
def test_keras_retinanet_convention_equals_keras_retinanet_evaluate(seed):
    from keras_retinanet.utils.eval import evaluate

    ground_truth, detections, classes = _random_case(seed, num_images=40)
    # keras-retinanet orders equal scores with an unstable sort and drops scores <= 0.05;
    # distinct scores above 0.05 keep both out of the comparison.
    scores = iter(np.linspace(0.95, 0.1, sum(map(len, detections.values()))))
    detections = {
        image: [dict(item, score=next(scores) - 1e-6 * item["score"]) for item in items]
        for image, items in detections.items()
    }
    image_ids = list(dict.fromkeys([*ground_truth, *detections]))

    reported, _ = evaluate(
        _StoredGenerator(ground_truth, image_ids, classes),
        _StoredModel(detections, image_ids, classes),
    )
    result = average_precisions(ground_truth, detections, classes, convention="keras-retinanet")

    for label, (ap, num_annotations) in reported.items():
        name = classes[label]
        assert result["counts"][name]["gt"] == num_annotations, name
        if num_annotations == 0:
            assert result["per_class"][name] is None, name
        else:
            assert result["per_class"][name] == pytest.approx(ap, abs=1e-12), name


# Several metrics from one pass; input checks


@pytest.mark.parametrize("seed", range(3))
def test_all_metrics_equal_separate_calls(seed):
    ground_truth, detections, classes = _random_case(seed)

    together = average_precisions_all(ground_truth, detections, classes)

    assert list(together) == ["area", "11point"]
    for metric in ("area", "11point"):
        assert together[metric] == average_precisions(ground_truth, detections, classes, metric)


def test_all_metrics_rejects_unknown_metric():
    with pytest.raises(ValueError, match="unknown AP metric"):
        average_precisions_all({}, {}, ["cat"], metrics=("area", "coco"))


def test_group_lookup_by_search_gives_same_result(monkeypatch):
    ground_truth, detections, classes = _random_case(seed=12, num_images=60)
    by_table = average_precisions(ground_truth, detections, classes)

    # Without room for a dense table the binary search over sorted groups takes over.
    monkeypatch.setattr(evaluation, "_MAX_GROUP_TABLE", 0)
    by_search = average_precisions(ground_truth, detections, classes)

    assert by_search["per_class"] == by_table["per_class"]


def test_boxes_as_arrays_or_tuples_give_same_result():
    ground_truth, detections, classes = _random_case(seed=13)
    as_arrays = {
        image: [dict(item, box=np.array(item["box"], dtype=np.float32)) for item in items]
        for image, items in detections.items()
    }
    as_tuples = {
        image: [dict(item, box=tuple(item["box"])) for item in items]
        for image, items in ground_truth.items()
    }

    expected = average_precisions(ground_truth, detections, classes)["per_class"]

    assert average_precisions(as_tuples, as_arrays, classes)["per_class"] == expected


@pytest.mark.parametrize("malformed", ["object", "detection"])
def test_box_with_wrong_number_of_coordinates_raises(malformed):
    short, full = [0, 0, 9], [0, 0, 9, 9]
    ground_truth = {"img": [gt_box(short if malformed == "object" else full)]}
    detections = {"img": [det_box(short if malformed == "detection" else full, 0.9)]}

    with pytest.raises(ValueError, match="4 coordinates"):
        average_precisions(ground_truth, detections, ["cat"])


# COCO AP through pycocotools


def _coco_means(result):
    # pycocotools divides by tp + fp + machine epsilon, so a perfect score reads 1 - 2e-16.
    return [result["AP"], result["AP50"], result["AP75"]]


def test_coco_perfect_detections_give_one():
    ground_truth = {"a": [gt_box([0, 0, 49, 49]), gt_box([60, 0, 99, 29], "dog")]}
    detections = {"a": [det_box([0, 0, 49, 49], 0.9), det_box([60, 0, 99, 29], 0.8, "dog")]}

    result = coco_average_precision(ground_truth, detections, ["cat", "dog"])

    assert _coco_means(result) == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)
    assert result["per_class"] == pytest.approx({"cat": 1.0, "dog": 1.0}, abs=1e-12)


def test_coco_single_match_counts_the_thresholds_it_passes():
    # With inclusive sides the GT covers 100x100 pixels and the detection 100x64 inside it:
    # IoU 0.64 passes the thresholds 0.5, 0.55 and 0.6 of ten, with precision 1 at every
    # recall, and fails the rest with precision 0: AP 3/10, AP50 1, AP75 0.
    ground_truth = {"a": [gt_box([0, 0, 99, 99])]}
    detections = {"a": [det_box([0, 0, 99, 63], 0.9)]}

    result = coco_average_precision(ground_truth, detections, ["cat"])

    assert _coco_means(result) == pytest.approx([0.3, 1.0, 0.0], abs=1e-12)


def test_coco_boxes_use_inclusive_pixel_sides():
    # Sides with +1: GT 2x2, detection 2x3, IoU 4/6, which passes 0.5 to 0.65: AP 4/10.
    # Without +1 the IoU would be 1/2 and AP 1/10.
    ground_truth = {"a": [gt_box([0, 0, 1, 1])]}
    detections = {"a": [det_box([0, 0, 1, 2], 0.9)]}

    result = coco_average_precision(ground_truth, detections, ["cat"])

    assert result["AP"] == pytest.approx(0.4, abs=1e-12)


def test_coco_interpolates_precision_at_101_recall_points():
    # Ranking TP, FP, TP over 2 objects at IoU 1: envelope 1 up to recall 1/2, then 2/3. The
    # 101 points 0, 0.01, ..., 1 take 1 at the 51 points up to 0.5 and 2/3 at the other 50,
    # at every IoU threshold. VOC's area metric would give 5/6.
    ground_truth = {"a": [gt_box([0, 0, 49, 49])], "b": [gt_box([0, 0, 49, 49])]}
    detections = {
        "a": [det_box([0, 0, 49, 49], 0.9), det_box([100, 100, 149, 149], 0.8)],
        "b": [det_box([0, 0, 49, 49], 0.7)],
    }

    result = coco_average_precision(ground_truth, detections, ["cat"])

    expected = (51 + 50 * 2 / 3) / 101
    assert result["AP"] == pytest.approx(expected, abs=1e-12)
    assert result["AP50"] == pytest.approx(expected, abs=1e-12)
    assert single_class_ap(ground_truth, detections) == pytest.approx(5 / 6)


def test_coco_without_detections_gives_zero():
    ground_truth = {"a": [gt_box([0, 0, 49, 49])], "b": [gt_box([0, 0, 9, 9], "dog")]}

    result = coco_average_precision(ground_truth, {}, ["cat", "dog"])

    assert result == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "per_class": {"cat": 0.0, "dog": 0.0}}


def test_coco_class_without_objects_is_undefined_and_left_out_of_means():
    # The dog detection would be a false positive if dog were evaluated.
    ground_truth = {"a": [gt_box([0, 0, 49, 49]), gt_box([60, 60, 99, 99], "bird", True)]}
    detections = {"a": [det_box([0, 0, 49, 49], 0.9), det_box([60, 60, 99, 99], 0.95, "dog")]}

    result = coco_average_precision(ground_truth, detections, ["cat", "dog", "bird"])

    assert result["per_class"] == {"cat": pytest.approx(1.0, abs=1e-12), "dog": None, "bird": None}
    assert _coco_means(result) == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)


def test_coco_without_any_objects_is_undefined():
    result = coco_average_precision({}, {"a": [det_box([0, 0, 9, 9], 0.9)]}, ["cat"])

    assert result == {"AP": None, "AP50": None, "AP75": None, "per_class": {"cat": None}}


def test_coco_detections_on_images_without_objects_are_false_positives():
    # Ranking FP (image b), TP: precision 1/2 at every recall point, so AP 1/2, not 1.
    ground_truth = {"a": [gt_box([0, 0, 49, 49])]}
    detections = {"a": [det_box([0, 0, 49, 49], 0.5)], "b": [det_box([0, 0, 49, 49], 0.9)]}

    result = coco_average_precision(ground_truth, detections, ["cat"])

    assert result["AP"] == pytest.approx(0.5, abs=1e-12)


def test_coco_detections_on_difficult_objects_are_ignored():
    # The top detection and a duplicate sit on a difficult object and are neither TP nor FP;
    # the other difficult object is never found and not missed. As ordinary objects the two
    # would cap recall at 2/3; dropped, the top detection would be a FP (AP about 1/2).
    ground_truth = {
        "a": [
            gt_box([0, 0, 99, 99]),
            gt_box([200, 0, 299, 99], difficult=True),
            gt_box([400, 0, 499, 99], difficult=True),
        ]
    }
    detections = {
        "a": [
            det_box([200, 0, 299, 99], 0.9),
            det_box([0, 0, 99, 99], 0.8),
            det_box([201, 1, 299, 99], 0.7),
        ]
    }

    result = coco_average_precision(ground_truth, detections, ["cat"])

    assert _coco_means(result) == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)


def test_coco_difficult_region_absorbs_detections_inside_it():
    # COCO measures overlap with a crowd region as the share of the detection inside it, so a
    # small detection within the difficult object is ignored; VOC's IoU (0.09) makes it a
    # false positive ranked first, AP 1/2.
    ground_truth = {"a": [gt_box([0, 0, 99, 99]), gt_box([200, 0, 299, 99], difficult=True)]}
    detections = {"a": [det_box([220, 20, 249, 49], 0.9), det_box([0, 0, 99, 99], 0.8)]}

    coco_ap = coco_average_precision(ground_truth, detections, ["cat"])["AP"]

    assert coco_ap == pytest.approx(1.0, abs=1e-12)
    assert single_class_ap(ground_truth, detections) == 0.5


def test_coco_skips_labels_outside_classes():
    # Labels outside the classes have no COCO category; they must be left out, not fail.
    person = [100, 100, 149, 149]
    ground_truth = {"a": [gt_box(person, "person"), gt_box([0, 0, 49, 49])]}
    detections = {"a": [det_box([0, 0, 49, 49], 0.9), det_box([300, 0, 349, 49], 0.95, "person")]}

    result = coco_average_precision(ground_truth, detections, ["cat"])

    assert list(result["per_class"]) == ["cat"]
    assert _coco_means(result) == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)


def test_coco_prints_nothing(capsys):
    ground_truth = {"a": [gt_box([0, 0, 49, 49])]}

    coco_average_precision(ground_truth, {"a": [det_box([0, 0, 49, 49], 0.9)]}, ["cat"])

    assert capsys.readouterr().out == ""


def test_coco_means_equal_pycocotools_summary():
    # Reading the precision table must give what pycocotools' own summary prints.
    ground_truth, detections, classes = _random_case(seed=14, num_images=40)

    result = coco_average_precision(ground_truth, detections, classes)
    evaluator = evaluation._coco_evaluator(ground_truth, detections, classes)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()

    assert 0.0 < result["AP"] < result["AP50"] < 1.0
    assert _coco_means(result) == pytest.approx(
        evaluator.stats[:3], abs=1e-12
    )


# Tables


def _results(per_class, mean_ap, counts=None):
    return {"per_class": per_class, "mAP": mean_ap, "counts": counts or {}}


def test_per_class_table_lists_counts_metrics_mean_and_undefined():
    counts = {
        "cat": {"gt": 3, "difficult": 1, "detections": 10},
        "dog": {"gt": 0, "difficult": 2, "detections": 4},
    }
    by_metric = {
        "area": _results({"cat": 0.75, "dog": None}, 0.75, counts),
        "11point": _results({"cat": 0.7727, "dog": None}, 0.7727, counts),
    }

    lines = per_class_table(by_metric).splitlines()

    assert lines[0] == "| class | GT | difficult | detections | AP (area) | AP (11pt) |"
    assert lines[2] == "| cat | 3 | 1 | 10 | 0.750 | 0.773 |"
    assert lines[3] == "| dog | 0 | 2 | 4 | n/a | n/a |"
    assert lines[4] == "| mAP | 3 | 3 | 14 | 0.750 | 0.773 |"
    assert lines[5].endswith(": dog")


def test_per_class_table_without_undefined_classes_has_no_note():
    table = per_class_table({"area": _results({"cat": 1.0}, 1.0)})

    assert table.splitlines()[-1] == "| mAP |  |  |  | 1.000 |"


def test_comparison_table_with_two_runs_has_difference_column():
    runs = {
        "fl": _results({"cat": 0.5, "dog": None}, 0.5),
        "fgl": _results({"cat": 0.625, "dog": 0.25}, 0.4375),
    }

    lines = comparison_table(runs).splitlines()

    assert lines[0] == "| class | fl | fgl | difference (fgl - fl) |"
    assert lines[2] == "| cat | 0.500 | 0.625 | +0.125 |"
    assert lines[3] == "| dog | n/a | 0.250 | n/a |"
    assert lines[4] == "| mAP | 0.500 | 0.438 | -0.062 |"


def test_comparison_table_with_three_runs_has_no_difference_column():
    runs = {name: _results({"cat": 0.5}, 0.5) for name in ("a", "b", "c")}

    lines = comparison_table(runs).splitlines()

    assert lines[0] == "| class | a | b | c |"
    assert lines[-1] == "| mAP | 0.500 | 0.500 | 0.500 |"


def test_csv_line_matches_header():
    by_metric = {"area": _results({}, 0.61111), "11point": _results({}, None)}

    assert csv_header() == "name,mAP_area,mAP_11pt"
    assert csv_line("voc07 fgl", by_metric) == "voc07 fgl,0.611,"
    assert csv_line("a,b", {"area": _results({}, 1.0)}) == '"a,b",1.000,'
