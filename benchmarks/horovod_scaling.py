"""Horovod scaling on CPU: 2 processes x 1 thread against 1 process x 1 thread, same global work.

    .venv/bin/python benchmarks/horovod_scaling.py [--epochs 3] [--out benchmarks/results]

Both runs train the demo configuration (tiny backbone, 128 px toy images) for the same number of
images with global batch 8: one process at batch 8, or two at batch 4 each. The steady-state
epoch time (epochs after the first, which includes graph tracing; no evaluation) gives

    scaling efficiency = T(1 process) / (2 x T(2 processes))

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
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--allreduce-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.allreduce_only:
        return _allreduce_worker()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "scaling_runs"
    epochs = [f"train.epochs={args.epochs}", f"train.output_dir={runs}"]

    # One process, one thread, batch 8.
    single = _timed([str(BIN / "fgl-train"), *COMMON, *epochs, "train.batch_size=8",
                     "train.run_name=one_process"])  # fmt: skip
    # Two processes, one thread each, batch 4 each: the same 8 images per step.
    hvd = [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo"]
    double = _timed([*hvd, str(BIN / "fgl-train"), *COMMON, *epochs, "train.batch_size=4",
                     "train.run_name=two_processes"])  # fmt: skip
    allreduce = _timed([*hvd, sys.executable, __file__, "--allreduce-only"], capture=True)

    t1 = _steady_epoch_seconds(runs / "one_process")
    t2 = _steady_epoch_seconds(runs / "two_processes")
    steps = _steps(runs / "two_processes")
    # horovodrun prefixes each line with the rank, e.g. "[0]<stdout>:{...}".
    (line,) = [x for x in allreduce.stdout.splitlines() if '"allreduce_ms"' in x]
    allreduce_ms = json.loads(line[line.index("{") :])["allreduce_ms"]
    step_ms = 1000 * t2 / steps
    result = {
        "epoch_seconds_1x1": round(t1, 2),
        "epoch_seconds_2x1": round(t2, 2),
        "scaling_efficiency": round(t1 / (2 * t2), 3),
        "steps_per_epoch": steps,
        "step_ms_2x1": round(step_ms, 1),
        "allreduce_ms_per_step": round(allreduce_ms, 1),
        "allreduce_share": round(allreduce_ms / step_ms, 3),
        "wall_seconds": {"one": single.wall, "two": double.wall},
        "cpu_count": os.cpu_count(),
    }
    (out / "horovod_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def _timed(command, capture=False):
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    result.wall = round(time.time() - started, 1)
    return result


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _steady_epoch_seconds(run: Path) -> float:
    # The first epoch traces the graph; epoch_seconds excludes evaluation. Use the median of
    # the epochs after the first.
    times = sorted(float(row["epoch_seconds"]) for row in _rows(run)[1:])
    return times[len(times) // 2]


def _steps(run: Path) -> int:
    row = _rows(run)[0]
    return -(-int(row["images_seen"]) // int(row["global_batch"]))


def _allreduce_worker() -> int:
    import horovod.tensorflow as hvd
    import tensorflow as tf

    sys.path.insert(0, str(ROOT))
    from fgl_retinanet.config import load_config
    from fgl_retinanet.model import build_training_model

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
