"""Data parallelism on ``torch.distributed``: N ranks compute what one process computes on the
combined batch (DESIGN §6).

Under ``torchrun`` every rank runs the same script and builds the same program. Each problem's
data is sharded across the ranks (:func:`shard`), the parameters start identical on every rank
(:meth:`Distributed.check_parameters`), and every per-rank quantity that enters the algorithm
is replaced by its mean over the ranks through one hook, ``runtime.reduce(vec, kind)``:

- ``"seed"``: the direct gradient ∂C_P/∂θ_P, the seeds v_m = ∂C_P/∂θ*_m and the loss of each
  step (``Runtime.total_gradient``);
- ``"product"``: each Hessian-vector product H v and each mixed product (∂²C_Q/∂x∂θ_Q) p
  (``GradGraph``), so that Neumann and CG iterate on the combined Hessian; each
  ∇_x C_Q(θ ± εv) of finite differences, whose ε = eps/‖v‖ then comes from the reduced v and
  is identical on every rank; and the vector-Jacobian product that ``Unrolled`` returns;
- ``"replay"``: each gradient g_t that ``Unrolled`` replays, by a differentiable all-reduce;
- ``"total"``: the gradient a step applies (only in the per-rank mode, below).

**Why the mean is exact.** Let rank r's loss be the mean over its shard S_r of per-example
losses, with |S_r| = B on every rank. The combined batch's loss is
C = (1/NB) Σ_r Σ_{i∈S_r} ℓ_i = (1/N) Σ_r C_r, so every derivative of C (gradient, Hessian-vector
product, mixed product, gradient at θ ± εv) is the mean over ranks of the per-rank ones, and
every quantity formed from them (Neumann and CG iterates, ε, the hypergradient) is computed
from identical reduced vectors on every rank. For ``Unrolled``, g_t = (1/N) Σ_r g_t^r is formed
by an all-reduce whose adjoint is again an all-reduce of the cotangents; reverse mode on rank r
then gives the derivative of Σ_s vᵀθ_T^(s) with respect to rank r's copy of the inputs x, and
the derivative with respect to the one shared x is the mean of these over the ranks.

This needs two things: (1) **each loss is a mean over its batch** (a sum would be N times too
small); (2) **shards of equal size**. (2) holds by construction for a DataLoader over a map-style
dataset (re-built with a ``DistributedSampler(drop_last=True)``: every rank gets the same number
of examples, so its k-th batch has the same size everywhere) and is checked for other iterables
(each group of N consecutive batches must have one size). BatchNorm computes statistics per
rank: use ``torch.nn.SyncBatchNorm`` where the combined batch's statistics matter.

**Per-rank mode** (``Program(distributed_hypergrad="local")``): each rank computes its whole
gradient (hypergradient included) from its own shard and only the gradient a step applies is
averaged: one collective per step instead of one per product. It is an approximation: Neumann
and CG are nonlinear in the Hessian, so the mean of per-rank hypergradients is not the combined
batch's hypergradient.

Only rank 0 shows progress, logs and writes checkpoints; checkpoints hold every rank's data
position and batches, and loading reads the file on rank 0 and broadcasts it.
"""

from __future__ import annotations

import atexit
import io
import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler
from torch.utils.data import SequentialSampler

from compiler import errors

if TYPE_CHECKING:
    from mlodsl._problem import Problem
    from mlodsl._runtime import Runtime

Vec = list[torch.Tensor]
Kind = Literal["seed", "product", "replay", "total"]
MODES = ("exact", "local")

NOT_LAUNCHED = (
    "Program(distributed=True) found no process group and could not start one: {why}.\n"
    "Rule: a distributed program runs under torchrun (which sets RANK, WORLD_SIZE, MASTER_ADDR and "
    "MASTER_PORT for every process), or after torch.distributed.init_process_group().\n"
    "Fix: launch with `torchrun --nproc_per_node=N your_script.py`, or call "
    "torch.distributed.init_process_group(...) before building the Program."
)

PARAMETERS_DIFFER = (
    "the parameters of {name!r} ({loc}) differ between ranks: rank(s) {ranks} do not hold rank 0's{first}.\n"
    "Rule: under torch.distributed every rank starts from the same parameters; each step then "
    "applies the same averaged gradient on every rank, so they stay identical.\n"
    "Fix: seed torch identically on every rank before building the modules (torch.manual_seed(0) "
    "at the top of the script, not seed + rank), or call program.broadcast_parameters() before "
    "the first run to copy rank 0's parameters and buffers to every rank."
)

UNEQUAL_BATCHES = (
    "the data of {name!r} ({loc}) gives the {world} ranks batches of sizes {sizes} at the same step.\n"
    "Rule: under torch.distributed each rank's loss is a mean over its batch and gradients are "
    "averaged over ranks, which is the combined batch's gradient only when every rank's batch has "
    "the same size.\n"
    "Fix: yield batches of one size (e.g. DataLoader(..., drop_last=True)), or pass a DataLoader "
    "over a map-style dataset, which mlodsl shards by example with a DistributedSampler."
)

TOO_FEW_BATCHES = (
    "the data of {name!r} ({loc}) yields {count} batch(es) in a pass, fewer than the {world} ranks.\n"
    "Rule: under torch.distributed an iterable that is not a DataLoader over a dataset is sharded "
    "by batch: rank r takes batches r, r+N, r+2N, ... of each pass, so every rank needs one.\n"
    "Fix: pass a DataLoader over a dataset (sharded by example with a DistributedSampler), or "
    "yield at least {world} batches per pass."
)

SHARD_UNROLLED = (
    "problem {name!r} ({loc}) uses hypergrad=Unrolled(), which replays its optimizer's state, but "
    "Program(shard_optimizer=True) keeps each rank only a shard of that state.\n"
    "Rule: ZeroRedundancyOptimizer holds on each rank the state of the parameters it owns.\n"
    "Fix: use shard_optimizer=False, or another method for {name!r} (hypergrad='cg', 'neumann', 'fd')."
)

SHARD_ROLL_BACK = (
    "problem {name!r} ({loc}) has roll_back=True, which snapshots its optimizer's state, but "
    "Program(shard_optimizer=True) keeps each rank only a shard of that state.\n"
    "Rule: ZeroRedundancyOptimizer holds on each rank the state of the parameters it owns.\n"
    "Fix: use shard_optimizer=False, or roll_back=False for {name!r}."
)


def setup(distributed: bool | None, device: torch.device | None, mode: str,
          seed: int | None) -> tuple[Distributed | None, torch.device | None]:
    """The process group to run on (None: one process) and the device of this rank.

    ``distributed=None`` detects it: an initialized process group of more than one rank, or the
    environment ``torchrun`` sets (then the group is started here: NCCL for CUDA devices, else
    Gloo). ``True`` requires one (a group of one rank is allowed); ``False`` ignores it.
    """
    if mode not in MODES:
        raise errors.UsageError(f"Program(distributed_hypergrad={mode!r}): expected one of {MODES}.")
    if not _wanted(distributed, device) or (distributed is None and dist.get_world_size() == 1):
        return None, device
    device = _rank_device(device)  # before any collective: NCCL works on the current device
    return Distributed(mode, seed=0 if seed is None else seed), device


def _wanted(distributed: bool | None, device: torch.device | None) -> bool:
    """Whether to run distributed; under torchrun, the process group is started here."""
    if distributed is False:
        return False
    if not dist.is_available():
        if distributed:
            raise errors.UsageError(NOT_LAUNCHED.format(why="this torch is built without torch.distributed"))
        return False
    if not dist.is_initialized():
        if not (distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1):
            return False
        _start(device)
    return True


def _rank_device(device: torch.device | None) -> torch.device | None:
    """``cuda`` without an index is this rank's GPU: ``cuda:<LOCAL_RANK>``."""
    if device is None or device.type != "cuda":
        return device
    if device.index is None:
        local = os.environ.get("LOCAL_RANK")
        index = int(local) if local is not None else dist.get_rank() % torch.cuda.device_count()
        device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def _start(device: torch.device | None) -> None:
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend)
    except (ValueError, RuntimeError, KeyError) as e:
        raise errors.UsageError(NOT_LAUNCHED.format(why=f"{type(e).__name__}: {e}")) from e
    atexit.register(_stop)


def _stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class Distributed:
    """This rank's place in the process group, and the collectives mlodsl needs."""

    def __init__(self, mode: str = "exact", seed: int = 0) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.main = self.rank == 0
        self.mode = mode
        self.seed = seed  # the DistributedSampler's shuffling seed (the same on every rank)
        # objects and flags travel on the CPU: a Gloo group next to NCCL
        self.control = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def __repr__(self) -> str:
        return f"Distributed(rank={self.rank}, world={self.world}, mode={self.mode!r})"

    # -- the reduction hook ------------------------------------------------------------
    def attach(self, runtime: Runtime, shard_optimizer: bool = False) -> None:
        """Install the reductions on ``runtime`` and shard each problem's data."""
        runtime.reduce = self.reduce
        for st in runtime.state.values():
            st.batches.data = shard(st.batches.data, self.rank, self.world, st.problem.name,
                                    st.problem.loc, self.seed)
        if shard_optimizer:
            for p in runtime.problems.values():
                shard_optimizer_of(p)

    def reduce(self, vec: Vec, kind: Kind = "product") -> Vec:
        """The combined batch's value of a per-rank ``vec`` (see the module docstring)."""
        if self.mode == "exact":
            if kind == "replay":
                return mean_differentiable(vec)
            return vec if kind == "total" else mean(vec)
        return mean(vec) if kind == "total" else vec

    # -- parameters ----------------------------------------------------------------------
    def check_parameters(self, problems: Sequence[Problem]) -> None:
        """Raise on every rank if some rank's parameters differ from rank 0's (bit for bit)."""
        differ = torch.zeros(self.world, len(problems), dtype=torch.int64)
        first = {p.name: _first_differing(p) for p in problems}
        for j, p in enumerate(problems):
            differ[self.rank, j] = first[p.name] is not None
        dist.all_reduce(differ, group=self.control)  # every rank learns which ranks differ
        for j, p in enumerate(problems):
            ranks = [r for r in range(self.world) if differ[r, j]]
            if ranks:
                here = f" (here, rank {self.rank}: first {first[p.name]!r})" if first[p.name] else ""
                raise errors.ProblemError(PARAMETERS_DIFFER.format(name=p.name, loc=p.loc, ranks=ranks,
                                                                   first=here))

    def broadcast_parameters(self, problems: Sequence[Problem]) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        for p in problems:
            tensors = [*p.module.parameters(), *p.module.buffers()]
            with torch.no_grad():
                for t, theirs in zip(tensors, _broadcast_copy([t.detach() for t in tensors])):
                    t.copy_(theirs)

    # -- objects, agreement ----------------------------------------------------------------
    def on_main(self, fn: Callable[[], Any], share: bool = False) -> Any:
        """Run ``fn`` on rank 0 only; every rank returns its result (``share``) or raises its error."""
        box: list[Any] = [None]
        if self.main:
            try:
                result = fn()
                box[0] = ("ok", result if share else None)
            except Exception as e:  # told to every rank, so that none waits forever
                box[0] = ("error", e)
        dist.broadcast_object_list(box, src=0, group=self.control)
        status, value = box[0]
        if status == "error":
            raise value
        return value

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. validation metrics, so that all stop together)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on some rank (Ctrl-C: every rank stops after the same iteration)."""
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (moved to the CPU) on rank 0; None elsewhere."""
        obj = _to_cpu(obj)
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def own(self, sd: dict[str, Any]) -> dict[str, Any]:
        """This rank's part of a checkpoint: its data positions, batches and RNG states."""
        ranks = sd.get("ranks")
        if not ranks:
            return sd
        if len(ranks) != self.world:
            if self.main:
                warnings.warn(f"the checkpoint was written by {len(ranks)} ranks and is loaded by {self.world}: "
                              "every rank continues from rank 0's data position, so the batches differ from "
                              "an uninterrupted run.", errors.MlodslWarning, stacklevel=4)
            return sd
        return {**sd, **ranks[self.rank]}


# -- collectives on vectors ------------------------------------------------------------------
def mean(vec: Vec, group: Any = None) -> Vec:
    """The mean over ranks of a list of tensors: one flattened all-reduce per dtype and device."""
    if not vec:
        return vec
    world = dist.get_world_size(group)
    out = list(vec)
    for idx in _buckets(vec):
        flat = torch.cat([vec[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        for i, piece in zip(idx, flat.split([vec[i].numel() for i in idx])):
            out[i] = piece.view_as(vec[i])
    return out


class _AllReduceSum(torch.autograd.Function):
    """Σ over ranks; its adjoint is again Σ over ranks of the cotangents. (The same as the
    deprecated ``torch.distributed.nn.functional.all_reduce``; torch's functional collectives
    differentiate only in recent releases.)"""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def mean_differentiable(vec: Vec) -> Vec:
    """:func:`mean` through which reverse mode runs (``Unrolled``'s replayed gradients)."""
    if not vec:
        return vec
    world = dist.get_world_size()
    out = list(vec)
    for idx in _buckets(vec):
        flat = _AllReduceSum.apply(torch.cat([vec[i].reshape(-1) for i in idx])) / world
        for i, piece in zip(idx, flat.split([vec[i].numel() for i in idx])):
            out[i] = piece.view_as(vec[i])
    return out


def _buckets(vec: Vec) -> list[list[int]]:
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(vec):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return list(groups.values())


def _first_differing(p: Problem) -> str | None:
    """The name of the first parameter of ``p`` that differs from rank 0's (None: all equal)."""
    named = list(p.module.named_parameters())
    mine = [t.detach() for _, t in named]
    theirs = _broadcast_copy(mine)
    return next((n for (n, _), a, b in zip(named, mine, theirs) if not torch.equal(a, b)), None)


def _broadcast_copy(tensors: Vec) -> Vec:
    """Rank 0's values of ``tensors`` (copies; the tensors themselves are not changed)."""
    out = list(tensors)
    for idx in _buckets(tensors):
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.broadcast(flat, src=0)
        for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = piece.view_as(tensors[i])
    return out


def _to_cpu(obj: Any) -> Any:
    """A deep copy with every tensor on the CPU (through torch's serializer: attrs classes too)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=False)


# -- data ------------------------------------------------------------------------------------
def shard(data: Any, rank: int, world: int, name: str, loc: object, seed: int = 0) -> Any:
    """This rank's share of a problem's data.

    A DataLoader over a map-style dataset is re-built with a ``DistributedSampler`` (the same
    batch size, collate_fn, workers, ...; shuffled if the original shuffled, with ``seed``; a
    new shuffle each epoch), so that rank r gets examples r, r+N, r+2N, ... of each pass; one
    that already has a DistributedSampler is kept. Any other iterable is sharded by batch
    (:class:`Strided`).
    """
    if data is None:
        return None
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, DistributedSampler):
            return data
        if _by_example(data):
            return _rebuild(data, rank, world, seed)
    if iter(data) is data:  # an iterator: one pass, like the original
        return _strided(data, rank, world, name, loc)
    return Strided(data, rank, world, name, loc)


def _by_example(loader: DataLoader) -> bool:
    """A DataLoader whose batches are drawn by torch's own samplers from a map-style dataset."""
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return False
    if type(loader.batch_sampler) is not BatchSampler:
        return False
    sampler = loader.sampler
    if type(sampler) is SequentialSampler:
        return True
    return (type(sampler) is RandomSampler and not sampler.replacement
            and sampler._num_samples is None)


def _rebuild(loader: DataLoader, rank: int, world: int, seed: int) -> DataLoader:
    shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=shuffle,
                                 seed=seed, drop_last=True)
    kwargs: dict[str, Any] = dict(
        batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
        persistent_workers=loader.persistent_workers)
    if loader.num_workers:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    for optional in ("pin_memory_device", "in_order"):
        if hasattr(loader, optional):
            kwargs[optional] = getattr(loader, optional)
    return DataLoader(loader.dataset, **kwargs)


class Strided:
    """Rank r's view of an iterable: batches r, r+N, r+2N, ... of each pass.

    Every rank iterates the whole iterable (it must yield the same batches in the same order on
    every rank), takes its batch from each group of N, drops a last incomplete group (so every
    rank has as many batches per pass), and checks that the batches of a group have one size.
    """

    def __init__(self, data: Iterable, rank: int, world: int, name: str, loc: object) -> None:
        self.data, self.rank, self.world, self.name, self.loc = data, rank, world, name, loc

    def __iter__(self) -> Iterator[Any]:
        return _strided(iter(self.data), self.rank, self.world, self.name, self.loc)

    def __repr__(self) -> str:
        return f"Strided({self.data!r}, rank={self.rank}, world={self.world})"


def _strided(it: Iterator[Any], rank: int, world: int, name: str, loc: object) -> Iterator[Any]:
    count = 0
    while True:
        group = list(itertools.islice(it, world))
        if len(group) < world:
            if count == 0 and group:
                raise errors.ProblemError(TOO_FEW_BATCHES.format(name=name, loc=loc, count=len(group),
                                                                 world=world))
            return
        sizes = [_size(b) for b in group]
        if len(set(sizes)) > 1:
            raise errors.ProblemError(UNEQUAL_BATCHES.format(name=name, loc=loc, world=world, sizes=sizes))
        count += 1
        yield group[rank]


def _size(batch: Any) -> int | None:
    """The leading dimension of a batch's first tensor (None: it holds no tensor)."""
    leaves, _ = tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None


def set_epoch(data: Any, epoch: int) -> None:
    """A DistributedSampler shuffles anew for each epoch it is told (the same on every rank)."""
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


# -- optimizer state sharding -------------------------------------------------------------------
def shard_optimizer_of(p: Problem) -> None:
    """Replace ``p.optimizer`` by a ``ZeroRedundancyOptimizer`` of the same class and settings.

    It is built on the same param-group dicts, so a scheduler built on the original optimizer
    keeps changing the learning rate of the one that steps. Unrolled and roll_back, which
    snapshot the whole optimizer state, are refused.
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from mlodsl._hypergrad import Unrolled

    if isinstance(p.optimizer, ZeroRedundancyOptimizer):
        return
    if isinstance(p.hypergrad, Unrolled):
        raise errors.UsageError(SHARD_UNROLLED.format(name=p.name, loc=p.loc))
    if p.options.roll_back:
        raise errors.UsageError(SHARD_ROLL_BACK.format(name=p.name, loc=p.loc))
    old = p.optimizer
    zero = ZeroRedundancyOptimizer(old.param_groups, optimizer_class=type(old), **old.defaults)
    # the scheduler watches the original optimizer's step(); its replacement takes the steps now
    zero.register_step_post_hook(lambda *_: setattr(old, "_opt_called", True))
    p.optimizer = zero


def optimizer_state(optimizer: torch.optim.Optimizer, main: bool) -> dict | None:
    """The whole optimizer state on rank 0 (a collective for a ZeroRedundancyOptimizer)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if not isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer.state_dict()
    optimizer.consolidate_state_dict(to=0)
    return optimizer.state_dict() if main else None


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """``optimizer.load_state_dict(sd)``. A ZeroRedundancyOptimizer loads its shard into the
    optimizer that steps; the copy of the whole state it also keeps is dropped (it is never read:
    ``consolidate_state_dict`` gathers the shards)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    optimizer.load_state_dict(sd)
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.state.clear()
