"""fp16 mixed precision: transformers' / TRL's ``fp16=True``, for every trainer's optimizer step.

A config's ``fp16: true`` runs each forward under ``torch.autocast(device, float16)``
(:func:`rlhf_fast.trainers.common.autocast_context`) and keeps the weights, gradients and optimizer
state in float32, as transformers does through accelerate:

* the loss is multiplied by a dynamic loss scale (``torch.amp.GradScaler``, its defaults: 2**16 at
  the start, halved after a step whose gradients hold an inf or nan, doubled after 2000 clean
  steps in a row) before its backward, so small fp16 gradients do not flush to zero;
* the gradients are unscaled before clipping, so ``grad_norm`` is the true norm (inf or nan on a
  step that overflowed, as transformers logs it);
* an overflowed step leaves the weights and the optimizer state alone, and the LR scheduler does
  not step either (transformers' ``if not accelerator.optimizer_step_was_skipped:
  lr_scheduler.step()``);
* the scaler's state is trainer state: checkpoints hold it (transformers' ``scaler.pt``) and a
  resumed run continues with it, so it equals the run that never stopped.

:class:`LossScaler` holds that logic for one optimizer; disabled (``fp16`` off, or a device not in
:data:`FP16_DEVICES`), each of its methods is exactly the fp32 code it replaces, so the defaults
run the same operations as before it existed.

Where fp16 applies: on CUDA only, as ``bf16`` — on the CPU ``fp16: true`` changes nothing (accelerate
makes no GradScaler and no autocast on the CPU either, and fp16 matmuls there are slow). Tests add
``"cpu"`` to :data:`FP16_DEVICES` to run the CUDA configuration's fp16 path on a CPU machine.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Dict, Iterable, Mapping, Optional

import torch

# Device types on which ``fp16`` autocasts and scales the loss (see the module docstring).
FP16_DEVICES = ("cuda",)


def fp16_on(fp16: bool, device) -> bool:
    """Whether a run with ``fp16`` on ``device`` (a torch.device or its name) trains in fp16."""
    return bool(fp16) and torch.device(device).type in FP16_DEVICES


def fp16_autocast(device):
    """``torch.autocast(device type, float16)``: the forward of an fp16 run."""
    return torch.autocast(torch.device(device).type, dtype=torch.float16)


def check_precision_fields(cfg, prefix: str = "") -> None:
    """``cfg.bf16`` / ``cfg.fp16`` checked (``prefix``: how the keys are named in messages): both
    true or false, ``bf16`` null (the offline configs' default) becoming ``not fp16`` — TRL's rule,
    so ``fp16: true`` alone switches bf16 off; not both true (transformers' "At most one of fp16
    and bf16 can be True"); and not ``fp16`` with ``distributed.strategy`` fsdp2 and
    ``distributed.mixed_precision`` (FSDP2 would hold the parameters in bf16, and fp16's point, fp32
    master weights under a float16 autocast with loss scaling, would be lost). Under FSDP2 with
    ``distributed.mixed_precision: false`` fp16 is sound: torch's GradScaler all-reduces its
    inf/nan check over a DTensor gradient's mesh, so every rank skips the same steps (what
    accelerate does for FSDP2). ValueError naming the key."""
    if not isinstance(cfg.fp16, bool):
        raise ValueError(f"{prefix}fp16 must be true or false, got {cfg.fp16!r}")
    if cfg.bf16 is None:
        cfg.bf16 = not cfg.fp16
    if not isinstance(cfg.bf16, bool):
        raise ValueError(f"{prefix}bf16 must be true or false, got {cfg.bf16!r}")
    if cfg.fp16 and cfg.bf16:
        raise ValueError(f"{prefix}fp16 and {prefix}bf16 cannot both be true: pick one mixed precision "
                         f"(set {prefix}bf16: false to train with fp16)")
    dc = getattr(cfg, "distributed", None)
    dc = dc if isinstance(dc, Mapping) or dc is None else vars(dc)  # (a dict before its config converts it)
    if cfg.fp16 and dc and dc.get("strategy") == "fsdp2" and dc.get("mixed_precision", True):
        raise ValueError(f"{prefix}fp16 with distributed.strategy fsdp2 needs distributed.mixed_precision: "
                         "false: FSDP2's mixed precision holds the parameters in bf16, while fp16 keeps float32 "
                         "weights under a float16 autocast with loss scaling")


class LossScaler:
    """fp16 loss scaling around one optimizer: :meth:`scale` the loss before each backward,
    :meth:`clip_grad_norm_` (unscale, then clip), :meth:`step` (skipped on overflow; returns
    whether it stepped, i.e. whether the LR scheduler steps too), :meth:`state_dict` for
    checkpoints. ``enabled`` False (``fp16`` off, or off on this device: :func:`fp16_on`): plain
    ``backward`` / ``clip_grad_norm_`` / ``optimizer.step()``, nothing else."""

    def __init__(self, fp16: bool, device):
        self.enabled = fp16_on(fp16, device)
        self._scaler = torch.amp.GradScaler(torch.device(device).type) if self.enabled else None
        self._scaled = False  # a loss was scaled since the last step

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current loss scale (``loss`` itself when disabled), to call
        ``backward`` on. Every backward of a step must go through here."""
        if not self.enabled:
            return loss
        self._scaled = True
        return self._scaler.scale(loss)

    def _check_scaled(self) -> None:
        # a backward that skipped scale() would be divided by the scale at the step: a silent,
        # 65536-fold smaller update. Refused instead.
        if not self._scaled:
            raise RuntimeError("fp16: this optimizer step's gradients did not come from a loss passed "
                               "through LossScaler.scale (a backward called on the bare loss); every backward "
                               "of an fp16 run must be scaled")

    @staticmethod
    def _check_float32_grads(optimizer: torch.optim.Optimizer) -> None:
        # GradScaler refuses float16 gradients ("Attempting to unscale FP16 gradients."), at the
        # first step, after its forward and backward: said here with the setting and the way out
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.dtype == torch.float16:
                    raise ValueError("fp16: true trains float32 weights under a float16 autocast with a loss scale, "
                                     "but the optimizer's parameters are float16 (a model passed in float16?): pass "
                                     "the model in float32 (fp16 keeps the float16 compute), or use bf16")

    def clip_grad_norm_(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                        max_norm: float) -> torch.Tensor:
        """Unscale ``optimizer``'s gradients (once per step), then
        ``torch.nn.utils.clip_grad_norm_(params, max_norm)``; returns the total norm before
        clipping (0-dim; a DTensor under FSDP2), the true gradient's: inf or nan when the step
        overflowed (its step is then skipped, so the clipping does not matter)."""
        if self.enabled:
            self._check_scaled()
            self._check_float32_grads(optimizer)
            self._scaler.unscale_(optimizer)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()``, unless the (unscaled) gradients hold an inf or nan; then the
        scale's update. Returns whether the optimizer stepped (the LR scheduler steps only then,
        as transformers'); always True when disabled."""
        if not self.enabled:
            optimizer.step()
            return True
        self._check_scaled()
        self._check_float32_grads(optimizer)
        before = self._scaler.get_scale()
        self._scaler.step(optimizer)  # unscales first when clip_grad_norm_ did not
        self._scaler.update()
        self._scaled = False
        # update() multiplies the scale by backoff_factor (0.5) exactly when a gradient of the
        # step was inf/nan (and the step skipped); otherwise it keeps or grows it
        return not self._scaler.get_scale() < before

    def get_scale(self) -> float:
        """The current loss scale (1.0 when disabled)."""
        return self._scaler.get_scale() if self.enabled else 1.0

    def metrics(self, key: str = "loss_scale") -> Dict[str, float]:
        """``{key: the loss scale after the last step}`` when enabled, else ``{}`` (the default
        runs log what they logged before)."""
        return {key: self.get_scale()} if self.enabled else {}

    def state_dict(self) -> Optional[Dict[str, Any]]:
        """The scaler's state (JSON-able: the scale, its growth settings and clean-step count),
        or None when disabled."""
        return self._scaler.state_dict() if self.enabled else None

    def load_state_dict(self, state: Optional[Mapping[str, Any]], where: str) -> None:
        """Restore :meth:`state_dict`'s ``state`` from the checkpoint ``where``. A checkpoint of a
        run without fp16 scaling (``state`` None) resumed with it starts the scale afresh (at
        2**16, as transformers when its checkpoint has no ``scaler.pt``), and one written with it
        resumed without drops it; both warn, as the precision of the run changed. A damaged
        state: ValueError naming ``where``."""
        if state is None:
            if self.enabled:
                warnings.warn(f"{where} was written without fp16 loss scaling; this run uses it (fp16: "
                              "true): the loss scale starts afresh", RuntimeWarning, stacklevel=2)
            return
        scale = state.get("scale") if isinstance(state, Mapping) else None
        if not self.enabled:  # (a damaged state is dropped too: this run does not read it)
            warnings.warn(f"{where} was written by an fp16 run (loss scale {scale!r}); this run "
                          "does not scale its loss (fp16 off, or not on CUDA): the loss scale is dropped",
                          RuntimeWarning, stacklevel=2)
            return
        keys = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
        if not (isinstance(state, Mapping) and all(k in state for k in keys)
                and isinstance(scale, (int, float)) and not isinstance(scale, bool)
                and math.isfinite(scale) and scale > 0):
            raise ValueError(f"{where}: the fp16 loss-scaler state {state!r} is not a GradScaler state dict "
                             "with a finite scale > 0 — the checkpoint is damaged; remove that folder to "
                             "resume from the previous checkpoint")
        self._scaler.load_state_dict(dict(state))


@contextlib.contextmanager
def fp16_devices(*types: str):
    """Context: :data:`FP16_DEVICES` extended by ``types`` (tests run the CUDA fp16 path on the CPU)."""
    global FP16_DEVICES
    old = FP16_DEVICES
    FP16_DEVICES = tuple(dict.fromkeys(old + types))
    try:
        yield
    finally:
        FP16_DEVICES = old


__all__ = ["FP16_DEVICES", "LossScaler", "check_precision_fields", "fp16_autocast", "fp16_devices", "fp16_on"]
