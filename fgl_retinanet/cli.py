"""Command-line entry points; each `main(argv=None)` can be driven by tests.

    fgl-train --config configs/demo_fgl.yaml train.epochs=1
    fgl-train --resume runs/demo/demo_fgl
    fgl-demo --out runs/demo
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from fgl_retinanet.config import ConfigError, load_config, resolve_path, validate_paths

DEMO_CONFIGS = ("configs/demo_focal.yaml", "configs/demo_fgl.yaml")


def train_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fgl-train", description="Train RetinaNet with a configurable classification loss."
    )
    parser.add_argument("--config", help="YAML config (may inherit through _base_)")
    parser.add_argument("--resume", help="run directory to continue from its last snapshot")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=1")
    args = parser.parse_args(argv)

    # Everything that can be checked without TensorFlow is checked first, in one line.
    try:
        config_path = args.config
        if args.resume and not config_path:
            config_path = str(Path(args.resume) / "config.yaml")
        if not config_path:
            raise ConfigError("give --config FILE (or --resume RUN_DIR)")
        config = load_config(config_path, args.overrides)
        validate_paths(config)
    except ConfigError as e:
        print(f"fgl-train: config error: {e}", file=sys.stderr)
        return 2

    _quiet_tensorflow()
    from fgl_retinanet.data import DataError
    from fgl_retinanet.losses import LOSSES
    from fgl_retinanet.train import train

    if config.loss.name not in LOSSES:
        print(
            f"fgl-train: config error: loss.name {config.loss.name!r} is not one of "
            f"{', '.join(sorted(LOSSES))}",
            file=sys.stderr,
        )
        return 2
    try:
        train(config, resume=Path(args.resume) if args.resume else None)
    except (DataError, FileNotFoundError, RuntimeError) as e:
        print(f"fgl-train: {e}", file=sys.stderr)
        return 1
    return 0


def demo_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fgl-demo",
        description="Train FL and FGL on the embedded toy dataset and compare their mAP.",
    )
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to both runs")
    args = parser.parse_args(argv)

    out = resolve_path(args.out)
    started = time.time()
    results = {}
    for path in DEMO_CONFIGS:
        # Each run is the real fgl-train entry point with the demo output directory.
        name = Path(path).stem
        code = train_main(
            ["--config", str(resolve_path(path)), f"train.output_dir={out}", *args.overrides]
        )
        if code != 0:
            print(f"fgl-demo: run {name} failed (exit {code})", file=sys.stderr)
            return code
        with open(out / name / "results.json") as f:
            results[name] = json.load(f)

    from fgl_retinanet.evaluation import comparison_table

    table = comparison_table({name: r for name, r in results.items()})
    seconds = time.time() - started
    summary = {
        "runs": {
            name: {k: r[k] for k in ("loss", "mAP", "best_mAP", "mAP_11point", "train_seconds")}
            for name, r in results.items()
        },
        "per_class": {name: r["per_class"] for name, r in results.items()},
        "wall_seconds": round(seconds, 1),
    }
    (out / "comparison.md").write_text(
        f"# Demo: focal loss vs focal gradient loss\n\nValidation AP (VOC area metric, "
        f"devkit rules).\n\n{table}\n\nWall time: {seconds:.0f} s\n"
    )
    with open(out / "comparison.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{table}\n\nWall time {seconds:.0f} s; outputs in {out}")
    return 0


def _quiet_tensorflow() -> None:
    # TensorFlow's C++ start-up chatter hides our own log lines; warnings and errors remain.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(train_main())
