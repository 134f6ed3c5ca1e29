"""The comparison report: statistics against hand-computed values, then fgl-compare end to end
on synthetic run directories (no training, no TensorFlow)."""

import csv
import json
import math

import numpy as np
import pytest
import yaml

from fgl_retinanet import cli, report
from fgl_retinanet.config import load_config

# --- statistics on hand-computed numbers --------------------------------------------------------


def test_paired_difference_matches_the_t_formulas():
    # Differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t = 0.2 / (0.1 / sqrt 3) = 2 sqrt 3, df 2.
    # With 2 degrees of freedom the t distribution has closed forms: two-sided
    # p = 1 - |t| / sqrt(t^2 + 2), and the 97.5% quantile q solves q / sqrt(q^2 + 2) = 0.95,
    # so q^2 = 2 x 0.95^2 / (1 - 0.95^2).
    result = report.paired_difference([0.5, 0.5, 0.5], [0.6, 0.7, 0.8])
    t = 2 * math.sqrt(3)
    q = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))
    half_width = q * 0.1 / math.sqrt(3)
    assert result["n"] == 3
    assert result["differences"] == pytest.approx([0.1, 0.2, 0.3])
    assert result["mean"] == pytest.approx(0.2)
    assert result["sd"] == pytest.approx(0.1)
    assert result["t"] == pytest.approx(t)
    assert result["p"] == pytest.approx(1 - t / math.sqrt(t**2 + 2))  # 0.07418
    assert q == pytest.approx(4.302653, abs=1e-6)
    assert result["ci_low"] == pytest.approx(0.2 - half_width)  # -0.0484
    assert result["ci_high"] == pytest.approx(0.2 + half_width)  # 0.4484
    assert result["note"] == ""
    # The sign follows "other - baseline".
    flipped = report.paired_difference([0.6, 0.7, 0.8], [0.5, 0.5, 0.5])
    assert flipped["mean"] == pytest.approx(-0.2) and flipped["p"] == pytest.approx(result["p"])


def test_one_seed_or_no_spread_gives_no_interval_and_no_test():
    single = report.paired_difference([0.905], [0.665])
    assert single["mean"] == pytest.approx(-0.24)
    assert single["sd"] is single["ci_low"] is single["p"] is None
    assert single["note"] == "n=1: no interval and no test"
    sentence = report.verdict("mAP", "focal_gradient", "focal", single)
    assert "FGL - FL = -0.2400" in sentence and "n=1" in sentence and "no test" in sentence

    same = report.paired_difference([0.5, 0.6], [0.6, 0.7])
    assert same["mean"] == pytest.approx(0.1) and same["p"] is None
    assert "all 2 differences are equal" in same["note"]
    assert report.paired_difference([], [])["note"] == "no pair with both values"


def test_verdict_sentences_follow_the_numbers():
    # Differences -0.05, -0.06, -0.04: t = -0.05 / (0.01 / sqrt 3) = -8.66, p = 0.0131 < 0.05.
    clear = report.paired_difference([0.70, 0.72, 0.71], [0.65, 0.66, 0.67])
    assert clear["p"] == pytest.approx(1 - 8.660254 / math.sqrt(8.660254**2 + 2), rel=1e-5)
    sentence = report.verdict("mAP", "focal_gradient", "focal", clear)
    assert sentence.startswith("final mAP (VOC area): FGL is significantly lower than FL at n=3")
    assert "p = 0.0131" in sentence

    # The same mean with a large spread is not significant.
    noisy = report.paired_difference([0.70, 0.72, 0.71], [0.55, 0.76, 0.67])
    assert noisy["p"] > 0.05
    assert "no significant difference at n=3" in report.verdict(
        "mAP", "focal_gradient", "focal", noisy
    )


def test_describe_uses_the_sample_standard_deviation():
    assert report.describe([1.0, 2.0, 3.0, 4.0]) == pytest.approx(
        {"n": 4, "mean": 2.5, "sd": math.sqrt(5 / 3)}
    )
    assert report.describe([0.3, None]) == {"n": 1, "mean": 0.3, "sd": None}


def test_detrended_noise_removes_the_trend_and_keeps_the_noise():
    # A linear trend plus a pattern that sums to zero over the window: the moving average is
    # exactly the trend, so the residuals are the pattern. 24 steps, window 5: 20 residuals,
    # four periods of (2, -1, 0, 1, -2) in some rotation: mean 0, sum of squares 40.
    pattern = np.array([2.0, -1.0, 0.0, 1.0, -2.0])
    steps = np.arange(24)
    series = 3.0 - 0.1 * steps + np.resize(pattern, 24)
    assert report.detrended_noise(series, window=5) == pytest.approx(math.sqrt(40 / 19))
    # The trend alone has no noise at all, however steep.
    assert report.detrended_noise(10 - 0.5 * steps, window=5) == pytest.approx(0.0, abs=1e-12)
    assert report.detrended_noise(series[:5], window=5) is None
    with pytest.raises(ValueError, match="odd"):
        report.detrended_noise(series, window=4)


def test_change_noise_is_the_sd_of_epoch_to_epoch_changes():
    # Changes 0.2, 0.1, 0.3: sd 0.1.
    assert report.change_noise([0.1, 0.3, 0.4, 0.7]) == pytest.approx(0.1)
    assert report.change_noise([0.1, 0.2]) is None


# --- reports from synthetic run directories -----------------------------------------------------

CLASSES = ["circle", "square", "triangle"]
# (loss, seed) -> final per-class AP; best mAP and the history are derived from it.
AP = {
    ("focal", 0): [0.80, 0.90, 0.95],
    ("focal", 1): [0.78, 0.88, 0.97],
    ("focal", 2): [0.82, 0.91, 0.96],
    ("focal_gradient", 0): [0.70, 0.86, 0.90],
    ("focal_gradient", 1): [0.75, 0.80, 0.92],
    ("focal_gradient", 2): [0.71, 0.85, 0.93],
}


def make_run(root, loss, seed, overrides=(), checksum=None, steps=40):
    """A run directory as fgl-train writes it, with made-up numbers."""
    name = f"{loss}_seed{seed}"
    run = root / name
    (run / "snapshots").mkdir(parents=True)
    config = load_config(
        "configs/demo_base.yaml",
        [f"loss.name={loss}", f"train.seed={seed}", f"train.run_name={name}", *overrides],
    )
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    per_class = dict(zip(CLASSES, AP[(loss, seed)]))
    final = float(np.mean(list(per_class.values())))
    maps = [final - 0.2, final + 0.01, final - 0.01, final]
    history = [
        {"epoch": e + 1, "mAP": m, "classification_loss": 1.0 / (e + 1),
         "regression_loss": 2.0 / (e + 1), "loss": 3.0 / (e + 1)}
        for e, m in enumerate(maps)
    ]  # fmt: skip
    results = {
        "run": name, "loss": loss, "epochs": 4, "processes": 1, "global_batch": 8,
        "scaled_lr": 0.001, "images_seen": 1920, "mAP": final, "per_class": per_class,
        "mAP_11point": final - 0.01, "coco_AP": final / 2, "best_mAP": max(maps),
        "history": history, "train_seconds": 12.5,
    }  # fmt: skip
    (run / "results.json").write_text(json.dumps(results))
    # Per-step loss: a decaying trend plus seeded noise whose size depends on the loss.
    rng = np.random.default_rng(seed)
    scale = 0.05 if loss == "focal" else 0.08
    values = 1.0 / (1 + 0.1 * np.arange(steps)) + rng.normal(0, scale, steps)
    with open(run / "steps.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "loss", "regression_loss", "classification_loss"])
        writer.writerows([1, i + 1, 0, 0, v] for i, v in enumerate(values))
    checksum = checksum or f"{seed:040x}"
    (run / "log.txt").write_text(f"[00:00:00 rank 0] checksum of the initial weights {checksum}\n")
    return run


@pytest.fixture()
def six_runs(tmp_path):
    root = tmp_path / "runs"
    for loss, seed in AP:
        make_run(root, loss, seed)
    return root


def test_compare_writes_every_output_with_the_runs_numbers(six_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.compare_main([str(six_runs), "--out", str(out), "--noise-window", "5"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["baseline"] == "focal" and data["losses"] == ["focal", "focal_gradient"]

    # Per loss: mean and sd of the runs' own final mAP, and each seed's value.
    for loss in ("focal", "focal_gradient"):
        finals = [np.mean(AP[(loss, seed)]) for seed in range(3)]
        entry = data["per_loss"][loss]["mAP"]
        assert entry["mean"] == pytest.approx(np.mean(finals))
        assert entry["sd"] == pytest.approx(np.std(finals, ddof=1))
        assert entry["values"] == pytest.approx({str(s): v for s, v in enumerate(finals)})

    # Paired over seeds, FGL - FL, with the test scipy gives for those numbers.
    from scipy import stats

    fl = [np.mean(AP[("focal", s)]) for s in range(3)]
    fgl = [np.mean(AP[("focal_gradient", s)]) for s in range(3)]
    paired = data["paired"]["focal_gradient"]["mAP"]
    assert paired["differences"] == pytest.approx(np.subtract(fgl, fl))
    assert paired["p"] == pytest.approx(stats.ttest_rel(fgl, fl).pvalue)
    assert paired["ci_low"] < paired["mean"] < paired["ci_high"] < 0
    coco = data["paired"]["focal_gradient"]["coco_AP"]
    assert coco["mean"] == pytest.approx(np.mean(np.subtract(fgl, fl)) / 2)

    # Per class: the seed differences of that class.
    circle = data["per_class"]["focal_gradient"]["circle"]
    assert circle["differences"] == pytest.approx([-0.10, -0.03, -0.11])
    assert circle["baseline_mean"] == pytest.approx(0.80)

    # Noise: step noise from steps.csv, mAP-change sd from the history (changes of all runs
    # are +0.21, -0.02, +0.01: sd 0.1274).
    noise = data["per_loss"]["focal_gradient"]["step_loss_noise"]
    assert noise["mean"] > data["per_loss"]["focal"]["step_loss_noise"]["mean"]
    changes = data["per_loss"]["focal"]["map_change_sd"]
    assert changes["mean"] == pytest.approx(np.std([0.21, -0.02, 0.01], ddof=1))

    # The budget of every run is in the table; the verdict names n.
    markdown = (out / "report.md").read_text()
    assert "| focal_seed0 | FL | 0 | 4 | 1 | 8 | 0.001 | 1920 | 12.5 |" in markdown
    assert "FGL is significantly lower than FL at n=3" in markdown
    assert "seed 2: same config but the loss, same initial weights" in markdown

    # Plots exist and are embedded; the CSVs hold the same numbers.
    for plot in ("map_vs_epoch.png", "loss_curves.png", "per_class_difference_focal_gradient.png"):
        assert (out / plot).stat().st_size > 5000
        assert f"]({plot})" in markdown
    with open(out / "runs.csv") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    expected = np.mean(AP[("focal_gradient", 1)])
    assert float(rows["focal_gradient_seed1"]["mAP"]) == pytest.approx(expected)
    with open(out / "comparison.csv") as f:
        rows = {row["metric"]: row for row in csv.DictReader(f)}
    assert float(rows["mAP"]["p"]) == pytest.approx(paired["p"])
    with open(out / "per_class.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    printed = capsys.readouterr().out
    assert "| circle |" in printed and "significantly lower" in printed


def test_one_seed_report_says_it_cannot_decide(tmp_path):
    root = tmp_path / "runs"
    runs = [make_run(root, "focal", 0), make_run(root, "focal_gradient", 0)]
    result = report.write_report(runs, tmp_path / "out")
    assert result["paired"]["focal_gradient"]["mAP"]["note"] == "n=1: no interval and no test"
    assert "with n=1 there is no interval and no test" in result["markdown"]
    assert "| n/a |" in report.per_class_markdown(result, "focal_gradient")


def test_pairs_that_differ_in_more_than_the_loss_are_flagged(tmp_path):
    root = tmp_path / "runs"
    runs = [
        make_run(root, "focal", 0),
        make_run(root, "focal_gradient", 0, ["loss.gamma=1"], checksum="f" * 40),
    ]
    checks = report.write_report(runs, tmp_path / "out")["checks"]
    assert any("differs from focal_seed0 in loss.gamma" in check for check in checks)
    assert any("initial weights differ" in check for check in checks)
    assert not any("budgets differ" in check for check in checks)

    # A run with two processes has another global batch: flagged too.
    results = json.loads((runs[1] / "results.json").read_text())
    results["global_batch"] = 16
    (runs[1] / "results.json").write_text(json.dumps(results))
    checks = report.write_report(runs, tmp_path / "out")["checks"]
    assert any("seed 0: WARNING the budgets differ" in check for check in checks)


def test_bad_inputs_fail_with_one_line(tmp_path, capsys):
    assert cli.compare_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.compare_main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no results.json" in capsys.readouterr().err
    root = tmp_path / "runs"
    make_run(root, "focal", 0)
    twin = make_run(tmp_path / "other", "focal", 0)
    assert cli.compare_main([str(root / "focal_seed0"), str(twin), "--out", str(tmp_path)]) == 2
    assert "two runs of loss focal with seed 0" in capsys.readouterr().err
    assert cli.compare_main([str(root), "--baseline", "nope", "--out", str(tmp_path)]) == 2
    assert "baseline loss 'nope'" in capsys.readouterr().err


def test_registered_per_run_csv_plots_are_drawn_and_embedded(six_runs, tmp_path, monkeypatch):
    # The hook for optional per-run files such as diagnostics.csv.
    import matplotlib.pyplot as plt

    (six_runs / "focal_seed0" / "diagnostics.csv").write_text("step,value\n1,0.5\n2,0.25\n")
    (six_runs / "focal_gradient_seed0" / "diagnostics.csv").write_text("step,value\n1,0.4\n")
    seen = {}

    def plot(present):
        seen.update({name: rows for name, (run, rows) in present.items()})
        figure, axis = plt.subplots()
        for name, (run, rows) in present.items():
            axis.plot([float(r["value"]) for r in rows], label=name)
        return figure

    monkeypatch.setattr(report, "RUN_CSV_PLOTS", {})
    report.register_run_csv_plot("diagnostics.csv")(plot)
    result = report.write_report(report.find_runs([six_runs]), tmp_path / "out")
    assert seen == {
        "focal_seed0": [{"step": "1", "value": "0.5"}, {"step": "2", "value": "0.25"}],
        "focal_gradient_seed0": [{"step": "1", "value": "0.4"}],
    }
    assert (tmp_path / "out" / "diagnostics.png").is_file()
    assert "](diagnostics.png)" in result["markdown"]


def test_gradient_diagnostics_are_plotted_per_loss(six_runs, tmp_path):
    # The registered diagnostics.csv plotter: one column per loss, the seeds of a loss banded.
    import csv

    from fgl_retinanet import analysis

    rng = np.random.default_rng(0)
    for name in ("focal_seed0", "focal_seed1", "focal_gradient_seed0"):
        with open(six_runs / name / "diagnostics.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(analysis.DIAGNOSTIC_COLUMNS)
            for step in range(1, 41, 10):
                values = rng.uniform(0.1, 1, len(analysis.DIAGNOSTIC_COLUMNS) - 2)
                writer.writerow([1, step, *values])
    result = report.write_report(report.find_runs([six_runs]), tmp_path / "out")
    png = tmp_path / "out" / "diagnostics.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "](diagnostics.png)" in result["markdown"]
    # Two loss columns side by side: wider than tall per column (5 in per column at 110 dpi).
    from PIL import Image

    assert Image.open(png).size[0] == pytest.approx(2 * 5.0 * 110, abs=2)


def test_a_single_loss_is_described_but_not_compared(tmp_path):
    root = tmp_path / "runs"
    runs = [make_run(root, "focal", 0), make_run(root, "focal", 1)]
    result = report.write_report(runs, tmp_path / "out")
    assert result["verdicts"] == ["only one loss (FL): nothing to compare"]
    finals = [np.mean(AP[("focal", seed)]) for seed in (0, 1)]
    assert result["per_loss"]["focal"]["mAP"]["sd"] == pytest.approx(np.std(finals, ddof=1))
