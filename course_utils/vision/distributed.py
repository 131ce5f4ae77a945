"""Data parallelism: the same training code in N processes, one per GPU, started by PyTorch's own launcher.

``launch(plan, target, *args)`` starts ``plan.processes`` processes with ``torch.distributed``'s elastic
launcher (the machinery ``torchrun`` runs), each calling ``target(*args)`` with the process group set
up: NCCL on GPUs, gloo on the CPU (where a machine without a GPU runs N CPU processes, so the path can
be tested anywhere). Rank 0's return value comes back. Inside a rank, ``current()`` says who it is and
``finetune.fit`` trains with DistributedDataParallel.

The scaling rule: ``train.batch_size`` is per process, so N processes train on a global batch of
N * batch_size, and the learning rates are multiplied by N (the linear scaling rule of Goyal et al.,
"Accurate, Large Minibatch SGD", 2017: k times the batch, k times the step size). Batch-norm layers
that train normalise over the global batch, so N processes at batch b train the model that one
process trains at batch N * b and N times the learning rates, up to floating-point rounding.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from course_utils.core.config import TrainConfig
from course_utils.core.errors import CourseError

T = TypeVar("T")
PORT_VARIABLE = "MASTER_PORT"  # torchrun's name for the rendezvous port; unset, a free port is picked


class DistributedError(CourseError, RuntimeError):
    """A data-parallel run that cannot start as asked; the message says what to change."""


@dataclass(frozen=True)
class LaunchPlan:
    """How a data-parallel run will start: how many processes, on which device, talking through which backend."""

    processes: int
    device: str  # "cuda" or "cpu"
    backend: str  # "nccl" or "gloo"
    port: int  # 0: the launcher picks a free one

    def describe(self, train: TrainConfig) -> str:
        """The run in one line: processes, device, the global batch and the scaled learning rates."""
        n = self.processes
        where = "GPUs over NCCL" if self.device == "cuda" else "CPU processes over gloo (no CUDA GPU here)"
        return (f"data parallel: {n} {where}; global batch {n * train.batch_size} = {n} x {train.batch_size} per "
                f"process; learning rates x{n} (linear scaling): head {train.lr_head * n:g}, "
                f"fine-tune {train.lr_finetune * n:g}")


def plan_launch(processes: int) -> LaunchPlan:
    """Check that ``processes`` data-parallel processes can run here; raise ``DistributedError`` if not.

    With CUDA, one process per GPU over NCCL; without, CPU processes over gloo, at most one per core.
    The rendezvous port is ``$MASTER_PORT`` when set (it must be free), else one the launcher picks.
    """
    if not dist.is_available():
        raise DistributedError("This PyTorch build has no torch.distributed: train on one device (--gpus 1).")
    if torch.cuda.is_available():
        present = torch.cuda.device_count()
        if processes > present:
            raise DistributedError(f"--gpus {processes} asks for more GPUs than this machine has ({present}): "
                                   f"ask for at most {present}.")
        if not dist.is_nccl_available():
            raise DistributedError("This PyTorch build has no NCCL, which training on several GPUs needs: "
                                   "install a CUDA build of PyTorch for Linux (pip install torch), or train on "
                                   "one GPU (--gpus 1).")
        device, backend = "cuda", "nccl"
    else:
        cores = os.cpu_count() or 1
        if processes > cores:
            raise DistributedError(f"No CUDA GPU here, so --gpus {processes} would run {processes} CPU processes "
                                   f"on {cores} CPU cores: ask for at most {cores}.")
        device, backend = "cpu", "gloo"
    port = _requested_port()
    if port:
        _check_port_free(port)
    return LaunchPlan(processes, device, backend, port)


def _requested_port() -> int:
    value = os.environ.get(PORT_VARIABLE, "").strip()
    if not value:
        return 0
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise DistributedError(f"{PORT_VARIABLE}={value!r} is not a port number (1-65535): fix it or unset it.")
    return int(value)


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise DistributedError(f"Port {port} ({PORT_VARIABLE}) is in use, perhaps by another training run: "
                                   f"set {PORT_VARIABLE} to a free port, or unset it to let the launcher pick "
                                   "one.") from None


def launch(plan: LaunchPlan, target: Callable[..., T], *args: Any) -> T:
    """Run ``target(*args)`` in ``plan.processes`` processes (one per GPU) and return rank 0's result.

    ``target`` and ``args`` must be picklable (a module-level function): each process is a fresh
    interpreter. A ``CourseError`` in any rank is raised here as itself; the launcher stops the
    other ranks. Any other failure is a bug and comes back as the launcher's report with its traceback.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=plan.processes,
                          run_id=f"course-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{plan.port}", max_restarts=0, start_method="spawn")
    with tempfile.TemporaryDirectory(prefix="course-ddp-") as folder, _quiet_launcher():
        errors = Path(folder)
        try:
            results = elastic_launch(config, _rank_main)(plan, target, args, errors)
        except ChildFailedError:
            raised = sorted(errors.glob("rank-*.pickle"))
            if raised:
                raise _course_error(raised[0]) from None
            raise
    return results[0]


def _save_course_error(error: CourseError, path: Path) -> None:
    try:
        payload = {"message": str(error), "error": pickle.dumps(error)}
    except (pickle.PicklingError, TypeError, AttributeError):
        payload = {"message": str(error)}
    path.write_bytes(pickle.dumps(payload))


def _course_error(path: Path) -> CourseError:
    """The course error a rank raised, as itself where it unpickles, else its message."""
    payload = pickle.loads(path.read_bytes())
    try:
        error = pickle.loads(payload["error"])
    except (KeyError, TypeError, AttributeError, ImportError, pickle.UnpicklingError):  # a class it cannot rebuild
        return DistributedError(payload["message"])
    return error if isinstance(error, CourseError) else DistributedError(payload["message"])


@contextlib.contextmanager
def _quiet_launcher() -> Iterator[None]:
    """Keep the launcher's own log lines (it logs every failure at length) off the console; the error says it."""
    logger = logging.getLogger("torch.distributed.elastic")
    silent = logging.NullHandler()
    logger.addHandler(silent)
    logger.propagate = False
    try:
        yield
    finally:
        logger.propagate = True
        logger.removeHandler(silent)


def _rank_main(plan: LaunchPlan, target: Callable[..., T], args: tuple[Any, ...], errors: Path) -> T:
    """One rank: join the process group, run ``target``, hand a course error back to ``launch``."""
    rank = int(os.environ["RANK"])
    gpu = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if plan.device == "cuda" else None
    if gpu is not None:
        torch.cuda.set_device(gpu)
    else:  # the processes share the cores; PyTorch's default (all of them each) oversubscribes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan.processes))
    if rank:
        warnings.simplefilter("ignore")  # rank 0 reports for everyone
    dist.init_process_group(plan.backend, device_id=gpu)
    try:
        return target(*args)
    except CourseError as error:
        _save_course_error(error, errors / f"rank-{rank}.pickle")
        raise
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class Rank:
    """This process's place in a data-parallel run (rank 0 of 1 outside one)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, records and progress bars."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        """True inside a data-parallel run of more than one process."""
        return self.world_size > 1


def current() -> Rank:
    """This process's rank and the number of processes (0 of 1 unless a process group is running)."""
    if dist.is_available() and dist.is_initialized():
        return Rank(dist.get_rank(), dist.get_world_size())
    return Rank()


def device() -> torch.device:
    """The device of this rank: its own GPU under NCCL, else CUDA if present, else the CPU."""
    if current().parallel and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda" if torch.cuda.is_available() and not current().parallel else "cpu")


def sampler(dataset: Dataset, seed: int) -> DistributedSampler:
    """Shuffles with ``seed + epoch`` (call ``set_epoch``) and deals every rank its share of the permutation.

    Used with one process too, so that one process and N see the same order: batch k of the N ranks
    together holds the images of one process's batch k at N times the batch size. When the images
    do not divide by N, the first few are repeated to even the shares (PyTorch's rule).
    """
    rank = current()
    return DistributedSampler(dataset, num_replicas=rank.world_size, rank=rank.rank, shuffle=True, seed=seed)


def data_parallel(model: nn.Module, on: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel inside a parallel run (gradients averaged), else itself.

    Wrap again after changing which parameters train: DDP fixes that set when it is built.
    """
    if not current().parallel:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[on.index] if on.type == "cuda" else None)


def sum_across(values: list[float], on: torch.device) -> list[float]:
    """Each value summed over the ranks (the values themselves outside a parallel run)."""
    if not current().parallel:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(total)
    return total.tolist()


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` outside a parallel run)."""
    rank = current()
    if not rank.parallel:
        return [value]
    gathered: list[Any] = [None] * rank.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait for every rank (nothing outside a parallel run)."""
    if current().parallel:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (a download, a cache fill), the other ranks after it, from what it left."""
    rank = current()
    if not rank.main:
        barrier()
    yield
    if rank.main:
        barrier()


@contextlib.contextmanager
def global_batch_norm(model: nn.Module, on: torch.device) -> Iterator[None]:
    """Batch-norm layers in train mode normalise over the global batch, as in one process at N times the batch.

    On GPUs: PyTorch's SyncBatchNorm, converted in place by timm's converter (which also handles timm's
    fused BatchNormAct layers); the converted layers stay, and act as plain batch norm when not training.
    On the CPU, where SyncBatchNorm does not run, each such layer is handed the global batch (gathered
    with an all-reduce that passes gradients back to the rank that owns them), runs on it exactly as
    one process would, and keeps this rank's slice of the output; the hooks go when the block ends.
    It moves whole activations, which suits the small CPU runs it exists for. Outside a parallel run
    nothing changes.
    """
    rank = current()
    if not rank.parallel or on.type == "cuda":
        if rank.parallel:
            from timm.layers import convert_sync_batchnorm

            convert_sync_batchnorm(model)  # replaces the layers inside ``model``, whose own type is no batch norm
        yield
        return

    def gather_batch(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        if not module.training:
            return None
        own = inputs[0]
        placed = torch.stack([own if r == rank.rank else torch.zeros_like(own) for r in range(rank.world_size)])
        return (_AllReduceSum.apply(placed).flatten(0, 1), *inputs[1:])

    def keep_own_slice(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        return output.chunk(rank.world_size)[rank.rank] if module.training else None

    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles += [module.register_forward_pre_hook(gather_batch),
                        module.register_forward_hook(keep_own_slice)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: the gradient is the sum of the ranks' gradients.

    Written here because torch.distributed.nn.functional (which has one) is deprecated in favour of a
    private module; this is the textbook definition in public calls.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total
