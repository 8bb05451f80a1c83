"""transformers' ``torch_compile``, ``torch_compile_backend`` and ``torch_compile_mode`` for the
offline trainers (SFT, reward, DPO, KTO; CPO / ORPO / TPO run as DPO).

transformers' Trainer hands the whole model to ``torch.compile`` (through accelerate's
``TorchDynamoPlugin``: ``backend``, ``mode``, ``dynamic=None``). Our trainers never call the
model's full forward for a loss: the backbone gives the final hidden states and the fused LM-head
ops (:mod:`rlhf_fast.ops`) take them from there. So what is compiled is the backbone's forward
(the decoder body: embeddings, layers, final norm), in place, as an instance-level ``forward``
of the backbone module:

- no wrapper module, so ``state_dict`` keys stay as they are (no ``_orig_mod.`` prefix):
  checkpoints and ``final/`` load in a run without compile, and a run resumes across compile
  on / off;
- the fused head ops stay outside the compiled region, run as they run without compile;
- an instance-level forward is what :func:`rlhf_fast.models.llama_forward.supported` treats as
  "not transformers' own forward", so the backbone runs through the compiled transformers
  forward and not through our eager Llama-family forward (whose activation-memory savings are
  then traded for compile's fusions);
- peft adapters, transformers' (non-reentrant) activation checkpointing, packed rows (position
  ids restarting per document) and changing batch shapes (``dynamic=None``: the first shape
  static, a recompilation with dynamic sizes once a size changes, as transformers) all run in
  the compiled forward; DDP wraps the model before, and its gradient hooks sit on the
  parameters, outside the compiled region.

Refused with a ValueError naming the key: FSDP2 (its per-layer hooks inside the compiled
forward are not supported here), ``activation_offloading`` (saved-tensor hooks around a
compiled graph) and ``prefix_sharing`` (only our eager forward computes the shared-prefix row).
"""

from __future__ import annotations

import dataclasses
import types
from typing import List, Optional

import torch
from torch import nn

from .common import _beside, check_bool_fields


def compile_backends() -> List[str]:
    """Every backend name ``torch.compile`` takes here (``torch._dynamo.list_backends``, the
    debug ones such as ``aot_eager`` and ``eager`` included)."""
    import torch._dynamo

    return list(torch._dynamo.list_backends(exclude_tags=()))


def compile_modes() -> List[str]:
    """The ``mode`` values of ``torch.compile`` (``torch._inductor.list_mode_options``):
    transformers' documented ``default``, ``reduce-overhead``, ``max-autotune``, and torch's
    ``max-autotune-no-cudagraphs`` and ``lite``."""
    import torch._inductor

    return list(torch._inductor.list_mode_options())


@dataclasses.dataclass
class CompileOptions:
    """transformers' ``TrainingArguments`` compile keys, shared by the offline trainer configs
    (SFT, reward, DPO, KTO) and listed after ``activation_offloading``: ``torch_compile`` (compile
    the backbone's forward: :func:`compile_backbone`), ``torch_compile_backend`` (a
    ``torch._dynamo`` backend; null: ``inductor``) and ``torch_compile_mode`` (a ``torch.compile``
    mode, inductor only; null: its default). Setting either of the last two turns
    ``torch_compile`` on (transformers' rule). :func:`~rlhf_fast.trainers.common.check_training_schedule`
    calls :meth:`check_compile_options`."""

    torch_compile: bool = dataclasses.field(default=False, metadata=_beside("activation_offloading"))
    torch_compile_backend: Optional[str] = dataclasses.field(default=None, metadata=_beside("activation_offloading"))
    torch_compile_mode: Optional[str] = dataclasses.field(default=None, metadata=_beside("activation_offloading"))

    def check_compile_options(self) -> None:
        """Check the three keys, then transformers' ``TrainingArguments.__post_init__``: a backend
        or mode turns ``torch_compile`` on, and on without a backend means ``inductor``.
        ValueError naming the key for a value torch does not know, a mode with a backend that
        ignores it, and the settings compile cannot run with (:func:`check_compile_combination`)."""
        check_bool_fields(self, ("torch_compile",))
        backend, mode = self.torch_compile_backend, self.torch_compile_mode
        if backend is not None and (not isinstance(backend, str) or backend not in compile_backends()):
            raise ValueError(f"torch_compile_backend must be null (inductor) or a torch._dynamo backend name, such as "
                             f"'inductor', 'aot_eager' or 'eager' (every name: torch._dynamo.list_backends("
                             f"exclude_tags=())), got {backend!r}")
        if mode is not None and (not isinstance(mode, str) or mode not in compile_modes()):
            raise ValueError(f"torch_compile_mode must be null (the default) or one of {compile_modes()}, "
                             f"got {mode!r}")
        if backend is not None or mode is not None:
            self.torch_compile = True
        if self.torch_compile and backend is None:
            self.torch_compile_backend = "inductor"
        if mode not in (None, "default") and self.torch_compile_backend != "inductor":
            # (torch only warns that an aot_autograd backend ignores it)
            raise ValueError(f"torch_compile_mode {mode!r} has no effect with torch_compile_backend "
                             f"{self.torch_compile_backend!r}: a mode is an inductor option; leave it null")
        if self.torch_compile:
            check_compile_combination(self)


def check_compile_combination(cfg) -> None:
    """ValueError naming the key of a setting ``torch_compile: true`` cannot run with:
    ``distributed.strategy: fsdp2``, ``activation_offloading: true``, ``prefix_sharing: true``."""
    dc = getattr(cfg, "distributed", None)
    strategy = dc.get("strategy") if isinstance(dc, dict) else getattr(dc, "strategy", None)  # (a dict from Python)
    if strategy == "fsdp2":
        raise ValueError("torch_compile: true is not supported with distributed.strategy 'fsdp2' (FSDP2's per-layer "
                         "hooks would run inside the compiled backbone forward); use distributed.strategy 'ddp' or "
                         "torch_compile: false")
    if getattr(cfg, "activation_offloading", False):
        raise ValueError("torch_compile: true cannot run with activation_offloading: true (its saved-tensor hooks "
                         "around the compiled backbone); set one of them to false")
    if getattr(cfg, "prefix_sharing", False):
        raise ValueError("torch_compile: true cannot run with prefix_sharing: true (only rlhf_fast's eager "
                         "Llama-family forward computes the shared-prefix row, and compile runs transformers' "
                         "forward); set one of them to false")


def compiled(base: nn.Module) -> bool:
    """Whether :func:`compile_backbone` has compiled the backbone module ``base``."""
    return getattr(base.__dict__.get("forward"), "rlhf_compiled", False)


def compile_backbone(model: nn.Module, backend: str = "inductor", mode: Optional[str] = None) -> nn.Module:
    """Compile the forward of ``model``'s backbone (a transformers causal LM or sequence
    classifier, or a peft / DDP wrapper of one: :func:`rlhf_fast.models.logprobs.backbone`) in
    place with ``torch.compile(backend=backend, mode=mode, dynamic=None)``; returns the backbone.
    Idempotent (a backbone shared by a LoRA policy and its adapter-disabled reference is
    compiled once). The parameters and ``state_dict`` are untouched."""
    from rlhf_fast.models.logprobs import backbone

    return compile_module(backbone(model), backend, mode)


# graphs per compiled backbone class that dynamo may keep: every model of one class (policy,
# reference, critic, teacher; LoRA on or off; grad or no_grad) shares its forward's code and so
# its cache, and each context takes a static then a dynamic graph: PPO with a LoRA policy needs 10
RECOMPILE_LIMIT = 64


def _room_for_recompiles() -> None:
    """Raise dynamo's per-function recompile limit (torch's default 8) to :data:`RECOMPILE_LIMIT`:
    past it dynamo silently runs the forward eagerly, and a run with a LoRA policy and a critic
    hit it at its second step. Never lowers a limit the user set higher."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # (torch >= 2.7; its older name)
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < RECOMPILE_LIMIT:
            setattr(dynamo_config, name, RECOMPILE_LIMIT)
            break


def compile_module(base: nn.Module, backend: str = "inductor", mode: Optional[str] = None) -> nn.Module:
    """:func:`compile_backbone` for a module given as it is: its own class's forward compiled in
    place as an instance-level ``forward`` (a bare backbone, such as the RL critic's
    ``ValueModel.backbone``, or a custom critic module); returns ``base``. Idempotent; the
    parameters and ``state_dict`` are untouched; ValueError if ``base`` already has an
    instance-level forward of its own."""
    if compiled(base):
        return base
    if "forward" in base.__dict__:
        raise ValueError(f"torch_compile: the backbone {type(base).__name__} already has an instance-level forward, "
                         "which compiling would replace")
    _room_for_recompiles()
    fn = torch.compile(type(base).forward, backend=backend, mode=mode, dynamic=None)
    fn.rlhf_compiled = True
    # bound to the instance by a method object, which copy.deepcopy rebinds to the copy
    base.forward = types.MethodType(fn, base)
    return base


def compile_configured(trainer) -> None:
    """With ``trainer.cfg.torch_compile``, compile the backbone of ``trainer.model`` (wrapped by
    now, as accelerate compiles after wrapping) and of a separate ``trainer.reference`` (DPO,
    KTO: TRL's reference model goes through the same ``prepare_model``). Call it after every
    copy of the model is made (reference, BEMA)."""
    cfg = trainer.cfg
    if not getattr(cfg, "torch_compile", False):
        return
    for m in (trainer.model, getattr(trainer, "reference", None)):
        if isinstance(m, nn.Module):
            compile_backbone(m, cfg.torch_compile_backend, cfg.torch_compile_mode)


def check_rl_compile_options(cfg) -> None:
    """The three keys of :class:`~rlhf_fast.trainers.rl_config.RLConfig`, top-level there as TRL's
    ``GRPOConfig`` inherits them from ``TrainingArguments``: :meth:`CompileOptions.check_compile_options`
    on ``cfg`` (the same rules, and the FSDP2 refusal), then ``ppo.prefix_sharing`` refused (only
    the eager Llama-family forward computes the shared-prefix row). ValueError naming the key."""
    # (a plain function of the class: RLConfig lists the keys itself, beside bf16 / fp16)
    CompileOptions.check_compile_options(cfg)
    if cfg.torch_compile and cfg.ppo.prefix_sharing:
        raise ValueError("torch_compile: true cannot run with ppo.prefix_sharing: true (only rlhf_fast's eager "
                         "Llama-family forward computes the shared-prefix row, and compile runs transformers' "
                         "forward); set one of them to false")


def compile_rl_models(trainer) -> None:
    """With ``trainer.config.torch_compile`` (an RL trainer), compile in place, after DDP wrapped
    them: the policy's backbone, the reference's (a separate copy; a LoRA policy's
    adapter-disabled reference shares the policy's, compiled once), the critic's
    (``ValueModel.backbone``, a bare backbone; a custom critic module without one: its own
    forward), a distillation teacher's (``trainer.teacher``) and a self-distillation teacher's
    own copy (``trainer.self_teacher.model``: SDFT, SDPO). Idempotent, so the trainer calls it
    at the end of ``__init__`` and again before each step, which catches the models a subclass
    builds after ``RLTrainer.__init__``. Generation stays eager
    (:class:`~rlhf_fast.rollout.hf_engine.HFRolloutEngine` runs a compiled backbone under
    ``torch.compiler.set_stance("force_eager")``)."""
    from rlhf_fast.models.logprobs import unwrap

    cfg = trainer.config
    if not cfg.torch_compile:
        return
    kw = dict(backend=cfg.torch_compile_backend, mode=cfg.torch_compile_mode)
    self_teacher = getattr(trainer, "self_teacher", None)
    for m in (trainer.policy, trainer.reference, getattr(trainer, "teacher", None),
              getattr(self_teacher, "model", None)):
        if m is not None:
            compile_backbone(m, **kw)
    critic = unwrap(trainer.critic) if isinstance(trainer.critic, nn.Module) else None
    if critic is not None:
        inner = getattr(critic, "backbone", None)
        compile_module(inner if isinstance(inner, nn.Module) else critic, **kw)


__all__ = ["CompileOptions", "compile_backbone", "compile_configured", "compile_backends", "compile_modes",
           "check_compile_combination", "compiled", "compile_module", "check_rl_compile_options",
           "compile_rl_models"]
