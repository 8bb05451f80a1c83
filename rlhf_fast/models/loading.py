"""Loading policies, frozen references, value models and reward models (Hugging Face).

Llama, Qwen2/3, Mistral and GPT-2 families (anything AutoModelForCausalLM /
AutoModelForSequenceClassification loads whose base model returns ``last_hidden_state``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from . import llama_forward
from .logprobs import backbone, check_input_ids, default_position_ids, hidden_states, unwrap

PathLike = Union[str, os.PathLike]


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "disable_adapter", None))


def _check_dtype_device(dtype, device):
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str, torch.device or None, got {type(device).__name__}")


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)`` that keeps float32 RoPE inverse-frequency buffers (``inv_freq``,
    ``original_inv_freq``) in float32, as ``from_pretrained(dtype=...)`` builds them: a plain
    ``.to(torch.bfloat16)`` rounds the frequencies to 8 bits of mantissa, which shifts every
    rotary angle by up to 0.4% (radians off at a few thousand positions) and makes the model
    differ from the same weights loaded from disk in that dtype."""
    keep = [(m, name, buf) for m in model.modules() for name, buf in m._buffers.items()
            if buf is not None and name.endswith("inv_freq") and buf.dtype == torch.float32]
    model = model.to(dtype)
    for m, name, buf in keep:
        m._buffers[name] = buf.to(device=m._buffers[name].device)
    return model


def _load_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype to load weights in: float32 unless one is given. transformers >= 5 loads a
    checkpoint in its saved dtype by default ("auto"); a bf16 checkpoint would then train in
    pure bf16 (no float32 master weights), unlike the float32 training (with bf16 autocast on
    CUDA) the trainers document and transformers 4 gave."""
    return torch.float32 if dtype is None else dtype


def _dtype_key() -> str:
    """The ``from_pretrained`` keyword of the load dtype: ``dtype`` from transformers 4.56 on,
    ``torch_dtype`` before (pyproject allows >= 4.46)."""
    import transformers

    try:
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    except ValueError:
        major, minor = 5, 0
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _dtype_kwargs(dtype: Optional[torch.dtype]) -> dict:
    """``from_pretrained`` keyword for the load dtype (:func:`_load_dtype`)."""
    return {_dtype_key(): _load_dtype(dtype)}


# ------------------------------------------------------------------ TRL's model_init_kwargs

# the from_pretrained keywords a config's model_init_kwargs may name (TRL passes any it is given;
# these are the ones that mean something for a local folder, and those refused with a reason)
MODEL_INIT_KEYS = ("dtype", "torch_dtype", "attn_implementation", "trust_remote_code", "low_cpu_mem_usage",
                   "device_map", "revision", "quantization_config")
# TRL's create_model_from_path takes these dtype names (and "float16", refused here: see _FP16)
INIT_DTYPES = ("auto", "float32", "bfloat16")
_FP16 = ("float16 weights are not supported (the loss scale needs float32 master weights: torch's GradScaler "
         "refuses float16 gradients); for fp16 mixed precision set fp16: true (float32 weights under a float16 "
         "autocast), or use bfloat16")
_REFUSED = {
    "revision": "a revision names a commit of a Hub repository, and models load from local folders only (nothing "
                "is downloaded): save that revision to a folder and point the model key at it",
    "quantization_config": "quantized loading (QLoRA) is not supported: load the model unquantized (lora: trains "
                           "adapters on it)",
}
# attention implementations besides eager / sdpa: transformers.utils' check that they run here, and what
# they need
_ATTN_NEEDS = {
    "flash_attention_2": ("is_flash_attn_2_available", "the flash-attn package (pip install flash-attn) and a CUDA "
                                                       "device"),
    "flash_attention_3": ("is_flash_attn_3_available", "the FlashAttention-3 package (flash_attn_interface) and a "
                                                       "CUDA device"),
    "flash_attention_4": ("is_flash_attn_4_available", "the FlashAttention-4 package and a CUDA device"),
    "flex_attention": ("is_torch_flex_attn_available", "a torch with flex attention (>= 2.5)"),
}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa") + tuple(_ATTN_NEEDS)


def _init_dtype(value, key: str) -> Optional[str]:
    """A model_init_kwargs dtype as its name: ``auto``, ``float32``, ``bfloat16`` (a torch.dtype
    given from Python becomes its name, so config.yaml can hold it), or None (kept: TRL passes it
    on, and transformers 5 then loads the saved dtype, as ``auto``)."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        value = str(value).replace("torch.", "")
    if value in ("float16", "half", "fp16"):
        raise ValueError(f"{key}: {_FP16}")
    if not isinstance(value, str) or value not in INIT_DTYPES:
        raise ValueError(f"{key} must be one of {list(INIT_DTYPES)} (or null), got {value!r}")
    return value


def _attn_implementation(value, key: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or value not in ATTN_IMPLEMENTATIONS:
        # hub kernels ("kernels-community/...") would be downloaded; "paged|..." is for generation servers
        raise ValueError(f"{key} must be one of {list(ATTN_IMPLEMENTATIONS)} (or null: sdpa), got {value!r}")
    if value in _ATTN_NEEDS:
        import transformers.utils

        check, needs = _ATTN_NEEDS[value]
        if not getattr(transformers.utils, check, lambda: False)():
            raise ValueError(f"{key} {value!r} needs {needs}, which this machine lacks; use 'sdpa' (the default) or "
                             "'eager'")
    return value


def check_model_init_kwargs(value, key: str = "model_init_kwargs") -> dict:
    """TRL's ``model_init_kwargs`` (the ``from_pretrained`` keywords of a model loaded from a
    folder) checked and normalised; ValueError naming ``key``.NAME otherwise. ``value``: None or
    a mapping (values already read as YAML); returns a new dict, which this function returns
    unchanged when given it again.

    * ``dtype`` (``torch_dtype``, its old name, becomes ``dtype``): ``auto`` (the dtype the folder
      was saved in), ``float32``, ``bfloat16`` or null (transformers' default: since v5 ``auto``);
      absent: float32, as TRL. ``float16`` is refused (fp16 training is ``fp16: true``: float32
      weights under a float16 autocast and a loss scale).
    * ``attn_implementation``: ``eager``, ``sdpa``, or a flash / flex implementation whose
      package this machine has (:data:`ATTN_IMPLEMENTATIONS`).
    * ``trust_remote_code``, ``low_cpu_mem_usage``: true or false, passed on (transformers 5
      drops ``low_cpu_mem_usage`` unread: it always loads that way).
    * ``device_map``: null only, and dropped (the trainers place the model: ``device``,
      ``distributed``). ``revision`` and ``quantization_config`` are refused, as is any other key."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{key} must be a mapping {{name: value}} of from_pretrained keywords, got {value!r}")
    if "dtype" in value and "torch_dtype" in value:
        raise ValueError(f"{key}: dtype and torch_dtype are both set; torch_dtype is dtype's old name, give one")
    out = {}
    for k, v in value.items():
        name = f"{key}.{k}"
        if k not in MODEL_INIT_KEYS:
            valid = [x for x in MODEL_INIT_KEYS if x not in _REFUSED]
            raise ValueError(f"{name}: not a supported from_pretrained keyword (valid: {', '.join(valid)})")
        if k in _REFUSED:
            raise ValueError(f"{name}: {_REFUSED[k]}")
        if k in ("dtype", "torch_dtype"):
            out["dtype"] = _init_dtype(v, name)
        elif k == "attn_implementation":
            out[k] = _attn_implementation(v, name)
        elif k == "device_map":
            if v is not None:
                raise ValueError(f"{name} must be null (or left out), got {v!r}: the trainers place the model "
                                 "themselves (device, distributed.*)")
        elif not isinstance(v, bool):
            raise ValueError(f"{name} must be true or false, got {v!r}")
        else:
            out[k] = v
    return out


def tokenizer_kwargs(init_kwargs=None) -> dict:
    """The ``AutoTokenizer.from_pretrained`` keywords a model's checked ``init_kwargs``
    (:func:`check_model_init_kwargs`) imply: ``trust_remote_code`` when it is set, else none."""
    return {"trust_remote_code": True} if (init_kwargs or {}).get("trust_remote_code") else {}


def from_pretrained_kwargs(init_kwargs=None, dtype: Optional[torch.dtype] = None) -> dict:
    """The ``from_pretrained`` keywords of checked ``init_kwargs`` (:func:`check_model_init_kwargs`)
    with the load dtype resolved as TRL's ``create_model_from_path`` does (trl/trainer/utils.py):
    a dtype name becomes the torch dtype, ``auto`` and None pass as they are, and no ``dtype`` key
    means float32 — or ``dtype`` (a torch.dtype; ValueError when both give one)."""
    kw = dict(init_kwargs or {})
    if "dtype" in kw:
        if dtype is not None:
            raise ValueError(f"dtype={dtype} and model_init_kwargs' dtype {kw['dtype']!r} are both given; give one")
        d = kw.pop("dtype")
        kw[_dtype_key()] = d if d in (None, "auto") else getattr(torch, d)
    else:
        kw.update(_dtype_kwargs(dtype))
    return kw


def apply_model_init_kwargs(model: nn.Module, init_kwargs=None) -> nn.Module:
    """The checked ``init_kwargs`` (:func:`check_model_init_kwargs`) applied to a model built in
    memory (a ``tiny:`` spec): ``dtype`` float32 / bfloat16 casts it (:func:`cast_model`: RoPE
    frequencies stay float32, as from_pretrained leaves them), ``auto`` / null keep its dtype;
    ``attn_implementation`` is set. The other keys only concern loading from a folder. Returns the model."""
    kw = init_kwargs or {}
    d = kw.get("dtype")
    if d not in (None, "auto"):
        model = cast_model(model, getattr(torch, d))
    if kw.get("attn_implementation") is not None:
        unwrap(model).set_attn_implementation(kw["attn_implementation"])
    return model


def _lora_config(lora):
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is a declared dependency here
        raise ImportError("lora=... needs the `peft` package (pip install peft)") from e
    if isinstance(lora, peft.LoraConfig):
        return lora
    if isinstance(lora, dict):
        kw = {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}
        kw.update(lora)
        return peft.LoraConfig(**kw)
    raise TypeError(f"lora must be a dict, a peft.LoraConfig or None, got {type(lora).__name__}")


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Turn on transformers' activation checkpointing (non-reentrant) for ``model`` (a
    ``PreTrainedModel``, or a peft / DDP wrapper of one) and its KV cache off; returns the
    transformers model. Each decoder layer keeps only its input for the backward and runs
    again there: less activation memory for about one more forward per update. The
    Llama-family training forward (:mod:`rlhf_fast.models.llama_forward`) checkpoints too,
    also in eval mode (the RL trainers keep the policy in eval mode, without dropout)."""
    base = unwrap(model)
    # transformers 5 renamed it; keep the old name for older versions
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    return base


def adapter_base(path: PathLike, key: str = "model") -> Optional[str]:
    """The base model folder named by the peft adapter folder ``path`` (its adapter_config.json's
    ``base_model_name_or_path``); None when ``path`` holds no adapter. ValueError naming ``key``
    when that base is not a local folder (a ``tiny:`` base saves as null, a relative path holds
    only from the folder it was trained in): loading it would look it up on the hub."""
    adapter_cfg = os.path.join(os.fspath(path), "adapter_config.json")
    if not os.path.exists(adapter_cfg):
        return None
    with open(adapter_cfg) as f:
        base_path = json.load(f).get("base_model_name_or_path")
    if not base_path or not os.path.isdir(base_path):
        raise ValueError(f"{key} {os.fspath(path)!r}: the adapter there names base model {base_path!r}, which is "
                         "not a local folder (from here); load the base and pass the adapter folder as lora=")
    return base_path


def load_policy(
    model_or_path,
    *,
    dtype: Optional[torch.dtype] = None,
    device=None,
    gradient_checkpointing: bool = False,
    lora=None,
    init_kwargs=None,
):
    """A causal-LM policy from a local directory or an in-memory ``PreTrainedModel``.

    A directory holding a peft adapter (``adapter_config.json``) loads base + adapter,
    trainable (the base's token embeddings first resized to the rows the adapter saved them
    with, when a run added tokens). ``lora`` (a dict of LoraConfig fields, defaults r=8,
    alpha=16, all linear layers; or a ``peft.LoraConfig``) wraps the model in a trainable peft model.
    ``lora`` may also be a saved adapter directory (loaded trainable onto the base).
    ``gradient_checkpointing`` turns it on (non-reentrant) and the KV cache off.

    ``dtype``: from a directory the weights load in ``dtype``, float32 when None (whatever dtype
    the checkpoint was saved in); an in-memory model is cast to ``dtype`` (kept as it is when
    None). The parameters themselves are then in that dtype: a bf16/fp16 policy trains without
    float32 master weights. For float32 weights with bf16 compute use ``dtype=None`` and the
    trainers' ``bf16`` autocast (CUDA). RoPE frequency buffers stay float32 either way.

    ``init_kwargs``: TRL's ``model_init_kwargs`` (:func:`check_model_init_kwargs`), the
    ``from_pretrained`` keywords of a directory, whose ``dtype`` takes the place of the ``dtype``
    argument (ValueError when both are given); applied to an in-memory model as
    :func:`apply_model_init_kwargs` does.
    """
    from transformers import AutoModelForCausalLM, PreTrainedModel

    _check_dtype_device(dtype, device)
    init_kwargs = check_model_init_kwargs(init_kwargs, "init_kwargs")
    load_kw = from_pretrained_kwargs(init_kwargs, dtype)
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.isdir(path):
            raise ValueError(f"model_or_path must be a local directory (nothing is downloaded), got {path!r}")
        # absolute: peft saves a LoRA run's base by the path it was loaded from, which must hold
        # from any folder
        path = os.path.abspath(path)
        base_path = adapter_base(path, "model_or_path")
        base_path = None if base_path is None else os.path.abspath(base_path)
        if base_path is not None:
            model = AutoModelForCausalLM.from_pretrained(base_path, **load_kw)
            lora = path if lora is None else lora
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **load_kw)
    elif isinstance(model_or_path, PreTrainedModel) or _is_peft(model_or_path):
        model = model_or_path
        if dtype is not None:
            model = cast_model(model, dtype)
        model = apply_model_init_kwargs(model, init_kwargs)
    else:
        raise TypeError(f"model_or_path must be a path or a PreTrainedModel, got {type(model_or_path).__name__}")
    if device is not None:
        model = model.to(device)
    if gradient_checkpointing:
        base = enable_activation_checkpointing(model)
        if lora is not None or _is_peft(model):
            # frozen embeddings would otherwise cut the graph before the checkpointed blocks
            base.enable_input_require_grads()
    if lora is not None:
        if _is_peft(model):
            raise ValueError("lora was given but the model already carries a peft adapter")
        if isinstance(lora, (str, os.PathLike)):
            from peft import PeftModel

            if not os.path.exists(os.path.join(os.fspath(lora), "adapter_config.json")):
                raise ValueError(f"lora must be a directory holding adapter_config.json, got {os.fspath(lora)!r}")
            _resize_to_adapter(model, os.fspath(lora))
            model = PeftModel.from_pretrained(model, os.fspath(lora), is_trainable=True)
        else:
            from peft import get_peft_model

            model = get_peft_model(model, _lora_config(lora))
            setattr(model, _FRESH_ADAPTERS, True)  # (its reference: the adapters disabled)
    return model


def load_merged(path: PathLike, *, init_kwargs=None) -> nn.Module:
    """The causal LM in the folder ``path`` as one plain model (:func:`load_policy`; an adapter
    folder's adapter merged into its base): a reference folder stands for the model it holds,
    whose reference would otherwise be that base with the adapter disabled."""
    model = load_policy(path, init_kwargs=init_kwargs)
    return model.merge_and_unload() if _is_peft(model) else model


def merged_adapter(model: nn.Module, folder: PathLike) -> nn.Module:
    """``model`` (a base, e.g. a sequence classifier of a causal adapter's base) with the peft
    adapter in ``folder`` merged into its weights: a plain model (embeddings first resized to the
    adapter's, as :func:`load_policy` does)."""
    from peft import PeftConfig, PeftModel

    _resize_to_adapter(model, os.fspath(folder))
    config = PeftConfig.from_pretrained(os.fspath(folder))
    config.task_type = None  # (a causal adapter on another head: the generic wrapper, which only merges)
    # (peft froze the base: trainable again, as any model from_pretrained gives)
    merged = PeftModel.from_pretrained(model, os.fspath(folder), config=config).merge_and_unload()
    return merged.requires_grad_(True)


def _resize_to_adapter(model, folder: str) -> None:
    """Resize ``model``'s token embeddings to the rows the adapter in ``folder`` saved them with:
    a run that added tokens (chat_template_path) trained on resized embeddings, which peft saves
    in the adapter, but its base folder still holds the old vocabulary (the new tokens' ids would
    index past it)."""
    path = os.path.join(folder, "adapter_model.safetensors")
    emb = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is emb), None)
    if not name or not os.path.isfile(path):
        return
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        rows = {f.get_slice(k).get_shape()[0] for k in f.keys()
                if f".{name}." in f".{k}" and k.endswith(".weight") and "lora_" not in k}
    if len(rows) == 1 and rows != {emb.num_embeddings}:
        model.resize_token_embeddings(rows.pop(), mean_resizing=False)


# the frozen copy of a trained adapter that a peft policy's reference runs (TRL 1.16 names it "ref")
REF_ADAPTER = "rlhf_fast_ref"
# set on a peft model whose adapters load_policy created fresh (lora B = 0: the model is its base)
_FRESH_ADAPTERS = "_rlhf_fast_fresh_adapters"


def _rename_adapter(name: str, adapter: str, new: str) -> Optional[str]:
    """``name`` (a parameter's) with its ``adapter`` segment renamed ``new``; None without one."""
    parts = name.split(".")
    return ".".join(new if x == adapter else x for x in parts) if adapter in parts else None


def _adapter_is_identity(policy) -> bool:
    """Whether ``policy``'s active adapter leaves its base model's outputs unchanged: created
    fresh by :func:`load_policy`, or a plain LoRA whose B matrices are all zero (peft's default
    init). Anything else (a trained adapter, DoRA, modules_to_save, trainable tokens) counts as
    trained: its reference must keep a copy of it."""
    if getattr(policy, _FRESH_ADAPTERS, False):
        return True
    cfg = policy.peft_config.get(policy.active_adapter)
    if getattr(cfg, "peft_type", None) != "LORA" or getattr(cfg, "use_dora", False) or \
            getattr(cfg, "modules_to_save", None) or getattr(cfg, "trainable_token_indices", None):
        return False
    return all(not bool(p.detach().any()) for n, p in policy.named_parameters()
               if ("lora_B" in n or "lora_embedding_B" in n) and policy.active_adapter in n.split("."))


def _frozen_adapter_copy(policy) -> str:
    """Add to ``policy`` a frozen copy of its active adapter (:data:`REF_ADAPTER`), as TRL 1.16's
    trainers add their "ref" adapter for a model with a pretrained adapter; returns its name.
    A copy made before (an earlier reference of the same policy) is kept: it holds the adapter as
    it was when the first reference was made."""
    if REF_ADAPTER in policy.peft_config:
        return REF_ADAPTER
    active = policy.active_adapter
    policy.add_adapter(REF_ADAPTER, copy.deepcopy(policy.peft_config[active]))
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, p in list(params.items()):
            ref = _rename_adapter(name, active, REF_ADAPTER)
            if ref is not None:
                if ref not in params:
                    raise ValueError(f"cannot copy the peft adapter {active!r} as the reference: {ref!r} "
                                     "not found")
                params[ref].copy_(p)
    for name, p in params.items():
        if REF_ADAPTER in name.split("."):
            p.requires_grad_(False)
    return REF_ADAPTER


def peft_save_kwargs(model) -> dict:
    """``save_pretrained`` keywords of ``model``: a peft model saves its own adapters, not the
    reference's frozen copy (:data:`REF_ADAPTER`, which would land in a sub-folder)."""
    if not _is_peft(model) or REF_ADAPTER not in model.peft_config:
        return {}
    return {"selected_adapters": [n for n in model.peft_config if n != REF_ADAPTER]}


class AdapterDisabledReference:
    """The reference model of a peft policy: the policy as it is now, run frozen.

    Fresh adapters (the model is its base): the same weights with the adapters disabled. A
    trained adapter (e.g. a LoRA SFT run's final/ as the policy): a frozen copy of it added as a
    second adapter (:data:`REF_ADAPTER`, as TRL 1.16's "ref" adapter) and run instead of the
    policy's, so the reference is the initial policy, not the base. No second copy of the base
    model either way. Calls (and :func:`rlhf_fast.models.sequence_logprobs`, which honours
    :meth:`rlhf_context`) run under that context and ``torch.no_grad()``.
    """

    def __init__(self, policy):
        if not _is_peft(policy):
            raise TypeError(f"policy must be a peft model, got {type(policy).__name__}")
        self.policy = policy
        self.adapter = None if _adapter_is_identity(policy) else _frozen_adapter_copy(policy)

    @property
    def rlhf_wrapped(self):
        return self.policy

    @contextlib.contextmanager
    def rlhf_context(self):
        if self.adapter is None:
            with self.policy.disable_adapter(), torch.no_grad():
                yield
            return
        # set_adapter flips requires_grad; the policy's own flags are put back as they were
        flags = [(p, p.requires_grad) for p in self.policy.parameters()]
        active = self.policy.active_adapter
        self.policy.set_adapter(self.adapter)
        try:
            with torch.no_grad():
                yield
        finally:
            self.policy.set_adapter(active)
            for p, flag in flags:
                p.requires_grad_(flag)

    def __call__(self, *args, **kwargs):
        with self.rlhf_context():
            return self.policy(*args, **kwargs)

    @property
    def device(self):
        return next(self.policy.parameters()).device

    @property
    def config(self):
        return unwrap(self.policy).config


def _embedding_rows(model) -> Optional[int]:
    """Rows of ``model``'s input embeddings (a causal LM, a peft / DDP / reference wrapper of one,
    or a ValueModel); None when it has none to read."""
    inner = unwrap(model)
    inner = getattr(inner, "backbone", inner)  # a ValueModel: its transformer backbone
    get = getattr(inner, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    rows = getattr(emb, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


def check_same_vocabulary(policy, model, key: str) -> None:
    """ValueError naming ``key`` unless ``model`` (a reference, a critic) has as many
    input-embedding rows as ``policy``: both read the policy's token ids, and over another
    vocabulary the KL (or the values, or a win rate of another tokenizer's ids) would be those
    of other tokens. Passes when either has no embeddings to read."""
    mine, theirs = _embedding_rows(policy), _embedding_rows(model)
    if mine is not None and theirs is not None and mine != theirs:
        raise ValueError(f"{key}: its vocabulary has {theirs} tokens (input-embedding rows), the policy's {mine}; it "
                         "must share the policy's vocabulary (the same tokenizer and embedding size)")


def make_reference(policy, *, device=None, dtype=None):
    """A frozen eval-mode reference of ``policy`` for KL penalties.

    A peft policy gives an :class:`AdapterDisabledReference` (no copy of the base; a trained
    adapter's frozen copy added beside it; ``device``/``dtype`` must then be None). Otherwise a
    deep copy with ``requires_grad=False``, moved to ``device``/``dtype`` when given.
    """
    _check_dtype_device(dtype, device)
    if not isinstance(policy, nn.Module):
        raise TypeError(f"policy must be a torch.nn.Module (a causal LM, or a peft model), got {type(policy).__name__}")
    if _is_peft(policy):
        if device is not None or dtype is not None:
            raise ValueError("device/dtype must be None for a peft policy: its reference shares the policy's weights")
        return AdapterDisabledReference(policy)
    ref = copy.deepcopy(policy)
    if any(getattr(m, "gradient_checkpointing", False) for m in ref.modules()):
        disable = getattr(ref, "activation_checkpointing_disable", None) or ref.gradient_checkpointing_disable
        disable()
    ref.eval().requires_grad_(False)
    if dtype is not None:
        ref = cast_model(ref, dtype)
    if device is not None:
        ref = ref.to(device)
    return ref


_VALUE_HEAD_FILE = "value_head.pt"
_VALUE_META_FILE = "value_model.json"


def _state_width(config) -> int:
    """The width of a backbone's last hidden state, which the value head reads: OPT-350m projects
    it out of ``hidden_size`` to ``word_embed_proj_dim`` (TRL's ValueHead reads that first), else
    ``hidden_size`` (GPT-2: ``n_embd``)."""
    for name in ("word_embed_proj_dim", "hidden_size", "n_embd"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"cannot read the hidden size of a {type(config).__name__} (no word_embed_proj_dim, "
                     f"hidden_size or n_embd) to size the value head")


class ValueModel(nn.Module):
    """A critic: a transformer backbone plus a scalar value head.

    ``ValueModel(model)`` copies the base model of ``model`` (a causal LM policy — for a peft
    policy the base weights without the adapters — or a reward model); from a reward model with one label the head starts from its score head. The head
    is float32 whatever the backbone's dtype.
    """

    def __init__(self, model: nn.Module, *, copy_backbone: bool = True):
        super().__init__()
        base = unwrap(model)
        if copy_backbone and _is_peft(model):
            # a LoRA policy: the critic starts from the base weights, without adapter modules
            base = copy.deepcopy(model).unload()
            self.backbone = backbone(base)
        elif copy_backbone:
            self.backbone = copy.deepcopy(backbone(base))
        else:
            self.backbone = base  # already a base model (from_pretrained)
        H = _state_width(self.backbone.config)
        self.value_head = nn.Linear(H, 1, bias=True, dtype=torch.float32)
        score = getattr(base, "score", None)
        with torch.no_grad():
            if isinstance(score, nn.Linear) and score.out_features == 1:
                self.value_head.weight.copy_(score.weight.float())
                if score.bias is not None:
                    self.value_head.bias.copy_(score.bias.float())
                else:
                    self.value_head.bias.zero_()
            else:
                # small init: values start near 0, the scale of whitened returns
                nn.init.normal_(self.value_head.weight, std=1.0 / (H + 1) ** 0.5 * 0.1)
                self.value_head.bias.zero_()
        self.backbone.requires_grad_(True)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Values ``[B, T]`` float32 (the value of the state after reading token t).

        input_ids / attention_mask / position_ids ``[B, T]``; position ids default to the count
        of attended tokens (left padding as in generation).
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(input_ids.shape)):
                raise ValueError(f"{name} must be None or a tensor of shape {tuple(input_ids.shape)}, "
                                 f"got {getattr(t, 'shape', type(t).__name__)}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have at least one row and one column, got shape {tuple(input_ids.shape)}")
        check_input_ids(self.backbone, input_ids, positions=position_ids is None)
        if position_ids is None and attention_mask is not None:
            position_ids = default_position_ids(attention_mask)
        if llama_forward.supported(self.backbone, input_ids.shape[1]):
            h = llama_forward.hidden_states(self.backbone, input_ids, attention_mask, position_ids)  # [B, T, H]
        else:
            with llama_forward.checkpointing_in_eval(self.backbone):  # (an RL critic trains in eval mode)
                h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False, return_dict=True).last_hidden_state
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def save_pretrained(self, save_directory: PathLike, **kwargs) -> None:
        """Write the backbone (HF format) and the value head into ``save_directory``.
        ``kwargs`` (e.g. ``safe_serialization``) go to the backbone's save_pretrained, so a
        ValueModel saves wherever a PreTrainedModel does (checkpoints included)."""
        os.makedirs(save_directory, exist_ok=True)
        self.backbone.save_pretrained(save_directory, **kwargs)
        torch.save(self.value_head.state_dict(), os.path.join(save_directory, _VALUE_HEAD_FILE))
        with open(os.path.join(save_directory, _VALUE_META_FILE), "w") as f:
            json.dump({"format": "rlhf_fast.ValueModel", "version": 1}, f)

    @classmethod
    def from_pretrained(cls, directory: PathLike, *, dtype: Optional[torch.dtype] = None, device=None,
                        init_kwargs=None) -> "ValueModel":
        """Load a ValueModel written by :meth:`save_pretrained`: the backbone in ``dtype``
        (float32 when None, whatever dtype it was saved in; pass the saved dtype for the same
        outputs as the saved model), the value head float32. ``init_kwargs``: TRL's
        ``model_init_kwargs`` for the backbone (:func:`check_model_init_kwargs`)."""
        from transformers import AutoModel

        _check_dtype_device(dtype, device)
        load_kw = from_pretrained_kwargs(check_model_init_kwargs(init_kwargs, "init_kwargs"), dtype)
        head = os.path.join(directory, _VALUE_HEAD_FILE)
        if not os.path.exists(head):
            raise ValueError(f"directory must hold a saved ValueModel ({_VALUE_HEAD_FILE} missing in {directory!r})")
        base = AutoModel.from_pretrained(directory, **load_kw)
        vm = cls(base, copy_backbone=False)
        vm.value_head.load_state_dict(torch.load(head, map_location="cpu", weights_only=True))
        if device is not None:
            vm = vm.to(device)
        return vm


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")


def check_model_folder(path: PathLike, key: str, *, tokenizer: bool = False, reward: bool = False,
                       tokenizer_key: Optional[str] = None) -> None:
    """Check, before loading, that ``path`` is a saved Hugging Face model folder (config.json, or
    a peft adapter's adapter_config.json); with ``tokenizer`` that it holds tokenizer files; with
    ``reward`` that it is not a causal LM (a reward model is a sequence-classification model).
    Raises ValueError naming the config key ``key`` (and ``tokenizer_key``, where one can point
    elsewhere for the tokenizer), the path and what was expected."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        what = "a file" if os.path.exists(path) else "not found"
        raise ValueError(f"{key} {path!r}: expected a local model folder (nothing is downloaded), {what}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path) and not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ValueError(f"{key} {path!r}: no config.json there; expected a folder saved by save_pretrained "
                         "(a Hugging Face model or an rlhf-fast run's final/)")
    if tokenizer:
        check_tokenizer_folder(path, key, tokenizer_key=tokenizer_key)
    if reward and os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                archs = json.load(f).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            archs = []
        causal = [a for a in archs if isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel"))]
        if causal:
            raise ValueError(f"{key} {path!r} holds a causal LM ({causal[0]}), not a reward model; expected a "
                             "sequence-classification model with one label (as `rlhf-fast reward` saves)")


def check_tokenizer_folder(path: PathLike, key: str, *, tokenizer_key: Optional[str] = None) -> None:
    """Raise ValueError naming ``key`` unless the folder ``path`` holds tokenizer files (and,
    where given, say that ``tokenizer_key`` can point at another folder that does)."""
    path = os.fspath(path)
    if not os.path.isdir(path) or not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        hint = f"; set {tokenizer_key} to a folder that holds one" if tokenizer_key else ""
        where = "there" if os.path.isdir(path) else "(not a folder)"
        raise ValueError(f"{key} {path!r}: no tokenizer files {where} ({', '.join(_TOKENIZER_FILES[:2])}, ...)"
                         + hint)


# ------------------------------------------------------------------ TRL's tokenizer overrides


def check_chat_template_path(path: Optional[str], key: str = "chat_template_path") -> None:
    """ValueError naming ``key`` unless ``path`` is None, a ``.jinja`` / ``.j2`` file, or a local
    folder holding a tokenizer (nothing is downloaded, so a Hub id is refused)."""
    if path is None:
        return
    if not isinstance(path, str) or not path:
        raise ValueError(f"{key} must be null, a .jinja / .j2 file or a tokenizer folder, got {path!r}")
    if path.endswith((".jinja", ".j2")):
        if not os.path.isfile(path):
            raise ValueError(f"{key} {path!r}: no such template file")
        return
    if not os.path.isdir(path):
        raise ValueError(f"{key} {path!r} is neither a .jinja / .j2 file nor a local tokenizer folder "
                         "(nothing is downloaded from the Hub)")
    check_tokenizer_folder(path, key)


def _token_in_vocab(tokenizer, token: str, key: str) -> None:
    if token not in tokenizer.get_vocab():
        raise ValueError(f"{key} {token!r} is not in the tokenizer's vocabulary (TRL refuses it too): add it to the "
                         "tokenizer first, or name a token it has, e.g. its eos "
                         f"{getattr(tokenizer, 'eos_token', None)!r}")


def _set_eos(model, tokenizer, token: str) -> None:
    """TRL SFTTrainer's ``eos_token``: the tokenizer's eos, mirrored onto the model's config, and
    added in front of the generation config's eos ids (each of which stops generation)."""
    tokenizer.eos_token = token
    model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    ids = gen.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id not in ids:
        gen.eos_token_id = [tokenizer.eos_token_id, *ids]


def clone_chat_template(model, tokenizer, source: str, resize_to_multiple_of: Optional[int] = 64) -> list:
    """TRL's ``clone_chat_template`` (trl/chat_template_utils.py) for a local tokenizer folder
    ``source``: its chat template and eos replace ``tokenizer``'s, the added tokens it has and
    ``tokenizer`` lacks are added, and the model's embeddings (and LM head) are resized to the
    new vocabulary rounded up to ``resize_to_multiple_of`` — the rows past the vocabulary get
    ``<extra_id_N>`` tokens, so tokenizer and embeddings agree. Returns the ids of the tokens
    added (source tokens, then fillers)."""
    from transformers import AddedToken, AutoTokenizer

    check_chat_template_path(source)
    src = AutoTokenizer.from_pretrained(source)
    if not getattr(src, "chat_template", None):
        raise ValueError(f"chat_template_path {source!r}: its tokenizer has no chat template to copy")
    tokenizer.chat_template = src.get_chat_template()
    added = [t for t in src.added_tokens_decoder.values() if t.content not in tokenizer.vocab]
    tokenizer.add_tokens(added)
    tokenizer.eos_token = src.eos_token
    model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    if model.can_generate():  # a sequence-classification model has no generation config
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.resize_token_embeddings(new_num_tokens=len(tokenizer.vocab), pad_to_multiple_of=resize_to_multiple_of)
    n_rows = model.get_input_embeddings().weight.shape[0]
    idx = 0
    while n_rows > len(tokenizer.vocab):  # fillers for the rows the rounding added
        filler = AddedToken(f"<extra_id_{idx}>")
        idx += 1
        if tokenizer.add_tokens(filler) == 1:
            added.append(filler)
    if len(tokenizer.vocab) != n_rows:
        raise RuntimeError(f"chat_template_path {source!r}: the tokenizer has {len(tokenizer.vocab)} tokens after "
                           f"cloning, the embeddings {n_rows} rows")
    return tokenizer.convert_tokens_to_ids([t.content for t in added])


def apply_tokenizer_overrides(model, tokenizer, *, eos_token: Optional[str] = None, pad_token: Optional[str] = None,
                              chat_template_path: Optional[str] = None) -> list:
    """TRL SFTTrainer's (and RewardTrainer's) ``eos_token``, ``chat_template_path`` and
    ``pad_token``, in its order, applied in place to ``tokenizer`` and ``model`` (a transformers
    model, before any LoRA or distributed wrapper); returns the ids of the tokens added to the vocabulary (by cloning a
    tokenizer folder's template), [] otherwise.

    * ``eos_token``: must be in the vocabulary (ValueError); becomes the tokenizer's eos, the
      model config's ``eos_token_id``, and joins the generation config's eos ids.
    * ``chat_template_path``: a ``.jinja`` / ``.j2`` file becomes the chat template as it is (any
      special token it names must already be in the vocabulary); a tokenizer folder is cloned
      (:func:`clone_chat_template`: its template, eos and added tokens; embeddings resized).
    * ``pad_token``: must be in the vocabulary (ValueError); the tokenizer's pad and the model
      config's / generation config's ``pad_token_id``.

    TRL's RewardTrainer applies the three alike to a sequence-classification model (which has
    no generation config, so only its config's ids change). A peft model cannot take a cloned
    folder's new tokens (its embeddings are the base's): ValueError, before anything changes."""
    path = chat_template_path
    if path is not None and not path.endswith((".jinja", ".j2")) and _is_peft(model):
        raise ValueError(f"chat_template_path {path!r} clones a tokenizer folder's template, which adds tokens and "
                         "resizes the embeddings: not with a peft model passed as model (use lora: instead, or a "
                         ".jinja file)")
    if eos_token is not None:
        _token_in_vocab(tokenizer, eos_token, "eos_token")
        _set_eos(model, tokenizer, eos_token)
    added: list = []
    if chat_template_path is not None:
        check_chat_template_path(chat_template_path)
        if chat_template_path.endswith((".jinja", ".j2")):
            with open(chat_template_path, encoding="utf-8") as f:
                tokenizer.chat_template = f.read()
        else:
            added = clone_chat_template(model, tokenizer, chat_template_path)
    if pad_token is not None:
        _token_in_vocab(tokenizer, pad_token, "pad_token")
        tokenizer.pad_token = pad_token
        mirror_pad_id(model, tokenizer.pad_token_id)
    return added


def mirror_pad_id(model, pad_id: Optional[int]) -> None:
    """The tokenizer's pad id ``pad_id`` onto the causal LM ``model``'s config and generation
    config, as TRL 1.16's SFT / DPO / KTO trainers mirror it ("the model must agree with the
    tokenizer on the pad token"), so ``final/``'s config.json and generation_config.json name
    the pad its tokenizer pads with (an eos given as pad to a tokenizer without one, or a
    ``pad_token`` override)."""
    model.config.get_text_config().pad_token_id = pad_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = pad_id


def load_reward_model(model_or_path, *, device=None, dtype=None, init_kwargs=None):
    """A scalar reward model (AutoModelForSequenceClassification with one label), eval mode.

    ``model_or_path``: a local directory (loaded in ``dtype``, float32 when None) or an
    in-memory model (cast to ``dtype`` when given). Raises ValueError when the model does not
    have exactly one label.

    ``init_kwargs``: TRL's ``model_init_kwargs`` (:func:`check_model_init_kwargs`), the
    ``from_pretrained`` keywords of a directory (TRL's GRPO / RLOO load their reward-model
    paths with the policy's), whose ``dtype`` takes the place of ``dtype`` (ValueError when
    both are given); without one, float32 (TRL: the saved dtype). Not applied to an in-memory
    model (TRL leaves a reward-model instance as it is).
    """
    from transformers import AutoModelForSequenceClassification, PreTrainedModel

    _check_dtype_device(dtype, device)
    init_kwargs = check_model_init_kwargs(init_kwargs, "init_kwargs")
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.isdir(path):
            raise ValueError(f"model_or_path must be a local directory (nothing is downloaded), got {path!r}")
        model = AutoModelForSequenceClassification.from_pretrained(path, **from_pretrained_kwargs(init_kwargs, dtype))
    elif isinstance(model_or_path, PreTrainedModel):
        model = model_or_path if dtype is None else cast_model(model_or_path, dtype)
    else:
        raise TypeError(f"model_or_path must be a path or a PreTrainedModel, got {type(model_or_path).__name__}")
    if getattr(model.config, "num_labels", None) != 1:
        raise ValueError(f"a reward model must have num_labels=1, got {getattr(model.config, 'num_labels', None)}")
    if device is not None:
        model = model.to(device)
    return model.eval()


def reward_model_sources(rc, *, models: Sequence = (), device=None, init_kwargs=None) -> List[tuple]:
    """``[(source, weight)]`` of the reward models of an RL config's ``reward`` section ``rc``
    (:class:`rlhf_fast.trainers.rl_config.RewardConfig`), as training scores with them: the
    :class:`~rlhf_fast.algorithms.RewardModelReward` ``models`` given first, then ``rc``'s
    ``reward_model`` folders (all checked before any is loaded, each loaded with ``init_kwargs``
    on ``device``), each a source of its own weighted ``rc.reward_model_weight`` when
    ``rc.reward_model_ensemble`` is ``sum``, else one ensemble of them; then ``rc.process_model``'s
    process reward model (:mod:`rlhf_fast.algorithms.process_rewards`), weighted
    ``rc.process_model_weight``. ``[]`` without reward models; ValueError naming
    ``reward.reward_model_ensemble`` for an ensemble of fewer than two."""
    from transformers import AutoTokenizer

    from rlhf_fast.algorithms import RewardModelEnsemble, RewardModelReward

    rms = list(models)  # every reward model, the Python API's then the config's folders, in that order
    folders = rc.reward_model_folders()
    for key, path in folders:  # all checked before any is loaded
        check_model_folder(path, key, tokenizer=True, reward=True)
    # loaded with the policy's from_pretrained keywords, as TRL's GRPO / RLOO load reward-model paths
    for _, path in folders:
        rms.append(RewardModelReward(load_reward_model(path, device=device, init_kwargs=init_kwargs),
                                     AutoTokenizer.from_pretrained(path, **tokenizer_kwargs(init_kwargs)),
                                     name="reward_model"))
    if rc.reward_model_ensemble == "sum":
        # each model a source of its own (the behaviour before ensembles: same names, same sum)
        out = [(rm, rc.reward_model_weight) for rm in rms]
    elif len(rms) < 2:
        raise ValueError(f"reward.reward_model_ensemble {rc.reward_model_ensemble!r} combines several reward "
                         f"models, got {len(rms)} (list >= 2 folders in reward.reward_model, or pass "
                         f"reward_models=[...]); use 'sum' for a single model")
    else:
        coef = 1.0 if rc.ensemble_coef is None else rc.ensemble_coef
        out = [(RewardModelEnsemble(rms, rc.reward_model_ensemble, coef, name="reward_model"),
                rc.reward_model_weight)]
    if getattr(rc, "process_model", None) is not None:  # a process reward model (rlhf-fast prm)
        from rlhf_fast.algorithms.process_rewards import load_process_reward_model

        out.append((load_process_reward_model(rc.process_model, aggregation=rc.process_aggregation, device=device,
                                              init_kwargs=init_kwargs,
                                              step_reward=getattr(rc, "process_step_reward", "log")),
                    rc.process_model_weight))
    return out


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index ``[B]`` int64 of each row's last attended token (left or right padding)."""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, torch.full_like(idx, -1)).max(-1).values.clamp(min=0)


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores ``[B]`` float32: the reward head at each row's last attended token.

    input_ids / attention_mask ``[B, T]``; left or right padding (the attention mask, not the
    pad id, locates the last token, so a pad id that also occurs in text is harmless). A model
    with a ``classifier`` head instead of a decoder's ``score`` (an encoder: BERT, DeBERTa,
    RoBERTa read their first token through a pooler) is scored by its own forward, as
    transformers and TRL's GRPO score it, left-padded rows moved to the right first. Differentiable in the model's parameters.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    base = unwrap(model)
    head = getattr(base, "score", None)
    if head is None and isinstance(getattr(base, "classifier", None), nn.Module):
        # an encoder's head reads its first token through a pooler (or its own head module):
        # its forward knows which state and layers, the last token's state alone does not
        if not bool(attention_mask[:, 0].all()):  # left padding: position 0 would be a pad token
            order = torch.sort((attention_mask == 0).to(torch.int8), dim=1, stable=True).indices
            input_ids, attention_mask = input_ids.gather(1, order), attention_mask.gather(1, order)
        out = model(input_ids=input_ids, attention_mask=attention_mask).logits
        if out.shape[-1] != 1:
            raise ValueError(f"the reward head must output one score, got {out.shape[-1]}")
        return out[:, 0].float()
    if not isinstance(head, nn.Module):
        raise TypeError(f"model must be a sequence-classification model with a `score` head, got {type(base).__name__}")
    last = last_token_index(attention_mask)
    # only the states the head reads: our Llama-family forward then skips the last layer's
    # attention output, MLP and final norm at every other position
    h_last = hidden_states(model, input_ids, attention_mask,
                           select=(torch.arange(input_ids.shape[0], device=input_ids.device), last))  # [B, H]
    out = head(h_last)
    if out.shape[-1] != 1:
        raise ValueError(f"the reward head must output one score, got {out.shape[-1]}")
    return out[:, 0].float()


__all__ = [
    "apply_model_init_kwargs",
    "apply_tokenizer_overrides",
    "check_model_init_kwargs",
    "from_pretrained_kwargs",
    "ATTN_IMPLEMENTATIONS",
    "MODEL_INIT_KEYS",
    "check_chat_template_path",
    "clone_chat_template",
    "cast_model",
    "check_model_folder",
    "check_tokenizer_folder",
    "load_policy",
    "adapter_base",
    "reward_model_sources",
    "enable_activation_checkpointing",
    "make_reference",
    "AdapterDisabledReference",
    "ValueModel",
    "load_reward_model",
    "reward_scores",
    "last_token_index",
]
