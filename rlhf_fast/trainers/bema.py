"""BEMA (Bias-Corrected Exponential Moving Average; Block & Zhang 2025) of a policy's weights,
and the DPO reference that follows it: the ``bema`` section of the SFT, reward, DPO and KTO
configs (TRL's callback goes on any Trainer; its reference update only on DPO's). The hooks run in
the loop those four trainers share (:mod:`rlhf_fast.trainers.sft`: ``optimizer_step``,
``save_supervised``, ``resume_supervised``, ``training_loop``).

TRL 1.16's ``BEMACallback`` (``trl.trainer.callbacks``) keeps, on ``device`` (default
``"cpu"``), three copies of the policy's trainable weights: θ₀, the EMA and the BEMA weights
θ'_t = α_t·(θ_t − θ₀) + EMA_t, with EMA_t = (1 − β_t)·EMA_{t−1} + β_t·θ_t,
α_t = (ρ + γt)^−η and β_t = max((ρ + γt)^−κ, ``min_ema_multiplier``) (ρ ``lag``, γ
``multiplier``, η ``bias_power``, κ ``ema_power``). After each optimizer step t (TRL's
``on_step_end``, its global step already counting the step): at t = ``update_after`` θ₀ and
the EMA become θ_t (with 0, the initial weights, taken when training begins); at every later t
with (t − ``update_after``) a multiple of ``update_freq`` the EMA and θ' are updated. At the end
of training the BEMA weights are saved as a model (TRL's ``on_train_end``: ``output_dir/bema``;
ours ``RUN_DIR/bema``, with the tokenizer, as ``final/``).

``update_ref_model`` (TRL's experimental ``trl.experimental.bema_for_ref_model``) makes them the
DPO reference too: after step t ≥ ``ref_model_update_after`` with (t −
``ref_model_update_after``) a multiple of ``ref_model_update_freq``, π_ref ← θ' (the BEMA weights
of the last BEMA update; the initial policy before any); refused by the other trainers (SFT and
reward have no reference; TRL's experimental trainer is DPO's, not KTO's). Refused with ``sync_ref_model`` (two
rules for one reference), ``precompute_ref_logps`` (the log-probs would go stale) and the
reference-free losses (no reference); ``bema`` is refused with ``lora`` / a peft policy
altogether (TRL's callback copies the model with ``type(model)(model.config)``, which a peft
model is not, and its reference is the adapter-disabled policy: no weights of its own) and
under FSDP2 (each rank would hold its shard of the buffers; their checkpoint is not written).

The buffers, the step and (with ``update_ref_model``) the reference are training state: the
checkpoint ``step_N`` has them in ``bema_step_N`` (written first), so a resumed run equals an
uninterrupted one (TRL takes θ₀ again from the resumed weights).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

from rlhf_fast.ops._validate import finite


@dataclasses.dataclass
class BEMAConfig:
    """TRL's ``BEMACallback`` arguments, with its defaults (see the module docstring)."""

    update_freq: int = 400  # φ: a BEMA update every update_freq steps
    ema_power: float = 0.5  # κ; 0: no EMA (β = 1)
    bias_power: float = 0.2  # η; 0: α = 1 at every step
    lag: int = 10  # ρ
    update_after: int = 0  # τ: θ₀ is the policy at this step
    multiplier: float = 1.0  # γ
    min_ema_multiplier: float = 0.0  # the floor of β
    device: str = "cpu"  # where θ₀, the EMA and the BEMA weights live
    update_ref_model: bool = False  # TRL's experimental bema_for_ref_model: the DPO reference follows BEMA
    ref_model_update_freq: int = 400
    ref_model_update_after: int = 0

    def __post_init__(self):
        for name, low in (("update_freq", 1), ("lag", 0), ("update_after", 0), ("ref_model_update_freq", 1),
                          ("ref_model_update_after", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"bema.{name} must be an int >= {low}, got {v!r}")
        for name in ("ema_power", "bias_power", "multiplier"):
            finite(f"bema.{name}", getattr(self, name), ">= 0")
        if not self.lag + self.multiplier > 0:  # ρ + γt must be > 0 at every step t >= 1
            raise ValueError(f"bema.lag + bema.multiplier must be > 0 (the base of the decay powers), "
                             f"got {self.lag} and {self.multiplier}")
        if not 0.0 <= finite("bema.min_ema_multiplier", self.min_ema_multiplier) <= 1.0:
            raise ValueError(f"bema.min_ema_multiplier must be in [0, 1], got {self.min_ema_multiplier}")
        if not isinstance(self.update_ref_model, bool):
            raise ValueError(f"bema.update_ref_model must be true or false, got {self.update_ref_model!r}")
        try:
            kind = torch.device(self.device).type
        except (RuntimeError, TypeError):
            kind = None
        if kind not in ("cpu", "cuda"):  # (a meta or other device would fail only at the first save)
            raise ValueError(f"bema.device must be 'cpu' or a CUDA device ('cuda', 'cuda:1'), got {self.device!r}")


def check_bema_field(cfg, reference_free: Optional[str] = None, no_reference_update: Optional[str] = None
                     ) -> Optional[BEMAConfig]:
    """``cfg.bema`` (None, a mapping of :class:`BEMAConfig` fields or a BEMAConfig) as a
    BEMAConfig or None, refused with ``lora`` and FSDP2 and, with ``update_ref_model``, with
    ``sync_ref_model``, ``precompute_ref_logps`` and the ``reference_free`` loss named, or
    altogether where ``no_reference_update`` (why: a trainer other than DPO's) is given.
    ValueError / TypeError naming the key."""
    from rlhf_fast.trainers.config import section_config

    b = section_config(cfg.bema, BEMAConfig, "bema", "BEMA settings")
    if b is None:
        return None
    if cfg.lora is not None:
        raise ValueError("bema cannot be used with lora: TRL's BEMACallback copies the policy as a plain model, and "
                         "the reference of a LoRA policy is the policy with its adapters disabled")
    if cfg.distributed.strategy == "fsdp2":
        raise ValueError("bema cannot be used with distributed.strategy fsdp2 (its buffers would be sharded and "
                         "their checkpoint is not written); use ddp or one process")
    if not b.update_ref_model:
        return b
    if no_reference_update is not None:
        raise ValueError(f"bema.update_ref_model must be false: {no_reference_update}")
    for field, bad in (("sync_ref_model", cfg.sync_ref_model), ("precompute_ref_logps", cfg.precompute_ref_logps)):
        if bad:
            why = ("both would move the reference" if field == "sync_ref_model" else
                   "the reference moves, so log-probs scored once before training would go stale")
            raise ValueError(f"bema.update_ref_model and {field} cannot both be true: {why}")
    if reference_free is not None:
        raise ValueError(f"bema.update_ref_model must be false with the reference-free loss_type {reference_free!r} "
                         "(it uses no reference model)")
    return b


# ------------------------------------------------------------------ the schedule (TRL's lines)


def ema_beta(b: BEMAConfig, step: int) -> float:
    """β_t = max((ρ + γ·t)^−κ, ``min_ema_multiplier``) (TRL's ``BEMACallback._ema_beta``)."""
    beta = (b.lag + b.multiplier * step) ** (-b.ema_power)
    return max(beta, b.min_ema_multiplier)


def bema_alpha(b: BEMAConfig, step: int) -> float:
    """α_t = (ρ + γ·t)^−η (TRL's ``BEMACallback._bema_alpha``)."""
    return (b.lag + b.multiplier * step) ** (-b.bias_power)


def updates_reference(b: BEMAConfig, step: int) -> bool:
    """Whether the reference takes the BEMA weights after optimizer step ``step``."""
    after = b.ref_model_update_after
    return b.update_ref_model and step >= after and (step - after) % b.ref_model_update_freq == 0


# ------------------------------------------------------------------ the state


class BEMAState(torch.nn.Module):
    """θ₀, the EMA and the BEMA weights of each trainable policy parameter, as buffers on
    ``cfg.device`` (``theta0_i``, ``ema_i``, ``running_i``; parameter i in ``named_parameters``
    order, dtype the parameter's): a module so that a checkpoint saves and checks them as it
    does a model's weights. ``reference``: the model whose parameters take the BEMA weights
    (matched by name; None without ``update_ref_model``)."""

    def __init__(self, cfg: BEMAConfig, policy: torch.nn.Module, reference: Optional[torch.nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        named = list(policy.named_parameters())
        self.names = [n for n, p in named if p.requires_grad]
        # plain lists: the live parameters, not this module's own state
        self._params = [p for _, p in named if p.requires_grad]
        device = torch.device(cfg.device)
        with torch.no_grad():
            for i, p in enumerate(self._params):
                theta0 = p.detach().to(device, copy=True)  # (no second copy on the training device)
                self.register_buffer(f"theta0_{i}", theta0)
                self.register_buffer(f"ema_{i}", theta0.clone())
                self.register_buffer(f"running_{i}", theta0.clone())  # TRL's running_model: a copy of the policy
        self._ref_pairs: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.span_checked = False  # maybe_bema_update's warning, once per process
        if reference is not None:
            self._ref_pairs = reference_pairs(named, reference, self.names, self.running)

    @property
    def theta0(self) -> List[torch.Tensor]:
        return [getattr(self, f"theta0_{i}") for i in range(len(self._params))]

    @property
    def ema(self) -> List[torch.Tensor]:
        return [getattr(self, f"ema_{i}") for i in range(len(self._params))]

    @property
    def running(self) -> List[torch.Tensor]:
        """The BEMA weights, one per trainable policy parameter."""
        return [getattr(self, f"running_{i}") for i in range(len(self._params))]

    @torch.no_grad()
    def step_end(self, step: int) -> bool:
        """After optimizer step ``step``: TRL's ``BEMACallback.on_step_end`` (θ₀ and EMA taken
        at ``update_after``, a BEMA update every ``update_freq`` steps after), then its
        experimental subclass's reference update. Returns whether the reference was updated."""
        b = self.cfg
        if step == b.update_after:
            for p, t0, ema in zip(self._params, self.theta0, self.ema, strict=True):
                t0.copy_(p)
                ema.copy_(p)
        elif step > b.update_after and (step - b.update_after) % b.update_freq == 0:
            self._update(step)
        if not (self._ref_pairs and updates_reference(b, step)):
            return False
        for ref, src in self._ref_pairs:
            ref.copy_(src)
        return True

    def _update(self, step: int) -> None:
        """TRL's ``BEMACallback._update_bema_weights``, operation for operation (the same rounding)."""
        beta, alpha = ema_beta(self.cfg, step), bema_alpha(self.cfg, step)
        for p, theta0, ema, run in zip(self._params, self.theta0, self.ema, self.running, strict=True):
            thetat = p.detach().to(theta0.device)
            ema.mul_(1 - beta).add_(thetat, alpha=beta)
            run.copy_(ema + alpha * (thetat - theta0))

    def model_state_dict(self, policy: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """``policy``'s state dict with each trainable parameter's BEMA weights in its place
        (tied names share one tensor, so ``save_pretrained`` writes it once), on the CPU."""
        by_id = {id(p): r for p, r in zip(self._params, self.running)}
        return {k: by_id.get(id(v), v).detach().cpu() for k, v in policy.state_dict(keep_vars=True).items()}


def reference_pairs(named_policy, reference: torch.nn.Module, trainable: List[str], running: List[torch.Tensor]
                    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``[(reference parameter, its source)]``: the BEMA weights of each trainable policy
    parameter, the policy parameter itself for a frozen one (TRL's running model keeps its
    initial value, which a frozen parameter still has). ValueError when the reference's
    parameter names and shapes are not the policy's."""
    from rlhf_fast.distributed import unwrap

    pol = dict(named_policy)
    ref = dict(unwrap(reference).named_parameters())
    if pol.keys() != ref.keys() or any(pol[n].shape != ref[n].shape for n in pol):
        diff = sorted(set(pol) ^ set(ref)) or [n for n in pol if pol[n].shape != ref[n].shape]
        raise ValueError("bema.update_ref_model needs a reference with the policy's parameters (names and shapes), "
                         f"they differ at {diff[:3]}; use a ref_model of the policy's architecture")
    src = dict(zip(trainable, running))
    return [(ref[n], src.get(n, pol[n])) for n in pol]


# ------------------------------------------------------------------ the trainer's hooks


def setup_bema(trainer) -> None:
    """``trainer._bema``: the :class:`BEMAState` of its policy (and reference, with
    ``update_ref_model``), or None without ``cfg.bema``. A peft policy (passed as ``model``)
    is refused (``trainer.is_peft``, or the model's own type for a trainer without one: SFT)."""
    from rlhf_fast.distributed import unwrap
    from rlhf_fast.models.loading import _is_peft

    trainer._bema = None
    b = getattr(trainer.cfg, "bema", None)
    if b is None:
        return
    if getattr(trainer, "is_peft", None) or _is_peft(unwrap(trainer.model)):
        raise ValueError("bema cannot be used with a peft policy: TRL's BEMACallback copies the policy as a plain "
                         "model, and its reference is the policy with its adapters disabled")
    if torch.device(b.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"bema.device is {b.device!r} but CUDA is not available")
    ref = trainer.reference if b.update_ref_model else None
    trainer._bema = BEMAState(b, unwrap(trainer.model), ref)


def maybe_bema_update(trainer) -> bool:
    """After an optimizer step: :meth:`BEMAState.step_end` at ``trainer.step`` (TRL's
    ``on_step_end``); returns whether the reference was updated. At the first call a run too
    short for any BEMA update is warned about (:func:`warn_if_no_update`)."""
    bema = getattr(trainer, "_bema", None)
    if bema is None:
        return False
    if not bema.span_checked:  # (max_steps is final by now: num_train_epochs has set it)
        bema.span_checked = True
        warn_if_no_update(bema.cfg, trainer.cfg.max_steps)
    return bema.step_end(trainer.step)


def warn_if_no_update(b: BEMAConfig, max_steps: int) -> bool:
    """Warn (UserWarning) when no BEMA update falls within ``max_steps``: the first is at step
    ``update_after + update_freq``, so RUN_DIR/bema would silently hold the initial weights (TRL's
    defaults, update_freq 400, with our max_steps default of 200). Returns whether it warned."""
    first = b.update_after + b.update_freq
    if first <= max_steps:
        return False
    ref = ""
    if b.update_ref_model:  # (its first update: at ref_model_update_after, or one period in when that is 0)
        ref_first = b.ref_model_update_after or b.ref_model_update_freq
        ref = (" and the reference, at each of its updates, takes those initial policy weights"
               if ref_first <= max_steps else " and the reference never moves")
    warnings.warn(f"bema: no BEMA update happens in this run: the first is at step {first} (bema.update_after "
                  f"{b.update_after} + bema.update_freq {b.update_freq}), after max_steps {max_steps}, so "
                  f"RUN_DIR/bema will hold the initial weights{ref}; lower bema.update_freq", UserWarning,
                  stacklevel=3)
    return True


def bema_checkpoint_dir(directory: str) -> str:
    """``.../checkpoints/step_N`` → ``.../checkpoints/bema_step_N``: the BEMA state of that checkpoint."""
    directory = os.path.normpath(directory)
    return os.path.join(os.path.dirname(directory), "bema_" + os.path.basename(directory))


def save_bema(trainer) -> None:
    """Write the BEMA buffers (and, with ``update_ref_model``, the reference) for the checkpoint
    of ``trainer.step``, atomically, before the checkpoint itself: by the main process (under
    DDP every rank holds the same ones); the others wait."""
    from .checkpoint import checkpoint_dir, save_checkpoint

    bema = trainer._bema
    if trainer.ctx.is_main:
        models: Dict[str, Any] = {"bema": bema}
        if bema.cfg.update_ref_model:
            models["reference"] = trainer.reference
        save_checkpoint(bema_checkpoint_dir(checkpoint_dir(trainer.run.path, trainer.step)), models=models,
                        extra={"step": trainer.step, "names": bema.names})
    trainer.ctx.barrier()


def load_bema(trainer, directory: str, step: int) -> None:
    """Restore the BEMA buffers (and reference) of the checkpoint ``directory`` of ``step``; a
    checkpoint without them (written with ``bema`` off) is refused: θ₀ and the EMA are lost."""
    from .checkpoint import load_checkpoint

    folder = bema_checkpoint_dir(directory)
    if not os.path.isfile(os.path.join(folder, "COMPLETE")):
        raise ValueError(f"checkpoint {directory} has no BEMA state ({folder}): was it written with bema off? "
                         "Resume with that setting, or start a new run")
    bema = trainer._bema
    models: Dict[str, Any] = {"bema": bema}
    if bema.cfg.update_ref_model:
        if not os.path.isdir(os.path.join(folder, "models", "reference")):
            raise ValueError(f"checkpoint {folder} has no reference: it was written with bema.update_ref_model "
                             "false; resume with that setting, or start a new run")
        models["reference"] = trainer.reference
    extra = load_checkpoint(folder, models=models, restore_rng=False, map_location="cpu")
    if extra.get("step") != step or extra.get("names") != bema.names:
        raise ValueError(f"checkpoint {folder} holds the BEMA state of step {extra.get('step')!r} for other "
                         f"parameters or another step than the checkpoint's {step}; remove that checkpoint")


def prune_bema(run_dir: str) -> None:
    """Remove the BEMA folders whose checkpoint is gone (pruned, or never completed)."""
    from .checkpoint import prune_companions

    prune_companions(run_dir, "bema_")


def save_bema_model(trainer) -> None:
    """TRL's ``on_train_end``: the BEMA weights as a model (``save_pretrained`` of the policy's
    class, and the tokenizer) in ``RUN_DIR/bema``, by the main process."""
    from rlhf_fast.distributed import unwrap
    from rlhf_fast.trainers.checkpoint import staged_folder

    if trainer.ctx.is_main:
        policy = unwrap(trainer.model)
        # written beside it and renamed into place, as final/: a failed save leaves no torn model
        with staged_folder(os.path.join(trainer.run.path, "bema")) as folder:
            policy.save_pretrained(folder, state_dict=trainer._bema.model_state_dict(policy))
            trainer.tokenizer.save_pretrained(folder)
    trainer.ctx.barrier()


__all__ = ["BEMAConfig", "BEMAState", "check_bema_field", "ema_beta", "bema_alpha", "setup_bema", "maybe_bema_update",
           "save_bema", "load_bema", "prune_bema", "save_bema_model", "bema_checkpoint_dir", "warn_if_no_update"]
