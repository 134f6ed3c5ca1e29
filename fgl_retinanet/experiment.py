"""Experiments: one file names a base config, losses and seeds; the runner trains every pair.

    fgl-experiment configs/experiments/voc2012_gamma2.yaml --dry-run
    fgl-experiment configs/experiments/voc2012_gamma2.yaml --np 4

Each run is `fgl-train` in a subprocess (through `horovodrun -np N` when N > 1) writing
`output_dir/<loss>_seed<seed>`. Runs of one seed differ only in `loss.name`: the seed fixes the
data order and the initial weights. Running the same command again skips finished runs and
resumes interrupted ones from their last complete epoch. This module imports no TensorFlow.
"""

import fcntl
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fgl_retinanet.config import (
    Config,
    ConfigError,
    find_config,
    load_config,
    read_yaml_mapping,
    resolve_path,
    validate_paths,
)
from fgl_retinanet.report import NOISE_WINDOW

# Keys of an experiment file, with what each must be; everything else is an error.
EXPERIMENT_KEYS = {
    "name": "text: the experiment's name (default: the file name)",
    "config": "text: the run config every run starts from, relative to the experiment file",
    "losses": "list of loss names (loss.name), the first is the baseline of the report",
    "seeds": "list of integer seeds (train.seed); each seed gives one run per loss",
    "overrides": "mapping of dotted config keys to values, applied to every run",
    "output_dir": "text: directory of the experiment's runs and report",
    "processes": "integer: Horovod processes per run (horovodrun -np); --np overrides",
    "noise_window": "odd integer: steps in the trend of the report's per-step loss noise",
}

# The runner sets these per run; an experiment may not override them.
RUNNER_KEYS = ("loss.name", "train.seed", "train.run_name", "train.output_dir")

# Seconds a run may take to stop after SIGTERM before it is killed.
STOP_GRACE_SECONDS = 30

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """One planned run of an experiment.

    Attributes:
        loss: loss name.
        seed: training seed.
        name: run directory name.
        directory: run directory.
        overrides: every dotted override that makes its config from the experiment's base.
        config: the resolved Config.
        state: "new", "resume" (a complete epoch exists) or "finished".
        epochs_done: complete epochs in its snapshots.
    """

    loss: str
    seed: int
    name: str
    directory: Path
    overrides: list[str]
    config: Config
    state: str = "new"
    epochs_done: int = 0


@dataclass
class Experiment:
    """A parsed, validated experiment file."""

    name: str
    path: Path
    config_path: Path
    losses: list[str]
    seeds: list[int]
    overrides: list[str]
    output_dir: Path
    processes: int
    noise_window: int
    runs: list[Run] = field(default_factory=list)


def load_experiment(
    path: str, output_dir: str | None = None, extra_overrides: list[str] = ()
) -> Experiment:
    """Reads an experiment file and resolves the config of every run, without TensorFlow.

    Args:
        path: experiment YAML file (a path, or a path inside the project).
        output_dir: replaces the file's `output_dir`.
        extra_overrides: dotted overrides applied after the file's `overrides`.

    Raises:
        ConfigError: one line naming the file and the problem.
    """
    file = find_config(path)
    raw = read_yaml_mapping(file, "experiment")

    # Shape of the file: known keys, right types, no duplicates.
    unknown = sorted(set(raw) - set(EXPERIMENT_KEYS))
    if unknown:
        raise ConfigError(
            f"{file}: unknown experiment key {unknown[0]!r} (known: {', '.join(EXPERIMENT_KEYS)})"
        )
    for key in ("config", "losses", "seeds"):
        if key not in raw:
            raise ConfigError(f"{file}: missing key {key!r} ({EXPERIMENT_KEYS[key]})")
    name = _text(raw.get("name", file.stem), "name", file)
    # Normalised, so the commands read configs/voc2012_focal.yaml, not configs/experiments/../.
    config_path = Path(os.path.normpath(file.parent / _text(raw["config"], "config", file)))
    if not config_path.is_file():
        raise ConfigError(f"{file}: config {config_path} not found")
    losses = _list(raw["losses"], str, "losses", file)
    seeds = _list(raw["seeds"], int, "seeds", file)
    processes = raw.get("processes", 1)
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"{file}: processes must be a positive integer, got {processes!r}")
    noise_window = raw.get("noise_window", NOISE_WINDOW)
    is_int = isinstance(noise_window, int) and not isinstance(noise_window, bool)
    if not (is_int and noise_window > 0 and noise_window % 2 == 1):
        raise ConfigError(f"{file}: noise_window must be an odd positive integer")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{file}: overrides must be a mapping of dotted keys to values")
    override_list = [f"{key}={_scalar(value)}" for key, value in overrides.items()]
    override_list += list(extra_overrides)
    for item in override_list:
        key = item.partition("=")[0].strip()
        if key in RUNNER_KEYS:
            raise ConfigError(
                f"{file}: {key} is set by the runner per run ({', '.join(RUNNER_KEYS)})"
            )
    out = resolve_path(output_dir or raw.get("output_dir") or f"runs/experiments/{name}")

    # Every run's config is resolved now, so a bad key fails before anything trains.
    experiment = Experiment(
        name, file, config_path, losses, seeds, override_list, out.absolute(), processes,
        noise_window,
    )  # fmt: skip
    for seed in seeds:
        for loss in losses:
            run_name = f"{loss}_seed{seed}"
            run_overrides = override_list + [
                f"loss.name={loss}",
                f"train.seed={seed}",
                f"train.run_name={run_name}",
                f"train.output_dir={experiment.output_dir}",
            ]
            try:
                config = load_config(str(config_path), run_overrides)
            except ConfigError as e:
                raise ConfigError(f"{file}: {e}") from None
            run = Run(loss, seed, run_name, experiment.output_dir / run_name, run_overrides, config)
            experiment.runs.append(run)
    return experiment


def check_experiment(experiment: Experiment) -> None:
    """Checks data paths and loss names; imports the loss registry (and so TensorFlow).

    Raises:
        ConfigError: one line.
    """
    validate_paths(experiment.runs[0].config)
    from fgl_retinanet.losses import LOSSES

    for loss in experiment.losses:
        if loss not in LOSSES:
            raise ConfigError(
                f"{experiment.path}: loss {loss!r} is not one of {', '.join(sorted(LOSSES))}"
            )


def survey(experiment: Experiment) -> None:
    """Sets each run's state from its directory: new, resume or finished.

    Raises:
        ConfigError: a run directory holds a run of another configuration.
    """
    for run in experiment.runs:
        run.epochs_done = _complete_epochs(run.directory)
        saved = run.directory / "config.yaml"
        if run.epochs_done == 0 or not saved.is_file():
            run.state = "new"
            continue

        # A directory of another setup would mix two experiments in one report.
        with open(saved) as f:
            previous = yaml.safe_load(f) or {}
        difference = _first_difference(previous, run.config.to_dict(), ignore={"train.epochs"})
        if difference:
            raise ConfigError(
                f"{run.directory} was trained with another config ({difference}); "
                f"use another output directory or remove it"
            )
        if run.epochs_done > run.config.train.epochs:
            raise ConfigError(
                f"{run.directory} already has {run.epochs_done} epochs, more than the "
                f"{run.config.train.epochs} planned"
            )
        results = run.directory / "results.json"
        # results.json is written last, so it marks a run that ended (also by early stopping),
        # unless a later extension of the schedule has started since.
        finished = (
            results.is_file()
            and results.stat().st_mtime >= saved.stat().st_mtime
            and previous.get("train", {}).get("epochs") == run.config.train.epochs
        )
        run.state = "finished" if finished else "resume"


def budget(experiment: Experiment, processes: int) -> dict:
    """Images, epochs and runs the experiment trains (padding of Horovod shards included).

    Returns:
        ``{"runs", "epochs", "images_per_epoch", "global_batch", "images", "remaining_epochs"}``;
        ``images_per_epoch`` is None when the training list cannot be counted.
    """
    config = experiment.runs[0].config
    listed = _training_images(config)
    global_batch = config.train.batch_size * processes
    per_epoch = None
    if listed is not None:
        # Every process takes the same number of full steps over one shared permutation.
        per_epoch = math.ceil(listed / global_batch) * global_batch
    epochs = config.train.epochs
    remaining = sum(epochs - run.epochs_done for run in experiment.runs if run.state != "finished")
    return {
        "runs": len(experiment.runs),
        "epochs": epochs,
        "images_per_epoch": per_epoch,
        "global_batch": global_batch,
        "images": None if per_epoch is None else len(experiment.runs) * epochs * per_epoch,
        "remaining_epochs": remaining,
    }


def command(run: Run, experiment: Experiment, processes: int) -> list[str]:
    """The command line that trains (or resumes) one run."""
    train = [sys.executable, "-m", "fgl_retinanet.cli", "--config", str(experiment.config_path)]
    if run.state == "resume":
        train += ["--resume", str(run.directory)]
    train += run.overrides
    if processes == 1:
        return train
    return [horovodrun(), "-np", str(processes), "-H", f"localhost:{processes}", *train]


def horovodrun() -> str:
    """Path of horovodrun: next to this Python first, then on PATH.

    Raises:
        ConfigError: not installed.
    """
    beside = Path(sys.executable).parent / "horovodrun"
    found = str(beside) if beside.is_file() else shutil.which("horovodrun")
    if not found:
        raise ConfigError("horovodrun not found: install Horovod (scripts/install.sh) or --np 1")
    return found


def run_experiment(experiment: Experiment, processes: int) -> int:
    """Trains every unfinished run in order, one subprocess at a time.

    Returns:
        0 when every run finished; the failing run's exit code (or 130 when interrupted).
    """
    experiment.output_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(experiment.output_dir)
    try:
        return _run_all(experiment, processes, lock)
    finally:
        os.close(lock)


def format_plan(experiment: Experiment, processes: int) -> str:
    """The runs, their state and the budget as text (the dry run's output)."""
    plan = budget(experiment, processes)
    images = plan["images_per_epoch"]
    lines = [
        f"experiment {experiment.name}: {len(experiment.losses)} losses x "
        f"{len(experiment.seeds)} seed{'s' if len(experiment.seeds) > 1 else ''} = "
        f"{plan['runs']} runs in {experiment.output_dir}",
        f"budget: {plan['runs']} runs x {plan['epochs']} epochs x "
        + (f"{images} images = {plan['images']:,} images" if images else "? images")
        + f" (global batch {plan['global_batch']}, {processes} process"
        + ("es)" if processes > 1 else ")"),
        f"remaining: {plan['remaining_epochs']} of {plan['runs'] * plan['epochs']} epochs",
    ]
    if images is None:
        lines.append("  (training list not found: images per epoch unknown)")
    for index, run in enumerate(experiment.runs, 1):
        label = {"new": "new", "finished": "finished, skipped"}.get(
            run.state, f"resume after epoch {run.epochs_done}"
        )
        lines.append(f"[{index}/{len(experiment.runs)}] {run.name}: {label}")
        if run.state != "finished":
            argv = command(run, experiment, processes)
            lines.append("  " + " ".join(_quote(part) for part in argv))
    return "\n".join(lines)


def _run_all(experiment: Experiment, processes: int, lock: int) -> int:
    total = len(experiment.runs)
    plan = budget(experiment, processes)
    remaining = plan["remaining_epochs"]
    trained_epochs = 0
    started = time.time()
    for index, run in enumerate(experiment.runs, 1):
        if run.state == "finished":
            logger.info("[%d/%d] %s: finished, skipped", index, total, run.name)
            continue
        what = "new" if run.state == "new" else f"resuming after epoch {run.epochs_done}"
        logger.info("[%d/%d] %s: %s", index, total, run.name, what)
        argv = command(run, experiment, processes)
        logger.info("  %s", " ".join(_quote(part) for part in argv))
        run_started = time.time()
        code = _call(argv, lock)
        if code != 0:
            done = _complete_epochs(run.directory)
            if code == 130:
                logger.info("interrupted in %s after epoch %d", run.name, done)
            else:
                logger.error("run %s failed (exit %d) after epoch %d", run.name, code, done)
            logger.info("run the same command again to resume")
            return code

        # Progress over the whole experiment, and a forecast from this session's pace.
        trained_epochs += run.config.train.epochs - run.epochs_done
        run.state, run.epochs_done = "finished", _complete_epochs(run.directory)
        elapsed = time.time() - started
        left = remaining - trained_epochs
        forecast = elapsed / trained_epochs * left if trained_epochs else 0.0
        logger.info(
            "[%d/%d] %s finished in %.0f s; %d of %d epochs of the experiment left, "
            "about %.0f s to go",
            index, total, run.name, time.time() - run_started, left, plan["runs"] * plan["epochs"],
            forecast,
        )  # fmt: skip
    return 0


def _call(argv: list[str], lock: int) -> int:
    # Its own session, so stopping the runner stops horovodrun's workers too; the lock is
    # inherited, so a runner killed outright still blocks a second one until training ends.
    process = subprocess.Popen(argv, start_new_session=True, pass_fds=(lock,))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return process.wait()
    except KeyboardInterrupt:
        _stop(process)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _lock(directory: Path) -> int:
    fd = os.open(directory / ".experiment.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"another fgl-experiment (or a run it started) is still working in {directory}"
        ) from None
    return fd


def _complete_epochs(directory: Path) -> int:
    latest = directory / "snapshots" / "latest.txt"
    if not latest.is_file():
        return 0
    stem = latest.read_text().strip()
    try:
        return int(stem.removeprefix("epoch_"))
    except ValueError:
        return 0


def _training_images(config: Config) -> int | None:
    if config.data.dataset == "toy":
        return config.data.toy.num_train
    lists = resolve_path(config.data.root) / "ImageSets" / "Main"
    listing = lists / f"{config.data.train_split}.txt"
    if not listing.is_file():
        return None
    return sum(1 for line in listing.read_text().splitlines() if line.strip())


def _first_difference(old, new, ignore: set, prefix: str = "") -> str | None:
    """The first dotted key whose values differ, as 'key: old -> new', or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), ignore, f"{prefix}{key}.")
            if found:
                return found
        return None
    key = prefix.rstrip(".")
    if key in ignore or old == new:
        return None
    return f"{key}: {old!r} -> {new!r}"


def _text(value, key: str, file: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{file}: {key} must be non-empty text, got {value!r}")
    return value


def _list(value, item_type: type, key: str, file: Path) -> list:
    good = (
        isinstance(value, list)
        and value
        and all(isinstance(v, item_type) and not isinstance(v, bool) for v in value)
    )
    if not good:
        raise ConfigError(
            f"{file}: {key} must be a non-empty list of {item_type.__name__}, got {value!r}"
        )
    if len(set(value)) != len(value):
        raise ConfigError(f"{file}: {key} has duplicates: {value!r}")
    return list(value)


def _scalar(value) -> str:
    # Written back as YAML so that config.py parses it exactly as it would parse the file.
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value).strip().removesuffix("...").strip()


def _quote(part: str) -> str:
    return part if part and all(c.isalnum() or c in "-_./=:,+@" for c in part) else repr(part)
