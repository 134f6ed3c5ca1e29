"""Time of fgl-check-data on a generated VOC-layout tree the size of VOC2012 trainval.

    .venv/bin/python benchmarks/check_data_speed.py --images 11540 --tree /tmp/voc_check_bench

Writes (once; reused when present) a tree of `--images` annotated JPEGs in VOC2012's layout:
XML in the devkit's format with 1 to 6 objects per image (2.4 on average, as in VOC2012
trainval), poses, truncated and difficult flags, person-layout parts on some people, and a few
per-thousand realistic defects (boxes past the border, an unknown class name, a missing
annotation). Images are real JPEGs of VOC's usual sizes (500 x 375, 375 x 500, 500 x 333,
333 x 500, 500 x 500), a few KB each. Then runs `check_data_main` (the CLI, JSON included)
`--repeats` times and prints the wall time of each run; the page cache is warm after the first.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from fgl_retinanet.cli import check_data_main
from fgl_retinanet.config import VOC_CLASSES

SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500))


def object_xml(rng: np.random.Generator, name: str, width: int, height: int) -> str:
    x1, y1 = int(rng.integers(1, width - 20)), int(rng.integers(1, height - 20))
    x2 = int(min(width, x1 + rng.integers(10, width)))
    y2 = int(min(height, y1 + rng.integers(10, height)))
    if rng.random() < 0.003:
        x2 = width + 7  # past the border: clipped and noted
    parts = ""
    if name == "person" and rng.random() < 0.1:
        parts = "".join(
            f"\n\t\t<part>\n\t\t\t<name>{part}</name>\n\t\t\t<bndbox>\n\t\t\t\t<xmin>{x1}</xmin>"
            f"\n\t\t\t\t<ymin>{y1}</ymin>\n\t\t\t\t<xmax>{x1 + 5}</xmax>\n\t\t\t\t<ymax>{y1 + 5}"
            "</ymax>\n\t\t\t</bndbox>\n\t\t</part>"
            for part in ("head", "hand", "foot")
        )
    return (
        f"\n\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>"
        f"{('Unspecified', 'Left', 'Right', 'Frontal', 'Rear')[int(rng.integers(5))]}</pose>"
        f"\n\t\t<truncated>{int(rng.random() < 0.3)}</truncated>"
        f"\n\t\t<difficult>{int(rng.random() < 0.1)}</difficult>"
        f"\n\t\t<bndbox>\n\t\t\t<xmin>{x1}</xmin>\n\t\t\t<ymin>{y1}</ymin>"
        f"\n\t\t\t<xmax>{x2}</xmax>\n\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>{parts}\n\t</object>"
    )


def generate_tree(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # One encoded JPEG per size (textured, so not degenerate), written under every name.
    jpegs = {}
    for width, height in SIZES:
        pixels = cv2.resize(rng.integers(0, 255, (12, 16, 3)).astype(np.uint8), (width, height))
        jpegs[(width, height)] = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 80])[1]
    ids = [f"{2008 + i // 4000}_{i % 4000:06d}" for i in range(count)]
    for index, image_id in enumerate(ids):
        width, height = SIZES[int(rng.integers(len(SIZES)))]
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpegs[(width, height)].tobytes())
        if index % 5000 == 4999:
            continue  # a listed id without an annotation
        names = [VOC_CLASSES[int(i)] for i in rng.integers(0, 20, size=int(rng.integers(1, 5)))]
        if rng.random() < 0.3:
            names.append("person")
        if rng.random() < 0.001:
            names.append("persn")  # a typo, skipped under data.unknown_classes=skip
        objects = "".join(object_xml(rng, name, width, height) for name in names)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation>\n\t<folder>VOC2012</folder>\n\t<filename>{image_id}.jpg</filename>"
            "\n\t<source>\n\t\t<database>The VOC2008 Database</database>\n\t\t<annotation>"
            "PASCAL VOC2008</annotation>\n\t\t<image>flickr</image>\n\t</source>\n\t<size>"
            f"\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>"
            f"\n\t</size>\n\t<segmented>0</segmented>{objects}\n</annotation>\n"
        )
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=11540)
    parser.add_argument("--tree", default="/tmp/voc_check_bench")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--remove", action="store_true", help="delete the tree afterwards")
    args = parser.parse_args(argv)

    root = Path(args.tree)
    marker = root / "ImageSets" / "Main" / "trainval.txt"
    if not marker.is_file() or len(marker.read_text().split()) != args.images:
        shutil.rmtree(root, ignore_errors=True)
        started = time.time()
        generate_tree(root, args.images)
        print(f"generated {args.images} images in {time.time() - started:.1f} s: {root}")

    seconds = []
    report_path = root.parent / f"{root.name}_report.json"
    for _ in range(args.repeats):
        started = time.perf_counter()
        # Summaries go to /dev/null: printing thousands of lines is not the check's work.
        with open(os.devnull, "w") as sink:
            stdout, sys.stdout = sys.stdout, sink
            try:
                code = check_data_main(
                    ["--root", str(root), "--split", "trainval", "--json", str(report_path),
                     "data.unknown_classes=skip"]
                )  # fmt: skip
            finally:
                sys.stdout = stdout
        seconds.append(time.perf_counter() - started)
        report = json.loads(report_path.read_text())["splits"]["trainval"]
        print(
            f"exit {code}: {report['images']} images, {report['objects']} objects, "
            f"{len(report['problems'])} problems, {len(report['notes'])} notes in "
            f"{seconds[-1]:.2f} s"
        )
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.remove:
        shutil.rmtree(root)
        report_path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
