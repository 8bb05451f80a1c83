"""Custom rollout functions: TRL GRPOTrainer's ``rollout_func``.

A user's function replaces generation: ``rollout_func(prompts, trainer) -> dict`` receives this
process's prompts as the data gives them (chat messages kept; each prompt repeated
``group_size`` times, consecutive, one answer per entry) and the trainer, and returns
``prompt_ids``, ``completion_ids`` and ``logprobs`` (one list per row; one log-prob per
completion token, the sampler's; None: unknown, the trainer scores them), optionally ``env_mask`` (per completion token: 1 a model
token, 0 an environment / tool token kept as context but out of every loss) and any other keys,
which reach the reward functions as per-row fields (a list: one value per row; anything else:
the same value for every row). External vLLM servers, agent loops and OpenEnv integrations
bring such functions.

Read top to bottom: loading the function (``module:function``) → checking what it returned
(:func:`check_output`, every bad value a ValueError naming the key and the row) → the
:class:`~rlhf_fast.rollout.types.RolloutBatch` (:func:`rollout_batch`: left-padded prompts,
right-padded completions, ``env_mask`` zeros as holes in ``response_mask``, built with the
tool rollout's row packer).
"""

from __future__ import annotations

import math
import numbers
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .types import RolloutBatch

# TRL GRPOTrainer._generate's required keys (and its error message below)
REQUIRED_KEYS = ("prompt_ids", "completion_ids", "logprobs")
# names the reward functions already receive (ours or TRL's convention), or that TRL drops from the
# dataset columns: a field of that name would be lost or collide
RESERVED_KEYS = ("prompt", "prompts", "completion", "completions", "completion_ids", "completion_messages",
                 "trainer_state", "log_extra", "log_metric", "environments")


def load_rollout_func(spec: str, key: str = "rollout.rollout_func") -> Callable:
    """The callable of a ``module:function`` (or ``path/to/file.py:function``) import path; a
    path that does not import is a ValueError naming ``key``."""
    from rlhf_fast.algorithms import load_callable

    try:
        return load_callable(spec, what="rollout function")
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{key}: expected 'module:function' or 'file.py:function' naming a rollout function, "
                         f"got {spec!r} ({e})") from None


def _from_numpy(v):
    """A numeric / bool numpy array as a tensor (TRL builds its tensors with ``torch.tensor(ids)``,
    which takes them: ``return_tensors="np"`` ids); anything else as it is."""
    if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
        return torch.from_numpy(np.ascontiguousarray(v))
    return v


def _int_list(v, key: str, row: int, vocab_size: Optional[int]) -> List[int]:
    v = _from_numpy(v)
    if isinstance(v, torch.Tensor):
        if v.dim() != 1 or v.dtype.is_floating_point or v.dtype == torch.bool:
            raise ValueError(f"{key}[{row}] must be a 1-D list of int token ids, got a tensor of shape "
                             f"{tuple(v.shape)} and dtype {v.dtype}")
        v = v.tolist()
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise ValueError(f"{key}[{row}] must be a list of int token ids, got {type(v).__name__}")
    for t in v:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise ValueError(f"{key}[{row}] must hold int token ids, got {t!r} ({type(t).__name__})")
        # an id outside the embedding table fails deep in torch (a device-side assert on a GPU)
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise ValueError(f"{key}[{row}] holds token id {int(t)}: token ids must be ints in [0, {vocab_size}) "
                             f"(the policy's vocabulary)")
    return [int(t) for t in v]


def _float_list(v, key: str, row: int, length: int) -> List[float]:
    v = _from_numpy(v)
    if isinstance(v, torch.Tensor):
        v = v.flatten().tolist() if v.dim() <= 1 else v
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise ValueError(f"{key}[{row}] must be a list of floats (one log-prob per completion token), "
                         f"got {type(v).__name__}")
    if len(v) != length:
        raise ValueError(f"{key}[{row}] has {len(v)} values; completion_ids[{row}] has {length} tokens "
                         f"(one log-prob per completion token)")
    for j, x in enumerate(v):
        # (vLLM writes None for a NaN log-prob; TRL then skips that token's correction, we refuse it)
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
            raise ValueError(f"{key}[{row}][{j}] must be a finite float log-prob, got {x!r}")
    return [float(x) for x in v]


def _mask_list(v, key: str, row: int, length: int) -> List[int]:
    v = _from_numpy(v)
    if isinstance(v, torch.Tensor):
        v = v.flatten().tolist() if v.dim() <= 1 else v
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise ValueError(f"{key}[{row}] must be a list of 0/1 (one per completion token), got {type(v).__name__}")
    if len(v) != length:
        raise ValueError(f"{key}[{row}] has {len(v)} values; completion_ids[{row}] has {length} tokens "
                         f"(1: a model token, 0: an environment token, one per completion token)")
    if any(x not in (0, 1) for x in v):
        bad = next(x for x in v if x not in (0, 1))
        raise ValueError(f"{key}[{row}] must hold 0 or 1 (1: a model token, 0: an environment token), got {bad!r}")
    return [int(x) for x in v]


def _rows(out: Mapping, name: str, n_rows: int, key: str) -> Sequence:
    v = _from_numpy(out[name])
    if isinstance(v, torch.Tensor) and v.dim() >= 1:  # (a [B, T] tensor's rows, as TRL's torch.tensor(ids) takes)
        v = list(v)
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise ValueError(f"{key} returned {name!r} as {type(v).__name__}; expected a list with one entry per row")
    if len(v) != n_rows:
        raise ValueError(f"{key} returned {len(v)} rows in {name!r}; expected {n_rows}, one per prompt it was "
                         f"given (each prompt repeated group_size times)")
    return v


def check_output(out: Any, n_rows: int, *, vocab_size: Optional[int] = None, max_new_tokens: Optional[int] = None,
                 max_length: Optional[int] = None, key: str = "rollout_func") -> tuple:
    """What a rollout function returned for ``n_rows`` prompts, checked and as plain lists:
    ``(prompt_ids, completion_ids, logprobs or None, env_mask or None, fields)`` —
    ``list[list[int]]``, ``list[list[int]]``, ``list[list[float]]`` or None, ``list[list[int]]``
    or None, ``dict[str, list]``.

    ``prompt_ids`` / ``completion_ids``: one list of int ids in ``[0, vocab_size)`` per row
    (tensors and numpy arrays are read as lists), a prompt at least one token, a completion at most
    ``max_new_tokens`` (longer ones are refused: the loss normalisers and the model's positions
    are sized by it; TRL does not cut them), prompt and completion together at most
    ``max_length`` (the policy's positions); ``logprobs`` one finite float per completion
    token, or None as a whole (TRL's: no sampler log-probs; the caller scores them);
    ``env_mask`` 0/1 per completion token (None: none, as TRL). ``fields``: the other
    keys, name → ``n_rows`` values (a list as it is; anything else repeated for every row, as
    TRL merges them).
    Missing keys raise TRL's message; every other fault a ValueError naming the key and row."""
    if not isinstance(out, Mapping):
        raise TypeError(f"{key} must return a dict with keys {list(REQUIRED_KEYS)}, got {type(out).__name__}")
    missing = sorted(set(REQUIRED_KEYS) - set(out.keys()))
    if missing:
        raise ValueError(f"rollout_func must return keys {missing} in its output dict.")
    prompts, completions = (_rows(out, name, n_rows, key) for name in ("prompt_ids", "completion_ids"))
    # (TRL accepts logprobs None: no importance-sampling correction, its old log-probs by a forward)
    logps = None if out["logprobs"] is None else _rows(out, "logprobs", n_rows, key)
    p_ids = [_int_list(p, "prompt_ids", i, vocab_size) for i, p in enumerate(prompts)]
    for i, p in enumerate(p_ids):
        if not p:
            raise ValueError(f"prompt_ids[{i}] is empty; every prompt must have at least one token")
    c_ids = [_int_list(c, "completion_ids", i, vocab_size) for i, c in enumerate(completions)]
    for i, c in enumerate(c_ids):
        if max_new_tokens is not None and len(c) > max_new_tokens:
            raise ValueError(f"completion_ids[{i}] has {len(c)} tokens, more than rollout.max_new_tokens "
                             f"({max_new_tokens}); raise rollout.max_new_tokens or cut the completions in {key}")
        if max_length is not None and len(p_ids[i]) + len(c) > max_length:
            raise ValueError(f"prompt_ids[{i}] and completion_ids[{i}] are {len(p_ids[i]) + len(c)} tokens, more "
                             f"than the policy's {max_length} positions (max_position_embeddings)")
    lp = None if logps is None else [_float_list(v, "logprobs", i, len(c))
                                     for i, (v, c) in enumerate(zip(logps, c_ids))]
    env = None
    if out.get("env_mask") is not None:  # (None: no mask, as TRL's extra_fields.pop("env_mask", None))
        masks = _rows(out, "env_mask", n_rows, key)
        env = [_mask_list(v, "env_mask", i, len(c)) for i, (v, c) in enumerate(zip(masks, c_ids))]
    fields = {}
    for name, v in out.items():
        if name in REQUIRED_KEYS or name == "env_mask":
            continue
        if not isinstance(name, str) or not name or name in RESERVED_KEYS or name.startswith("_"):
            raise ValueError(f"{key} returned the key {name!r}: extra keys reach the reward functions as keyword "
                             f"fields, and {sorted(RESERVED_KEYS)} (and names starting with '_') are theirs already")
        if isinstance(v, list):  # (TRL: a list is per row, anything else the same for every row)
            if len(v) != n_rows:
                raise ValueError(f"{key} returned {len(v)} values in {name!r}; a list is one value per row "
                                 f"({n_rows}); give a non-list value to pass the same one to every row")
            fields[name] = list(v)
        else:
            fields[name] = [v] * n_rows
    return p_ids, c_ids, lp, env, fields


def _left_padded(prompts: List[List[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[B, P]`` ids and attention mask of ``prompts`` left-padded to the longest."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    am = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        am[i, P - len(p):] = 1
    return ids, am


def rollout_batch(out: Any, prompt_texts: Sequence[str], group_size: int, *, tokenizer, pad_id: int,
                  stop_ids: Sequence[int], vocab_size: Optional[int] = None, max_new_tokens: Optional[int] = None,
                  max_length: Optional[int] = None, elapsed: float = 0.0, key: str = "rollout_func",
                  score: Optional[Callable[[RolloutBatch], torch.Tensor]] = None
                  ) -> Tuple[RolloutBatch, Dict[str, List]]:
    """A rollout function's output ``out`` (:func:`check_output`) as a RolloutBatch of
    ``len(prompt_texts)`` rows, each group of ``group_size`` consecutive rows one prompt, and its
    extra fields (name → one value per row).

    input_ids ``[B, P+R]`` int64: the returned prompt ids left-padded with ``pad_id``, then the
    completion ids right-padded; attention 1 on both; ``response_mask`` 1 on the completion
    tokens, 0 where ``env_mask`` is 0 (holes: context the policy reads, out of every loss);
    ``behaviour_logp`` ``[B, P+R]`` float32 the returned log-probs, 0 on holes — with
    ``logprobs`` None, ``score(batch)`` (``[B, P+R]``: the policy's log-probs by a scoring
    forward, TRL's recomputed old log-probs) on the response tokens, 0 without ``score``;
    ``response_texts`` the whole completions decoded without special tokens (environment tokens
    included, as TRL's ``completions``); ``finish_reasons`` "stop" when a completion ends in one
    of ``stop_ids`` (TRL's eos ids and pad id) or is empty, else "length";
    ``num_generated_tokens`` the model's tokens; ``tokens_per_second`` over ``elapsed``."""
    from .tools import _pack, _Row

    B = len(prompt_texts)
    if group_size < 1 or B % group_size:
        raise ValueError(f"prompt_texts ({B}) must be whole groups of group_size ({group_size}) rows")
    p_ids, c_ids, logps, env, fields = check_output(out, B, vocab_size=vocab_size, max_new_tokens=max_new_tokens,
                                                    max_length=max_length, key=key)
    stops = set(int(t) for t in stop_ids)
    # (TRL's is_truncated: `ids[-1] not in eos_and_pad`; an empty completion, where TRL fails, was not cut)
    reasons = ["stop" if not c or c[-1] in stops else "length" for c in c_ids]
    ids, am = _left_padded(p_ids, pad_id)
    zeros = torch.zeros_like(am)
    first = RolloutBatch(input_ids=ids, attention_mask=am, response_mask=zeros, behaviour_logp=zeros.float(),
                         prompt_texts=list(prompt_texts), response_texts=[""] * B,
                         group_index=torch.arange(B // group_size).repeat_interleave(group_size),
                         num_generated_tokens=0, tokens_per_second=0.0, prompt_length=ids.shape[1],
                         finish_reasons=reasons)
    rows = [_Row(prompt=p, ids=c, mask=env[i] if env is not None else [1] * len(c),
                 logp=logps[i] if logps is not None else [0.0] * len(c), reason=r, messages=[], grown=True)
            for i, (p, c, r) in enumerate(zip(p_ids, c_ids, reasons))]
    batch = _pack(first, rows, tokenizer, pad_id, elapsed)
    if logps is None and score is not None:
        rm = batch.response_mask
        batch.behaviour_logp = score(batch).float().to(rm.device) * rm
    return batch, fields


def run_rollout_func(fn: Callable, prompts: List[Any], trainer, prompt_texts: Sequence[str], group_size: int,
                     **kw) -> Tuple[RolloutBatch, Dict[str, List]]:
    """Call ``fn(prompts, trainer)`` (``prompts``: one entry per row, as the data gives them) and
    return :func:`rollout_batch` of its output, timed."""
    t0 = time.perf_counter()
    out = fn(prompts, trainer)
    return rollout_batch(out, prompt_texts, group_size, elapsed=time.perf_counter() - t0, **kw)


__all__ = ["REQUIRED_KEYS", "RESERVED_KEYS", "check_output", "load_rollout_func", "rollout_batch",
           "run_rollout_func"]
