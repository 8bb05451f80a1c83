"""What a causal LM does to its LM head's output before the softmax, read off its config.

Most heads are ``logits = h @ W.T (+ b)``, which :mod:`rlhf_fast.ops`' fused heads compute
without the ``[N, V]`` logits. Some models transform those logits afterwards: a scale (Cohere,
Granite, Falcon-H1, Muse, HyperCLOVA X) or a tanh softcap (Gemma 2/3, Muse, RecurrentGemma).
This module names those config attributes once, for the fused paths (which must not take such a
head: :func:`active_logit_transforms`) and for the logits paths that compute them exactly
(:func:`head_transform`, :func:`head_logits`). Multimodal wrappers keep them on their text config
(``config.text_config``), which is read too. :func:`pre_head_reason` names the heads that are
not ``h @ W.T`` for another reason: a prediction transform before the output embedding (BERT,
RoBERTa, Electra, ModernBERT decoder), whose logits only the model's own forward gives.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any, List, NamedTuple, Optional, Tuple

import torch

# Config attributes that change the logits after the LM-head matmul, with the values at which
# they are a no-op. A head with any of them active cannot be fused.
LOGIT_TRANSFORM_ATTRS = (
    ("final_logit_softcapping", (None, 0, 0.0)),  # Gemma2/3, Muse: logits = c·tanh(logits / c)
    ("logits_soft_cap", (None, 0, 0.0)),  # RecurrentGemma: the same softcap
    ("logit_scale", (None, 1, 1.0)),  # Cohere: logits *= logit_scale
    ("output_multiplier", (None, 1, 1.0)),  # Muse: logits *= output_multiplier (before the softcap)
    ("logits_scaling", (None, 1, 1.0)),  # Granite (MuP): logits /= logits_scaling; HyperCLOVA X: *=
    ("lm_head_multiplier", (None, 1, 1.0)),  # Falcon-H1: logits *= lm_head_multiplier
    # read by no transformers model today; a config carrying one is kept off the fused head
    ("output_multiplier_scale", (None, 1, 1.0)),
    ("mup_width_scale", (None, 1, 1.0)),
    ("mup_output_multiplier", (None, 1, 1.0)),
)

# The attributes :func:`head_transform` turns into a :class:`HeadTransform`.
KNOWN_TRANSFORM_ATTRS = frozenset({"final_logit_softcapping", "logits_soft_cap", "logit_scale", "output_multiplier",
                                   "logits_scaling", "lm_head_multiplier"})


class HeadTransform(NamedTuple):
    """What a model's forward does to its LM head's output before the softmax: multiply by
    ``scale``, then, when ``softcap`` is set, ``softcap·tanh(z / softcap)`` (Gemma's final logit
    softcapping)."""

    scale: float = 1.0
    softcap: Optional[float] = None


def head_configs(config: Any) -> List[Any]:
    """``config`` and, for a multimodal wrapper, its text config (``get_text_config()``), where
    the head's attributes live (Gemma 3, Aya Vision, Muse): one or two config objects."""
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def active_logit_transforms(config: Any) -> List[Tuple[str, Any]]:
    """``(name, value)`` of every :data:`LOGIT_TRANSFORM_ATTRS` entry ``config`` (or its text
    config) sets to a value that changes the logits, in that table's order; [] for a plain head."""
    out = []
    # once, not per attribute: transformers' get_text_config costs ~10 us a call, and every
    # log-prob forward asks this (unfusable_reason) several times a training step
    configs = head_configs(config)
    for name, neutral in LOGIT_TRANSFORM_ATTRS:
        for cfg in configs:
            val = getattr(cfg, name, None)
            if val not in neutral:
                out.append((name, val))
                break
    return out


def head_transform(config: Any) -> HeadTransform:
    """The :class:`HeadTransform` of a model with this config, read off its text config as TRL
    1.16's DistillationTrainer reads it (``_compute_loss``): the scale is ``logit_scale``
    (Cohere), else ``output_multiplier`` (Muse), else ``lm_head_multiplier`` (Falcon-H1), else
    ``1 / logits_scaling`` (Granite, MiniCPM3; ``logits_scaling`` itself for HyperCLOVA X), else 1;
    the softcap is ``final_logit_softcapping`` (Gemma 2/3), else ``logits_soft_cap``
    (RecurrentGemma, which TRL does not read). ``config`` None: a plain head."""
    if config is None:
        return HeadTransform()
    cfg = head_configs(config)[-1]
    scale = None
    for key in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(cfg, key, None)
    ls = getattr(cfg, "logits_scaling", None)
    if scale is None and ls is not None:
        scale = ls if getattr(cfg, "model_type", None) == "hyperclovax" else 1 / ls
    cap = getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logits_soft_cap", None)
    return HeadTransform(1.0 if scale is None else float(scale), None if not cap else float(cap))


def transform_logits(z: torch.Tensor, transform: HeadTransform, temperature: float = 1.0) -> torch.Tensor:
    """``transform`` applied to the head's output ``z [n, V]`` (in z's dtype), then the division
    by ``temperature`` (TRL's order: scale, softcap, temperature)."""
    if transform.scale != 1.0:
        z = z * transform.scale
    if transform.softcap is not None:
        z = torch.tanh(z / transform.softcap) * transform.softcap
    return z / temperature if temperature != 1.0 else z


def pre_head_reason(model: Any) -> Optional[str]:
    """Why the logits of the causal LM ``model`` (a transformers model, unwrapped) are not its
    output embedding applied to its backbone's last hidden state, or None: the output embedding
    sits inside a prediction-head module that the forward runs whole (BERT's ``cls.predictions``,
    RoBERTa's ``lm_head``: dense, activation, LayerNorm, then the decoder Linear), or the forward
    applies another of the model's modules to the state before it (Electra's
    ``generator_predictions``, ModernBERT decoder's ``lm_head`` before its ``decoder``). Such a
    head's log-probs come only from the model's own logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(model, "named_children"):
        return None
    children = dict(model.named_children())
    name = next((n for n, c in children.items() if c is head), None)
    if name is None:  # nested: inside a head module (a wrapped language model's own head is fine)
        from transformers import PreTrainedModel

        owner = next((n for n, c in children.items() if any(m is head for m in c.modules())), None)
        if owner is None or isinstance(children[owner], PreTrainedModel):
            return None
        return (f"the LM head is inside {owner} ({type(children[owner]).__name__}), which transforms the "
                f"hidden state before it")
    other = _module_before_head(type(model), name)
    return None if other is None else f"the forward applies self.{other} to the hidden state before the LM head"


@functools.lru_cache(maxsize=None)
def _module_before_head(cls: type, name: str) -> Optional[str]:
    """The attribute X of ``self.<name>(self.X(...))`` in the source of ``cls.forward`` (the LM
    head ``name`` applied to another module's output), or None (also when it cannot be read)."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    hit = re.search(rf"self\.{re.escape(name)}\(\s*self\.(\w+)\(", src)
    return None if hit is None else hit.group(1)


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], transform: HeadTransform,
                temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """A model's logits ``[n, V]`` in ``dtype`` at ``temperature`` from its last hidden states
    ``hidden [n, H]`` and head ``weight [V, H]`` / ``bias [V]``: the head's product in its dtype (as
    the model's forward gives it), then in ``dtype`` ``transform``'s scale and softcap and the
    division by ``temperature`` (:func:`transform_logits`)."""
    z = torch.nn.functional.linear(hidden, weight, bias).to(dtype)
    return transform_logits(z, transform, temperature)


__all__ = ["HeadTransform", "KNOWN_TRANSFORM_ATTRS", "LOGIT_TRANSFORM_ATTRS", "active_logit_transforms",
           "head_configs", "head_logits", "head_transform", "pre_head_reason", "transform_logits"]
