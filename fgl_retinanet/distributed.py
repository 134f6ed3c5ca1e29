"""The only module that imports Horovod; everything else asks it who we are and what to do.

Under `horovodrun -np N ...` Horovod's launcher sets HOROVOD_RANK/HOROVOD_SIZE (Gloo) or the
MPI equivalents; without them we run as a single process and never import Horovod.
"""

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_LAUNCHER_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


@dataclass
class Context:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    hvd: object = None  # the horovod.tensorflow.keras module, or None in a single process

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.hvd is not None


def launched_by_horovod() -> bool:
    return any(name in os.environ for name in _LAUNCHER_VARIABLES)


def init() -> Context:
    """Initialises Horovod when launched by horovodrun, else returns a single-process context."""
    if not launched_by_horovod():
        return Context()
    try:
        import horovod.tensorflow.keras as hvd
    except ImportError as e:
        raise RuntimeError(
            f"launched under horovodrun but Horovod cannot be imported ({e}); "
            "install it with scripts/install_horovod.sh"
        ) from None
    hvd.init()
    return Context(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), hvd)


def configure_devices(context: Context, threads: int) -> None:
    """Pins one GPU per local rank, or splits the CPU cores between the ranks on this host."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        # Horovod: one GPU per process, chosen by local rank; grow memory on demand.
        gpu = gpus[context.local_rank % len(gpus)]
        tf.config.set_visible_devices(gpu, "GPU")
        tf.config.experimental.set_memory_growth(gpu, True)
    elif threads == 0 and context.local_size > 1:
        # Horovod: N processes each using every core would oversubscribe the CPU.
        threads = max(1, (os.cpu_count() or 1) // context.local_size)
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, threads // 2))


def wrap_optimizer(context: Context, optimizer):
    """Horovod: average gradients across ranks before every update."""
    if not context.distributed:
        return optimizer
    return context.hvd.DistributedOptimizer(optimizer)


def callbacks(context: Context) -> list:
    """Horovod callbacks that must come first: initial broadcast, then metric averaging."""
    if not context.distributed:
        return []
    return [
        # Horovod: start every rank from rank 0's weights and optimizer state.
        context.hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        # Horovod: average logged metrics so every rank's callbacks see the same numbers.
        context.hvd.callbacks.MetricAverageCallback(),
    ]


def barrier(context: Context) -> None:
    """Horovod: wait until every rank reaches this point (e.g. while rank 0 evaluates)."""
    if context.distributed:
        import tensorflow as tf

        # An all-reduce completes only once every rank has contributed to it.
        context.hvd.allreduce(tf.constant(0.0), name="fgl_barrier")
