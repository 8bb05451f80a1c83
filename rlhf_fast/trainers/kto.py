"""Kahneman–Tversky optimisation from unpaired feedback: ``rlhf-fast kto CONFIG.yaml [--key value ...]``.

KTO (Ethayarajh et al. 2024) learns from single responses marked desirable or undesirable —
thumbs-up / thumbs-down, scores above or below a threshold, or the two halves of preference
pairs — with no pairing, no reward model and no sampling. With the log-ratio
r = log π(y | x) − log π_ref(y | x) (summed over the response tokens through the fused LM head,
as in :mod:`rlhf_fast.trainers.dpo`) and the reference point z0, example i's loss ℓ_i is, for
``loss_type``

* ``kto`` (default; TRL's ``kto``): desirable λ_D · (1 − σ(β · (r − z0))),
  undesirable λ_U · (1 − σ(β · (z0 − r)));
* ``apo_zero_unpaired`` (APO-zero, D'Oosterlinck et al. 2024, unpaired; TRL's
  ``apo_zero_unpaired``): desirable λ_D · (1 − σ(β · r)), undesirable λ_U · σ(β · r) — no
  reference point: push desirable responses up and undesirable ones down from the reference,
  for data whose desirable responses are better than what the model writes now;

(λ_D, λ_U = ``desirable_weight``, ``undesirable_weight``). The step's loss is the weighted mean
over every example of the optimizer step, whatever the micro-batch split or number of ranks:

    L = Σ_i w_i · ℓ_i / Σ_i w_i,

w_i the weight of example i's annotator (``annotator_weights``; 1 without an annotator or for
one not listed; with every w_i = 1 this is exactly TRL's mean of the ℓ_i, and integer weights
count an example w_i times; a step whose weights are all 0 logs L = 0 and adds no gradient,
though AdamW still applies its momentum and weight decay). ``auto_annotator_weights`` derives the weights of the
annotators not listed from their agreement with the others on the items several of them
labelled (:mod:`rlhf_fast.feedback.agreement`, max(0.05, 2p − 1)): an item is a prompt with
one response, its label desirable or not — the same binary agreement statistic as for a
preference pair (for ``pairs`` data the pairs themselves, before unpairing); an annotator
without a shared item keeps weight 1. The weights change only how much each label counts:
the reference point z0 and the logged rewards / log-probs / counts are unweighted.

z0 (``kto`` only) estimates KL(π ‖ π_ref) from mismatched pairs, as TRL builds them: within a
batch of n examples the completions are rotated by one, (x_1, y_n), (x_2, y_1), …,
(x_n, y_{n−1}), and z0 = max(0, mean over those rows of log π(y' | x) − log π_ref(y' | x)),
detached (no gradient flows through it), the mean taken over every rank's rows (TRL averages
the per-rank means: the same for equal shares). A block of one example (an epoch's last step
batch, or the eval split's last block, when the examples leave one over) pairs that example
with itself, so its z0 is its own clamped log-ratio: TRL 1.16 does the same (its rotation is a
``datasets.map`` over batches of the per-device batch size, whose last batch may hold one
example; only a per-device batch size of 1 is refused, as ours refuses ``batch_size ×
grad_accum`` 1). Those rows use no label, so no annotator
weight enters z0 (an annotator of weight 0 still lends its prompts and completions to the
estimate of the policy's drift). ``apo_zero_unpaired`` builds no such rows (TRL's
``calculate_KL`` false): no KL forward of the policy or the reference, no all-reduce of z0 —
each step is one policy and one reference forward of the examples only.

Batches: TRL fixes each example's mismatched partner when it prepares the data (the rotation
within consecutive blocks of the per-device batch) and then reads the data in order (it refuses
any sampler but the sequential one). Here the examples are shuffled once (``seed``) and read in
that order every epoch, in step batches of ``batch_size × grad_accum`` examples (the last one of
an epoch shorter), each cut into micro-batches of ``batch_size``; the rotation runs over the whole
step batch, so z0 — and the loss — do not depend on the micro-batch split or the number of ranks
(TRL's z0 is per micro-batch; the two agree for ``grad_accum`` 1 on one device). Because the
partners are fixed, ``precompute_ref_logps`` can score the KL rows once too (``prefix_sharing``:
each row and its KL row, which share the prompt, as one shared-prefix pair in the reference's
forward). The eval examples are taken the same way (one seeded shuffle, blocks of the step size). With
``apo_zero_unpaired`` nothing ties an example to its neighbours: the examples are reshuffled
every epoch (seeded by ``seed`` and the epoch, as DPO), in the same step and micro-batches.

Logged per step (and on the eval split with an ``eval_`` prefix): loss (L above), kl (z0;
``kto`` only — TRL logs a constant 0 for ``apo_zero_unpaired``; on the eval split the
example-count-weighted mean over its blocks), rewards/chosen and rewards/rejected (β·r,
means over the desirable / undesirable examples; absent when there are none), rewards/margin
(their difference), logps/chosen, logps/rejected (summed log-probs), count/chosen,
count/rejected, lr, grad_norm, entropy, logits/chosen and logits/rejected (TRL's: the logit averaged
over the vocabulary, h·mean_v(W) per token, then over the desirable / undesirable responses' tokens;
absent for a side without tokens). TRL's advice on the weights (λ_D·n_D / (λ_U·n_U) in [1, 4/3],
the paper's eq. 8; example counts, unweighted, as TRL) is printed once when the training data
miss it.

Data (``data_kind``): ``binary`` records ``{prompt, completion, label: true|false}`` (JSONL or
Parquet; optional ``annotator``; ``completion`` may be chat messages after a chat prompt, TRL's
conversational unpaired format, encoded as DPO's conversational pairs), ``scores`` (``{prompt, response, score}``, desirable when
score ≥ ``score_threshold``) or ``pairs`` (``{prompt, chosen, rejected}``: the chosen response
desirable, the rejected one undesirable — TRL's ``unpair_preference_dataset``: every chosen row,
then every rejected row); without ``data``, the reward trainer's synthetic pairs, unpaired. The
eval split is held out before unpairing, so both halves of a pair stay on one side.

Reference (with ``precompute_ref_batch_size``, TR-DPO's moving reference ``sync_ref_model`` /
``ref_model_mixup_alpha`` / ``ref_model_sync_steps``, ``disable_dropout`` and ``num_train_epochs``
— counted in training examples, after unpairing), encoding, truncation by ``truncation_mode`` (ours:
TRL's KTOConfig has no such key; each example's row cut as DPO cuts a chosen row: ``balanced``, the
default, or ``keep_start`` — TRL 1.16's KTOTrainer's fixed cut, each row's first ``max_len`` tokens, an
example whose prompt fills ``max_len`` dropped — or ``keep_end``, each row's last ``max_len`` tokens; a
KL row keeps its example's prompt and cuts the borrowed completion, tokenised whole, to ``max_len``:
TRL's keep-start; with ``keep_end`` it is the last ``max_len`` tokens of the whole prompt and the
borrowed completion), checkpoints, exact resume, DDP / FSDP2, bf16
autocast and the final model as in :mod:`rlhf_fast.trainers.dpo`; so is ``bema`` (TRL's
``BEMACallback``), but not its ``update_ref_model`` (TRL's experimental reference update is DPO's only).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from rlhf_fast.distributed import DistributedConfig
from rlhf_fast.feedback.formats import PairRecord, Prompt, Response, ScoreRecord, response_text
from rlhf_fast.ops._validate import finite, tensor

from .common import (annotator_weight_map, autocast_context, check_annotator_weights, check_bool_fields,
                     load_split_records, record_weight, steps_for_epochs, trainer_commands)
from .common import LoggingOptions, ModelInitOptions, OptimizerOptions
from .compile import CompileOptions
from .config import typed_config
from .merging import MergeOptions
from .bema import BEMAConfig, check_bema_field
from .dpo import (attach_reference_logps, check_policy_fields, check_reference_fields, check_truncation_mode,
                  encode_pair, load_offline_policy, offline_optimizer_step, offline_reference,
                  open_offline_trainer,
                  prepare_offline_models, prompt_response_rows, reference_logps, response_logps,
                  response_logps_metrics, save_offline, train_offline, truncate_pair, weighted_share,
                  wrap_offline_models)
from .sft import (_Batches, accumulation_context, collate, count_tokens, eval_mode, init_optimization, local_share,
                  offload_context)

DATA_KINDS = ("binary", "scores", "pairs")
LOSS_TYPES = ("kto", "apo_zero_unpaired")
# Σ w·loss, Σ chosen / rejected rewards, Σ chosen / rejected logps, chosen / rejected count, Σ z0·n, Σ w,
# Σ response entropy, response tokens, Σ chosen / rejected mean logit, chosen / rejected response tokens
N_SUMS = 15


@typed_config(loose=("data", "eval_data"))  # (rows or a path: common._check_data_source)
@dataclasses.dataclass
class KTOConfig(ModelInitOptions, OptimizerOptions, LoggingOptions, CompileOptions, MergeOptions):
    """KTO settings. ``data``: JSONL/Parquet of ``data_kind`` records (None: synthetic pairs with
    a hidden rule, unpaired, so the defaults run); ``beta`` β scales the implicit reward
    β·(log π − log π_ref); ``desirable_weight`` / ``undesirable_weight`` λ_D / λ_U weigh the two
    losses; ``loss_type``: one of ``LOSS_TYPES`` (module docstring); ``annotator_weights``
    {annotator: weight >= 0} and ``auto_annotator_weights``: the example weights w_i;
    ``lora``: None, or LoraConfig fields ({} for r=8, alpha=16, every linear layer)."""

    model: str = "tiny:llama:hidden_size=64,num_layers=2,num_heads=4"
    ref_model: Optional[str] = None  # a saved model folder; None: the initial policy
    lora: Optional[Dict[str, Any]] = None
    data: Optional[str] = None
    data_kind: str = "binary"
    score_threshold: float = 0.0  # data_kind scores: desirable when score >= this
    eval_data: Optional[str] = None
    eval_fraction: float = 0.1
    output_dir: str = "runs/kto"
    max_len: int = 256
    # each row's cut to max_len (ours; TRL's KTOConfig has none): "balanced" (DPO's default), "keep_start" (TRL
    # 1.16's KTOTrainer: each row's first max_len tokens, an example whose prompt fills max_len dropped), "keep_end"
    truncation_mode: str = "balanced"
    # TRL's: each batch's length rounded up to a multiple of this (tensor-core / kernel-friendly shapes); null: none
    pad_to_multiple_of: Optional[int] = None
    batch_size: int = 8  # examples per micro-batch (twice as many rows with the KL rows of loss_type kto)
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.0  # the LR decays to min_lr_ratio × lr (TRL: cosine_with_min_lr, min_lr_rate)
    max_steps: int = 200
    grad_clip: float = 1.0
    bf16: Optional[bool] = None  # bf16 autocast, on CUDA only (null: true unless fp16, TRL's default)
    fp16: bool = False  # transformers' fp16: float16 autocast + loss scaling, on CUDA only (mixed_precision)
    gradient_checkpointing: bool = False
    # TRL's: the forward's saved activations wait in (pinned) CPU memory until the backward (an accelerator only)
    activation_offloading: bool = False
    beta: float = 0.1
    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    annotator_weights: Dict[str, float] = dataclasses.field(default_factory=dict)
    auto_annotator_weights: bool = False
    precompute_ref_logps: bool = False
    precompute_ref_batch_size: Optional[int] = None  # examples per reference forward of the precompute; null: batch_size
    # (ours, loss_type kto) each example's row and its KL row, which share the prompt, scored by the
    # reference as one shared-prefix pair: the prompt computed once
    prefix_sharing: bool = False
    sync_ref_model: bool = False  # TR-DPO's moving reference: mix the policy in every ref_model_sync_steps steps
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    num_train_epochs: Optional[float] = None  # set: max_steps from the number of training examples
    disable_dropout: bool = True  # as TRL's KTOConfig: dropout off in the policy and the reference
    # TRL's: weight of an MoE policy's router load-balancing loss (null: the model config's own; 0 if dense)
    router_aux_loss_coef: Optional[float] = None
    eval_every: int = 50
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    resume: bool = True
    dedup: bool = True
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    # TRL's BEMACallback (its argument names and defaults; rlhf_fast.trainers.bema): BEMA weights saved to RUN_DIR/bema
    bema: Optional[BEMAConfig] = None

    def __post_init__(self):
        check_policy_fields(self)
        if self.data_kind not in DATA_KINDS:
            raise ValueError(f"data_kind must be one of {DATA_KINDS}, got {self.data_kind!r}")
        finite("score_threshold", self.score_threshold)
        finite("beta", self.beta, "> 0")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        wd = finite("desirable_weight", self.desirable_weight, ">= 0")
        wu = finite("undesirable_weight", self.undesirable_weight, ">= 0")
        if wd == 0 and wu == 0:
            raise ValueError("desirable_weight and undesirable_weight are both 0: nothing would be trained")
        if self.loss_type == "kto" and self.batch_size * self.grad_accum < 2:
            # TRL: "actual batch size must be > 1", else the KL row is the example itself
            raise ValueError(f"batch_size × grad_accum must be >= 2, got {self.batch_size} × {self.grad_accum}: "
                             "KTO's KL estimate pairs each prompt with another example's completion of the same step")
        check_bool_fields(self, ("precompute_ref_logps", "dedup", "resume", "auto_annotator_weights", "prefix_sharing"))
        if self.prefix_sharing and self.loss_type != "kto":
            raise ValueError(f"prefix_sharing shares each example's prompt with its KL row: it needs loss_type 'kto' "
                             f"(loss_type {self.loss_type!r} has no KL rows)")
        check_truncation_mode(self.truncation_mode)
        check_annotator_weights(self)
        check_reference_fields(self)
        self.bema = check_bema_field(self, no_reference_update="TRL's experimental bema_for_ref_model moves "
                                     "DPOTrainer's reference only, not KTO's")


# ------------------------------------------------------------------ the loss


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """The reference point z0 ``[]`` of one batch: max(0, mean(kl_logps − ref_kl_logps)), detached.

    ``kl_logps`` / ``ref_kl_logps`` ``[B]``: summed response log-probs of the mismatched rows
    (:func:`kl_partners`) under the policy and the reference. Over several ranks or micro-batches
    the mean runs over all their rows (what :class:`KTOTrainer` does)."""
    tensor("kl_logps", kl_logps)
    tensor("ref_kl_logps", ref_kl_logps)
    if kl_logps.shape != ref_kl_logps.shape or kl_logps.dim() != 1 or kl_logps.numel() == 0:
        raise ValueError(f"kl_logps and ref_kl_logps must be the same non-empty [B], got {tuple(kl_logps.shape)} "
                         f"and {tuple(ref_kl_logps.shape)}")
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss [B], rewards [B])`` of B examples: the per-example ℓ_i, before any averaging.

    ``logps`` ``[B]`` summed response log-probs under the policy (differentiable), ``ref_logps``
    ``[B]`` under the reference, ``desirable`` ``[B]`` bool, ``kl`` the reference point z0 (a
    number or a 0-dim tensor, never differentiated; required for ``loss_type`` "kto", ignored —
    may be None — for "apo_zero_unpaired"). The loss is float32 (float64 for float64 input),
    weighted by λ_D / λ_U; rewards β·(log π − log π_ref) are detached. Formulas: the module
    docstring.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "kto" and kl is None:
        raise ValueError("kl (the reference point z0) is required for loss_type 'kto'")
    finite("beta", beta, "> 0")
    finite("desirable_weight", desirable_weight, ">= 0")
    finite("undesirable_weight", undesirable_weight, ">= 0")
    for name, t in (("logps", logps), ("ref_logps", ref_logps), ("desirable", desirable)):
        tensor(name, t)
    shape = tuple(logps.shape)
    if len(shape) != 1:
        raise ValueError(f"logps must be [B], got {shape}")
    for name, t in (("ref_logps", ref_logps), ("desirable", desirable)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the shape of logps {shape}, got {tuple(t.shape)}")
    dt = torch.float64 if logps.dtype == torch.float64 else torch.float32
    ratio = logps.to(dt) - ref_logps.to(dt)
    # the same operations as TRL's (its chosen and rejected losses, each times its weight)
    if loss_type == "kto":
        kl = torch.as_tensor(kl, dtype=dt, device=logps.device).detach()
        chosen = desirable_weight * (1 - F.sigmoid(beta * (ratio - kl)))
        rejected = undesirable_weight * (1 - F.sigmoid(beta * (kl - ratio)))
    else:  # apo_zero_unpaired: no reference point
        chosen = desirable_weight * (1 - F.sigmoid(beta * ratio))
        rejected = undesirable_weight * F.sigmoid(beta * ratio)
    return torch.where(desirable.bool(), chosen, rejected), beta * ratio.detach()


def kl_partners(order: Sequence[int], block: int) -> List[int]:
    """Each example's KL partner: ``partner[i]`` is the example whose completion example ``i``'s
    prompt is scored with. ``order`` (a permutation of the example indices) is cut into
    consecutive blocks of ``block`` (the last one shorter) and the completions rotate by one
    within each: the k-th example of a block takes the (k−1)-th one's, the first the last one's
    (TRL's ``KL_completion_ids``, blocks of its per-device batch)."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    order = list(order)
    partner = [-1] * len(order)
    for s in range(0, len(order), block):
        b = order[s: s + block]
        for k, i in enumerate(b):
            partner[i] = b[k - 1]
    if -1 in partner:
        raise ValueError("order must be a permutation of range(len(order))")
    return partner


def weight_advice(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
                  ) -> Optional[str]:
    """TRL's advice on λ_D and λ_U for a training set, or None when they are in range: with
    unequal counts, λ_D·n_D / (λ_U·n_U) should lie in [1, 4/3] (Ethayarajh et al. 2024, eq. 8).
    The same counts (at least 1 each), rounding and test as ``KTOTrainer._prepare_dataset``."""
    total = n_desirable + n_undesirable
    n_d = max(n_desirable, 1)
    n_u = max(total - n_d, 1)
    if n_d == n_u:
        return None
    wd, wu = desirable_weight, undesirable_weight
    d_lo, d_hi = round(n_u * wu / n_d, 2), round(n_u * wu / n_d * 1.33, 2)
    u_lo, u_hi = round(n_d * wd / n_u / 1.33, 2), round(n_d * wd / n_u, 2)
    if d_lo <= wd <= d_hi or u_lo <= wu <= u_hi:
        return None
    return (f"{n_desirable} desirable and {n_undesirable} undesirable training examples with desirable_weight {wd:g} "
            f"and undesirable_weight {wu:g}: desirable_weight x desirable / (undesirable_weight x undesirable) should "
            f"be in [1, 4/3] (KTO paper, eq. 8); set EITHER desirable_weight in [{d_lo}, {d_hi}] OR "
            f"undesirable_weight in [{u_lo}, {u_hi}] (not both)")


# ------------------------------------------------------------------ data


@dataclasses.dataclass
class BinaryRecord:
    """One response with binary feedback: ``label`` True (desirable, thumbs-up) or False."""

    prompt: Prompt
    completion: Response
    label: bool
    annotator: Optional[str] = None


def load_binary_records(source: Any, *, dedup: Optional[bool] = None) -> List[BinaryRecord]:
    """Read and validate ``{prompt, completion, label}`` records (optional ``annotator``) from a
    JSONL/Parquet path, a list of dicts or a ``datasets.Dataset``; ``label`` must be true or
    false. Every problem is collected with its line and field, then one ValueError lists them
    (as :func:`rlhf_fast.feedback.formats.load_records`). A record repeated with the same
    annotator is a problem with ``dedup=None`` (default); ``dedup=True`` drops the repeats and
    ``dedup=False`` keeps them (``dedup: false``), as ``load_records``."""
    import json

    from rlhf_fast.feedback.formats import (Problem, _annotator, _BadJSON, _check_prompt, _check_response, _shown,
                                            check_unrendered_fields, problems_error, read_rows)

    name, rows = read_rows(source)
    problems: List[Problem] = []
    records: List[BinaryRecord] = []
    seen: Dict[str, int] = {}
    for line, row in rows:
        def where(field, message, _line=line):
            return Problem(name, _line, field, message)

        if isinstance(row, _BadJSON):
            problems.append(where("<line>", row.message))
            continue
        if not isinstance(row, dict):
            problems.append(where("<line>", f"expected a JSON object, got {type(row).__name__}"))
            continue
        n0 = len(problems)
        prompt = _check_prompt(row, problems, where)
        ann = _annotator(row, problems, where)
        completion = _check_response(row, "completion", problems, where)
        if isinstance(completion, list) and isinstance(prompt, str):  # TRL's conversational unpaired format
            problems.append(where("prompt", "a conversational completion (chat messages) needs a chat prompt (a list "
                                            "of messages), got text"))
        label = row.get("label")
        if label is None:
            problems.append(where("label", "missing field"))
        elif not isinstance(label, bool):
            problems.append(where("label", f"expected true or false, got {_shown(label)}"))
        check_unrendered_fields(row, problems, where, template=any(isinstance(row.get(k), list) for k in
                                                                   ("prompt", "completion")))
        if len(problems) > n0:
            continue
        rec = BinaryRecord(prompt, completion, label, ann)
        key = json.dumps(dataclasses.asdict(rec), sort_keys=True)
        if key in seen and dedup is not False:
            if dedup is None:
                problems.append(where("<record>", f"duplicate record (same as line {seen[key]})"))
            continue
        seen.setdefault(key, line)
        records.append(rec)
    if problems:
        raise problems_error(name, "binary records", problems)
    return records


def load_kto_records(source: Any, kind: str, *, dedup: Optional[bool] = None) -> list:
    """The records of ``source`` of ``kind`` (``DATA_KINDS``), validated, not yet unpaired
    (:func:`to_binary` does that)."""
    from rlhf_fast.feedback.formats import load_records

    if kind not in DATA_KINDS:
        raise ValueError(f"data_kind must be one of {DATA_KINDS}, got {kind!r}")
    if kind == "binary":
        return load_binary_records(source, dedup=dedup)
    return load_records(source, kind, dedup=dedup)


def to_binary(records: Sequence[Any], score_threshold: float = 0.0) -> List[BinaryRecord]:
    """BinaryRecords from BinaryRecords (kept), ScoreRecords (desirable when score ≥
    ``score_threshold``) and PairRecords (TRL's ``unpair_preference_dataset``: every chosen
    response as desirable, then every rejected one as undesirable), in that order per kind. A
    BinaryRecord's label must be a bool (0 / 1 read as False / True); else TypeError."""
    out, rejected = [], []
    for i, r in enumerate(records):
        if isinstance(r, BinaryRecord):
            lab = r.label
            # bool("false") is True: a label given as text (or None, 2, ...) would silently train as desirable
            try:  # (numpy / torch bools and 0 / 1 are the bools they equal)
                ok = not isinstance(lab, str) and lab is not None and lab in (0, 1)
            except (TypeError, ValueError, RuntimeError):  # e.g. an array of several values
                ok = False
            if not ok:
                raise TypeError(f"records[{i}].label must be a bool (True: desirable), got {lab!r}")
            out.append(r if isinstance(lab, bool) else dataclasses.replace(r, label=bool(lab)))
        elif isinstance(r, ScoreRecord):
            out.append(BinaryRecord(r.prompt, r.response, bool(r.score >= score_threshold), r.annotator))
        elif isinstance(r, PairRecord):
            out.append(BinaryRecord(r.prompt, r.chosen, True, r.annotator))
            rejected.append(BinaryRecord(r.prompt, r.rejected, False, r.annotator))
        else:
            raise TypeError(f"records must be BinaryRecord, ScoreRecord or PairRecord, got {type(r).__name__}")
    return out + rejected


# stands in for "the other response" of a binary label in agreement_stats' items: no response text
# contains NUL characters in practice, so an item is exactly one (prompt, response)
_NO_RESPONSE = "\x00<rlhf-fast kto: binary label>"


def agreement_records(records: Sequence[Any], score_threshold: float = 0.0) -> List[PairRecord]:
    """The records as :func:`rlhf_fast.feedback.agreement.agreement_stats` reads them, for
    ``auto_annotator_weights``: PairRecords as they are (agreement on which response of the pair
    is better); every binary label (BinaryRecords, ScoreRecords through ``score_threshold``) as
    a PairRecord of its response and a fixed stand-in, the response chosen when desirable — so
    an item is one (prompt, response) and two labels of it agree when both say desirable or
    both undesirable, the binary statistic agreement_stats computes for pairs."""
    out = []
    for r in records:
        if isinstance(r, PairRecord):
            out.append(r)
            continue
        for b in to_binary([r], score_threshold):
            c, other = (b.completion, _NO_RESPONSE) if b.label else (_NO_RESPONSE, b.completion)
            out.append(PairRecord(b.prompt, c, other, annotator=b.annotator))
    return out


class _StepBatches(_Batches):
    """The step batches: one seeded shuffle of the examples, then the same consecutive blocks of
    the step size every epoch (TRL's sequential sampler over a shuffled dataset), so that each
    example's KL partner is fixed."""

    def _make_perm(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 % 2**63)  # (any seed in [0, 2**63))
        return torch.randperm(self.n, generator=g).tolist()


# ------------------------------------------------------------------ trainer


class KTOTrainer:
    """Trains a causal-LM policy on desirable / undesirable examples (see the module docstring).

    ``model`` / ``tokenizer`` / ``train_records`` / ``eval_records`` override what the config
    would load; records may be BinaryRecords, ScoreRecords or PairRecords (:func:`to_binary`);
    ``model`` may be a peft model (its adapters train, the reference is the initial policy:
    :func:`rlhf_fast.models.loading.make_reference`). ``train()`` returns the final metrics dict.
    """

    def __init__(self, cfg: KTOConfig, *, model=None, tokenizer=None, train_records=None, eval_records=None):
        if not isinstance(cfg, KTOConfig):
            raise TypeError(f"cfg must be a KTOConfig, got {type(cfg).__name__}")
        from .reward import synthetic_pairs

        open_offline_trainer(self, cfg)
        # an eval split is held out before unpairing: both halves of a pair on one side
        train_records, eval_records = load_split_records(
            cfg, lambda path: load_kto_records(path, cfg.data_kind, dedup=cfg.dedup),
            lambda: synthetic_pairs(cfg.seed, cfg.data_kind, cfg.data_kind == "scores"), train_records, eval_records)
        self.kl_rows = cfg.loss_type == "kto"  # apo_zero_unpaired has no reference point: no KL rows at all
        self.weights = annotator_weight_map(cfg.annotator_weights,
                                            agreement_records(list(train_records), cfg.score_threshold)
                                            if cfg.auto_annotator_weights else None)
        train_records = to_binary(list(train_records), cfg.score_threshold)
        eval_records = to_binary(list(eval_records or []), cfg.score_threshold)
        texts = [str(r.prompt) + " " + response_text(r.completion) for r in train_records[:4000]]
        model, self.tokenizer, self.pad_id, self.is_peft = load_offline_policy(cfg, model, tokenizer, texts,
                                                                               self.device)

        self.train_items, self.dropped = self._encode(train_records)
        self.eval_items, _ = self._encode(eval_records)
        if train_records and not self.train_items:
            why = (f"is empty or, with truncation_mode keep_start, has max_len ({cfg.max_len}) tokens or more"
                   if cfg.truncation_mode == "keep_start" else "is empty")
            raise ValueError(f"no training example left: each of the {len(train_records)} prompts {why}")
        n_d = sum(it["label"] for it in self.train_items)
        self.weight_advice = weight_advice(n_d, len(self.train_items) - n_d, cfg.desirable_weight,
                                           cfg.undesirable_weight)
        if self.weight_advice and self.ctx.is_main:
            print(f"rlhf-fast kto: {self.weight_advice}", file=sys.stderr, flush=True)

        # the step batches and, fixed by them, each example's mismatched KL row (kto); without
        # KL rows nothing ties an example to its neighbours: a new shuffle every epoch
        self.step_size = cfg.batch_size * cfg.grad_accum
        batches = _StepBatches if self.kl_rows else _Batches
        self.batches = batches(len(self.train_items), self.step_size, cfg.seed)
        g = torch.Generator().manual_seed((cfg.seed * 1000003 + 1) % 2**63)
        self.eval_order = torch.randperm(len(self.eval_items), generator=g).tolist()
        if self.kl_rows:
            self._attach_kl(self.train_items, kl_partners(self.batches._perm, self.step_size))
            self._attach_kl(self.eval_items, kl_partners(self.eval_order, self.step_size))

        reference = offline_reference(cfg, model, self.is_peft, self.device)  # as DPO's
        prepare_offline_models(cfg, model, reference)
        if cfg.prefix_sharing:  # no transformers fallback for its attention: refused now, not mid-run
            from .packing import check_prefix_shareable

            check_prefix_shareable("prefix_sharing", cfg.max_len, reference, alternative=None)
        if cfg.precompute_ref_logps:
            self._precompute(reference)
            reference = None
        self.reference = reference

        wrap_offline_models(self, model)
        # num_train_epochs: max_steps before the LR schedule; one step batch (batch_size × grad_accum) a step
        steps_for_epochs(cfg, len(self.train_items), batch=self.step_size, batches_per_step=1)
        init_optimization(self)

    # -------------------------------------------------------------- data

    def _encode(self, records: Sequence[BinaryRecord]) -> Tuple[List[Dict[str, Any]], int]:
        """Items ``{prompt, completion, label, weight}`` (+ ``full`` for kto, + ``whole_prompt``
        with keep_end): the row as :func:`dpo.encode_pair` encodes it, cut by ``truncation_mode``
        (:func:`dpo.truncate_pair`), its annotator's weight w_i, and the whole completion (+ eos)
        for the KL row another prompt borrows; an example with an empty prompt (or, keep_start,
        one of ``max_len`` tokens or more) is dropped."""
        items, dropped = [], 0
        mode = self.cfg.truncation_mode
        for i, r in enumerate(records):
            try:
                enc = encode_pair(self.tokenizer, r.prompt, r.completion, r.completion, None)
            except ValueError as e:  # a conversational completion the chat template cannot split
                raise ValueError(f"example {i}: {e}") from None
            cut = None if enc is None else truncate_pair(enc[0], enc[1], enc[2], self.cfg.max_len, mode)
            if cut is None:
                dropped += 1
                continue
            w = record_weight(self.weights, r.annotator)
            it = {"prompt": cut["prompt"], "completion": cut["chosen"], "label": bool(r.label), "weight": float(w)}
            if self.kl_rows and mode == "keep_end":  # its KL row: the end of the whole prompt + borrowed completion
                it["whole_prompt"] = enc[0]
            if self.kl_rows:
                # whole, for the KL row another prompt borrows: the ids as encoded after its own prompt
                # (TRL's KL_completion_ids are the partner's completion_ids)
                it["full"] = enc[1]
            items.append(it)
        return items, dropped

    def _attach_kl(self, items: List[Dict[str, Any]], partners: List[int]) -> None:
        """``item["kl"]``: the partner's whole completion, cut to fit ``max_len`` after this prompt
        (TRL's collator cuts the KL row to ``max_length`` the same way, keeping its start); with
        keep_end the last ``max_len`` tokens of the whole prompt and that completion
        (``item["kl_prompt"]`` where they keep other prompt tokens than the example's row)."""
        for it, j in zip(items, partners):
            if "whole_prompt" in it:
                full = items[j]["full"]
                cut = truncate_pair(it["whole_prompt"], full, full, self.cfg.max_len, "keep_end")
                it["kl"] = cut["chosen"]
                if cut["prompt"] != it["prompt"]:
                    it["kl_prompt"] = cut["prompt"]
            else:
                it["kl"] = items[j]["full"][: self.cfg.max_len - len(it["prompt"])]
        for it in items:
            del it["full"]
            it.pop("whole_prompt", None)

    def _micro(self, idx: List[int], items) -> List[Tuple[List[Dict[str, Any]], bool]]:
        """The step batch ``idx`` cut into micro-batches of ``batch_size``, and this rank's
        contiguous share of each with whether it is real: an empty share (fewer examples than
        ranks) becomes one example that counts for nothing, so every rank still runs the
        forwards/backward the collectives of DDP/FSDP2 expect."""
        return [local_share(idx[s: s + self.cfg.batch_size], items, self.ctx)
                for s in range(0, len(idx), self.cfg.batch_size)]

    def _batch(self, items, key: str = "completion") -> Dict[str, torch.Tensor]:
        rows = collate(prompt_response_rows(items, key), self.pad_id, self.cfg.pad_to_multiple_of)
        return {k: v.to(self.device) for k, v in rows.items()}

    def _both_rows(self, items) -> Dict[str, torch.Tensor]:
        """Every item's own row, then every item's KL row, as one batch on the device."""
        rows = collate(prompt_response_rows(items, "completion") + prompt_response_rows(items, "kl"), self.pad_id,
                       self.cfg.pad_to_multiple_of)
        return {k: v.to(self.device) for k, v in rows.items()}

    def _precompute(self, reference) -> None:
        """Each item's reference log-probs ``item["ref"] = (its row, its KL row)`` (kto) or
        ``(its row,)`` (apo_zero_unpaired), computed once."""
        if self.kl_rows:
            attach_reference_logps(self, reference, self._both_rows, prefix_sharing=self.cfg.prefix_sharing)
        else:
            attach_reference_logps(self, reference, self._batch, rows=1)

    # -------------------------------------------------------------- loss

    def _stored_refs(self, items) -> bool:
        """Whether every item holds its precomputed reference log-probs (else the reference model
        scores them); ValueError when one does not and ``precompute_ref_logps`` kept no reference
        model (as DPO's, and TRL's refusal)."""
        if all("ref" in it for it in items):
            return True
        if self.reference is None:
            raise ValueError("these examples have no precomputed reference log-probs and, with "
                             "precompute_ref_logps, no reference model is kept to score them: pass examples "
                             "scored before training (the trainer's eval examples), or set "
                             "precompute_ref_logps false")
        return False

    @torch.no_grad()
    def _reference_point(self, micro) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
        """z0 of a step batch (0-dim float32, the mean over every micro-batch's and rank's KL rows,
        clamped at 0; None for apo_zero_unpaired) and each micro-batch's reference log-probs
        ``[b]`` float32 of its own rows."""
        if not self.kl_rows:  # the reference's own rows only: no KL row is built, scored or reduced
            refs = []
            for items, _ in micro:
                if self._stored_refs(items):
                    refs.append(torch.tensor([it["ref"][0] for it in items], dtype=torch.float32, device=self.device))
                    continue
                with autocast_context(self.device, self.cfg.bf16, self.cfg.fp16):
                    refs.append(reference_logps(self.reference, self._batch(items), self._reference_sharded).float())
            return None, refs
        tot = torch.zeros(2, dtype=torch.float64, device=self.device)  # Σ (log π − log π_ref) over KL rows, rows
        refs = []
        for items, real in micro:
            with autocast_context(self.device, self.cfg.bf16, self.cfg.fp16):
                if self._stored_refs(items):
                    ref = torch.tensor([it["ref"] for it in items], dtype=torch.float32, device=self.device)
                    ref_main, ref_kl = ref[:, 0], ref[:, 1]
                else:  # the two kinds of row in one reference forward (with prefix_sharing: row i and its
                    # KL row i + b, the DPO pairs' layout, as one shared-prefix pair)
                    ref = reference_logps(self.reference, self._both_rows(items), self._reference_sharded,
                                          prefix_sharing=self.cfg.prefix_sharing)
                    ref_main, ref_kl = ref[: len(items)], ref[len(items):]
                kl, _ = response_logps(self.model, self._batch(items, "kl"))
            if real:
                tot += torch.stack([(kl.double() - ref_kl.double()).sum(), tot.new_tensor(float(len(items)))])
            refs.append(ref_main.float())
        tot = self.ctx.all_reduce_sum(tot)
        z0 = (tot[0] / tot[1].clamp(min=1.0)).clamp(min=0.0).float()
        return z0, refs

    def _example_stats(self, items, ref_main: torch.Tensor, z0: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Policy log-probs (with gradients when enabled) of a micro-batch's rows, their losses
        ℓ_i and rewards ``[b]``, labels ``[b]`` bool and weights w_i ``[b]`` (the loss's dtype)."""
        cfg = self.cfg
        with autocast_context(self.device, cfg.bf16, cfg.fp16):
            # TRL's KTO logs no token accuracy: no top-1 asked of the head
            logps, count, tstats = response_logps_metrics(self.model, self._batch(items), top1=False)
        desirable = torch.tensor([it["label"] for it in items], dtype=torch.bool, device=self.device)
        loss, rewards = kto_loss(logps, ref_main, desirable, z0, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                                 undesirable_weight=cfg.undesirable_weight, loss_type=cfg.loss_type)
        weight = torch.tensor([it["weight"] for it in items], dtype=loss.dtype, device=self.device)
        return {"loss": loss, "rewards": rewards, "logps": logps, "desirable": desirable, "weight": weight,
                "tokens": count, **tstats}

    @staticmethod
    def _sums(st: Dict[str, torch.Tensor], z0: Optional[torch.Tensor], real: bool) -> torch.Tensor:
        """The sums the metrics are made of (``[N_SUMS]`` float64, 0 for a share that does not
        count): Σ w·ℓ, Σ chosen / rejected rewards, Σ chosen / rejected logps, chosen / rejected
        count, Σ z0 (0 without one) per example, Σ w, Σ entropy over the response tokens, those tokens,
        Σ mean logit over the desirable / undesirable examples' response tokens, those tokens."""
        dev = st["loss"].device
        if not real:
            return torch.zeros(N_SUMS, dtype=torch.float64, device=dev)
        d = st["desirable"]
        r, lp, w = st["rewards"].double(), st["logps"].detach().double(), st["weight"].double()
        n = float(d.numel())
        z = z0.double() * n if z0 is not None else torch.zeros((), dtype=torch.float64, device=dev)
        ent = ((st["entropy"].double().sum(), st["tokens"].double().sum()) if "entropy" in st
               else (z.new_zeros(()),) * 2)
        if "mean_logit" in st:
            ml, n_tok = st["mean_logit"].double(), st["tokens"].double()
            logits = (ml[d].sum(), ml[~d].sum(), n_tok[d].sum(), n_tok[~d].sum())
        else:
            logits = (z.new_zeros(()),) * 4
        return torch.stack([(st["loss"].detach().double() * w).sum(), r[d].sum(), r[~d].sum(), lp[d].sum(),
                            lp[~d].sum(), d.double().sum(), (~d).double().sum(), z, w.sum(), *ent, *logits])

    @staticmethod
    def _metrics(tot: torch.Tensor, prefix: str = "", kl: bool = True) -> Dict[str, float]:
        """The logged metrics from the summed ``_sums`` (``kl``: whether there is a z0 to log)."""
        t = tot.cpu().tolist()
        n_c, n_r = t[5], t[6]
        n = max(n_c + n_r, 1.0)
        # L = Σ w·ℓ / Σ w (0 when every weight is 0: nothing was trained)
        m = {"loss": t[0] / t[8] if t[8] > 0 else 0.0, "count/chosen": n_c, "count/rejected": n_r}
        if kl:
            m["kl"] = t[7] / n
        if n_c > 0:  # as TRL: a side without examples has no mean
            m.update({"rewards/chosen": t[1] / n_c, "logps/chosen": t[3] / n_c})
        if n_r > 0:
            m.update({"rewards/rejected": t[2] / n_r, "logps/rejected": t[4] / n_r})
        if n_c > 0 and n_r > 0:
            m["rewards/margin"] = m["rewards/chosen"] - m["rewards/rejected"]
        m["entropy"] = t[9] / t[10] if t[10] > 0 else 0.0  # TRL's: the token mean over the rows' responses
        # TRL's logits/*: the mean logit's token mean over each side's responses; a side without tokens has none
        if t[13] > 0:
            m["logits/chosen"] = t[11] / t[13]
        if t[14] > 0:
            m["logits/rejected"] = t[12] / t[14]
        return {prefix + k: v for k, v in m.items()}

    # -------------------------------------------------------------- steps

    @torch.no_grad()
    def evaluate(self, items: Optional[Sequence[Dict[str, Any]]] = None) -> Dict[str, float]:
        """The step metrics over the eval examples (``eval_`` prefix; empty dict without any),
        taken in blocks of the step size as training takes its batches: ``eval_loss`` is L
        over every example (Σ w·ℓ / Σ w), ``eval_kl`` (kto) the example-count-weighted mean of the
        blocks' z0. An MoE model with the load-balancing term on adds TRL's ``eval_aux_loss`` (the
        mean over the micro-batches of their examples' forward, not the KL rows') and coef × it
        to eval_loss, as TRL's ``compute_loss`` in evaluation.
        ``items`` (encoded, e.g. ``trainer.train_items``) replaces the eval split, in its order."""
        order = self.eval_order if items is None else list(range(len(items)))
        items = list(self.eval_items if items is None else items)
        if not items:
            return {}
        tot = torch.zeros(N_SUMS, dtype=torch.float64, device=self.device)
        aux_sums = None
        with eval_mode(self.model):
            for s in range(0, len(order), self.step_size):
                micro = self._micro(order[s: s + self.step_size], items)
                z0, refs = self._reference_point(micro)
                for (chunk, real), ref in zip(micro, refs):
                    with self.moe.collect(evaluation=True) as aux:  # the examples' forward, as in training
                        tot += self._sums(self._example_stats(chunk, ref, z0), z0, real)
                    if self.moe.enabled:
                        a = self.moe.eval_sums(aux, real, self.device)
                        aux_sums = a if aux_sums is None else aux_sums + a
        m = self._metrics(self.ctx.all_reduce_sum(tot), prefix="eval_", kl=self.kl_rows)
        if aux_sums is not None:
            self.moe.add_eval_metrics(m, self.ctx.all_reduce_sum(aux_sums))
        return m

    def train_step(self) -> Dict[str, float]:
        """One optimizer step over a step batch in up to ``grad_accum`` micro-batches; returns its metrics."""
        ctx = self.ctx
        self.model.train()
        idx = self.batches.next()
        micro = self._micro(idx, self.train_items)
        z0, refs = self._reference_point(micro)  # first, from every KL row of the step: it enters every loss
        # Σ w of the whole step, every rank's examples: idx is the same on every rank, so no all-reduce
        w_total = sum(self.train_items[i]["weight"] for i in idx)
        tot = torch.zeros(N_SUMS, dtype=torch.float64, device=self.device)
        aux_vals, aux_steps = [], self.moe.term_steps(ctx, sum(bool(r) for _, r in micro), len(micro))
        for i, ((items, real), ref) in enumerate(zip(micro, refs)):
            with accumulation_context(self.model, i, len(micro)), offload_context(self), self.moe.collect() as aux:
                st = self._example_stats(items, ref, z0)
                # L = Σ w·ℓ / Σ w over every example of the global step (a share that does not count: w = 0)
                loss = weighted_share(st["loss"], st["weight"] * (1.0 if real else 0.0), w_total)
                # DDP/FSDP2 average gradients over ranks; grad_scale turns that into the sum
                loss = loss * ctx.grad_scale
                # TRL's MoE term (the examples' forward, not the KL rows'): coef × aux / the step's
                # micro-batches (an epoch's short last step has fewer than grad_accum: TRL's
                # current_gradient_accumulation_steps; term_steps: a blank share's rank adds none)
                loss = self.moe.with_term(loss, aux, aux_steps, aux_vals, counts=real)
                self.scaler.scale(loss).backward()  # fp16: times the loss scale
            tot += self._sums(st, z0, real)
        step = offline_optimizer_step(self)
        m = self._metrics(ctx.all_reduce_sum(tot), kl=self.kl_rows)
        self.moe.add_metrics(m, aux_vals, ctx)  # (every rank's micro-batches)
        m.update(step)
        # TRL's num_tokens: the example rows (prompt + completion), not the KL rows
        rows = prompt_response_rows([self.train_items[i] for i in idx], "completion")
        m.update(count_tokens(self, sum(len(r["input_ids"]) for r in rows)))
        return m

    _save = save_offline  # the checkpoint: the moving reference (TR-DPO), then policy and optimizer
    train = train_offline  # resume, train to max_steps, save output_dir/final; the last metrics


add_arguments, run = trainer_commands("kto", KTOConfig, KTOTrainer)  # what rlhf_fast.cli calls


__all__ = ["KTOConfig", "KTOTrainer", "BinaryRecord", "DATA_KINDS", "LOSS_TYPES", "agreement_records", "kto_loss",
           "kto_kl", "kl_partners", "weight_advice", "load_binary_records", "load_kto_records", "to_binary",
           "add_arguments", "run"]
