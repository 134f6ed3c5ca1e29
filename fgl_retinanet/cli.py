"""Command-line entry points; each `main(argv=None)` can be driven by tests.

    fgl-train --config configs/demo_fgl.yaml train.epochs=1
    fgl-train --resume runs/demo/demo_fgl
    fgl-demo --out runs/demo
    fgl-experiment configs/experiments/voc2012_gamma2.yaml [--dry-run] [--np 4]
    fgl-compare runs/experiments/voc2012_gamma2 --out runs/experiments/voc2012_gamma2/report
    fgl-evaluate runs/voc2012_fgl --root data/VOCdevkit/VOC2012 --split val
    fgl-evaluate --detections runs/voc2012_fgl/eval_val/detections.json --root ... --split val
    fgl-check-data --root data/VOCdevkit/VOC2012 --split trainval --json data_report.json


    fgl-plot losses --gamma 1 2 --out figures
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from fgl_retinanet.config import (
    ConfigError,
    load_config,
    resolve_path,
    validate_paths,
)
from fgl_retinanet.distributed import tensorflow_environment

DEMO_EXPERIMENT = "configs/experiments/demo.yaml"


def train_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fgl-train", description="Train RetinaNet with a configurable classification loss."
    )
    parser.add_argument("--config", help="YAML config (may inherit through _base_)")
    parser.add_argument("--resume", help="run directory to continue from its last snapshot")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=1")
    args = parser.parse_intermixed_args(argv)

    # Everything that can be checked without TensorFlow is checked first, in one line.
    try:
        config_path = args.config
        if args.resume and not config_path:
            config_path = str(Path(args.resume) / "config.yaml")
            if not Path(config_path).is_file():
                raise ConfigError(
                    f"--resume {args.resume} is not a run directory (no config.yaml there)"
                )
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
        # train() has already written the reason to the run's log.
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
    args = parser.parse_intermixed_args(argv)

    # The demo is an experiment file: the same runner, resume and report as a real experiment.
    return experiment_main([DEMO_EXPERIMENT, "--out", args.out, *args.overrides], prog="fgl-demo")


def experiment_main(argv=None, prog: str = "fgl-experiment") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train every (loss, seed) run of an experiment file, then compare them. "
        "Run it again after an interruption: finished runs are skipped, interrupted ones resume.",
    )
    parser.add_argument("experiment", help="experiment YAML (configs/experiments/*.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print commands and budget only")
    parser.add_argument("--np", type=int, help="Horovod processes per run (horovodrun -np N)")
    parser.add_argument("--out", help="output directory (default: the file's output_dir)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    args = parser.parse_intermixed_args(argv)

    from fgl_retinanet import experiment as runner

    _quiet_tensorflow()
    # The file, every run's config and the output tree are checked before anything trains.
    try:
        experiment = runner.load_experiment(args.experiment, args.out, args.overrides)
        processes = experiment.processes if args.np is None else args.np
        if processes < 1:
            raise ConfigError(f"--np must be at least 1, got {processes}")
        if processes > 1:
            runner.horovodrun()
        runner.survey(experiment)
        problem = None
        try:
            runner.check_experiment(experiment)
        except ConfigError as e:
            if not args.dry_run:
                raise
            problem = e
    except ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return 2
    print(runner.format_plan(experiment, processes), flush=True)
    if args.dry_run:
        if problem:
            print(f"{prog}: this experiment cannot run yet: {problem}")
        return 0

    # Runs one after another in subprocesses; progress lines go to the console.
    restore = _console_logging("fgl_retinanet.experiment")
    try:
        code = runner.run_experiment(experiment, processes)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    finally:
        restore()
    if code != 0:
        return code
    return _report(
        prog, [run.directory for run in experiment.runs], experiment.output_dir / "report",
        experiment.losses[0], experiment.noise_window,
    )  # fmt: skip


def compare_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fgl-compare",
        description="Compare finished runs over seeds: tables, paired tests, noise, plots.",
    )
    parser.add_argument("runs", nargs="+", help="run directories, or directories holding runs")
    parser.add_argument("--out", default="comparison", help="output directory")
    parser.add_argument("--baseline", help="loss the others are compared with (default: focal)")
    parser.add_argument(
        "--noise-window", type=int, help="odd moving-average window in steps (default 25)"
    )
    args = parser.parse_args(argv)

    from fgl_retinanet.report import NOISE_WINDOW, ReportError, find_runs

    if args.noise_window is None:
        args.noise_window = NOISE_WINDOW
    if args.noise_window < 1 or args.noise_window % 2 == 0:
        print("fgl-compare: --noise-window must be odd and positive", file=sys.stderr)
        return 2
    try:
        runs = find_runs(args.runs)
    except ReportError as e:
        print(f"fgl-compare: {e}", file=sys.stderr)
        return 2
    return _report("fgl-compare", runs, Path(args.out), args.baseline, args.noise_window)


def evaluate_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fgl-evaluate",
        description="VOC (area, 11-point) and COCO AP of a trained run or of saved detections.",
    )
    parser.add_argument("run", nargs="?", help="run directory (latest snapshot) or snapshot .h5")
    parser.add_argument("--detections", help="re-score this detections.json without a model")
    parser.add_argument("--root", help="VOC directory (default: the run's data.root)")
    parser.add_argument("--split", help="ImageSets/Main list (default: the run's val split)")
    parser.add_argument("--out", help="output directory (default: RUN/eval_<split>)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per inference batch")
    parser.add_argument("overrides", nargs="*", help="overrides, e.g. eval.max_detections=50")
    args = parser.parse_intermixed_args(argv)

    # Resolve every input before TensorFlow is imported.
    try:
        if bool(args.run) == bool(args.detections):
            raise ConfigError("give either a run directory / snapshot or --detections FILE")
        source = Path(args.run or args.detections).resolve()
        if not source.exists():
            raise ConfigError(f"{source} does not exist")
        run, snapshot = _locate_run(source) if args.run else (source.parent.parent, None)
        config_path = run / "config.yaml"
        if not config_path.is_file() and not (args.root and args.detections):
            raise ConfigError(f"no config.yaml in {run}: not a run directory")
        overrides = list(args.overrides)
        if args.root:
            overrides += ["data.dataset=voc", f"data.root={args.root}"]
        saved = None
        if args.detections:
            with open(source) as f:
                saved = json.load(f)
            if not isinstance(saved, dict) or "detections" not in saved:
                raise ConfigError(f"{source} is not a detections.json written by fgl-evaluate")
        split = args.split or (saved or {}).get("split")
        if split:
            overrides.append(f"data.val_split={split}")
        config = load_config(str(config_path) if config_path.is_file() else None, overrides)
        validate_paths(config)
    except ConfigError as e:
        print(f"fgl-evaluate: {e}", file=sys.stderr)
        return 2

    from fgl_retinanet.data import DataError, dataset_root, load_split

    split = config.data.val_split
    out = Path(args.out) if args.out else run / f"eval_{split}"
    try:
        dataset = load_split(dataset_root(config), split, config)
    except DataError as e:
        print(f"fgl-evaluate: {e}", file=sys.stderr)
        return 1

    # One inference pass (or none when re-scoring), then every metric from its detections.
    if saved is not None:
        detections = saved["detections"]
    else:
        detections = _run_inference(config, snapshot, dataset, args.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    from fgl_retinanet.evaluation import write_evaluation

    try:
        summary = write_evaluation(out, dataset, detections, config, name=run.name)
    except ValueError as e:
        print(f"fgl-evaluate: {e}", file=sys.stderr)
        return 1
    print(f"\n{summary['table']}\n\n{summary['csv_header']}\n{summary['csv_line']}")
    print(f"\noutputs in {out}")
    return 0


def check_data_main(argv=None) -> int:
    """Validates VOC splits as training does, without TensorFlow; 1 if training would stop."""
    parser = argparse.ArgumentParser(
        prog="fgl-check-data",
        description="Validate a VOC-layout dataset as training would, without TensorFlow.",
    )
    parser.add_argument("--root", help="VOC directory (default: the config's data.root)")
    parser.add_argument(
        "--split", action="append",
        help="ImageSets/Main list to check; repeatable (default: the config's train and val "
        "splits)",
    )  # fmt: skip
    parser.add_argument("--config", help="YAML config whose data.* keys apply (classes, policies)")
    parser.add_argument("--json", help="also write the report here as JSON")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.bad_boxes=skip")
    args = parser.parse_intermixed_args(argv)

    try:
        overrides = list(args.overrides)
        if args.root:
            overrides += ["data.dataset=voc", f"data.root={args.root}"]
        config = load_config(args.config, overrides)
        if config.data.dataset == "voc" and not config.data.root:
            raise ConfigError("give --root VOC_DIR (or a config with data.root)")
    except ConfigError as e:
        print(f"fgl-check-data: {e}", file=sys.stderr)
        return 2

    from fgl_retinanet.data import dataset_root, load_split, write_data_report

    root = dataset_root(config)
    splits = args.split or list(dict.fromkeys([config.data.train_split, config.data.val_split]))
    reports = {}
    for split in splits:
        list_path = root / "ImageSets" / "Main" / f"{split}.txt"
        if not list_path.is_file():
            print(f"fgl-check-data: split list {list_path} not found", file=sys.stderr)
            return 2
        started = time.time()
        reports[split] = load_split(root, split, config, raise_errors=False).report
        print(f"{reports[split].summary(limit=None)}\n({time.time() - started:.1f} s)\n")

    can_train = all(report.can_train for report in reports.values())
    if args.json:
        write_data_report(args.json, reports)
        print(f"JSON report: {args.json}")
    verdict = "training can proceed" if can_train else "training cannot proceed (see above)"
    print(f"{len(reports)} split(s) checked: {verdict}")
    return 0 if can_train else 1


def plot_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fgl-plot", description="Figures of the losses, without TensorFlow."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    losses = commands.add_parser(
        "losses",
        help="objectives (CE, FL, effective FGL) and gradients (CE', FL', FGL', |R|) over p",
    )
    losses.add_argument("--gamma", type=float, nargs="+", default=[1.0, 2.0], help="gammas")
    losses.add_argument("--out", default="figures", help="output directory")
    losses.add_argument("--points", type=int, default=200, help="grid p = k/points, k=1..points")
    args = parser.parse_args(argv)

    if any(not gamma >= 0.0 for gamma in args.gamma) or args.points < 2:
        print("fgl-plot: gamma must be >= 0 and --points at least 2", file=sys.stderr)
        return 2
    from fgl_retinanet import analysis

    written = analysis.write_loss_figures(resolve_path(args.out), args.gamma, args.points)

    # The values the post's figures show, at one probability, to check the curves by eye.
    p = 0.05
    print(f"at p = {p} (alpha 1, derivatives d/dp):")
    print("| gamma | FL | effective FGL | FL' | FGL' | abs(R) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for gamma in args.gamma:
        print(
            f"| {gamma:g} | {analysis.focal_loss_value(p, gamma):.4f} "
            f"| {analysis.effective_focal_gradient_loss(p, gamma):.4f} "
            f"| {analysis.focal_loss_derivative(p, gamma):.2f} "
            f"| {analysis.focal_gradient_loss_derivative(p, gamma):.2f} "
            f"| {abs(analysis.focal_gradient_residual(p, gamma)):.2f} |"
        )
    print(f"\nwrote {', '.join(sorted(written))} in {resolve_path(args.out)}")
    return 0


def _locate_run(source: Path) -> tuple[Path, Path]:
    """(run directory, snapshot .h5) from either of them."""
    if source.is_dir():
        latest = source / "snapshots" / "latest.txt"
        if not latest.is_file():
            raise ConfigError(f"{source} has no snapshots/latest.txt")
        stem = latest.read_text().strip().removesuffix(".h5")
        snapshot = source / "snapshots" / f"{stem}.h5"
        if not snapshot.is_file():
            raise ConfigError(f"{latest} names {stem}, but {snapshot} is missing")
        return source, snapshot
    if source.suffix != ".h5":
        raise ConfigError(f"{source} is neither a run directory nor a .h5 snapshot")
    return source.parent.parent, source


def _run_inference(config, snapshot: Path, dataset, batch_size: int) -> dict:
    _quiet_tensorflow()
    from fgl_retinanet.model import build_inference_model, build_training_model, detect

    model = build_training_model(config, len(config.data.classes))
    model.load_weights(str(snapshot))
    inference = build_inference_model(model, config)
    print(f"inference on {len(dataset)} images with {snapshot.name}")
    return detect(inference, dataset, config, batch_size=batch_size, progress=True)


def _report(prog: str, runs, out: Path, baseline: str | None, noise_window: int) -> int:
    from fgl_retinanet.report import ReportError, per_class_markdown, write_report

    try:
        report = write_report(runs, out, baseline=baseline, noise_window=noise_window)
    except ReportError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    tables = "\n\n".join(per_class_markdown(report, other) for other in report["losses"][1:])
    verdicts = "\n".join(f"- {sentence}" for sentence in report["verdicts"])
    print(f"\n{tables}\n\n{verdicts}\n\nreport: {out / 'report.md'}")
    return 0


def _console_logging(name: str):
    """Shows a library logger's INFO lines on stdout; returns a function that undoes it."""
    target = logging.getLogger(name)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
    previous = (target.level, target.propagate)
    target.setLevel(logging.INFO)
    target.propagate = False
    target.addHandler(handler)

    def restore():
        target.removeHandler(handler)
        target.setLevel(previous[0])
        target.propagate = previous[1]

    return restore


def _quiet_tensorflow() -> None:
    # Process-wide TensorFlow options must be set before TensorFlow is first used.
    tensorflow_environment()
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(train_main())
