"""Gradient diagnostics during training: where the classification gradient comes from.

    fgl-train --config configs/demo_fgl.yaml train.diagnostics_every=10

Every K steps (`train.diagnostics_every`, 0 = off), from the batch the model is training on
(its logits and targets, no extra forward pass), rank 0 records one row of `diagnostics.csv`
in the run directory and the same scalars in TensorBoard (`tensorboard/diagnostics`):

- ``grad_{pos,neg}_{hard,medium,easy}``: the summed ``|dL/dlogit|`` of the loss being trained,
  normalised as the loss is (by the positive anchors of the batch), over positive elements
  (the labelled class of a positive anchor) and negative elements (every other class of every
  non-ignored anchor, i.e. background anchors and the other classes of positive anchors), split
  by the probability given to the target label, p_t: hard ``p_t < 0.5`` (on the wrong side of
  the decision boundary), medium ``0.5 <= p_t < 0.9``, easy ``p_t >= 0.9``;
- ``count_{pos,neg}_{hard,medium,easy}``: the number of elements in each of those bins;
- ``grad_total``: the sum of all six gradient columns;
- ``residual_share``: the share of focal loss's ``sum |dL/dlogit|`` on this batch that comes
  from its residual R (the part FGL drops), whichever loss is being trained. Per element both
  parts point the same way, so the share lies in [0, 1];
- ``saturated``: elements whose sigmoid probability lies within Keras' epsilon (1e-7) of 0 or 1,
  where a probability-space loss clips and loses its gradient;
- ``num_positive`` and ``normalizer``: positive anchors in the batch and the loss's divisor,
  ``max(num_positive, 1)``.

Design: `GradientProbe` wraps the compiled classification loss and computes these statistics
inside the training step, under a `tf.cond` on a flag that `GradientDiagnostics` raises only
before a diagnostic step; other steps pay one boolean read. With diagnostics off neither exists,
so training runs exactly the code it ran before.
"""

import csv
import logging
import math
from pathlib import Path

import tensorflow as tf

from fgl_retinanet.analysis import DIAGNOSTIC_COLUMNS, P_T_BIN_EDGES, P_T_BINS
from fgl_retinanet.losses import (
    LABEL_CUTOFF,
    STATE_IGNORE,
    STATE_POSITIVE,
    FocalGradientLoss,
    FocalLoss,
)

# The statistics the probe computes, i.e. every diagnostics.csv column after epoch and step.
STATISTICS = DIAGNOSTIC_COLUMNS[2:]

logger = logging.getLogger(__name__)


def gradient_diagnostics(
    config, loss: tf.keras.losses.Loss, context, out: Path
) -> tuple[tf.keras.losses.Loss, list[tf.keras.callbacks.Callback]]:
    """Returns the classification loss to compile and the diagnostics callbacks.

    Args:
        config: the run's Config; `train.diagnostics_every` is K (0: off).
        loss: the classification loss built from `config.loss`.
        context: the distributed context; only rank 0 records.
        out: the run directory (rank 0 writes diagnostics.csv there).

    Returns:
        ``(loss, [])`` unchanged when diagnostics are off or on other ranks than 0, otherwise
        ``(GradientProbe(loss), [GradientDiagnostics(...)])``.

    Raises:
        ValueError: when diagnostics are on and the loss is not a `FocalLoss` (the statistics
            need its alpha, gamma and p_t), before any training starts.
    """
    every = config.train.diagnostics_every
    if not every or not context.is_primary:
        return loss, []
    if not isinstance(loss, FocalLoss):
        raise ValueError(
            f"train.diagnostics_every needs a focal-family loss, not {type(loss).__name__}"
        )
    probe = GradientProbe(loss)
    callback = GradientDiagnostics(probe, every, out, tensorboard=config.train.tensorboard)
    logger.info("gradient diagnostics every %d steps to %s", every, Path(out) / "diagnostics.csv")
    return probe, [callback]


@tf.keras.utils.register_keras_serializable(package="fgl_retinanet")
class GradientProbe(tf.keras.losses.Loss):
    """A focal-family loss that also records gradient statistics on flagged steps.

    The value and gradient are exactly those of the wrapped loss; the statistics are computed
    from stopped copies of the inputs, so they add nothing to backpropagation.

    Example:
        >>> probe = GradientProbe(FocalLoss(alpha=0.25, gamma=2.0))
        >>> probe.record.assign(True)
        >>> value = probe(y_true, logits)  # probe.statistics now holds this batch's row

    Args:
        loss: the `FocalLoss` or `FocalGradientLoss` to train with.
    """

    def __init__(self, loss: FocalLoss):
        # Keep the wrapped loss's reduction and name, so compile and logs see no difference.
        super().__init__(reduction=loss.reduction, name=loss.name)
        self.loss = loss
        self.record = tf.Variable(False, trainable=False, name="diagnostics_record")
        self.statistics = tf.Variable(
            tf.zeros([len(STATISTICS)], tf.float32), trainable=False, name="diagnostics"
        )

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        """Returns the wrapped loss; on flagged steps also stores this batch's statistics.

        Args:
            y_true: (batch, anchors, classes + 1) labels and anchor state.
            y_pred: (batch, anchors, classes) logits, or probabilities if not `from_logits`.

        Returns:
            () the wrapped loss's value.
        """
        value = self.loss.call(y_true, y_pred)

        # The assignment is a stateful op, so tf.function runs it although nothing consumes it.
        def store():
            self.statistics.assign(
                batch_statistics(self.loss, tf.stop_gradient(y_true), tf.stop_gradient(y_pred))
            )
            return tf.constant(True)

        tf.cond(self.record, store, lambda: tf.constant(False))
        return value

    def get_config(self) -> dict:
        return {"loss": tf.keras.losses.serialize(self.loss)}

    @classmethod
    def from_config(cls, config: dict) -> "GradientProbe":
        return cls(tf.keras.losses.deserialize(config["loss"]))


def batch_statistics(loss: FocalLoss, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Computes one diagnostics row (`STATISTICS`) of a batch for a focal-family loss.

    Per element, with ``z_t`` the logit signed by the label and ``p_t = sigmoid(z_t)``, the
    gradients with respect to the logit are, before normalisation,
    ``dFGL/dz_t = -alpha_t (1 - p_t)**(gamma + 1)`` and
    ``dFL/dz_t = dFGL/dz_t + alpha_t gamma p_t (1 - p_t)**gamma log(p_t)``, the second term being
    the residual R carried to logit space. Both are <= 0, so magnitudes add.

    Args:
        loss: the loss whose alpha, gamma, input mode and gradient (FL or FGL) apply.
        y_true: (batch, anchors, classes + 1) labels and anchor state.
        y_pred: (batch, anchors, classes) logits, or probabilities if not `loss.from_logits`.

    Returns:
        (len(STATISTICS),) float32 statistics, in the order of `STATISTICS`.
    """
    # The same float32 inputs and masking as the loss itself.
    y_true = tf.cast(y_true, tf.float32)
    y_pred = tf.cast(y_pred, tf.float32)
    labels = y_true[..., :-1]
    anchor_state = y_true[..., -1]
    valid = tf.not_equal(anchor_state, STATE_IGNORE)[..., tf.newaxis]
    valid = tf.broadcast_to(valid, tf.shape(labels))
    y_pred = tf.where(valid, y_pred, 0.0 if loss.from_logits else 0.5)
    is_positive = tf.greater(labels, LABEL_CUTOFF)
    if loss.from_logits:
        # The same p_t as the loss's logit path: sigmoid of the logit signed by the label.
        z_t = tf.where(is_positive, y_pred, -y_pred)
        log_p_t, log_one_minus_p_t = tf.math.log_sigmoid(z_t), tf.math.log_sigmoid(-z_t)
    else:
        log_p_t, log_one_minus_p_t = loss._log_probabilities(is_positive, y_pred)
    alpha_t = tf.where(is_positive, loss.alpha, 1.0 - loss.alpha)
    p_t = tf.exp(log_p_t)

    # Saturation is judged on the probability itself; in probability mode the loss clips there,
    # which zeroes the gradient that these elements really get.
    epsilon = tf.keras.backend.epsilon()
    probability = tf.sigmoid(y_pred) if loss.from_logits else y_pred
    saturated = valid & ((probability <= epsilon) | (probability >= 1.0 - epsilon))

    # Logit-space gradient magnitudes of FGL's part and of the residual, per element.
    modulated = alpha_t * tf.exp((loss.gamma + 1.0) * log_one_minus_p_t)
    residual = -alpha_t * loss.gamma * tf.exp(log_p_t + loss.gamma * log_one_minus_p_t) * log_p_t
    if not loss.from_logits:
        modulated = tf.where(saturated, 0.0, modulated)
        residual = tf.where(saturated, 0.0, residual)
    valid_float = tf.cast(valid, tf.float32)
    modulated *= valid_float
    residual *= valid_float
    trained = modulated if isinstance(loss, FocalGradientLoss) else modulated + residual

    # The loss divides by the positive anchors of the batch; so do its gradients.
    num_positive = tf.reduce_sum(tf.cast(tf.equal(anchor_state, STATE_POSITIVE), tf.float32))
    normalizer = tf.maximum(num_positive, 1.0)
    trained /= normalizer

    # Six bins: (positive, negative) x (hard, medium, easy) by p_t.
    low, high = P_T_BIN_EDGES
    bins = (p_t < low, (p_t >= low) & (p_t < high), p_t >= high)
    gradients, counts = [], []
    for side in (is_positive, ~is_positive):
        for in_bin in bins:
            mask = valid & side & in_bin
            gradients.append(tf.reduce_sum(tf.where(mask, trained, 0.0)))
            counts.append(tf.reduce_sum(tf.cast(mask, tf.float32)))
    focal_total = tf.reduce_sum(modulated + residual)
    residual_share = tf.math.divide_no_nan(tf.reduce_sum(residual), focal_total)
    row = [
        *gradients,
        *counts,
        tf.reduce_sum(trained),
        residual_share,
        tf.reduce_sum(tf.cast(saturated, tf.float32)),
        num_positive,
        normalizer,
    ]
    return tf.stack(row)


class GradientDiagnostics(tf.keras.callbacks.Callback):
    """Raises the probe's flag every `every` steps and writes the row it records (rank 0).

    Steps count from 1 over the whole run (``epoch * steps_per_epoch + batch + 1``); steps 1,
    K + 1, 2K + 1, ... are recorded, so the first batch of a run is always among them. A resumed
    run drops the rows of the epochs it repeats.

    Args:
        probe: the compiled `GradientProbe`.
        every: K, steps between records (> 0).
        out: the run directory; diagnostics.csv and tensorboard/diagnostics go there.
        tensorboard: also write TensorBoard scalars.
    """

    def __init__(self, probe: GradientProbe, every: int, out: Path, tensorboard: bool = True):
        super().__init__()
        if every <= 0:
            raise ValueError(f"diagnostics interval must be positive, got {every}")
        self.probe = probe
        self.every = int(every)
        self.path = Path(out) / "diagnostics.csv"
        self.tensorboard_dir = Path(out) / "tensorboard" / "diagnostics" if tensorboard else None
        self.rows_written = 0
        self.nonfinite_rows = 0
        self._writer = None
        self._write_summaries = None
        self._epoch = 0
        self._pending_step = None
        self._trimmed = False

    def on_train_begin(self, logs=None):
        if self.tensorboard_dir is not None:
            self._writer = tf.summary.create_file_writer(str(self.tensorboard_dir))
            writer, statistics = self._writer, self.probe.statistics

            # One graph call writes every scalar straight from the probe's variable; eager
            # tf.summary.scalar calls cost about 1 ms each on a CPU.
            @tf.function
            def write_summaries(step):
                with writer.as_default(step=step):
                    for index, name in enumerate(STATISTICS):
                        tf.summary.scalar(f"diagnostics/{name}", statistics[index])

            self._write_summaries = write_summaries

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if not self._trimmed:
            # The first epoch of this fit: rows of later epochs belong to a run being resumed.
            _keep_epochs_before(self.path, epoch + 1)
            self._trimmed = True

    def on_train_batch_begin(self, batch, logs=None):
        step = self._epoch * int(self.params.get("steps") or 0) + batch + 1
        if (step - 1) % self.every == 0:
            self.probe.record.assign(True)
            self._pending_step = step

    def on_train_batch_end(self, batch, logs=None):
        if self._pending_step is None:
            return
        step, self._pending_step = self._pending_step, None
        self.probe.record.assign(False)
        values = [float(v) for v in self.probe.statistics.numpy()]
        row = {"epoch": self._epoch + 1, "step": step, **dict(zip(STATISTICS, values))}

        # A non-finite row (NaN logits) is written as it is, and counted rather than fatal.
        if not all(math.isfinite(v) for v in values):
            self.nonfinite_rows += 1
            if self.nonfinite_rows == 1:
                logger.warning("diagnostics at step %d are not finite (NaN or inf logits?)", step)
        _append_row(self.path, row)
        self.rows_written += 1
        if self._write_summaries is not None:
            self._write_summaries(tf.constant(step, tf.int64))

    def on_epoch_end(self, epoch, logs=None):
        if self._writer is not None:
            self._writer.flush()

    def on_train_end(self, logs=None):
        self.probe.record.assign(False)
        if self._writer is not None:
            self._writer.close()
            self._writer = self._write_summaries = None
        if self.nonfinite_rows:
            logger.warning("%d diagnostics rows were not finite", self.nonfinite_rows)


def _append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=DIAGNOSTIC_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.10g}" if isinstance(v, float) else v) for k, v in row.items()})


def _keep_epochs_before(path: Path, epoch: int) -> None:
    """Drops the rows of `epoch` (1-based) and later, which a resumed run records again."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [row for row in rows if row.get("epoch", "").isdigit() and int(row["epoch"]) < epoch]
    if len(kept) == len(rows):
        return
    path.unlink()
    for row in kept:
        _append_row(path, row)
