"""Tests for fgl_retinanet.losses: hand-computed values and gradients, stability, parity."""

import numpy as np
import pytest
import tensorflow as tf
from keras_retinanet.losses import focal as retinanet_focal

from fgl_retinanet import losses
from fgl_retinanet.losses import (
    FocalGradientLoss,
    FocalLoss,
    build_loss,
    focal_gradient_loss,
    focal_loss,
)

# Both losses share every test that concerns the forward value or the input layout.
LOSS_CLASSES = [FocalLoss, FocalGradientLoss]

# Logits from saturated-wrong to saturated-right; the brief asks for finiteness on all of them.
EXTREME_LOGITS = [-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]
GAMMAS = [0.0, 0.5, 1.0, 2.0, 5.0]


def _targets(labels: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Stacks labels (batch, anchors, classes) and states (batch, anchors) as keras-retinanet."""
    return np.concatenate([labels, states[..., np.newaxis]], axis=-1).astype(np.float32)


def _value_and_gradient(loss, y_true: np.ndarray, y_pred: np.ndarray):
    """Returns the loss value and its gradient with respect to y_pred, as numpy."""
    y_pred = tf.constant(y_pred, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        value = loss(tf.constant(y_true), y_pred)
    return value.numpy(), tape.gradient(value, y_pred).numpy()


def _random_batch(seed: int, batch=2, anchors=40, classes=3, with_ignore=True):
    """Returns (y_true, logits) with several positives, background and optional ignore anchors.

    Shapes: y_true (batch, anchors, classes + 1), logits (batch, anchors, classes), logits in
    [-4, 4] where float32 sigmoids are accurate.
    """
    rng = np.random.default_rng(seed)
    states = rng.choice([-1.0, 0.0, 1.0], size=(batch, anchors), p=[0.2, 0.5, 0.3])
    if not with_ignore:
        states[states == -1.0] = 0.0

    # One class per positive anchor, as keras-retinanet's one-hot targets.
    labels = np.zeros((batch, anchors, classes))
    rows, cols = np.nonzero(states == 1.0)
    labels[rows, cols, rng.integers(classes, size=rows.size)] = 1.0
    logits = rng.uniform(-4.0, 4.0, size=(batch, anchors, classes)).astype(np.float32)
    return _targets(labels, states), logits


def _reference_focal(y_true: np.ndarray, logits: np.ndarray, alpha: float, gamma: float) -> float:
    """Focal loss in float64 numpy, straight from the definition, for moderate logits."""
    labels, states = y_true[..., :-1].astype(np.float64), y_true[..., -1]
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    p_t = np.where(labels > 0.5, p, 1.0 - p)
    alpha_t = np.where(labels > 0.5, alpha, 1.0 - alpha)
    element = -alpha_t * (1.0 - p_t) ** gamma * np.log(p_t)
    element = element * (states != -1.0)[..., np.newaxis]
    return element.sum() / max(1.0, float((states == 1.0).sum()))


@pytest.mark.parametrize(
    "loss_class, expected_dlogit, expected_dprob",
    [
        # FL also differentiates the factor (1 - p_t)^2 = 1/4:
        #   dL/dp_t = 2 (1 - p_t) ln p_t - (1 - p_t)^2 / p_t = -ln 2 - 1/2 = -1.193147,
        #   dL/dz = dL/dp_t * p_t (1 - p_t) = (-ln 2 - 1/2) / 4 = -0.298287.
        (FocalLoss, -0.298287, -1.193147),
        # FGL holds the factor constant: dL/dp_t = -(1 - p_t)^2 / p_t = -(1/4) / (1/2) = -1/2,
        # dL/dz = -1/2 * 1/4 = -0.125.
        (FocalGradientLoss, -0.125, -0.5),
    ],
)
@pytest.mark.parametrize("from_logits", [True, False])
def test_hand_computed_value_and_gradient(loss_class, expected_dlogit, expected_dprob, from_logits):
    # One positive anchor, one class, logit 0: p = p_t = 1/2, alpha_t = alpha = 1, one positive.
    # L = -(1 - 1/2)^2 ln(1/2) = ln(2) / 4 = 0.173287 for both losses.
    # A stop_gradient on the whole loss gives 0, one on log p_t gives -ln(2)/4 = -0.1733, none
    # in FGL gives FL's value: each misplacement fails one of the two cases.
    y_true = _targets(np.ones((1, 1, 1)), np.ones((1, 1)))
    y_pred = np.zeros((1, 1, 1)) if from_logits else np.full((1, 1, 1), 0.5)
    loss = loss_class(alpha=1.0, gamma=2.0, from_logits=from_logits)

    value, gradient = _value_and_gradient(loss, y_true, y_pred)

    expected_gradient = expected_dlogit if from_logits else expected_dprob
    assert value == pytest.approx(np.log(2.0) / 4.0, abs=1e-4)
    assert value == pytest.approx(0.1733, abs=1e-4)
    assert gradient.item() == pytest.approx(expected_gradient, abs=1e-4)


@pytest.mark.parametrize("loss_class", LOSS_CLASSES)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_finite_and_not_vanishing_at_extreme_logits(loss_class, gamma):
    # Every extreme logit once as background (label 0) and once as object (label 1).
    logits = np.array(EXTREME_LOGITS * 2, dtype=np.float32).reshape(1, -1, 1)
    labels = np.repeat([0.0, 1.0], len(EXTREME_LOGITS)).reshape(1, -1, 1)
    y_true = _targets(labels, labels[..., 0])
    alpha = 0.25

    value, gradient = _value_and_gradient(loss_class(alpha=alpha, gamma=gamma), y_true, logits)

    assert np.isfinite(value)
    assert np.all(np.isfinite(gradient))

    # Confidently wrong anchors (|z_t| >= 20) must keep the cross-entropy slope alpha_t / N:
    # the factor is ~1 there and FL's extra term ~p_t log p_t vanishes. Clipping would give 0.
    normalizer = len(EXTREME_LOGITS)
    z_t = np.where(labels > 0.5, logits, -logits)
    wrong = z_t <= -20.0
    alpha_t = np.where(labels > 0.5, alpha, 1.0 - alpha)
    expected = np.where(labels > 0.5, -alpha_t, alpha_t) / normalizer
    np.testing.assert_allclose(gradient[wrong], expected[wrong], atol=1e-6)


@pytest.mark.parametrize("loss_class", LOSS_CLASSES)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_probabilities_clipped_at_zero_and_one(loss_class, gamma):
    # Probabilities 0 and 1 as background and as object; log would give -inf without clipping.
    probabilities = np.array([0.0, 1.0, 0.0, 1.0], dtype=np.float32).reshape(1, -1, 1)
    labels = np.array([0.0, 0.0, 1.0, 1.0]).reshape(1, -1, 1)
    y_true = _targets(labels, labels[..., 0])
    loss = loss_class(alpha=0.25, gamma=gamma, from_logits=False)

    value, gradient = _value_and_gradient(loss, y_true, probabilities)

    # Only the wrong anchors count, each -alpha_t ln(p_t) (the factor is ~1); two positives
    # normalise. The object at 0 gets p_t = epsilon; the background at 1 gets 1 - (1 - epsilon)
    # in float32, which is 2^-23 rather than epsilon = 1e-7.
    epsilon = np.float32(tf.keras.backend.epsilon())
    background_p_t = np.float32(1.0) - (np.float32(1.0) - epsilon)
    expected = -(0.75 * np.log(background_p_t) + 0.25 * np.log(epsilon)) / 2.0
    assert value == pytest.approx(expected, rel=1e-4)
    assert np.all(np.isfinite(gradient))


@pytest.mark.parametrize("loss_class", LOSS_CLASSES)
def test_gamma_zero_is_binary_cross_entropy(loss_class):
    y_true, logits = _random_batch(seed=0)
    states = y_true[..., -1]

    # alpha 0.5 weighs both labels by 1/2, so twice the loss is plain cross-entropy.
    value = 2.0 * loss_class(alpha=0.5, gamma=0.0)(y_true, logits).numpy()

    cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true[..., :-1], logits=logits)
    cross_entropy = tf.reduce_sum(cross_entropy * (states != -1.0)[..., np.newaxis])
    expected = cross_entropy.numpy() / max(1.0, float((states == 1.0).sum()))
    assert value == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_focal_gradient_forward_equals_focal_forward(gamma):
    y_true, logits = _random_batch(seed=1)
    logits = logits * 5.0

    focal_value = FocalLoss(gamma=gamma)(y_true, logits).numpy()
    gradient_value = FocalGradientLoss(gamma=gamma)(y_true, logits).numpy()

    # stop_gradient is the identity forward, so the values agree bit for bit.
    assert gradient_value == focal_value


@pytest.mark.parametrize("loss_class", LOSS_CLASSES)
def test_confident_background_keeps_gradient(loss_class):
    # A background anchor at logit +20: z_t = -20, p_t ~ 2e-9, (1 - p_t)^2 ~ 1, alpha_t = 0.75.
    # dL/dz = alpha_t (1 - p_t) ~ 0.75; no positives, so the normaliser is 1.
    y_true = _targets(np.zeros((1, 1, 1)), np.zeros((1, 1)))
    logits = np.full((1, 1, 1), 20.0, dtype=np.float32)

    _, gradient = _value_and_gradient(loss_class(alpha=0.25, gamma=2.0), y_true, logits)
    assert gradient.item() == pytest.approx(0.75, abs=1e-5)

    # keras-retinanet's probability-space loss clips sigmoid(20) == 1.0f, so its slope is 0.
    logits = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        value = retinanet_focal(alpha=0.25, gamma=2.0)(tf.constant(y_true), tf.sigmoid(logits))
    assert tape.gradient(value, logits).numpy().item() == 0.0


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_gradient_difference_is_focal_residual(gamma):
    y_true, logits = _random_batch(seed=2, anchors=64, with_ignore=False)
    labels, states = y_true[..., :-1], y_true[..., -1]
    alpha = 0.25
    normalizer = max(1.0, float((states == 1.0).sum()))

    _, focal_gradient = _value_and_gradient(FocalLoss(alpha, gamma), y_true, logits)
    _, gradient_gradient = _value_and_gradient(FocalGradientLoss(alpha, gamma), y_true, logits)

    # Chain rule through p_t = sigmoid(sign * z): dp_t/dz = sign * p_t (1 - p_t).
    sign = np.where(labels > 0.5, 1.0, -1.0)
    p_t = 1.0 / (1.0 + np.exp(-sign * logits.astype(np.float64)))
    dp_t_dz = sign * p_t * (1.0 - p_t)
    difference = normalizer * (focal_gradient - gradient_gradient) / dp_t_dz

    # R = alpha_t gamma (1 - p_t)^(gamma - 1) log p_t, per element.
    alpha_t = np.where(labels > 0.5, alpha, 1.0 - alpha)
    residual = alpha_t * gamma * (1.0 - p_t) ** (gamma - 1.0) * np.log(p_t)
    np.testing.assert_allclose(difference, residual, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.5, 0.0), (0.25, 0.5), (0.75, 5.0)])
def test_parity_with_keras_retinanet(alpha, gamma):
    y_true, logits = _random_batch(seed=3)
    states = y_true[..., -1]
    assert (states == 1.0).sum() > 1 and (states == -1.0).sum() > 0
    probabilities = tf.sigmoid(logits)

    expected = retinanet_focal(alpha=alpha, gamma=gamma)(tf.constant(y_true), probabilities)
    from_probabilities = FocalLoss(alpha, gamma, from_logits=False)(y_true, probabilities)
    from_logits = FocalLoss(alpha, gamma, from_logits=True)(y_true, logits)

    assert from_probabilities.numpy() == pytest.approx(expected.numpy(), rel=1e-5)
    assert from_logits.numpy() == pytest.approx(expected.numpy(), rel=1e-5)
    assert from_logits.numpy() == pytest.approx(_reference_focal(y_true, logits, alpha, gamma))


@pytest.mark.parametrize("loss_class", LOSS_CLASSES)
@pytest.mark.parametrize("from_logits", [True, False])
def test_ignore_anchors_and_batch_normalizer(loss_class, from_logits):
    # Image 0 has 3 positives, image 1 has 1: the normaliser is 4 for the batch, not per image.
    states = np.array([[1, 1, 1, 0, -1, -1], [1, 0, 0, -1, 0, 0]], dtype=np.float64)
    labels = np.zeros((2, 6, 2))
    labels[0, 0, 0] = labels[0, 1, 1] = labels[0, 2, 0] = labels[1, 0, 1] = 1.0
    labels[0, 4, 0] = 1.0
    y_true = _targets(labels, states)
    logits = np.random.default_rng(4).uniform(-3.0, 3.0, size=(2, 6, 2)).astype(np.float32)
    alpha, gamma = 0.25, 2.0
    expected = _reference_focal(y_true, logits, alpha, gamma)

    # Garbage in ignored anchors, including NaN, must reach neither the loss nor the gradient.
    ignored = states == -1.0
    garbage = logits.copy()
    garbage[ignored] = np.array([[np.nan, 1e4], [-1e4, 7.0], [np.inf, -np.inf]], np.float32)
    y_pred = garbage if from_logits else tf.sigmoid(garbage).numpy()
    loss = loss_class(alpha, gamma, from_logits=from_logits)

    value, gradient = _value_and_gradient(loss, y_true, y_pred)

    assert value == pytest.approx(expected, rel=1e-5)
    assert np.all(gradient[ignored] == 0.0)
    assert np.all(np.isfinite(gradient))
    assert np.all(gradient[~ignored] != 0.0)


@pytest.mark.parametrize("loss_class", LOSS_CLASSES)
def test_computes_in_float32(loss_class):
    y_true, logits = _random_batch(seed=5)
    half_logits = logits.astype(np.float16)

    value = loss_class()(y_true.astype(np.float64), half_logits)

    assert value.dtype == tf.float32
    assert value.numpy() == loss_class()(y_true, half_logits.astype(np.float32)).numpy()


@pytest.mark.parametrize("loss_class", LOSS_CLASSES)
def test_config_round_trip(loss_class):
    loss = loss_class(alpha=0.4, gamma=0.5, from_logits=False)

    rebuilt = loss_class.from_config(loss.get_config())
    deserialized = tf.keras.losses.deserialize(tf.keras.losses.serialize(loss))

    for other in (rebuilt, deserialized):
        assert type(other) is loss_class
        assert (other.alpha, other.gamma, other.from_logits) == (0.4, 0.5, False)
        assert other.name == loss.name


def test_factories_and_registry():
    assert type(focal_loss(gamma=1.0)) is FocalLoss
    assert type(focal_gradient_loss(alpha=0.5)) is FocalGradientLoss
    assert focal_gradient_loss(alpha=0.5).alpha == 0.5
    assert losses.LOSSES["focal"] is FocalLoss

    loss = build_loss("focal_gradient", gamma=1.0)
    assert type(loss) is FocalGradientLoss
    assert (loss.gamma, loss.alpha, loss.from_logits) == (1.0, 0.25, True)

    with pytest.raises(ValueError, match="focal, focal_gradient"):
        build_loss("foca")


def test_register_loss_adds_one_name(monkeypatch):
    # Work on a copy so the new name does not leak into other tests.
    monkeypatch.setattr(losses, "LOSSES", dict(losses.LOSSES))

    @losses.register_loss("half_focal")
    class HalfFocalLoss(FocalLoss):
        pass

    assert type(build_loss("half_focal", gamma=3.0)) is HalfFocalLoss
    with pytest.raises(ValueError, match="already registered"):
        losses.register_loss("focal")(HalfFocalLoss)


def test_invalid_parameters_rejected():
    with pytest.raises(ValueError, match="alpha"):
        FocalLoss(alpha=1.5)
    with pytest.raises(ValueError, match="gamma"):
        FocalGradientLoss(gamma=-1.0)


@pytest.mark.parametrize("loss_class", LOSS_CLASSES)
def test_compiled_model_sees_direct_value(loss_class):
    # A tiny per-anchor classifier; batch 2 with unequal positives exercises the normaliser.
    y_true, _ = _random_batch(seed=6, anchors=12)
    features = np.random.default_rng(7).normal(size=(2, 12, 4)).astype(np.float32)
    inputs = tf.keras.Input(shape=(12, 4))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(3)(inputs))

    # Learning rate 0 keeps the weights, so train_on_batch reports the loss of these weights.
    model.compile(optimizer=tf.keras.optimizers.SGD(learning_rate=0.0), loss=loss_class())
    direct = loss_class()(y_true, model(features)).numpy()

    evaluated = model.evaluate(features, y_true, batch_size=2, verbose=0)
    trained = model.train_on_batch(features, y_true)

    assert evaluated == pytest.approx(direct, rel=1e-6)
    assert trained == pytest.approx(direct, rel=1e-6)
