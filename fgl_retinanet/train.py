"""Training: build everything from a Config, fit with per-epoch mAP, write the run directory.

    fgl-train --config configs/demo_fgl.yaml
    horovodrun -np 4 -H localhost:4 fgl-train --config configs/voc2012_fgl.yaml

Run directory (rank 0 only): config.yaml, log.txt, metrics.csv, snapshots/, tensorboard/,
results.json, results.md.
"""

import collections
import concurrent.futures
import csv
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import tensorflow as tf
from keras_retinanet.losses import smooth_l1

from fgl_retinanet import distributed
from fgl_retinanet.config import Config, resolve_path, save_config
from fgl_retinanet.data import DataError, VocDataset, generate_toy_dataset, make_generator
from fgl_retinanet.evaluation import average_precisions, per_class_table
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
    "epoch", "loss", "regression_loss", "classification_loss", "lr", "mAP", "images_seen",
    "epoch_seconds",
)  # fmt: skip


def dataset_root(config: Config) -> Path:
    """The VOC directory to read; the toy dataset is generated there on first use."""
    if config.data.dataset == "toy":
        toy = config.data.toy
        name = f"toy_{toy.image_size}px_{toy.num_train}_{toy.num_val}_seed{toy.seed}"
        root = resolve_path(config.data.root or "data/generated") / name
        return generate_toy_dataset(root, toy.num_train, toy.num_val, toy.image_size, toy.seed)
    return resolve_path(config.data.root)


def run_dir(config: Config) -> Path:
    return resolve_path(config.train.output_dir) / config.train.run_name


def train(config: Config, resume: Path | None = None) -> dict:
    """Trains one run and returns its results (also written to results.json on rank 0)."""
    context = distributed.init()
    out = Path(resume) if resume else run_dir(config)
    _setup_logging(context, out)
    distributed.configure_devices(context, config.train.threads)
    tf.keras.utils.set_random_seed(config.train.seed)

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

    # Model, losses and an optimizer whose learning rate is really the configured one.
    num_classes = len(config.data.classes)
    model = build_training_model(config, num_classes)
    logger.info("initial weights: %s", load_weights(model, config))
    loss = build_loss(
        config.loss.name,
        alpha=config.loss.alpha,
        gamma=config.loss.gamma,
        from_logits=config.loss.from_logits,
    )
    # NOTE: keras-retinanet passes Adam(lr=...), which TF 2.15 ignores (it trains at 1e-3).
    optimizer = tf.keras.optimizers.legacy.Adam(
        learning_rate=config.train.base_lr, clipnorm=config.train.clipnorm
    )
    model.compile(
        optimizer=distributed.wrap_optimizer(context, optimizer),
        loss={
            "regression": smooth_l1(config.loss.regression_sigma),
            classification_output_name(config): loss,
        },
    )
    applied_lr = float(tf.keras.backend.get_value(model.optimizer.learning_rate))
    logger.info(
        "loss %s (alpha %g, gamma %g, from_logits %s); learning rate %g applied",
        config.loss.name, config.loss.alpha, config.loss.gamma, config.loss.from_logits,
        applied_lr,
    )  # fmt: skip

    # Resume: weights and epoch from the run directory's latest snapshot.
    initial_epoch = 0
    if resume:
        initial_epoch = _restore(model, out)

    # Rank 0 owns every file in the run directory.
    if context.is_primary:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    steps = len(train_batches)
    logger.info(
        "%d training images (%d steps of %d per rank, %d ranks), %d validation images; "
        "run directory %s",
        len(train_set), steps, config.train.batch_size, context.size, len(val_set), out,
    )  # fmt: skip

    inference = build_inference_model(model, config)
    recorder = EpochRecorder(context, config, val_set, inference, out, train_batches)
    callbacks = distributed.callbacks(context) + [recorder]
    if context.is_primary and config.train.tensorboard:
        callbacks.append(tf.keras.callbacks.TensorBoard(str(out / "tensorboard"), profile_batch=0))

    started = time.time()
    dataset = _epoch_stream(train_batches, initial_epoch, config, num_classes)
    model.fit(
        dataset,
        epochs=config.train.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps,
        callbacks=callbacks,
        # A live progress bar on a terminal, one line per epoch in a log file; none off rank 0.
        verbose=(1 if sys.stdout.isatty() else 2) if context.is_primary else 0,
    )
    results = recorder.final_results(time.time() - started)
    if context.is_primary:
        _write_results(results, out)
    distributed.barrier(context)
    return results


class EpochRecorder(tf.keras.callbacks.Callback):
    """Per epoch: validation mAP, metrics.csv row, snapshot (all on rank 0)."""

    def __init__(self, context, config, val_set, inference, out, train_batches):
        super().__init__()
        self.context = context
        self.config = config
        self.val_set = val_set
        self.inference = inference
        self.out = Path(out)
        self.train_batches = train_batches
        self.history = []
        self.last_eval = None
        self._epoch_started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        seconds = time.time() - self._epoch_started
        if not self.context.is_primary:
            return

        # Validation mAP with devkit rules, from this epoch's weights.
        if self.config.eval.every_epoch or epoch + 1 == self.config.train.epochs:
            self.last_eval = self.evaluate()
            logs["mAP"] = self.last_eval["mAP"]
        # Horovod's metric averaging leaves numpy scalars in logs: store plain floats.
        row = {
            "epoch": epoch + 1,
            "loss": _float(logs.get("loss")),
            "regression_loss": _float(logs.get("regression_loss")),
            "classification_loss": _float(
                logs.get(f"{classification_output_name(self.config)}_loss")
            ),
            "lr": float(tf.keras.backend.get_value(self.model.optimizer.learning_rate)),
            "mAP": logs.get("mAP"),
            "images_seen": len(self.train_batches.dataset),
            "epoch_seconds": round(seconds, 2),
        }
        self.history.append(row)
        self._append_csv(row)
        logger.info(
            "epoch %d/%d: loss %.4f (regression %.4f, classification %.4f), lr %g, mAP %s, %.1fs",
            row["epoch"], self.config.train.epochs, row["loss"], row["regression_loss"],
            row["classification_loss"], row["lr"], _fmt(row["mAP"]), seconds,
        )  # fmt: skip
        self._snapshot(epoch + 1)

    def evaluate(self) -> dict:
        detections = detect(self.inference, self.val_set, self.config)
        ground_truth = self.val_set.ground_truth()
        results = {
            metric: average_precisions(
                ground_truth, detections, self.val_set.classes, metric=metric,
                iou_threshold=self.config.eval.iou_threshold,
            )  # fmt: skip
            for metric in ("area", "11point")
        }
        area = results["area"]
        return {
            "mAP": area["mAP"],
            "per_class": area["per_class"],
            "mAP_11point": results["11point"]["mAP"],
            "per_class_11point": results["11point"]["per_class"],
            "by_metric": results,
            "detections": sum(len(v) for v in detections.values()),
        }

    def final_results(self, seconds: float) -> dict:
        if self.last_eval is None and self.context.is_primary:
            self.last_eval = self.evaluate()
        evaluation = self.last_eval or {}
        maps = [row["mAP"] for row in self.history if row["mAP"] is not None]
        return {
            "run": self.config.train.run_name,
            "loss": self.config.loss.name,
            "gamma": self.config.loss.gamma,
            "alpha": self.config.loss.alpha,
            "epochs": self.config.train.epochs,
            "mAP": evaluation.get("mAP"),
            "per_class": evaluation.get("per_class"),
            "mAP_11point": evaluation.get("mAP_11point"),
            "per_class_11point": evaluation.get("per_class_11point"),
            "best_mAP": max(maps) if maps else None,
            "history": self.history,
            "train_seconds": round(seconds, 1),
            "data_warnings": {
                "clipped_boxes": self.train_batches.clipped_boxes,
                "dropped_boxes": self.train_batches.dropped_boxes,
                "size_mismatches": self.train_batches.size_mismatches,
            },
            "_by_metric": evaluation.get("by_metric"),
        }

    def _append_csv(self, row: dict) -> None:
        path = self.out / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})

    def _snapshot(self, epoch: int) -> None:
        # Write to a temporary name and rename, so a kill never leaves a half-written snapshot.
        folder = self.out / "snapshots"
        folder.mkdir(exist_ok=True)
        final = folder / f"epoch_{epoch:03d}.h5"
        partial = folder / f".epoch_{epoch:03d}.h5.partial"
        self.model.save_weights(str(partial), save_format="h5")
        os.replace(partial, final)
        (folder / "latest.txt").write_text(final.name + "\n")


def _epoch_stream(batches, initial_epoch: int, config: Config, num_classes: int):
    """A tf.data stream of every remaining epoch's batches in a fixed order.

    Keras' own Sequence handling re-creates iterators per epoch and calls on_epoch_end from
    worker threads; one stream over all epochs keeps each epoch's order a pure function of
    (seed, epoch), which resuming and Horovod sharding rely on.
    """
    workers = config.train.workers
    lock = threading.Lock()

    def build(group):
        # keras-retinanet's transform generator is a plain Python generator: one caller at a time.
        with lock:
            transforms = [batches.next_transform() for _ in group]
        return batches.build_batch(group, transforms)

    def generate():
        for epoch in range(initial_epoch, config.train.epochs):
            batches.set_epoch(epoch)
            groups = list(batches.groups)
            if workers <= 0:
                yield from (build(group) for group in groups)
                continue
            # Bounded, ordered prefetch: at most 2 x workers batches in memory.
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                queue = collections.deque()
                for group in groups:
                    queue.append(pool.submit(build, group))
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


def _load_split(root: Path, split: str, config: Config) -> VocDataset:
    dataset = VocDataset(root, split, config.data.classes, config.data.unknown_classes)
    logger.info("%s/%s: %s", root.name, split, dataset.report.summary())
    return dataset


def _restore(model, out: Path) -> int:
    latest = out / "snapshots" / "latest.txt"
    if not latest.is_file():
        raise FileNotFoundError(f"--resume {out}: no snapshots/latest.txt in that directory")
    name = latest.read_text().strip()
    model.load_weights(str(out / "snapshots" / name))
    epoch = int(name.split("_")[1].split(".")[0])
    logger.info("resumed from %s (epoch %d)", name, epoch)
    return epoch


def _write_results(results: dict, out: Path) -> None:
    by_metric = results.pop("_by_metric", None)
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    if by_metric:
        table = per_class_table(by_metric)
        (out / "results.md").write_text(f"# {results['run']}\n\n{table}\n")
        logger.info("final validation AP:\n%s", table)


def _setup_logging(context, out: Path) -> None:
    # Rank 0 logs to the console and log.txt; other ranks only to their own file.
    root_logger = logging.getLogger("fgl_retinanet")
    root_logger.setLevel(logging.INFO)
    root_logger.handlers.clear()
    root_logger.propagate = False
    formatter = logging.Formatter("[%(asctime)s rank %(rank)s] %(message)s", "%H:%M:%S")
    if context.is_primary:
        out.mkdir(parents=True, exist_ok=True)
        handlers = [logging.StreamHandler(), logging.FileHandler(out / "log.txt")]
    else:
        logs = out.parent / f"{out.name}.rank_logs"
        logs.mkdir(parents=True, exist_ok=True)
        handlers = [logging.FileHandler(logs / f"rank{context.rank}.txt")]
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(_RankFilter(context.rank))
        root_logger.addHandler(handler)


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

