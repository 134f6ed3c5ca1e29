"""PASCAL VOC average precision under the devkit's matching rules, and result tables."""

import csv
import io
import logging
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

METRICS = ("area", "11point")
METRIC_LABELS = {"area": "AP (area)", "11point": "AP (11pt)"}

# NOTE: the Python devkit ports compute the VOC07 thresholds with a float step of 0.1, so three
# of them sit one ulp above 0.3, 0.6 and 0.7. We keep them so results match those ports;
# a recall of exactly 3/10 therefore does not reach the "0.3" threshold.
VOC07_RECALL_THRESHOLDS = np.arange(11) * 0.1

# Detection/ground-truth pairs handled per chunk while searching best overlaps; bounds the
# temporary arrays to a few hundred MB on crowded images.
_MAX_PAIRS_PER_CHUNK = 4_000_000

logger = logging.getLogger(__name__)


def average_precisions(
    ground_truth: Mapping[Hashable, Sequence[Mapping]],
    detections: Mapping[Hashable, Sequence[Mapping]],
    classes: Sequence[str],
    metric: str = "area",
    iou_threshold: float = 0.5,
) -> dict:
    """Computes per-class VOC average precision and their mean.

    Matching follows the devkit: box sides are ``x2 - x1 + 1`` (also for float boxes); each
    detection, in descending score order, is compared only with its best-IoU ground truth of
    the same image and class; it is a true positive when that IoU is strictly above
    ``iou_threshold`` and the object is not yet taken, ignored when the object is difficult,
    and a false positive otherwise. Equal scores keep input order (images in ``detections``
    order, then list order). Labels not in ``classes`` are skipped.

    Args:
        ground_truth: image id -> objects ``{"box": [x1, y1, x2, y2], "label": str,
            "difficult": bool}``; ``difficult`` defaults to False.
        detections: image id -> ``{"box": [x1, y1, x2, y2], "score": float, "label": str}``.
            Detections on images missing from ``ground_truth`` are false positives.
        classes: class names to evaluate, in the order used for results and tables.
        metric: ``"area"`` (VOC2010+, area under the monotone precision envelope) or
            ``"11point"`` (VOC2007, mean of the best precision at recall >= 0, 0.1, ..., 1).
        iou_threshold: a match needs IoU strictly greater than this.

    Returns:
        A dict with ``"per_class"`` (class -> AP, None when the class has no non-difficult
        ground truth), ``"mAP"`` (mean over defined APs, None when there are none),
        ``"undefined"`` (classes whose AP is None), ``"counts"`` (class -> ``{"gt",
        "difficult", "detections"}``), ``"metric"`` and ``"iou_threshold"``.

    Raises:
        ValueError: if ``metric`` is unknown.

    Example:
        >>> gt = {"a": [{"box": [0, 0, 9, 9], "label": "cat", "difficult": False}]}
        >>> average_precisions(gt, {"a": [{"box": [0, 0, 9, 9], "score": 0.9,
        ...     "label": "cat"}]}, ["cat"])["mAP"]
        1.0
    """
    if metric not in METRICS:
        raise ValueError(f"unknown AP metric {metric!r}; expected one of {METRICS}")

    # Integer ids for images and classes let every later step work on flat arrays.
    class_index = {name: index for index, name in enumerate(classes)}
    image_index = {image_id: index for index, image_id in enumerate(ground_truth)}
    for image_id in detections:
        image_index.setdefault(image_id, len(image_index))
    gt = _flatten(ground_truth, image_index, class_index, is_detection=False)
    det = _flatten(detections, image_index, class_index, is_detection=True)

    # Best ground truth of each detection, searched in its own image and class only.
    best_gt, best_iou = _best_overlaps(gt, det, len(classes))
    hit = best_iou > iou_threshold
    on_difficult = np.zeros_like(hit)
    on_difficult[hit] = gt["difficult"][best_gt[hit]]

    per_class, counts, undefined = {}, {}, []
    for index, name in enumerate(classes):
        in_class = det["class"] == index
        num_positives = int(np.count_nonzero((gt["class"] == index) & ~gt["difficult"]))
        counts[name] = {
            "gt": num_positives,
            "difficult": int(np.count_nonzero((gt["class"] == index) & gt["difficult"])),
            "detections": int(np.count_nonzero(in_class)),
        }
        if num_positives == 0:
            per_class[name] = None
            undefined.append(name)
            continue

        # A stable sort keeps equal scores in input order, as the devkit ports do.
        members = np.flatnonzero(in_class)
        members = members[np.argsort(-det["score"][members], kind="stable")]

        # Detections on difficult objects leave the ranking: neither TP nor FP. Dropping them
        # leaves the envelope unchanged, since they only repeat the previous PR point.
        members = members[~on_difficult[members]]
        is_tp = _first_hits(hit[members], best_gt[members])
        per_class[name] = _precision_recall_ap(is_tp, num_positives, metric)

    # The mean covers defined APs only; a class without objects says nothing about a model.
    defined = [ap for ap in per_class.values() if ap is not None]
    mean_ap = float(np.mean(defined)) if defined else None
    if mean_ap is None:
        logger.warning(
            "mAP is undefined: no class among %d has non-difficult ground truth", len(classes)
        )
    return {
        "per_class": per_class,
        "mAP": mean_ap,
        "undefined": undefined,
        "counts": counts,
        "metric": metric,
        "iou_threshold": iou_threshold,
    }


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


def _flatten(
    by_image: Mapping[Hashable, Sequence[Mapping]],
    image_index: Mapping[Hashable, int],
    class_index: Mapping[str, int],
    is_detection: bool,
) -> dict:
    """Turns image -> list of dicts into flat arrays, keeping iteration order.

    Returns:
        A dict of arrays: ``image`` and ``class`` (N,) int64, ``box`` (N, 4) float64, and
        ``score`` (N,) float64 for detections or ``difficult`` (N,) bool for ground truth.
        Entries whose label is not in ``class_index`` are dropped.
    """
    # One pass per field over a flat list is several times faster than building tuples.
    items = [item for entries in by_image.values() for item in entries]
    image = np.repeat(
        np.array([image_index[image_id] for image_id in by_image], dtype=np.int64),
        [len(entries) for entries in by_image.values()],
    )
    label = np.array([class_index.get(item["label"], -1) for item in items], dtype=np.int64)
    flat = {
        "image": image,
        "class": label,
        "box": np.array([item["box"] for item in items], dtype=np.float64).reshape(-1, 4),
    }
    if is_detection:
        flat["score"] = np.array([item["score"] for item in items], dtype=np.float64)
    else:
        flat["difficult"] = np.array(
            [bool(item.get("difficult", False)) for item in items], dtype=bool
        )

    # Labels outside the evaluated classes take no part in matching.
    known = label >= 0
    if not known.all():
        flat = {key: values[known] for key, values in flat.items()}
    return flat


def _best_overlaps(gt: Mapping, det: Mapping, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Finds each detection's best-IoU ground truth within the same image and class.

    Every detection is paired with all objects of its (image, class) group at once, so no
    Python loop runs over images; pairs are processed in chunks to bound memory.

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
    sorted_group = gt_group[gt_order]
    det_group = det["image"] * num_classes + det["class"]
    first = np.searchsorted(sorted_group, det_group, side="left")
    count = np.searchsorted(sorted_group, det_group, side="right") - first

    # Chunk boundaries fall between detections, so a detection's pairs stay together.
    pair_end = np.cumsum(count)
    bounds = np.searchsorted(
        pair_end, np.arange(_MAX_PAIRS_PER_CHUNK, pair_end[-1], _MAX_PAIRS_PER_CHUNK)
    )
    for start, stop in zip(np.r_[0, bounds], np.r_[bounds, num_det]):
        _best_overlaps_chunk(
            gt, det, gt_order, first, count, slice(int(start), int(stop)), best_gt, best_iou
        )
    return best_gt, best_iou


def _best_overlaps_chunk(
    gt: Mapping,
    det: Mapping,
    gt_order: np.ndarray,
    first: np.ndarray,
    count: np.ndarray,
    chunk: slice,
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

    # IoU with the devkit's inclusive pixel convention: a side spans x2 - x1 + 1 pixels.
    iou = _iou_plus_one(det["box"][pair_det], gt["box"][pair_gt])

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


def _first_hits(hit: np.ndarray, best_gt: np.ndarray) -> np.ndarray:
    """Marks true positives among score-ordered detections of one class.

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


def _precision_recall_ap(is_tp: np.ndarray, num_positives: int, metric: str) -> float:
    """Computes AP from score-ordered TP flags.

    Args:
        is_tp: (D,) bool, true positive flags in descending score order.
        num_positives: number of non-difficult objects of the class, > 0.
        metric: ``"area"`` or ``"11point"``.

    Returns:
        The average precision in [0, 1]; 0 when there are no detections.
    """
    if len(is_tp) == 0:
        return 0.0

    # Cumulative counts give the PR curve at each cut-off of the ranking.
    true_positives = np.cumsum(is_tp)
    recall = true_positives / num_positives
    precision = true_positives / np.arange(1, len(is_tp) + 1)

    # Monotone envelope: the best precision reachable at this recall or beyond.
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    if metric == "area":
        recall_step = np.diff(recall, prepend=0.0)
        return float(np.sum(recall_step * envelope))

    # Recall never decreases, so the first cut-off reaching t carries the envelope value.
    reach = np.searchsorted(recall, VOC07_RECALL_THRESHOLDS, side="left")
    padded = np.r_[envelope, 0.0]
    return float(np.mean(padded[reach]))


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
