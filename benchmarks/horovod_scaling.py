"""Horovod scaling on CPU: 2 processes x 1 thread against 1 process x 1 thread, same global work.

    .venv/bin/python benchmarks/horovod_scaling.py [--epochs 4] [--out benchmarks/results]

Every run trains the demo configuration (tiny backbone, 128 px toy images) for the same number
of images with global batch 8: one process at batch 8, or two at batch 4 each. The steady-state
epoch time (epochs after the first, which includes graph tracing; no evaluation) gives

    scaling efficiency = T(1 process) / (2 x T(2 processes))

Two baselines: the single process bound to one core (what "1 x 1 thread" means: the second
core is what the second rank adds), and unbound, where its loader thread spreads onto the idle
second core. Two-process runs with and without `train.pin_cpus` show what binding changes, and
runs with other Horovod cycle times (`--cycle-ms`, e.g. 1, Horovod's own default) what our CPU
default cycle (`distributed.CPU_CYCLE_TIME_MS`) changes.

The all-reduce share is measured separately under horovodrun: the time to average tensors of
exactly the model's gradient shapes (grouped, as Horovod's tensor fusion does), divided by the
2-process step time.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMON = [
    "--config", "configs/demo_fgl.yaml", "eval.every_epoch=false", "train.lr_scaling=none",
    # One TF thread per process; batches are built by one loader thread (the default).
    "train.threads=1", "train.workers=1", "train.tensorboard=false",
]  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--image-size", type=int, default=128,
        help="resize the toy images to this side (128: the demo; larger: more compute per step)",
    )  # fmt: skip
    parser.add_argument("--train-images", type=int, default=480, help="toy training images")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--cycle-ms", default="1",
        help="comma-separated Horovod cycle times for extra bound two-rank runs ('' for none)",
    )  # fmt: skip
    parser.add_argument("--allreduce-only", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.allreduce_only is not None:
        return _allreduce_worker(args.allreduce_only)
    cycles = [float(c) for c in args.cycle_ms.split(",") if c.strip()]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "scaling_runs"
    epochs = [
        f"train.epochs={args.epochs}", f"train.output_dir={runs}",
        f"data.image_min_side={args.image_size}", f"data.image_max_side={args.image_size}",
        f"data.toy.num_train={args.train_images}", f"data.root={out / 'toy_data'}",
    ]  # fmt: skip

    # One process, one thread, batch 8: bound to one core, and free to use both.
    one_core = {sorted(os.sched_getaffinity(0))[0]}
    single = [str(BIN / "fgl-train"), *COMMON, *epochs, "train.batch_size=8"]
    _run([*single, "train.run_name=one_bound"], cores=one_core)
    _run([*single, "train.run_name=one_unbound"])
    # Two processes, one thread each, batch 4 each: the same 8 images per step.
    hvd = [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo"]
    double = [*hvd, str(BIN / "fgl-train"), *COMMON, *epochs, "train.batch_size=4"]
    _run([*double, "train.run_name=two_bound", "train.pin_cpus=true"])
    _run([*double, "train.run_name=two_unbound", "train.pin_cpus=false"])
    for cycle in cycles:
        name = f"two_bound_cycle{cycle:g}"
        _run([*double, f"train.run_name={name}", f"train.horovod_cycle_ms={cycle}"])
    allreduce = _run([*hvd, sys.executable, __file__, "--allreduce-only", "0"])
    # The same two halves without Horovod: two independent processes at batch 4, each bound to
    # its own core, at the same time. What they lose against one_bound is the hardware's share
    # (shared cache and memory bandwidth) plus the smaller batch, not communication.
    _run_together([[*single[:-1], "train.batch_size=4", f"train.run_name=alone_{core}"]
                   for core in sorted(os.sched_getaffinity(0))[:2]])  # fmt: skip

    two_runs = ["two_bound", "two_unbound", *(f"two_bound_cycle{c:g}" for c in cycles)]
    seconds = {name: _steady_epoch_seconds(runs / name)
               for name in ("one_bound", "one_unbound", *two_runs)}  # fmt: skip
    # Each independent process reads the whole list at batch 4, twice one rank's share of an
    # epoch: half its epoch time is the time for the same work as one Horovod rank.
    halves = [_steady_epoch_seconds(run) / 2 for run in sorted(runs.glob("alone_*"))]
    seconds["two_independent_bound"] = max(halves)
    steps = _steps(runs / "two_bound")
    # horovodrun prefixes each line with the rank, e.g. "[0]<stdout>:{...}".
    (line,) = [x for x in allreduce.stdout.splitlines() if '"allreduce_ms"' in x]
    allreduce_ms = json.loads(line[line.index("{") :])["allreduce_ms"]
    step_ms = 1000 * seconds["two_bound"] / steps
    result = {
        "epoch_seconds": {name: round(t, 2) for name, t in seconds.items()},
        "scaling_efficiency": {
            f"{two} vs {one}": round(seconds[one] / (2 * seconds[two]), 3)
            for one in ("one_bound", "one_unbound")
            for two in (*two_runs, "two_independent_bound")
        },  # fmt: skip
        "steps_per_epoch": steps,
        "step_ms_two_bound": round(step_ms, 1),
        "horovod_cycle_ms_default": _cycle_time(runs / "two_bound"),
        "allreduce_ms_per_step": round(allreduce_ms, 1),
        "allreduce_share": round(allreduce_ms / step_ms, 3),
        "image_size": args.image_size,
        "train_images": args.train_images,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    (out / "horovod_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def _run(command, cores=None):
    bind = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, preexec_fn=bind)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result


def _run_together(commands) -> None:
    # Command i runs bound to core i; all start at once and must all succeed.
    cores = sorted(os.sched_getaffinity(0))
    processes = [
        subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda core=core: os.sched_setaffinity(0, {core}))
        for core, command in zip(cores, commands)
    ]  # fmt: skip
    for command, process in zip(commands, processes):
        _, errors = process.communicate()
        if process.returncode != 0:
            sys.exit(f"failed: {' '.join(command)}\n{errors[-2000:]}")


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _steady_epoch_seconds(run: Path) -> float:
    # The first epoch traces the graph; epoch_seconds excludes evaluation. Use the median of
    # the epochs after the first.
    times = sorted(float(row["epoch_seconds"]) for row in _rows(run)[1:])
    return times[len(times) // 2]


def _cycle_time(run: Path) -> str:
    # The cycle each rank logs at start (the CPU default unless the environment set one).
    for line in (run / "log.txt").read_text().splitlines():
        if "Horovod cycle " in line:
            return line.split("Horovod cycle ")[1].split(" ms")[0]
    return "Horovod's default"


def _steps(run: Path) -> int:
    row = _rows(run)[0]
    return -(-int(row["images_seen"]) // int(row["global_batch"]))


def _allreduce_worker(cycle_ms: float) -> int:
    import horovod.tensorflow as hvd
    import tensorflow as tf

    sys.path.insert(0, str(ROOT))
    from fgl_retinanet.config import load_config
    from fgl_retinanet.distributed import set_cycle_time
    from fgl_retinanet.model import build_training_model

    # The same coordination cycle as the training runs (train.horovod_cycle_ms=cycle_ms).
    set_cycle_time(cycle_ms)
    hvd.init()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    config = load_config(ROOT / "configs" / "demo_fgl.yaml")
    model = build_training_model(config, len(config.data.classes))
    gradients = [tf.random.normal(v.shape) for v in model.trainable_variables]

    # Warm up, then time grouped averages of tensors shaped like every gradient of one step.
    for _ in range(3):
        hvd.grouped_allreduce(gradients, op=hvd.Average)
    repeats = 30
    started = time.perf_counter()
    for _ in range(repeats):
        hvd.grouped_allreduce(gradients, op=hvd.Average)
    elapsed = (time.perf_counter() - started) / repeats
    if hvd.rank() == 0:
        parameters = sum(int(tf.size(g)) for g in gradients)
        print(json.dumps({"allreduce_ms": 1000 * elapsed, "parameters": parameters}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
