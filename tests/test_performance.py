"""Mixed precision and XLA: the models they build, and short training runs against float32."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from keras_retinanet.layers import UpsampleLike

from fgl_retinanet import cli, distributed
from fgl_retinanet.config import load_config
from fgl_retinanet.losses import build_loss
from fgl_retinanet.model import (
    GatherUpsampleLike,
    build_inference_model,
    build_training_model,
)
from fgl_retinanet.train import compile_training_model

# The toy data at 64 px, two epochs of two steps: the shortest run that trains and evaluates.
SHORT_RUN = [
    "data.toy.num_train=8", "data.toy.num_val=8", "data.toy.image_size=64",
    "data.image_min_side=64", "data.image_max_side=64", "train.epochs=2", "train.batch_size=4",
    "train.tensorboard=false",
]  # fmt: skip


@pytest.fixture
def float32_policy():
    # Tests that change the process-wide policy put it back, whatever happens.
    yield
    tf.keras.mixed_precision.set_global_policy("float32")


def _demo_config(*overrides):
    return load_config("configs/demo_fgl.yaml", ["data.image_min_side=64", *overrides])


@pytest.mark.parametrize("source, target", [((3, 4), (6, 8)), ((4, 5), (7, 9)), ((2, 2), (3, 4))])
def test_gather_upsampling_equals_keras_retinanet(source, target):
    rng = np.random.default_rng(0)
    small = tf.constant(rng.normal(size=(2, *source, 5)).astype(np.float32))
    large = tf.zeros((2, *target, 1))

    expected = UpsampleLike()([small, large]).numpy()
    gathered = GatherUpsampleLike()([small, large]).numpy()

    assert gathered.shape == expected.shape == (2, *target, 5)
    np.testing.assert_array_equal(gathered, expected)


def test_jit_compile_model_uses_gather_upsampling():
    plain = build_training_model(_demo_config(), 3)
    compiled = build_training_model(_demo_config("train.jit_compile=true"), 3)

    def upsampling(model):
        return {type(layer).__name__ for layer in model.layers if "upsampled" in layer.name}

    assert upsampling(plain) == {"UpsampleLike"}
    assert upsampling(compiled) == {"GatherUpsampleLike"}
    # Same architecture, layer for layer, so snapshots load into either.
    assert [w.shape for w in plain.weights] == [w.shape for w in compiled.weights]


def test_mixed_precision_model_computes_in_float16_with_float32_outputs(float32_policy):
    config = _demo_config("train.mixed_precision=true")
    reference = build_training_model(config, 3)
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    model = build_training_model(config, 3)
    model.set_weights(reference.get_weights())

    # The heads compute in float16; the outputs the losses see are float32, under their names.
    assert model.get_layer("regression_submodel").compute_dtype == "float16"
    assert [o.dtype for o in model.outputs] == [tf.float32, tf.float32]
    assert model.output_names == reference.output_names == ["regression", "classification_logits"]

    # Same weights, same images: float16 compute stays close to float32.
    images = np.random.default_rng(1).normal(0.0, 50.0, (2, 64, 64, 3)).astype(np.float32)
    for half, full in zip(model.predict_on_batch(images), reference.predict_on_batch(images)):
        np.testing.assert_allclose(half, full, rtol=0.05, atol=0.05 * np.abs(full).max())

    # Box decoding and NMS stay in float32 even while the policy is mixed.
    inference = build_inference_model(model, config)
    assert all(o.dtype in (tf.float32, tf.int32, tf.int64) for o in inference.outputs)
    assert inference.get_layer("boxes").compute_dtype == "float32"


def test_mixed_precision_optimizer_is_loss_scaled(float32_policy):
    config = _demo_config("train.mixed_precision=true")
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    model = build_training_model(config, 3)
    loss = build_loss("focal_gradient")

    compile_training_model(model, config, distributed.Context(), loss, learning_rate=1e-3)

    assert isinstance(model.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    assert model.optimizer.dynamic
    assert isinstance(model.optimizer.inner_optimizer, tf.keras.optimizers.legacy.Adam)


def test_jit_compile_refused_under_horovod_without_xla_ops(monkeypatch):
    monkeypatch.delenv("HOROVOD_ENABLE_XLA_OPS", raising=False)
    context = distributed.Context(rank=0, size=2, hvd=object())
    with pytest.raises(RuntimeError, match="HOROVOD_ENABLE_XLA_OPS=1"):
        distributed.check_jit_compile(context)
    distributed.check_jit_compile(distributed.Context())


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """The same short run in float32, with mixed precision and with XLA; results by name."""
    root = tmp_path_factory.mktemp("speed")
    results = {}
    for name, extra in (("float32", []), ("mixed", ["train.mixed_precision=true"]),
                        ("xla", ["train.jit_compile=true"])):  # fmt: skip
        code = cli.train_main([
            "--config", "configs/demo_fgl.yaml", *SHORT_RUN, *extra,
            f"data.root={root / 'data'}", f"train.output_dir={root / 'runs'}",
            f"train.run_name={name}",
        ])  # fmt: skip
        assert code == 0, name
        results[name] = json.loads((root / "runs" / name / "results.json").read_text())
    # The next test in this process must not inherit a policy.
    assert tf.keras.mixed_precision.global_policy().name == "float32"
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixed", "xla"])
def test_short_run_matches_float32(short_runs, name):
    reference, run = short_runs["float32"], short_runs[name]
    for row, expected in zip(run["history"], reference["history"]):
        for key in ("loss", "regression_loss", "classification_loss"):
            assert np.isfinite(row[key]), (name, key)
            # Same seed, same initial weights and batches: only rounding separates the runs
            # (measured: XLA equal to 4 decimals, float16 within 0.03 %).
            assert row[key] == pytest.approx(expected[key], rel=0.01), (name, key, row["epoch"])
    # NOTE: two steps leave the mAP of all three runs near 0, so this bounds only gross errors
    # of the evaluation path (float16 weights, float32 box decoding); the losses above are the
    # real check.
    assert abs(run["mAP"] - reference["mAP"]) <= 0.05


@pytest.mark.slow
def test_mixed_precision_model_keeps_a_trained_models_map(tmp_path, float32_policy):
    # The mAP half of the check, where the short runs above cannot give it: a float32 model
    # trained until it detects (6 demo epochs), its weights then evaluated by the model
    # mixed precision builds (float16 compute, float32 outputs and box decoding). Same images,
    # same weights: only float16 rounding may separate the two mAPs.
    from fgl_retinanet.data import dataset_root, load_split
    from fgl_retinanet.evaluation import average_precisions_all
    from fgl_retinanet.model import detect

    runs = tmp_path / "runs"
    code = cli.train_main([
        "--config", "configs/demo_focal.yaml", "train.epochs=6", "data.toy.num_val=40",
        "eval.every_epoch=false", "train.tensorboard=false", f"data.root={tmp_path / 'data'}",
        f"train.output_dir={runs}", "train.run_name=float32",
    ])  # fmt: skip
    assert code == 0
    run = runs / "float32"
    reference = json.loads((run / "results.json").read_text())["mAP"]
    assert reference > 0.1  # a model that detects, or the comparison says nothing

    config = load_config(run / "config.yaml", ["train.mixed_precision=true"])
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    model = build_training_model(config, len(config.data.classes))
    latest = (run / "snapshots" / "latest.txt").read_text().strip()
    snapshot = run / "snapshots" / f"{latest}.h5"
    model.load_weights(str(snapshot))
    assert model.layers[-1].compute_dtype == "float32"
    assert any(layer.compute_dtype == "float16" for layer in model.layers)
    inference = build_inference_model(model, config)
    val_set = load_split(dataset_root(config), config.data.val_split, config)
    detections = detect(inference, val_set, config)
    by_metric = average_precisions_all(
        val_set.ground_truth(), detections, val_set.classes,
        iou_threshold=config.eval.iou_threshold,
    )  # fmt: skip
    mixed = by_metric["area"]["mAP"]
    print(f"mAP float32 {reference:.4f}, mixed precision {mixed:.4f}")
    assert mixed == pytest.approx(reference, abs=0.02)


def test_loss_scaling_wraps_horovods_optimizer():
    # A stand-in for horovod.tensorflow.keras: records what it wrapped, returns a legacy Adam.
    wrapped, returned = [], []

    def distributed_optimizer(optimizer):
        wrapped.append(optimizer)
        returned.append(tf.keras.optimizers.legacy.Adam())
        return returned[-1]

    context = distributed.Context(rank=0, size=2, hvd=SimpleNamespace(
        DistributedOptimizer=distributed_optimizer
    ))  # fmt: skip
    adam = tf.keras.optimizers.legacy.Adam(1e-3)

    optimizer = distributed.wrap_optimizer(context, adam, loss_scaling=True)

    # LossScaleOptimizer(DistributedOptimizer(Adam)): the loss scaler outside, Horovod inside.
    assert wrapped == [adam]
    assert isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    assert optimizer.inner_optimizer is returned[0]
    # Without mixed precision, Horovod's optimizer alone.
    assert distributed.wrap_optimizer(context, adam) is returned[1]
