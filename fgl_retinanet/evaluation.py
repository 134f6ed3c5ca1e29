"""PASCAL VOC average precision (devkit rules, keras-retinanet's rules), COCO AP, and tables."""

import contextlib
import csv
import io
import json
import logging
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from itertools import chain, repeat
from operator import itemgetter, methodcaller
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRICS = ("area", "11point")
METRIC_LABELS = {"area": "AP (area)", "11point": "AP (11pt)", "coco": "AP [.5:.95] (COCO)"}

# Matching rules: the VOC devkit's, or keras-retinanet 1.0.0's (utils/eval.py evaluate()).
CONVENTIONS = ("voc", "keras-retinanet")

# NOTE: the Python devkit ports compute the VOC07 thresholds with a float step of 0.1, so three
# of them sit one ulp above 0.3, 0.6 and 0.7. We keep them so results match those ports;
# a recall of exactly 3/10 therefore does not reach the "0.3" threshold.
VOC07_RECALL_THRESHOLDS = np.arange(11) * 0.1

# Detection/ground-truth pairs handled per chunk while searching best overlaps; bounds the
# temporary arrays to a few hundred MB on crowded images.
_MAX_PAIRS_PER_CHUNK = 4_000_000

# Largest number of (image, class) groups looked up through a dense table (two int64 arrays,
# 16 bytes per group); more groups, as with thousands of classes, use a binary search.
_MAX_GROUP_TABLE = 10_000_000

# COCO's IoU thresholds at which AP50 and AP75 are read from its precision table.
_COCO_SINGLE_THRESHOLDS = {"AP50": 0.5, "AP75": 0.75}

logger = logging.getLogger(__name__)


def average_precisions(
    ground_truth: Mapping[Hashable, Sequence[Mapping]],
    detections: Mapping[Hashable, Sequence[Mapping]],
    classes: Sequence[str],
    metric: str = "area",
    iou_threshold: float = 0.5,
    convention: str = "voc",
) -> dict:
    """Computes per-class VOC average precision and their mean.

    With ``convention="voc"`` matching follows the devkit: box sides are ``x2 - x1 + 1`` (also
    for float boxes); each detection, in descending score order, is compared only with its
    best-IoU ground truth of the same image and class; it is a true positive when that IoU is
    strictly above ``iou_threshold`` and the object is not yet taken, ignored when the object
    is difficult, and a false positive otherwise. Equal scores keep input order (images in
    ``detections`` order, then list order). Labels not in ``classes`` are skipped.

    ``convention="keras-retinanet"`` reproduces keras-retinanet 1.0.0's ``evaluate()`` so that
    numbers can be compared with it: sides are ``x2 - x1``, a match needs IoU ``>=
    iou_threshold``, difficult objects are ordinary ground truth (counted in recall and
    matchable), and only the area metric exists. A class without any object has AP None
    here and 0 in keras-retinanet, which leaves it out of its mean too, so the mAPs agree. Two
    differences remain: keras-retinanet ranks equal scores with an unstable sort, and its
    ``evaluate()`` first drops scores <= 0.05 and keeps the 100 best per image; pass
    detections filtered the same way to reproduce that step.

    Args:
        ground_truth: image id -> objects ``{"box": [x1, y1, x2, y2], "label": str,
            "difficult": bool}``; ``difficult`` defaults to False.
        detections: image id -> ``{"box": [x1, y1, x2, y2], "score": float, "label": str}``.
            Detections on images missing from ``ground_truth`` are false positives.
        classes: class names to evaluate, in the order used for results and tables.
        metric: ``"area"`` (VOC2010+, area under the monotone precision envelope) or
            ``"11point"`` (VOC2007, mean of the best precision at recall >= 0, 0.1, ..., 1).
        iou_threshold: a match needs IoU strictly greater than this (``>=`` under the
            keras-retinanet convention).
        convention: ``"voc"`` or ``"keras-retinanet"``.

    Returns:
        A dict with ``"per_class"`` (class -> AP, None when the class has no ground truth that
        counts as positive), ``"mAP"`` (mean over defined APs, None when there are none),
        ``"undefined"`` (classes whose AP is None), ``"counts"`` (class -> ``{"gt",
        "difficult", "detections"}``, where ``gt`` is the number of positives recall is
        measured against), ``"metric"``, ``"iou_threshold"`` and ``"convention"``.

    Raises:
        ValueError: if ``metric`` or ``convention`` is unknown, the pair is not supported
            (11-point under keras-retinanet), or a box read does not hold 4 coordinates (the
            boxes of detections without an object of their class in their image are not
            read: they cannot match).

    Example:
        >>> gt = {"a": [{"box": [0, 0, 9, 9], "label": "cat", "difficult": False}]}
        >>> average_precisions(gt, {"a": [{"box": [0, 0, 9, 9], "score": 0.9,
        ...     "label": "cat"}]}, ["cat"])["mAP"]
        1.0
    """
    return average_precisions_all(
        ground_truth, detections, classes, (metric,), iou_threshold, convention
    )[metric]


def average_precisions_all(
    ground_truth: Mapping[Hashable, Sequence[Mapping]],
    detections: Mapping[Hashable, Sequence[Mapping]],
    classes: Sequence[str],
    metrics: Sequence[str] = METRICS,
    iou_threshold: float = 0.5,
    convention: str = "voc",
) -> dict[str, dict]:
    """Computes `average_precisions` for several metrics from one matching pass.

    Matching does not depend on the metric, so reading the inputs and matching detections, the
    expensive part, is done once; on 500k detections this takes about as long as one call of
    `average_precisions`.

    Args:
        ground_truth: as in `average_precisions`.
        detections: as in `average_precisions`.
        classes: as in `average_precisions`.
        metrics: metric names, each ``"area"`` or ``"11point"``.
        iou_threshold: as in `average_precisions`.
        convention: as in `average_precisions`.

    Returns:
        Metric name -> the dict `average_precisions` returns for that metric.

    Raises:
        ValueError: as in `average_precisions`.
    """
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"unknown AP metric {metric!r}; expected one of {METRICS}")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown AP convention {convention!r}; expected one of {CONVENTIONS}")
    if convention == "keras-retinanet" and "11point" in metrics:
        raise ValueError("keras-retinanet 1.0.0 has no 11-point AP; use metric='area'")

    rankings, counts = _rank_detections(
        ground_truth, detections, classes, iou_threshold, convention
    )

    # The precision envelope does not depend on the metric either.
    curves = {
        name: None if ranking is None else _precision_envelope(*ranking)
        for name, ranking in rankings.items()
    }

    # The mean covers defined APs only; a class without objects says nothing about a model.
    results = {}
    for metric in metrics:
        per_class = {
            name: None if curve is None else _average_precision(*curve, metric)
            for name, curve in curves.items()
        }
        defined = [ap for ap in per_class.values() if ap is not None]
        results[metric] = {
            "per_class": per_class,
            "mAP": float(np.mean(defined)) if defined else None,
            "undefined": [name for name, ap in per_class.items() if ap is None],
            "counts": {name: dict(class_counts) for name, class_counts in counts.items()},
            "metric": metric,
            "iou_threshold": iou_threshold,
            "convention": convention,
        }
    if all(ranking is None for ranking in rankings.values()):
        logger.warning(
            "mAP is undefined: no class among %d has ground truth counted as positive",
            len(classes),
        )
    return results


def coco_average_precision(
    ground_truth: Mapping[Hashable, Sequence[Mapping]],
    detections: Mapping[Hashable, Sequence[Mapping]],
    classes: Sequence[str],
) -> dict:
    """Computes COCO-style AP averaged over IoU 0.5:0.05:0.95 with pycocotools.

    Takes the inputs of `average_precisions`. pycocotools does the matching (IoU >= each
    threshold) and the 101-point interpolation; this function only converts the inputs and
    reads its precision table (all object sizes, at most 100 detections per image and class,
    the highest scored).

    Boxes are converted to COCO's ``[x, y, width, height]`` with ``width = x2 - x1 + 1`` and
    ``height = y2 - y1 + 1``: our boxes follow the devkit's inclusive pixel convention, and
    with these sides pycocotools' IoU equals the devkit's, so a box pair overlaps the same
    here as in `average_precisions`.

    Difficult objects become COCO crowd regions (``iscrowd=1``), the only ignore flag
    pycocotools reads. Like a difficult object in VOC, a crowd region is neither found nor
    missed, and detections it absorbs are neither true nor false positives. Two COCO rules
    differ from VOC: a detection's overlap with a crowd region is the share of the detection
    inside it (intersection over the detection's area), and a detection goes to a crowd region
    only when no free ordinary object overlaps it enough.

    Args:
        ground_truth: image id -> objects ``{"box": [x1, y1, x2, y2], "label": str,
            "difficult": bool}``; ``difficult`` defaults to False.
        detections: image id -> ``{"box": [x1, y1, x2, y2], "score": float, "label": str}``.
            Detections on images missing from ``ground_truth`` are false positives.
        classes: class names to evaluate; other labels are skipped.

    Returns:
        ``{"AP": AP@[.5:.95], "AP50": AP@.5, "AP75": AP@.75, "per_class": class -> AP@[.5:.95]}``.
        A class without non-difficult objects has AP None and is left out of the means, which
        are None when no class is defined. pycocotools adds machine epsilon to the
        precision's denominator, so a perfect AP reads 1 - 2e-16.

    Example:
        >>> gt = {"a": [{"box": [0, 0, 9, 9], "label": "cat", "difficult": False}]}
        >>> result = coco_average_precision(gt, {"a": [{"box": [0, 0, 8, 8], "score": 0.9,
        ...     "label": "cat"}]}, ["cat"])
        >>> [round(result[key], 3) for key in ("AP", "AP50", "AP75")]
        [0.7, 1.0, 1.0]
    """
    evaluator = _coco_evaluator(ground_truth, detections, classes)

    # precision: (IoU thresholds, recall thresholds, classes, area ranges, max detections),
    # -1 where a class has no ground truth. Area range 0 is "all", the last maxDets is 100.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    thresholds = evaluator.params.iouThrs

    def mean_defined(table: np.ndarray) -> float | None:
        # Defined classes have every entry >= 0, so this mean is also the mean of class APs.
        defined = table[table > -1]
        return float(np.mean(defined)) if defined.size else None

    result = {"AP": mean_defined(precision)}
    for key, threshold in _COCO_SINGLE_THRESHOLDS.items():
        at_threshold = np.flatnonzero(np.isclose(thresholds, threshold))
        result[key] = mean_defined(precision[at_threshold])
    result["per_class"] = {
        name: mean_defined(precision[:, :, index]) for index, name in enumerate(classes)
    }
    return result


def write_evaluation(out, dataset, detections: Mapping, config, name: str) -> dict:
    """Scores one set of detections every way and writes the evaluation directory.

    Files: ``detections.json`` (re-scorable with ``fgl-evaluate --detections``),
    ``results.json``, ``per_class.csv``, ``results.md``.

    Args:
        out: output directory (created).
        dataset: the parsed split (`fgl_retinanet.data.VocDataset`) the detections belong to.
        detections: image id -> detections, as `average_precisions` takes them.
        config: the run's Config (classes and IoU threshold are read).
        name: label of the evaluated run in the table and the CSV line.

    Returns:
        ``{"results": ..., "table": markdown, "csv_header": ..., "csv_line": ...}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(dataset.classes)
    ground_truth = dataset.ground_truth()

    # Detections on images outside the split cannot be scored against it: refuse, loudly.
    foreign = sorted(set(detections) - set(ground_truth))
    if foreign:
        raise ValueError(
            f"{len(foreign)} detection images are not in split {dataset.split} "
            f"(e.g. {foreign[:3]}): detections and split do not belong together"
        )

    # VOC metrics from one matching pass, COCO AP from the same detections.
    by_metric = average_precisions_all(
        ground_truth, detections, classes, METRICS, config.eval.iou_threshold
    )
    coco = coco_average_precision(ground_truth, detections, classes)
    columns = dict(by_metric, coco={"per_class": coco["per_class"], "mAP": coco["AP"]})
    counts = by_metric["area"]["counts"]

    results = {
        "name": name,
        "split": dataset.split,
        "images": len(dataset),
        "detections": sum(len(found) for found in detections.values()),
        "mAP": by_metric["area"]["mAP"],
        "mAP_11point": by_metric["11point"]["mAP"],
        "coco_AP": coco["AP"],
        "coco_AP50": coco["AP50"],
        "coco_AP75": coco["AP75"],
        "per_class": by_metric["area"]["per_class"],
        "per_class_11point": by_metric["11point"]["per_class"],
        "per_class_coco": coco["per_class"],
        "counts": counts,
        "undefined": by_metric["area"]["undefined"],
        "eval": {
            "iou_threshold": config.eval.iou_threshold,
            "score_threshold": config.eval.score_threshold,
            "max_detections": config.eval.max_detections,
        },
    }
    table = per_class_table(columns)
    header = f"{csv_header()},coco_AP"
    line = csv_line(name, by_metric) + ("," if coco["AP"] is None else f",{coco['AP']:.3f}")

    # Machines get JSON and CSV, people the Markdown table, both from the same numbers.
    with open(out / "detections.json", "w") as f:
        json.dump({"split": dataset.split, "classes": classes, "detections": detections}, f)
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    with open(out / "per_class.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "gt", "difficult", "detections", "ap_area", "ap_11point",
                         "ap_coco"])  # fmt: skip
        for cls in classes:
            aps = [by_metric["area"]["per_class"][cls], by_metric["11point"]["per_class"][cls],
                   coco["per_class"][cls]]  # fmt: skip
            writer.writerow(
                [cls, counts[cls]["gt"], counts[cls]["difficult"], counts[cls]["detections"]]
                + ["" if ap is None else f"{ap:.6f}" for ap in aps]
            )
    (out / "results.md").write_text(
        f"# {name}: {dataset.split}\n\n{table}\n\n```\n{header}\n{line}\n```\n"
    )
    return {"results": results, "table": table, "csv_header": header, "csv_line": line}


def per_class_table(
    results_by_metric: Mapping[str, Mapping], counts: Mapping[str, Mapping] | None = None
) -> str:
    """Renders per-class AP for one or more metrics as a Markdown table.

    Args:
        results_by_metric: metric name (e.g. ``"area"``) -> result of `average_precisions`.
        counts: class -> ``{"gt", "difficult", "detections"}``; defaults to the ``"counts"``
            of the first result, and empty cells when neither is given.

    Returns:
        The table, a final ``mAP`` row with count totals, and, when some classes have no
        non-difficult ground truth, a line naming them.
    """
    results = list(results_by_metric.values())
    if counts is None:
        counts = results[0].get("counts", {}) if results else {}
    classes = _ordered_classes(results)
    header = ["class", "GT", "difficult", "detections"]
    header += [METRIC_LABELS.get(metric, f"AP ({metric})") for metric in results_by_metric]

    # One row per class, then the count totals and the means.
    count_keys = ("gt", "difficult", "detections")
    rows = []
    for name in classes:
        class_counts = counts.get(name, {})
        row = [name] + [str(class_counts.get(key, "")) for key in count_keys]
        rows.append(row + [_fmt(result["per_class"].get(name)) for result in results])
    totals = [
        str(sum(class_counts.get(key, 0) for class_counts in counts.values())) if counts else ""
        for key in count_keys
    ]
    rows.append(["mAP"] + totals + [_fmt(result["mAP"]) for result in results])
    table = _markdown(header, rows)

    # Name the classes left out of the mean so a reader does not mistake n/a for zero.
    undefined = [
        name
        for name in classes
        if any(result["per_class"].get(name, 0.0) is None for result in results)
    ]
    if undefined:
        table += (
            "\nUndefined AP (no non-difficult ground truth, left out of mAP): "
            + ", ".join(undefined)
        )
    return table


def comparison_table(runs: Mapping[str, Mapping]) -> str:
    """Renders a Markdown table comparing the per-class AP and mAP of several runs.

    Args:
        runs: run name -> results dict with ``"per_class"`` and ``"mAP"`` (one metric).

    Returns:
        Rows for every class seen in any run plus ``mAP``, one column per run, and a signed
        difference column (second run minus first) when exactly two runs are given.
    """
    names = list(runs)
    results = list(runs.values())
    header = ["class"] + names
    paired = len(names) == 2
    if paired:
        header.append(f"difference ({names[1]} - {names[0]})")

    # Class rows first, the mean last; a missing class reads as n/a in that run.
    keyed_rows = [
        (name, [result["per_class"].get(name) for result in results])
        for name in _ordered_classes(results)
    ]
    keyed_rows.append(("mAP", [result.get("mAP") for result in results]))
    rows = []
    for label, values in keyed_rows:
        row = [label] + [_fmt(value) for value in values]
        if paired:
            first, second = values
            both = first is not None and second is not None
            row.append(f"{second - first:+.3f}" if both else "n/a")
        rows.append(row)
    return _markdown(header, rows)


def csv_header() -> str:
    """Returns the header matching `csv_line`: ``name,mAP_area,mAP_11pt``."""
    return "name,mAP_area,mAP_11pt"


def csv_line(name: str, results: Mapping[str, Mapping]) -> str:
    """Formats one run's mean APs as a CSV line to paste below `csv_header`.

    Args:
        name: run name; quoted if it contains a comma.
        results: metric name (``"area"``, ``"11point"``) -> result of `average_precisions`.
            A missing metric or undefined mAP gives an empty field, which CSV readers load as
            a missing value.

    Returns:
        ``name,mAP_area,mAP_11pt`` values, 3 decimals, no trailing newline.
    """
    means = [results[metric]["mAP"] if metric in results else None for metric in METRICS]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="")
    writer.writerow([name] + ["" if mean is None else f"{mean:.3f}" for mean in means])
    return buffer.getvalue()


def _rank_detections(
    ground_truth: Mapping[Hashable, Sequence[Mapping]],
    detections: Mapping[Hashable, Sequence[Mapping]],
    classes: Sequence[str],
    iou_threshold: float,
    convention: str,
) -> tuple[dict, dict]:
    """Matches detections to objects and ranks them per class; the metric-free part of AP.

    Returns:
        ``rankings``: class -> ``(is_tp, num_positives)`` with ``is_tp`` (D,) bool in
        descending score order (detections on difficult objects removed under the VOC rules),
        or None when the class has no positives; and ``counts``: class -> ``{"gt",
        "difficult", "detections"}``.
    """
    keras_rules = convention == "keras-retinanet"

    # Integer ids for images and classes let every later step work on flat arrays.
    class_index = {name: index for index, name in enumerate(classes)}
    image_index = {image_id: index for index, image_id in enumerate(ground_truth)}
    for image_id in detections:
        image_index.setdefault(image_id, len(image_index))
    gt, gt_items = _flatten(ground_truth, image_index, class_index, is_detection=False)
    gt["box"] = _read_boxes(gt_items, gt["position"])
    det, det_items = _flatten(detections, image_index, class_index, is_detection=True)

    # Best ground truth of each detection, searched in its own image and class only.
    overlap = _iou_without_plus_one if keras_rules else _iou_plus_one
    best_gt, best_iou = _best_overlaps(gt, det, det_items, len(classes), overlap)
    hit = best_iou >= iou_threshold if keras_rules else best_iou > iou_threshold

    # keras-retinanet has no notion of difficult: such objects count like any other.
    num_classes = len(classes)
    difficult_count = np.bincount(gt["class"][gt["difficult"]], minlength=num_classes)
    positive = np.ones_like(gt["difficult"]) if keras_rules else ~gt["difficult"]
    positive_count = np.bincount(gt["class"][positive], minlength=num_classes)
    detection_count = np.bincount(det["class"], minlength=num_classes)

    # Group detections by class, then rank each class by descending score. Both sorts are
    # stable, so equal scores keep input order as in the devkit ports. 16-bit class ids let
    # numpy group with a linear-time radix sort, and sorting scores class by class is a
    # quarter faster than one sort of all of them.
    class_dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int64
    by_class = np.argsort(det["class"].astype(class_dtype), kind="stable")
    bounds = np.r_[0, np.cumsum(detection_count)]
    negated_score = -det["score"][by_class]
    ranked_classes = [
        by_class[start:stop][np.argsort(negated_score[start:stop], kind="stable")]
        for start, stop in zip(bounds[:-1], bounds[1:])
    ]
    order = np.concatenate(ranked_classes) if ranked_classes else by_class

    # Detections on difficult objects leave the ranking: neither TP nor FP. Dropping them
    # leaves the envelope unchanged, since they only repeat the previous PR point.
    if not keras_rules:
        on_difficult = np.zeros_like(hit)
        on_difficult[hit] = gt["difficult"][best_gt[hit]]
        order = order[~on_difficult[order]]
        dropped = np.bincount(det["class"][on_difficult], minlength=num_classes)
        bounds = np.r_[0, np.cumsum(detection_count - dropped)]

    # An object belongs to one class, so first hits over the whole ranking are first hits
    # within each class.
    is_tp = _first_hits(hit[order], best_gt[order])

    rankings, counts = {}, {}
    for index, name in enumerate(classes):
        num_positives = int(positive_count[index])
        counts[name] = {
            "gt": num_positives,
            "difficult": int(difficult_count[index]),
            "detections": int(detection_count[index]),
        }
        ranked = is_tp[bounds[index] : bounds[index + 1]]
        rankings[name] = (ranked, num_positives) if num_positives > 0 else None
    return rankings, counts


def _flatten(
    by_image: Mapping[Hashable, Sequence[Mapping]],
    image_index: Mapping[Hashable, int],
    class_index: Mapping[str, int],
    is_detection: bool,
) -> tuple[dict, list]:
    """Turns image -> list of dicts into flat arrays, keeping iteration order; boxes stay.

    Returns:
        A dict of arrays: ``image``, ``class`` and ``position`` (index into the entry list)
        (N,) int64, and ``score`` (N,) float64 for detections or ``difficult`` (N,) bool for
        ground truth; entries whose label is not in ``class_index`` are dropped. Also the list
        of all entries, from which `_read_boxes` reads the boxes that are needed.
    """
    # Fields are pulled with map/itemgetter into np.fromiter, which runs the loops in C and
    # builds no intermediate lists; on 500k detections this is several times faster than
    # np.array over a list of lists, which dominated the whole evaluation.
    items = list(chain.from_iterable(by_image.values()))
    num_items = len(items)
    image = np.repeat(
        np.fromiter(map(image_index.__getitem__, by_image), np.int64, len(by_image)),
        np.fromiter(map(len, by_image.values()), np.int64, len(by_image)),
    )
    labels = map(itemgetter("label"), items)
    label = np.fromiter(map(class_index.get, labels, repeat(-1)), np.int64, num_items)
    flat = {"image": image, "class": label, "position": np.arange(num_items)}
    if is_detection:
        scores = map(itemgetter("score"), items)
        flat["score"] = np.fromiter(scores, np.float64, num_items)
    else:
        flags = map(methodcaller("get", "difficult", False), items)
        flat["difficult"] = np.fromiter(map(bool, flags), bool, num_items)

    # Labels outside the evaluated classes take no part in matching.
    known = label >= 0
    if not known.all():
        flat = {key: values[known] for key, values in flat.items()}
    return flat, items


def _read_boxes(items: Sequence[Mapping], positions: np.ndarray) -> np.ndarray:
    """Reads the boxes of ``items[positions]`` into a (P, 4) float64 array.

    Raises:
        ValueError: if the boxes do not hold 4 coordinates each.
    """
    chosen = map(items.__getitem__, positions.tolist())
    coordinates = np.fromiter(chain.from_iterable(map(itemgetter("box"), chosen)), np.float64)
    if coordinates.size != 4 * len(positions):
        raise ValueError(
            f"boxes need 4 coordinates [x1, y1, x2, y2]; got {coordinates.size} numbers for "
            f"{len(positions)} boxes"
        )
    return coordinates.reshape(-1, 4)


def _best_overlaps(
    gt: Mapping, det: Mapping, det_items: Sequence[Mapping], num_classes: int, overlap: Callable
) -> tuple[np.ndarray, np.ndarray]:
    """Finds each detection's best-IoU ground truth within the same image and class.

    Every detection is paired with all objects of its (image, class) group at once, so no
    Python loop runs over images; pairs are processed in chunks to bound memory.

    Args:
        gt: flat ground truth from `_flatten`, with its ``box`` (G, 4) array.
        det: flat detections from `_flatten`.
        det_items: the detection entries ``det["position"]`` points into.
        num_classes: number of evaluated classes.
        overlap: element-wise IoU of (P, 4) detection boxes with (P, 4) object boxes.

    Returns:
        ``best_gt`` (D,) int64 index into the ground-truth arrays (-1 when the group has no
        objects) and ``best_iou`` (D,) float64 (-inf when the group has no objects). Ties go
        to the object listed first, like ``np.argmax`` in the devkit ports.
    """
    num_det = len(det["score"])
    best_gt = np.full(num_det, -1, dtype=np.int64)
    best_iou = np.full(num_det, -np.inf)
    if num_det == 0 or len(gt["class"]) == 0:
        return best_gt, best_iou

    # Sorting objects by (image, class) makes each group a contiguous slice; a stable sort
    # keeps annotation order inside it, which decides IoU ties.
    gt_group = gt["image"] * num_classes + gt["class"]
    gt_order = np.argsort(gt_group, kind="stable")
    det_group = det["image"] * num_classes + det["class"]
    num_groups = int(max(gt_group.max(), det_group.max())) + 1
    if num_groups <= _MAX_GROUP_TABLE:
        # A table over all groups answers each detection's lookup in constant time.
        group_count = np.bincount(gt_group, minlength=num_groups)
        group_first = np.cumsum(group_count) - group_count
        first, count = group_first[det_group], group_count[det_group]
    else:
        sorted_group = gt_group[gt_order]
        first = np.searchsorted(sorted_group, det_group, side="left")
        count = np.searchsorted(sorted_group, det_group, side="right") - first

    # Only detections with an object of their class in their image need their box; the other
    # rows stay unset, as no pair reads them. Reading boxes from the dicts is the slowest
    # step, and typically most detections (three quarters in benchmarks/ap_speed.py) have no
    # such object.
    det_box = np.empty((num_det, 4))
    needed = np.flatnonzero(count)
    det_box[needed] = _read_boxes(det_items, det["position"][needed])

    # Chunk boundaries fall between detections, so a detection's pairs stay together.
    pair_end = np.cumsum(count)
    bounds = np.searchsorted(
        pair_end, np.arange(_MAX_PAIRS_PER_CHUNK, pair_end[-1], _MAX_PAIRS_PER_CHUNK)
    )
    for start, stop in zip(np.r_[0, bounds], np.r_[bounds, num_det]):
        chunk = slice(int(start), int(stop))
        _best_overlaps_chunk(
            gt["box"], det_box, gt_order, first, count, chunk, overlap, best_gt, best_iou
        )
    return best_gt, best_iou


def _best_overlaps_chunk(
    gt_box: np.ndarray,
    det_box: np.ndarray,
    gt_order: np.ndarray,
    first: np.ndarray,
    count: np.ndarray,
    chunk: slice,
    overlap: Callable,
    best_gt: np.ndarray,
    best_iou: np.ndarray,
) -> None:
    """Fills ``best_gt`` and ``best_iou`` for the detections in ``chunk``."""
    # Expand every detection into one pair per object of its group; detections without
    # objects get no pairs and keep their defaults.
    pair_count = count[chunk]
    with_pairs = np.flatnonzero(pair_count) + chunk.start
    pair_count = pair_count[pair_count > 0]
    if len(with_pairs) == 0:
        return
    starts = np.cumsum(pair_count) - pair_count
    pair_det = np.repeat(with_pairs, pair_count)
    pair_offset = np.arange(len(pair_det)) - np.repeat(starts, pair_count)
    pair_gt = gt_order[first[pair_det] + pair_offset]
    iou = overlap(det_box[pair_det], gt_box[pair_gt])

    # Per detection, the first pair reaching the maximum; pairs are grouped by detection and
    # keep annotation order within each group.
    group_max = np.maximum.reduceat(iou, starts)
    at_max = np.flatnonzero(iou == np.repeat(group_max, pair_count))
    _, first_at_max = np.unique(pair_det[at_max], return_index=True)
    best_gt[with_pairs] = pair_gt[at_max[first_at_max]]
    best_iou[with_pairs] = group_max


def _iou_plus_one(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Element-wise IoU of (N, 4) boxes with (N, 4) boxes, sides measured as x2 - x1 + 1."""
    # The operation order follows the devkit ports so that borderline cases round the same.
    right = np.minimum(boxes[:, 2], others[:, 2])
    left = np.maximum(boxes[:, 0], others[:, 0])
    bottom = np.minimum(boxes[:, 3], others[:, 3])
    top = np.maximum(boxes[:, 1], others[:, 1])
    intersection = np.maximum(right - left + 1.0, 0.0) * np.maximum(bottom - top + 1.0, 0.0)
    area = (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)
    other_area = (others[:, 2] - others[:, 0] + 1.0) * (others[:, 3] - others[:, 1] + 1.0)
    return intersection / (area + other_area - intersection)


def _iou_without_plus_one(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Element-wise IoU of (N, 4) detections with (N, 4) objects, sides measured as x2 - x1.

    Follows keras-retinanet's ``compute_overlap``: boxes that do not overlap in both
    directions have IoU 0, and the union is summed in its order, so values agree bit for bit.
    """
    width = np.minimum(boxes[:, 2], others[:, 2]) - np.maximum(boxes[:, 0], others[:, 0])
    height = np.minimum(boxes[:, 3], others[:, 3]) - np.maximum(boxes[:, 1], others[:, 1])
    overlapping = (width > 0) & (height > 0)
    intersection = width * height
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    other_area = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + other_area - intersection

    # Pairs that do not overlap are never divided, as in keras-retinanet, which also keeps
    # degenerate (zero-area) boxes from producing 0 / 0.
    iou = np.zeros_like(intersection)
    np.divide(intersection, union, out=iou, where=overlapping)
    return iou


def _first_hits(hit: np.ndarray, best_gt: np.ndarray) -> np.ndarray:
    """Marks true positives among score-ordered detections.

    Without fallback to a second-best object, the devkit's greedy loop reduces to: a hit is a
    true positive exactly when no earlier detection hit the same object.

    Args:
        hit: (D,) bool, best IoU above the threshold (difficult objects already removed).
        best_gt: (D,) int64, index of each detection's best object.

    Returns:
        (D,) bool, True for true positives.
    """
    is_tp = np.zeros(len(hit), dtype=bool)
    hit_positions = np.flatnonzero(hit)
    _, first = np.unique(best_gt[hit_positions], return_index=True)
    is_tp[hit_positions[first]] = True
    return is_tp


def _precision_envelope(is_tp: np.ndarray, num_positives: int) -> tuple[np.ndarray, np.ndarray]:
    """Computes the PR curve of a ranking, precision replaced by its monotone envelope.

    Args:
        is_tp: (D,) bool, true positive flags in descending score order.
        num_positives: number of objects recall is measured against, > 0.

    Returns:
        ``recall`` and ``envelope``, (D,) float64 each, at each cut-off of the ranking.
    """
    # Cumulative counts give the PR curve at each cut-off of the ranking.
    true_positives = np.cumsum(is_tp)
    recall = true_positives / num_positives
    precision = true_positives / np.arange(1, len(is_tp) + 1)

    # Monotone envelope: the best precision reachable at this recall or beyond.
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return recall, envelope


def _average_precision(recall: np.ndarray, envelope: np.ndarray, metric: str) -> float:
    """Computes AP from `_precision_envelope`'s curve.

    Args:
        recall: (D,) float64, non-decreasing.
        envelope: (D,) float64, the precision envelope at the same cut-offs.
        metric: ``"area"`` or ``"11point"``.

    Returns:
        The average precision in [0, 1]; 0 when there are no detections.
    """
    if len(recall) == 0:
        return 0.0
    if metric == "area":
        recall_step = np.diff(recall, prepend=0.0)
        return float(np.sum(recall_step * envelope))

    # Recall never decreases, so the first cut-off reaching t carries the envelope value.
    reach = np.searchsorted(recall, VOC07_RECALL_THRESHOLDS, side="left")
    padded = np.r_[envelope, 0.0]
    return float(np.mean(padded[reach]))


def _coco_evaluator(
    ground_truth: Mapping[Hashable, Sequence[Mapping]],
    detections: Mapping[Hashable, Sequence[Mapping]],
    classes: Sequence[str],
) -> COCOeval:
    """Builds COCO datasets from our inputs and runs pycocotools' evaluate and accumulate."""
    # Every image is listed, including those with detections only, so that pycocotools
    # evaluates them and counts their detections as false positives.
    image_ids = {image_id: index + 1 for index, image_id in enumerate(ground_truth)}
    for image_id in detections:
        image_ids.setdefault(image_id, len(image_ids) + 1)
    category_ids = {name: index + 1 for index, name in enumerate(classes)}
    images = [{"id": coco_id} for coco_id in image_ids.values()]
    categories = [{"id": coco_id, "name": name} for name, coco_id in category_ids.items()]

    # NOTE: difficult objects are marked iscrowd, not "ignore": pycocotools overwrites an
    # "ignore" field with the iscrowd flag while preparing the evaluation.
    # Annotation ids start at 1: pycocotools stores matches as ids and reads 0 as unmatched.
    objects = [
        dict(_coco_box(item["box"]), iscrowd=int(bool(item.get("difficult", False))))
        | {"image_id": image_ids[image_id], "category_id": category_ids[item["label"]]}
        for image_id, items in ground_truth.items()
        for item in items
        if item["label"] in category_ids
    ]
    found = [
        dict(_coco_box(item["box"]), score=float(item["score"]))
        | {"image_id": image_ids[image_id], "category_id": category_ids[item["label"]]}
        for image_id, items in detections.items()
        for item in items
        if item["label"] in category_ids
    ]
    for number, annotation in enumerate(chain(objects, found), start=1):
        annotation["id"] = number

    # pycocotools reports progress with print; library code keeps stdout clean, so the text
    # goes to the debug log instead.
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        coco_gt = _coco_dataset(images, categories, objects)
        coco_dt = _coco_dataset(images, categories, found)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    logger.debug("pycocotools: %s", captured.getvalue().strip())
    return evaluator


def _coco_box(box: Sequence[float]) -> dict:
    """Converts an inclusive-pixel [x1, y1, x2, y2] box to COCO ``bbox`` and ``area``."""
    x1, y1, x2, y2 = map(float, box)
    width, height = x2 - x1 + 1.0, y2 - y1 + 1.0
    return {"bbox": [x1, y1, width, height], "area": width * height}


def _coco_dataset(images: list, categories: list, annotations: list) -> COCO:
    """Wraps lists of images, categories and annotations in an indexed pycocotools COCO."""
    dataset = COCO()
    dataset.dataset = {"images": images, "categories": categories, "annotations": annotations}
    dataset.createIndex()
    return dataset


def _ordered_classes(results: Iterable[Mapping]) -> list[str]:
    """Collects class names across results in order of first appearance."""
    seen = {}
    for result in results:
        seen.update(dict.fromkeys(result["per_class"]))
    return list(seen)


def _fmt(value: float | None) -> str:
    """Formats an AP with 3 decimals, or n/a when undefined."""
    return "n/a" if value is None else f"{value:.3f}"


def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Joins a header and rows into a Markdown table; numeric columns are right-aligned."""
    alignment = [":---"] + ["---:"] * (len(header) - 1)
    lines = [_markdown_row(header), "|" + "|".join(alignment) + "|"]
    lines += [_markdown_row(row) for row in rows]
    return "\n".join(lines)


def _markdown_row(cells: Sequence[str]) -> str:
    """Joins cells into one Markdown table line."""
    return "| " + " | ".join(cells) + " |"
