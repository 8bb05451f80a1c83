"""On-policy distillation: TRL 1.16's ``DistillationTrainer`` on the RL trainer's machinery.

Python API::

    from rlhf_fast.trainers.distill import DistillationTrainer
    from rlhf_fast.trainers.rl_config import DistillConfig, RLConfig
    cfg = RLConfig(estimator="distill", distill=DistillConfig(teacher="path/to/teacher", beta=1.0))
    DistillationTrainer(cfg).train()            # or DistillationTrainer(cfg, teacher_model=model)

One step: the student (the policy) answers ``rollout.prompts_per_step`` prompts
``rollout.group_size`` times with the RL trainer's rollout engine (chat templates, tools,
environments, stop strings, seeds) → reward sources, when any, are scored and logged only →
``ppo.epochs`` passes over mini-batches of ``ppo.mini_batch_size`` rows, micro-batches of
``ppo.micro_batch_size``: the student's and the teacher's (no grad) last hidden states at the
positions that predict the answer tokens, and their LM heads, go to
:func:`rlhf_fast.ops.fused_linear_divergence` (never holding the ``[N, V]`` logits), summed
and divided by the answer tokens of the whole mini-batch on every rank (TRL's
``num_items_in_batch``: micro-batching never changes the gradient). Tool results are context,
out of the loss. Evaluation, checkpoints and exact resume, ``num_train_epochs``, LoRA, DDP /
FSDP2 are the RL trainer's; the teacher is never checkpointed (a resume rebuilds it from
``distill.teacher``).

GKD (TRL's experimental ``GKDTrainer``): with ``distill.lmbda`` < 1 each micro-batch of a step
(``ppo.micro_batch_size`` rows of this rank's answers: TRL draws in ``training_step``, once per
micro-batch under gradient accumulation) is on-policy with probability lmbda
(:func:`gkd_on_policy`, TRL's ``random.random() <= lmbda`` with a draw seeded by the run's seed,
the step and the micro-batch; :meth:`DistillationTrainer._step_batch`); the other micro-batches
train on the data's completions (each training
record's ``completion``, tokenized after the prompt as the rollout engine encodes it:
:meth:`DistillationTrainer.completion_ids`) or, with ``distill.seq_kd``, on answers the teacher
samples through a rollout engine of its own. The loss is the same on every kind of step. GKD's
``generalized_jsd_loss`` has our ``beta`` (0 forward KL(teacher ‖ student), 1 reverse) and our
reduction (its ``batchmean`` with labels is the sum over the completion tokens / their count, per
token); it differs in the temperature: GKD's ``compute_loss`` leaves the logits at temperature 1
whatever its sampling ``temperature``, ours divides both by ``rollout.temperature`` (TRL's
DistillationTrainer) — equal at temperature 1. ``num_tokens`` (TRL's metric): the prompt and
answer tokens of every step so far on every rank (tool results out), checkpointed.

IW-OPD (TRL's experimental ``IWOPDTrainer``, ``distill.objective: iw_opd``): in place of the
divergence, the sampled-token policy gradient of :func:`iw_opd_token_loss` (TRL's
``_compute_iw_opd_loss``): both models' log-probs of the answer tokens at ``rollout.temperature``
from :func:`rlhf_fast.ops.fused_linear_logprobs` (:func:`iw_opd_loss`), the advantage the teacher's
minus the sampler's (the rollout's ``behaviour_logp``, under the processed distribution as TRL's
vLLM ``rollout_logprobs``), its prefix weights per answer over the loss tokens (tool results
out), the same normaliser, prefix sharing and DDP / FSDP2. Evaluation has no sampler log-probs
(TRL's has none either): the student's own. TRL's ``iw_opd/*`` metrics are the mean over the
update's micro-batches (every rank's) of each micro-batch's value, as TRL averages its per-call lists.

Heads that transform their logits after the matmul (Gemma 2/3's ``final_logit_softcapping``,
Cohere's ``logit_scale``, Granite's ``logits_scaling``: :func:`head_transform`, read as TRL reads
them) cannot go through the fused op: when either model's head is one, the divergence is taken
from both models' logits (:func:`transformed_divergence`, ``distill.chunk_size`` rows at a time,
each chunk recomputed in the backward), equal to TRL's ``_chunked_divergence_loss`` with its
scale and softcap arguments. Plain heads keep the fused op.

Data: GKD's conversational records ``{"messages": [...]}`` (no ``prompt``) read as
``{prompt: messages[:-1], completion: [messages[-1]]}`` (:func:`messages_record`; the last message
must be the assistant's), wherever the RL trainer reads prompt records (``prompts`` /
``eval_prompts``, ``data.prompts`` / ``data.eval_prompts``, .jsonl / .parquet ``data.prompts_file`` /
``data.eval_prompts_file``, and ``rlhf-fast eval --run``): :attr:`RLTrainer.convert_record`.

``ppo.prefix_sharing``: each prompt computed once per group of its ``rollout.group_size``
answers — the update's shuffle permutes whole groups, each micro-batch is one shared-prefix row of
its groups (:func:`rlhf_fast.models.logprobs.pack_shared_targets`) on which the student's
backbone runs forward and backward and the teacher's forward, and evaluation shares the same way;
the divergence takes the same states as the padded path (equal up to float rounding). The
off-policy steps' rows are grouped as the student's (each prompt's ``group_size`` rows
consecutive; a group of the data's identical completions is one sequence). Both models need a
fusable LM head and a backbone llama_forward computes (no peft, not the torch backend): refused
at the start.

GOLD (TRL's experimental ``GOLDTrainer``, ``distill.use_uld_loss``): a teacher with another
tokenizer (``distill.teacher_tokenizer``). Per micro-batch the student's answers are decoded to text
and re-tokenized by the teacher's tokenizer (:func:`rlhf_fast.algorithms.uld.teacher_inputs`, TRL's
``build_teacher_inputs_from_texts``), both backbones run, and TRL's ULD loss (byte-offset alignment,
merging, sorted L1 or the hybrid matched-vocabulary JSD) comes from
:func:`rlhf_fast.algorithms.uld.chunked_uld_loss`, a few answers' logits at a time, each chunk
recomputed in the backward (:meth:`DistillationTrainer.uld_loss`). Logged: ``loss`` (TRL's),
``distill/divergence`` (its distillation part), ``entropy`` and, hybrid, TRL's ``matched_loss`` /
``unmatched_loss`` (the mean over the answers; TRL logs the last answer's of each batch).

Vocabulary: the divergence compares the two heads row by row, so they must have the same
number of rows. Real checkpoints pad their heads past the tokenizer to different multiples
(Qwen2.5-0.5B 151936 rows, Qwen2.5-7B 152064, one 151665-token tokenizer): when the heads
differ but both cover the tokenizer, only the tokenizer's rows are compared (the padding rows
map to no token; the student's mass on its own padding rows is left out of its
distribution). Heads that do not cover the tokenizer are refused. The sampler (the student, or
the teacher with ``seq_kd``) still draws from its whole head: an answer ends before a token past
the tokenizer (:func:`cut_unknown_tokens`), which the other model's embedding may not hold;
with ULD, before a token past the student's tokenizer (no token piece to align).
"""

from __future__ import annotations

import json
import os
import random
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from rlhf_fast import ops
from rlhf_fast.models import lm_head
from rlhf_fast.models.lm_head import HeadTransform, head_logits
from rlhf_fast.trainers.rl import (RLTrainer, RolloutTensors, _chat_or_text, _micro_batches, _packing_key,
                                   with_estimator)
from rlhf_fast.trainers.rl_config import DISTILL, RLConfig

# the field of a training record that holds its completion (SFT's prompt-completion format)
COMPLETION_KEY = "completion"

# the field of GKD's conversational records (TRL's DataCollatorForChatML): the prompt's turns, then the answer
MESSAGES_KEY = "messages"

# update statistics under TRL DistillationTrainer's metric names (ours where TRL has none)
_RENAMED = {"policy/loss": "loss", "policy/entropy": "entropy", "policy/divergence": "distill/divergence",
            "policy/grad_norm": "grad_norm", "policy/matched_loss": "matched_loss",
            "policy/unmatched_loss": "unmatched_loss"}


def gkd_uniform(seed: int, step: int, micro: int = 0) -> float:
    """The uniform number in [0, 1) that picks the kind of micro-batch ``micro`` of step
    ``step`` (GKD's ``random.random()``, one per ``training_step``, i.e. per micro-batch): a
    function of the run's ``seed``, the step and the micro-batch alone — the same on every rank
    (as TRL's, seeded alike on every process), and after a resume — from a generator of its own
    (Python's, as TRL's), so no other random stream moves. (Micro-batch 0 keeps the key of the
    former per-step draw: a step of one micro-batch draws as before.)"""
    return random.Random(f"rlhf_fast.distill.lmbda:{seed}:{step}" + (f":{micro}" if micro else "")).random()


def gkd_on_policy(seed: int, step: int, lmbda: float, micro: int = 0) -> bool:
    """Whether micro-batch ``micro`` of step ``step`` trains on the student's own answers: TRL
    GKDTrainer.training_step's ``random.random() <= self.lmbda`` with :func:`gkd_uniform`.
    ``lmbda`` 1 draws nothing (every micro-batch is on-policy, as that rule gives)."""
    return lmbda >= 1.0 or gkd_uniform(seed, step, micro) <= lmbda


def messages_record(item, key: str = "prompt", where: str = "record"):
    """A training record of TRL GKD's conversational format, ``{"messages": [...]}`` without a
    ``key`` field (the prompt), as the prompt-completion record the trainer reads: ``{key:
    messages[:-1], "completion": [messages[-1]], **other fields}`` — GKD's collator
    (``DataCollatorForChatML``) trains on the last message, the assistant's answer, after the
    rest. Any other item (text, a chat, a record with a ``key`` field) comes back as it is.
    ValueError naming ``where`` when the messages are not a list of ``{role, content}`` messages,
    hold no message before the answer, end in a turn other than the assistant's, or the record
    also has a ``completion``."""
    if not (isinstance(item, dict) and MESSAGES_KEY in item and key not in item):
        return item
    msgs = item[MESSAGES_KEY]
    if not (isinstance(msgs, list) and _chat_or_text(msgs)):
        raise ValueError(f"{where}: {MESSAGES_KEY!r} must be a non-empty list of {{role, content}} messages "
                         f"(text content), got {type(msgs).__name__}")
    if msgs[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last of its {MESSAGES_KEY!r} must be the assistant's answer (the completion "
                         f"distillation trains on), got a {msgs[-1]['role']!r} message")
    if len(msgs) < 2:
        raise ValueError(f"{where}: its {MESSAGES_KEY!r} hold only the answer; the prompt is the messages before it")
    if COMPLETION_KEY in item:
        raise ValueError(f"{where}: has both {MESSAGES_KEY!r} and {COMPLETION_KEY!r}; give {{{MESSAGES_KEY}}} "
                         f"(its last message the completion) or {{{key}, {COMPLETION_KEY}}}")
    rest = {k: v for k, v in item.items() if k != MESSAGES_KEY}
    return {key: msgs[:-1], COMPLETION_KEY: [msgs[-1]], **rest}


def completion_batch(rows: Sequence[Tuple[List[int], List[int], bool]], group_size: int, pad_id: int, tokenizer,
                     prompt_texts: Sequence[str]):
    """A :class:`~rlhf_fast.rollout.types.RolloutBatch` of given answers laid out as the rollout
    engine lays out its own: ``rows`` ``(prompt ids, completion ids, cut)`` (int lists; ``cut``:
    the completion was cut at the token budget, finish reason "length"), ``group_size``
    consecutive rows per prompt; prompts left-padded to the longest (width P), completions
    right-padded with ``pad_id``. input_ids ``[B, P + R]`` int64, attention / response masks
    ``[B, P + R]`` int64, behaviour_logp zeros (nothing was sampled)."""
    from rlhf_fast.rollout.types import RolloutBatch

    B, P, R = len(rows), max(len(p) for p, _, _ in rows), max(len(c) for _, c, _ in rows)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    am = torch.zeros((B, P + R), dtype=torch.long)
    rm = torch.zeros((B, P + R), dtype=torch.long)
    for i, (p, c, _) in enumerate(rows):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
        am[i, P - len(p):P + len(c)] = 1
        rm[i, P:P + len(c)] = 1
    return RolloutBatch(input_ids=ids, attention_mask=am, response_mask=rm, behaviour_logp=torch.zeros(B, P + R),
                        prompt_texts=list(prompt_texts),
                        response_texts=tokenizer.batch_decode([c for _, c, _ in rows], skip_special_tokens=True),
                        group_index=torch.arange(B // group_size).repeat_interleave(group_size),
                        num_generated_tokens=0, tokens_per_second=0.0, prompt_length=P,
                        finish_reasons=["length" if cut else "stop" for _, _, cut in rows])


def cut_unknown_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                       rows: int, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sequence cut before its first attended token id >= ``rows`` (a head's padding row
    past the tokenizer, which maps to no token: a padded head samples it, and the other model's
    embedding may not hold it). input_ids ``[B, T]`` int64, attention_mask / response_mask
    ``[B, T]`` bool. Returns the three, ``pad_id`` and False from the cut on. No host sync."""
    unknown = (input_ids >= rows) & attention_mask  # [B, T]
    cut = unknown.long().cumsum(1) > 0  # [B, T]: the first unknown token and every token after it
    return input_ids.masked_fill(cut, pad_id), attention_mask & ~cut, response_mask & ~cut


def head_transform(model) -> HeadTransform:
    """The :class:`HeadTransform` of ``model`` (a causal LM, peft / DDP wrappers allowed), read off
    its config (:func:`rlhf_fast.models.lm_head.head_transform`: as TRL 1.16's DistillationTrainer
    reads it); a plain head for a model without a transformers config."""
    from rlhf_fast.models.logprobs import unwrap

    return lm_head.head_transform(getattr(unwrap(model), "config", None))


def _head(model, key: str):
    """``(weight [V, H], bias [V] or None, transform)`` of ``model``'s LM head: ``transform`` None
    for a plain linear head (the fused op takes it), else its :class:`HeadTransform` (the
    divergence then goes through the logits, :func:`transformed_divergence`). ValueError naming
    ``key`` for a head neither can compute (not a Linear, a peft adapter on it, an unknown scale)."""
    from rlhf_fast.models.logprobs import lm_head_params, unfusable_reason, unwrap

    tf = head_transform(model)
    why = unfusable_reason(model)
    if why is None and tf == HeadTransform():
        return (*lm_head_params(model), None)
    m = unwrap(model)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or hasattr(head, "base_layer") or lm_head.pre_head_reason(m):
        raise ValueError(f"{key}: {why}; distillation needs a linear LM head (a logit scale or softcapping after "
                         f"it is fine)")
    other = [(name, val) for name, val in lm_head.active_logit_transforms(getattr(m, "config", None))
             if name not in lm_head.KNOWN_TRANSFORM_ATTRS]
    if other:
        raise ValueError(f"{key}: config.{other[0][0]}={other[0][1]!r} transforms the logits in a way "
                         f"distillation does not know; it takes logit_scale, output_multiplier, lm_head_multiplier, "
                         f"logits_scaling and final_logit_softcapping (as TRL) and logits_soft_cap")
    return head.weight, head.bias, tf


def _heads(model, key: str, dtype: torch.dtype, rows: Optional[int]):
    """``(weight [V, H], bias [V] or None, transform)`` of ``model``'s head (:func:`_head`), each
    tensor one plain tensor in ``dtype`` (its backbone's output dtype: the op takes one dtype per
    model; a no-op unless autocast or a mixed-precision wrapper hands back another), its first
    ``rows`` rows when given (differentiable: views and casts)."""
    w, b, tf = _head(model, key)
    w, b = (None if t is None else _full(t).to(dtype) for t in (w, b))
    if rows is not None:
        w, b = w[:rows], (b[:rows] if b is not None else None)
    return w, b, tf


def _full(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A head tensor as one plain tensor: FSDP2 may leave a head sharded (a DTensor) after the
    backbone's forward — the teacher's always, under no_grad. ``full_tensor`` gathers it once
    per call (differentiably: the student's gradient goes back to its shards), as TRL does."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed: nothing is sharded
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


# Rows of logits per chunk of the logits path (transformed_divergence) when no chunk_size is given:
# 4M logits (16 MB float32) per model
_LOGITS_CHUNK_ELEMS = 1 << 22


def _chunk_divergence(hs, ws, bs, ts, ht, wt, bt, tt, beta, temperature):
    """The divergence sum (0-dim) and the student's entropy ``[n]`` of one chunk of rows."""
    from rlhf_fast.ops import reference

    dt = reference.out_dtype(hs.dtype)
    zs = head_logits(hs, ws, bs, ts, temperature, dt)
    with torch.no_grad():
        zt = head_logits(ht, wt, bt, tt, temperature, dt)
    div, ent = reference.divergence_from_logits(zs, zt, beta)
    return div.sum(), ent.detach()


def transformed_divergence(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                           student_bias: Optional[torch.Tensor], student_transform: HeadTransform,
                           teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                           teacher_bias: Optional[torch.Tensor], teacher_transform: HeadTransform, *,
                           beta: float, temperature: float, chunk_size: Optional[int] = None):
    """:func:`rlhf_fast.ops.fused_linear_divergence` with ``reduction="sum"`` and
    ``return_entropy=True`` for heads whose logits are transformed (:class:`HeadTransform`; either
    model or both): each model's logits through :func:`head_logits`, the divergence
    :func:`rlhf_fast.ops.reference.divergence_from_logits`, ``chunk_size`` rows at a time (None:
    4M logits per model), each chunk's logits recomputed in the backward
    (``torch.utils.checkpoint``) so that forward and backward hold one chunk of each model's.
    student_hidden ``[N, H]``, teacher_hidden ``[N, Ht]``, weights ``[V, H]`` / ``[V, Ht]``.
    Returns ``(divergence sum 0-dim, student entropy [N])``, float32 (float64 for a float64
    student); gradients to the student's hidden, weight and bias only."""
    N, V = student_hidden.shape[0], student_weight.shape[0]
    rows = chunk_size or max(1, _LOGITS_CHUNK_ELEMS // V)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (student_hidden, student_weight, student_bias))
    sums, ents = [], []
    for s in range(0, N, rows):
        args = (student_hidden[s:s + rows], student_weight, student_bias, student_transform,
                teacher_hidden[s:s + rows], teacher_weight, teacher_bias, teacher_transform, beta, temperature)
        if grad:  # keep the chunk's inputs, not its [rows, V] logits and softmaxes
            d, e = torch.utils.checkpoint.checkpoint(_chunk_divergence, *args, use_reentrant=False)
        else:
            d, e = _chunk_divergence(*args)
        sums.append(d)
        ents.append(e)
    return torch.stack(sums).sum(), torch.cat(ents)


def distillation_loss(student, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      loss_mask: torch.Tensor, *, beta: float = 1.0, temperature: float = 1.0, normalizer=None,
                      vocab_rows: Optional[int] = None, chunk_size: Optional[int] = None,
                      prefix_groups: Optional[torch.Tensor] = None):
    """The distillation loss of ``student`` towards ``teacher`` on a batch of answers.

    input_ids ``[B, T]`` int64; attention_mask, loss_mask ``[B, T]`` bool (loss_mask: the answer
    tokens that count — the completion mask times the tool mask —, aligned to ``input_ids``:
    token t is predicted by the hidden state at t − 1). Both models run their backbones on the
    same inputs (:func:`rlhf_fast.models.logprobs.hidden_states`: Llama-family models through
    llama_forward; the teacher under no_grad), only at the predicting positions; their heads
    (the first ``vocab_rows`` rows when given) and hidden states go to
    :func:`rlhf_fast.ops.fused_linear_divergence` with ``beta`` and ``temperature`` — or, when
    either head scales or softcaps its logits (Gemma 2/3, Cohere, Granite: :func:`head_transform`),
    to :func:`transformed_divergence`, which takes each model's logits a chunk of rows at a time.
    Returns ``(loss, stats)``: loss 0-dim float32 = the divergence summed over the tokens divided by
    ``normalizer`` (None: the batch's own token count, at least 1), differentiable in the
    student only; stats ``divergence_sum``, ``entropy_sum`` (the student's entropy at
    ``temperature``) and ``tokens`` as floats.

    ``prefix_groups`` ``[G, K]`` int64 (None: the padded forwards): the groups of rows that share
    their leading tokens (a step's answers to one prompt; -1 fills a smaller group:
    :func:`rlhf_fast.models.logprobs.row_groups`). Both backbones then run on the batch's one
    shared-prefix row (:func:`_shared_states`), each prompt computed once per group — forward and
    backward for the student, forward for the teacher —, which only llama_forward computes
    (ValueError otherwise); the divergence takes the same states, so loss, statistics and the
    student's gradients are the padded path's up to float rounding. A batch without answer tokens
    keeps the padded forwards."""
    from rlhf_fast.models.logprobs import _target_mask

    target = _target_mask(attention_mask, loss_mask)
    tr, tc = target.nonzero(as_tuple=True)
    n = tr.numel()
    if n == 0:
        return _blank_loss(student, teacher, input_ids, attention_mask, vocab_rows), \
            {"divergence_sum": 0.0, "entropy_sum": 0.0, "tokens": 0.0}
    hs, ht = _target_states(student, teacher, input_ids, attention_mask, target, prefix_groups)
    # the heads after the forwards, as FSDP2 leaves them (the root's gathered for its head)
    ws, bs, ts = _heads(student, "the student's LM head", hs.dtype, vocab_rows)
    wt, bt, tt = _heads(teacher, "the teacher's LM head (distill.teacher)", ht.dtype, vocab_rows)
    if ts is None and tt is None:
        div, ent = ops.fused_linear_divergence(hs, ws, ht, wt, beta=beta, temperature=temperature, student_bias=bs,
                                               teacher_bias=bt, reduction="sum", return_entropy=True,
                                               chunk_size=chunk_size)
    else:
        div, ent = transformed_divergence(hs, ws, bs, ts or HeadTransform(), ht, wt, bt, tt or HeadTransform(),
                                          beta=beta, temperature=temperature, chunk_size=chunk_size)
    norm = max(n, 1) if normalizer is None else normalizer
    stats = {"divergence_sum": float(div.detach()), "entropy_sum": float(ent.sum()), "tokens": float(n)}
    return div / norm, stats


def _blank_loss(student, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                vocab_rows: Optional[int]) -> torch.Tensor:
    """The 0-dim float32 zero loss of a batch without answer tokens (a blank micro-batch) that
    still reaches every student weight, so DDP / FSDP2 reduce the same gradients on every rank,
    and the teacher's forward and head as on the other ranks (FSDP2 gathers their shards in
    step)."""
    from rlhf_fast.models.logprobs import hidden_states

    h = hidden_states(student, input_ids, attention_mask)
    with torch.no_grad():
        ht = hidden_states(teacher, input_ids, attention_mask)
    ws, bs, _ = _heads(student, "the student's LM head", h.dtype, vocab_rows)
    _heads(teacher, "the teacher's LM head (distill.teacher)", ht.dtype, vocab_rows)
    loss = h.sum() * 0.0 + ws.sum() * 0.0 + (bs.sum() * 0.0 if bs is not None else 0.0)
    return loss.float()


def _target_states(student, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor,
                   prefix_groups: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(student states [N, H], teacher states [N, Ht])`` at the positions that predict
    ``target`` ``[B, T]`` bool (at least one), in ``target.nonzero()`` order: the padded forwards
    over the target's columns, or with ``prefix_groups`` the shared-prefix row
    (:func:`_shared_states`); the teacher under no_grad."""
    from rlhf_fast.models.logprobs import hidden_states

    if prefix_groups is not None:
        return _shared_states(student, teacher, input_ids, attention_mask, target, prefix_groups)
    tr, tc = target.nonzero(as_tuple=True)
    lo, hi = torch.stack(torch.aminmax(tc)).tolist()
    where = dict(columns=(lo - 1, hi), select=(tr, tc - lo))
    hs = hidden_states(student, input_ids, attention_mask, **where)  # [N, H]
    with torch.no_grad():
        ht = hidden_states(teacher, input_ids, attention_mask, **where)  # [N, Ht]
    return hs, ht


def _shared_states(student, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor,
                   groups: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(student states [N, H], teacher states [N, Ht])`` at the positions that predict ``target``
    ``[B, T]`` bool (at least one), in ``target.nonzero()`` order (the padded path's), from one
    packing of the shared-prefix row of ``groups`` ``[G, K]``
    (:func:`rlhf_fast.models.logprobs.pack_shared_targets`) that both backbones run, the teacher
    under no_grad."""
    from rlhf_fast.models.logprobs import pack_shared_targets, shared_target_states

    pk = pack_shared_targets(input_ids, attention_mask, target, groups)
    hs = shared_target_states(student, pk)  # [N, H]
    with torch.no_grad():
        ht = shared_target_states(teacher, pk)  # [N, Ht]
    return hs, ht


# ----------------------------------------------------------------------------- IW-OPD

# TRL's IWOPDTrainer metrics, in its order
IW_OPD_METRICS = ("iw_opd/mean_advantage", "iw_opd/mean_abs_advantage", "iw_opd/mean_weight", "iw_opd/min_weight",
                  "iw_opd/max_weight")


def iw_opd_token_loss(student_logp: torch.Tensor, teacher_logp: torch.Tensor, rollout_logp: Optional[torch.Tensor],
                      mask: torch.Tensor, *, gamma: float = 0.5, epsilon: float = 1e-8):
    """TRL's sampled-token Importance-Weighted On-Policy Distillation objective from per-token
    log-probs: ``trl/experimental/iw_opd/iw_opd_trainer.py``, ``IWOPDTrainer._compute_iw_opd_loss``
    transcribed after its log-softmax and gather (the log-probs come from the fused op here).

    student_logp ``[B, T]`` float (differentiable), teacher_logp ``[B, T]``, rollout_logp ``[B, T]``
    (the sampler's log-probs) or None (the student's own, detached: TRL's fallback when a batch has
    no rollout log-probs), mask ``[B, T]`` bool, the tokens that count. Per token the advantage
    a = teacher − rollout (detached; 0 off the mask); per row the weight w = 1 + gamma · (1 − |a|
    of the row's earlier tokens / max(Σ|a| of the row, epsilon)) (detached); loss = −student · w · a.
    Returns ``(loss sum 0-dim, w·a [B, T], |a| [B, T], w [B, T])``, the last three detached."""
    valid = mask.bool()
    safe_teacher = torch.where(valid, teacher_logp, 0.0)
    if rollout_logp is None:
        rollout_logp = student_logp
    safe_rollout = torch.where(valid, rollout_logp, 0.0)
    a = (safe_teacher - safe_rollout).detach()
    a = torch.where(valid, a, torch.zeros_like(a))
    abs_a = a.abs()
    prefix = abs_a.cumsum(dim=1) - abs_a
    total = abs_a.sum(dim=1, keepdim=True).clamp_min(epsilon)
    w = (1.0 + gamma * (1.0 - prefix / total)).detach()
    adv = w * a
    loss = -student_logp * adv
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss.sum(), adv, abs_a, w


def iw_opd_metrics(adv: torch.Tensor, abs_a: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> Dict[str, float]:
    """TRL's ``iw_opd/*`` values of one batch (:data:`IW_OPD_METRICS`: the mean advantage w·a, the
    mean |a|, the mean, min and max weight over the ``mask`` tokens) from :func:`iw_opd_token_loss`'s
    ``[B, T]`` outputs; empty when the mask holds no token (TRL appends nothing then)."""
    valid = mask.bool()
    if not bool(valid.any()):
        return {}
    ws = w[valid]
    vals = (adv[valid].mean(), abs_a[valid].mean(), ws.mean(), ws.min(), ws.max())
    return {k: float(v) for k, v in zip(IW_OPD_METRICS, vals)}


def _token_logprobs(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    transform: Optional[HeadTransform], labels: torch.Tensor, temperature: float,
                    chunk_size: Optional[int], entropy: bool = False):
    """The log-probs ``[N]`` (and entropies ``[N]``) of ``labels`` ``[N]`` under one model's head at
    ``temperature`` from its states ``h [N, H]``: a plain head (``transform`` None) through
    :func:`rlhf_fast.ops.fused_linear_logprobs` (:func:`rlhf_fast.models.logprobs.head_token_stats`),
    a transformed one through its logits (:func:`head_logits`, :func:`rlhf_fast.ops.token_logprobs`)
    ``chunk_size`` rows at a time (None: 4M logits), each chunk recomputed in the backward."""
    from rlhf_fast.models.logprobs import _row_chunks, head_token_stats
    from rlhf_fast.ops import reference

    if transform is None:
        return head_token_stats(h, weight, bias, labels, temperature=temperature, return_entropy=entropy,
                                chunk_size=chunk_size)
    dt = reference.out_dtype(h.dtype)

    def one(hc, lc, w, b):
        out = ops.token_logprobs(head_logits(hc, w, b, transform, temperature, dt), lc, return_entropy=entropy)
        return out if entropy else (out,)

    rows = chunk_size or max(1, _LOGITS_CHUNK_ELEMS // weight.shape[0])
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    out = _row_chunks(one, rows, grad, h, labels, weight, bias)
    return tuple(out) if entropy else out[0]


def iw_opd_loss(student, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                rollout_logp: Optional[torch.Tensor] = None, *, gamma: float = 0.5, epsilon: float = 1e-8,
                temperature: float = 1.0, normalizer=None, vocab_rows: Optional[int] = None,
                chunk_size: Optional[int] = None, prefix_groups: Optional[torch.Tensor] = None):
    """The IW-OPD loss of ``student`` towards ``teacher`` on a batch of sampled answers (TRL's
    ``distillation_objective="iw_opd"``, :func:`iw_opd_token_loss`).

    input_ids, attention_mask, loss_mask, ``prefix_groups``, ``vocab_rows``, ``normalizer``: as
    :func:`distillation_loss` (the same states: padded or shared-prefix forwards). rollout_logp
    ``[B, T]`` float32 aligned to ``input_ids``: each answer token's log-prob under the
    distribution that sampled it (TRL's ``rollout_logprobs``, vLLM's processed log-probs), or None
    (the student's own at ``temperature``, detached: TRL's fallback). Both models' log-probs of the
    answer tokens at ``temperature`` come from :func:`rlhf_fast.ops.fused_linear_logprobs` (a
    transformed head: through chunks of its logits), never ``[N, V]`` logits. Returns ``(loss,
    stats)``: loss 0-dim float32 = Σ −student·w·a over the tokens / ``normalizer`` (None: the batch's
    token count, at least 1), differentiable in the student only; stats ``divergence_sum`` (Σ
    student − teacher log-prob: the sampled estimate of KL(student ‖ teacher)), ``entropy_sum``,
    ``tokens`` as floats and ``iw_opd`` (:func:`iw_opd_metrics`, empty for a batch without tokens).
    ValueError when an answer token lies outside the compared ``vocab_rows``."""
    from rlhf_fast.models.logprobs import _target_mask

    target = _target_mask(attention_mask, loss_mask)
    tr, tc = target.nonzero(as_tuple=True)
    n = tr.numel()
    if n == 0:
        return _blank_loss(student, teacher, input_ids, attention_mask, vocab_rows), \
            {"divergence_sum": 0.0, "entropy_sum": 0.0, "tokens": 0.0, "iw_opd": {}}
    hs, ht = _target_states(student, teacher, input_ids, attention_mask, target, prefix_groups)
    ws, bs, ts = _heads(student, "the student's LM head", hs.dtype, vocab_rows)
    wt, bt, tt = _heads(teacher, "the teacher's LM head (distill.teacher)", ht.dtype, vocab_rows)
    labels = input_ids[tr, tc]  # [N]
    if vocab_rows is not None and bool((labels >= vocab_rows).any()):
        raise ValueError(f"distill.objective 'iw_opd': an answer token id ({int(labels.max())}) lies past the "
                         f"{vocab_rows} tokenizer rows both heads are compared on")
    lps, ent = _token_logprobs(hs, ws, bs, ts, labels, temperature, chunk_size, entropy=True)  # [N], [N]
    with torch.no_grad():
        lpt = _token_logprobs(ht, wt, bt, tt, labels, temperature, chunk_size)  # [N]
    B, T = input_ids.shape
    s_grid = lps.new_zeros(B, T).index_put((tr, tc), lps)  # [B, T], differentiable
    t_grid = lpt.new_zeros(B, T).index_put((tr, tc), lpt.to(lps.dtype))
    r_grid = None if rollout_logp is None else rollout_logp.to(lps.dtype)
    loss_sum, adv, abs_a, w = iw_opd_token_loss(s_grid, t_grid, r_grid, target, gamma=gamma, epsilon=epsilon)
    norm = max(n, 1) if normalizer is None else normalizer
    # One host sync for the seven statistics instead of eleven (a float() each, iw_opd_metrics' any() and boolean
    # gathers): (tr, tc) picks target's tokens in w[target]'s order, and float64 holds each value exactly as float()
    wv = w[tr, tc]  # [N]
    vals = torch.stack([v.double() for v in ((lps.detach() - lpt).sum(), ent.detach().sum(), adv[tr, tc].mean(),
                                             abs_a[tr, tc].mean(), wv.mean(), wv.min(), wv.max())]).tolist()
    stats = {"divergence_sum": vals[0], "entropy_sum": vals[1], "tokens": float(n),
             "iw_opd": dict(zip(IW_OPD_METRICS, vals[2:]))}  # (n > 0: iw_opd_metrics would not be empty)
    return loss_sum / norm, stats


class _ULDState(NamedTuple):
    """GOLD's run state: the teacher's tokenizer, the loss settings, the matched vocabulary
    ``(teacher ids [M], student ids [M])`` (hybrid only, else None)."""

    tokenizer: object
    settings: object
    match: Optional[Tuple[torch.Tensor, torch.Tensor]]


class DistillationTrainer(RLTrainer):
    """On-policy distillation of the policy (the student) towards a teacher (TRL's
    ``DistillationTrainer``): :class:`~rlhf_fast.trainers.rl.RLTrainer` with ``estimator:
    distill``, whose ``config.distill`` (:class:`~rlhf_fast.trainers.rl_config.DistillConfig`)
    holds the teacher and ``beta``.

    config / policy / tokenizer / prompts / eval_prompts / tools / environment_factory /
    engine: as :class:`~rlhf_fast.trainers.rl.RLTrainer`. teacher_model: a causal LM (any width,
    the student's vocabulary) in place of ``distill.teacher``. reward_fns / reward_models /
    judge (optional): scored on every rollout and evaluation and logged (``reward/*``), never
    trained on. ``reference`` and ``critic`` are refused: distillation has neither.

    Logs per step, besides the RL trainer's rollout timings, tool and ``reward/*`` metrics:
    ``loss`` (the mean over the optimizer steps of the mini-batch loss, the per-token
    divergence), ``entropy`` (the student's per-token entropy at the loss), ``distill/divergence``
    (the per-token divergence over every update token), ``grad_norm``, ``step_time`` (the
    update's seconds), TRL's ``completions/mean_length`` / ``min_length`` / ``max_length`` /
    ``clipped_ratio`` / ``mean_terminated_length`` / ``min_terminated_length`` /
    ``max_terminated_length`` (tokens after the prompt, tool results included, over every rank's
    answers), ``response_length/mean`` / ``max`` (the student's own tokens), TRL's ``num_tokens``
    (prompt + answer tokens of every step so far, every rank; checkpointed) and, with
    ``distill.lmbda`` < 1, ``distill/on_policy`` (the share of the step's answers, over every
    rank, that are the student's, the rest the data's completions or the teacher's answers: 1 or
    0 for a step of one micro-batch); evaluation adds
    ``eval/loss``, ``eval/entropy`` and ``eval/distill/divergence`` (per token, the answers
    sampled at ``eval.temperature``, the divergence at ``rollout.temperature``).

    With ``distill.objective: iw_opd`` ``loss`` is the IW-OPD loss (:func:`iw_opd_loss`),
    ``distill/divergence`` the sampled estimate of KL(student ‖ teacher) (the mean of student −
    teacher log-prob over the answer tokens), and TRL's ``iw_opd/mean_advantage``,
    ``mean_abs_advantage``, ``mean_weight``, ``min_weight``, ``max_weight`` are logged (and
    ``eval/iw_opd/*``: the mean over the evaluation batches)."""

    _uld = None  # GOLD's ULD state (set by __init__); None for subclasses that do not take it (SDFT)
    _distills = True
    convert_record = staticmethod(messages_record)  # GKD's {messages} records as {prompt, completion}

    def __init__(self, config: RLConfig, policy=None, tokenizer=None, *, teacher_model=None, **kwargs):
        config = with_estimator(config, DISTILL)
        for key in ("reference", "critic"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{key}=...: distillation has no {key} model (the teacher is teacher_model=)")
        d = config.distill
        if teacher_model is not None and d.teacher is not None:
            raise ValueError(f"teacher_model=... and distill.teacher ({d.teacher!r}) are both set; give one")
        if teacher_model is None and d.teacher is None:
            raise ValueError("distill.teacher: no teacher; set distill.teacher to a local model folder (or "
                             "'tiny:FAMILY'), or pass teacher_model=...")
        if teacher_model is not None and not isinstance(teacher_model, torch.nn.Module):
            raise TypeError(f"teacher_model must be a causal LM (torch.nn.Module), got {type(teacher_model).__name__}")
        if teacher_model is not None and isinstance(policy, torch.nn.Module) and \
                not {id(p) for p in policy.parameters()}.isdisjoint(id(p) for p in teacher_model.parameters()):
            # the teacher is frozen in place: the student's shared weights would stop training
            raise ValueError("teacher_model=... is the policy itself (or shares its parameters); the teacher is "
                             "frozen, which would freeze the student: pass a separate copy (copy.deepcopy(policy)), "
                             "or use SDFT (estimator sdft) to distill the policy from itself")
        if teacher_model is not None and d.teacher_model_init_kwargs:
            # TRL's DistillationTrainer / GKDTrainer raise here too: a built teacher takes no from_pretrained keywords
            raise ValueError(f"distill.teacher_model_init_kwargs ({d.teacher_model_init_kwargs}) loads distill.teacher "
                             "from a folder, but teacher_model=... is already built; cast it yourself and leave "
                             "distill.teacher_model_init_kwargs empty")
        if d.teacher is not None and not d.teacher.startswith("tiny:"):
            from rlhf_fast.models.loading import check_model_folder

            check_model_folder(d.teacher, "distill.teacher")  # before the student is loaded
        super().__init__(config, policy, tokenizer, **kwargs)
        self._uld = self._uld_setup_tokenizer(teacher_model)  # GOLD (distill.use_uld_loss); None otherwise
        self.teacher = self._load_teacher(teacher_model)
        self._vocab_rows = self._check_vocabulary() if self._uld is None else self._uld_check_teacher()
        # answers end before a sampled id past these rows (a head's padding row: no token); None: no cut
        self._answer_rows = self._vocab_rows if self._uld is None else self._uld_answer_rows()
        packing = _packing_key(self.config.ppo)  # ppo.prefix_sharing / ppo.padding_free: the teacher's rows too
        if packing:  # (the student's checked by RLTrainer; checked before FSDP2 wraps it)
            from rlhf_fast.trainers.packing import check_prefix_shareable

            check_prefix_shareable(packing, self.config.rollout.max_new_tokens + 1, self.teacher,
                                   alternative="the teacher, distill.teacher, is the model it cannot run")
        self.teacher_sharded = False
        if self.ctx.distributed and self.config.distributed.strategy == "fsdp2":
            # sharded like the policy: each rank keeps 1/N of the teacher between its forwards,
            # which line up on every rank (the same micro-batch count)
            from rlhf_fast.distributed import wrap_model

            dc = self.config.distributed
            self.teacher = wrap_model(self.teacher, "fsdp2", self.ctx, mixed_precision=dc.mixed_precision,
                                      reshard_after_forward=dc.reshard_after_forward)
            self.teacher_sharded = True
        self.num_tokens = 0  # TRL's num_tokens: prompt + answer tokens of every step so far (checkpointed)
        self._teacher_engine = None  # distill.seq_kd: built at its first step
        self._completions = self._data_completions()
        self._iw_opd_stats: List[Dict[str, float]] = []  # distill.objective iw_opd: one dict per micro-batch

    # ------------------------------------------------------------------ the teacher

    def _load_teacher(self, model):
        """The frozen teacher in eval mode on the device: ``model`` (teacher_model=), else
        ``distill.teacher`` loaded with ``distill.teacher_model_init_kwargs`` (a folder's
        from_pretrained keywords; a tiny teacher is cast once built)."""
        from rlhf_fast.models.loading import apply_model_init_kwargs, load_policy

        d = self.config.distill
        if model is None and d.teacher.startswith("tiny:"):
            model = apply_model_init_kwargs(self._tiny_teacher(), d.teacher_model_init_kwargs)
        elif model is None:
            if self._uld is None:  # (ULD compares the two vocabularies through text)
                self._check_teacher_tokenizer(d.teacher)
            model = load_policy(d.teacher, init_kwargs=d.teacher_model_init_kwargs)
        model = model.to(self.device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def _tiny_teacher(self):
        from rlhf_fast.models.tiny import tiny_causal_lm

        d, m, tok = self.config.distill, self.config.model, self.tokenizer
        if self._uld is not None:  # its tokenizer's vocabulary (distill.teacher_tokenizer)
            tok = self._uld.tokenizer
        if d.tiny_hidden_size % m.tiny_num_heads:
            raise ValueError(f"distill.tiny_hidden_size ({d.tiny_hidden_size}) must be divisible by "
                             f"model.tiny_num_heads ({m.tiny_num_heads})")
        return tiny_causal_lm(len(tok), family=d.teacher.split(":", 1)[1] or "llama", hidden_size=d.tiny_hidden_size,
                              num_layers=m.tiny_num_layers, num_heads=m.tiny_num_heads, seed=d.tiny_seed,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id)

    def _check_teacher_tokenizer(self, path: str) -> None:
        """A teacher folder with a tokenizer must tokenize as the student: the divergence
        compares the two distributions id by id."""
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            return
        from transformers import AutoTokenizer

        from rlhf_fast.models.loading import tokenizer_kwargs

        theirs = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs(self.config.distill.teacher_model_init_kwargs)
                                               ).get_vocab()
        ours = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else theirs
        if theirs != ours:
            diff = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda kv: kv[1])[:3]
            raise ValueError(f"distill.teacher {path!r}: its tokenizer differs from the student's ({len(theirs)} vs "
                             f"{len(ours)} tokens; e.g. {diff}); the divergence needs one vocabulary (set "
                             f"distill.use_uld_loss true for TRL GOLD's cross-tokenizer ULD loss)")

    def _check_vocabulary(self) -> Optional[int]:
        """None when both heads have the same rows; the tokenizer's size when they differ but
        both cover it (padded heads: see the module docstring); else ValueError."""
        vs = _head(self.policy, "the student's LM head")[0].shape[0]
        vt = _head(self.teacher, "the teacher's LM head (distill.teacher)")[0].shape[0]
        if vs == vt:
            return None
        n = len(self.tokenizer)
        if min(vs, vt) >= n:
            return n
        raise ValueError(f"distill.teacher: the teacher's vocabulary ({vt} LM-head rows) differs from the student's "
                         f"({vs}) and does not cover the tokenizer's {n} tokens; distillation needs the student's "
                         f"vocabulary")

    def _teacher_generate(self, which: Optional[List[int]] = None, pick: Optional[Sequence[int]] = None):
        """:meth:`_generate` (``which`` / ``pick`` as there) with the teacher answering
        (distill.seq_kd): a rollout engine of its own on the teacher, the rollout's sampling
        settings, seeds and tools."""
        if self._teacher_engine is None:
            from rlhf_fast.rollout import HFRolloutEngine

            self._teacher_engine = HFRolloutEngine(self.teacher, self.tokenizer, device=self.device,
                                                   cuda_graphs=self.config.rollout.cuda_graphs)
        engine, self.engine = self.engine, self._teacher_engine
        try:
            return self._generate(0, which, pick)
        finally:
            self.engine = engine

    # ------------------------------------------------------------------ the data's completions

    def _data_completions(self) -> Optional[List[tuple]]:
        """``(prompt ids, completion ids, cut)`` of every training record
        (:meth:`completion_ids`) when off-policy steps train on the data's completions
        (``distill.lmbda`` < 1 without ``seq_kd``); else None."""
        d = self.config.distill
        if d.lmbda >= 1.0 or d.seq_kd:
            return None
        if self.tools or self._env_factories:
            raise ValueError(f"distill.lmbda ({d.lmbda}) < 1 trains the off-policy steps on the data's completions, "
                             "which hold no tool calls; tools / environments need distill.lmbda 1 or distill.seq_kd")
        return [self.completion_ids(i) for i in range(len(self.prompts))]

    def completion_ids(self, i: int) -> Tuple[List[int], List[int], bool]:
        """``(prompt ids, completion ids, cut)`` of training record ``i``: the prompt as the rollout
        engine encodes it (:func:`rlhf_fast.feedback.formats.prompt_token_ids`: a chat's template
        writes its special tokens, a text gets the tokenizer's), then its ``completion`` field —
        text: its tokens without special tokens and one eos unless it already ends with one (SFT's
        rule); a list of assistant messages after a chat prompt: the tokens the chat template
        writes for them after the rendered prompt (content and end of turn, no eos added). Cut to
        its first ``rollout.max_new_tokens`` tokens (``cut`` True then), as the student's answers
        are. ValueError naming the record when the field is missing or malformed."""
        tok, d = self.tokenizer, self.config.distill
        prompt, fields = self._records["train"][i]
        text = self.prompts[i]
        c = fields.get(COMPLETION_KEY)
        where = f"distill.lmbda ({d.lmbda}) < 1: training prompt {i}"
        if c is None:
            raise ValueError(f"{where} has no {COMPLETION_KEY!r} field; off-policy steps train on the data's "
                             f"completions: give data.prompts_file records {{prompt, completion}} (SFT's "
                             f"prompt-completion format) or {{messages}} (GKD's), or set distill.seq_kd true (the "
                             f"teacher answers), or distill.lmbda 1")
        if isinstance(c, str):
            ids = list(tok(c, add_special_tokens=False)["input_ids"])
            eos = tok.eos_token_id
            if eos is not None and not (ids and ids[-1] == eos):
                ids.append(eos)
        elif isinstance(c, list) and c and _chat_or_text(c) and isinstance(prompt, list):
            kw = dict(self.config.data.chat_template_kwargs)
            tools = self._tools_of(self._env_names["train"][i])
            full = tok.apply_chat_template(list(prompt) + list(c), tokenize=False, add_generation_prompt=False,
                                           **({"tools": list(tools)} if tools else {}), **kw)
            if not full.startswith(text):
                raise ValueError(f"{where}: the chat template renders the prompt + completion without the prompt's "
                                 f"own rendering at its start ({text[-40:]!r} vs {full[:len(text)][-40:]!r}); "
                                 f"give the completion as text")
            ids = list(tok(full[len(text):], add_special_tokens=False)["input_ids"])
        else:
            raise ValueError(f"{where}: {COMPLETION_KEY!r} must be text, or a non-empty list of {{role, content}} "
                             f"messages after a chat prompt, got {type(c).__name__}"
                             + (" after a text prompt" if isinstance(c, list) else ""))
        if not ids:
            raise ValueError(f"{where}: its {COMPLETION_KEY!r} has no tokens")
        budget = self.config.rollout.max_new_tokens
        from rlhf_fast.feedback.formats import prompt_token_ids

        return prompt_token_ids(tok, [text])[0], ids[:budget], len(ids) > budget

    def _data_batch(self, which: Optional[List[int]] = None, pick: Optional[Sequence[int]] = None):
        """:meth:`_generate`'s ``(batch, fields, extra)`` with the data's completions for answers:
        this rank's share of the next prompts (``which`` / ``pick`` as :meth:`_generate`'s), each
        completion ``rollout.group_size`` times."""
        g = self.config.rollout.group_size
        which = self._next_prompts() if which is None else which
        if self.ctx.distributed:
            from rlhf_fast.trainers.sft import local_span

            lo, hi = local_span(len(which), self.ctx)
            which = which[lo:hi]
        if pick is not None:
            which = [which[j] for j in pick]
        rows = [i for i in which for _ in range(g)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        batch = completion_batch([self._completions[i] for i in rows], g, pad, self.tokenizer,
                                 [self.prompts[i] for i in rows])
        extra = {"_prompts": [self._records["train"][i][0] for i in rows]}  # as _run_engine gives them
        return batch, [self.prompt_fields[i] for i in which], extra

    def _step_batch(self):
        """The step's answers: ``(batch, fields, extra, on-policy fraction)``. As TRL GKD's
        ``training_step``, which draws once per micro-batch (gradient accumulation), each of this
        rank's micro-batches of ``ppo.micro_batch_size`` rows (its prompts' groups in order, a
        group taken with the micro-batch of its first row) is on-policy or not
        (:func:`gkd_on_policy` of the step and the micro-batch's index: micro-batch j of every
        rank alike, as TRL's draws): its prompts answered by the student, else by the teacher
        (distill.seq_kd) or with the data's completions. The fraction: of the step's answers on
        every rank that are the student's."""
        d, G = self.config.distill, self.config.rollout.group_size
        if d.lmbda >= 1.0:
            return (*self._generate(0), 1.0)
        which = self._next_prompts()
        n = len(which)
        if self.ctx.distributed:
            from rlhf_fast.trainers.sft import local_span

            lo, hi = local_span(n, self.ctx)
            n = hi - lo
        mb = self.config.ppo.micro_batch_size
        on = [gkd_on_policy(self.config.seed, self.global_step, d.lmbda, p * G // mb) for p in range(n)]
        mine = [p for p in range(n) if on[p]]
        rest = [p for p in range(n) if not on[p]]
        # every rank holds as many prompts (prompts_per_step is a multiple of the ranks) and draws
        # alike: all ranks generate with a model or none does (FSDP2 gathers its weights in each call)
        parts = []  # (positions, (batch, fields, extra))
        if mine:
            parts.append((mine, self._generate(0, which, mine)))
        if rest:
            parts.append((rest, (self._teacher_generate if d.seq_kd else self._data_batch)(which, rest)))
        frac = len(mine) / max(n, 1)  # (the same on every rank)
        if len(parts) == 1:
            return (*parts[0][1], frac)
        return (*self._merge_parts(parts, n), frac)

    def _merge_parts(self, parts, n: int):
        """One ``(batch, fields, extra)`` of this rank's ``n`` prompts, in their order, from the
        parts ``[(positions, (batch, fields, extra))]`` that answered some of them (a per-row
        field one part lacks is None on its rows)."""
        from dataclasses import replace

        from rlhf_fast.rollout.types import RolloutBatch

        G = self.config.rollout.group_size
        where = {}  # prompt position → its first row in the parts' concatenation
        first = 0
        for pos, (b, _, _) in parts:
            for k, p in enumerate(pos):
                where[p] = first + k * G
            first += b.batch_size
        rows = torch.tensor([where[p] + r for p in range(n) for r in range(G)], dtype=torch.int64)
        tok = self.tokenizer
        pad = getattr(self.engine, "pad_id", None)
        if pad is None:
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        batch = RolloutBatch.concat([b for _, (b, _, _) in parts], pad, rows)
        # each prompt's answers one group again, numbered by the prompt's position (its fields' index)
        batch = replace(batch, group_index=torch.arange(n).repeat_interleave(G))
        fields = [None] * n
        for pos, (_, f, _) in parts:
            for p, x in zip(pos, f):
                fields[p] = x
        keys = []
        for _, (_, _, e) in parts:
            keys += [k for k in (e or {}) if k not in keys]
        extra = {}
        for k in keys:
            col = [x for pos, (b, _, e) in parts for x in ((e or {}).get(k) or [None] * b.batch_size)]
            extra[k] = [col[i] for i in rows.tolist()]
        return batch, fields, extra or None

    # ------------------------------------------------------------------ the loss

    def distill_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                     normalizer=None, group: Optional[torch.Tensor] = None):
        """:func:`distillation_loss` of the policy towards the teacher with the run's beta,
        temperature (``rollout.temperature``), vocabulary rows and chunk size; with
        ``ppo.prefix_sharing`` on the shared-prefix row of the rows' groups (``group`` ``[B]``, the
        prompt of each row; None: each row its own)."""
        from rlhf_fast.distributed import reshard

        d = self.config.distill
        groups = self._share_kwargs(group, input_ids.shape[0]).get("prefix_groups")
        with self._autocast():
            out = distillation_loss(self.policy, self.teacher, input_ids, attention_mask, loss_mask, beta=d.beta,
                                    temperature=self.config.rollout.temperature, normalizer=normalizer,
                                    vocab_rows=self._vocab_rows, chunk_size=d.chunk_size, prefix_groups=groups)
        if self.teacher_sharded:  # free the root's gathered copy (kept after its forward for the head)
            reshard(self.teacher)
        return out

    def iw_opd_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                    rollout_logp: Optional[torch.Tensor] = None, normalizer=None,
                    group: Optional[torch.Tensor] = None):
        """:func:`iw_opd_loss` (``distill.objective: iw_opd``) of the policy towards the teacher with
        the run's ``distill.iw_opd_gamma`` / ``iw_opd_epsilon``, temperature (``rollout.temperature``),
        vocabulary rows and chunk size, ``rollout_logp`` ``[B, T]`` the sampler's log-probs (None:
        the student's own); ``group`` as :meth:`distill_loss`."""
        from rlhf_fast.distributed import reshard

        d = self.config.distill
        groups = self._share_kwargs(group, input_ids.shape[0]).get("prefix_groups")
        with self._autocast():
            out = iw_opd_loss(self.policy, self.teacher, input_ids, attention_mask, loss_mask, rollout_logp,
                              gamma=d.iw_opd_gamma, epsilon=d.iw_opd_epsilon,
                              temperature=self.config.rollout.temperature, normalizer=normalizer,
                              vocab_rows=self._vocab_rows, chunk_size=d.chunk_size, prefix_groups=groups)
        if self.teacher_sharded:
            reshard(self.teacher)
        return out

    def policy_backward(self, data: RolloutTensors, micro_batch_size: Optional[int] = None,
                        n_micro: Optional[int] = None) -> Dict[str, float]:
        """Accumulate the gradient of the mini-batch ``data`` over micro-batches of
        ``micro_batch_size`` rows (``n_micro``: as :meth:`RLTrainer.policy_backward`): each
        micro-batch's divergence sum (``distill.objective: iw_opd``: its IW-OPD loss sum, whose
        ``iw_opd/*`` values go to :meth:`update`) divided by the answer tokens of the whole
        mini-batch on every rank. Returns ``loss`` (summed over micro-batches: the mini-batch's per-token
        divergence) and this rank's per-token ``divergence`` and ``entropy``."""
        mb = micro_batch_size or self.config.ppo.micro_batch_size
        if self._uld is not None:
            return self._uld_backward(data, mb, n_micro)
        norm = self._global_normalizer(data.response_mask, "token-mean")
        acc = {"loss": 0.0, "divergence": 0.0, "entropy": 0.0}
        ntok = max(float(data.response_mask.sum()), 1.0)
        iw_opd = self.config.distill.objective == "iw_opd"
        for d, real, more in _micro_batches(data, mb, n_micro):
            with self._no_sync(self.policy, more):
                if iw_opd:  # the rollout's sampling log-probs, TRL's rollout_logprobs
                    loss, st = self.iw_opd_loss(d.input_ids, d.attention_mask, d.response_mask, d.behaviour_logp,
                                                normalizer=norm, group=d.group)
                    if st["iw_opd"]:  # (TRL appends nothing for a batch without completion tokens)
                        self._iw_opd_stats.append(st["iw_opd"])
                else:
                    loss, st = self.distill_loss(d.input_ids, d.attention_mask, d.response_mask, normalizer=norm,
                                                 group=d.group)
                # DDP averages gradients over ranks; grad_scale turns that into the global sum
                self.scaler.scale(loss * self.ctx.grad_scale).backward()  # fp16: the loss scale (else as it is)
            acc["loss"] += float(loss.detach())
            acc["divergence"] += st["divergence_sum"] / ntok
            acc["entropy"] += st["entropy_sum"] / ntok
        return acc

    def update(self, data: RolloutTensors) -> Dict[str, float]:
        """:meth:`RLTrainer.update` (epochs, mini-batches, clipping, schedule) with the
        distillation loss; the statistics under TRL's names."""
        t0 = self.phase_clock.now()
        self._iw_opd_stats = []
        out = super().update(data)
        out = {_RENAMED.get(k, k): v for k, v in out.items()}
        if self.config.distill.objective == "iw_opd":
            out.update(self._iw_opd_means(self._iw_opd_stats))
        out["step_time"] = self.phase_clock.now() - t0
        return out

    def _iw_opd_means(self, stats: List[Dict[str, float]]) -> Dict[str, float]:
        """TRL's logged ``iw_opd/*``: each value's mean over the micro-batches that held answer
        tokens (TRL's ``_metrics`` lists, averaged at ``log``), over every rank's micro-batches (the
        same on every rank); nan when none held one."""
        vec = torch.tensor([[m[k] for k in IW_OPD_METRICS] + [1.0] for m in stats], dtype=torch.float64,
                           device=self.device).reshape(-1, len(IW_OPD_METRICS) + 1).sum(0)
        if self.ctx.distributed:
            vec = self.ctx.all_reduce_sum(vec)
        n = float(vec[-1])
        return {k: float(v) / n if n else float("nan") for k, v in zip(IW_OPD_METRICS, vec[:-1])}

    # ------------------------------------------------------------------ GOLD: a teacher with another tokenizer

    def _uld_setup_tokenizer(self, teacher_model=None) -> Optional["_ULDState"]:
        """None without ``distill.use_uld_loss``; else the teacher's tokenizer (``distill.teacher_tokenizer``,
        else the teacher's own folder's — ``distill.teacher``, or a ``teacher_model`` instance's
        ``config._name_or_path`` as TRL reads it —, else the student's), the loss settings and, with
        ``uld_use_hybrid_loss``, the matched vocabulary. ValueError for what ULD cannot run."""
        from rlhf_fast.algorithms import uld

        d = self.config.distill
        if not d.use_uld_loss:
            return None
        packing = _packing_key(self.config.ppo)
        if packing:
            raise ValueError(f"{packing}: the teacher of distill.use_uld_loss reads its own tokenization of each "
                             "answer, which shares no packed row with the student's; set it false")
        if self.tools or self._env_factories:
            raise ValueError("distill.use_uld_loss: tool results inside an answer would be scored by the teacher "
                             "as answer text (TRL's GOLD has no tools); remove the tools / environments")
        tok = self.tokenizer
        folder = d.teacher_tokenizer
        # else the teacher's own folder (TRL: teacher_model's path, or an instance's config._name_or_path)
        own = d.teacher if d.teacher is not None and not d.teacher.startswith("tiny:") else \
            getattr(getattr(teacher_model, "config", None), "_name_or_path", None)
        if folder is None and isinstance(own, str) and own and any(
                os.path.isfile(os.path.join(own, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            folder = own
        if folder is not None:
            from transformers import AutoTokenizer

            from rlhf_fast.models.loading import tokenizer_kwargs

            if not os.path.isdir(folder):
                raise ValueError(f"distill.teacher_tokenizer {folder!r} is not a local folder")
            try:
                tok = AutoTokenizer.from_pretrained(folder, **tokenizer_kwargs(d.teacher_model_init_kwargs))
            except (OSError, ValueError, TypeError) as e:  # transformers' own message names no key
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"distill.teacher_tokenizer {folder!r} holds no tokenizer transformers can load "
                                 f"({first})") from e
            if tok.pad_token is None:  # as TRL
                tok.pad_token = tok.eos_token
        if d.use_extended_uld:
            for who, t in (("the student's", self.tokenizer), ("the teacher's (distill.teacher_tokenizer)", tok)):
                if not (hasattr(t, "backend_tokenizer") and uld.is_byte_level(t.backend_tokenizer)):
                    raise ValueError(f"distill.use_extended_uld aligns answers by byte offsets, which needs ByteLevel "
                                     f"BPE tokenizers; {who} is not one; set distill.use_extended_uld false")
        match = None
        if d.uld_use_hybrid_loss:
            match = uld.vocabulary_match(self.tokenizer, tok)
            if match[0].numel() == 0:
                raise ValueError("distill.uld_use_hybrid_loss: the student's and the teacher's vocabularies share "
                                 "no token; set it false")
        cfg = uld.ULDSettings(crossentropy_weight=d.uld_crossentropy_weight,
                              distillation_weight=d.uld_distillation_weight,
                              student_temperature=d.uld_student_temperature,
                              teacher_temperature=d.uld_teacher_temperature,
                              skip_student_eos=d.uld_skip_student_eos, skip_teacher_eos=d.uld_skip_teacher_eos,
                              use_extended_uld=d.use_extended_uld, merge_strategy=d.uld_token_merge_strategy,
                              use_hybrid_loss=d.uld_use_hybrid_loss, matched_weight=d.uld_hybrid_matched_weight,
                              unmatched_weight=d.uld_hybrid_unmatched_weight, beta=d.beta)
        return _ULDState(tok, cfg, match)

    def _uld_check_teacher(self) -> None:
        """The teacher's head covers its tokenizer (ULD never compares the two heads row by row)."""
        vt = _head(self.teacher, "the teacher's LM head (distill.teacher)")[0].shape[0]
        n = len(self._uld.tokenizer)
        if vt < n:
            raise ValueError(f"distill.teacher_tokenizer: its {n} tokens exceed the teacher's {vt} LM-head rows; "
                             f"give the teacher's own tokenizer")
        return None

    def _uld_answer_rows(self) -> Optional[int]:
        """The student tokenizer's size when the student's head has rows past it (padding rows: no
        token piece, no text, no byte offsets), else None."""
        vs = _head(self.policy, "the student's LM head")[0].shape[0]
        return len(self.tokenizer) if vs > len(self.tokenizer) else None

    def uld_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                 rows=None, tokens=None):
        """TRL GOLD's ULD loss (:mod:`rlhf_fast.algorithms.uld`) of the policy towards the teacher on a batch
        of answers: input_ids ``[B, T]``, attention_mask / loss_mask ``[B, T]`` (loss_mask: the answer
        tokens, TRL's labels). The answers are re-tokenized by the teacher's tokenizer, both backbones
        run, and the loss comes from :func:`~rlhf_fast.algorithms.uld.chunked_uld_loss`, a few answers'
        logits at a time. Returns ``(loss 0-dim, stats)``: loss = ``uld_distillation_weight`` × Σ row
        terms / ``rows`` + ``uld_crossentropy_weight`` × Σ label cross-entropy / ``tokens`` (None: this
        batch's rows / label tokens, TRL's means); stats ``distill_sum`` (weighted Σ row terms),
        ``entropy_sum``, ``tokens``, ``matched_sum`` / ``unmatched_sum`` (hybrid) as floats."""
        from rlhf_fast.algorithms import uld
        from rlhf_fast.distributed import reshard
        from rlhf_fast.models.logprobs import hidden_states

        st, d = self._uld, self.config.distill
        cfg, dev = st.settings, input_ids.device
        labels = torch.where(loss_mask.bool() & attention_mask.bool(), input_ids, uld.IGNORE_INDEX)  # [B, T]
        ids_c, lab_c = input_ids.cpu(), labels.cpu()
        prompts, answers = uld.student_texts(self.tokenizer, ids_c, attention_mask.cpu(), lab_c)
        t_ids, t_lab, t_am, t_off = (x.to(dev) for x in uld.teacher_inputs(st.tokenizer, prompts, answers,
                                                                             cfg.use_extended_uld))
        s_off = uld.student_byte_offsets(self.tokenizer, ids_c, lab_c).to(dev) if cfg.use_extended_uld else None
        t_off = t_off if cfg.use_extended_uld else None
        with self._autocast():
            hs = hidden_states(self.policy, input_ids, attention_mask)  # [B, T, H]
            with torch.no_grad():
                ht = hidden_states(self.teacher, t_ids, t_am.long())  # [B, Tt, Ht]
            ws, bs, ts = _heads(self.policy, "the student's LM head", hs.dtype, None)
            wt, bt, tt = _heads(self.teacher, "the teacher's LM head (distill.teacher)", ht.dtype, None)
            # answers per chunk: distill.chunk_size rows (else 4M logits) of the wider model's logits
            v, t = max(ws.shape[0], wt.shape[0]), max(input_ids.shape[1], t_ids.shape[1])
            per = max(1, (d.chunk_size * v if d.chunk_size else _LOGITS_CHUNK_ELEMS) // (v * t))
            row_sum, ce_sum, m_sum, u_sum, ent = uld.chunked_uld_loss(
                hs, (ws, bs, ts or HeadTransform()), ht, (wt, bt, tt or HeadTransform()), labels, t_lab, input_ids,
                t_ids, s_off, t_off, cfg, st.match, rows_per_chunk=per)
        if self.teacher_sharded:
            reshard(self.teacher)
        n_tok = int(labels.ne(uld.IGNORE_INDEX).sum())
        rows = input_ids.shape[0] if rows is None else rows
        loss = cfg.distillation_weight * row_sum / rows
        if cfg.crossentropy_weight > 0:
            loss = loss + cfg.crossentropy_weight * ce_sum / (max(n_tok, 1) if tokens is None else tokens)
        stats = {"distill_sum": cfg.distillation_weight * float(row_sum.detach()), "entropy_sum": float(ent),
                 "tokens": float(n_tok), "matched_sum": float(m_sum), "unmatched_sum": float(u_sum)}
        return loss.float(), stats

    def _row_mean_stats(self) -> frozenset:
        # ULD's divergence and hybrid parts are means over the answers (TRL's), not over tokens
        return frozenset(("divergence", "matched_loss", "unmatched_loss")) if self._uld is not None else frozenset()

    def _uld_backward(self, data: RolloutTensors, mb: int, n_micro: Optional[int]) -> Dict[str, float]:
        """:meth:`policy_backward` with the ULD loss: each micro-batch's row terms over the mini-batch's rows
        and its cross-entropy over the mini-batch's label tokens, both on every rank (TRL's means: micro-
        batching never changes the gradient)."""
        B = data.input_ids.shape[0]
        rows = self.ctx.all_reduce_sum(torch.tensor(float(B), device=self.device)) if self.ctx.distributed \
            else float(B)
        norm = self._global_normalizer(data.response_mask, "token-mean")
        acc = {"loss": 0.0, "divergence": 0.0, "entropy": 0.0}
        ntok = max(float(data.response_mask.sum()), 1.0)
        hybrid = self._uld.settings.use_hybrid_loss
        if hybrid:
            acc.update(matched_loss=0.0, unmatched_loss=0.0)
        for d, real, more in _micro_batches(data, mb, n_micro):
            with self._no_sync(self.policy, more):
                loss, st = self.uld_loss(d.input_ids, d.attention_mask, d.response_mask, rows=rows, tokens=norm)
                self.scaler.scale(loss * self.ctx.grad_scale).backward()
            acc["loss"] += float(loss.detach())
            acc["divergence"] += st["distill_sum"] / max(B, 1)
            acc["entropy"] += st["entropy_sum"] / ntok
            if hybrid:  # TRL's matched_loss / unmatched_loss, here the mean over the answers
                acc["matched_loss"] += st["matched_sum"] / max(B, 1)
                acc["unmatched_loss"] += st["unmatched_sum"] / max(B, 1)
        return acc

    # ------------------------------------------------------------------ the rollout

    def rollout(self) -> tuple:
        """Generate (and score, when the run has reward sources). Returns ``(RolloutTensors,
        metrics)``; the log-prob, value and advantage fields are zeros (nothing reads them), but
        ``behaviour_logp`` with ``distill.objective: iw_opd`` (the sampler's, on the loss tokens)."""
        ro = self.config.rollout
        m: Dict[str, float] = {}
        t0 = self.phase_clock.now()
        self._tool_counts = [0, 0, 0]
        batch, fields, extra, on_policy = self._step_batch()  # (on_policy: the student's share)
        m["time/generate"] = self.phase_clock.now() - t0
        if self.config.distill.lmbda < 1.0:
            m["distill/on_policy"] = float(on_policy)
        ids, am, rm = self._batch_masks(batch)
        m["num_tokens"] = self._count_tokens(am[:, :batch.prompt_length], rm)
        B = ids.shape[0]
        scores, rewards, columns = torch.zeros(B, device=self.device), [None] * B, [{} for _ in range(B)]
        if self.reward is not None:
            out = self._score(batch, fields, extra)
            total = out.total.float()
            for name, v in out.per_source.items():
                fin = torch.isfinite(v)
                m[f"reward/{name}"] = float(v[fin].mean()) if fin.any() else float("nan")
            ok = out.valid.bool() & torch.isfinite(total)
            m["reward/total"] = float(total[ok].mean()) if ok.any() else float("nan")
            scores = torch.where(ok, total, torch.zeros_like(total)).to(self.device)
            rewards = [float(x) if k else None for x, k in zip(total.tolist(), ok.tolist())]
            columns = [{k: v[i] for k, v in out.columns.items()} for i in range(B)]
        m.update(self._reward_fn_metrics())
        if self.tools:
            m.update(self._tool_metrics())
        truncated = self._truncated_rows(batch).to(self.device)  # [B] bool: cut at max_new_tokens
        m.update(self._completion_metrics(am[:, batch.prompt_length:].sum(1), truncated))
        n_own = rm.sum(1).float()  # [B] the student's own tokens (tool results out)
        m.update({"response_length/mean": float(n_own.mean()), "response_length/max": float(n_own.max()),
                  "rollout/truncated_frac": float(truncated.float().mean()),
                  "tokens_per_second": float(getattr(batch, "tokens_per_second", 0.0) or 0.0)})
        # TRL's DistillationTrainer has no mask_truncated_completions; ours drops them from the loss
        loss_rm = rm & ~truncated[:, None] if ro.mask_truncated else rm
        zeros = torch.zeros(ids.shape, dtype=torch.float32, device=self.device)
        # iw_opd's rollout log-probs: the sampler's, under the processed distribution (vLLM's processed_logprobs)
        beh = batch.behaviour_logp.to(self.device).float() * loss_rm if self.config.distill.objective == "iw_opd" \
            else zeros
        # each prompt's answers are consecutive rows, the data's completions and the teacher's too
        # (ppo.prefix_sharing computes each prompt once per group; shuffles whole groups)
        prompt_of = torch.arange(B, device=self.device) // ro.group_size  # [B]
        data = RolloutTensors(ids, am, loss_rm, zeros, None, beh, zeros, zeros, zeros, scores, group=prompt_of)
        self._last_texts = list(zip(batch.prompt_texts, batch.response_texts, rewards))
        self._last_columns = columns
        return data, m

    def _batch_masks(self, batch):
        """:meth:`RLTrainer._batch_masks`; when the heads are compared over the tokenizer's rows
        only (padded to different sizes), each answer ends before its first token past them
        (:func:`cut_unknown_tokens`): the sampler — the student, or the teacher with seq_kd — draws
        from its whole head, and the other model's embedding may not hold its padding rows. With
        ULD the same past the student's tokenizer, whose padding rows have no token to align."""
        ids, am, rm = super()._batch_masks(batch)
        rows = getattr(self, "_answer_rows", None)  # (None in subclasses that compare no heads)
        if rows is None:
            return ids, am, rm
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return cut_unknown_tokens(ids, am, rm, rows, pad)

    def _count_tokens(self, prompt_mask: torch.Tensor, answer_mask: torch.Tensor) -> int:
        """Add the step's prompt tokens (``prompt_mask`` ``[B, P]``, each answer's prompt counted
        once per answer) and answer tokens (``answer_mask`` ``[B, T]``, tool results out) over
        every rank to ``num_tokens``, TRL's ``num_input_tokens_seen``; returns the new total."""
        n = int(prompt_mask.sum()) + int(answer_mask.sum())
        self.num_tokens += sum(c[0] for c in self.ctx.all_gather_ints([n]))
        return self.num_tokens

    def state_dict_extra(self) -> dict:
        """The RL trainer's state and ``num_tokens``."""
        return {**super().state_dict_extra(), "num_tokens": self.num_tokens}

    def load(self, run_dir: str) -> int:
        """:meth:`RLTrainer.load`, and ``num_tokens`` from the checkpoint (0 for one written
        before it was kept)."""
        from rlhf_fast.trainers.checkpoint import latest_checkpoint, restoring_extra

        step = super().load(run_dir)
        ck = latest_checkpoint(run_dir)
        with restoring_extra(ck), open(os.path.join(ck, "extra.json"), encoding="utf-8") as f:
            self.num_tokens = int(json.load(f).get("num_tokens", 0))
        return step

    def _completion_metrics(self, lengths: torch.Tensor, truncated: torch.Tensor) -> Dict[str, float]:
        """TRL DistillationTrainer's ``completions/*`` over every rank's answers: ``lengths``
        ``[B]`` (tokens after the prompt, tool results included, TRL's completion_ids) and
        ``truncated`` ``[B]`` bool (cut at the budget; TRL: no eos or pad at the end)."""
        lengths, truncated = lengths.cpu().float(), truncated.cpu()
        if self.ctx.distributed:
            parts = self.ctx.all_gather_objects((lengths, truncated))
            lengths, truncated = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        term = lengths[~truncated]
        if term.numel() == 0:  # TRL's edge case: no answer ended
            term = torch.zeros(1)
        return {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                "completions/max_length": float(lengths.max()),
                "completions/clipped_ratio": float(truncated.float().mean()),
                "completions/mean_terminated_length": float(term.mean()),
                "completions/min_terminated_length": float(term.min()),
                "completions/max_terminated_length": float(term.max())}

    # ------------------------------------------------------------------ evaluation and progress

    def _eval_batch_sums(self, batch, idx: List[int], extra, group_size: int) -> Dict[str, tuple]:
        """The rewards' sums (when the run has sources) and the divergence to the teacher:
        ``loss`` / ``distill/divergence`` and ``entropy`` per answer token."""
        ids, am, rm = self._batch_masks(batch)
        if self.reward is not None:
            res = super()._eval_batch_sums(batch, idx, extra, group_size)
        else:
            res = {"response_length": (float(rm.sum()), float(rm.shape[0]))}
        # (under evaluate()'s no_grad; ppo.prefix_sharing: each prompt once per group of its answers)
        group = batch.group_index.to(self.device)
        if self._uld is not None:  # TRL's ULD loss: a mean over the answers (and their label tokens)
            loss, st = self.uld_loss(ids, am, rm)
            B, n = float(ids.shape[0]), st["tokens"]
            res.update({"loss": (float(loss) * B, B), "distill/divergence": (st["distill_sum"], B),
                        "entropy": (st["entropy_sum"], n)})
            return res
        if self.config.distill.objective == "iw_opd":
            # the student's own log-probs for the rollout's (TRL's evaluation has none): the answers
            # were sampled at eval.temperature, the loss is at rollout.temperature
            loss, st = self.iw_opd_loss(ids, am, rm, None, group=group)
            n = st["tokens"]
            res.update({"loss": (float(loss) * n, n), "distill/divergence": (st["divergence_sum"], n),
                        "entropy": (st["entropy_sum"], n)})
            # TRL's eval_iw_opd/*: the mean over the batches with answer tokens (every rank sums the same keys)
            res.update({k: (st["iw_opd"][k], 1.0) if st["iw_opd"] else (0.0, 0.0) for k in IW_OPD_METRICS})
            return res
        _, st = self.distill_loss(ids, am, rm, group=group)
        n = st["tokens"]
        res.update({"loss": (st["divergence_sum"], n), "distill/divergence": (st["divergence_sum"], n),
                    "entropy": (st["entropy_sum"], n)})
        return res

    def _progress_postfix(self, m: Dict[str, float]) -> Dict[str, str]:
        return {"loss": f"{m.get('loss', float('nan')):.4f}", "entropy": f"{m.get('entropy', float('nan')):.3f}"}


__all__ = ["COMPLETION_KEY", "IW_OPD_METRICS", "MESSAGES_KEY", "DistillationTrainer", "HeadTransform",
           "completion_batch", "cut_unknown_tokens", "distillation_loss", "gkd_on_policy", "gkd_uniform",
           "head_logits", "head_transform", "iw_opd_loss", "iw_opd_metrics", "iw_opd_token_loss", "messages_record",
           "transformed_divergence"]
