"""VOC AP speed on 500k detections: ours, keras-retinanet 1.0.0's evaluate(), a Python loop.

    .venv/bin/python benchmarks/ap_speed.py [--images 5000] [--repeats 5] [--json out.json]

One deterministic random case (5,000 images x 20 classes x 100 detections, about 4 objects per
image, a tenth of them difficult) is evaluated in one process by:

- ours: `average_precisions` per metric, and `average_precisions_all` for both metrics from one
  matching pass (best of ``--repeats`` runs; peak memory from tracemalloc in a separate run);
- keras-retinanet 1.0.0: its real `keras_retinanet.utils.eval.evaluate`, driven by a generator
  that serves the case's annotations and a model whose `predict_on_batch` returns the case's
  detections, so everything after inference runs unchanged (area AP under its own rules);
- a Python reference: the devkit's per-detection loop, written out plainly below.

Our VOC results must equal the Python reference to 1e-12, and our ``convention="keras-retinanet"``
results must equal what keras-retinanet reports; the script fails otherwise.
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc

import numpy as np

from fgl_retinanet.evaluation import average_precisions, average_precisions_all

# Tolerance for "identical" AP values: the implementations sum in different orders.
TOLERANCE = 1e-12

# Same float thresholds as the devkit ports (see evaluation.VOC07_RECALL_THRESHOLDS).
VOC07_THRESHOLDS = np.arange(11) * 0.1


def make_case(
    num_images: int = 5000, num_classes: int = 20, per_image: int = 100, seed: int = 0
) -> tuple[dict, dict, list]:
    """Builds a deterministic detection case with the layout `average_precisions` reads.

    Each 500 x 375 image holds 1 + Poisson(3) objects (integer boxes, 10% difficult). Each
    object draws 1 to 3 jittered detections scored around 0.7 (10% with a wrong class); random
    boxes of random classes with scores skewed towards 0.05 fill the image up to ``per_image``
    detections, as a detector's output after a 0.05 score threshold looks.

    Returns:
        ``(ground_truth, detections, classes)``.
    """
    rng = np.random.default_rng(seed)
    classes = [f"class{index:02d}" for index in range(num_classes)]
    size = np.array([500.0, 375.0])
    objects, found = [], []
    for _ in range(num_images):
        # Objects: integer pixel boxes inside the image.
        count = 1 + rng.poisson(3)
        corner = rng.uniform(0, 0.7 * size, (count, 2))
        far_corner = np.minimum(corner + rng.uniform(20, 150, (count, 2)), size - 1)
        boxes = np.round(np.c_[corner, far_corner])
        labels = rng.integers(0, num_classes, count)
        objects.append((boxes, labels, rng.random(count) < 0.1))

        # Detections near objects: true positives, duplicates and a few wrong classes.
        source = np.repeat(np.arange(count), rng.integers(1, 4, count))[:per_image]
        near = boxes[source] + rng.normal(0, 6, (len(source), 4))
        near_labels = labels[source].copy()
        wrong = rng.random(len(source)) < 0.1
        near_labels[wrong] = rng.integers(0, num_classes, int(wrong.sum()))
        near_scores = 0.05 + 0.95 * rng.beta(4, 2, len(source))

        # Background detections fill the rest with mostly low scores.
        rest = per_image - len(source)
        corner = rng.uniform(0, 0.8 * size, (rest, 2))
        background = np.c_[corner, corner + rng.uniform(10, 200, (rest, 2))]
        background_labels = rng.integers(0, num_classes, rest)
        background_scores = 0.05 + 0.95 * rng.beta(1, 8, rest)
        found.append(
            (
                np.r_[near, background],
                np.r_[near_scores, background_scores],
                np.r_[near_labels, background_labels],
            )
        )

    # The dicts are built in two passes, as a dataset loader and a detection loop would build
    # them, so each structure lies together in memory rather than interleaved image by image.
    ground_truth = {
        f"{image:06d}": [
            {"box": box, "label": classes[label], "difficult": bool(hard)}
            for box, label, hard in zip(boxes.tolist(), labels, difficult)
        ]
        for image, (boxes, labels, difficult) in enumerate(objects)
    }
    detections = {
        f"{image:06d}": [
            {"box": box, "score": score, "label": classes[label]}
            for box, score, label in zip(boxes.tolist(), scores.tolist(), labels)
        ]
        for image, (boxes, scores, labels) in enumerate(found)
    }
    return ground_truth, detections, classes


def reference_average_precisions(
    ground_truth: dict, detections: dict, classes: list, iou_threshold: float = 0.5
) -> dict:
    """VOC AP under the devkit's rules, one detection at a time, both metrics.

    Returns:
        ``{"area": {class: AP or None}, "11point": {class: AP or None}}``.
    """
    results = {"area": {}, "11point": {}}
    no_objects = (np.zeros((0, 4)), np.zeros(0, dtype=bool), np.zeros(0, dtype=bool))
    for name in classes:
        # This class's objects per image, with a flag that marks them found.
        objects, positives = {}, 0
        for image_id, items in ground_truth.items():
            mine = [item for item in items if item["label"] == name]
            boxes = np.array([item["box"] for item in mine], dtype=np.float64).reshape(-1, 4)
            difficult = np.array([item.get("difficult", False) for item in mine], dtype=bool)
            objects[image_id] = (boxes, difficult, np.zeros(len(mine), dtype=bool))
            positives += int(np.count_nonzero(~difficult))
        if positives == 0:
            results["area"][name] = results["11point"][name] = None
            continue

        # Python's sort is stable: equal scores keep input order.
        ranked = sorted(
            (
                (item["score"], image_id, item["box"])
                for image_id, items in detections.items()
                for item in items
                if item["label"] == name
            ),
            key=lambda entry: -entry[0],
        )

        # Each detection against its image's objects, best IoU only.
        flags = []
        for _, image_id, box in ranked:
            boxes, difficult, found = objects.get(image_id, no_objects)
            if len(boxes) == 0:
                flags.append(False)
                continue
            width = np.maximum(
                np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]) + 1.0, 0.0
            )
            height = np.maximum(
                np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]) + 1.0, 0.0
            )
            intersection = width * height
            area = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
            areas = (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)
            iou = intersection / (area + areas - intersection)
            best = int(np.argmax(iou))
            if iou[best] <= iou_threshold:
                flags.append(False)
            elif not difficult[best]:
                flags.append(not found[best])
                found[best] = True

        # Precision-recall points, then each metric straight from its definition.
        true_positives = np.cumsum(flags)
        recall = true_positives / positives
        precision = true_positives / np.arange(1, len(flags) + 1)
        envelope = list(precision)
        for index in range(len(envelope) - 2, -1, -1):
            envelope[index] = max(envelope[index], envelope[index + 1])
        area_under, previous = 0.0, 0.0
        for point_recall, point_precision in zip(recall, envelope):
            area_under += (point_recall - previous) * point_precision
            previous = point_recall
        results["area"][name] = area_under
        results["11point"][name] = (
            sum(
                max((p for r, p in zip(recall, precision) if r >= t), default=0.0)
                for t in VOC07_THRESHOLDS
            )
            / 11
        )
    return results


class PrecomputedGenerator:
    """Stands in for a keras-retinanet generator: serves fixed annotations, no real images.

    Each "image" is a 1 x 1 array holding its index, so that `PrecomputedModel` knows which
    detections to return; scale is 1, so keras-retinanet's box rescaling changes nothing.
    """

    def __init__(self, ground_truth: dict, image_ids: list, classes: list):
        index = {name: position for position, name in enumerate(classes)}
        self.classes = classes
        self.annotations = []
        for image_id in image_ids:
            items = [item for item in ground_truth.get(image_id, []) if item["label"] in index]
            self.annotations.append(
                {
                    "bboxes": np.array([item["box"] for item in items], np.float64).reshape(-1, 4),
                    "labels": np.array([index[item["label"]] for item in items], np.int64),
                }
            )

    def size(self) -> int:
        return len(self.annotations)

    def num_classes(self) -> int:
        return len(self.classes)

    def has_label(self, label: int) -> bool:
        return 0 <= label < len(self.classes)

    def label_to_name(self, label: int) -> str:
        return self.classes[label]

    def load_image(self, index: int) -> np.ndarray:
        return np.full((1, 1, 1), index, dtype=np.float64)

    def resize_image(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        return image, 1.0

    def preprocess_image(self, image: np.ndarray) -> np.ndarray:
        return image

    def load_annotations(self, index: int) -> dict:
        return self.annotations[index]


class PrecomputedModel:
    """Stands in for a keras-retinanet inference model: returns the case's detections."""

    def __init__(self, detections: dict, image_ids: list, classes: list):
        index = {name: position for position, name in enumerate(classes)}
        self.outputs = []
        for image_id in image_ids:
            items = [item for item in detections.get(image_id, []) if item["label"] in index]
            self.outputs.append(
                (
                    np.array([item["box"] for item in items], np.float64).reshape(1, -1, 4),
                    np.array([[item["score"] for item in items]], np.float64).reshape(1, -1),
                    np.array([[index[item["label"]] for item in items]], np.int64).reshape(1, -1),
                )
            )

    def predict_on_batch(self, batch: np.ndarray) -> tuple:
        boxes, scores, labels = self.outputs[int(batch[0, 0, 0, 0])]
        # keras-retinanet divides the boxes by the scale in place; hand out a copy.
        return boxes.copy(), scores, labels


def keras_retinanet_average_precisions(
    ground_truth: dict, detections: dict, classes: list
) -> tuple[dict, float]:
    """Runs keras-retinanet 1.0.0's evaluate() on precomputed annotations and detections.

    Returns:
        ``({class: AP, None when the class has no annotations}, seconds)``; the time covers
        evaluate() only, not building the stand-ins.
    """
    # Imported here: it imports TensorFlow, which the rest of the benchmark does not need.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_retinanet.utils.eval import evaluate

    image_ids = list(dict.fromkeys([*ground_truth, *detections]))
    generator = PrecomputedGenerator(ground_truth, image_ids, classes)
    model = PrecomputedModel(detections, image_ids, classes)

    # Its progress bars write to the stderr captured at import, so only silencing file
    # descriptor 2 keeps them out of the benchmark's output.
    with _silenced_stderr():
        start = time.perf_counter()
        by_label, _ = evaluate(generator, model)
        seconds = time.perf_counter() - start
    per_class = {
        classes[label]: (float(ap) if count > 0 else None)
        for label, (ap, count) in by_label.items()
    }
    return per_class, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-image", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="runs of ours; the best counts")
    parser.add_argument("--skip-keras", action="store_true", help="no keras-retinanet run")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)

    # The case's own memory is measured so ours can be stated next to it.
    tracemalloc.start()
    ground_truth, detections, classes = make_case(args.images, args.classes, args.per_image)
    input_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    num_detections = sum(map(len, detections.values()))
    num_objects = sum(map(len, ground_truth.values()))
    print(
        f"case: {len(ground_truth)} images, {len(classes)} classes, {num_detections} detections, "
        f"{num_objects} objects; input dicts {input_bytes / 2**20:.0f} MiB",
        flush=True,
    )

    # Ours: each metric alone, then both from one matching pass.
    def best_of(function):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = function()
            times.append(time.perf_counter() - start)
        return result, min(times), statistics.median(times)

    times = {}
    for metric in ("area", "11point"):
        _, times[metric], _ = best_of(
            lambda: average_precisions(ground_truth, detections, classes, metric)
        )
    ours, times["both"], both_median = best_of(
        lambda: average_precisions_all(ground_truth, detections, classes)
    )
    compat, times["compat"], _ = best_of(
        lambda: average_precisions(
            ground_truth, detections, classes, convention="keras-retinanet"
        )
    )

    # Peak memory of ours, in a run of its own: tracing slows allocation-heavy code.
    tracemalloc.start()
    average_precisions_all(ground_truth, detections, classes)
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    # The Python reference, once: it is the slow side of the comparison.
    start = time.perf_counter()
    reference = reference_average_precisions(ground_truth, detections, classes)
    times["reference"] = time.perf_counter() - start
    reference_gap = max(
        (
            abs(ours[metric]["per_class"][name] - reference[metric][name])
            for metric in reference
            for name in classes
            if reference[metric][name] is not None
        ),
        default=0.0,
    )
    same_undefined = all(
        (ours[metric]["per_class"][name] is None) == (reference[metric][name] is None)
        for metric in reference
        for name in classes
    )

    keras_gap = None
    if not args.skip_keras:
        keras_per_class, times["keras"] = keras_retinanet_average_precisions(
            ground_truth, detections, classes
        )
        keras_gap = max(
            (
                abs(compat["per_class"][name] - keras_per_class[name])
                for name in classes
                if keras_per_class[name] is not None
            ),
            default=0.0,
        )

    machine = f"{platform.machine()}, {_cpu_count()} cores, Python {platform.python_version()}"
    report = {
        "machine": machine,
        "images": len(ground_truth),
        "classes": len(classes),
        "detections": num_detections,
        "objects": num_objects,
        "seconds": {key: round(value, 4) for key, value in times.items()},
        "seconds_both_median": round(both_median, 4),
        "mAP": {metric: ours[metric]["mAP"] for metric in ours},
        "mAP_keras_retinanet_rules": compat["mAP"],
        "max_gap_to_reference": reference_gap,
        "max_gap_compat_to_keras_retinanet": keras_gap,
        "input_MiB": round(input_bytes / 2**20, 1),
        "peak_traced_MiB_ours": round(peak_bytes / 2**20, 1),
        "max_rss_MiB_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(_table(report))
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)

    # Identical results are the point of the comparison; a gap fails the run.
    failures = []
    if not same_undefined or reference_gap > TOLERANCE:
        failures.append(f"ours differs from the Python reference by {reference_gap:.3g}")
    if keras_gap is not None and keras_gap > TOLERANCE:
        failures.append(f"keras-retinanet rules differ from keras-retinanet by {keras_gap:.3g}")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _table(report: dict) -> str:
    """Formats the timings as a Markdown table with speed-ups against the two baselines."""
    seconds = report["seconds"]
    rows = [
        ("ours, `average_precisions_all`, both metrics", "both"),
        ("ours, `average_precisions`, area", "area"),
        ("ours, `average_precisions`, 11-point", "11point"),
        ('ours, `convention="keras-retinanet"`, area', "compat"),
        ("keras-retinanet 1.0.0 `evaluate()`, area", "keras"),
        ("Python reference loop, both metrics", "reference"),
    ]
    lines = [
        "| implementation | seconds | speed-up vs keras-retinanet | speed-up vs Python loop |",
        "|:---|---:|---:|---:|",
    ]
    for label, key in rows:
        if key not in seconds:
            continue
        ratios = [
            f"{seconds[baseline] / seconds[key]:.1f}x" if baseline in seconds else "n/a"
            for baseline in ("keras", "reference")
        ]
        lines.append(f"| {label} | {seconds[key]:.3f} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


@contextlib.contextmanager
def _silenced_stderr():
    """Points file descriptor 2 at /dev/null for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        if sys.__stderr__ is not None:
            sys.__stderr__.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_count() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
