"""Multi-process training under `horovodrun -np 2 --gloo` on the CPU (marked `horovod`)."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.horovod

BIN = Path(sys.executable).parent
SMALL = [
    "--config", "configs/demo_fgl.yaml", "data.toy.num_train=32", "data.toy.num_val=8",
    "train.batch_size=4", "train.lr_scaling=none", "train.base_lr=0.0005",
]  # fmt: skip


def horovodrun(args, cwd, timeout=300, **popen):
    command = [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
               str(BIN / "fgl-train"), *args]  # fmt: skip
    return subprocess.run(
        command, cwd=cwd, timeout=timeout, capture_output=True, text=True, **popen
    )


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def checksum(log: Path) -> str:
    (value,) = re.findall(r"weights checksum ([0-9a-f]{40})", log.read_text())
    return value


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("hvd")
    result = horovodrun(
        [*SMALL, "train.epochs=2", f"data.root={base / 'data'}", f"train.output_dir={base}"],
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return base


def test_ranks_agree_and_see_every_image_once(two_rank_run):
    run = two_rank_run / "demo_fgl"
    # Identical weights at the end: gradients averaged, batch-norm statistics averaged.
    assert checksum(run / "log.txt") == checksum(two_rank_run / "demo_fgl.rank_logs/rank1.txt")
    for row in metrics(run):
        assert int(row["images_seen"]) == 32
        assert int(row["global_batch"]) == 8
    results = json.loads((run / "results.json").read_text())
    assert results["processes"] == 2 and results["images_seen"] == 64


def test_only_rank_zero_writes_the_run_directory(two_rank_run):
    files = sorted(str(p.relative_to(two_rank_run)) for p in two_rank_run.rglob("*") if p.is_file())
    # Rank 1 wrote exactly one file, its own log; everything else is rank 0's, once.
    others = [f for f in files if f.startswith("demo_fgl.rank_logs")]
    assert others == ["demo_fgl.rank_logs/rank1.txt"]
    run_files = [f for f in files if f.startswith("demo_fgl/")]
    assert len([f for f in run_files if "tfevents" in f]) == 1
    expected = {"config.yaml", "log.txt", "metrics.csv", "results.json", "results.md"}
    assert expected <= {Path(f).name for f in run_files}
    assert "rank 1" not in (two_rank_run / "demo_fgl" / "log.txt").read_text()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to split")
def test_ranks_are_bound_to_disjoint_cores(two_rank_run):
    # Each rank logs the cores it bound itself to; together they must not overlap.
    logs = [two_rank_run / "demo_fgl" / "log.txt", two_rank_run / "demo_fgl.rank_logs/rank1.txt"]
    bound = []
    for log in logs:
        (cores,) = re.findall(r"bound to cores \[([0-9, ]+)\]", log.read_text())
        bound.append({int(c) for c in cores.split(",")})
    assert bound[0] and bound[1] and not bound[0] & bound[1]
    assert bound[0] | bound[1] <= set(os.sched_getaffinity(0))


def test_one_and_two_ranks_share_budget_and_schedule(two_rank_run, tmp_path):
    # Same global batch (1 x 8 vs 2 x 4) and seed: same images per epoch and learning rates.
    from fgl_retinanet import cli

    code = cli.train_main(
        [*SMALL, "train.batch_size=8", "train.epochs=2", f"data.root={two_rank_run / 'data'}",
         f"train.output_dir={tmp_path}"]
    )  # fmt: skip
    assert code == 0
    one = metrics(tmp_path / "demo_fgl")
    two = metrics(two_rank_run / "demo_fgl")
    for key in ("epoch", "global_batch", "images_seen", "lr"):
        assert [row[key] for row in one] == [row[key] for row in two], key


def test_killed_worker_fails_fast_and_resume_completes(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    args = [*SMALL, "data.toy.num_train=256", "train.epochs=3", f"data.root={tmp_path / 'd'}",
            f"train.output_dir={tmp_path}"]  # fmt: skip
    run = tmp_path / "demo_fgl"
    command = [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
               str(BIN / "fgl-train"), *args]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        # Wait for the first complete epoch, then SIGKILL rank 1 in the middle of the next.
        latest = run / "snapshots" / "latest.txt"
        deadline = time.time() + 240
        while not (latest.is_file() and latest.read_text().strip() == "epoch_001"):
            assert time.time() < deadline, "first epoch never finished"
            assert process.poll() is None, "run ended before the kill"
            time.sleep(0.2)
        rank1_log = tmp_path / "demo_fgl.rank_logs" / "rank1.txt"
        (pid,) = re.findall(r"\(pid (\d+),", rank1_log.read_text())
        os.kill(int(pid), signal.SIGKILL)
        killed_at = time.time()
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert code != 0
    assert time.time() - killed_at < 120
    assert len(metrics(run)) < 3

    # Resume on two ranks from the last complete epoch and finish the schedule.
    result = horovodrun(["--resume", str(run)], cwd=repo)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [row["epoch"] for row in metrics(run)] == ["1", "2", "3"]
    assert "resumed from epoch_00" in (run / "log.txt").read_text()
    assert checksum(run / "log.txt") == checksum(tmp_path / "demo_fgl.rank_logs" / "rank1.txt")


def test_core_binding_covers_threads_started_before_it():
    # A thread that exists before the binding (like Horovod's background loop) is bound too,
    # and a thread started afterwards inherits it. Runs in a child: binding is per process.
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two cores to split")
    script = """
import json, os, threading
from fgl_retinanet.distributed import _bind_to_core_share
stop = threading.Event()
early = threading.Thread(target=stop.wait)
early.start()
cores = _bind_to_core_share(local_rank=1, local_size=2)
late = threading.Thread(target=stop.wait)
late.start()
print(json.dumps([cores, *(sorted(os.sched_getaffinity(t.native_id)) for t in (early, late))]))
stop.set()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    share = len(allowed) // 2
    second_half = allowed[share : 2 * share]
    assert json.loads(result.stdout) == [second_half, second_half, second_half]


def test_two_rank_run_uses_the_cpu_cycle_time(two_rank_run):
    # No GPU here and no HOROVOD_CYCLE_TIME from the test: both ranks run Horovod's
    # coordination every CPU_CYCLE_TIME_MS instead of every millisecond.
    from fgl_retinanet.distributed import CPU_CYCLE_TIME_MS

    for log in (two_rank_run / "demo_fgl" / "log.txt",
                two_rank_run / "demo_fgl.rank_logs/rank1.txt"):  # fmt: skip
        assert f"Horovod cycle {CPU_CYCLE_TIME_MS:g} ms" in log.read_text()


@pytest.mark.parametrize(
    "environment, configured, expected",
    [
        (None, 0.0, "20"),  # unset, CPU-only host: our CPU default
        ("", 0.0, "20"),  # empty reads as 0 ms (a busy loop) in Horovod: treated as unset
        ("5", 0.0, "5"),  # horovodrun --cycle-time-ms 5 (or the user's export) wins over auto
        ("5", 2.5, "2.5"),  # an explicit train.horovod_cycle_ms wins over everything
        (None, 40.0, "40"),
    ],
)
def test_cycle_time_precedence(monkeypatch, environment, configured, expected):
    from fgl_retinanet import distributed

    if environment is None:
        monkeypatch.delenv("HOROVOD_CYCLE_TIME", raising=False)
    else:
        monkeypatch.setenv("HOROVOD_CYCLE_TIME", environment)
    distributed.set_cycle_time(configured)
    assert os.environ["HOROVOD_CYCLE_TIME"] == expected


def test_two_rank_resume_repeats_the_uninterrupted_run(two_rank_run, tmp_path):
    # The fixture trained 2 epochs on 2 ranks in one go; 1 epoch, then --resume for the
    # second, must give the same losses and the same final weights (flips drawn per image).
    repo = Path(__file__).resolve().parents[1]
    args = [*SMALL, f"data.root={two_rank_run / 'data'}", f"train.output_dir={tmp_path}"]
    first = horovodrun([*args, "train.epochs=1"], cwd=repo)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "demo_fgl"
    second = horovodrun(["--resume", str(run), "train.epochs=2"], cwd=repo)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    columns = ("epoch", "loss", "regression_loss", "classification_loss", "lr", "images_seen")
    resumed = [[row[c] for c in columns] for row in metrics(run)]
    whole = [[row[c] for c in columns] for row in metrics(two_rank_run / "demo_fgl")]
    assert resumed == whole and len(resumed) == 2
    final = re.findall(r"weights checksum ([0-9a-f]{40})", (run / "log.txt").read_text())[-1]
    assert final == checksum(two_rank_run / "demo_fgl" / "log.txt")
