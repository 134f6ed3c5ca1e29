"""fgl-experiment: the file schema, dry runs, run states, and a tiny experiment end to end with
an interruption and a rerun (marked slow)."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fgl_retinanet import cli, experiment
from fgl_retinanet.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write_experiment(tmp_path, **fields):
    content = {
        "config": str(REPO / "configs" / "demo_base.yaml"),
        "losses": ["focal", "focal_gradient"],
        "seeds": [0, 1],
        "output_dir": str(tmp_path / "out"),
    }
    content.update(fields)
    content = {key: value for key, value in content.items() if value is not None}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"lossses": ["focal"]}, "unknown experiment key 'lossses'"),
        ({"seeds": None}, "missing key 'seeds'"),
        ({"seeds": [0, "one"]}, "seeds must be a non-empty list of int"),
        ({"seeds": [1, 1]}, "seeds has duplicates"),
        ({"losses": []}, "losses must be a non-empty list of str"),
        ({"processes": 0}, "processes must be a positive integer"),
        ({"noise_window": 4}, "noise_window must be an odd positive integer"),
        ({"config": "missing.yaml"}, "missing.yaml not found"),
        ({"overrides": {"train.seed": 3}}, "train.seed is set by the runner"),
        ({"overrides": {"train.epoch": 3}}, "unknown config key train.epoch"),
        ({"overrides": {"train.epochs": "many"}}, "train.epochs must be int"),
        ({"overrides": ["train.epochs=1"]}, "overrides must be a mapping"),
    ],
)
def test_bad_experiment_files_fail_with_one_line(tmp_path, capsys, fields, message):
    path = write_experiment(tmp_path, **fields)
    assert cli.experiment_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_process_count_is_refused(tmp_path, capsys):
    assert cli.experiment_main([str(write_experiment(tmp_path)), "--np", "0"]) == 2
    assert "--np must be at least 1, got 0" in capsys.readouterr().err


def test_unknown_loss_is_refused_before_training(tmp_path, capsys):
    path = write_experiment(tmp_path, losses=["focal", "focal_gradiant"])
    assert cli.experiment_main([str(path)]) == 2
    assert "loss 'focal_gradiant' is not one of" in capsys.readouterr().err


def test_dry_run_prints_commands_and_budget(tmp_path, capsys):
    path = write_experiment(
        tmp_path, overrides={"data.toy.num_train": 100, "train.batch_size": 8, "train.epochs": 3}
    )
    assert cli.experiment_main([str(path), "--dry-run", "--np", "2"]) == 0
    out = capsys.readouterr().out
    # 100 images in global batches of 16: 7 steps, 112 images per epoch (padding included).
    budget = "budget: 4 runs x 3 epochs x 112 images = 1,344 images (global batch 16, 2 processes)"
    assert budget in out
    commands = [line.split() for line in out.splitlines() if "fgl_retinanet.cli" in line]
    assert len(commands) == 4
    first = commands[0]
    assert first[:5] == [first[0], "-np", "2", "-H", "localhost:2"] and "horovodrun" in first[0]
    assert "loss.name=focal" in first and "train.seed=0" in first
    assert "train.run_name=focal_seed0" in first and "data.toy.num_train=100" in first
    assert "loss.name=focal_gradient" in commands[1] and "train.seed=0" in commands[1]
    assert not (tmp_path / "out").exists()

    # One process: plain python -m, no horovodrun.
    assert cli.experiment_main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{sys.executable} -m fgl_retinanet.cli --config" in out and "horovodrun" not in out

    # Overrides may follow the options as well as precede them.
    assert cli.experiment_main([str(path), "--dry-run", "train.epochs=2", "--np", "1"]) == 0
    out = capsys.readouterr().out
    assert "x 2 epochs" in out and "train.epochs=2" in out


def test_voc_experiment_file_is_the_posts_setup():
    plan = experiment.load_experiment("configs/experiments/voc2012_gamma2.yaml")
    assert [(run.loss, run.seed) for run in plan.runs] == [
        (loss, seed) for seed in (0, 1, 2) for loss in ("focal", "focal_gradient")
    ]
    for run in plan.runs:
        config = run.config
        assert (config.data.train_split, config.data.val_split) == ("train", "val")
        assert config.model.backbone == "resnet50" and config.model.weights == "imagenet"
        assert (config.loss.gamma, config.train.epochs) == (2.0, 15)


def test_demo_experiment_resolves_to_the_demo_configs(tmp_path):
    # The demo keeps its numbers: each run's config is the old demo config but for its name
    # and output directory.
    plan = experiment.load_experiment("configs/experiments/demo.yaml", str(tmp_path))
    for run, old in zip(plan.runs, ("configs/demo_focal.yaml", "configs/demo_fgl.yaml")):
        new, reference = run.config.to_dict(), load_config(old).to_dict()
        for config in (new, reference):
            del config["train"]["run_name"], config["train"]["output_dir"]
        assert new == reference
        assert run.config.train.epochs == 16 and run.config.train.seed == 0


def test_survey_tells_new_interrupted_and_finished_runs(tmp_path):
    path = write_experiment(tmp_path, overrides={"train.epochs": 2})
    plan = experiment.load_experiment(str(path))
    finished, interrupted, started, _ = plan.runs
    for run, epochs in ((finished, 2), (interrupted, 1), (started, 0)):
        (run.directory / "snapshots").mkdir(parents=True)
        (run.directory / "config.yaml").write_text(yaml.safe_dump(run.config.to_dict()))
        if epochs:
            (run.directory / "snapshots" / "latest.txt").write_text(f"epoch_00{epochs}\n")
    (finished.directory / "results.json").write_text("{}")
    experiment.survey(plan)
    assert [run.state for run in plan.runs] == ["finished", "resume", "new", "new"]
    assert interrupted.epochs_done == 1
    assert "--resume" in experiment.command(interrupted, plan, 1)
    assert "remaining: 5 of 8 epochs" in experiment.format_plan(plan, 1)

    # A longer schedule resumes the finished run; another setup in the same tree is refused.
    longer = experiment.load_experiment(str(path), extra_overrides=["train.epochs=3"])
    experiment.survey(longer)
    assert longer.runs[0].state == "resume"
    other = experiment.load_experiment(str(path), extra_overrides=["loss.gamma=1"])
    with pytest.raises(ConfigError, match=r"another config \(loss.gamma: 2.0 -> 1.0\)"):
        experiment.survey(other)


def test_a_second_runner_on_the_same_tree_is_refused(tmp_path):
    plan = experiment.load_experiment(str(write_experiment(tmp_path)))
    plan.output_dir.mkdir(parents=True)
    held = experiment._lock(plan.output_dir)
    try:
        with pytest.raises(ConfigError, match="still working in"):
            experiment.run_experiment(plan, 1)
    finally:
        os.close(held)


# --- a tiny experiment, interrupted and resumed -------------------------------------------------

TINY = {
    "data.toy.num_train": 32,
    "data.toy.num_val": 8,
    "train.batch_size": 8,
    "train.epochs": 2,
    "train.tensorboard": False,
    # Untrained detectors score about the prior (0.01): keep their boxes so AP is not all 0.
    "eval.score_threshold": 0.001,
}


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_experiment_interrupted_resumed_and_reported(tmp_path, capfd):
    path = write_experiment(
        tmp_path, overrides={**TINY, "data.root": str(tmp_path / "data")}, noise_window=3
    )
    out = tmp_path / "out"
    names = ("focal_seed0", "focal_gradient_seed0", "focal_seed1", "focal_gradient_seed1")
    runs = {name: out / name for name in names}

    # Interrupt the runner (SIGTERM, as a scheduler would) during the third run's 2nd epoch.
    script = (
        f"import sys; from fgl_retinanet import cli; sys.exit(cli.experiment_main([{str(path)!r}]))"
    )
    runner = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        latest = runs["focal_seed1"] / "snapshots" / "latest.txt"
        deadline = time.time() + 400
        while not (latest.is_file() and latest.read_text().strip() == "epoch_001"):
            assert runner.poll() is None, runner.stdout.read()[-3000:]
            assert time.time() < deadline, "the third run never completed an epoch"
            time.sleep(0.05)
        (child,) = re.findall(r"\(pid (\d+),", (runs["focal_seed1"] / "log.txt").read_text())
        runner.send_signal(signal.SIGTERM)
        output, _ = runner.communicate(timeout=120)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 130, output[-3000:]
    assert "interrupted in focal_seed1 after epoch 1" in output
    with pytest.raises(ProcessLookupError):  # the training process went with the runner
        os.kill(int(child), 0)
    assert not (runs["focal_seed1"] / "results.json").exists(), "killed too late: run finished"
    assert not runs["focal_gradient_seed1"].exists()
    finished_at = {n: (runs[n] / "results.json").stat().st_mtime_ns for n in list(runs)[:2]}

    # The same command again: the first two are skipped, the third resumes, the fourth runs.
    capfd.readouterr()
    assert cli.experiment_main([str(path)]) == 0
    printed = capfd.readouterr().out
    assert "[1/4] focal_seed0: finished, skipped" in printed
    assert "[2/4] focal_gradient_seed0: finished, skipped" in printed
    assert "[3/4] focal_seed1: resuming after epoch 1" in printed
    assert "[4/4] focal_gradient_seed1: new" in printed
    assert finished_at == {n: (runs[n] / "results.json").stat().st_mtime_ns for n in finished_at}
    assert "resumed from epoch_001" in (runs["focal_seed1"] / "log.txt").read_text()

    # Nothing lost or doubled: every epoch and every step once, in order.
    for run in runs.values():
        assert [row["epoch"] for row in read_csv(run / "metrics.csv")] == ["1", "2"]
        steps = read_csv(run / "steps.csv")
        assert [int(row["step"]) for row in steps] == list(range(1, 9))
        assert [row["epoch"] for row in steps] == ["1"] * 4 + ["2"] * 4

    # Pairs share data order and initial weights: FL and FGL have the same value (only the
    # gradient differs), so the first step's losses agree; the seeds differ.
    checksums = {}
    for name, run in runs.items():
        log = (run / "log.txt").read_text()
        (checksums[name],) = re.findall(r"checksum of the initial weights (\w+)", log)
    assert checksums["focal_seed0"] == checksums["focal_gradient_seed0"]
    assert checksums["focal_seed1"] == checksums["focal_gradient_seed1"]
    assert checksums["focal_seed0"] != checksums["focal_seed1"]
    for seed in (0, 1):
        first = [read_csv(runs[f"{loss}_seed{seed}"] / "steps.csv")[0] for loss in
                 ("focal", "focal_gradient")]  # fmt: skip
        for column in ("classification_loss", "regression_loss"):
            assert float(first[0][column]) == pytest.approx(float(first[1][column]), rel=1e-6)
        second = [read_csv(runs[f"{loss}_seed{seed}"] / "steps.csv")[1] for loss in
                  ("focal", "focal_gradient")]  # fmt: skip
        assert second[0]["classification_loss"] != second[1]["classification_loss"]
    configs = [yaml.safe_load((run / "config.yaml").read_text()) for run in runs.values()]
    assert configs[0]["loss"]["name"] == "focal" and configs[1]["loss"]["name"] == "focal_gradient"
    configs[1]["loss"]["name"], configs[1]["train"]["run_name"] = "focal", "focal_seed0"
    assert configs[0] == configs[1]

    # The report's numbers are the runs' own.
    report = json.loads((out / "report" / "report.json").read_text())
    results = {name: json.loads((run / "results.json").read_text()) for name, run in runs.items()}
    by_name = {run["name"]: run for run in report["runs"]}
    for name, result in results.items():
        metrics = by_name[name]["metrics"]
        assert metrics["mAP"] == result["mAP"] and metrics["best_mAP"] == result["best_mAP"]
        assert metrics["mAP_11point"] == result["mAP_11point"]
        assert metrics["coco_AP"] == result["coco_AP"] is not None
        assert by_name[name]["budget"]["images_seen"] == result["images_seen"] == 64
        assert metrics["step_loss_noise"] > 0
    assert any(result["mAP"] > 0 for result in results.values())
    differences = [results[f"focal_gradient_seed{s}"]["mAP"] - results[f"focal_seed{s}"]["mAP"]
                   for s in (0, 1)]  # fmt: skip
    paired = report["paired"]["focal_gradient"]["mAP"]
    assert paired["differences"] == pytest.approx(differences) and paired["n"] == 2
    fl = report["per_loss"]["focal"]["mAP"]
    fl_maps = [results[f"focal_seed{s}"]["mAP"] for s in (0, 1)]
    assert fl["mean"] == pytest.approx(sum(fl_maps) / 2)
    markdown = (out / "report" / "report.md").read_text()
    assert "](map_vs_epoch.png)" in markdown and (out / "report" / "map_vs_epoch.png").is_file()
    assert "seed 1: same config but the loss, same initial weights" in markdown


@pytest.mark.horovod
def test_runs_go_through_horovodrun(tmp_path, capfd):
    # Two processes per run through the runner: the command line really works under horovodrun.
    overrides = {**TINY, "data.toy.num_train": 16, "train.epochs": 1,
                 "data.root": str(tmp_path / "data")}  # fmt: skip
    path = write_experiment(tmp_path, seeds=[0], overrides=overrides)
    assert cli.experiment_main([str(path), "--np", "2"]) == 0
    for name in ("focal_seed0", "focal_gradient_seed0"):
        results = json.loads((tmp_path / "out" / name / "results.json").read_text())
        assert results["processes"] == 2 and results["global_batch"] == 16
        assert (tmp_path / "out" / f"{name}.rank_logs" / "rank1.txt").is_file()
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert [run["budget"]["processes"] for run in report["runs"]] == [2, 2]
