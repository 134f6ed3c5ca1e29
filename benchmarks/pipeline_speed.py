"""Per-image time of keras-retinanet's PascalVocGenerator against our VocSequence, one core.

    .venv/bin/python benchmarks/pipeline_speed.py --rounds 5 --json pipeline_speed.json

Both read the VOC2007 sample of the shared checkout (13 VOC-size JPEGs, 41 objects) at min side
800 / max side 1333 with random horizontal flips (chance 0.5, both seeded alike), pinned to one
CPU core with OpenCV single-threaded. Each round times every image once through keras-retinanet's
`compute_input_output` and once through our `build_batch` (the call training makes), rounds
interleaved so that drifting machine speed hits both alike. Before timing, the script checks
that both produce identical inputs and targets for every image with and without a flip, and
exits non-zero if not.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from keras_retinanet.preprocessing.pascal_voc import PascalVocGenerator  # noqa: E402
from keras_retinanet.utils.image import adjust_transform_for_image  # noqa: E402
from keras_retinanet.utils.transform import (  # noqa: E402
    random_transform,
    random_transform_generator,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from shared_paths import VOC_SAMPLE  # noqa: E402

from fgl_retinanet.config import VOC_CLASSES, load_config  # noqa: E402
from fgl_retinanet.data import VocDataset  # noqa: E402
from fgl_retinanet.pipeline import VocSequence  # noqa: E402


def reference(generator, index, transform):
    """keras-retinanet's compute_input_output for one image with a given transform."""
    images = generator.load_image_group([index])
    annotations = generator.load_annotations_group([index])
    images, annotations = generator.filter_annotations(images, annotations, [index])
    if transform is not None:
        matrix = adjust_transform_for_image(transform.copy(), images[0], True)
        images[0], annotations[0] = generator.random_transform_group_entry(
            images[0], annotations[0], matrix
        )
    images, annotations = generator.preprocess_group(images, annotations)
    return generator.compute_inputs(images), generator.compute_targets(images, annotations)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed passes over the 13 images")
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="also time our batches built by this many threads, unpinned (images/s)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    # One core, one OpenCV thread: a per-core figure.
    all_cores = os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else None
    if all_cores:
        os.sched_setaffinity(0, {sorted(all_cores)[0]})
    cv2.setNumThreads(1)

    root = str(VOC_SAMPLE)
    theirs = PascalVocGenerator(
        root, "trainval", batch_size=1, group_method="none", shuffle_groups=False,
        image_min_side=800, image_max_side=1333,
        transform_generator=random_transform_generator(
            prng=np.random.RandomState(0), flip_x_chance=0.5
        ),
    )  # fmt: skip
    dataset = VocDataset(root, "trainval", VOC_CLASSES)
    ours = VocSequence(
        dataset,
        load_config(None, ["data.image_min_side=800", "data.image_max_side=1333"]),
        training=True,
        transform_generator=random_transform_generator(
            prng=np.random.RandomState(0), flip_x_chance=0.5
        ),
    )
    count = len(dataset)

    # Identical inputs and targets, with and without a flip.
    for transform in (None, random_transform(flip_x_chance=1.0)):
        for index in range(count):
            expected = reference(theirs, index, transform)
            got = ours.build_batch([index], [None if transform is None else transform.copy()])
            same = [
                np.array_equal(got[0], expected[0]),
                np.array_equal(got[1][0], expected[1][0]),
                np.array_equal(got[1][1], expected[1][1]),
            ]
            if not all(same):
                print(f"image {index}: outputs differ (inputs, regression, labels: {same})")
                return 1
    print(f"identical inputs and targets on {count} images, flipped and not")

    # Timed rounds, interleaved; one untimed pass first warms caches and the page cache.
    def theirs_pass():
        for index in range(count):
            theirs.compute_input_output([index])

    # Both read their transform stream in the same order: ours serves draw pass x count + index
    # to image slot (pass, index), so each pass is a new epoch of its stream.
    passes = iter(range(10**9))

    def ours_pass():
        epoch = next(passes)
        for index in range(count):
            ours.build_batch([index], [ours.transform_at(epoch, index)])

    theirs_pass()
    ours_pass()
    times = {"keras-retinanet": [], "ours": []}
    for _ in range(args.rounds):
        for name, run in (("keras-retinanet", theirs_pass), ("ours", ours_pass)):
            started = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - started) / count * 1000)

    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["keras-retinanet"] / medians["ours"]
    load = os.getloadavg()
    print("| pipeline | ms per image (median of rounds) | min | max |")
    print("|:---|---:|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {medians[name]:.1f} | {min(values):.1f} | {max(values):.1f} |")
    print(f"speed-up {ratio:.2f}x per core; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    results = {"ms_per_image": times, "median": medians, "ratio": ratio, "loadavg": load}

    # Threads as training's loader uses them (train.workers): every core, same batches.
    if args.threads:
        import concurrent.futures

        if all_cores:
            os.sched_setaffinity(0, all_cores)
        work = [index for _ in range(args.rounds) for index in range(count)]
        epochs = [next(passes) for _ in range(args.rounds)]
        transforms = [ours.transform_at(epoch, index) for epoch in epochs for index in range(count)]
        for threads in sorted({1, args.threads}):
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                started = time.perf_counter()
                list(pool.map(lambda job: ours.build_batch([job[0]], [job[1]]),
                              zip(work, transforms)))  # fmt: skip
                rate = len(work) / (time.perf_counter() - started)
            results[f"images_per_second_{threads}_threads"] = rate
            print(f"ours, {threads} thread(s), {len(all_cores or [0])} cores: {rate:.1f} images/s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
