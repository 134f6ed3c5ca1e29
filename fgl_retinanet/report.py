"""Compare runs over seeds: per-loss tables, paired statistics, training noise and plots.

    fgl-compare runs/experiments/voc2012_gamma2 --out runs/experiments/voc2012_gamma2/report

Runs of the same seed and different losses are pairs; each other loss is compared with the
baseline loss (focal loss by default) through the per-seed differences: mean, 95% t interval
and a paired t-test (scipy.stats.ttest_rel). Outputs: report.md (with the plots embedded),
report.json, runs.csv, comparison.csv, per_class.csv and PNG plots. No TensorFlow.
"""

import csv
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

# Short names for the losses of this project; others are shown as their registry name.
LOSS_LABELS = {"focal": "FL", "focal_gradient": "FGL"}

# Steps in the centered moving average that is taken as the trend of the per-step loss.
NOISE_WINDOW = 25
CONFIDENCE = 0.95
SIGNIFICANCE = 0.05

# Per-run numbers compared between losses: key -> label. Keys are results.json keys or the
# noise statistics computed here.
RUN_METRICS = {
    "mAP": "final mAP (VOC area)",
    "best_mAP": "best mAP (VOC area)",
    "mAP_11point": "final mAP (VOC 11-point)",
    "coco_AP": "final COCO AP@[.5:.95]",
    "step_loss_noise": "per-step classification loss, detrended sd",
    "map_change_sd": "epoch-to-epoch mAP change, sd",
}

# Configuration keys that may differ within a pair of runs without breaking the comparison.
PAIR_KEYS = {"loss.name", "train.run_name", "train.output_dir", "train.threads", "train.workers"}

_CHECKSUM = re.compile(r"checksum of the initial weights ([0-9a-f]{40})")

logger = logging.getLogger(__name__)

# Hook for optional per-run CSV files (for example diagnostics.csv): file name -> plotter.
# A plotter gets {run name: (RunRecord, rows)} for the runs that have the file, rows being the
# CSV's rows as dicts of text, and returns a matplotlib Figure (or None to draw nothing). The
# report saves it as <file stem>.png and embeds it. Register with `register_run_csv_plot`.
RUN_CSV_PLOTS: dict[str, Callable] = {}


def register_run_csv_plot(filename: str) -> Callable:
    """Returns a decorator that plots `filename` from every run directory that has it."""

    def decorator(function: Callable) -> Callable:
        RUN_CSV_PLOTS[filename] = function
        return function

    return decorator


@register_run_csv_plot("diagnostics.csv")
def _diagnostics_plot(present: dict):
    """Gradient diagnostics (train.diagnostics_every), one column per loss, seeds banded."""
    from fgl_retinanet.analysis import diagnostics_figure

    runs_by_loss = {}
    for run, _ in present.values():
        runs_by_loss.setdefault(run.loss, []).append(run.directory)
    return diagnostics_figure(runs_by_loss)


class ReportError(ValueError):
    """Runs that cannot be compared, reported as one line."""


@dataclass
class RunRecord:
    """One finished run as the report sees it.

    Attributes:
        directory: run directory.
        name: run name.
        loss: loss name.
        seed: train.seed.
        results: its results.json.
        config: its config.yaml.
        steps: per-step classification loss from steps.csv, (steps,); None without the file.
        initial_checksum: SHA-1 of the initial weights from log.txt, or None.
        metrics: RUN_METRICS key -> value (None when unavailable).
    """

    directory: Path
    name: str
    loss: str
    seed: int
    results: dict
    config: dict
    steps: np.ndarray | None
    initial_checksum: str | None
    metrics: dict = field(default_factory=dict)


# --- statistics -------------------------------------------------------------------------------


def describe(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (ddof 1; None below 2 values) of defined values."""
    defined = [float(v) for v in values if v is not None]
    n = len(defined)
    return {
        "n": n,
        "mean": float(np.mean(defined)) if n else None,
        "sd": float(np.std(defined, ddof=1)) if n >= 2 else None,
    }


def paired_difference(baseline: Sequence[float], other: Sequence[float]) -> dict:
    """Paired comparison of two losses over seeds: other - baseline per seed.

    Args:
        baseline: the baseline loss's value per seed, (n,).
        other: the other loss's value for the same seeds, (n,).

    Returns:
        ``{"n", "differences", "mean", "sd", "ci_low", "ci_high", "t", "p", "note"}``. The
        interval is the 95% Student t interval of the mean difference and the test a two-sided
        paired t-test (scipy.stats.ttest_rel); both are None, with a note saying why, for one
        pair or when every difference is the same.
    """
    base = np.asarray(baseline, dtype=float)
    test = np.asarray(other, dtype=float)
    differences = test - base
    n = len(differences)
    out = {
        "n": n,
        "differences": [float(d) for d in differences],
        "mean": float(differences.mean()) if n else None,
        "sd": float(differences.std(ddof=1)) if n >= 2 else None,
        "ci_low": None,
        "ci_high": None,
        "t": None,
        "p": None,
        "note": "",
    }
    if n == 0:
        out["note"] = "no pair with both values"
    elif n == 1:
        out["note"] = "n=1: no interval and no test"
    elif out["sd"] == 0:
        out["note"] = f"all {n} differences are equal: no interval and no test"
    else:
        result = stats.ttest_rel(test, base)
        interval = result.confidence_interval(CONFIDENCE)
        out.update(
            t=float(result.statistic),
            p=float(result.pvalue),
            ci_low=float(interval.low),
            ci_high=float(interval.high),
        )
    return out


def detrended_noise(values: Sequence[float], window: int = NOISE_WINDOW) -> float | None:
    """Standard deviation of a series around its centered moving average.

    Args:
        values: per-step losses in step order, (steps,).
        window: odd number of steps in the moving average (the trend).

    Returns:
        Sample sd (ddof 1) of value - trend over the steps where the whole window fits, or None
        with fewer than window + 1 values.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the noise window must be an odd positive number, got {window}")
    series = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(series) < window + 1:
        return None
    trend = np.convolve(series, np.ones(window) / window, mode="valid")
    half = window // 2
    residual = series[half : len(series) - half] - trend
    return float(residual.std(ddof=1))


def change_noise(maps: Sequence[float]) -> float | None:
    """Sample sd of the epoch-to-epoch changes of mAP; None below 2 changes (3 epochs)."""
    defined = np.asarray([m for m in maps if m is not None], dtype=float)
    changes = np.diff(defined)
    return float(changes.std(ddof=1)) if len(changes) >= 2 else None


def verdict(metric: str, other: str, baseline: str, paired: dict) -> str:
    """One sentence that says what the paired numbers of `metric` support."""
    n, mean = paired["n"], paired["mean"]
    name = f"{label(other)} - {label(baseline)}"
    if n == 0:
        return f"{RUN_METRICS.get(metric, metric)}: no pair of runs has both values."
    if n == 1:
        return (
            f"{RUN_METRICS.get(metric, metric)}: {name} = {mean:+.4f} from a single seed; with "
            f"n=1 there is no interval and no test, so this cannot be told apart from training "
            f"noise."
        )
    if paired["p"] is None:
        return (
            f"{RUN_METRICS.get(metric, metric)}: {name} = {mean:+.4f} in each of the {n} seeds; "
            f"with no spread there is no test."
        )
    interval = f"95% CI {paired['ci_low']:+.4f} to {paired['ci_high']:+.4f}"
    if paired["p"] < SIGNIFICANCE:
        direction = "higher" if mean > 0 else "lower"
        return (
            f"{RUN_METRICS.get(metric, metric)}: {label(other)} is significantly {direction} "
            f"than {label(baseline)} at n={n} (mean difference {mean:+.4f}, {interval}, paired "
            f"t-test p = {paired['p']:.3g})."
        )
    return (
        f"{RUN_METRICS.get(metric, metric)}: no significant difference at n={n} (mean "
        f"difference {name} {mean:+.4f}, {interval}, paired t-test p = {paired['p']:.3g})."
    )


def label(loss: str) -> str:
    return LOSS_LABELS.get(loss, loss)


# --- runs ---------------------------------------------------------------------------------------


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories among `paths`; a directory without results.json is searched one level."""
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ReportError(f"{path} is not a directory")
        if (path / "results.json").is_file():
            runs = [path]
        else:
            runs = sorted(p.parent for p in path.glob("*/results.json"))
        if not runs:
            raise ReportError(f"{path} has no results.json, nor runs below it (unfinished?)")
        found += runs
    return list(dict.fromkeys(found))


def load_run(directory: Path, noise_window: int = NOISE_WINDOW) -> RunRecord:
    """Reads a finished run directory.

    Raises:
        ReportError: results.json or config.yaml missing or unreadable.
    """
    directory = Path(directory)
    try:
        results = json.loads((directory / "results.json").read_text())
        config = yaml.safe_load((directory / "config.yaml").read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ReportError(f"{directory}: cannot read its results: {e}") from None
    if "mAP" not in results or "history" not in results:
        raise ReportError(f"{directory}/results.json was not written by fgl-train")

    steps = _read_steps(directory / "steps.csv")
    log = directory / "log.txt"
    checksums = _CHECKSUM.findall(log.read_text()) if log.is_file() else []
    maps = [row.get("mAP") for row in results["history"]]
    record = RunRecord(
        directory=directory,
        name=results.get("run", directory.name),
        loss=results["loss"],
        seed=int(config.get("train", {}).get("seed", 0)),
        results=results,
        config=config,
        steps=steps,
        # The last start from epoch 0 is the one whose epochs the run holds.
        initial_checksum=checksums[-1] if checksums else None,
    )
    record.metrics = {
        "mAP": results.get("mAP"),
        "best_mAP": results.get("best_mAP"),
        "mAP_11point": results.get("mAP_11point"),
        "coco_AP": results.get("coco_AP"),
        "step_loss_noise": None if steps is None else detrended_noise(steps, noise_window),
        "map_change_sd": change_noise(maps),
    }
    return record


def compare(
    runs: Sequence[RunRecord], baseline: str | None = None, noise_window: int = NOISE_WINDOW
) -> dict:
    """All numbers of the report, as a JSON-ready dict.

    Args:
        runs: finished runs; at most one per (loss, seed).
        baseline: loss the others are compared with; default focal when present, else the
            first loss seen.
        noise_window: the moving-average window used for the per-step noise (recorded).

    Raises:
        ReportError: duplicate (loss, seed), unknown baseline.
    """
    losses = list(dict.fromkeys(run.loss for run in runs))
    if baseline is None:
        baseline = "focal" if "focal" in losses else losses[0]
    if baseline not in losses:
        raise ReportError(f"baseline loss {baseline!r} is not among the runs ({', '.join(losses)})")
    losses = [baseline] + [loss for loss in losses if loss != baseline]
    by_key = {}
    for run in runs:
        key = (run.loss, run.seed)
        if key in by_key:
            raise ReportError(
                f"two runs of loss {run.loss} with seed {run.seed}: {by_key[key].directory} "
                f"and {run.directory}"
            )
        by_key[key] = run

    # Per loss: each metric over seeds.
    per_loss = {}
    for loss in losses:
        mine = sorted((run for run in runs if run.loss == loss), key=lambda run: run.seed)
        per_loss[loss] = {
            metric: dict(
                describe([run.metrics[metric] for run in mine]),
                values={str(run.seed): run.metrics[metric] for run in mine},
            )
            for metric in RUN_METRICS
        }

    # Paired: every other loss against the baseline, over the seeds both have.
    paired, per_class, verdicts = {}, {}, []
    for other in losses[1:]:
        seeds = sorted(s for (loss, s) in by_key if loss == other and (baseline, s) in by_key)
        pairs = [(by_key[(baseline, s)], by_key[(other, s)]) for s in seeds]
        paired[other] = {"seeds": seeds}
        for metric in RUN_METRICS:
            both = [(a.metrics[metric], b.metrics[metric]) for a, b in pairs]
            both = [(a, b) for a, b in both if a is not None and b is not None]
            paired[other][metric] = paired_difference([a for a, _ in both], [b for _, b in both])
        per_class[other] = _per_class(pairs)
        verdicts += [verdict(m, other, baseline, paired[other][m]) for m in ("mAP", "best_mAP")]
        for metric in ("step_loss_noise", "map_change_sd"):
            verdicts.append(verdict(metric, other, baseline, paired[other][metric]))
    if len(losses) == 1:
        verdicts.append(f"only one loss ({label(baseline)}): nothing to compare")

    return {
        "baseline": baseline,
        "losses": losses,
        "labels": {loss: label(loss) for loss in losses},
        "noise_window": noise_window,
        "confidence": CONFIDENCE,
        "significance": SIGNIFICANCE,
        "runs": [
            _run_summary(run)
            for run in sorted(runs, key=lambda run: (run.seed, losses.index(run.loss)))
        ],
        "per_loss": per_loss,
        "paired": paired,
        "per_class": per_class,
        "verdicts": verdicts,
        "checks": _pairing_checks(by_key, losses),
    }


def write_report(
    run_dirs: Sequence[Path],
    out: Path,
    baseline: str | None = None,
    noise_window: int = NOISE_WINDOW,
) -> dict:
    """Loads runs, compares them and writes every output file into `out`.

    Returns:
        The report dict (also report.json) with "markdown" added.
    """
    runs = [load_run(directory, noise_window) for directory in run_dirs]
    if not runs:
        raise ReportError("no runs to compare")
    report = compare(runs, baseline, noise_window)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    # Plots first: the Markdown embeds what was drawn.
    report["plots"] = _plots(runs, report, out)
    _write_csvs(report, out)
    markdown = _markdown_report(report)
    (out / "report.md").write_text(markdown)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    report["markdown"] = markdown
    return report


# --- tables -------------------------------------------------------------------------------------


def _markdown_report(report: dict) -> str:
    base = report["baseline"]
    others = report["losses"][1:]
    title = " vs ".join(label(loss) for loss in others + [base])  # "FGL vs FL"
    seeds = sorted({run["seed"] for run in report["runs"]})
    lines = [
        f"# Comparison: {title}",
        "",
        f"{len(report['runs'])} runs, seeds {', '.join(map(str, seeds))}; differences are "
        f"other - {label(base)} per seed, with 95% t intervals and paired t-tests "
        f"(scipy.stats.ttest_rel, two-sided, significance {SIGNIFICANCE}).",
        "",
        "## Verdict",
        "",
        *[f"- {sentence}" for sentence in report["verdicts"]],
        "",
        "## Runs and budget",
        "",
        _runs_table(report),
        "",
        "## Per loss over seeds",
        "",
        "mean ± sd (sample sd, n-1), then the value of each seed.",
        "",
        _per_loss_table(report),
        "",
        "## Paired differences",
        "",
        _paired_table(report),
        "",
        "## Per-class AP (VOC area)",
        "",
    ]
    for other in others:
        lines += [per_class_markdown(report, other), ""]
    lines += [
        "## Training noise",
        "",
        f"Per run: the sd of the per-step classification loss around its centered moving "
        f"average over {report['noise_window']} steps (steps.csv), and the sd of the changes "
        f"of validation mAP from one epoch to the next (needs 3 epochs). Both are compared "
        f"between losses in the tables above, like mAP.",
        "",
        "## Plots",
        "",
    ]
    for plot in report["plots"]:
        lines += [f"![{plot['caption']}]({plot['file']})", "", f"*{plot['caption']}*", ""]
    lines += ["## Checks", ""] + [f"- {check}" for check in report["checks"]] + [""]
    return "\n".join(lines)


def _runs_table(report: dict) -> str:
    header = ["run", "loss", "seed", "epochs", "processes", "global batch", "scaled LR",
              "images seen", "wall time (s)", "final mAP", "best mAP", "mAP 11pt",
              "COCO AP"]  # fmt: skip
    rows = []
    for run in report["runs"]:
        budget, metrics = run["budget"], run["metrics"]
        rows.append(
            [run["name"], label(run["loss"]), str(run["seed"]), str(budget["epochs"]),
             str(budget["processes"]), str(budget["global_batch"]), f"{budget['scaled_lr']:g}",
             str(budget["images_seen"]), _num(budget["train_seconds"], 1)]
            + [_num(metrics[key]) for key in ("mAP", "best_mAP", "mAP_11point", "coco_AP")]
        )  # fmt: skip
    return _table(header, rows)


def _per_loss_table(report: dict) -> str:
    header = ["metric"] + [label(loss) for loss in report["losses"]]
    rows = []
    for metric, name in RUN_METRICS.items():
        row = [name]
        for loss in report["losses"]:
            entry = report["per_loss"][loss][metric]
            seeds = ", ".join(f"s{seed} {_num(v)}" for seed, v in entry["values"].items())
            spread = f" ± {entry['sd']:.4f}" if entry["sd"] is not None else ""
            row.append(f"{_num(entry['mean'])}{spread} ({seeds})")
        rows.append(row)
    return _table(header, rows)


def _paired_table(report: dict) -> str:
    header = ["metric", "difference", "n", "mean", "sd", "95% CI", "t", "p", "note"]
    rows = []
    for other in report["losses"][1:]:
        for metric, name in RUN_METRICS.items():
            entry = report["paired"][other][metric]
            rows.append(
                [name, f"{label(other)} - {label(report['baseline'])}", str(entry["n"]),
                 _num(entry["mean"], signed=True), _num(entry["sd"]), _interval(entry),
                 _num(entry["t"], 3), _num(entry["p"], 3), entry["note"]]
            )  # fmt: skip
    return _table(header, rows)


def per_class_markdown(report: dict, other: str) -> str:
    """Per-class AP of the baseline and `other`, their paired difference and interval."""
    base = report["baseline"]
    header = ["class", label(base), label(other), f"{label(other)} - {label(base)}", "95% CI",
              "p", "n"]  # fmt: skip
    rows = []
    for name, entry in report["per_class"][other].items():
        rows.append(
            [name, _num(entry["baseline_mean"]), _num(entry["other_mean"]),
             _num(entry["mean"], signed=True), _interval(entry), _num(entry["p"], 3),
             str(entry["n"])]
        )  # fmt: skip
    return _table(header, rows)


def _write_csvs(report: dict, out: Path) -> None:
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        budget_keys = ["epochs", "processes", "global_batch", "scaled_lr", "images_seen",
                       "train_seconds"]  # fmt: skip
        writer.writerow(["run", "loss", "seed", *budget_keys, *RUN_METRICS])
        for run in report["runs"]:
            writer.writerow(
                [run["name"], run["loss"], run["seed"]]
                + [run["budget"][key] for key in budget_keys]
                + [_csv(run["metrics"][key]) for key in RUN_METRICS]
            )
    stat_keys = ["n", "mean", "sd", "ci_low", "ci_high", "t", "p", "note"]
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "loss", "baseline", *stat_keys])
        for other in report["losses"][1:]:
            for metric in RUN_METRICS:
                entry = report["paired"][other][metric]
                writer.writerow(
                    [metric, other, report["baseline"]] + [_csv(entry[k]) for k in stat_keys]
                )
    with open(out / "per_class.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "loss", "baseline", "baseline_mean", "other_mean", *stat_keys])
        for other in report["losses"][1:]:
            for name, entry in report["per_class"][other].items():
                writer.writerow(
                    [name, other, report["baseline"], _csv(entry["baseline_mean"]),
                     _csv(entry["other_mean"])] + [_csv(entry[k]) for k in stat_keys]
                )  # fmt: skip


# --- plots --------------------------------------------------------------------------------------


def _plots(runs: Sequence[RunRecord], report: dict, out: Path) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plots = []
    losses = report["losses"]
    colors = {loss: f"C{i}" for i, loss in enumerate(losses)}

    def save(figure, file: str, caption: str) -> None:
        figure.tight_layout()
        figure.savefig(out / file, dpi=110)
        plt.close(figure)
        plots.append({"file": file, "caption": caption})

    # mAP per epoch: mean over seeds, a band of one sd, each seed as a thin line.
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for loss in losses:
        _curve(axis, [r for r in runs if r.loss == loss], "mAP", label(loss), colors[loss])
    axis.set(xlabel="epoch", ylabel="validation mAP (VOC area)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.legend()
    save(figure, "map_vs_epoch.png", "Validation mAP per epoch: mean over seeds, band ± 1 sd "
         "(no band with one seed), thin lines per seed")  # fmt: skip

    # Training losses per epoch.
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key in zip(axes, ("classification_loss", "regression_loss")):
        for loss in losses:
            _curve(axis, [r for r in runs if r.loss == loss], key, label(loss), colors[loss])
        axis.set(xlabel="epoch", ylabel=key.replace("_", " "), yscale="log")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend()
    save(figure, "loss_curves.png", "Training classification and regression loss per epoch "
         "(mean over seeds, band ± 1 sd)")  # fmt: skip

    # Per-class AP difference with its interval.
    for other in losses[1:]:
        entries = report["per_class"][other]
        names = list(entries)
        means = [entries[n]["mean"] if entries[n]["mean"] is not None else 0.0 for n in names]
        low = [m - (entries[n]["ci_low"] if entries[n]["ci_low"] is not None else m)
               for m, n in zip(means, names)]  # fmt: skip
        high = [(entries[n]["ci_high"] if entries[n]["ci_high"] is not None else m) - m
                for m, n in zip(means, names)]  # fmt: skip
        figure, axis = plt.subplots(figsize=(max(5.0, 0.45 * len(names) + 2), 4))
        axis.bar(range(len(names)), means, color=colors[other], yerr=[low, high], capsize=3)
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(names)), names, rotation=60, ha="right")
        axis.set_ylabel(f"AP {label(other)} - {label(report['baseline'])}")
        file = f"per_class_difference_{other}.png"
        caption = (
            f"Per-class AP difference {label(other)} - {label(report['baseline'])}, mean over "
            f"seeds with 95% interval (none at n=1)"
        )
        save(figure, file, caption)

    plots += _run_csv_plots(runs, out, plt)
    return plots


def _run_csv_plots(runs: Sequence[RunRecord], out: Path, plt) -> list[dict]:
    """Plots registered in RUN_CSV_PLOTS for the per-run CSV files that exist."""
    plots = []
    for filename, plotter in RUN_CSV_PLOTS.items():
        present = {}
        for run in runs:
            path = run.directory / filename
            if path.is_file():
                with open(path, newline="") as f:
                    present[run.name] = (run, list(csv.DictReader(f)))
        if not present:
            continue
        figure = plotter(present)
        if figure is None:
            continue
        file = f"{Path(filename).stem}.png"
        if figure.get_layout_engine() is None:
            figure.tight_layout()
        figure.savefig(out / file, dpi=110)
        plt.close(figure)
        plots.append({"file": file, "caption": f"{filename} of {len(present)} runs"})
    return plots


def _curve(axis, runs: Sequence[RunRecord], key: str, name: str, color: str) -> None:
    series = [[row.get(key) for row in run.results["history"]] for run in runs]
    series = [[np.nan if v is None else v for v in values] for values in series]
    if not series:
        return
    length = min(len(values) for values in series)
    table = np.array([values[:length] for values in series], dtype=float)
    epochs = np.arange(1, length + 1)
    for values in table:
        axis.plot(epochs, values, color=color, linewidth=0.6, alpha=0.4)
    mean = np.nanmean(table, axis=0)
    axis.plot(epochs, mean, color=color, linewidth=2, label=f"{name} (n={len(runs)})", marker="o")
    if len(table) >= 2:
        sd = np.nanstd(table, axis=0, ddof=1)
        axis.fill_between(epochs, mean - sd, mean + sd, color=color, alpha=0.2)


# --- helpers ------------------------------------------------------------------------------------


def _per_class(pairs: Sequence[tuple[RunRecord, RunRecord]]) -> dict:
    classes = [c for pair in pairs for run in pair for c in run.results["per_class"]]
    classes = list(dict.fromkeys(classes))
    table = {}
    for name in classes:
        both = [
            (a.results["per_class"].get(name), b.results["per_class"].get(name)) for a, b in pairs
        ]
        both = [(a, b) for a, b in both if a is not None and b is not None]
        entry = paired_difference([a for a, _ in both], [b for _, b in both])
        entry["baseline_mean"] = describe([a for a, _ in both])["mean"]
        entry["other_mean"] = describe([b for _, b in both])["mean"]
        table[name] = entry
    return table


def _run_summary(run: RunRecord) -> dict:
    results = run.results
    return {
        "name": run.name,
        "directory": str(run.directory),
        "loss": run.loss,
        "seed": run.seed,
        "metrics": run.metrics,
        "budget": {
            "epochs": results.get("epochs"),
            "processes": results.get("processes"),
            "global_batch": results.get("global_batch"),
            "scaled_lr": results.get("scaled_lr"),
            "images_seen": results.get("images_seen"),
            "train_seconds": results.get("train_seconds"),
        },
        "initial_weights_checksum": run.initial_checksum,
        "steps_recorded": None if run.steps is None else int(len(run.steps)),
    }


def _pairing_checks(by_key: dict, losses: list[str]) -> list[str]:
    """Sentences on whether the pairs differ only in the loss."""
    checks = []
    for seed in sorted({seed for _, seed in by_key}):
        group = [by_key[(loss, seed)] for loss in losses if (loss, seed) in by_key]
        if len(group) < 2:
            checks.append(f"seed {seed}: only {group[0].name}; not paired")
            continue
        first = group[0]
        for run in group[1:]:
            differences = _config_differences(first.config, run.config)
            if differences:
                checks.append(
                    f"seed {seed}: WARNING {run.name} differs from {first.name} in "
                    f"{', '.join(differences)}: the loss is not the only difference"
                )
        # Equal budgets: a different process count changes the global batch and the LR.
        budgets = {(run.results.get("global_batch"), run.results.get("images_seen"),
                    run.results.get("scaled_lr")) for run in group}  # fmt: skip
        if len(budgets) > 1:
            checks.append(
                f"seed {seed}: WARNING the budgets differ (global batch, images seen, scaled LR: "
                f"{', '.join(map(str, sorted(budgets, key=str)))})"
            )
        sums = {run.initial_checksum for run in group}
        if None in sums:
            checks.append(f"seed {seed}: initial weights not recorded in every log.txt")
        elif len(sums) == 1:
            checks.append(f"seed {seed}: same config but the loss, same initial weights "
                          f"({first.initial_checksum[:12]})")  # fmt: skip
        else:
            checks.append(f"seed {seed}: WARNING initial weights differ between the losses")
    if any(run.metrics["coco_AP"] is None for run in by_key.values()):
        checks.append("COCO AP missing for some runs (trained before it was recorded; "
                      "fgl-evaluate RUN computes it)")  # fmt: skip
    if any(run.steps is None for run in by_key.values()):
        checks.append("steps.csv missing for some runs: no per-step noise for them")
    return checks


def _config_differences(first: dict, second: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(first) | set(second)):
        a, b = first.get(key), second.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _config_differences(a, b, dotted + ".")
        elif a != b and dotted not in PAIR_KEYS and dotted != "train.seed":
            keys.append(dotted)
    return keys


def _read_steps(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    values = [float(row["classification_loss"]) for row in rows if row.get("classification_loss")]
    return np.asarray(values, dtype=float)


def _interval(entry: dict) -> str:
    if entry["ci_low"] is None:
        return "n/a"
    return f"{entry['ci_low']:+.4f} to {entry['ci_high']:+.4f}"


def _num(value, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _csv(value):
    return "" if value is None else value


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|:---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
