"""Step time of training with gradient diagnostics on (every K steps) against off, side by side.

    .venv/bin/python benchmarks/diagnostics_overhead.py --every 10 --repeats 6 --steps 20

The demo configuration (tiny backbone, 128 px toy images, batch 8) is built twice in one
process, with identical initial weights, through the same calls as `fgl_retinanet.train`:
`gradient_diagnostics` then `model.compile` with Adam, smooth-L1 and the classification loss.
"off" is what training runs with `train.diagnostics_every: 0`: the check below asserts that
`gradient_diagnostics` then returns the very loss object it was given and no callback, so the
compiled step is the one that ran before diagnostics existed. The two models then alternate
single steps over the same in-memory batches (the order flips every step, so load drift hits
both alike), each step driven as Keras' fit loop drives it: the callbacks'
`on_train_batch_begin`, the compiled train function, a wait for its result, then
`on_train_batch_end`; a step is timed across all of it, so the diagnostics callback's own work
(flag, reading the row, CSV and TensorBoard writes) is included. Batches are built before
timing, so data loading, equal for both, does not dilute the ratio.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=10, help="K of train.diagnostics_every")
    parser.add_argument("--repeats", type=int, default=6, help="passes of --steps steps")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per pass")
    parser.add_argument("--loss", default="focal", help="loss.name")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    from keras_retinanet.losses import smooth_l1

    from fgl_retinanet.config import load_config
    from fgl_retinanet.data import dataset_root, load_split, make_generator
    from fgl_retinanet.diagnostics import gradient_diagnostics
    from fgl_retinanet.distributed import Context
    from fgl_retinanet.losses import build_loss
    from fgl_retinanet.model import build_training_model, classification_output_name

    work = Path(tempfile.mkdtemp(prefix="fgl_diag_bench_"))
    load_before = _uptime()

    # The demo configuration, with enough toy images for a few distinct batches.
    base = [
        f"data.root={work / 'data'}", "data.toy.num_train=64", "data.toy.num_val=8",
        f"loss.name={args.loss}",
    ]  # fmt: skip
    configs = {
        "off": load_config(REPOSITORY / "configs/demo_base.yaml", base),
        "on": load_config(
            REPOSITORY / "configs/demo_base.yaml", [*base, f"train.diagnostics_every={args.every}"]
        ),
    }
    config = configs["off"]
    tf.keras.utils.set_random_seed(config.train.seed)
    root = dataset_root(config)
    dataset = load_split(root, config.data.train_split, config)
    batches = make_generator(dataset, config, training=True)
    batches.set_epoch(0)
    built = [batches.build_batch(group, batches.batch_transforms(step))
             for step, group in enumerate(batches.groups)]  # fmt: skip
    images = np.concatenate([b[0] for b in built])
    regression = np.concatenate([b[1][0] for b in built])
    classification = np.concatenate([b[1][1] for b in built])
    data = (
        tf.data.Dataset.from_tensor_slices((images, (regression, classification)))
        .batch(config.train.batch_size, drop_remainder=True)
        .repeat()
    )

    # Two models with the same weights, compiled as fgl_retinanet.train compiles them.
    models, callbacks = {}, {}
    weights = None
    for name, variant in configs.items():
        tf.keras.utils.set_random_seed(variant.train.seed)
        model = build_training_model(variant, len(variant.data.classes))
        if weights is None:
            weights = model.get_weights()
        model.set_weights(weights)
        loss = build_loss(variant.loss.name, alpha=variant.loss.alpha, gamma=variant.loss.gamma,
                          from_logits=variant.loss.from_logits)  # fmt: skip
        compiled_loss, extra = gradient_diagnostics(variant, loss, Context(), work / name)
        if name == "off":
            # Off means the unchanged loss object and no callback: the pre-diagnostics path.
            assert compiled_loss is loss and extra == [], "diagnostics off changed the step"
        (work / name).mkdir(parents=True, exist_ok=True)
        model.compile(
            optimizer=tf.keras.optimizers.legacy.Adam(
                learning_rate=variant.train.base_lr, clipnorm=variant.train.clipnorm
            ),
            loss={
                "regression": smooth_l1(variant.loss.regression_sigma),
                classification_output_name(variant): compiled_loss,
            },
        )
        models[name], callbacks[name] = model, extra

    # Alternate single steps between the variants (the order flips every step), driving each
    # compiled train function and its callbacks as Keras' fit loop does. A "repeat" is one
    # pass of steps + 1 batches as epoch 0; its batch 0 is not timed, and repeat 0 (graph
    # tracing) is left out.
    iterators = {name: iter(data) for name in models}
    for name, model in models.items():
        model.make_train_function()
        for callback in callbacks[name]:
            callback.set_model(model)
            callback.set_params({"steps": args.steps + 1, "epochs": 1, "verbose": 0})
            callback.on_train_begin()
    timers = {name: [] for name in models}
    order = list(models)
    for repeat in range(args.repeats + 1):
        times = {name: [] for name in models}
        for name in models:
            for callback in callbacks[name]:
                callback.on_epoch_begin(0)
        for batch in range(args.steps + 1):
            for name in order if (repeat + batch) % 2 == 0 else reversed(order):
                started = time.perf_counter()
                for callback in callbacks[name]:
                    callback.on_train_batch_begin(batch)
                logs = models[name].train_function(iterators[name])
                # Wait for the step as fit does before its batch-end callbacks.
                logs = {key: float(value) for key, value in logs.items()}
                for callback in callbacks[name]:
                    callback.on_train_batch_end(batch, logs)
                times[name].append(time.perf_counter() - started)
        if repeat > 0:
            for name in models:
                timers[name].append(times[name][1:])
    for name in models:
        for callback in callbacks[name]:
            callback.on_train_end()

    # Batch b of a repeat is step b + 1, recorded when b % K == 0; batch 0 is not timed.
    recorded = [batch % args.every == 0 for batch in range(1, args.steps + 1)]
    summary = {}
    for name, runs in timers.items():
        flat = [t for run in runs for t in run]
        summary[name] = {
            "mean_ms": 1e3 * statistics.fmean(flat),
            "median_ms": 1e3 * statistics.median(flat),
            "steps": len(flat),
            "per_repeat_mean_ms": [1e3 * statistics.fmean(run) for run in runs],
        }
    # Under contention single steps can take several times their usual time, so the medians
    # carry the comparison; the means are shown for completeness.
    # Amortised: on against off at the same positions of the passes, recording positions and
    # the others apart, weighted by how often each occurs.
    by_position = {}
    for name, runs in timers.items():
        for kind, wanted in (("recording", True), ("other", False)):
            times = [t for run in runs for t, rec in zip(run, recorded) if rec == wanted]
            # With K = 1 every position records: no "other" positions exist.
            by_position[(name, kind)] = statistics.median(times) if times else 0.0
            summary[name][f"{kind}_step_median_ms"] = 1e3 * by_position[(name, kind)]
    share = sum(recorded) / len(recorded)
    extra = share * (by_position[("on", "recording")] - by_position[("off", "recording")]) + (
        1 - share
    ) * (by_position[("on", "other")] - by_position[("off", "other")])
    off_median = summary["off"]["median_ms"]
    overhead_median = summary["on"]["median_ms"] / off_median - 1.0
    overhead_mean = summary["on"]["mean_ms"] / summary["off"]["mean_ms"] - 1.0
    overhead_amortised = 1e3 * extra / off_median
    # Paired: each on step against the off step run right next to it (same batch position).
    pairs = [
        (on, off)
        for on_run, off_run in zip(timers["on"], timers["off"])
        for on, off in zip(on_run, off_run)
    ]
    overhead_paired = statistics.fmean(on - off for on, off in pairs) / statistics.fmean(
        off for _, off in pairs
    )
    rows = len((work / "on" / "diagnostics.csv").read_text().splitlines()) - 1
    shutil.rmtree(work, ignore_errors=True)
    result = {
        "every": args.every, "loss": args.loss, "steps_per_pass": args.steps,
        "repeats": args.repeats, "variants": summary, "overhead_median": overhead_median,
        "overhead_mean": overhead_mean, "overhead_amortised": overhead_amortised,
        "overhead_paired": overhead_paired,
        "diagnostics_rows": rows, "load_before": load_before, "load_after": _uptime(),
    }  # fmt: skip

    print(
        f"diagnostics every {args.every} steps, loss {args.loss}, {args.repeats} x {args.steps} "
        f"steps per variant (interleaved), batch {config.train.batch_size}"
    )
    print("| variant | median step (ms) | mean step (ms) |")
    print("|:---|---:|---:|")
    for name in ("off", "on"):
        print(f"| {name} | {summary[name]['median_ms']:.1f} | {summary[name]['mean_ms']:.1f} |")
    for name in ("off", "on"):
        recording_ms = summary[name]["recording_step_median_ms"]
        print(f"| {name}, recording positions | {recording_ms:.1f} | |")
        print(f"| {name}, other positions | {summary[name]['other_step_median_ms']:.1f} | |")
    print(
        f"overhead on / off - 1: medians {100 * overhead_median:+.1f} %, means "
        f"{100 * overhead_mean:+.1f} %, amortised by position {100 * overhead_amortised:+.1f} %, "
        f"paired steps (mean difference / mean off) {100 * overhead_paired:+.1f} %"
    )
    print(f"{rows} diagnostics rows written")
    print(f"load average before: {load_before}; after: {result['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
