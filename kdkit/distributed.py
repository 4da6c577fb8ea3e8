"""Cross-rank helpers: gathers for contrastive and listwise distillers, samplers for loaders.

``gather`` concatenates a tensor from every rank and keeps autograd intact: the backward pass
sums, over all ranks, the gradient each rank's loss sends to a slice, and returns to every rank
the gradient of *its own* (local) slice. A loss computed for the local rows against the gathered
columns therefore gives, after DDP's gradient averaging, exactly the gradient of the same loss on
one process with the whole global batch (tests/test_gather_equivalence.py checks 2 x B == 1 x 2B).

``eval_sampler`` and ``FixedShardSampler`` are samplers a datamodule passes to its loaders;
Lightning keeps a ``DistributedSampler`` it finds instead of injecting its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, size = world()
        ctx.rank, ctx.size, ctx.n = rank, size, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss may use every slice
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather(x: Tensor) -> tuple[Tensor, int]:
    """All ranks' ``x`` concatenated along dim 0, and the offset of the local rows in it.

    Every rank must pass the same shape (use ``drop_last=True`` for training loaders).
    """
    rank, size = world()
    if size == 1:
        return x, 0
    return _GatherWithGrad.apply(x), rank * x.shape[0]


@torch.no_grad()
def gather_nograd(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, without autograd (memory-bank updates)."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def sum_over_ranks(values: list[int]) -> list[int]:
    """Each rank's integer ``values`` summed over all ranks (every rank gets the sums); the values
    themselves outside a process group. Collective: every rank must call it."""
    _, size = world()
    if size == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    total = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return total.tolist()


@torch.no_grad()
def broadcast_from_rank0(tensors: list[Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values on every rank; nothing outside a
    process group. Collective: every rank must call it with tensors of the same shapes."""
    _, size = world()
    for t in tensors if size > 1 else ():
        if t.numel():  # an empty buffer (a queue not filled yet) has nothing to send
            dist.broadcast(t, src=0)


def eval_sampler(dataset: Dataset) -> DistributedSampler | None:
    """Sampler for a validation/test loader: every sample on exactly one rank; None on 1 process.

    Lightning's default ``DistributedSampler`` pads the shards to equal length with repeated
    samples, so metrics reduced over ranks count a few samples twice (an eval set of 359 on 2
    ranks scores 360). ``UnrepeatedDistributedSampler`` gives rank r the samples r, r + W, ...;
    shards differ by at most one sample, which evaluation tolerates (no gradient sync there).
    Call it when the loader is built (in ``val_dataloader``), once the process group exists.
    """
    rank, size = world()
    if size == 1:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=False)


class FixedShardSampler(DistributedSampler):
    """Training sampler whose rank shards never change; each epoch shuffles within the shard.

    Rank r always sees the samples r, r + W, r + 2W, ... (padded like ``DistributedSampler``
    so every rank has as many), in a new order every epoch (seeded by ``seed + epoch``). The
    global batch is still a uniform mix over the data set, but a rank meets only its own shard,
    so a per-rank teacher-output cache (``kdkit.cache``) is complete after one epoch instead of
    filling over many as with reshuffled shards.

    Args:
        dataset: the training set.
        seed: base seed of the per-epoch shuffle (the same on every rank).
        num_replicas, rank: default to the current process group (``world()``).
    """

    def __init__(self, dataset: Dataset, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None):
        here, size = world()
        super().__init__(dataset, num_replicas=size if num_replicas is None else num_replicas,
                         rank=here if rank is None else rank, shuffle=True, seed=seed)

    def __iter__(self):
        shard = list(range(len(self.dataset)))
        shard += shard[: self.total_size - len(shard)]  # pad as DistributedSampler does
        shard = torch.tensor(shard[self.rank : self.total_size : self.num_replicas])
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(shard[torch.randperm(len(shard), generator=g)].tolist())


def refuse_relaunch_in_sweep(trainer) -> None:
    """Raise KdkitError when ``trainer`` would relaunch the command inside a Hydra sweep (``-m``).

    Lightning's ``ddp`` strategy starts ranks 1..N-1 by re-running ``sys.argv``; in a sweep (or
    a submitit-local job) that command is the whole sweep (or submitit's own), so every rank
    would start the sweep again. Cluster launches (SLURM ``tasks_per_node == devices``) and
    ``ddp_spawn`` create their processes otherwise and pass.
    """
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, _SubprocessScriptLauncher) or launcher.num_processes < 2:
        return
    if launcher.cluster_environment.creates_processes_externally:
        return
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        from kdkit.errors import KdkitError

        raise KdkitError(
            f"trainer.strategy=ddp with {launcher.num_processes} devices relaunches the command, "
            "which inside a -m sweep re-runs the sweep: use hydra/launcher=submitit_slurm "
            "(tasks_per_node = trainer.devices), trainer.strategy=ddp_spawn, or one device per job")


_oversubscription_warned = False  # make_trainer runs once per stage: warn on the first only


def warn_if_oversubscribed(trainer) -> str | None:
    """Warn once (rank 0) when a CPU run's ranks x threads exceed the cores; return the warning.

    ``trainer=ddp trainer.devices=3`` on 2 cores runs, with no complaint from Lightning, many
    times slower than one process: ranks and their intra-op threads fight for the cores. The
    threads per rank are what each rank will use: ``OMP_NUM_THREADS`` if set, else Lightning's
    own split of the cores over several ranks (at least 1 each), else ``torch.get_num_threads()``.

    Args:
        trainer: a built ``lightning.Trainer`` (before ``fit``; nothing is launched).
    """
    global _oversubscription_warned
    from lightning.pytorch.accelerators import CPUAccelerator

    if _oversubscription_warned or not isinstance(trainer.accelerator, CPUAccelerator):
        return None
    ranks, cores = trainer.num_devices, _available_cores()
    threads = _threads_per_rank(ranks, cores)
    if ranks * threads <= cores or not _is_rank_zero(trainer):
        return None
    _oversubscription_warned = True
    fixes = [f"trainer.devices={max(1, cores // threads)}"] if ranks > 1 else []
    if threads > 1:
        fixes.append("fewer threads per rank (OMP_NUM_THREADS or torch.set_num_threads, "
                     f"now {threads})")
    message = (f"{_plural(ranks, 'CPU rank')} x {_plural(threads, 'thread')} on "
               f"{_plural(cores, 'core')} oversubscribes the CPU and runs many times slower; "
               f"use {' or '.join(fixes)} so that ranks x threads <= {cores}")
    from kdkit.errors import say

    say(message, warning=True)
    return message


def _is_rank_zero(trainer) -> bool:
    """Rank 0 of the job; relaunched DDP ranks build their Trainer before ranks are assigned."""
    from kdkit.errors import launched_as_rank_zero

    return trainer.global_rank == 0 and launched_as_rank_zero()


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _available_cores() -> int:
    """Cores this process may run on (its affinity mask under SLURM/taskset), at least 1."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _threads_per_rank(ranks: int, cores: int) -> int:
    """Intra-op threads each rank will run with (see ``warn_if_oversubscribed``)."""
    import os

    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    if ranks > 1:  # Lightning's launchers then set max(1, cores // ranks) threads per rank
        return max(1, cores // ranks)
    return torch.get_num_threads()
