"""The hand-differentiated logit kernel of FL and FGL against a plain autodiff reference."""

import numpy as np
import pytest
import tensorflow as tf

from fgl_retinanet.losses import FocalGradientLoss, FocalLoss


# log of float32's smallest normal number: the kernel floors p_t there (documented cap).
LOG_SMALLEST_NORMAL = float(np.log(np.finfo(np.float32).tiny))


def _autodiff_reference(
    y_true, logits, alpha: float, gamma: float, focal_gradient: bool, capped: bool = False
):
    """The loss as written before the hand-written gradient: autodiff through log_sigmoid.

    Shapes: y_true (batch, anchors, classes + 1), logits (batch, anchors, classes). `capped`
    floors log(p_t) at float32's smallest normal number, as the kernel's value does.
    """
    labels, state = y_true[..., :-1], y_true[..., -1]
    valid = tf.not_equal(state, -1.0)[..., tf.newaxis]
    logits = tf.where(valid, logits, 0.0)
    is_positive = labels > 0.5
    z_t = tf.where(is_positive, logits, -logits)
    log_p_t, log_one_minus_p_t = tf.math.log_sigmoid(z_t), tf.math.log_sigmoid(-z_t)
    if capped:
        log_p_t = tf.maximum(log_p_t, LOG_SMALLEST_NORMAL)
    alpha_t = tf.where(is_positive, alpha, 1.0 - alpha)
    factor = tf.exp(gamma * log_one_minus_p_t)
    if focal_gradient:
        factor = tf.stop_gradient(factor)
    element = tf.where(valid, -alpha_t * factor * log_p_t, 0.0)
    positives = tf.reduce_sum(tf.cast(tf.equal(state, 1.0), tf.float32))
    return tf.reduce_sum(element) / tf.maximum(positives, 1.0)


def _batch(seed: int, anchors: int = 3000, classes: int = 6, scale: float = 4.0):
    """Targets like keras-retinanet's (a few percent positive, some ignored) and logits."""
    rng = np.random.default_rng(seed)
    states = rng.choice([-1.0, 0.0, 1.0], size=(2, anchors), p=[0.05, 0.9, 0.05])
    labels = np.zeros((2, anchors, classes), np.float32)
    rows, cols = np.nonzero(states == 1.0)
    labels[rows, cols, rng.integers(classes, size=rows.size)] = 1.0
    y_true = np.concatenate([labels, states[..., None]], axis=-1).astype(np.float32)
    logits = (scale * rng.standard_normal((2, anchors, classes))).astype(np.float32)
    return tf.constant(y_true), tf.constant(logits)


def _value_and_gradient(function, y_true, logits):
    with tf.GradientTape() as tape:
        tape.watch(logits)
        value = function(y_true, logits)
    return value.numpy(), tape.gradient(value, logits).numpy()


@pytest.mark.parametrize("loss_class", [FocalLoss, FocalGradientLoss])
@pytest.mark.parametrize(
    "alpha, gamma",
    [(0.25, 2.0), (0.25, 0.0), (0.4, 0.5), (0.75, 5.0), (0.0, 2.0), (1.0, 2.0), (0.0, 1.0)],
)
@pytest.mark.parametrize("scale", [1.0, 4.0, 30.0])
def test_kernel_matches_autodiff_reference(loss_class, alpha, gamma, scale):
    y_true, logits = _batch(seed=int(10 * gamma + scale), scale=scale)
    focal_gradient = loss_class is FocalGradientLoss

    value, gradient = _value_and_gradient(loss_class(alpha, gamma), y_true, logits)
    expected_value, expected_gradient = _value_and_gradient(
        lambda y, z: _autodiff_reference(y, z, alpha, gamma, focal_gradient), y_true, logits
    )

    # The value counts -log(p_t) at most 87.3 per element (scale 30 draws logits beyond that);
    # the gradient is exact everywhere.
    capped_value = _autodiff_reference(y_true, logits, alpha, gamma, focal_gradient, capped=True)
    if scale < 10.0:
        assert capped_value.numpy() == expected_value

    # Float32 roundings only: 1e-6 relative, per element down to 1e-6 of the largest slope.
    assert value == pytest.approx(capped_value.numpy(), rel=1e-6)
    tolerance = 1e-6 * np.abs(expected_gradient).max()
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-6, atol=tolerance)
    assert np.all(gradient[y_true.numpy()[..., -1] == -1.0] == 0.0)


@pytest.mark.parametrize("loss_class", [FocalLoss, FocalGradientLoss])
def test_kernel_under_tf_function_and_unknown_shape(loss_class):
    # Keras traces the loss once with the anchor count unknown; the gradient must follow.
    y_true, logits = _batch(seed=5)
    loss = loss_class()

    @tf.function(input_signature=[tf.TensorSpec([None, None, 7]), tf.TensorSpec([None, None, 6])])
    def traced(y, z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            value = loss(y, z)
        return value, tape.gradient(value, z)

    value, gradient = traced(y_true, logits)
    eager_value, eager_gradient = _value_and_gradient(loss, y_true, logits)
    assert value.numpy() == pytest.approx(eager_value, rel=1e-6)
    np.testing.assert_allclose(gradient.numpy(), eager_gradient, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss_class", [FocalLoss, FocalGradientLoss])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_value_capped_beyond_float32_sigmoid_gradient_exact(loss_class, gamma):
    # One object anchor whose class logit is -1e4: p_t underflows, the value counts
    # -log(p_t) as 87.34 (the documented cap), the slope keeps the cross-entropy limit -alpha.
    alpha = 0.25
    y_true = tf.constant([[[1.0, 1.0]]])
    logits = tf.constant([[[-1e4]]])

    value, gradient = _value_and_gradient(loss_class(alpha, gamma), y_true, logits)

    assert value == pytest.approx(-alpha * LOG_SMALLEST_NORMAL, rel=1e-6)
    assert gradient.item() == pytest.approx(-alpha, rel=1e-6)
