"""The Mixture-of-Experts router load-balancing loss (TRL's ``router_aux_loss_coef``).

TRL adds ``coef × aux_loss`` to the policy's loss of every MoE model by default (``coef`` None
means the model config's own ``router_aux_loss_coef``, Mixtral's 0.001); our trainers run an MoE
backbone through transformers' own forward (:func:`rlhf_fast.models.logprobs.hidden_states`), so
they do the same here:

- :class:`RouterAux` is a trainer's setting, resolved once from the model and the config key
  (TRL's rule: on when the text config has ``output_router_logits`` and the coefficient is not 0;
  a non-zero coefficient for a model without router logits is refused);
- ``with aux.collect() as col:`` around the policy's forward of one micro-batch opens a
  collection; :func:`rlhf_fast.models.logprobs.hidden_states` then asks that model's backbone for
  its router logits (``output_router_logits=True``) and records them, for the forwards that run
  with gradients (never the reference's, the no-grad KL rows, the rollout's old log-probs);
- ``col.loss()`` is transformers' own ``load_balancing_loss_func`` of the model's modeling module
  over every recorded token: the ``aux_loss`` the model's CausalLM forward returns for the same
  batch and attention mask;
- an evaluation (TRL's ``prediction_step`` calls the same ``compute_loss``, so its ``eval_loss``
  holds coef × aux of each eval batch, and it logs ``eval_aux_loss``) opens
  ``aux.collect(evaluation=True)`` around the policy's forward of each eval batch, which records
  forwards without gradients too; a reference's forward inside it runs under :func:`suspended`
  (a LoRA policy's reference is its own base model); :meth:`RouterAux.eval_sums` and
  :meth:`RouterAux.add_eval_metrics` make the two metrics.

Off (a dense model, or ``coef`` 0), ``collect()`` yields None and no forward changes: a dense
model's path is the one it was, bit for bit.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import threading
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from rlhf_fast.ops._validate import finite

KEY = "router_aux_loss_coef"
_STATE = threading.local()  # the collection open on this thread (trainers run their forwards on one)


def check_coef(value, key: str = KEY) -> Optional[float]:
    """A config's ``router_aux_loss_coef``: None (the model config's own) or a finite number >= 0;
    else ValueError naming ``key``."""
    return None if value is None else finite(key, value, ">= 0")


def _unwrap(model: nn.Module) -> nn.Module:
    from .logprobs import unwrap  # logprobs imports this module

    return unwrap(model)


def text_config(model: nn.Module):
    """The text (language-model) config of ``model`` (a multimodal config's text part)."""
    cfg = _unwrap(model).config
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def is_moe(model: nn.Module) -> bool:
    """Whether ``model`` returns router logits on request: its text config declares
    ``output_router_logits`` (TRL's test of a Mixture-of-Experts model) and does not make it a
    dense member of its family — Doge's ``is_moe: false`` (every released Doge) or Granite 4.0's
    ``num_local_experts: 0`` (GraniteMoeHybrid without experts), whose forwards return no router
    logits and no ``aux_loss`` (TRL fails there at the first forward)."""
    tc = text_config(model)
    if not hasattr(tc, "output_router_logits") or getattr(tc, "is_moe", True) is False:
        return False
    return all(getattr(tc, name, None) != 0 for name in ("num_local_experts", "num_experts"))


def resolve_coef(model: nn.Module, coef: Optional[float], key: str = KEY) -> float:
    """The coefficient TRL applies: ``coef``, or with None the text config's own
    ``router_aux_loss_coef`` (0.0 when it declares none). A non-zero ``coef`` for a model that is
    not a Mixture of Experts (:func:`is_moe`) is a ValueError naming ``key``."""
    check_coef(coef, key)
    tc = text_config(model)
    if coef and not is_moe(model):
        raise ValueError(f"{key} is {coef!r} but {type(_unwrap(model)).__name__} is not a Mixture-of-Experts "
                         f"model that returns router logits (its config has no output_router_logits, or no "
                         f"experts), so there is no load-balancing loss to weight: leave {key} null or set it to 0")
    if coef is not None:
        return float(coef)
    own = getattr(tc, "router_aux_loss_coef", 0.0)
    return 0.0 if own is None else float(own)


def load_balancing_fn(model: nn.Module, key: str = KEY) -> Callable:
    """transformers' ``load_balancing_loss_func`` of the modeling module of ``model``'s class (or of
    a base class: FSDP2 and similar wrappers subclass it in place); TypeError if none has one."""
    m = _unwrap(model)
    for cls in type(m).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if callable(fn):
            return fn
    raise TypeError(f"{key}: {type(m).__name__}'s modeling module has no load_balancing_loss_func, so its "
                    f"router load-balancing loss is unknown here; set {key}: 0 to train it without one")


def expert_counts(model: nn.Module, key: str = KEY) -> Tuple[int, int]:
    """``(num_experts, num_experts_per_tok)`` as the model's CausalLM forward passes them to
    ``load_balancing_loss_func``: its own ``num_experts`` / ``num_experts_per_tok`` attributes,
    else the text config's (``num_experts`` or Mixtral's ``num_local_experts``)."""
    m, tc = _unwrap(model), text_config(model)
    n = (getattr(m, "num_experts", None) or getattr(tc, "num_experts", None)
         or getattr(tc, "num_local_experts", None))
    k = getattr(m, "num_experts_per_tok", None) or getattr(tc, "num_experts_per_tok", None)
    if not isinstance(n, int) or not isinstance(k, int) or n < 1 or k < 1:
        raise TypeError(f"{key}: cannot read the number of experts and of experts per token of "
                        f"{type(m).__name__} (num_experts={n!r}, num_experts_per_tok={k!r})")
    return n, k


class RouterLogits:
    """The router logits of the forwards of one collection (one micro-batch of the policy)."""

    def __init__(self, model: nn.Module, fn: Callable, num_experts: int, top_k: int, evaluation: bool = False):
        self.model, self.fn, self.num_experts, self.top_k = model, fn, num_experts, top_k
        self.evaluation = evaluation  # record forwards without gradients too (an evaluation's)
        self.parts: List[Tuple[Tuple[torch.Tensor, ...], Optional[torch.Tensor]]] = []

    def record(self, outputs, attention_mask: Optional[torch.Tensor]) -> None:
        """Keep ``outputs.router_logits`` (per layer ``[B·T, E]``) of a forward called with
        ``output_router_logits=True`` and its ``attention_mask`` ``[B, T]`` (None: every token)."""
        logits = getattr(outputs, "router_logits", None)
        if not isinstance(logits, (tuple, list)) or not logits:
            raise TypeError(f"{KEY}: {type(self.model).__name__}'s forward returned no router logits for "
                            f"output_router_logits=True")
        self.parts.append((tuple(logits), attention_mask))

    def loss(self) -> Optional[torch.Tensor]:
        """The load-balancing loss (0-dim float32, differentiable in the router logits) over every
        recorded token, or None when no forward was recorded. One forward: exactly the model's
        ``aux_loss``; several: the loss of their tokens together, as one forward of them all."""
        if not self.parts:
            return None
        if len(self.parts) == 1:
            logits, mask = self.parts[0]
        else:  # the tokens are dim -2 of a layer's logits ([N, E]; Doge's [2, N, K])
            logits = tuple(torch.cat(layer, dim=-2) for layer in zip(*(p[0] for p in self.parts)))
            masks = [m.reshape(-1) if m is not None else torch.ones(p[0].shape[-2], device=p[0].device)
                     for p, m in self.parts]
            # [1, N]: one row of every token (Doge's loss reads the mask as [B, T])
            mask = None if all(m is None for _, m in self.parts) else torch.cat([m.float() for m in masks])[None]
        return call_loss_fn(self.fn, logits, self.num_experts, self.top_k, mask)


def call_loss_fn(fn: Callable, logits: Tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                 mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``fn`` (a ``load_balancing_loss_func``) called as the model's CausalLM forward calls it:
    ``(gate_logits, num_experts, top_k, attention_mask)`` by keyword, and for Doge's product-key
    routers (a ``num_keys`` parameter before ``top_k``) with ``floor(sqrt(num_experts))`` keys,
    as ``DogeForCausalLM`` passes them. A 0-dim tensor (float32; Doge's: the logits' dtype)."""
    params = _parameters(fn)
    if not {"num_experts", "top_k", "attention_mask"} <= params:
        return fn(logits, num_experts, top_k, mask)  # an unknown signature: the common order
    keys = {"num_keys": math.isqrt(num_experts)} if "num_keys" in params else {}
    return fn(logits, num_experts=num_experts, top_k=top_k, attention_mask=mask, **keys)


def _parameters(fn: Callable) -> frozenset:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin or a callable without a signature
        return frozenset()


def forward_kwargs(col: Optional[RouterLogits]) -> dict:
    """The keywords a forward whose router logits ``col`` collects adds (none without one)."""
    return {} if col is None else {"output_router_logits": True}


def active(model: nn.Module) -> Optional[RouterLogits]:
    """The collection open for ``model``'s forwards, or None: none open (or :func:`suspended`),
    another model's (the reference), or gradients off outside an evaluation's collection (a
    no-grad forward is no term of the training loss)."""
    col = getattr(_STATE, "col", None)
    if col is None or not (col.evaluation or torch.is_grad_enabled()):
        return None
    return col if _unwrap(model) is col.model else None


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """No collection for the forwards of the block (a reference's, inside an evaluation's
    collection that records no-grad forwards: a LoRA policy's reference is the same model with
    its adapters off); then the open one, if any, again."""
    prev = getattr(_STATE, "col", None)
    _STATE.col = None
    try:
        yield
    finally:
        _STATE.col = prev


class RouterAux:
    """A trainer's MoE load-balancing term: ``coef`` (:func:`resolve_coef`) and ``enabled`` (an MoE
    model, coef ≠ 0). ``key``: the config key named in errors."""

    def __init__(self, model: nn.Module, coef: Optional[float] = None, key: str = KEY):
        self.coef = resolve_coef(model, coef, key)
        self.enabled = is_moe(model) and self.coef != 0.0
        self.model = _unwrap(model)
        if self.enabled:
            self._fn = load_balancing_fn(model, key)
            self._counts = expert_counts(model, key)

    @contextlib.contextmanager
    def collect(self, evaluation: bool = False) -> Iterator[Optional[RouterLogits]]:
        """Collect the router logits of the policy's forwards (with gradients; ``evaluation``: without
        too) in the block; yields the :class:`RouterLogits` (None when off: nothing is collected or
        changed)."""
        if not self.enabled:
            yield None
            return
        col = RouterLogits(self.model, self._fn, *self._counts, evaluation=evaluation)
        prev = getattr(_STATE, "col", None)
        _STATE.col = col
        try:
            yield col
        finally:
            _STATE.col = prev

    def term(self, col: Optional[RouterLogits], steps: int = 1
             ) -> Tuple[Optional[torch.Tensor], Optional[float]]:
        """``(coef × aux / steps, aux as a float)`` of a finished collection (``steps``: the
        micro-batches of the optimizer step, TRL's division for gradient accumulation), or
        ``(None, None)`` when off or nothing was recorded."""
        aux = None if col is None else col.loss()
        if aux is None:
            return None, None
        return self.coef * aux / steps, float(aux.detach())

    def term_steps(self, ctx, real: int, steps: int) -> float:
        """The divisor of a micro-batch's term (coef × aux / it, :meth:`term`): ``steps``, the
        step's micro-batches (TRL's accumulation steps), on one process or with the term off; on
        several ranks the micro-batches holding rows on every rank (``real``: this rank's) over
        the world size, so that DDP's average of the ranks' gradients makes the term coef × the
        mean aux over every rank's real micro-batches, as one process has it, also when a rank
        holds fewer rows or none (``steps`` there would weigh a rank without rows as one with
        aux 0). Equal to ``steps`` when every rank holds as many. Collective while the term is on
        and ``ctx`` distributed: every rank calls it."""
        if not (self.enabled and ctx.distributed):
            return steps
        total = ctx.all_reduce_sum(torch.tensor(float(real), dtype=torch.float64, device=ctx.device))
        return max(float(total), 1.0) / ctx.world_size

    def with_term(self, loss: torch.Tensor, col: Optional[RouterLogits], steps: int, vals: List[float],
                  counts: bool = True) -> torch.Tensor:
        """An offline trainer's micro-batch ``loss`` plus its MoE term (:meth:`term`: coef × aux /
        ``steps``), the aux loss appended to ``vals``; ``loss`` itself when off, when nothing was
        recorded, or for a share that does not count (``counts`` False)."""
        term, a = self.term(col if counts else None, steps)
        if a is not None:
            vals.append(a)
        return loss if term is None else loss + term

    def add_metrics(self, m: Dict[str, float], vals: List[float], ctx=None) -> None:
        """TRL's ``aux_loss`` metric (the mean of the micro-batches' ``vals``) and its weighted term
        in ``m["loss"]``; nothing without values. ``ctx`` (a
        :class:`~rlhf_fast.distributed.DistContext`) on several ranks: the mean over every rank's
        values, as TRL's ``gather_for_metrics(aux_loss).mean()`` (a collective while the term is
        on: every rank calls it, also one without values)."""
        total, n = float(sum(vals)), len(vals)
        if ctx is not None and ctx.distributed and self.enabled:
            t = ctx.all_reduce_sum(torch.tensor([total, float(n)], dtype=torch.float64, device=ctx.device))
            total, n = float(t[0]), int(t[1])
        if n:
            m["aux_loss"] = total / n
            m["loss"] += self.coef * m["aux_loss"]

    def eval_sums(self, col: Optional[RouterLogits], counts: bool = True, device=None) -> Optional[torch.Tensor]:
        """``[aux, 1]`` float64 of one eval batch's collection (``[0, 0]`` for a share that does not
        count, ``counts`` False, or nothing recorded), on ``device``, to be summed over the batches
        and all-reduced over ranks; None when off."""
        if not self.enabled:
            return None
        aux = None if col is None or not counts else col.loss()
        if aux is None:
            return torch.zeros(2, dtype=torch.float64, device=device)
        return torch.stack([aux.detach().double(), aux.new_ones((), dtype=torch.float64)]).to(device)

    def add_eval_metrics(self, m: Dict[str, float], sums: Optional[torch.Tensor], prefix: str = "eval_") -> None:
        """TRL's ``eval_aux_loss`` (its log's mean over the eval batches, every rank's) from the
        summed :meth:`eval_sums`, and coef × it in ``m[prefix + "loss"]``: transformers'
        ``evaluation_loop`` makes ``eval_loss`` the mean over the batches of each batch's loss,
        ``compute_loss``'s own with its coef × aux. Nothing when off or no batch counted."""
        if sums is None or float(sums[1]) == 0:
            return
        m[prefix + "aux_loss"] = float(sums[0]) / float(sums[1])
        m[prefix + "loss"] += self.coef * m[prefix + "aux_loss"]


__all__ = ["KEY", "RouterAux", "RouterLogits", "active", "call_loss_fn", "check_coef", "expert_counts", "forward_kwargs",
           "is_moe", "load_balancing_fn", "resolve_coef", "suspended", "text_config"]
