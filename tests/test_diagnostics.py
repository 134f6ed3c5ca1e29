"""Tests for fgl_retinanet.diagnostics: statistics against numpy, the callback, wiring, plots."""

import csv
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from fgl_retinanet import analysis, cli
from fgl_retinanet.config import ConfigError, load_config
from fgl_retinanet.diagnostics import (
    STATISTICS,
    GradientDiagnostics,
    GradientProbe,
    _append_row,
    _keep_epochs_before,
    batch_statistics,
    gradient_diagnostics,
)
from fgl_retinanet.distributed import Context
from fgl_retinanet.losses import FocalGradientLoss, FocalLoss

ALPHA = 0.25


def _hand_batch():
    """One image, six anchors, two classes, covering every bin, saturation and an ignored anchor.

    Returns:
        y_true (1, 6, 3) and logits (1, 6, 2) float32.
    """
    states = [1, 0, -1, 0, 1, 1]
    labels = [[1, 0], [0, 0], [0, 0], [0, 0], [0, 1], [1, 0]]
    logits = [
        [2.0, -2.5],  # positive medium (p_t 0.88), negative easy (0.92)
        [0.1, -20.0],  # negative hard (0.48); negative easy and saturated (p = 2e-9)
        [np.nan, 100.0],  # ignored: must reach no statistic
        [1.0, -0.1],  # negative hard (0.27), negative medium (0.52)
        [-4.0, 3.0],  # negative easy (0.98), positive easy (0.95)
        [-1.0, 17.0],  # positive hard (0.27); negative hard and saturated (p = 1 - 4e-8)
    ]
    y_true = np.concatenate([np.array(labels), np.array(states)[:, None]], axis=1)[None]
    return y_true.astype(np.float32), np.array(logits, np.float32)[None]


def _numpy_statistics(y_true, logits, gamma, focal_gradient):
    """The diagnostics row straight from the definitions, in float64."""
    labels, states = y_true[0, :, :-1], y_true[0, :, -1]
    z = logits[0].astype(np.float64)
    valid = np.repeat((states != -1)[:, None], labels.shape[1], axis=1)
    z = np.where(valid, z, 0.0)
    positive = labels > 0.5
    p = 1.0 / (1.0 + np.exp(-z))
    p_t = np.where(positive, p, 1.0 - p)
    alpha_t = np.where(positive, ALPHA, 1 - ALPHA)
    fgl = alpha_t * (1 - p_t) ** (gamma + 1)
    residual = -alpha_t * gamma * p_t * (1 - p_t) ** gamma * np.log(p_t)
    normalizer = max((states == 1).sum(), 1)
    trained = (fgl if focal_gradient else fgl + residual) / normalizer
    bins = [p_t < 0.5, (p_t >= 0.5) & (p_t < 0.9), p_t >= 0.9]
    row = {}
    for side, mask in (("pos", positive), ("neg", ~positive)):
        for name, in_bin in zip(("hard", "medium", "easy"), bins):
            row[f"grad_{side}_{name}"] = trained[valid & mask & in_bin].sum()
            row[f"count_{side}_{name}"] = (valid & mask & in_bin).sum()
    row["grad_total"] = trained[valid].sum()
    row["residual_share"] = residual[valid].sum() / (fgl + residual)[valid].sum()
    row["saturated"] = (valid & ((p <= 1e-7) | (p >= 1 - 1e-7))).sum()
    row["num_positive"] = (states == 1).sum()
    row["normalizer"] = normalizer
    return row


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("loss_class", [FocalLoss, FocalGradientLoss])
def test_statistics_of_a_hand_made_batch_match_numpy(loss_class, gamma):
    y_true, logits = _hand_batch()
    loss = loss_class(alpha=ALPHA, gamma=gamma)
    row = dict(zip(STATISTICS, batch_statistics(loss, y_true, logits).numpy().tolist()))
    expected = _numpy_statistics(y_true, logits, gamma, loss_class is FocalGradientLoss)
    assert set(row) == set(expected)
    for name in STATISTICS:
        assert row[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name

    # Every bin is populated by construction; the ignored NaN reached nothing.
    counts = [row[f"count_{s}_{b}"] for s in ("pos", "neg") for b in analysis.P_T_BINS]
    assert counts == [1, 1, 1, 3, 1, 3]
    assert row["saturated"] == 2 and row["num_positive"] == 3
    assert np.isfinite(list(row.values())).all()
    if gamma == 0.0:
        assert row["residual_share"] == 0.0
    else:
        assert 0.05 < row["residual_share"] < 0.95


@pytest.mark.parametrize("loss_class", [FocalLoss, FocalGradientLoss])
def test_total_gradient_equals_the_losss_own_autodiff(loss_class):
    # A misplaced stop_gradient, or FL's statistics reported for an FGL run, would fail here.
    y_true, logits = _hand_batch()
    loss = loss_class(alpha=ALPHA, gamma=2.0)
    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        value = loss(y_true, variable)
    autodiff = np.abs(tape.gradient(value, variable).numpy()).sum()
    row = dict(zip(STATISTICS, batch_statistics(loss, y_true, logits).numpy()))
    assert row["grad_total"] == pytest.approx(autodiff, rel=1e-5)


@pytest.mark.parametrize("loss_class", [FocalLoss, FocalGradientLoss])
def test_probability_mode_matches_the_chain_rule_through_the_sigmoid(loss_class):
    # keras-retinanet's probability head: dL/dz = dL/dp * p (1 - p), and clipped (saturated)
    # probabilities get no gradient at all, which the statistics must show too.
    y_true, logits = _hand_batch()
    probabilities = tf.Variable(tf.sigmoid(logits))
    loss = loss_class(alpha=ALPHA, gamma=2.0, from_logits=False)
    with tf.GradientTape() as tape:
        value = loss(y_true, probabilities)
    p = probabilities.numpy()
    # The ignored anchor holds NaN; the loss gives it no gradient.
    chain = np.nan_to_num(tape.gradient(value, probabilities).numpy() * p * (1 - p))
    row = dict(zip(STATISTICS, batch_statistics(loss, y_true, probabilities).numpy()))
    assert row["grad_total"] == pytest.approx(np.abs(chain).sum(), rel=1e-4)
    assert row["saturated"] == 2
    logit_row = dict(zip(STATISTICS, batch_statistics(
        loss_class(alpha=ALPHA, gamma=2.0), y_true, logits
    ).numpy()))  # fmt: skip
    # Only the saturated elements differ between the two modes: the confidently wrong negative
    # (logit 17) keeps its full gradient alpha_t (1 - p_t)^3 / 3 positives = 0.25 from logits and
    # loses it to clipping from probabilities; the easy one (logit -20) had almost none.
    lost = logit_row["grad_total"] - row["grad_total"]
    assert lost == pytest.approx((1 - ALPHA) / 3, rel=1e-4)


def test_probe_keeps_value_and_gradient_and_records_only_when_flagged():
    y_true, logits = _hand_batch()
    loss = FocalLoss(alpha=ALPHA, gamma=2.0)
    probe = GradientProbe(loss)
    variable = tf.Variable(logits)
    with tf.GradientTape(persistent=True) as tape:
        plain = loss(y_true, variable)
        probed = probe(y_true, variable)
    assert float(probed) == float(plain)
    np.testing.assert_array_equal(
        tape.gradient(probed, variable).numpy(), tape.gradient(plain, variable).numpy()
    )
    assert not probe.statistics.numpy().any()

    # Flagged, inside tf.function as in model.fit, the row appears.
    probe.record.assign(True)
    tf.function(probe)(y_true, logits)
    expected = batch_statistics(loss, y_true, logits).numpy()
    np.testing.assert_allclose(probe.statistics.numpy(), expected, rtol=1e-6)

    # Serialisable like the losses it wraps.
    rebuilt = GradientProbe.from_config(probe.get_config())
    assert type(rebuilt.loss) is FocalLoss and rebuilt.loss.get_config() == loss.get_config()


def _config(every: int, tensorboard: bool = True):
    return SimpleNamespace(train=SimpleNamespace(diagnostics_every=every, tensorboard=tensorboard))


def test_off_returns_the_same_loss_and_no_callback(tmp_path):
    loss = FocalLoss()
    assert gradient_diagnostics(_config(0), loss, Context(), tmp_path) == (loss, [])
    # Horovod ranks other than 0 write nothing, so they need no probe either.
    assert gradient_diagnostics(_config(5), loss, Context(rank=1, size=2), tmp_path) == (loss, [])
    probe, callbacks = gradient_diagnostics(_config(5), loss, Context(), tmp_path)
    assert isinstance(probe, GradientProbe) and probe.loss is loss
    assert len(callbacks) == 1 and callbacks[0].every == 5
    with pytest.raises(ValueError, match="focal-family"):
        gradient_diagnostics(_config(5), tf.keras.losses.MeanSquaredError(), Context(), tmp_path)


def test_config_key_defaults_off_and_rejects_negative_values():
    assert load_config(None).train.diagnostics_every == 0
    assert load_config(None, ["train.diagnostics_every=10"]).train.diagnostics_every == 10
    with pytest.raises(ConfigError, match="train.diagnostics_every must be >= 0"):
        load_config(None, ["train.diagnostics_every=-1"])


def test_callback_records_the_trained_batches_every_k_steps(tmp_path):
    # An identity "network" with learning rate 0: the logits of step s are exactly batch s,
    # so each recorded row can be checked against that batch.
    rng = np.random.default_rng(0)
    y_true, _ = _hand_batch()
    batches = [rng.normal(0, 3, size=(1, 6, 2)).astype(np.float32) for _ in range(7)]
    inputs = tf.keras.Input((6, 2))
    outputs = tf.keras.layers.Dense(2, kernel_initializer="identity", use_bias=False)(inputs)
    model = tf.keras.Model(inputs, outputs)
    loss = FocalGradientLoss(alpha=ALPHA, gamma=2.0)
    probe, callbacks = gradient_diagnostics(_config(3), loss, Context(), tmp_path)
    model.compile(optimizer=tf.keras.optimizers.SGD(0.0), loss=probe)
    dataset = tf.data.Dataset.from_tensor_slices((np.concatenate(batches), np.repeat(y_true, 7, 0)))
    model.fit(dataset.batch(1), epochs=1, callbacks=callbacks, verbose=0)

    with open(tmp_path / "diagnostics.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == analysis.DIAGNOSTIC_COLUMNS
    assert [int(row["step"]) for row in rows] == [1, 4, 7]
    for row in rows:
        step = int(row["step"])
        expected = batch_statistics(loss, y_true, batches[step - 1]).numpy()
        got = [float(row[name]) for name in STATISTICS]
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    # TensorBoard holds the same numbers at the same steps.
    scalars = _tensorboard_scalars(tmp_path / "tensorboard" / "diagnostics")
    for row in rows:
        for name in ("grad_total", "residual_share", "count_neg_easy"):
            logged = scalars[(f"diagnostics/{name}", int(row["step"]))]
            assert logged == pytest.approx(float(row[name]), rel=1e-6)
    # The flag is down again after training: later calls pay nothing.
    assert not probe.record.numpy()
    parsed = analysis.read_diagnostics(tmp_path)
    np.testing.assert_array_equal(parsed["step"], [1, 4, 7])


def _tensorboard_scalars(folder):
    """{(tag, step): value} from every event file under `folder`."""
    scalars = {}
    for path in folder.glob("events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
    return scalars


def test_resume_drops_rows_of_repeated_epochs(tmp_path):
    for epoch, step in ((1, 1), (1, 11), (2, 21), (3, 31)):
        _append_row(tmp_path / "diagnostics.csv", {"epoch": epoch, "step": step, "saturated": 0.0})
    _keep_epochs_before(tmp_path / "diagnostics.csv", 2)
    parsed = analysis.read_diagnostics(tmp_path)
    np.testing.assert_array_equal(parsed["step"], [1, 11])
    np.testing.assert_array_equal(parsed["epoch"], [1, 1])


def test_callback_refuses_a_zero_interval(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        GradientDiagnostics(GradientProbe(FocalLoss()), 0, tmp_path)


def _fake_run(folder, seed, residual):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with open(folder / "diagnostics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(analysis.DIAGNOSTIC_COLUMNS)
        for step in range(1, 101, 10):
            values = rng.uniform(0.1, 1.0, size=len(analysis.DIAGNOSTIC_COLUMNS) - 2)
            values[STATISTICS.index("residual_share")] = residual
            writer.writerow([1, step, *values])
    return folder


def test_plot_diagnostics_draws_losses_side_by_side(tmp_path):
    runs = {
        "focal": [_fake_run(tmp_path / f"fl{seed}", seed, 0.3) for seed in range(2)],
        "focal_gradient": [_fake_run(tmp_path / "fgl0", 5, 0.4) / "diagnostics.csv"],
    }
    out = analysis.plot_diagnostics(runs, tmp_path / "figures" / "diagnostics.png")
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 20_000
    with pytest.raises(FileNotFoundError, match="diagnostics_every"):
        analysis.plot_diagnostics({"focal": [tmp_path / "missing"]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one run"):
        analysis.plot_diagnostics({"focal": []}, tmp_path / "x.png")


def test_training_with_diagnostics_writes_them(tmp_path):
    out = tmp_path / "runs"
    code = cli.train_main(
        ["--config", "configs/demo_focal.yaml", "data.toy.num_train=16", "data.toy.num_val=8",
         "train.epochs=1", "train.batch_size=8", f"data.root={tmp_path / 'data'}",
         f"train.output_dir={out}", "train.diagnostics_every=1", "eval.every_epoch=false"]
    )  # fmt: skip
    assert code == 0
    run = out / "demo_focal"
    parsed = analysis.read_diagnostics(run)
    np.testing.assert_array_equal(parsed["step"], [1, 2])
    # 16 images of the demo: every image has objects, so each batch has positives.
    assert np.all(parsed["num_positive"] >= 8) and np.all(parsed["normalizer"] >= 8)
    assert np.all((parsed["residual_share"] > 0) & (parsed["residual_share"] < 1))
    total = sum(parsed[f"grad_{s}_{b}"] for s in ("pos", "neg") for b in analysis.P_T_BINS)
    np.testing.assert_allclose(parsed["grad_total"], total, rtol=1e-5)
    # At the prior probability 0.01 nearly every negative is easy and every positive hard.
    positives = sum(parsed[f"count_pos_{b}"] for b in analysis.P_T_BINS)
    np.testing.assert_array_equal(positives, parsed["num_positive"])
    assert parsed["count_pos_hard"][0] == parsed["num_positive"][0]
    assert parsed["count_neg_easy"][0] > 0.9 * (
        parsed["count_neg_easy"][0] + parsed["count_neg_medium"][0] + parsed["count_neg_hard"][0]
    )
    assert "gradient diagnostics every 1 steps" in (run / "log.txt").read_text()
