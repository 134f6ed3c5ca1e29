"""Tests for VOC AP (devkit rules) and the result tables in fgl_retinanet.evaluation."""

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest

from fgl_retinanet import evaluation
from fgl_retinanet.evaluation import (
    average_precisions,
    comparison_table,
    csv_header,
    csv_line,
    per_class_table,
)

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
VECTOR_DIR = SHARED_DIR / "ap_vectors"
VECTOR_FILES = sorted(VECTOR_DIR.glob("*.json")) if VECTOR_DIR.is_dir() else []

# A lone None stands in when the vectors are absent, so the run reports a skip with a reason
# instead of an empty parameter set.
VECTOR_CASES = VECTOR_FILES or [None]

# Names used by the reference vectors for our two metrics.
REFERENCE_KEYS = {"area": "voc2010_area", "11point": "voc07_11point"}


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
