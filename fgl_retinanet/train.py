"""Training: build everything from a Config, fit with per-epoch mAP, write the run directory.

    fgl-train --config configs/demo_fgl.yaml
    horovodrun -np 4 -H localhost:4 fgl-train --config configs/voc2012_fgl.yaml
    fgl-train --resume runs/voc2012_fgl

Run directory (rank 0 only): config.yaml, log.txt, metrics.csv, snapshots/, tensorboard/,
results.json, results.md. Other Horovod ranks log to <run>.rank_logs/rankN.txt.
"""

import collections
import concurrent.futures
import csv
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from keras_retinanet.losses import smooth_l1

from fgl_retinanet import distributed
from fgl_retinanet.config import Config, resolve_path, save_config
from fgl_retinanet.data import (
    DataError,
    dataset_root,
    load_split,
    make_generator,
    write_data_report,
)
from fgl_retinanet.diagnostics import gradient_diagnostics
from fgl_retinanet.evaluation import (
    average_precisions_all,
    coco_average_precision,
    per_class_table,
)
from fgl_retinanet.losses import build_loss
from fgl_retinanet.model import (
    build_inference_model,
    build_training_model,
    classification_output_name,
    detect,
    load_weights,
)

logger = logging.getLogger("fgl_retinanet")

METRIC_COLUMNS = (
    "epoch", "loss", "regression_loss", "classification_loss", "lr", "mAP", "global_batch",
    "images_seen", "epoch_seconds", "eval_seconds",
)  # fmt: skip


def run_dir(config: Config) -> Path:
    return resolve_path(config.train.output_dir) / config.train.run_name


def train(config: Config, resume: Path | None = None) -> dict:
    """Trains one run and returns its results (also written to results.json on rank 0)."""
    context = distributed.init(config.train.horovod_cycle_ms)
    out = Path(resume) if resume else run_dir(config)
    restore_logging = _setup_logging(context, out)
    # The dtype policy is process-wide in Keras: this run's choice is undone when it returns.
    policy = tf.keras.mixed_precision.global_policy()
    try:
        _experimental_options(config, context)
        return _train(config, resume, context, out)
    except Exception as e:
        # The reason a run stopped belongs in its log file too, not only on the console.
        logger.error("stopped: %s: %s", type(e).__name__, e, extra={"file_only": True})
        raise
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
        restore_logging()


def _train(config: Config, resume: Path | None, context, out: Path) -> dict:
    threads, cores = distributed.configure_devices(
        context, config.train.threads, config.train.pin_cpus
    )
    # Horovod: the same seed on every rank gives the same initial weights and data order.
    tf.keras.utils.set_random_seed(config.train.seed)
    logger.info(
        "process %d of %d (pid %d, %s threads%s%s)", context.rank, context.size, os.getpid(),
        threads or "default", f", bound to cores {cores}" if cores else "",
        f", Horovod cycle {context.cycle_time_ms} ms" if context.cycle_time_ms else "",
    )  # fmt: skip

    # Data: rank 0 generates the toy dataset if needed while the others wait; then every rank
    # parses and validates both splits before building anything expensive.
    if context.is_primary:
        dataset_root(config)
    distributed.barrier(context)
    root = dataset_root(config)
    train_set = _load_split(root, config.data.train_split, config)
    val_set = _load_split(root, config.data.val_split, config)
    if len(train_set) == 0:
        raise DataError(f"training split {config.data.train_split} has no usable images")
    train_batches = make_generator(
        train_set, config, training=True, rank=context.rank, world=context.size
    )

    # Model and losses.
    num_classes = len(config.data.classes)
    model = build_training_model(config, num_classes)
    logger.info("initial weights: %s", load_weights(model, config))
    loss = build_loss(
        config.loss.name,
        alpha=config.loss.alpha,
        gamma=config.loss.gamma,
        from_logits=config.loss.from_logits,
    )
    # Opt-in gradient statistics: with train.diagnostics_every 0 the loss comes back unchanged.
    loss, diagnostics = gradient_diagnostics(config, loss, context, out)

    # Optimizer. NOTE: keras-retinanet passes Adam(lr=...), which TF 2.15 ignores (1e-3 then).
    schedule = LearningRateController(config, context.size, steps_per_epoch=len(train_batches))
    compile_training_model(model, config, context, loss, learning_rate=schedule.rate(0))
    # Create the Adam moments now, so they can be restored and broadcast before step one.
    model.optimizer._create_all_weights(model.trainable_variables)

    # Resume: weights, optimizer state, LR schedule and epoch from the last complete epoch.
    initial_epoch = 0
    stopper = EarlyStopper(config.train.early_stopping_patience)
    if resume:
        initial_epoch = _restore(model, out, schedule, stopper)

    # Horovod: every rank starts from rank 0's weights and optimizer state.
    distributed.broadcast_variables(context, model.variables + model.optimizer.variables())

    # Rank 0 owns every file in the run directory.
    if context.is_primary:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        # The same report fgl-check-data prints, for the splits this run uses.
        write_data_report(
            out / "data_report.json",
            {config.data.train_split: train_set.report, config.data.val_split: val_set.report},
        )
        _truncate_metrics(out / "metrics.csv", initial_epoch)
    padded = train_batches.images_per_rank * context.size - len(train_set)
    logger.info(
        "loss %s (alpha %g, gamma %g, from_logits %s); learning rate %g applied "
        "(base %g, %s scaling over %d processes, %g warmup epochs)",
        config.loss.name, config.loss.alpha, config.loss.gamma, config.loss.from_logits,
        float(tf.keras.backend.get_value(model.optimizer.learning_rate)), config.train.base_lr,
        config.train.lr_scaling, context.size, config.train.warmup_epochs,
    )  # fmt: skip
    logger.info(
        "%d training images: %d steps of %d per process x %d processes (global batch %d%s); "
        "%d validation images; run directory %s",
        len(train_set), len(train_batches), config.train.batch_size, context.size,
        config.train.batch_size * context.size,
        f", {padded} images repeated to give every process equal steps" if padded else "",
        len(val_set), out,
    )  # fmt: skip

    # Callback order matters: averaged metrics first, then LR decisions, evaluation, stopping,
    # and finally the record of the epoch, which saves the state all of them produced.
    recorder = RunRecorder(context, config, out, train_batches, val_set, schedule, stopper)
    evaluator = Evaluator(context, config, val_set, build_inference_model(model, config))
    # The step log is written before the snapshot, so a resumed run never keeps a gap.
    steps = StepLossRecorder(context, config, out)
    callbacks = distributed.metric_averaging(context) + [
        schedule, evaluator, stopper, steps, recorder
    ]
    callbacks += diagnostics
    if context.is_primary and config.train.tensorboard:
        callbacks.append(tf.keras.callbacks.TensorBoard(str(out / "tensorboard"), profile_batch=0))

    started = time.time()
    model.fit(
        _epoch_stream(train_batches, initial_epoch, config, num_classes),
        epochs=config.train.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=len(train_batches),
        callbacks=callbacks,
        # A live progress bar on a terminal, one line per epoch in a log file; none off rank 0.
        verbose=(1 if sys.stdout.isatty() else 2) if context.is_primary else 0,
    )

    # Every rank logs a checksum of its final weights: equal sums prove the ranks agree.
    logger.info("weights checksum %s", weights_checksum(model))
    results = recorder.final_results(time.time() - started, evaluator)
    distributed.barrier(context)
    return results


def compile_training_model(model, config: Config, context, loss, learning_rate: float) -> None:
    """Compiles the training model with its losses and optimizer, as every run does.

    Args:
        loss: the classification loss, from `build_loss`.
    """
    optimizer = tf.keras.optimizers.legacy.Adam(
        learning_rate=learning_rate, clipnorm=config.train.clipnorm
    )
    model.compile(
        optimizer=distributed.wrap_optimizer(
            context, optimizer, loss_scaling=config.train.mixed_precision
        ),
        loss={
            "regression": smooth_l1(config.loss.regression_sigma),
            classification_output_name(config): loss,
        },
        jit_compile=config.train.jit_compile,
    )


class LearningRateController(tf.keras.callbacks.Callback):
    """The learning rate as a pure function of the step plus plateau reductions.

    rate = base_lr x scale x warmup(step) x plateau_factor, where scale is the process count
    under linear scaling and warmup ramps from 1/scale to 1 over `warmup_epochs`. The plateau
    reduction follows keras-retinanet's ReduceLROnPlateau on the training loss; its state is
    saved in snapshots so a resumed run continues with the same rate.
    """

    def __init__(self, config: Config, world_size: int, steps_per_epoch: int):
        super().__init__()
        train = config.train
        self.base_lr = train.base_lr
        # Horovod: a global batch N times larger takes an N times larger step (linear rule).
        self.scale = world_size if train.lr_scaling == "linear" else 1
        self.warmup_steps = round(train.warmup_epochs * steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        self.patience = train.reduce_lr_patience
        self.factor = train.reduce_lr_factor
        self.state = {"plateau_factor": 1.0, "best_loss": None, "wait": 0}
        self._epoch = 0

    def rate(self, step: int) -> float:
        scaled = self.base_lr * self.scale
        if step < self.warmup_steps:
            start = self.base_lr
            scaled = start + (scaled - start) * step / self.warmup_steps
        return scaled * self.state["plateau_factor"]

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        step = self._epoch * self.steps_per_epoch + batch
        tf.keras.backend.set_value(self.model.optimizer.learning_rate, self.rate(step))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logs["lr"] = float(tf.keras.backend.get_value(self.model.optimizer.learning_rate))
        if not self.patience or logs.get("loss") is None:
            return

        # Horovod: `loss` is already the mean over ranks, so every rank decides alike.
        loss = float(logs["loss"])
        best = self.state["best_loss"]
        if best is None or loss < best - 1e-4:
            self.state.update(best_loss=loss, wait=0)
            return
        self.state["wait"] += 1
        if self.state["wait"] >= self.patience:
            self.state["plateau_factor"] *= self.factor
            self.state["wait"] = 0
            logger.info(
                "loss has not improved for %d epochs: learning rate x %g",
                self.patience, self.factor,
            )  # fmt: skip


class Evaluator(tf.keras.callbacks.Callback):
    """Validation mAP after each epoch: rank 0 evaluates, the others wait for its result."""

    def __init__(self, context, config, val_set, inference):
        super().__init__()
        self.context = context
        self.config = config
        self.val_set = val_set
        self.inference = inference
        # The split does not change between epochs: build its ground truth once.
        self.ground_truth = val_set.ground_truth()
        self.last = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        last_epoch = epoch + 1 == self.config.train.epochs
        if not (self.config.eval.every_epoch or last_epoch):
            return
        # Horovod: batch-norm statistics differ per rank; average them so all ranks (and the
        # snapshot) hold one model, then evaluate it once.
        distributed.average_variables(self.context, _moving_statistics(self.model))
        started = time.time()
        value = None
        if self.context.is_primary:
            self.last = self.evaluate()
            value = self.last["mAP"]
        # Horovod: the other ranks wait here and receive rank 0's mAP for their callbacks.
        logs["mAP"] = distributed.broadcast_value(self.context, value)
        logs["eval_seconds"] = time.time() - started

    def evaluate(self) -> dict:
        detections = detect(self.inference, self.val_set, self.config)
        by_metric = average_precisions_all(
            self.ground_truth, detections, self.val_set.classes,
            iou_threshold=self.config.eval.iou_threshold,
        )  # fmt: skip
        return {
            "mAP": by_metric["area"]["mAP"],
            "per_class": by_metric["area"]["per_class"],
            "mAP_11point": by_metric["11point"]["mAP"],
            "per_class_11point": by_metric["11point"]["per_class"],
            "by_metric": by_metric,
            # NOTE: kept until the next epoch so the final results can add COCO AP without a
            # second inference pass (a few hundred MB on VOC val at 100 detections per image).
            "detections": detections,
        }


class EarlyStopper(tf.keras.callbacks.Callback):
    """Stops when validation mAP has not improved for `patience` epochs (0: never)."""

    def __init__(self, patience: int):
        super().__init__()
        self.patience = patience
        self.state = {"best_map": None, "wait": 0}

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("mAP")
        if not self.patience or value is None:
            return
        # Horovod: mAP was broadcast from rank 0, so every rank stops at the same epoch.
        if self.state["best_map"] is None or value > self.state["best_map"]:
            self.state.update(best_map=value, wait=0)
            return
        self.state["wait"] += 1
        if self.state["wait"] >= self.patience:
            logger.info("mAP has not improved for %d epochs: stopping", self.patience)
            self.model.stop_training = True


class RunRecorder(tf.keras.callbacks.Callback):
    """Per epoch on rank 0: snapshot (weights, optimizer, schedule), then the metrics.csv row."""

    def __init__(self, context, config, out, train_batches, val_set, schedule, stopper):
        super().__init__()
        self.context = context
        self.config = config
        self.out = Path(out)
        self.train_batches = train_batches
        self.val_report = val_set.report
        self.schedule = schedule
        self.stopper = stopper
        self.history = _read_metrics(self.out / "metrics.csv") if context.is_primary else []
        self._epoch_started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        eval_seconds = logs.pop("eval_seconds", 0.0)
        seconds = time.time() - self._epoch_started - eval_seconds
        if not self.context.is_primary:
            return
        # Horovod's metric averaging leaves numpy scalars in logs: store plain floats.
        row = {
            "epoch": epoch + 1,
            "loss": _float(logs.get("loss")),
            "regression_loss": _float(logs.get("regression_loss")),
            "classification_loss": _float(
                logs.get(f"{classification_output_name(self.config)}_loss")
            ),
            "lr": _float(logs.get("lr")),
            "mAP": _float(logs.get("mAP")),
            "global_batch": self.config.train.batch_size * self.context.size,
            "images_seen": self.train_batches.images_per_rank * self.context.size,
            "epoch_seconds": round(seconds, 2),
            "eval_seconds": round(eval_seconds, 2),
        }

        # The snapshot comes first: a metrics row never exists without its snapshot.
        self._snapshot(epoch + 1)
        self.history.append(row)
        _append_metrics(self.out / "metrics.csv", row)
        logger.info(
            "epoch %d/%d: loss %.4f (regression %.4f, classification %.4f), lr %g, mAP %s, "
            "%d images, %.1fs",
            row["epoch"], self.config.train.epochs, row["loss"], row["regression_loss"],
            row["classification_loss"], row["lr"], _fmt(row["mAP"]), row["images_seen"],
            seconds,
        )  # fmt: skip

    def final_results(self, seconds: float, evaluator: "Evaluator") -> dict:
        if not self.context.is_primary:
            return {}
        evaluation = evaluator.last or evaluator.evaluate()
        maps = [row["mAP"] for row in self.history if row["mAP"] is not None]
        results = {
            "run": self.config.train.run_name,
            "loss": self.config.loss.name,
            "gamma": self.config.loss.gamma,
            "alpha": self.config.loss.alpha,
            "epochs": len(self.history),
            "processes": self.context.size,
            "global_batch": self.config.train.batch_size * self.context.size,
            "scaled_lr": self.schedule.base_lr * self.schedule.scale,
            "images_seen": sum(row["images_seen"] for row in self.history),
            "mAP": evaluation["mAP"],
            "per_class": evaluation["per_class"],
            "mAP_11point": evaluation["mAP_11point"],
            "per_class_11point": evaluation["per_class_11point"],
            "best_mAP": max(maps) if maps else None,
            **_coco_results(evaluator, evaluation["detections"]),
            "history": self.history,
            "train_seconds": round(seconds, 1),
            # What parsing fixed or left out, per split, with the files named.
            "data_report": {
                "train": self.train_batches.dataset.report.to_dict(),
                "val": self.val_report.to_dict(),
            },
            "unreadable_during_training": sorted(
                str(self.train_batches.dataset.records[i].image_path)
                for i in self.train_batches.unreadable_images
            ),
        }
        _atomic_write(self.out / "results.json", json.dumps(results, indent=2))
        table = per_class_table(evaluation["by_metric"])
        _atomic_write(self.out / "results.md", f"# {results['run']}\n\n{table}\n")
        logger.info("final validation AP:\n%s", table)
        return results

    def _snapshot(self, epoch: int) -> None:
        # Every file goes to a temporary name and is renamed, and latest.txt moves last, so a
        # kill at any moment leaves the previous complete snapshot as the latest one.
        folder = self.out / "snapshots"
        folder.mkdir(exist_ok=True)
        stem = f"epoch_{epoch:03d}"
        partial = folder / f".{stem}.h5.partial"
        self.model.save_weights(str(partial), save_format="h5")
        os.replace(partial, folder / f"{stem}.h5")
        with open(folder / f".{stem}.optimizer.partial", "wb") as f:
            np.savez(f, *self.model.optimizer.get_weights())
        os.replace(folder / f".{stem}.optimizer.partial", folder / f"{stem}.optimizer.npz")
        state = {
            "epoch": epoch,
            "schedule": self.schedule.state,
            "early_stopping": self.stopper.state,
            "processes": self.context.size,
            "loss_scale": loss_scale_state(self.model.optimizer),
        }
        _atomic_write(folder / f"{stem}.state.json", json.dumps(state, indent=2))
        _atomic_write(folder / "latest.txt", stem + "\n")


class StepLossRecorder(tf.keras.callbacks.Callback):
    """Per-step losses in steps.csv (rank 0), for the training-noise statistics of fgl-compare.

    Also logs the checksum of the initial weights when a run starts from epoch 0: paired runs
    (same seed, different loss) must show the same one.

    Columns: epoch (1-based), step (global, 1-based), loss, regression_loss,
    classification_loss. Under Horovod the values are rank 0's own batches.
    """

    COLUMNS = ("epoch", "step", "loss", "regression_loss", "classification_loss")

    def __init__(self, context, config: Config, out: Path):
        super().__init__()
        self.enabled = context.is_primary
        self.path = Path(out) / "steps.csv"
        self.classification_key = f"{classification_output_name(config)}_loss"
        self.steps_per_epoch = 0
        self._epoch = 0
        self._first_epoch = True
        self._previous = {}
        self._rows = []

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._previous = {}
        self._rows = []
        if not self._first_epoch or not self.enabled:
            return
        self._first_epoch = False
        self.steps_per_epoch = self.params.get("steps") or 0
        if epoch == 0:
            logger.info("checksum of the initial weights %s", weights_checksum(self.model))
        # Rows past the resumed epoch belong to an epoch that runs again.
        kept = []
        if self.path.is_file():
            with open(self.path) as f:
                kept = [row for row in csv.DictReader(f) if int(row["epoch"]) <= epoch]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS)
            writer.writeheader()
            writer.writerows(kept)

    def on_train_batch_end(self, batch, logs=None):
        if not self.enabled or not logs:
            return
        # Keras reports running means over the epoch; undo the mean to get this step's value.
        # NOTE: float32 means make this exact to about step x 1e-7 x the loss.
        row = {"epoch": self._epoch + 1, "step": self._epoch * self.steps_per_epoch + batch + 1}
        for column, key in zip(self.COLUMNS[2:], ("loss", "regression_loss",
                                                  self.classification_key)):  # fmt: skip
            mean = logs.get(key)
            if mean is None:
                row[column] = ""
                continue
            mean = float(mean)
            row[column] = (batch + 1) * mean - batch * self._previous.get(key, 0.0)
            self._previous[key] = mean
        self._rows.append(row)

    def on_epoch_end(self, epoch, logs=None):
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.COLUMNS).writerows(self._rows)
        self._rows = []


def weights_checksum(model) -> str:
    """SHA-1 of every weight's bytes, in model order."""
    digest = hashlib.sha1()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def loss_scale_state(optimizer) -> dict | None:
    """The dynamic loss scale and its growth counter under mixed precision, else None.

    Keras' LossScaleOptimizer leaves both out of get_weights(), so a snapshot of the Adam
    weights alone would restart a resumed run at the initial scale.
    """
    counter = getattr(optimizer, "dynamic_counter", None)
    if counter is None:
        return None
    return {"scale": float(optimizer.loss_scale.numpy()), "counter": int(counter.numpy())}


def restore_loss_scale(optimizer, state: dict | None) -> None:
    """Sets what loss_scale_state saved (nothing for None or an optimizer without scaling)."""
    if state is None or getattr(optimizer, "dynamic_counter", None) is None:
        return
    # NOTE: Keras has no public setter for the current scale; the variable is its own.
    optimizer._loss_scale.current_loss_scale.assign(state["scale"])
    optimizer.dynamic_counter.assign(state["counter"])


def _coco_results(evaluator: "Evaluator", detections: dict) -> dict:
    """COCO AP@[.5:.95], AP50, AP75 and per-class AP of the final detections."""
    coco = coco_average_precision(evaluator.ground_truth, detections, evaluator.val_set.classes)
    return {
        "coco_AP": coco["AP"],
        "coco_AP50": coco["AP50"],
        "coco_AP75": coco["AP75"],
        "per_class_coco": coco["per_class"],
    }


def _moving_statistics(model) -> list:
    return [v for v in model.non_trainable_variables if "moving_" in v.name]


def _epoch_stream(batches, initial_epoch: int, config: Config, num_classes: int):
    """A tf.data stream of every remaining epoch's batches in a fixed order.

    Keras' own Sequence handling re-creates iterators per epoch and calls on_epoch_end from
    worker threads; one stream over all epochs keeps each epoch's order a pure function of
    (seed, epoch) and each image's augmentation one of (seed, rank, epoch, position), which
    resuming and Horovod sharding rely on.
    """
    workers = config.train.workers

    def build(epoch, step, group):
        # Each image's transform depends on (seed, rank, epoch, position) only, so the thread
        # that builds a batch, and the epochs run before in this process, cannot change it.
        return batches.build_batch(group, batches.batch_transforms(step, epoch))

    def generate():
        for epoch in range(initial_epoch, config.train.epochs):
            batches.set_epoch(epoch)
            groups = list(batches.groups)
            if workers <= 0:
                yield from (build(epoch, step, group) for step, group in enumerate(groups))
                continue
            # Bounded, ordered prefetch: at most 2 x workers batches in memory.
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                queue = collections.deque()
                for step, group in enumerate(groups):
                    queue.append(pool.submit(build, epoch, step, group))
                    if len(queue) >= 2 * workers:
                        yield queue.popleft().result()
                while queue:
                    yield queue.popleft().result()

    signature = (
        tf.TensorSpec((None, None, None, 3), tf.float32),
        (
            tf.TensorSpec((None, None, 5), tf.float32),
            tf.TensorSpec((None, None, num_classes + 1), tf.float32),
        ),
    )
    return tf.data.Dataset.from_generator(
        lambda: ((images, tuple(targets)) for images, targets in generate()),
        output_signature=signature,
    ).prefetch(1)


def _experimental_options(config: Config, context) -> None:
    """Warns about experimental speed options and applies the precision policy for this run."""
    if config.train.jit_compile:
        distributed.check_jit_compile(context)
        logger.warning(
            "train.jit_compile is experimental: the train step is compiled with XLA, once per "
            "input shape (images of a new size recompile)"
        )
    if config.train.mixed_precision:
        logger.warning(
            "train.mixed_precision is experimental: layers compute in float16 (fast on GPUs with "
            "tensor cores, slow on CPUs), losses in float32, with dynamic loss scaling"
        )
        tf.keras.mixed_precision.set_global_policy("mixed_float16")


def _load_split(root: Path, split: str, config: Config) -> "VocDataset":
    dataset = load_split(root, split, config)
    # The fgl-check-data summary (it names root and split); all of it in data_report.json.
    logger.info("%s", dataset.report.summary())
    return dataset


def _restore(model, out: Path, schedule, stopper) -> int:
    folder = out / "snapshots"
    latest = folder / "latest.txt"
    if not latest.is_file():
        raise FileNotFoundError(f"--resume {out}: no snapshots/latest.txt in that directory")
    stem = latest.read_text().strip()
    model.load_weights(str(folder / f"{stem}.h5"))
    with np.load(folder / f"{stem}.optimizer.npz") as arrays:
        model.optimizer.set_weights([arrays[f"arr_{i}"] for i in range(len(arrays.files))])
    state = json.loads((folder / f"{stem}.state.json").read_text())
    schedule.state.update(state["schedule"])
    stopper.state.update(state["early_stopping"])
    # Snapshots from before the loss scale was saved have no such key: it restarts then.
    restore_loss_scale(model.optimizer, state.get("loss_scale"))
    logger.info(
        "resumed from %s (epoch %d, optimizer iteration %d, plateau factor %g)",
        stem, state["epoch"], int(model.optimizer.iterations.numpy()),
        schedule.state["plateau_factor"],
    )  # fmt: skip
    return state["epoch"]


def _read_metrics(path: Path) -> list:
    if not path.is_file():
        return []
    with open(path) as f:
        return [
            {k: (int(v) if k in ("epoch", "global_batch", "images_seen") else _float(v or None))
             for k, v in row.items() if k in METRIC_COLUMNS}
            for row in csv.DictReader(f)
        ]  # fmt: skip


def _truncate_metrics(path: Path, epoch: int) -> None:
    # Rows past the resumed epoch come from an epoch that will run again.
    rows = [row for row in _read_metrics(path) if row["epoch"] <= epoch]
    if path.is_file():
        path.unlink()
    for row in rows:
        _append_metrics(path, row)


def _append_metrics(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def _atomic_write(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def _setup_logging(context, out: Path):
    """Rank 0 logs to the console and log.txt; other ranks only to their own file.

    Returns:
        A function that removes these handlers again (train() may be called repeatedly in one
        process, e.g. by fgl-demo and the tests).
    """
    root_logger = logging.getLogger("fgl_retinanet")
    previous = (root_logger.level, list(root_logger.handlers), root_logger.propagate)
    root_logger.setLevel(logging.INFO)
    root_logger.handlers.clear()
    root_logger.propagate = False
    formatter = logging.Formatter("[%(asctime)s rank %(rank)s] %(message)s", "%H:%M:%S")
    if context.is_primary:
        out.mkdir(parents=True, exist_ok=True)
        console = logging.StreamHandler()
        # The CLI prints the final error itself; the console needs it once.
        console.addFilter(lambda record: not getattr(record, "file_only", False))
        handlers = [console, logging.FileHandler(out / "log.txt")]
    else:
        logs = out.parent / f"{out.name}.rank_logs"
        logs.mkdir(parents=True, exist_ok=True)
        handlers = [logging.FileHandler(logs / f"rank{context.rank}.txt")]
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(_RankFilter(context.rank))
        root_logger.addHandler(handler)

    def restore():
        for handler in handlers:
            handler.close()
        root_logger.setLevel(previous[0])
        root_logger.handlers[:] = previous[1]
        root_logger.propagate = previous[2]

    return restore


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record):
        record.rank = self.rank
        return True


def _float(value) -> float | None:
    return None if value is None else float(value)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
