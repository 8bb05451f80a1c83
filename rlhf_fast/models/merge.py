"""Merging two models of one architecture, parameter by parameter: TRL's experimental
``MergeConfig`` / ``MergeModelCallback`` (``trl/experimental/merge_model_callback.py``), which
hands the work to mergekit; here the few tensor operations are our own, so nothing beyond torch
and safetensors is needed at run time.

The two models are the *policy* (the model trained) and the *target* (by default the initial
policy). The methods, as TRL configures mergekit (0.1.5, ``mergekit/merge_methods/``):

- ``linear``: (w_p·policy + w_t·target) / (w_p + w_t) (without ``normalize``: no division).
- ``ties``: TRL makes the policy mergekit's *base* model, so the one task vector is
  δ = target − policy, trimmed to its ``target_model_density`` largest magnitudes
  (mergekit's ``sparsify.magnitude``: the top k = max(1, int(density·numel)) entries), weighted
  by w_t, its sign consensus taken (``get_mask``, trivially δ's own sign with one vector) and,
  with ``normalize``, divided by the weight again: policy + trim(δ) (w_t only matters without
  ``normalize``). The policy's own weight and density belong to the base and are unused, as in
  mergekit. With TRL's defaults (target density 1) a ``ties`` merge gives the target itself.
- ``dare_ties``: as ``ties``, but δ's entries are kept at random with probability density
  (mergekit's ``sparsify.bernoulli``) and the kept ones rescaled so that δ keeps its L1 norm
  (mergekit's ``rescale`` default for dare_ties, ``RescaleNorm.l1``; mergekit before the
  ``rescale_norm`` option divided by the density instead). mergekit draws from torch's global
  generator; here each tensor draws from its own generator seeded by ``seed`` and the tensor's
  name, so a merge is reproducible and never moves the global random state (a training run's
  exact resume depends on it).
- ``slerp``: spherical interpolation of each whole tensor, flattened, from the policy
  (t = 0) to the target (t = 1) (TRL: base model = policy, the other = target); vectors whose
  normalised dot product exceeds 0.9995 in magnitude (near-colinear or antipodal) fall back to
  the linear interpolation (1 − t)·policy + t·target, as mergekit's ``slerp``.

A setting given as a list (TRL's default densities ``[1.0, 0.7, 0.1]``) is a mergekit
*gradient* over the layers: the tensor of layer i of N reads the list, linearly interpolated, at
i / (N − 1) (N = 1: at 1; N the layers of its own stack: a vision tower's blocks count apart from
the text layers, as mergekit plans each module), and the tensors outside the layers (embeddings,
final norm, head) at 0 (mergekit's ``config.evaluate_setting`` and ``plan.py``).

``dtype`` (TRL's default ``float16``): mergekit loads both models in it and writes the merge in
it; here too, with mergekit's arithmetic: linear and slerp in float32 (float64 for float64),
ties and dare_ties in the dtype itself. Merges are bit-identical to mergekit's (0.1.5, with TRL's
configurations) except dare_ties' random draws (tests/test_merge.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import zlib
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from rlhf_fast.trainers.config import typed_config

METHODS = ("linear", "ties", "dare_ties", "slerp")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
# mergekit's slerp: beyond this |cos| the two vectors are taken as colinear and interpolated linearly
DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8  # mergekit's: a norm at or below it counts as 1 (a zero vector stays zero)
RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescaling of a (near-)zero L1 norm
# TRL's MergeConfig defaults, per method (its __init__)
_DEFAULTS = {
    "linear": {"policy_model_weight": 0.5, "target_model_weight": 0.5, "normalize": True},
    "ties": {"policy_model_weight": 1.0, "target_model_weight": 1.0, "policy_model_density": [1.0, 0.7, 0.1],
             "target_model_density": [1.0], "normalize": True},
    "slerp": {"t_values": 0.5},
}
_DEFAULTS["dare_ties"] = dict(_DEFAULTS["ties"])
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")

Setting = Union[float, List[float]]


@typed_config("merge.")
@dataclasses.dataclass
class MergeConfig:
    """The ``merge`` section: TRL's ``MergeConfig`` attributes and per-method defaults (a field
    left null takes the method's default; a field the method does not use must stay null),
    plus TRL's ``MergeModelCallback`` argument ``merge_at_every_checkpoint``, ``target`` (TRL's
    ``target_model_path``: a model folder; null: the run's initial policy) and ``seed``
    (dare_ties' random drops). Densities, weights and ``t_values`` take a number or a list (a
    gradient over the layers: see the module docstring)."""

    method: str = "linear"
    policy_model_weight: Optional[Setting] = None  # linear, ties, dare_ties
    target_model_weight: Optional[Setting] = None  # linear, ties, dare_ties
    policy_model_density: Optional[Setting] = None  # ties, dare_ties (the base's: unused, as in mergekit)
    target_model_density: Optional[Setting] = None  # ties, dare_ties
    normalize: Optional[Union[bool, float]] = None  # linear, ties, dare_ties (TRL writes 1.0 for true)
    t_values: Optional[Setting] = None  # slerp: 0 the policy, 1 the target
    dtype: str = "float16"
    merge_at_every_checkpoint: bool = False
    target: Optional[str] = None
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"merge.method must be one of {list(METHODS)}, got {self.method!r}")
        used = _DEFAULTS[self.method]
        for name in ("policy_model_weight", "target_model_weight", "policy_model_density", "target_model_density",
                     "normalize", "t_values"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, used.get(name))
                continue
            if name not in used:
                users = [m for m in METHODS if name in _DEFAULTS[m]]
                raise ValueError(f"merge.{name} applies to method {' / '.join(users)}, not {self.method!r}; "
                                 "leave it null")
            setattr(self, name, _normalize_flag(value) if name == "normalize" else
                    _check_setting(f"merge.{name}", value, unit=name != "policy_model_weight"
                                   and name != "target_model_weight"))
        if self.method == "linear" and self.normalize:
            _check_weight_sum(self.policy_model_weight, self.target_model_weight)
        if self.dtype not in DTYPES:
            raise ValueError(f"merge.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.merge_at_every_checkpoint, bool):
            raise ValueError(f"merge.merge_at_every_checkpoint must be true or false, "
                             f"got {self.merge_at_every_checkpoint!r}")
        if self.target is not None and (not isinstance(self.target, str) or not self.target):
            raise ValueError(f"merge.target must be null (the initial policy) or a model folder, got {self.target!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"merge.seed must be an int in [0, 2**63), got {self.seed!r}")

    def method_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of :func:`merge_state_dicts` these settings give."""
        names = ("policy_model_weight", "target_model_weight", "policy_model_density", "target_model_density",
                 "normalize", "t_values", "dtype", "seed")
        return {"method": self.method, **{n: getattr(self, n) for n in names}}


def _normalize_flag(value) -> bool:
    # mergekit's normalize is a pydantic bool (TRL passes 1.0): 0/1 and true/false only
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"merge.normalize must be true or false (TRL's 1.0 / 0.0), got {value!r}")


def _check_setting(key: str, value, *, unit: bool) -> Setting:
    """A number or a non-empty list of numbers (a gradient), finite; in [0, 1] when ``unit``."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"{key} must be a number or a non-empty list of numbers, got {value!r}")
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or (unit and not 0.0 <= v <= 1.0):
            what = "numbers in [0, 1]" if unit else "finite numbers"
            raise ValueError(f"{key} must be a number or a list of {what}, got {value!r}")
    return [float(v) for v in items] if isinstance(value, (list, tuple)) else float(value)


def _check_weight_sum(policy_weight: Setting, target_weight: Setting) -> None:
    """A normalized linear merge divides by the sum of the two weights: refuse a sum that is 0,
    or changes sign (so is 0 somewhere), at any layer a gradient setting can reach. Both are
    piecewise linear in the layer fraction, so their list points are where to look."""
    points = {0.0, 1.0}
    for w in (policy_weight, target_weight):
        if isinstance(w, (list, tuple)) and len(w) > 1:
            points.update(i / (len(w) - 1) for i in range(len(w)))
    sums = [setting_at(policy_weight, f) + setting_at(target_weight, f) for f in sorted(points)]
    if any(v == 0 for v in sums) or min(sums) < 0 < max(sums):
        raise ValueError(f"merge.policy_model_weight + merge.target_model_weight must not be 0 at any layer with "
                         f"normalize (the merge divides by it), got {policy_weight!r} and {target_weight!r}")


def target_shapes(path: str) -> Dict[str, tuple]:
    """Each tensor's shape in the .safetensors files of the model folder ``path``, read from
    their headers (no weights loaded)."""
    from safetensors import safe_open

    shapes: Dict[str, tuple] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with _readable(os.path.join(path, name)), safe_open(os.path.join(path, name), "pt") as f:
                for k in f.keys():
                    shapes[k] = tuple(f.get_slice(k).get_shape())
    return shapes


def setting_at(setting: Setting, fraction: float) -> float:
    """mergekit's ``evaluate_setting``: a number as it is; a list linearly interpolated at
    ``fraction`` in [0, 1] of its length (index fraction·(len − 1))."""
    if not isinstance(setting, (list, tuple)):
        return float(setting)
    scaled = fraction * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


def layer_fraction(name: str, num_layers: int) -> float:
    """Where the tensor ``name`` sits for a gradient setting: i / (num_layers − 1) in layer i
    (``...layers.i.`` / ``h.i.`` / ``blocks.i.``; 1 with one layer), 0 outside the layers."""
    m = _LAYER_RE.search(name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_tensor(policy: torch.Tensor, target: torch.Tensor, policy_weight: float, target_weight: float,
                  normalize: bool = True) -> torch.Tensor:
    """mergekit's ``linear_merge`` of two tensors of one shape and floating dtype:
    (w_p·policy + w_t·target) / (w_p + w_t), the division only with ``normalize``; float32
    arithmetic (float64 for float64), returned in ``policy.dtype``."""
    if normalize and policy_weight + target_weight == 0:
        raise ValueError(f"merge: with normalize the weights must not sum to 0, got {policy_weight} and "
                         f"{target_weight}")
    work = _work_dtype(policy.dtype)
    # mergekit's weights are a tensor of the working dtype, summed there for the division
    w = torch.tensor([policy_weight, target_weight], dtype=work)
    out = torch.zeros_like(policy, dtype=work)
    out.addcmul_(policy, w[0])
    out.addcmul_(target, w[1])
    if normalize:
        out.div_(w.sum())
    return out.to(policy.dtype)


def magnitude_sparsify(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's ``sparsify.magnitude`` (no rescale): ``delta`` with all but its
    max(1, int(density·numel)) largest magnitudes zeroed; unchanged at density ≥ 1, zero at 0."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return delta * mask.reshape_as(delta)


def random_sparsify(delta: torch.Tensor, density: float, generator: Optional[torch.Generator] = None
                    ) -> torch.Tensor:
    """mergekit's ``sparsify.bernoulli`` with its L1 rescale (DARE): each entry of ``delta`` kept
    with probability ``density`` (a Bernoulli draw from ``generator``, torch's global one when
    None, in float32 — bfloat16 for bfloat16 — as mergekit on the CPU), the kept ones scaled by
    ‖delta‖₁ / ‖kept‖₁ (not when either is below 1e-7); returned in ``delta.dtype``;
    unchanged at density ≥ 1."""
    if density >= 1:
        return delta
    work = torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32
    if delta.dtype == torch.float64:
        work = torch.float64
    keep = torch.bernoulli(torch.full_like(delta, density, dtype=work), generator=generator)
    x = delta.to(work)
    kept = x * keep
    before, after = x.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept.to(delta.dtype)
    return (kept * (before / after)).to(delta.dtype)


def ties_tensor(policy: torch.Tensor, target: torch.Tensor, weight: float, density: float, normalize: bool = True,
                *, dare: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """mergekit's ``GeneralizedTaskArithmeticMerge.merge_group`` for ``ties`` (``dare``: for
    ``dare_ties``) with the policy as base and the target as the one other model: δ = target −
    policy sparsified (magnitude, or random with rescale), times ``weight``, its sign-consensus
    mask (``get_mask`` "sum"), divided by the masked weight with ``normalize``, added to the
    policy. Same shape; computed in ``policy.dtype`` itself, as mergekit does (a float32
    δ could keep other entries than mergekit's float16 one where magnitudes nearly tie)."""
    dtype = policy.dtype
    delta = target.to(dtype) - policy
    delta = random_sparsify(delta, density, generator) if dare else magnitude_sparsify(delta, density)
    # 0-dim (mergekit's weight broadcasts over its task-vector axis, which it sums away): a
    # scalar parameter keeps its shape
    w = torch.tensor(weight, dtype=dtype)
    delta = delta * w
    # get_mask "sum" over the task vectors: here one, whose entries agree with themselves unless 0
    majority = (delta >= 0).to(dtype) * 2 - 1
    mask = delta.sign().to(dtype) == majority
    mixed = delta * mask
    if normalize:
        divisor = w * mask
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return (policy + mixed).to(dtype)


def slerp_tensor(t: float, policy: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mergekit's ``slerp`` of two tensors of one shape, each taken whole as one vector: from
    ``policy`` (t = 0) to ``target`` (t = 1) along the great circle of their directions, with
    coefficients sin((1 − t)θ)/sin θ and sin(tθ)/sin θ on the unnormalised tensors, θ the
    angle between them; linear interpolation when |cos θ| > 0.9995. Float32 arithmetic
    (float64 for float64), returned in ``policy.dtype``."""
    work = _work_dtype(policy.dtype)
    a = policy.reshape(-1).to(work)
    b = target.reshape(-1).to(work)
    if a.numel() == 0:
        return policy.clone()
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > SLERP_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > SLERP_EPS, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    t = torch.tensor(t, dtype=work)  # mergekit's t is a tensor of the working dtype
    if dot.abs() > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t) * theta) / sin_theta
        coef_b = torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(policy.shape).to(policy.dtype)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """The CPU generator of the random drops of tensor ``name``: seeded by ``seed`` and the
    name, so each tensor's mask is the same whatever the order or subset merged."""
    g = torch.Generator()
    g.manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2 ** 63)
    return g


def merge_state_dicts(policy: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                      method: str = "linear", *, policy_model_weight: Optional[Setting] = None,
                      target_model_weight: Optional[Setting] = None, policy_model_density: Optional[Setting] = None,
                      target_model_density: Optional[Setting] = None, normalize: Optional[bool] = None,
                      t_values: Optional[Setting] = None, dtype: str = "float16", seed: int = 0,
                      num_layers: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Merge two state dicts with the same keys and shapes, tensor by tensor (see the module
    docstring; settings as :class:`MergeConfig`, null: the method's TRL default).

    Each floating tensor (any shape, any float dtype) is first cast to ``dtype`` (as mergekit
    loads it) and merged into a new CPU tensor of that dtype; a non-floating tensor (an integer
    buffer) must be equal in both and is copied. ``num_layers`` (for list settings; null: each
    layer stack's own count, :func:`layer_stacks`, so a vision tower's blocks and the text
    layers each span the whole gradient, as mergekit's modules) places each tensor on the layer
    gradient. Returns a new dict in ``policy``'s key order. ValueError naming the first key
    that differs."""
    cfg = MergeConfig(method=method, policy_model_weight=policy_model_weight, target_model_weight=target_model_weight,
                      policy_model_density=policy_model_density, target_model_density=target_model_density,
                      normalize=normalize, t_values=t_values, dtype=dtype, seed=seed)
    check_same_keys(policy, target)
    out_dtype = DTYPES[cfg.dtype]
    stacks = layer_stacks(policy)
    merged = {}
    for name, p in policy.items():
        t = target[name]
        if not p.is_floating_point():
            if not torch.equal(p.cpu(), t.cpu()):
                raise ValueError(f"merge: the non-floating tensor {name!r} differs between the two models")
            merged[name] = p.detach().cpu().clone()
            continue
        merged[name] = _merge_tensor(cfg, name, p.detach().to("cpu", out_dtype), t.detach().to("cpu", out_dtype),
                                     _stack_fraction(name, stacks, num_layers))
    return merged


def layer_stacks(names) -> Dict[str, int]:
    """``{stack: layers}``: each layer stack among the tensor ``names`` (a name up to its layer
    index: ``model.layers.``, a vision tower's ``visual.blocks.``) and its layer count, the
    largest index + 1."""
    stacks: Dict[str, int] = {}
    for name in names:
        m = _LAYER_RE.search(name)
        if m:
            stack = name[:m.start(1)]
            stacks[stack] = max(stacks.get(stack, 0), int(m.group(1)) + 1)
    return stacks


def _stack_fraction(name: str, stacks: Dict[str, int], num_layers: Optional[int]) -> float:
    """:func:`layer_fraction` of ``name`` in its own stack (mergekit plans each module's layers on
    its own gradient), or over ``num_layers`` when given, at most 1 (an index past it reads
    the gradient's end, never past its list)."""
    m = _LAYER_RE.search(name)
    if m is None:
        return 0.0
    return min(1.0, layer_fraction(name, stacks[name[:m.start(1)]] if num_layers is None else num_layers))


def _merge_tensor(cfg: MergeConfig, name: str, p: torch.Tensor, t: torch.Tensor, where: float) -> torch.Tensor:
    if cfg.method == "slerp":
        return slerp_tensor(setting_at(cfg.t_values, where), p, t)
    if cfg.method == "linear":
        return linear_tensor(p, t, setting_at(cfg.policy_model_weight, where),
                             setting_at(cfg.target_model_weight, where), cfg.normalize)
    dare = cfg.method == "dare_ties"
    return ties_tensor(p, t, setting_at(cfg.target_model_weight, where), setting_at(cfg.target_model_density, where),
                       cfg.normalize, dare=dare, generator=tensor_generator(cfg.seed, name) if dare else None)


def _shape(v) -> tuple:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def check_same_keys(policy: Mapping[str, Any], target: Mapping[str, Any]) -> None:
    """ValueError naming the first tensor that one of the two state dicts (of tensors, or of
    shapes: :func:`target_shapes`) lacks or that has another shape in the other (the two models
    must be of one architecture and size)."""
    for name in policy:
        if name not in target:
            raise ValueError(f"merge: the target model has no tensor {name!r} (the two models must have the "
                             "same architecture)")
        if _shape(policy[name]) != _shape(target[name]):
            raise ValueError(f"merge: tensor {name!r} is {_shape(policy[name])} in the policy but "
                             f"{_shape(target[name])} in the target (same architecture and vocabulary needed)")
    for name in target:
        if name not in policy:
            raise ValueError(f"merge: the policy model has no tensor {name!r} (the two models must have the "
                             "same architecture)")


def unique_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` without the later names of a storage shared with an earlier one (tied
    embeddings: ``lm_head.weight`` after ``model.embed_tokens.weight``), as ``save_pretrained``
    writes a model."""
    seen, out = set(), {}
    for name, v in state.items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = v
    return out


# ---- model folders ----------------------------------------------------------------------------------

_WEIGHT_FILE_RE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.safetensors\.index\.json|\.bin\.index\.json)$")


def check_model_dir(path: str, key: str) -> None:
    """ValueError naming ``key`` unless ``path`` is a folder with config.json and .safetensors weights."""
    if not isinstance(path, str) or not os.path.isdir(path):
        raise ValueError(f"{key} must be a model folder (save_pretrained output); {path!r} is not a folder")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):  # a LoRA run's final/
        raise ValueError(f"{key}: {path} holds a peft (LoRA) adapter, not a model: merge it into its base first "
                         "(peft's merge_and_unload, then save_pretrained) and merge that folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{key}: {path} has no config.json (not a save_pretrained model folder)")
    if not any(n.endswith(".safetensors") for n in os.listdir(path)):
        raise ValueError(f"{key}: {path} has no .safetensors weights (only safetensors folders can be merged)")


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of the .safetensors files of the model folder ``path`` (one or sharded), on the CPU."""
    from safetensors.torch import load_file

    sd: Dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with _readable(os.path.join(path, name)):
                sd.update(load_file(os.path.join(path, name)))
    return sd


@contextlib.contextmanager
def _readable(file: str):
    """Context: safetensors' error reading ``file`` (a torn download, another format) as a
    ValueError naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file}: not a readable safetensors file ({why})") from None


def config_num_layers(config: Mapping[str, Any]) -> Optional[int]:
    """The number of layers a model's config.json (a dict) gives (its text config's for a
    multimodal model); None when it names none."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = config.get(key)
        if isinstance(v, int) and v > 0:
            return v
    text = config.get("text_config")
    return config_num_layers(text) if isinstance(text, dict) else None


def write_merged_folder(out_dir: str, state: Mapping[str, torch.Tensor], write_rest) -> None:
    """Write the model folder ``out_dir`` atomically: ``state`` as model.safetensors and
    ``write_rest(tmp)`` (config, tokenizer) into a temporary sibling, which then replaces
    ``out_dir`` (a crash leaves the old folder or the new one there, never a half-written one)."""
    from safetensors.torch import save_file

    from rlhf_fast.trainers.checkpoint import replace_folder

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        write_rest(tmp)
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def merge_model_folders(policy_dir: str, target_dir: str, out_dir: str, config: Optional[MergeConfig] = None, *,
                        overwrite: bool = False) -> Dict[str, Any]:
    """Merge the save_pretrained folders ``policy_dir`` and ``target_dir`` (safetensors, same
    architecture) by ``config`` (a :class:`MergeConfig`; None: its defaults, TRL's linear 0.5 /
    0.5 in float16) into the model folder ``out_dir``: model.safetensors in ``config.dtype``,
    the policy's config.json with that dtype, and the policy folder's other files (tokenizer,
    generation config, chat template) copied, as mergekit's ``copy_tokenizer``. An existing
    non-empty ``out_dir`` is replaced only with ``overwrite``. Returns a summary
    ``{"tensors": n, "parameters": n, "dtype": name, "method": name}``."""
    config = MergeConfig() if config is None else config
    if not isinstance(config, MergeConfig):
        raise TypeError(f"config must be a MergeConfig, got {type(config).__name__}")
    check_model_dir(policy_dir, "policy")
    check_model_dir(target_dir, "target")
    from rlhf_fast.trainers.config import check_output_path, path_inside

    check_output_path(out_dir, "out_dir", folder=True)
    for key, src in (("policy", policy_dir), ("target", target_dir)):
        # (a folder inside it is fine: TRL writes checkpoint-N/merged)
        rel = path_inside(src, out_dir)  # links followed
        if rel == os.curdir:
            raise ValueError(f"out_dir {out_dir!r} must not be the {key} folder itself")
        if rel is not None:  # replacing out_dir would delete the model being merged
            raise ValueError(f"out_dir {out_dir!r} holds the {key} folder ({src}): write the merge elsewhere")
    if os.path.isfile(out_dir) or (os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite):
        raise ValueError(f"out_dir {out_dir!r} exists and is not empty (pass --overwrite to replace it)")
    with open(os.path.join(policy_dir, "config.json"), encoding="utf-8") as f:
        model_config = json.load(f)
    merged = merge_state_dicts(read_state_dict(policy_dir), read_state_dict(target_dir),
                               **config.method_kwargs())  # (each layer stack on its own gradient)

    def rest(tmp: str) -> None:
        for name in sorted(os.listdir(policy_dir)):
            src = os.path.join(policy_dir, name)
            if os.path.isfile(src) and name != "config.json" and not _WEIGHT_FILE_RE.search(name):
                shutil.copy2(src, os.path.join(tmp, name))
        cfg = dict(model_config)
        cfg["dtype"] = config.dtype  # what from_pretrained(dtype="auto") loads it as
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = config.dtype
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")

    write_merged_folder(out_dir, merged, rest)
    return {"tensors": len(merged), "parameters": sum(v.numel() for v in merged.values()), "dtype": config.dtype,
            "method": config.method}


__all__ = ["MergeConfig", "METHODS", "DTYPES", "merge_state_dicts", "merge_model_folders", "linear_tensor",
           "ties_tensor", "slerp_tensor", "magnitude_sparsify", "random_sparsify", "setting_at", "layer_fraction",
           "tensor_generator", "layer_stacks", "check_same_keys", "unique_state_dict", "read_state_dict",
           "write_merged_folder", "check_model_dir", "config_num_layers"]
