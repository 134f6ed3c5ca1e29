"""The fgl-train and fgl-demo entry points, driven through main() on tiny data."""

import csv
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import h5py
import pytest
import yaml

from fgl_retinanet import cli

TINY = [
    "data.toy.num_train=16",
    "data.toy.num_val=8",
    "train.epochs=1",
    "train.batch_size=8",
    "train.tensorboard=true",
]


def _read_metrics(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_train_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "runs"
    code = cli.train_main(
        ["--config", "configs/demo_fgl.yaml", *TINY, f"data.root={tmp_path / 'data'}",
         f"train.output_dir={out}", "train.base_lr=0.0005"]
    )  # fmt: skip
    assert code == 0
    run = out / "demo_fgl"

    # The resolved config is the one that ran, overrides included.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["loss"]["name"] == "focal_gradient"
    assert saved["train"]["base_lr"] == 0.0005

    # One metrics row per epoch, with the learning rate really applied and a real mAP.
    (row,) = _read_metrics(run)
    assert row["epoch"] == "1"
    assert float(row["lr"]) == pytest.approx(0.0005)
    assert 0.0 <= float(row["mAP"]) <= 1.0
    assert int(row["images_seen"]) == 16
    assert float(row["classification_loss"]) > 0

    results = json.loads((run / "results.json").read_text())
    assert results["loss"] == "focal_gradient"
    assert set(results["per_class"]) == {"circle", "square", "triangle"}
    assert results["mAP"] == pytest.approx(float(row["mAP"]))
    assert "| mAP |" in (run / "results.md").read_text()

    # Snapshot written whole, pointed to by latest.txt; TensorBoard events present.
    assert (run / "snapshots" / "latest.txt").read_text().strip() == "epoch_001"
    assert (run / "snapshots" / "epoch_001.optimizer.npz").is_file()
    state = json.loads((run / "snapshots" / "epoch_001.state.json").read_text())
    assert state["epoch"] == 1 and state["schedule"]["plateau_factor"] == 1.0
    with h5py.File(run / "snapshots" / "epoch_001.h5") as f:
        assert len(f.keys()) > 10
    assert not list((run / "snapshots").glob("*.partial"))
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert "learning rate 0.0005 applied" in (run / "log.txt").read_text()


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    # Random flips on (the demo's 0.5): 1 epoch, then --resume for the second, must give the
    # losses, step log and weights of 2 epochs in one go, bit for bit.
    common = [*TINY, f"data.root={tmp_path / 'data'}", "data.flip_chance=0.5"]
    whole = tmp_path / "whole"
    assert cli.train_main(
        ["--config", "configs/demo_focal.yaml", *common, "train.epochs=2",
         f"train.output_dir={whole}"]
    ) == 0  # fmt: skip
    out = tmp_path / "runs"
    assert cli.train_main(
        ["--config", "configs/demo_focal.yaml", *common, f"train.output_dir={out}"]
    ) == 0
    run = out / "demo_focal"
    # Two loader threads on resume (one before): which thread builds a batch must not matter.
    assert cli.train_main(["--resume", str(run), "train.epochs=2", "train.workers=2"]) == 0
    rows = _read_metrics(run)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert (run / "snapshots" / "epoch_002.h5").is_file()
    # The optimizer continued: Adam's iteration count after epoch 1 was 2 steps of 8 images.
    log = (run / "log.txt").read_text()
    assert "resumed from epoch_001 (epoch 1, optimizer iteration 2," in log

    expected = _read_metrics(whole / "demo_focal")
    columns = ("loss", "regression_loss", "classification_loss", "lr", "mAP")
    assert [[row[c] for c in columns] for row in rows] == [
        [row[c] for c in columns] for row in expected
    ]
    assert rows[0]["loss"] != rows[1]["loss"]
    history = [json.loads((r / "results.json").read_text())["history"]
               for r in (run, whole / "demo_focal")]  # fmt: skip
    assert [[e[c] for c in columns] for e in history[0]] == [
        [e[c] for c in columns] for e in history[1]
    ]
    steps = [(r / "steps.csv").read_text() for r in (run, whole / "demo_focal")]
    assert steps[0] == steps[1] and len(steps[0].splitlines()) == 1 + 4
    assert _final_checksum(run) == _final_checksum(whole / "demo_focal")


def _final_checksum(run):
    # The log holds one line per fgl-train call; the last is the finished run's.
    return re.findall(r"weights checksum (\w+)", (run / "log.txt").read_text())[-1]


def test_the_loss_scale_survives_a_snapshot():
    # Mixed precision: Keras leaves the dynamic loss scale out of the optimizer's weights.
    import tensorflow as tf

    from fgl_retinanet.train import loss_scale_state, restore_loss_scale

    def optimizer():
        return tf.keras.mixed_precision.LossScaleOptimizer(tf.keras.optimizers.legacy.Adam())

    trained = optimizer()
    assert loss_scale_state(trained) == {"scale": 2.0**15, "counter": 0}
    trained._loss_scale.current_loss_scale.assign(1024.0)
    trained.dynamic_counter.assign(17)
    state = json.loads(json.dumps(loss_scale_state(trained)))
    resumed = optimizer()
    restore_loss_scale(resumed, state)
    assert float(resumed.loss_scale) == 1024.0 and int(resumed.dynamic_counter) == 17
    # Full precision: nothing to save, and an old snapshot without the key restores nothing.
    assert loss_scale_state(tf.keras.optimizers.legacy.Adam()) is None
    restore_loss_scale(resumed, None)
    assert float(resumed.loss_scale) == 1024.0


def test_real_voc_sample_with_resnet50(voc_sample, tmp_path):
    # Genuine VOC XML and JPEGs through the ResNet-50 configuration (no weights, small images).
    out = tmp_path / "runs"
    code = cli.train_main(
        ["--config", "configs/voc2012_fgl.yaml", f"data.root={voc_sample}", "model.weights=none",
         "data.image_min_side=256", "data.image_max_side=384", "train.epochs=1",
         f"train.output_dir={out}", "train.run_name=voc_sample"]
    )  # fmt: skip
    assert code == 0
    run = out / "voc_sample"
    results = json.loads((run / "results.json").read_text())
    # The val split's 4 images hold aeroplane, car, chair, horse and person objects; classes
    # without ground truth there have undefined AP, not 0.
    defined = {name for name, ap in results["per_class"].items() if ap is not None}
    assert defined == {"aeroplane", "car", "chair", "horse", "person"}
    assert results["per_class"]["dog"] is None
    assert "Undefined AP" in (run / "results.md").read_text()
    assert len(_read_metrics(run)) == 1


def test_bad_config_fails_before_training(tmp_path, capsys):
    code = cli.train_main(["--config", "configs/voc2012_fgl.yaml", "data.root=/nonexistent"])
    assert code == 2
    assert "data.root" in capsys.readouterr().err
    code = cli.train_main(["--config", "configs/demo_fgl.yaml", "loss.name=focal_typo"])
    assert code == 2
    err = capsys.readouterr().err
    assert "focal_typo" in err and "focal_gradient" in err


@pytest.mark.slow
def test_demo_reaches_the_target_map(tmp_path, capsys):
    # The README's demo exactly as configured: both losses must learn the shapes.
    # It runs configs/experiments/demo.yaml through the experiment runner and its report.
    out = tmp_path / "demo"
    assert cli.demo_main(["--out", str(out)]) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    for run in report["runs"]:
        assert run["metrics"]["mAP"] >= 0.5, run
        assert (out / run["name"] / "metrics.csv").is_file()
    assert {run["name"] for run in report["runs"]} == {"focal_seed0", "focal_gradient_seed0"}
    assert "with n=1 there is no interval and no test" in (out / "report" / "report.md").read_text()
    assert "FGL - FL" in capsys.readouterr().out


def test_learning_rate_scaling_warmup_and_plateau():
    from fgl_retinanet.config import load_config
    from fgl_retinanet.train import LearningRateController

    config = load_config(
        None, ["train.base_lr=0.001", "train.warmup_epochs=1", "train.reduce_lr_patience=2"]
    )
    # Horovod, 2 processes, linear rule: ramp from 1e-3 to 2e-3 over the first epoch (4 steps).
    schedule = LearningRateController(config, world_size=2, steps_per_epoch=4)
    assert [schedule.rate(step) for step in range(6)] == pytest.approx(
        [0.001, 0.00125, 0.0015, 0.00175, 0.002, 0.002]
    )
    # Plateau: two epochs without improvement of the (rank-averaged) loss divide the rate by 10.
    import tensorflow as tf

    schedule.set_model(SimpleNamespace(optimizer=SimpleNamespace(learning_rate=tf.Variable(1e-3))))
    for epoch, loss in enumerate([1.0, 0.5, 0.6, 0.5]):
        schedule.on_epoch_end(epoch, {"loss": loss})
    assert schedule.state["plateau_factor"] == pytest.approx(0.1)
    assert schedule.rate(100) == pytest.approx(0.0002)
    # No scaling: the configured rate, whatever the process count.
    flat = LearningRateController(load_config(None, ["train.lr_scaling=none"]), 4, 10)
    assert flat.rate(0) == flat.rate(50) == pytest.approx(1e-5)


def test_weights_that_do_not_fit_are_refused(tmp_path, capsys):
    # Not HDF5 at all: one line, exit 1.
    args = ["--config", "configs/demo_fgl.yaml", *TINY, f"data.root={tmp_path / 'data'}",
            f"train.output_dir={tmp_path}"]  # fmt: skip
    assert cli.train_main([*args, "model.weights=README.md"]) == 1
    assert "cannot load weights from README.md" in capsys.readouterr().err

    # HDF5 weights of another model: nothing would load, so refuse instead of training randomly.
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["layer_names"] = [b"dense_1"]
        f.create_group("dense_1").attrs["weight_names"] = [b"dense_1/kernel:0"]
        f["dense_1"].create_dataset("dense_1/kernel:0", data=[[1.0]])
    assert cli.train_main([*args, f"model.weights={other}"]) == 1
    assert "no layer of the tiny model matches" in capsys.readouterr().err


def test_a_failed_run_records_why_in_its_log(tmp_path, capsys):
    # A data error after the run directory exists: one line on the console, the reason in log.txt,
    # and logging left as it was for the rest of the process.
    import logging

    root = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("a\n")
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><object><name>unicorn</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>"
    )
    import cv2
    import numpy as np

    cv2.imwrite(str(root / "JPEGImages" / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    code = cli.train_main(
        ["--config", "configs/voc2012_fgl.yaml", f"data.root={root}", "model.weights=none",
         f"train.output_dir={tmp_path}", "train.run_name=bad"]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("unicorn") == 1
    assert "stopped: DataError" in (tmp_path / "bad" / "log.txt").read_text()
    assert logging.getLogger("fgl_retinanet").propagate


@pytest.mark.parametrize("preset", [None, "false"])
def test_entry_points_give_tensorflow_the_bfc_cpu_allocator(preset):
    # What the CLIs set before TensorFlow starts: the BFC pool by default (allocator statistics
    # exist only for it), TensorFlow's own allocator when the user's environment says so.
    script = (
        "from fgl_retinanet.cli import _quiet_tensorflow\n"
        "_quiet_tensorflow()\n"
        "import tensorflow as tf\n"
        "tf.ones([1000]).numpy()\n"
        "try:\n"
        "    print('peak', tf.config.experimental.get_memory_info('CPU:0')['peak'])\n"
        "except ValueError:\n"
        "    print('no allocator statistics')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}
    if preset is not None:
        env["TF_CPU_ALLOCATOR_USE_BFC"] = preset
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    if preset is None:
        assert int(result.stdout.split("peak")[1]) >= 4000  # the 1000 float32 ones at least
    else:
        assert "no allocator statistics" in result.stdout
