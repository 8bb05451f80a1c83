"""Beyond one device: ``torchrun`` process groups, DDP / FSDP2 wrapping, global reductions
and sharded checkpoints.

Launch any script that uses this module with ``torchrun --nproc_per_node N script.py``
(several machines: add ``--nnodes M --rdzv_backend c10d --rdzv_endpoint HOST:PORT``). Without
torchrun's environment everything degrades to one process: the same code runs unchanged.

Loss normalisation across ranks: every rank computes ``local_sum / global_count`` where the
count (tokens or rows) is all-reduced once per mini-batch (:meth:`DistContext.all_reduce_sum`).
DDP and FSDP2 *average* gradients over ranks, so the local loss is multiplied by
:attr:`DistContext.grad_scale` (= world size) to make the summed gradient equal the
one-process gradient of the global batch.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

STRATEGIES = ("none", "ddp", "fsdp2")
# Device types on which ``mixed_precision`` applies. Not the CPU: bf16 matmuls there are
# slower than fp32 on most machines. gloo itself handles bf16, so tests add "cpu" to run the
# GPU configuration's bf16 path on a CPU machine.
MIXED_PRECISION_DEVICES = ("cuda",)


@dataclass
class DistributedConfig:
    """``strategy``: none | ddp | fsdp2. ``backend``: process-group backend (default gloo on
    CPU, nccl on CUDA). ``mixed_precision``: bf16 parameters/activations with fp32 gradient
    reduction under FSDP2 on GPU (ignored on CPU). ``offload_reference`` (RL): keep the frozen
    reference model in CPU memory and move it to the device only for its log-prob pass each
    step (saves its weights' device memory for the rest of the step; costs two copies);
    without it, ``fsdp2`` shards the reference like the policy. ``timeout_s``: how long a rank
    waits in a collective (or for the others to join) before it fails, e.g. when another rank
    hangs; torch's default is 30 minutes."""

    strategy: str = "none"
    backend: Optional[str] = None
    mixed_precision: bool = True
    reshard_after_forward: bool = True
    offload_reference: bool = False
    timeout_s: float = 1800.0

    def __post_init__(self):
        from rlhf_fast.ops._validate import finite

        if self.strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"distributed.backend must be None, 'gloo' or 'nccl', got {self.backend!r}")
        for name in ("mixed_precision", "reshard_after_forward", "offload_reference"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"distributed.{name} must be true or false, got {getattr(self, name)!r}")
        finite("distributed.timeout_s", self.timeout_s, "> 0")  # seconds


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node),
    its ``device``, and the process ``group`` (None = the default group, or no group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes the run folder and the non-sharded files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def grad_scale(self) -> float:
        """Multiply a ``local_sum / global_count`` loss by this under DDP/FSDP2 (they average)."""
        return float(self.world_size)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (a new tensor; ``t`` itself unchanged). No-op on one process."""
        out = t.clone()
        if self.distributed:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        if self.distributed:
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return out

    def all_gather_ints(self, values: Sequence[int]) -> List[List[int]]:
        """``values`` (the same number on every rank) of every rank, in rank order:
        ``[world_size][len(values)]``. One process: ``[list(values)]``."""
        if not self.distributed:
            return [list(values)]
        t = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.group)
        return [o.tolist() for o in out]

    def all_gather_objects(self, obj: Any) -> List[Any]:
        """``obj`` (picklable; tensors on the CPU) of every rank, in rank order. One process:
        ``[obj]``."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def mean_metrics(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """Average a dict of scalar metrics over ranks (one all-reduce for all of them). An int
        whose average is whole (a count or an epoch every rank agrees on) stays an int, as one
        process logs it."""
        if not self.distributed or not metrics:
            return dict(metrics)
        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        vec = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        vec = self.all_reduce_sum(vec.to(self.device)).cpu() / self.world_size
        out = dict(metrics)
        for k, v in zip(keys, vec.tolist()):
            out[k] = int(v) if isinstance(metrics[k], int) and float(v).is_integer() else float(v)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def shard(self, n: int) -> range:
        """This rank's contiguous block of ``n`` items (``n`` must divide evenly, so every rank
        does the same work and the global batch equals the one-process batch)."""
        if n % self.world_size != 0:
            raise ValueError(f"the global batch ({n}) must be divisible by the number of ranks ({self.world_size})")
        k = n // self.world_size
        return range(self.rank * k, (self.rank + 1) * k)


def init_distributed(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> DistContext:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*);
    a single process without those variables gets a one-rank context and no group.
    ``timeout_s``: the group's timeout for collectives (None: torch's default, 30 minutes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=float(timeout_s))}
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), **kw)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown() -> bool:
    """Leave the process group at the end of a successful run: a barrier (so no rank closes its
    connections while a peer still reads from them, and rank 0's last writes are done), then
    ``destroy_process_group``. Every rank must call it. Returns whether there was a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True


def exit_process(code: int = 0) -> None:
    """Flush stdout/stderr and end this process now, skipping interpreter finalisation.

    For the end of a ``torchrun`` worker, after :func:`shutdown`: gloo's worker threads can
    still hold tensors (FSDP2's asynchronous all-gathers) whose release takes the GIL while the
    interpreter is being torn down; Python then ends that thread with a forced unwind through
    a ``noexcept`` frame, ``std::terminate`` aborts the process and torchrun kills every other
    rank and reports the run failed, after all its work was written. Seen in 1 of 8 two-rank
    runs on a loaded 2-core machine with torch 2.13, with ``destroy_process_group`` called."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to lose
            pass
    os._exit(code)


def wrap_model(model: torch.nn.Module, strategy: str, ctx: DistContext, *, mixed_precision: bool = False,
               reshard_after_forward: bool = True, find_unused_parameters: bool = False) -> torch.nn.Module:
    """Wrap ``model`` for data parallelism. ``ddp``: DistributedDataParallel
    (``find_unused_parameters`` passed on). ``fsdp2``: ``fully_shard`` on every transformer
    block (found as ``model.model.layers`` / ``model.transformer.h`` / ``model.layers`` /
    ``model.backbone.layers``) and then on the root, so parameters, gradients and optimiser
    state are sharded across ranks; ``mixed_precision`` (bf16 parameters and activations,
    fp32 gradient reduction) applies on CUDA only (:data:`MIXED_PRECISION_DEVICES`). ``none``
    returns it as is."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "none" or not ctx.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                   find_unused_parameters=find_unused_parameters)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: Dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mixed_precision and ctx.device.type in MIXED_PRECISION_DEVICES:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, **kw)
    # The root keeps its parameters (embeddings, final norm, LM head) gathered after forward:
    # the fused log-prob ops read the LM-head weight outside the module's forward, and the
    # root's post-backward reduce-scatter still sees its gradient.
    fully_shard(model, **{**kw, "reshard_after_forward": False})
    return model


def transformer_blocks(model: torch.nn.Module):
    """The repeated decoder blocks of a Hugging Face causal LM (empty if none is found)."""
    for path in ("model.layers", "transformer.h", "layers", "base_model.model.model.layers",
                 "gpt_neox.layers", "backbone.layers", "backbone.h"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return list(obj)
    return []


def full_state_dict(model: torch.nn.Module, ctx: "DistContext", strategy: str) -> Optional[Dict[str, Any]]:
    """Under FSDP2 (distributed): the full, unsharded state dict of ``model`` on the CPU,
    gathered with every rank's help (a collective: all ranks must call it), for rank 0 to
    ``save_pretrained``. Otherwise None: the module holds its full weights itself."""
    if not (ctx.distributed and strategy == "fsdp2"):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place, so it is the model itself)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def no_gradient_sync(model: torch.nn.Module) -> Iterator[None]:
    """Hold back the gradient reduction of the backward passes of ``model`` run inside the
    block (their forwards too: DDP decides at the forward): DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync(False)`` (back on at the exit, also after an error). The
    gradients accumulate locally and the next backward outside the block reduces them all, as
    transformers / accelerate do for every micro-batch of an optimizer step but the last.
    Nothing for a model that is neither (one process, strategy none)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2
        FSDPModule = ()
    sharded = isinstance(model, FSDPModule)  # the root unit: the setting recurses into the others
    if sharded:
        model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        if sharded:
            model.set_requires_gradient_sync(True)


def fsdp_units(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The ``fully_shard`` units inside ``model`` (itself included), in module order; empty
    when ``model`` is not sharded with FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered parameter copy of an FSDP2 ``model`` (no-op without FSDP2 units).
    Call after changing the parameters outside an optimiser step that follows a backward
    (e.g. a line search): a unit still gathered from a forward without backward (the root
    keeps its parameters after forward) would otherwise compute with the old values."""
    for unit in fsdp_units(model):
        unit.reshard()


def _reshards_after_forward(unit) -> bool:
    # FSDP2 exposes a setter only; a parameter group without a post-forward mesh keeps its
    # parameters gathered after forward
    groups = unit._get_fsdp_state()._fsdp_param_groups
    return any(getattr(g, "post_forward_mesh_info", True) is not None for g in groups)


@contextlib.contextmanager
def gathered_params(model: torch.nn.Module) -> Iterator[bool]:
    """Hold the full parameters of an FSDP2 ``model`` on every rank for the duration of the
    block, e.g. for generation: one all-gather per unit on entry (a collective: every rank
    must enter), then forwards — and direct calls of submodules — issue no collectives, so
    ranks may run different numbers of them (each rank decodes its own prompts until its own
    rows stop). On exit every unit is resharded and its ``reshard_after_forward`` setting
    restored. Costs one full copy of the parameters per rank while inside. Yields whether
    ``model`` is sharded; a model without FSDP2 units is left alone (yields False)."""
    units = fsdp_units(model)
    if not units:
        yield False
        return
    settings = [_reshards_after_forward(u) for u in units]
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
    try:
        handles = [u.unshard(async_op=True) for u in units]
        for h in handles:
            if h is not None:
                h.wait()
        yield True
    finally:
        for u, keep in zip(units, settings):
            u.reshard()
            u.set_reshard_after_forward(keep, recurse=False)


# ----------------------------------------------------------------------- checkpoints


@contextlib.contextmanager
def _dcp_quiet(ctx: "DistContext"):
    """torch.distributed.checkpoint warns on every save / load without a process group that it
    assumes one process; that is what a one-process run of strategy ddp / fsdp2 means."""
    import warnings

    with warnings.catch_warnings():
        if not ctx.distributed:
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
        yield


# a sharded checkpoint's RNG states, one file per rank
_RNG_FILE = "rng_{rank}.pt"


def save_sharded(path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], ctx: DistContext,
                 extra: Optional[Dict[str, Any]] = None, *, complete_marker: bool = False) -> str:
    """Save model (and optimiser) state with ``torch.distributed.checkpoint``: every rank
    writes its own shard, no rank gathers the full model. Written to ``path.tmp`` and renamed
    by rank 0 after all ranks finished, so a crash never leaves a half checkpoint at ``path``.
    ``extra`` (JSON-able: step, data position, ...) goes to ``extra.json``; with
    ``complete_marker`` a ``COMPLETE`` file too, before the rename (a checkpoint folder that
    :func:`rlhf_fast.trainers.checkpoint.latest_checkpoint` accepts from the moment it
    exists). Each rank's RNG states go to ``rng_<rank>.pt``. An older folder at ``path`` is
    moved aside and removed only once the new one is in place. Loadable on any number of ranks
    with :func:`load_sharded`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path.rstrip("/") + ".tmp"
    if ctx.is_main and os.path.exists(tmp):
        shutil.rmtree(tmp)
    ctx.barrier()
    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": msd}
    if optimizer is not None:
        state["optim"] = osd
    with _dcp_quiet(ctx):
        dcp.save(state, checkpoint_id=tmp)
    from rlhf_fast.trainers.checkpoint import rng_state

    # each rank's generators (dropout masks...), as transformers' rng_state_{rank}.pth: a resume
    # restores them (load_sharded's restore_rng) so its next step equals the straight run's
    torch.save(rng_state(), os.path.join(tmp, _RNG_FILE.format(rank=ctx.rank)))
    ctx.barrier()
    if ctx.is_main:
        names = ["extra.json"] + (["COMPLETE"] if complete_marker else [])
        for name, text in zip(names, [json.dumps(extra or {}), "ok\n"]):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        from rlhf_fast.trainers.checkpoint import replace_folder

        replace_folder(tmp, path.rstrip("/"))
    ctx.barrier()
    return path


def load_full_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    model_sd: Dict[str, torch.Tensor], optim_sd: Optional[Dict[str, Any]]) -> None:
    """Load a full, unsharded state — what a one-process run saves: ``model.state_dict()``
    and the optimiser's own ``state_dict()`` (keyed by parameter index, in the order of
    ``model.parameters()`` that need gradients) — into an FSDP2-sharded ``model`` (and its
    ``optimizer``): every rank keeps its own shard. A collective: every rank must call it,
    each with the same full state (read from the shared checkpoint folder).

    Tied weights saved once (``save_pretrained`` drops the LM head tied to the embeddings)
    are filled in from the tensor they share. Raises ValueError naming the first missing or
    unexpected key."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    names = [n for n, _ in model.named_parameters(remove_duplicate=False)] + [n for n, _ in model.named_buffers()]
    sd = dict(model_sd)
    # parameters the model ties (the same tensor under two names): fill the one not saved
    seen: Dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        first = seen.setdefault(id(p), n)
        if first != n:
            if n not in sd and first in sd:
                sd[n] = sd[first]
            elif first not in sd and n in sd:
                sd[first] = sd[n]
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in sd]
    unexpected = [k for k in sd if k not in names]
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, {k: v for k, v in sd.items() if k in params or k in names}, options=opts)
    if optimizer is None or optim_sd is None:
        return
    # index-keyed (torch.optim's own format) -> keyed by parameter name, as set_optimizer_state_dict wants
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    groups = optim_sd.get("param_groups", [])
    n_idx = sum(len(g["params"]) for g in groups)
    if n_idx != len(trainable):
        raise ValueError(f"the checkpoint's optimizer holds {n_idx} parameters, the model trains {len(trainable)}")
    index_to_name: Dict[int, str] = {}
    ordered = iter(trainable)
    for g in groups:
        for i in g["params"]:
            index_to_name[i] = next(ordered)
    full = {"state": {index_to_name[int(i)]: s for i, s in optim_sd.get("state", {}).items()},
            "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]} for g in groups]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def load_sharded(path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 ctx: DistContext, init_key: str = "model_init_kwargs",
                 restore_rng: bool = False) -> Dict[str, Any]:
    """Load a :func:`save_sharded` checkpoint into ``model`` (and ``optimizer``), however
    they are wrapped now and on however many ranks (DCP reshards). Returns ``extra``.
    ``restore_rng`` (a resume): this rank's RNG states saved with it too, when the checkpoint
    has them (one written on fewer ranks, or before they were saved, lacks this rank's).
    ValueError naming ``init_key`` when the saved weights have another floating dtype than the
    model's (DCP would cast them silently: a bf16 run resumed in float32, or the reverse)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from rlhf_fast.trainers.checkpoint import check_state_dtypes

    if not os.path.isdir(path):
        raise FileNotFoundError(f"no sharded checkpoint at {path}")
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    saved = {k[len("model."):]: m.properties.dtype for k, m in meta.items()
             if k.startswith("model.") and hasattr(m, "properties")}
    check_state_dtypes(model, saved, f"checkpoint {path}", init_key)
    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": msd}
    if optimizer is not None:
        state["optim"] = osd
    with _dcp_quiet(ctx):
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))
    rng = os.path.join(path, _RNG_FILE.format(rank=ctx.rank))
    if restore_rng and os.path.isfile(rng):
        from rlhf_fast.trainers.checkpoint import set_rng_state

        set_rng_state(torch.load(rng, weights_only=False))
    with open(os.path.join(path, "extra.json")) as f:
        return json.load(f)
