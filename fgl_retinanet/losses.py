"""Focal loss (FL) and focal gradient loss (FGL) for RetinaNet classification, with a registry.

Both losses have the same forward value, ``-alpha_t * (1 - p_t)**gamma * log(p_t)`` per anchor
and class. FL differentiates through the modulating factor ``(1 - p_t)**gamma``; FGL treats it as
a constant, so its gradient with respect to ``p_t`` lacks the residual
``R = alpha_t * gamma * (1 - p_t)**(gamma - 1) * log(p_t)``, i.e. ``FL' = FGL' + R``.

The regression loss is not defined here: the trainer uses ``keras_retinanet.losses.smooth_l1``.
"""

from typing import Callable

import tensorflow as tf

# Labels above this value mark the class as present; keras-retinanet uses the same cutoff.
LABEL_CUTOFF = 0.5

# The smallest normal float32: sigmoid flushes to 0 below it, and log(0) would be -inf.
_SMALLEST_NORMAL = 1.1754944e-38

# Anchor states in the last column of keras-retinanet's classification target.
STATE_IGNORE = -1.0
STATE_POSITIVE = 1.0

# Registered loss classes by config name (`loss.name`); filled by `register_loss`.
LOSSES: dict[str, type[tf.keras.losses.Loss]] = {}


def register_loss(name: str) -> Callable[[type[tf.keras.losses.Loss]], type[tf.keras.losses.Loss]]:
    """Returns a class decorator that makes a loss buildable by name through `build_loss`.

    Args:
        name: config name of the loss, e.g. ``"focal_gradient"``.

    Returns:
        A decorator that records the class in `LOSSES` and returns it unchanged.

    Raises:
        ValueError: if the name is already taken, so that two losses never shadow each other.
    """

    def decorator(cls: type[tf.keras.losses.Loss]) -> type[tf.keras.losses.Loss]:
        if name in LOSSES:
            raise ValueError(f"loss name {name!r} is already registered to {LOSSES[name].__name__}")
        LOSSES[name] = cls
        return cls

    return decorator


def build_loss(name: str, **params) -> tf.keras.losses.Loss:
    """Builds a registered loss from its config name and keyword arguments.

    Args:
        name: a key of `LOSSES`, e.g. ``"focal"`` or ``"focal_gradient"``.
        **params: constructor arguments, e.g. ``alpha=0.25, gamma=2.0``.

    Returns:
        The loss instance.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](**params)


@register_loss("focal")
@tf.keras.utils.register_keras_serializable(package="fgl_retinanet")
class FocalLoss(tf.keras.losses.Loss):
    """Sigmoid focal loss over keras-retinanet's classification targets.

    Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017,
    https://arxiv.org/abs/1708.02002.
    The per-element loss ``-alpha_t * (1 - p_t)**gamma * log(p_t)`` is summed over every class of
    every anchor that is not ignored, then divided by the number of positive anchors in the whole
    batch (at least 1).

    From logits the loss uses ``p_t = sigmoid(z_t)``, where ``z_t`` is the logit signed by the
    label, with a hand-written gradient (see `_logit_loss`); value and gradient stay finite for
    any finite logit and any ``gamma >= 0``, including ``gamma < 1`` where ``pow`` has an infinite
    derivative at ``p_t = 1``. The value of an element is exact while ``z_t >= -87.3`` (the
    float32 range of ``sigmoid``) and counts ``87.3 * alpha_t`` beyond; gradients are exact.

    Example:
        >>> loss = FocalLoss(alpha=0.25, gamma=2.0)
        >>> value = loss(y_true, logits)  # scalar

    Args:
        alpha: weight of the positive class; negatives get ``1 - alpha``.
        gamma: focusing exponent of the modulating factor ``(1 - p_t)**gamma``; 0 gives weighted
            binary cross-entropy.
        from_logits: whether ``y_pred`` holds logits (True) or sigmoid probabilities (False).
            Probabilities are clipped to ``[epsilon, 1 - epsilon]`` with Keras' backend epsilon,
            as Keras' ``binary_crossentropy`` does, so that ``log`` stays finite; that clipping
            zeroes the gradient of saturated predictions, which the logit path avoids.
        name: name of the loss, used for Keras' name scope and logs; defaults to `default_name`.
    """

    default_name = "focal_loss"
    # FL differentiates the modulating factor; FGL holds it constant.
    differentiate_factor = True

    def __init__(
        self,
        alpha: float = 0.25,
        gamma: float = 2.0,
        from_logits: bool = True,
        name: str | None = None,
    ):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if gamma < 0.0:
            raise ValueError(f"gamma must be non-negative, got {gamma}")

        # NOTE: `call` already returns the normalised scalar, and SUM_OVER_BATCH_SIZE divides a
        # single element by 1, so direct calls and `model.compile` see the same value. We pick
        # it over NONE because Keras gives it to keras-retinanet's plain `focal` function (AUTO
        # resolves to it): under a `tf.distribute` strategy `compile` then divides by the replica
        # count as for the baseline, which averages gradients like Horovod does. AUTO itself is
        # avoided because custom training loops under a strategy reject it.
        super().__init__(
            reduction=tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE, name=name or self.default_name
        )
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.from_logits = bool(from_logits)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        """Computes the normalised focal loss of a batch.

        Args:
            y_true: (batch, anchors, classes + 1); one-hot labels followed by the anchor state
                (-1 ignore, 0 background, 1 object).
            y_pred: (batch, anchors, classes); logits, or probabilities if not `from_logits`.

        Returns:
            () float32 loss, summed over non-ignored anchors and classes, divided by the number
            of positive anchors in the batch (at least 1).
        """

        # Compute in float32 whatever the model's precision: float16 logits would overflow
        # the sums and lose the small losses of easy negatives.
        y_true = tf.cast(y_true, tf.float32)
        y_pred = tf.cast(y_pred, tf.float32)
        anchor_state = y_true[..., -1:]

        # Normalise by the positive anchors of the whole batch, not per image, as keras-retinanet
        # does; at least 1 so that a batch of background only still gets a finite loss.
        num_positive = tf.reduce_sum(tf.cast(tf.equal(anchor_state, STATE_POSITIVE), tf.float32))
        normalizer = tf.maximum(num_positive, 1.0)

        # One (batch, anchors, 1) weight zeroes ignored anchors in every later product.
        valid = tf.cast(tf.not_equal(anchor_state, STATE_IGNORE), tf.float32)
        # Compare before slicing off the state column: the slice then copies bytes, not floats.
        is_positive = tf.greater(y_true, LABEL_CUTOFF)[..., :-1]
        if self.from_logits:
            return self._logit_loss(is_positive, valid, y_pred, normalizer)

        # Probabilities: replace ignored predictions by a harmless value before any arithmetic,
        # so that a NaN there can reach neither the loss nor, through a zero times NaN product in
        # the backward pass, the gradient.
        y_pred = tf.where(valid > 0.0, y_pred, 0.5)

        # Express everything through p_t, the probability given to the true label.
        log_p_t, log_one_minus_p_t = self._log_probabilities(is_positive, y_pred)
        alpha_t = tf.where(is_positive, self.alpha, 1.0 - self.alpha)

        # The modulating factor is the only place FL and FGL differ.
        element_loss = -alpha_t * self._modulating_factor(log_one_minus_p_t) * log_p_t
        element_loss = tf.where(valid > 0.0, element_loss, 0.0)
        return tf.reduce_sum(element_loss) / normalizer

    def get_config(self) -> dict:
        """Returns the constructor arguments, so that `from_config` rebuilds an equal loss."""
        # The reduction is fixed by the class, so it is left out of the config on purpose.
        return {
            "alpha": self.alpha,
            "gamma": self.gamma,
            "from_logits": self.from_logits,
            "name": self.name,
        }

    def _modulating_factor(self, log_one_minus_p_t: tf.Tensor) -> tf.Tensor:
        """Returns ``(1 - p_t)**gamma``, differentiable in ``p_t``.

        Args:
            log_one_minus_p_t: (batch, anchors, classes) ``log(1 - p_t)``.

        Returns:
            (batch, anchors, classes) modulating factor.
        """
        # exp(gamma * log x) has derivative -gamma * p_t * (1 - p_t)**gamma through the sigmoid,
        # finite even for gamma < 1 and saturated logits, where pow's derivative is infinite.
        return tf.exp(self.gamma * log_one_minus_p_t)

    def _log_probabilities(
        self, is_positive: tf.Tensor, y_pred: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Returns ``log(p_t)`` and ``log(1 - p_t)`` from probabilities.

        Args:
            is_positive: (batch, anchors, classes) bool, True where the label is 1.
            y_pred: (batch, anchors, classes) float32 probabilities.

        Returns:
            Two (batch, anchors, classes) float32 tensors, ``log(p_t)`` and ``log(1 - p_t)``.
        """
        # Clip as Keras' binary_crossentropy does, so that log stays finite at 0 and 1.
        epsilon = tf.keras.backend.epsilon()
        probability = tf.clip_by_value(y_pred, epsilon, 1.0 - epsilon)
        p_t = tf.where(is_positive, probability, 1.0 - probability)
        return tf.math.log(p_t), tf.math.log(1.0 - p_t)

    def _logit_loss(
        self, is_positive: tf.Tensor, valid: tf.Tensor, logits: tf.Tensor, normalizer: tf.Tensor
    ) -> tf.Tensor:
        """Returns the normalised loss from logits, with a hand-written gradient.

        The gradient is written out rather than left to autodiff because autodiff keeps about
        twenty full-size intermediates alive and walks them again backwards; this needs a handful
        and no gather. With the signed logit ``z_t`` (``p_t = sigmoid(z_t)``), per element:
        ``dL/dz_t = -alpha_t * (1 - p_t)**gamma * ((1 - p_t) + gamma * p_t * log(1 / p_t))``
        for FL, and without the ``gamma`` term for FGL.

        ``p_t`` is floored at float32's smallest normal number, so an element whose logit is
        more than 87.3 on the wrong side counts ``87.3 * alpha_t`` in the value instead of
        ``|z_t| * alpha_t``; its gradient stays exact (``alpha_t / N``). Such logits only occur
        in a diverged model.

        Args:
            is_positive: (batch, anchors, classes) bool, True where the label is 1.
            valid: (batch, anchors, 1) float32, 0 for ignored anchors and 1 otherwise.
            logits: (batch, anchors, classes) float32 logits.
            normalizer: () float32 divisor, the number of positive anchors (at least 1).

        Returns:
            () float32 loss.
        """
        alpha, gamma = self.alpha, self.gamma
        fl_term = self.differentiate_factor and gamma != 0.0

        # Each op below is one pass over (batch, anchors, classes) elements (TensorFlow runs
        # every op as its own loop on CPU), so there are as few as the maths allows, and the
        # constant factors (alpha, 1/N, 2, signs) are folded into scalars where they can be.
        # sign is +1 for the label 1, -1 for 0 and 0 where ignored: z_t = sign * z.
        sign = tf.where(is_positive, valid, -valid)
        # alpha_weight = alpha_t * valid / base from sign in one unary op (a second
        # broadcasting select would cost more): leaky_relu keeps 1 and maps -1 to (1-a)/a.
        if alpha > 0.0:
            alpha_weight, base = tf.nn.leaky_relu(sign, alpha=-(1.0 - alpha) / alpha), alpha
        else:
            alpha_weight, base = tf.nn.relu(-sign), 1.0
        # Gamma 2 (the paper's and the post's) has one-pass kernels: ReciprocalGrad(y, dy) is
        # -dy * y**2 and RsqrtGrad(y, dy) is -dy / 2 * y**3.
        fast = gamma == 2.0
        # The weight tensor holds `scale` times alpha_t * (1 - p_t)**gamma.
        scale = -1.0 / base if fast else 1.0 / base

        @tf.custom_gradient
        def loss(z: tf.Tensor) -> tf.Tensor:
            # multiply_no_nan gives 0 for ignored anchors even where their logit is NaN or
            # infinite, so garbage there reaches neither the value nor the gradient (their
            # weight is 0).
            z_t = tf.math.multiply_no_nan(z, sign)
            # The floor keeps log(p_t) finite where sigmoid underflows (z_t below -87.3).
            p_t = tf.maximum(tf.sigmoid(z_t), _SMALLEST_NORMAL)
            one_minus_p_t = 1.0 - p_t

            if fast:
                weight = tf.raw_ops.ReciprocalGrad(y=one_minus_p_t, dy=alpha_weight)
            elif gamma == 0.0:
                weight = alpha_weight
            elif gamma == 1.0:
                weight = alpha_weight * one_minus_p_t
            else:
                weight = alpha_weight * tf.exp(tf.math.xlogy(gamma, one_minus_p_t))
            # xlogy is weight * log(p_t) in one pass: -scale times the element loss.
            log_term = tf.math.xlogy(weight, p_t)
            # reduce_sum adds pairwise; a MatMul dot product drifts by 1e-5 over 6M terms.
            value = tf.reduce_sum(log_term) * (-1.0 / (scale * normalizer))

            def gradient(upstream: tf.Tensor) -> tf.Tensor:
                # -dL/dz_t times N: the cross-entropy slope (1 - p_t) times the weight, plus for
                # FL gamma * p_t * (1 - p_t)**gamma * -log(p_t). Both come out multiplied by
                # slope_scale (RsqrtGrad halves, and gamma 2's factor is folded in).
                if fast:
                    slope = tf.raw_ops.RsqrtGrad(y=one_minus_p_t, dy=alpha_weight)
                    slope_scale = scale / 2
                    if fl_term:
                        slope -= p_t * log_term
                else:
                    slope, slope_scale = weight * one_minus_p_t, scale
                    if fl_term:
                        slope -= gamma * (p_t * log_term)
                # dL/dz = sign * dL/dz_t; ignored anchors have sign 0.
                return (slope * sign) * (-upstream / (slope_scale * normalizer))

            return value, gradient

        return loss(logits)


@register_loss("focal_gradient")
@tf.keras.utils.register_keras_serializable(package="fgl_retinanet")
class FocalGradientLoss(FocalLoss):
    """Focal gradient loss: the focal loss value, with the modulating factor held constant.

    The forward value equals `FocalLoss` exactly; the gradient is that of binary cross-entropy
    scaled by ``alpha_t * (1 - p_t)**gamma``, without FL's residual
    ``alpha_t * gamma * (1 - p_t)**(gamma - 1) * log(p_t)`` with respect to ``p_t``.

    Example:
        >>> loss = FocalGradientLoss(alpha=0.25, gamma=2.0)
        >>> value = loss(y_true, logits)  # same scalar as FocalLoss, different gradient

    Args:
        alpha: weight of the positive class; negatives get ``1 - alpha``.
        gamma: focusing exponent of the constant weight ``(1 - p_t)**gamma``.
        from_logits: whether ``y_pred`` holds logits (True) or sigmoid probabilities (False).
        name: name of the loss, used for Keras' name scope and logs.
    """

    default_name = "focal_gradient_loss"
    differentiate_factor = False

    def _modulating_factor(self, log_one_minus_p_t: tf.Tensor) -> tf.Tensor:
        """Returns ``(1 - p_t)**gamma`` as a constant for differentiation.

        Args:
            log_one_minus_p_t: (batch, anchors, classes) ``log(1 - p_t)``.

        Returns:
            (batch, anchors, classes) modulating factor with no gradient.
        """
        # Stopping only the factor keeps the gradient of -alpha_t * log(p_t) flowing.
        return tf.stop_gradient(super()._modulating_factor(log_one_minus_p_t))


def focal_loss(alpha: float = 0.25, gamma: float = 2.0, from_logits: bool = True) -> FocalLoss:
    """Returns a `FocalLoss`; see its docstring for the arguments."""
    return FocalLoss(alpha=alpha, gamma=gamma, from_logits=from_logits)


def focal_gradient_loss(
    alpha: float = 0.25, gamma: float = 2.0, from_logits: bool = True
) -> FocalGradientLoss:
    """Returns a `FocalGradientLoss`; see its docstring for the arguments."""
    return FocalGradientLoss(alpha=alpha, gamma=gamma, from_logits=from_logits)


# The effective FGL objective and FL's residual over p, exact for any gamma >= 0. They live in
# the TensorFlow-free analysis module (fgl-plot runs without TensorFlow) and are re-exported here
# next to the losses they describe.
from fgl_retinanet.analysis import (  # noqa: E402, F401
    effective_focal_gradient_loss,
    focal_gradient_residual,
)
