"""The only module that imports Horovod; everything else asks it who we are and what to do.

Under `horovodrun -np N ...` Horovod's launcher sets HOROVOD_RANK/HOROVOD_SIZE (Gloo) or the
MPI equivalents; without them we run as a single process and never import Horovod.
"""

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_LAUNCHER_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")

# Horovod's coordination cycle on CPU-only hosts, in milliseconds. Horovod's own default (1 ms)
# wakes its background thread and runs a Gloo exchange a thousand times a second; measured on
# our 2-core host, an otherwise idle pair of ranks then spent 11-55 % of a core each on it,
# taken from the training thread on the same core. At 20 ms that falls to about 4 %; the
# added latency, at most one cycle per step's fused all-reduce, is under 2.5 % of the 0.8 s
# step of benchmarks/horovod_scaling.py, whose 2-rank efficiency went from 0.80 to 1.01.
# With GPUs the background thread has spare cores, so Horovod's default is left alone.
CPU_CYCLE_TIME_MS = 20.0


@dataclass
class Context:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    hvd: object = None  # the horovod.tensorflow.keras module, or None in a single process
    cycle_time_ms: str = ""  # HOROVOD_CYCLE_TIME in effect; "" for Horovod's default or none

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.hvd is not None


def tensorflow_environment() -> None:
    """Sets TensorFlow's process-wide options; call before TensorFlow allocates anything.

    Each is a default: a value already in the environment wins.
    """
    # TensorFlow's C++ start-up chatter hides our own log lines; warnings and errors remain.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    # TensorFlow's CPU allocator otherwise takes every op output from malloc, and outputs of
    # tens of MB come back as fresh pages the kernel must fault in and zero (the loss alone
    # makes a dozen 26 MB outputs per VOC step). Its BFC pool reuses freed blocks instead:
    # measured here, the loss kernel ran 1.5x and keras-retinanet's focal 1.2x faster.
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")


def launched_by_horovod() -> bool:
    return any(name in os.environ for name in _LAUNCHER_VARIABLES)


def init(cycle_time_ms: float = 0.0) -> Context:
    """Initialises Horovod when launched by horovodrun, else returns a single-process context.

    Args:
        cycle_time_ms: Horovod's coordination cycle (HOROVOD_CYCLE_TIME). 0 keeps what the
            environment says (horovodrun's --cycle-time-ms sets it) and otherwise uses
            `CPU_CYCLE_TIME_MS` on hosts without GPUs and Horovod's default with GPUs.
    """
    if not launched_by_horovod():
        return Context()
    try:
        import horovod.tensorflow.keras as hvd
    except ImportError as e:
        raise RuntimeError(
            f"launched under horovodrun but Horovod cannot be imported ({e}); "
            "install it with scripts/install.sh"
        ) from None
    # Read once, when Horovod starts its background thread: must be set before init.
    set_cycle_time(cycle_time_ms)
    hvd.init()
    return Context(
        hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), hvd,
        os.environ.get("HOROVOD_CYCLE_TIME", ""),
    )  # fmt: skip


def set_cycle_time(cycle_time_ms: float) -> None:
    """Sets HOROVOD_CYCLE_TIME before `hvd.init()` (Horovod reads it once, at init).

    Args:
        cycle_time_ms: > 0 sets it; 0 keeps a non-empty environment value and otherwise sets
            `CPU_CYCLE_TIME_MS` on hosts without GPUs (Horovod's default with GPUs).
    """
    if cycle_time_ms > 0:
        os.environ["HOROVOD_CYCLE_TIME"] = f"{cycle_time_ms:g}"
        return
    # An empty value reads as 0 ms in Horovod, a busy loop: treat it as unset.
    if os.environ.get("HOROVOD_CYCLE_TIME"):
        return
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        os.environ.pop("HOROVOD_CYCLE_TIME", None)
        return
    os.environ["HOROVOD_CYCLE_TIME"] = f"{CPU_CYCLE_TIME_MS:g}"


def configure_devices(context: Context, threads: int, pin_cpus: bool = True) -> tuple[int, list]:
    """Pins one GPU per local rank, or splits the CPU cores between the ranks on this host.

    Args:
        context: who we are.
        threads: TensorFlow intra-op threads; 0 lets TensorFlow decide (a single process) or
            uses this rank's share of the cores (several processes on one host).
        pin_cpus: on a CPU-only host with several local ranks, bind each rank's threads to its
            own disjoint share of the cores (Linux only).

    Returns:
        The intra-op thread count set (0 when TensorFlow chooses) and the cores this process
        is bound to (empty when it was not bound).
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    cores = []
    if gpus:
        # Horovod: one GPU per process, chosen by local rank; grow memory on demand.
        gpu = gpus[context.local_rank % len(gpus)]
        tf.config.set_visible_devices(gpu, "GPU")
        tf.config.experimental.set_memory_growth(gpu, True)
    elif context.local_size > 1:
        # Horovod: N processes each using every core would oversubscribe the CPU, and even with
        # one TF thread each, the loader, Horovod and Gloo threads of one rank would migrate
        # onto the other ranks' cores. Binding each rank to its own cores keeps them apart.
        if pin_cpus:
            cores = _bind_to_core_share(context.local_rank, context.local_size)
        if threads == 0:
            threads = len(cores) or max(1, (os.cpu_count() or 1) // context.local_size)
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, threads // 2))
    return threads, cores


def _bind_to_core_share(local_rank: int, local_size: int) -> list:
    """Binds every thread of this process to the local rank's share of the allowed cores.

    Returns:
        The cores bound to, or [] when binding is unavailable or there are fewer cores than
        ranks (then the OS shares the cores as before).
    """
    if not hasattr(os, "sched_setaffinity"):
        return []
    allowed = sorted(os.sched_getaffinity(0))
    share = len(allowed) // local_size
    if share == 0:
        return []
    cores = set(allowed[local_rank * share : (local_rank + 1) * share])
    # NOTE: sched_setaffinity(0) binds only the calling thread; Horovod's background loop and
    # Gloo's threads already exist, so bind every thread of the process. Threads created later
    # (TensorFlow's pools, the loader) inherit the binding from their creator.
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # the thread ended between listing and binding
            pass
    return sorted(cores)


def wrap_optimizer(context: Context, optimizer, loss_scaling: bool = False):
    """Horovod: average gradients across ranks before every update; optionally scale the loss.

    Args:
        loss_scaling: wrap in Keras' dynamic LossScaleOptimizer (for mixed precision).

    Raises:
        TypeError: for optimizers other than tf.keras.optimizers.legacy ones, the family this
            project runs and tests with Horovod 0.28.1 on TF 2.15.
    """
    import tensorflow as tf

    if not isinstance(optimizer, tf.keras.optimizers.legacy.Optimizer):
        raise TypeError(
            f"{type(optimizer).__name__} is not a tf.keras.optimizers.legacy optimizer; with "
            "TF 2.15 and Horovod 0.28.1 this project uses the legacy optimizers"
        )
    if context.distributed:
        optimizer = context.hvd.DistributedOptimizer(optimizer)
    if loss_scaling:
        # Horovod: the loss scaler goes outside, LossScaleOptimizer(DistributedOptimizer(Adam)).
        # Its gradient step calls the inner optimizer's, which all-reduces the scaled gradients,
        # so every rank unscales the same sums, sees the same Inf/NaN and skips the same steps
        # with the same loss scale. The other nesting fails in Horovod 0.28.1, whose wrapper
        # subclasses the wrapped optimizer's class (horovod/horovod issues 2989 and 3807).
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def check_jit_compile(context: Context) -> None:
    """Horovod: refuses XLA training under horovodrun unless Horovod's XLA ops are enabled.

    Raises:
        RuntimeError: at start-up rather than when the first step is compiled.
    """
    if context.distributed and os.environ.get("HOROVOD_ENABLE_XLA_OPS") != "1":
        raise RuntimeError(
            "train.jit_compile=true under horovodrun needs Horovod's XLA all-reduce: set "
            "HOROVOD_ENABLE_XLA_OPS=1 (GPU builds of Horovod) or train.jit_compile=false"
        )


def metric_averaging(context: Context) -> list:
    """Horovod: average epoch metrics first, so every later callback sees the same numbers."""
    if not context.distributed:
        return []
    return [context.hvd.callbacks.MetricAverageCallback()]


def broadcast_variables(context: Context, variables) -> None:
    """Horovod: give every rank rank 0's values (weights, optimizer moments, iteration)."""
    if context.distributed:
        import horovod.tensorflow as hvd_tf

        hvd_tf.broadcast_variables(variables, root_rank=0)


def average_variables(context: Context, variables) -> None:
    """Horovod: replace each variable by its mean over ranks (batch-norm moving statistics
    are updated from each rank's own images and would otherwise drift apart)."""
    if not context.distributed or not variables:
        return
    import horovod.tensorflow as hvd_tf

    # One grouped all-reduce: one variable at a time costs a negotiation cycle each (about
    # 40 ms at the CPU cycle time), seconds per evaluation for a ResNet's batch norms.
    averaged = hvd_tf.grouped_allreduce(
        [variable.read_value() for variable in variables], op=hvd_tf.Average
    )
    for variable, value in zip(variables, averaged):
        variable.assign(value)


def broadcast_value(context: Context, value: float | None) -> float | None:
    """Horovod: rank 0's scalar on every rank (None travels as NaN). Also a barrier."""
    if not context.distributed:
        return value
    import math

    import tensorflow as tf

    sent = tf.constant(math.nan if value is None else float(value), tf.float64)
    received = float(context.hvd.broadcast(sent, root_rank=0, name="fgl_broadcast_value"))
    return None if math.isnan(received) else received


def barrier(context: Context) -> None:
    """Horovod: wait until every rank reaches this point."""
    broadcast_value(context, 0.0)
