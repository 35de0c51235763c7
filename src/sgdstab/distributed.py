"""Data-parallel curvature: a Problem whose data is one rank's shard of a global data set.

Every quantity of a Problem is a sum over samples divided by n (SPEC.md section 1), and every
operator product passes its local sum through ``Problem.reduce_sum`` (or, for per-sample values
in sample space, ``Problem.gather_samples``). ``ShardedProblem`` makes those hooks one explicit
``torch.distributed.all_reduce(SUM)`` each, on a detached tensor: no autograd runs through a
collective and no DDP wrapper is involved (DDP's hooks do not fire for ``autograd.grad``).
``ReduceOp.AVG`` is never used (gloo does not implement it); the division by the global n is ours.

So the operators (``hessian``, ``gauss_newton``, ``noise_covariance``, ``ntk``) and every estimator
(Lanczos, power iteration, Hutchinson, Hutch++, Frobenius, SLQ) and the stochastic alignment
factor run unchanged on every rank: with the same seed each rank draws the same probes, gets the
same reduced products, and returns the same numbers. Computations that need every sample in one
process (the sample-space NTK K behind ``alignment(method="exact")``, ``stability`` and
``gram_matrix``) refuse a shard.

Launch with ``torchrun`` (or ``srun``): ``init_from_env()`` joins the process group it describes
(gloo on CPU, NCCL on GPU), ``ShardedProblem.from_global(...)`` takes this rank's contiguous slice.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sgdstab.errors import InputError
from sgdstab.problem import Problem

T = TypeVar("T")


def world_size_from_env() -> int:
    """WORLD_SIZE as set by torchrun / srun wrappers; 1 when not launched by one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str | torch.device | None = None) -> torch.device:
    """Join the process group that torchrun describes in the environment; return this rank's device.

    The backend is NCCL when ``device`` is a CUDA device (each rank then uses ``cuda:LOCAL_RANK``)
    and gloo otherwise. A group that already exists is used as it is. A group created here is
    destroyed when the process exits.
    """
    wanted = torch.device(device) if device is not None else torch.device("cpu")
    if wanted.type == "cuda":
        wanted = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(wanted)
    if not dist.is_initialized():
        missing = [
            name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ
        ]
        if missing:
            raise InputError(
                f"cannot join a process group: {', '.join(missing)} not set; launch with "
                "`torchrun --nproc-per-node N ...` (or call torch.distributed.init_process_group yourself)"
            )
        dist.init_process_group(backend="nccl" if wanted.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return wanted


def shard_bounds(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous shard: the first ``n mod world_size`` ranks hold one more."""
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard(inputs: Tensor, targets: Tensor, group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
    """This rank's contiguous slice of a global data set (see ``shard_bounds``)."""
    start, stop = shard_bounds(len(inputs), dist.get_rank(group), dist.get_world_size(group))
    return inputs[start:stop], targets[start:stop]


def is_main_process(group: dist.ProcessGroup | None = None) -> bool:
    """True on rank 0, and in a process that is not part of a process group."""
    return not dist.is_initialized() or dist.get_rank(group) == 0


def broadcast_from_main(value: T, group: dist.ProcessGroup | None = None) -> T:
    """Rank 0's ``value`` on every rank (any picklable object); the value itself outside a group.

    Ranks on one kind of machine already compute bitwise-identical results; this makes it so
    where they may not (different CPUs or GPUs whose LAPACK/BLAS paths round differently).
    """
    if not dist.is_initialized():
        return value
    holder: list[Any] = [value]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    return holder[0]


class ShardedProblem(Problem):
    """A Problem over this rank's contiguous shard of a data set split across a process group.

    ``num_samples`` is the global n. Every rank of ``group`` must construct its ShardedProblem
    (construction gathers the shard sizes) and then make the same calls in the same order,
    since each product is a collective. Shards may differ in size; a rank without any sample is
    an error, raised on every rank, that names it.

    Args:
        model, loss, chunk_size, params: as for ``Problem``; the same model on every rank.
        inputs, targets: this rank's shard; the global order is rank 0's shard, then rank 1's, ...
        group: the process group (default: the world).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        loss: str = "mse",
        chunk_size: int = 1024,
        params: Sequence[str] | None = None,
        group: dist.ProcessGroup | None = None,
    ):
        if not dist.is_initialized():
            raise InputError(
                "ShardedProblem needs a torch.distributed process group: launch with torchrun and call "
                "sgdstab.distributed.init_from_env() first, or use sgdstab.Problem in a single process"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # Shard sizes from every rank, exchanged before any check so that all ranks fail together.
        device = next(model.parameters()).device
        counts = torch.zeros(self.world_size, dtype=torch.int64, device=device)
        counts[self.rank] = len(inputs)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        self.shard_sizes = [int(c) for c in counts.tolist()]
        empty = [rank for rank, count in enumerate(self.shard_sizes) if count == 0]
        if empty:
            raise InputError(
                f"rank{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))} of {self.world_size} "
                f"{'have' if len(empty) > 1 else 'has'} no sample (shard sizes {self.shard_sizes}); "
                "use fewer processes or more data so every rank holds at least one sample"
            )
        super().__init__(model, inputs, targets, loss=loss, chunk_size=chunk_size, params=params)
        self.first_sample = sum(self.shard_sizes[: self.rank])
        self.num_local_samples = self.shard_sizes[self.rank]
        self.num_samples = sum(self.shard_sizes)

    @classmethod
    def from_global(
        cls,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        loss: str = "mse",
        chunk_size: int = 1024,
        params: Sequence[str] | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> ShardedProblem:
        """This rank's ShardedProblem from the whole data set, of which it keeps its own slice."""
        if not dist.is_initialized():
            raise InputError("ShardedProblem.from_global needs a process group: call init_from_env() first")
        local_inputs, local_targets = shard(inputs, targets, group)
        return cls(
            model, local_inputs, local_targets, loss=loss, chunk_size=chunk_size, params=params, group=group
        )

    @classmethod
    def from_loader(cls, *args: Any, **kwargs: Any) -> ShardedProblem:
        raise InputError(
            "a ShardedProblem is built from tensors (ShardedProblem.from_global or this rank's shard); "
            "give each rank its own loader-backed data as tensors"
        )

    # ----------------------------------------------------------------------------- the hooks
    def reduce_sum(self, local: Tensor) -> Tensor:
        """Sum over ranks by one all_reduce(SUM) of a detached copy (the caller's tensor is kept)."""
        total = local.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def gather_samples(self, local: Tensor) -> Tensor:
        """All n samples' rows: each rank writes its rows into zeros, one all_reduce(SUM) adds them.

        Adding zeros is exact, so the result equals a concatenation bit for bit; unlike
        all_gather it needs no equal shard sizes.
        """
        full = torch.zeros((self.num_samples, *local.shape[1:]), dtype=local.dtype, device=local.device)
        full[self.first_sample : self.first_sample + len(local)] = local.detach()
        dist.all_reduce(full, op=dist.ReduceOp.SUM, group=self.group)
        return full

    def local_samples(self, rows: Tensor) -> Tensor:
        return rows[self.first_sample : self.first_sample + self.num_local_samples]

    def require_whole_data(self, what: str) -> None:
        raise InputError(
            f"{what} needs every sample in one process, and this Problem holds rank {self.rank}'s shard "
            f"of {self.world_size}; use the matrix-free path (alignment method='stochastic', CLI "
            "--alignment stochastic) or run in a single process"
        )

    def __repr__(self) -> str:
        return (
            f"ShardedProblem({type(self.model).__name__}, n={self.num_samples} "
            f"(rank {self.rank}/{self.world_size}: {self.num_local_samples}), p={self.num_params}, "
            f"C={self.num_outputs}, loss={self.loss_name!r}, chunk_size={self.chunk_size})"
        )


def shard_problem(problem: Problem, group: dist.ProcessGroup | None = None) -> ShardedProblem:
    """This rank's ShardedProblem built from a whole-data Problem (same model, loss, parameters)."""
    if isinstance(problem, ShardedProblem):
        return problem
    inputs, targets = problem.inputs, problem.targets
    if inputs is None or targets is None:
        raise InputError(
            "a Problem read from a loader cannot be sharded automatically; build a ShardedProblem "
            "from each rank's tensors instead"
        )
    return ShardedProblem.from_global(
        problem.model,
        inputs,
        targets,
        loss=problem.loss_name,
        chunk_size=problem.chunk_size,
        params=problem.param_names,
        group=group,
    )


def shard_if_launched(problem: Problem) -> Problem:
    """This rank's shard of ``problem`` under a launcher with WORLD_SIZE > 1, else ``problem``.

    Joins the launcher's process group first; a problem on a GPU moves to ``cuda:LOCAL_RANK``.
    """
    if world_size_from_env() <= 1:
        return problem
    device = init_from_env(problem.device)
    if device != problem.device:
        problem.model.to(device)
    return shard_problem(problem)
