"""The ``merge`` section of the trainer configs: TRL's experimental ``MergeModelCallback``
(``trl/experimental/merge_model_callback.py``) without mergekit, the merge itself being
:mod:`rlhf_fast.models.merge`.

TRL's callback merges the trained policy with a target model (by default the model the run
started from: ``get_config_model_id(model.config)``) into ``checkpoint-N/merged`` at every save
(``merge_at_every_checkpoint``) or, otherwise, once at the end of training. Here: with
``merge.merge_at_every_checkpoint`` each checkpoint gets ``<checkpoint>/merged/``, and the end of
training always writes ``final/merged/`` (the last checkpoint's weights are the final ones, so
TRL's one end-of-training merge is that folder). ``merge.target`` is a model folder (read at each
merge); null keeps a CPU copy of the initial policy (in ``merge.dtype``, taken before a resumed
run loads its checkpoint) — the run's initial policy either way, also for DPO / KTO with another
``ref_model``, as TRL's default.

A merged folder is a product, not training state: it is written after the checkpoint is
complete, atomically (a temporary sibling renamed into place), from the weights in memory (with
FSDP2 every rank helps gather them), without touching any random generator, so resuming is
unchanged by it; it goes when its checkpoint is pruned. Refused with ``lora`` / a peft policy
(TRL's callback would merge an adapter folder, which mergekit cannot read).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Dict, Optional

import torch

from rlhf_fast.models.merge import (DTYPES, MergeConfig, check_model_dir, check_same_keys, merge_state_dicts,
                                    read_state_dict, target_shapes, unique_state_dict, write_merged_folder)
from rlhf_fast.trainers.common import _beside
from rlhf_fast.trainers.config import section_config

MERGED = "merged"  # the merged model's folder inside a checkpoint or final/


def check_merge_field(cfg, key: str = "merge", lora: Optional[object] = None) -> Optional[MergeConfig]:
    """``cfg.<key>`` (None, a mapping of :class:`MergeConfig` fields or a MergeConfig) as a
    MergeConfig or None; refused with ``lora`` (the config's LoRA setting) and a ``target`` that
    is not a safetensors model folder. ValueError / TypeError naming the key."""
    m = section_config(getattr(cfg, key), MergeConfig, key, "merge settings")
    if m is None:
        return None
    if lora is not None:
        raise ValueError(f"{key} cannot be used with lora: the policy's checkpoints hold an adapter, not a model "
                         "to merge (merge final/ into its base first, then use rlhf-fast merge)")
    if m.target is not None:
        check_model_dir(m.target, f"{key}.target")
    return m


@dataclasses.dataclass
class MergeOptions:
    """``merge`` (TRL's ``MergeModelCallback`` and ``MergeConfig``: :class:`MergeConfig`; null:
    off), shared by the offline trainer configs (SFT, reward, DPO, KTO) and listed after
    ``bema``. :func:`~rlhf_fast.trainers.common.check_training_schedule` calls
    :meth:`check_merge_options`."""

    merge: Optional[MergeConfig] = dataclasses.field(default=None, metadata=_beside("bema"))

    def check_merge_options(self) -> None:
        """``merge`` as a MergeConfig or None (:func:`check_merge_field`)."""
        self.merge = check_merge_field(self, lora=getattr(self, "lora", None))


def initial_target(merge: Optional[MergeConfig], model: torch.nn.Module, ctx, strategy: str
                   ) -> Optional[Dict[str, torch.Tensor]]:
    """The target weights kept in memory: without ``merge.target``, a CPU copy of ``model``'s
    weights now (tied names once), in ``merge.dtype``, on rank 0 (None elsewhere, and when
    ``merge`` is off or names a folder). A collective under FSDP2: every rank calls it."""
    if merge is None:
        return None
    from rlhf_fast.distributed import full_state_dict, unwrap

    _refuse_peft(model)
    if merge.target is not None:
        check_merge_target(merge, model)
        return None
    sd = full_state_dict(model, ctx, strategy)
    if not ctx.is_main:
        return None
    sd = _saved_once(unwrap(model), sd)
    dtype = DTYPES[merge.dtype]
    return {k: (v.detach().to("cpu", dtype, copy=True) if v.is_floating_point() else v.detach().cpu().clone())
            for k, v in sd.items()}


def check_merge_target(merge: Optional[MergeConfig], model: torch.nn.Module) -> None:
    """Refuse a ``merge.target`` folder whose tensors are not ``model``'s (names and shapes, from
    the safetensors headers) when the trainer is set up, not after the run's last step at its
    first merge. ValueError naming ``merge.target``."""
    if merge is None or merge.target is None:
        return
    _refuse_peft(model)  # a peft model's names are not the target's: say why it cannot merge, not a shape
    from rlhf_fast.distributed import unwrap

    try:
        check_same_keys(_model_shapes(unwrap(model)), target_shapes(merge.target))
    except ValueError as e:
        raise ValueError(f"merge.target {merge.target!r} cannot be merged with this run's policy: {e}") from e


def _model_shapes(model: torch.nn.Module) -> Dict[str, tuple]:
    """The global shape of each tensor ``model`` saves (tied names once), FSDP2 shards too."""
    sd = model.state_dict()
    local = {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in sd.items()}
    return {k: tuple(sd[k].shape) for k in unique_state_dict(local)}


def _saved_once(model: torch.nn.Module, gathered: Optional[Dict[str, torch.Tensor]]
                ) -> Dict[str, torch.Tensor]:
    """``model``'s weights under the names it saves (tied ones once): from ``gathered`` (FSDP2's
    full state dict, which holds tied names as separate copies, so the model's own shared
    storage decides) or, when None, from its own state dict."""
    if gathered is None:
        return unique_state_dict(model.state_dict())
    return {k: gathered[k] for k in _model_shapes(model)}


def _refuse_peft(model) -> None:
    from rlhf_fast.distributed import unwrap
    from rlhf_fast.models.loading import _is_peft

    if _is_peft(unwrap(model)):
        raise ValueError("merge cannot be used with a peft (LoRA) policy: its checkpoints hold an adapter, not a "
                         "model to merge")


def save_merged(merge: MergeConfig, target: Optional[Dict[str, torch.Tensor]], model: torch.nn.Module, tokenizer,
                folder: str, ctx, strategy: str) -> Optional[str]:
    """Merge ``model``'s weights now with ``target`` (:func:`initial_target`; read from
    ``merge.target`` when that is set) into ``folder/merged``: model.safetensors in
    ``merge.dtype``, the model's config (that dtype) and generation config, ``tokenizer``
    (when it can be saved). Rank 0 writes (atomically); every rank must call it (FSDP2 gathers
    the weights). Returns the folder on rank 0, else None."""
    from rlhf_fast.distributed import full_state_dict, unwrap

    sd = full_state_dict(model, ctx, strategy)
    out = None
    if ctx.is_main:
        base = unwrap(model)
        policy = _saved_once(base, sd)
        if merge.target is not None:
            target = read_state_dict(merge.target)
        merged = merge_state_dicts(policy, target, **merge.method_kwargs())  # (layer stacks: their counts)
        out = os.path.join(folder, MERGED)
        write_merged_folder(out, merged, lambda tmp: _write_config_and_tokenizer(base, tokenizer, tmp, merge.dtype))
    ctx.barrier()
    return out


def _write_config_and_tokenizer(model, tokenizer, folder: str, dtype: str) -> None:
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # as save_pretrained records it
    config.save_pretrained(folder)
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data["dtype"] = dtype  # the weights' dtype: what from_pretrained(dtype="auto") loads
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(folder)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)


# ---- the offline trainers' hooks (SFT, reward, DPO, KTO: rlhf_fast.trainers.sft's shared loop) ----

def setup_merge(trainer) -> None:
    """Keep the initial policy as the merge target (``trainer._merge_target``) when
    ``trainer.cfg.merge`` asks for it; called before a resumed run loads its checkpoint."""
    merge = getattr(trainer.cfg, "merge", None)
    if merge is not None:
        _refuse_peft(trainer.model)
    trainer._merge_target = initial_target(merge, trainer.model, trainer.ctx, trainer.cfg.distributed.strategy)


def merge_into(trainer, folder: str, *, checkpoint: bool) -> None:
    """``folder/merged`` from ``trainer.model`` when ``trainer.cfg.merge`` is on: at a
    ``checkpoint`` only with ``merge_at_every_checkpoint``, at ``final/`` always."""
    _merge_at(getattr(trainer.cfg, "merge", None), trainer, trainer.model, folder, trainer.cfg.distributed.strategy,
              checkpoint)


def _merge_at(merge: Optional[MergeConfig], trainer, model, folder: str, strategy: str, checkpoint: bool) -> None:
    if merge is None or (checkpoint and not merge.merge_at_every_checkpoint):
        return
    save_merged(merge, getattr(trainer, "_merge_target", None), model, trainer.tokenizer, folder, trainer.ctx,
                strategy)


# ---- the RL trainers' hooks (rlhf_fast.trainers.rl.RLTrainer: __init__, save, save_final) ----

def setup_policy_merge(trainer) -> None:
    """:func:`setup_merge` of an RL trainer (``trainer.config.merge``, ``trainer.policy``), called
    with the bare initial policy, before it is wrapped for DDP / FSDP2 and before a resume."""
    merge = trainer.config.merge
    trainer._merge_target = initial_target(merge, trainer.policy, trainer.ctx, "none")


def merge_policy_into(trainer, folder: str, *, checkpoint: bool) -> str:
    """:func:`merge_into` of an RL trainer's policy (``folder/merged``, beside ``final/policy``);
    returns ``folder``."""
    _merge_at(trainer.config.merge, trainer, trainer.policy, folder, trainer.config.distributed.strategy, checkpoint)
    return folder


__all__ = ["MergeOptions", "MergeConfig", "check_merge_field", "check_merge_target", "initial_target", "save_merged", "setup_merge",
           "merge_into", "setup_policy_merge", "merge_policy_into", "MERGED"]
