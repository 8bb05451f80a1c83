"""Offline preference optimisation (DPO family): ``rlhf-fast dpo CONFIG.yaml [--key value ...]``.

The policy learns straight from pairwise feedback, with no reward model and no sampling. For
a pair (prompt x, chosen y_c, rejected y_r), log π(y | x) is the sum over the response tokens
(prompt and padding never count) of the token log-probs, from the fused LM-head path
(:func:`rlhf_fast.models.logprobs.sequence_logprobs`: the ``[B, T, V]`` logits are never
materialised); chosen and rejected rows go through one forward, chosen first (as TRL). With
the log-ratios l = log π(y | x) − log π_ref(y | x) and z = l_c − l_r, the per-pair
``loss_type`` (one name, or a list combined with ``loss_weights`` as TRL's, e.g. the MPO
recipe ``[sigmoid, bco_pair, sft]`` with ``[0.8, 0.2, 1.0]``; every formula and each deliberate
difference from TRL 1.16: :mod:`rlhf_fast.trainers.preference_losses`):

* ``sigmoid`` (DPO): −(1−ε)·log σ(βz) − ε·log σ(−βz), ε = ``label_smoothing``: conservative
  DPO (cDPO), which bounds the pull of a flipped label — the option for noisy labels; ε = 0 is
  DPO (TRL's and OpenRLHF's ``sigmoid`` loss; TRL 1.x dropped ε from it);
* ``robust`` (rDPO, Chowdhury et al. 2024): (−(1−ε)·log σ(βz) + ε·log σ(−βz)) / (1 − 2ε), an
  unbiased estimate of the clean-label loss when labels flip with probability ε (TRL's ``robust``;
  with ``use_margin`` no longer unbiased: the margin is subtracted inside both terms);
* ``ipo``: (z' − 1/(2β))² with z' built from per-token-mean log-ratios (l / response tokens),
  as TRL does;
* ``hinge`` (SLiC): relu(1 − βz);
* TRL's others: ``exo_pair`` (needs ε > 0), ``nca_pair``, ``bco_pair``, ``sppo_hard``, ``aot`` and
  ``aot_unpaired`` (batch-level: they sort over the micro-batch, so the micro-batch split
  changes them; refused with annotator weights), ``apo_zero``, ``apo_down``, ``discopop``
  (``discopop_tau``), ``sigmoid_norm``, and ``sft`` (weight × the token-mean NLL of the chosen
  responses, as ``rpo_alpha``);
* reference-free — no reference model is loaded and no reference forward runs: ``simpo``
  (TRL's CPOTrainer ``simpo``: length-normalised log-probs, margin ``simpo_gamma``), ``cpo``
  (CPOTrainer's ``sigmoid`` on summed log-probs), ``cpo_hinge`` / ``cpo_ipo`` (CPOTrainer's
  reference-free ``hinge`` on summed, ``ipo`` on token-mean log-probs) — all plus ``cpo_alpha`` ×
  NLL of the chosen responses (TRL's default 1.0; 0 for plain SimPO), and with ``alpha`` ≠ 0
  AlphaPO's reward shape (``loss_type: alphapo`` is TRL's shorthand: simpo with cpo_alpha 0) —
  and ``orpo`` (ORPOTrainer: NLL of the
  chosen rows, prompt included as TRL, + β·(−log σ(log-odds ratio)) of token-mean log-probs; β
  is ORPO's λ) — and ``tpo`` / ``tpo_hinge`` / ``tpo_ipo`` / ``tpo_l`` (TRL's experimental
  TPOTrainer: CPO's losses, ``tpo_l`` SimPO's with margin ``tpo_l_gamma``, plus ``tpo_alpha`` × NLL
  of each pair's gold ``reference`` response, a third row per pair in the same forward:
  :mod:`rlhf_fast.trainers.tpo`). They must be used alone, without ``ref_model``,
  ``precompute_ref_logps``, ``rpo_alpha``, ``use_margin``, ``ld_alpha`` or an ``f_divergence_type``.

``f_divergence_type`` (``reverse_kl``; ``forward_kl``, ``js_divergence``, ``alpha_divergence``
with ``f_alpha_divergence_coef``) replaces l by f'(π/π_ref) in the losses built on the chosen −
rejected difference, as TRL (f-DPO). ``ld_alpha`` (LD-DPO) weights the part of the longer
response beyond the shorter one's length by ``ld_alpha`` in every summed log-prob (policy and
reference), as TRL.

``use_weighting`` (WPO, Zhou et al. 2024; TRL's ``use_weighting``) multiplies each pair's loss by
w_c·w_r, w = exp(mean over the response tokens of log π(y_t) − log Σ_v π_v²) under the current
policy, detached; log Σ_v π_v² comes from the same forward's hidden states in a no-grad pass over
chunks of rows (h·Wᵀ per chunk, never ``[B, T, V]``). Refused with the batch-level ``aot`` losses
(as TRL) and the reference-free losses. An NLL term (``sft``, ``rpo_alpha``) is weighted as TRL
weights its ``sft`` term: each micro-batch's NLL × the mean pair weight of that micro-batch (our
NLL stays a token sum over the step's chosen tokens; TRL's is a per-micro-batch token mean, the
same for one micro-batch per step), and the logged ``nll`` is this weighted one.

With ``use_margin`` each pair's ``margin`` m ≥ 0 is subtracted inside: βz − m (sigmoid, robust,
hinge; refused with other losses), like the reward trainer's Bradley–Terry; otherwise margins
are ignored. ``rpo_alpha`` α adds α·NLL of the chosen responses (RPO; TRL's ``sft`` loss with
weight α): the token-mean over every chosen token of the optimizer step. The pair losses are
averaged with per-annotator weights (``annotator_weights``, ``auto_annotator_weights``: see the
reward trainer) over every pair of the step, whatever the micro-batch split or number of ranks
(except the batch-level ``aot`` losses).
Logged per step (and on the eval split with an ``eval_`` prefix): loss, rewards/chosen and
rewards/rejected (β·l, means over pairs; reference-free: β·log π, β·its token mean for the
token-mean losses simpo / cpo_ipo / orpo / tpo_ipo / tpo_l, β × the shaped score with AlphaPO's
alpha, as TRL's CPO / ORPO / TPO trainers), rewards/accuracy (share with the chosen reward strictly
higher), rewards/margin, logps/chosen, logps/rejected (summed log-probs; token means for those
token-mean losses), nll (when an NLL term is on), log_odds_ratio and log_odds_chosen (orpo), lr, grad_norm;
TRL's entropy, logits/chosen and logits/rejected (the logit averaged over the vocabulary, then over
the chosen / rejected response tokens: h·mean_v(W) per token, no logits) and mean_token_accuracy
(the chosen response tokens that are the argmax of their logits, from the fused head's own pass).

Reference: a frozen copy of the initial policy (``ref_model``: a saved model folder instead);
with LoRA (``lora``: LoraConfig fields, or a peft model / adapter folder as ``model``) the base
with its adapters disabled, no second copy (a trained adapter: a frozen copy of it beside it, as
TRL's "ref" adapter, so the reference is still the initial policy). ``precompute_ref_logps`` scores every pair with the
reference once, before training (``precompute_ref_batch_size`` pairs a forward; null: ``batch_size``),
and keeps no reference model (a run resumed recomputes them from the initial weights,
deterministically). ``sync_ref_model`` (TR-DPO, Gorbatovski et al. 2024; TRL's keys) makes the
reference move: after every ``ref_model_sync_steps``-th optimizer step (TRL's ``on_step_end``,
so before that step's evaluation and checkpoint) π_ref ← α·π_θ + (1 − α)·π_ref,
α = ``ref_model_mixup_alpha``, parameter by parameter (under FSDP2 shard by shard, the reference
sharded like the policy). The moving reference is training state: each checkpoint ``step_N`` has
it in ``reference_step_N`` (written first), so a resumed run equals an uninterrupted one. It is
refused with ``precompute_ref_logps``, ``lora`` / a peft policy (no reference weights of its own,
as TRL) and the reference-free losses. ``bema`` (TRL's ``BEMACallback``, with its argument names
and defaults: :mod:`rlhf_fast.trainers.bema`) keeps the Bias-Corrected EMA of the policy's weights
on ``bema.device`` and saves it as a model to ``RUN_DIR/bema`` at the end; with
``bema.update_ref_model`` (TRL's experimental ``bema_for_ref_model``) the reference takes those
weights every ``ref_model_update_freq`` steps. Its buffers (and that reference) are checkpointed in
``bema_step_N``; refused with ``lora`` and FSDP2, and its ``update_ref_model`` with
``sync_ref_model``, ``precompute_ref_logps`` and the reference-free losses. ``disable_dropout``
(default true, as TRL) turns dropout off in the policy and the reference; ``num_train_epochs``
sets ``max_steps`` from the number of training pairs
(:func:`rlhf_fast.trainers.common.steps_for_epochs`).

``padding_free`` (TRL's DPOConfig key, which TRL 1.16 ignores with a warning): the policy, and
the reference (its precomputed log-probs too), score each micro-batch as one row holding every
chosen then every rejected row's tokens without padding, position ids restarting per sequence
so attention stays inside each (SFT's ``packing``:
``sequence_logprobs(..., packed=True)``, :mod:`rlhf_fast.trainers.packing`). The per-token
log-probs come back at their padded places, so token counts, losses (every type, WPO and LD-DPO
included), metrics and gradients are the padded path's up to float rounding; it saves the
forward's work on padding. Needs a fusable LM head (checked when the trainer starts).

``prefix_sharing`` (ours; TRL has no such option) packs tighter: each pair once in the row, as
``[prompt, chosen, rejected]``, the rejected tokens attending to the prompt and themselves but not
to the chosen ones, their position ids continuing from the prompt's end
(:class:`rlhf_fast.models.llama_forward.SharedPrefixSegments`; the shared part is all the leading
tokens the two rows have in common, so with ``keep_end`` a pair whose rows kept different prompt
tokens shares only what they still have in common). Every prompt token is scored once instead of
twice in the policy's forward and backward and the reference's forward (precomputed log-probs
too); the prompt's last state predicts both responses' first tokens. The per-token values come
back at their padded places, so everything after is unchanged, as with ``padding_free``. It
implies padding-free (``padding_free`` may be set too, it changes nothing then). Needs a fusable
LM head and a Llama / Mistral / Qwen2 / Qwen3 backbone that
:mod:`rlhf_fast.models.llama_forward` computes — no peft / LoRA adapters, not under the torch
backend — for the policy and the reference (checked when the trainer starts: a ValueError naming
``prefix_sharing``). Measured on the CPU (benchmarks/e2e.py's DPO step, 8 pairs, responses 65–129
tokens, h = 64, 2 layers, 1 thread, min of 12 alternating steps): prompts of 512 tokens 218 ->
144 ms a step (71 -> 53 MiB extra peak) at V = 256, 956 -> 806 ms at V = 32768 (the LM head,
response tokens only either way, dominates); prompts of 64 tokens 56 -> 52 ms.

Encoding (as SFT): the prompt as generation sees it (plain text with the tokenizer's special
tokens, a chat through its template), the response without special tokens, one eos. A
conversational pair (chat prompt, chosen / rejected as chat messages, TRL's conversational
preference format) takes the tokens the chat template writes for each response's turns after
the prompt: content and end of turn, no eos added — TRL's ``apply_chat_template(prompt +
chosen)`` ids (:func:`rlhf_fast.trainers.sft_data.completion_tokens`). A pair without prompt
(TRL's implicit prompt) was split when loaded (:func:`rlhf_fast.feedback.formats.extract_prompt`). Truncation
to ``max_len`` tokens per row (:func:`truncate_pair`), by ``truncation_mode``: ``balanced`` (the
default) cuts a prompt longer than the room the pair's longer response leaves from its start
(its end, next to the response, is kept), but never below half of ``max_len``; responses then
lose their tail (and their eos) to fit; both rows of a pair share the same prompt tokens.
``keep_start`` / ``keep_end`` are TRL 1.16's: each row (prompt + one response) keeps its first /
last ``max_len`` tokens, the ids of TRL's ``DataCollatorForPreference``; ``keep_start`` drops a
pair whose prompt fills ``max_len`` (as TRL), ``keep_end`` keeps each response's end and eos.
Before that, ``max_prompt_length`` keeps the prompt's last tokens and ``max_completion_length``
each response's first (TRL 0.x's DPO ``tokenize_row``; TRL 1.16's DPO has neither).

Data (``data_kind``): ``pairs`` (JSONL/Parquet, :mod:`rlhf_fast.feedback.formats`),
``rankings`` (every implied pair), ``labels`` (files written by ``rlhf-fast label`` / ``judge``);
without ``data``, the reward trainer's synthetic pairs. Checkpoints, exact resume, DDP / FSDP2,
bf16 autocast, gradient accumulation and the final model (``output_dir/final``, with its
tokenizer; a LoRA run saves the adapter) as in SFT.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from rlhf_fast.distributed import DistributedConfig, reshard
from rlhf_fast.feedback.formats import _shown, response_text
from rlhf_fast.models.moe_aux import RouterAux, check_coef, suspended
from rlhf_fast.ops._validate import finite

from .bema import BEMAConfig, check_bema_field, setup_bema  # (its other hooks: in sft's shared loop)
from .common import (annotator_weight_map, autocast_context, check_annotator_weights, check_bool_fields,
                     check_lora_field, check_training_schedule, disable_dropout, load_split_records, pad_token_id,
                     record_weight, steps_for_epochs, trainer_commands, trainer_model)
from .common import LoggingOptions, ModelInitOptions, OptimizerOptions
from .compile import CompileOptions
from .config import typed_config
from .merging import MergeOptions
from .preference_losses import (ALPHA_LOSSES, BATCH_LOSSES, F_DIVERGENCE_LOSSES, F_DIVERGENCES, LOSS_TYPES, MARGIN_LOSSES,
                                SMOOTHED_LOSSES, TPO_LOSSES, dpo_loss, is_reference_free, ld_weighted_logps,
                                loss_terms, reference_free_loss)
from .sft import (_Batches, accumulation_context, collate, count_tokens, eval_mode, init_optimization, local_share,
                  local_span, offload_context, open_trainer, optimizer_step, resume_supervised, save_supervised,
                  training_loop, wrap_configured)
from .tpo import check_tpo_fields, encode_triple, gold_rows, tpo_loss_name, triple_groups, truncate_gold

DATA_KINDS = ("pairs", "rankings", "labels")
# "balanced": ours (the prompt's end, down to half of max_len, then the responses' start);
# "keep_start" / "keep_end": TRL 1.16's DataCollatorForPreference, each row cut on its own
TRUNCATION_MODES = ("balanced", "keep_start", "keep_end")
# Σ w·loss, Σ chosen / rejected reward, Σ accuracy, Σ margin, Σ chosen / rejected logged logps, pairs,
# Σ NLL, NLL tokens, Σ log σ(log-odds), Σ log-odds (orpo), Σ response entropy, response tokens,
# Σ chosen / rejected mean logit, chosen / rejected response tokens, chosen top-1 tokens
N_SUMS = 19
# the per-token statistics of the policy's pass the metrics are made of (TRL's fused-head outputs)
TOKEN_STATS = dict(return_entropy=True, return_top1=True, return_mean_logit=True)


@typed_config(loose=("data", "eval_data"))  # (rows or a path: common._check_data_source)
@dataclasses.dataclass
class DPOConfig(ModelInitOptions, OptimizerOptions, LoggingOptions, CompileOptions, MergeOptions):
    """DPO settings. ``data``: JSONL/Parquet of ``data_kind`` records (None: synthetic pairs
    with a hidden rule, so the defaults run); ``beta`` β scales the implicit reward
    β·(log π − log π_ref); ``loss_type`` (a name, a comma-separated string or a list),
    ``loss_weights`` (null: 1 each) and the loss options as in the module docstring;
    ``lora``: None, or LoraConfig fields ({} for r=8, alpha=16, every linear layer)."""

    model: str = "tiny:llama:hidden_size=64,num_layers=2,num_heads=4"
    ref_model: Optional[str] = None  # a saved model folder; None: the initial policy
    lora: Optional[Dict[str, Any]] = None
    data: Optional[str] = None
    data_kind: str = "pairs"
    eval_data: Optional[str] = None
    eval_fraction: float = 0.1
    output_dir: str = "runs/dpo"
    max_len: int = 256
    # TRL's: each batch's length rounded up to a multiple of this (tensor-core / kernel-friendly shapes); null: none
    pad_to_multiple_of: Optional[int] = None
    padding_value: Optional[int] = None  # TRL ORPOConfig's: the id the batches' padding holds (null: the tokenizer's pad)
    # how a row longer than max_len is cut: "balanced" (the prompt's end and the responses' start),
    # or TRL's "keep_start" / "keep_end" (each row's first / last max_len tokens)
    truncation_mode: str = "balanced"
    max_prompt_length: Optional[int] = None  # null: no cap; else the prompt's last tokens (TRL 0.x's DPOConfig)
    max_completion_length: Optional[int] = None  # null: no cap; else each response's first tokens, eos included
    batch_size: int = 8  # pairs per micro-batch (twice as many rows)
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
    loss_type: Union[str, List[str]] = "sigmoid"
    loss_weights: Optional[List[float]] = None  # one per loss_type entry; null: 1.0 each
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    use_margin: bool = False
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: Optional[float] = None  # LD-DPO: the weight of the longer response's tail; null: off
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0  # simpo / cpo / cpo_hinge / cpo_ipo: weight of the chosen NLL (TRL's CPOConfig default)
    alpha: float = 0.0  # AlphaPO (TRL's CPOConfig alpha): the CPO losses' scores s become (1 - e^(-alpha*s)) / alpha
    # TRL's experimental TPO (loss_type tpo / tpo_hinge / tpo_ipo / tpo_l; rlhf_fast.trainers.tpo): the weight of
    # the gold (reference) response's NLL (0: no gold rows, as TRL), and tpo_l's target margin
    tpo_alpha: float = 1.0
    tpo_l_gamma: float = 0.5
    annotator_weights: Dict[str, float] = dataclasses.field(default_factory=dict)
    auto_annotator_weights: bool = False
    precompute_ref_logps: bool = False
    precompute_ref_batch_size: Optional[int] = None  # pairs per reference forward of the precompute; null: batch_size
    sync_ref_model: bool = False  # TR-DPO: mix the policy into the reference every ref_model_sync_steps steps
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    # TRL's BEMACallback (its argument names and defaults; rlhf_fast.trainers.bema): BEMA weights of the policy,
    # saved to RUN_DIR/bema, and with update_ref_model (TRL's experimental bema_for_ref_model) the reference
    bema: Optional[BEMAConfig] = None
    use_weighting: bool = False  # WPO: each pair's loss × the policy's length-normalised probabilities
    padding_free: bool = False  # one packed row per micro-batch (policy and reference): less compute, same loss
    prefix_sharing: bool = False  # padding_free with each pair's prompt scored once: [prompt, chosen, rejected]
    num_train_epochs: Optional[float] = None  # set: max_steps from the number of training pairs
    disable_dropout: bool = True  # as TRL's DPOConfig: dropout off in the policy and the reference
    # TRL's: weight of an MoE policy's router load-balancing loss (null: the model config's own; 0 if dense)
    router_aux_loss_coef: Optional[float] = None
    # TRL's CPO / ORPO option: greedy answers to batch_size eval prompts at each evaluation, policy and
    # reference, appended to RUN_DIR/eval_samples.jsonl (rlhf_fast.trainers.eval_samples)
    generate_during_eval: bool = False
    eval_every: int = 50
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    resume: bool = True
    dedup: bool = True
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def __post_init__(self):
        check_policy_fields(self)
        check_truncation_fields(self)
        if self.data_kind not in DATA_KINDS:
            raise ValueError(f"data_kind must be one of {DATA_KINDS}, got {self.data_kind!r}")
        finite("beta", self.beta, "> 0")
        if self.loss_type == "alphapo":  # TRL CPOConfig's shorthand, resolved as TRL resolves it
            self.loss_type, self.cpo_alpha = "simpo", 0.0
        if isinstance(self.loss_type, str) and "," in self.loss_type:  # `--loss_type sigmoid,sft` on the CLI
            self.loss_type = [s.strip() for s in self.loss_type.split(",")]
        terms = loss_terms(self.loss_type, self.loss_weights)
        names = [n for n, _ in terms]
        finite("rpo_alpha", self.rpo_alpha, ">= 0")
        if is_reference_free(terms):
            free = names[0]
            for field, bad in (("ref_model", self.ref_model is not None), ("precompute_ref_logps",
                                                                           self.precompute_ref_logps),
                               ("rpo_alpha", self.rpo_alpha > 0), ("use_margin", self.use_margin),
                               ("ld_alpha", self.ld_alpha is not None),
                               ("f_divergence_type", self.f_divergence_type != "reverse_kl")):
                if bad:
                    why = (f"its NLL term is {'tpo_alpha' if free in TPO_LOSSES else 'cpo_alpha'}" if free != "orpo"
                           else "its NLL term is built in") \
                        if field == "rpo_alpha" else "it uses no reference model"
                    raise ValueError(f"{field} must be left unset with the reference-free loss_type {free!r} ({why})")
        ls = finite("label_smoothing", self.label_smoothing, ">= 0")
        if not ls < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if ls > 0 and not set(names) & SMOOTHED_LOSSES:
            raise ValueError(f"label_smoothing ({ls}) applies to loss_type {sorted(SMOOTHED_LOSSES)} only, "
                             f"not {names}")
        if "exo_pair" in names and ls == 0:
            raise ValueError("label_smoothing must be > 0 for loss_type 'exo_pair' (its target [1-eps, eps] has "
                             "log eps; the EXO paper uses 1e-3)")
        finite("cpo_alpha", self.cpo_alpha, ">= 0")
        if finite("alpha", self.alpha) != 0 and not (is_reference_free(terms) and names[0] in ALPHA_LOSSES):
            raise ValueError(f"alpha (AlphaPO's reward shape) applies to loss_type {sorted(ALPHA_LOSSES)} only "
                             f"(TRL's CPOTrainer losses), got {names}")
        finite("simpo_gamma", self.simpo_gamma)
        check_tpo_fields(self)
        if not any(w > 0 for n, w in terms if n != "sft") and self.nll_weight == 0:
            raise ValueError(f"loss_weights {[w for _, w in terms]} and the NLL weight (rpo_alpha / cpo_alpha / "
                             f"tpo_alpha) are all 0 for loss_type {names}: the loss would be 0 and nothing trained")
        finite("discopop_tau", self.discopop_tau, "> 0")
        finite("f_alpha_divergence_coef", self.f_alpha_divergence_coef)
        check_bool_fields(self, ("use_margin", "auto_annotator_weights", "precompute_ref_logps", "padding_free",
                                 "prefix_sharing", "resume", "dedup"))
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {self.f_divergence_type!r}")
        if self.f_divergence_type != "reverse_kl" and not set(names) <= F_DIVERGENCE_LOSSES:
            raise ValueError(f"f_divergence_type {self.f_divergence_type!r} applies to loss_type "
                             f"{sorted(F_DIVERGENCE_LOSSES)} only (the others have no f-divergence form), "
                             f"got {names}")
        if self.ld_alpha is not None and not 0.0 <= finite("ld_alpha", self.ld_alpha) <= 1.0:
            raise ValueError(f"ld_alpha must be null or in [0, 1], got {self.ld_alpha}")
        if self.use_margin and not set(names) <= MARGIN_LOSSES:
            raise ValueError(f"use_margin applies to loss_type 'sigmoid', 'robust' or 'hinge', not {names} "
                             "(IPO regresses onto a fixed gap of 1/(2·beta); the others have no margin form)")
        if self.use_margin and set(names) <= {"sft"}:  # MARGIN_LOSSES admits sft only beside a margin loss
            raise ValueError(f"use_margin needs loss_type 'sigmoid', 'robust' or 'hinge' (alone or beside 'sft'), "
                             f"got {names}: 'sft' (the chosen responses' NLL) has no beta·δ to subtract a margin "
                             "from, so the margins would be unused")
        check_annotator_weights(self)
        batch = sorted(set(names) & BATCH_LOSSES)
        if batch and (self.annotator_weights or self.auto_annotator_weights):
            raise ValueError(f"annotator_weights / auto_annotator_weights do not apply to loss_type {batch}: it sorts "
                             "over the micro-batch, so its terms are not per pair")
        check_reference_fields(self, names[0] if is_reference_free(terms) else None)
        self.bema = check_bema_field(self, names[0] if is_reference_free(terms) else None)
        check_bool_fields(self, ("use_weighting", "generate_during_eval"))
        if self.padding_value is not None and (isinstance(self.padding_value, bool)
                                               or not isinstance(self.padding_value, int) or self.padding_value < 0):
            raise ValueError(f"padding_value must be null (the tokenizer's pad) or a token id >= 0, "
                             f"got {self.padding_value!r}")
        if self.use_weighting:
            if is_reference_free(terms):
                raise ValueError(f"use_weighting does not apply to the reference-free loss_type {names[0]!r} (TRL's "
                                 "CPO / ORPO trainers have no WPO weighting)")
            if batch:  # TRL refuses these too
                raise ValueError(f"use_weighting does not apply to loss_type {batch}: it sorts over the micro-batch, "
                                 "so the per-pair weights would not line up with the terms")
    @property
    def loss_terms(self) -> Tuple[Tuple[str, float], ...]:
        """``((loss name, weight), ...)`` of ``loss_type`` and ``loss_weights``."""
        return loss_terms(self.loss_type, self.loss_weights)

    @property
    def reference_free(self) -> bool:
        """Whether the loss is simpo, cpo or orpo: no reference model, no reference forward."""
        return is_reference_free(self.loss_terms)

    @property
    def pack_kwargs(self) -> Dict[str, bool]:
        """The log-prob functions' packing keywords: ``packed`` (``padding_free``) and, only when
        set (the default call stays the old one), ``prefix_sharing``."""
        return {"packed": self.padding_free, **({"prefix_sharing": True} if self.prefix_sharing else {})}

    @property
    def nll_weight(self) -> float:
        """The weight of the token-mean NLL of the chosen rows: ``rpo_alpha`` + the ``sft``
        weights; ``cpo_alpha`` for simpo / cpo; 1 for orpo; ``tpo_alpha`` (of the gold rows) for tpo."""
        terms = self.loss_terms
        if self.reference_free:
            if terms[0][0] in TPO_LOSSES:
                return float(self.tpo_alpha)
            return 1.0 if terms[0][0] == "orpo" else float(self.cpo_alpha)
        return float(self.rpo_alpha) + sum(w for n, w in terms if n == "sft")


def check_reference_fields(cfg, reference_free: Optional[str] = None) -> None:
    """The checks every offline preference config (DPO, KTO) makes of its reference options:
    ``precompute_ref_batch_size`` (null or an int >= 1), and TR-DPO's ``sync_ref_model`` /
    ``ref_model_mixup_alpha`` (in [0, 1]) / ``ref_model_sync_steps`` (an int >= 1), refused
    where there is no reference model to move: with ``precompute_ref_logps`` (the log-probs
    would go stale, as TRL refuses), with ``lora`` (the reference is the adapter-disabled
    policy itself, as TRL refuses) and with the ``reference_free`` loss named. ValueError
    naming the field."""
    n = cfg.precompute_ref_batch_size
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"precompute_ref_batch_size must be null or an int >= 1, got {n!r}")
    check_bool_fields(cfg, ("sync_ref_model",))
    if not 0.0 <= finite("ref_model_mixup_alpha", cfg.ref_model_mixup_alpha) <= 1.0:
        raise ValueError(f"ref_model_mixup_alpha must be in [0, 1], got {cfg.ref_model_mixup_alpha}")
    k = cfg.ref_model_sync_steps
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"ref_model_sync_steps must be an int >= 1, got {k!r}")
    if not cfg.sync_ref_model:
        return
    if cfg.precompute_ref_logps:
        raise ValueError("sync_ref_model and precompute_ref_logps cannot both be true: the reference moves every "
                         "ref_model_sync_steps steps, so log-probs scored once before training would go stale")
    if cfg.lora is not None:
        raise ValueError("sync_ref_model cannot be used with lora: the reference of a LoRA policy is the policy "
                         "with its adapters disabled, with no weights of its own to move (TRL refuses it too)")
    if reference_free is not None:
        raise ValueError(f"sync_ref_model must be left unset with the reference-free loss_type {reference_free!r} "
                         "(it uses no reference model)")


def check_policy_fields(cfg) -> None:
    """The checks every offline preference config (DPO, KTO) makes of its schedule, ``model``,
    ``ref_model``, ``lora`` (whose values, given as ``--lora.r 16`` text, are read as YAML) and
    ``max_len``; ValueError naming the field."""
    check_training_schedule(cfg)
    if not isinstance(cfg.model, str) or not cfg.model:
        raise ValueError(f"model must be a local folder or a 'tiny:' spec, got {cfg.model!r}")
    if cfg.ref_model is not None and (not isinstance(cfg.ref_model, str) or not cfg.ref_model):
        raise ValueError(f"ref_model must be a local model folder or null, got {cfg.ref_model!r}")
    check_lora_field(cfg)
    check_coef(cfg.router_aux_loss_coef)
    if cfg.max_len < 2:  # one prompt token and one response token at the least
        raise ValueError(f"max_len must be >= 2, got {cfg.max_len}")


def check_truncation_mode(mode) -> None:
    """ValueError naming truncation_mode unless ``mode`` is one of :data:`TRUNCATION_MODES`."""
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {mode!r}")


def check_truncation_fields(cfg) -> None:
    """``truncation_mode`` (one of :data:`TRUNCATION_MODES`) and ``max_prompt_length`` /
    ``max_completion_length`` (null or an int >= 1); ValueError naming the field."""
    check_truncation_mode(cfg.truncation_mode)
    for name in ("max_prompt_length", "max_completion_length"):
        n = getattr(cfg, name)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{name} must be null or an int >= 1, got {n!r}")


# ------------------------------------------------------------------ the loss


# dpo_loss and the other loss functions: rlhf_fast.trainers.preference_losses (re-exported here)


# ------------------------------------------------------------------ data


def with_eos(tokenizer, text: str) -> str:
    """``text`` ending with the tokenizer's eos token text (appended unless it ends with it;
    none without an eos token): TRL's DPO / KTO / TPO ``add_eos`` on text completions."""
    eos = tokenizer.eos_token
    return text + eos if eos and not text.endswith(eos) else text


def encode_texts(tokenizer, prompt: Any, responses: Sequence[str]) -> Tuple[List[int], List[List[int]]]:
    """``(prompt ids, [response ids, ...])`` (int lists) of text ``responses`` after ``prompt``
    (text, or chat messages rendered with the generation prompt to text). Each response + eos
    (:func:`with_eos`) is encoded as the continuation of the prompt text
    (:func:`rlhf_fast.trainers.sft_data.continuation_ids`: prompt + response encoded whole, the
    prompt's ids cut off), TRL's DPO / KTO / TPO ``tokenize_fn`` ids — not alone, where a
    SentencePiece tokenizer writes a prefix space ("▁red") the text after the prompt does not
    have. Where a token merges across the boundary TRL cuts the prompt to the ids it shares
    with prompt + response; here that response is encoded alone and the prompt kept. Text
    prompts get the tokenizer's special tokens (e.g. bos); a rendered chat template its own."""
    from rlhf_fast.feedback.formats import render_prompt

    from .sft_data import check_chat_template, continuation_ids

    if not isinstance(prompt, str):  # (TRL fails alike; "role: content" lines would be a format of our own)
        check_chat_template(tokenizer)
    text, special = render_prompt(prompt, tokenizer), isinstance(prompt, str)
    p = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    return p, [continuation_ids(tokenizer, text, p, with_eos(tokenizer, t), add_special_tokens=special)
               for t in responses]


def encode_pair(tokenizer, prompt: Any, chosen: Any, rejected: Any, max_len: Optional[int]
                ) -> Optional[Tuple[List[int], List[int], List[int]]]:
    """``(prompt ids, chosen ids, rejected ids)`` of one pair, truncated to ``max_len`` tokens per
    row the ``balanced`` way (:func:`truncate_pair`; ``max_len`` None: not cut); None when the
    prompt has no token. ``chosen`` /
    ``rejected`` are texts (+ eos, encoded after the prompt text: :func:`encode_texts`) or,
    after a chat prompt, chat messages: the tokens the chat template writes for them after the
    prompt (content and end of turn, no eos added;
    :func:`rlhf_fast.trainers.sft_data.completion_tokens`); either way TRL's ids."""
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        from .sft_data import completion_tokens

        if isinstance(chosen, str) or isinstance(rejected, str) or isinstance(prompt, str):
            raise ValueError("a conversational pair needs a chat prompt and chat messages as both chosen and rejected, "
                             f"got prompt {type(prompt).__name__}, chosen {type(chosen).__name__}, "
                             f"rejected {type(rejected).__name__}")

        p, (c, r) = completion_tokens(tokenizer, prompt, chosen, rejected)  # one prompt for both rows, as TRL
    else:
        p, (c, r) = encode_texts(tokenizer, prompt, (chosen, rejected))
    if not p:
        return None
    if max_len is None:
        return p, c, r
    cut = truncate_pair(p, c, r, max_len)
    return cut["prompt"], cut["chosen"], cut["rejected"]


def _keep_end(p: List[int], y: List[int], max_len: int) -> Tuple[List[int], List[int]]:
    """``(prompt part, response part)`` of the row ``p + y`` cut to its last ``max_len`` tokens."""
    room = max(0, max_len - len(y))  # prompt tokens the response leaves
    return p[len(p) - min(len(p), room):], y[max(0, len(y) - max_len):]


def truncate_pair(p: List[int], c: List[int], r: List[int], max_len: int, mode: str = "balanced", *,
                  max_prompt_length: Optional[int] = None, max_completion_length: Optional[int] = None
                  ) -> Optional[Dict[str, List[int]]]:
    """The token lists of one pair cut to fit ``max_len`` per row (prompt + one response):
    ``{"prompt", "chosen", "rejected"}`` (int lists), and ``"rejected_prompt"`` when the
    rejected row keeps other prompt tokens than the chosen one (``keep_end`` only); None when
    the pair is dropped. First (TRL 0.x's DPO ``tokenize_row``) ``max_prompt_length`` keeps the
    prompt's last tokens and ``max_completion_length`` each response's first (its eos goes when
    cut). Then ``mode``:

    * ``balanced`` (ours): a prompt longer than the room the longer response leaves is cut from
      its start, but never below half of ``max_len``; the responses then lose their tail (and
      eos). Both rows keep the same prompt tokens.
    * ``keep_start`` (TRL 1.16's ``DataCollatorForPreference``): each row's first ``max_len``
      tokens — the whole prompt, the responses' start; a pair whose prompt alone has
      ``max_len`` tokens or more is dropped (as TRL's dataset preparation drops it).
    * ``keep_end`` (TRL's): each row's last ``max_len`` tokens — the responses whole (eos kept)
      when they fit, the prompt cut from its start, each row on its own, so the two rows may
      keep different prompt tokens; a response longer than ``max_len`` loses its start and the
      prompt."""
    if max_prompt_length is not None:
        p = p[len(p) - min(len(p), max_prompt_length):]
    if max_completion_length is not None:
        c, r = c[:max_completion_length], r[:max_completion_length]
    if mode == "keep_end":
        (pc, c), (pr, r) = _keep_end(p, c, max_len), _keep_end(p, r, max_len)
        out = {"prompt": pc, "chosen": c, "rejected": r}
        if pr != pc:
            out["rejected_prompt"] = pr
        return out
    if mode == "keep_start":
        if len(p) >= max_len:  # no response token would be left
            return None
        return {"prompt": p, "chosen": c[: max_len - len(p)], "rejected": r[: max_len - len(p)]}
    if mode != "balanced":
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {mode!r}")
    longest = max(len(c), len(r))
    if len(p) + longest > max_len:
        keep = max(1, min(len(p), max(max_len - longest, max_len // 2)))
        p = p[-keep:]
        c, r = c[: max_len - keep], r[: max_len - keep]
    return {"prompt": p, "chosen": c, "rejected": r}


def prompt_response_rows(items: Sequence[Dict[str, Any]], key: str) -> List[Dict[str, List[int]]]:
    """The token rows of ``items``: prompt (``item[key + "_prompt"]`` where there is one) +
    their ``key`` response, the response mask over the response (the rows
    :func:`rlhf_fast.trainers.sft.collate` pads)."""
    rows = []
    for it in items:
        p = it.get(key + "_prompt", it["prompt"])  # keep_end: a rejected row may keep less of the prompt
        rows.append({"input_ids": p + it[key], "response_mask": [0] * len(p) + [1] * len(it[key])})
    return rows


def collate_pairs(items: Sequence[Dict[str, Any]], pad_id: int,
                  pad_to_multiple_of: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The rows of ``items`` — every chosen row, then every rejected row — as right-padded
    ``input_ids``, ``attention_mask``, ``response_mask`` ``[2B, T]`` int64 (:func:`collate`).
    Items with a ``gold`` response (TPO) add every gold row after them (``[3B, T]``) and
    ``prefix_groups`` ``[B, 3]``, each pair's three rows (:func:`rlhf_fast.trainers.tpo.triple_groups`)."""
    rows = prompt_response_rows(items, "chosen") + prompt_response_rows(items, "rejected")
    if not (items and "gold" in items[0]):
        return collate(rows, pad_id, pad_to_multiple_of)
    out = collate(rows + prompt_response_rows(items, "gold"), pad_id, pad_to_multiple_of)
    out["prefix_groups"] = triple_groups(len(items))
    return out


def token_logps(model, batch: Dict[str, torch.Tensor], full_rows: int = 0, *, packed: bool = False,
                return_entropy: bool = False, return_top1: bool = False, return_mean_logit: bool = False,
                prefix_sharing: bool = False):
    """``[N, T]`` float32 per-token log π(token | tokens before it) of ``batch``'s rows through
    the fused LM head, at each response token (0 elsewhere) — over every attended token (the
    prompt too) for the first ``full_rows`` rows (ORPO's NLL counts the prompt). ``packed``: the
    rows run as one padding-free row (``padding_free``; SFT's ``packing``), the values placed
    back at their ``[N, T]`` positions; ``prefix_sharing``: one row with each pair's (rows i and
    i + N/2) prompt once (``prefix_sharing``), the values placed back the same way.
    ``return_entropy``: ``(log-probs, entropy [N, T] float32)``,
    the entropy of each predicting distribution from the same pass, at the same positions;
    ``return_top1`` / ``return_mean_logit``: further outputs in that order, as
    :func:`~rlhf_fast.models.logprobs.sequence_logprobs` gives them."""
    from rlhf_fast.models.logprobs import sequence_logprobs

    mask = batch["response_mask"]
    if full_rows:
        mask = torch.cat([batch["attention_mask"][:full_rows], mask[full_rows:]])
    # only the statistics asked for: the default call stays the old one
    extra = {k: True for k, v in (("return_top1", return_top1), ("return_mean_logit", return_mean_logit),
                                  ("prefix_sharing", prefix_sharing)) if v}
    if prefix_sharing and "prefix_groups" in batch:  # TPO: a pair's three rows, not rows i and i + N/2
        extra["prefix_groups"] = batch["prefix_groups"]
    return sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], response_mask=mask, packed=packed,
                             return_entropy=return_entropy, **extra)


def response_mask(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``[N, T]`` bool: the attended response tokens of ``batch``'s rows that are scored — not
    column 0, which no token predicts (a row keep_end cut to its response alone starts there),
    so LD-DPO's positions run over TRL's shifted completion mask."""
    mask = batch["response_mask"].bool() & batch["attention_mask"].bool()
    mask[:, 0] = False
    return mask


def response_logps(model, batch: Dict[str, torch.Tensor], *, ld_alpha: Optional[float] = None,
                   packed: bool = False, prefix_sharing: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(log-prob [N] float32, token count [N] int64)`` of each row's response: the sum of
    log π(token | tokens before it) over its response tokens, through the fused LM head; with
    ``ld_alpha`` (rows ``[chosen × B, rejected × B]``) LD-DPO's weighted sum
    (:func:`rlhf_fast.trainers.preference_losses.ld_weighted_logps`). ``packed``: one
    padding-free forward, ``prefix_sharing`` one with each pair's prompt once (:func:`token_logps`);
    the counts come from the batch's masks either way."""
    logp = token_logps(model, batch, packed=packed, prefix_sharing=prefix_sharing)  # [N, T], 0 outside the response
    mask = response_mask(batch)
    count = mask[:, 1:].sum(-1)
    if ld_alpha is not None:
        return ld_weighted_logps(logp, mask, ld_alpha), count
    return logp.sum(-1), count


def response_logps_metrics(model, batch: Dict[str, torch.Tensor], *, packed: bool = False, top1: bool = True,
                           prefix_sharing: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """:func:`response_logps`' ``(log-prob [N], token count [N])`` (no ``ld_alpha``), the same
    values, and from the same fused pass the row sums of :func:`response_token_stats`
    (``entropy``, ``mean_logit`` and, with ``top1``, ``top1``; each ``[N]``, detached): the
    policy's call for TRL's metrics. (Not folded into ``response_logps``: benchmarks/e2e.py wraps
    that as ``(model, batch)``.)"""
    out = token_logps(model, batch, packed=packed, return_entropy=True, return_top1=top1, return_mean_logit=True,
                      prefix_sharing=prefix_sharing)
    mask = response_mask(batch)
    return out[0].sum(-1), mask[:, 1:].sum(-1), response_token_stats(out[1:], mask, top1=top1)


def response_token_stats(stats: Sequence[torch.Tensor], mask: torch.Tensor, *, top1: bool = True
                         ) -> Dict[str, torch.Tensor]:
    """Row sums ``[N]`` over the response tokens ``mask`` ``[N, T]`` of the per-token ``stats``
    (entropy, top-1 when ``top1``, mean logit; ``[N, T]`` each, in that order, as
    :func:`token_logps` returns them after the log-probs): keys ``entropy``, ``top1`` (the tokens
    that are their logits' argmax, float32), ``mean_logit``; detached."""
    ent, *rest = stats
    out = {"entropy": response_entropy(ent, mask)}
    if top1:
        out["top1"] = (rest.pop(0) & mask).sum(-1).float()
    out["mean_logit"] = (rest.pop(0).detach() * mask).sum(-1)
    return out


def response_entropy(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` float32, detached: each row's per-token ``entropy`` ``[N, T]`` summed over its
    response tokens ``mask`` ``[N, T]`` (TRL's DPO / KTO ``entropy`` metric is the sum over
    every row of the batch divided by their response tokens)."""
    return (entropy.detach() * mask).sum(-1)


def pair_tokens(item: Dict[str, Any]) -> int:
    """The input tokens of a pair's two rows (prompt + chosen, prompt + rejected; and prompt + gold
    for TPO), padding not counted: what TRL's DPOTrainer (TPOTrainer) adds to ``num_tokens`` for it."""
    return sum(len(item.get(k + "_prompt", item["prompt"])) + len(item[k]) for k in ("chosen", "rejected", "gold")
               if k in item)


def load_offline_policy(cfg, model, tokenizer, texts: Sequence[str], device):
    """``(policy, tokenizer, pad id, is_peft)`` of an offline preference trainer: ``model`` /
    ``tokenizer`` as given (both, or neither: then ``cfg.model`` is loaded, a tiny model's
    tokenizer trained on ``texts``), on ``device``, wrapped for LoRA and activation checkpointing
    when ``cfg`` asks (with frozen embeddings under LoRA, input gradients kept so the checkpointed
    blocks backpropagate)."""
    from rlhf_fast.models import loading

    model, tokenizer = trainer_model(cfg, model, tokenizer, lambda: texts)
    pad_id = pad_token_id(tokenizer)
    model = model.to(device)
    if cfg.lora is not None or cfg.gradient_checkpointing:
        model = loading.load_policy(model, gradient_checkpointing=cfg.gradient_checkpointing, lora=cfg.lora)
    return model, tokenizer, pad_id, loading._is_peft(model)


def _logps_kwargs(ld_alpha: Optional[float], packed: bool, prefix_sharing: bool = False) -> Dict[str, Any]:
    """:func:`response_logps`' keywords, only those that are set: benchmarks/e2e.py times the
    plain calls through a ``(model, batch)`` wrapper."""
    kw: Dict[str, Any] = {} if ld_alpha is None else {"ld_alpha": ld_alpha}
    if packed:
        kw["packed"] = True
    if prefix_sharing:
        kw["prefix_sharing"] = True
    return kw


@torch.no_grad()
def reference_logps(reference, batch: Dict[str, torch.Tensor], sharded: bool, *, ld_alpha: Optional[float] = None,
                    packed: bool = False, prefix_sharing: bool = False) -> torch.Tensor:
    """The summed response log-probs ``[N]`` of ``batch`` under the frozen ``reference``
    (LD-weighted with ``ld_alpha``; one padding-free row with ``packed``, one with each pair's
    prompt once with ``prefix_sharing``); a ``sharded`` (FSDP2)
    reference's root is resharded after (it keeps its gathered copy of the embeddings and head
    after a forward)."""
    with suspended():  # not an evaluation's MoE term (a LoRA policy's reference is its own base model)
        logps, _ = response_logps(reference, batch, **_logps_kwargs(ld_alpha, packed, prefix_sharing))
    if sharded:
        reshard(reference)
    return logps


@torch.no_grad()
def precompute_reference_logps(reference, items: Sequence[Dict[str, Any]], batch_of, *, ctx, batch_size: int,
                               bf16: bool, device, ld_alpha: Optional[float] = None,
                               rows: int = 2, packed: bool = False, prefix_sharing: bool = False,
                               fp16: bool = False) -> List[Tuple[float, ...]]:
    """Each item's ``rows`` reference log-probs (its rows, as ``batch_of(chunk)`` lays them out:
    every first row of the chunk, then every second, ...; LD-weighted with ``ld_alpha``),
    computed once — each rank its contiguous share in chunks of ``batch_size``, then summed over
    ranks — with ``reference`` in eval mode; each chunk one padding-free row with ``packed``, one
    with each pair's prompt once with ``prefix_sharing`` (``rows`` must be 2: the chunk's pairs)."""
    if prefix_sharing and rows != 2:
        raise ValueError(f"prefix_sharing scores pairs: rows must be 2, got {rows}")
    out = torch.zeros(len(items), rows, dtype=torch.float32, device=device)
    lo, hi = local_span(len(items), ctx)
    with eval_mode(reference.rlhf_wrapped if hasattr(reference, "rlhf_wrapped") else reference):
        for s in range(lo, hi, batch_size):
            chunk = items[s: min(s + batch_size, hi)]
            with autocast_context(device, bf16, fp16):
                lp, _ = response_logps(reference, batch_of(chunk), **_logps_kwargs(ld_alpha, packed, prefix_sharing))
            out[s: s + len(chunk)] = lp.view(rows, -1).t()
    return [tuple(r) for r in ctx.all_reduce_sum(out).cpu().tolist()]


def attach_reference_logps(trainer, reference, batch_of, **kw) -> None:
    """``item["ref"]`` of every training and eval item of a DPO / KTO ``trainer``: the tuple of
    its rows' reference log-probs (:func:`precompute_reference_logps` with ``batch_of`` and its
    options ``kw``, ``precompute_ref_batch_size`` items a forward; null: ``batch_size``),
    computed once, before training."""
    cfg = trainer.cfg
    items = trainer.train_items + trainer.eval_items
    refs = precompute_reference_logps(reference, items, batch_of, ctx=trainer.ctx,
                                      batch_size=cfg.precompute_ref_batch_size or cfg.batch_size, bf16=cfg.bf16,
                                      fp16=cfg.fp16, device=trainer.device, **kw)
    for it, ref in zip(items, refs):
        it["ref"] = ref


def offline_reference(cfg, model, is_peft: bool, device):
    """The reference of an offline preference trainer (DPO, KTO; ``cfg`` has ``ref_model`` and
    ``precompute_ref_logps``), before any update: a ``ref_model`` folder (checked to share the
    policy's vocabulary); else, when its log-probs are precomputed, the initial policy itself
    (scored before any update: no copy); else a frozen copy — for a peft policy the base with
    its adapters disabled, or a trained adapter's frozen copy (no copy of the base). A
    ``ref_model`` adapter folder is merged into its base (the model it holds)."""
    from rlhf_fast.models import loading

    if cfg.ref_model:
        # loaded as the policy is (TRL builds its reference with the same model_init_kwargs)
        ref = loading.load_merged(cfg.ref_model, init_kwargs=cfg.model_init_kwargs)  # (an adapter: merged)
        reference = loading.make_reference(ref, device=device)
        loading.check_same_vocabulary(model, reference, f"ref_model {cfg.ref_model!r}")
        return reference
    if cfg.precompute_ref_logps and not is_peft:
        return model
    return loading.make_reference(model)


def shard_reference(reference, dcfg: DistributedConfig, ctx) -> Tuple[Any, bool]:
    """``(reference, sharded)``: a separate reference model under FSDP2 on several ranks is
    sharded like the policy (each rank keeps 1/N of it; its one forward per micro-batch lines
    up on every rank) — ``sharded``: reshard it after each forward, or its root keeps the
    gathered embeddings and head (:func:`rlhf_fast.distributed.reshard`)."""
    if not (isinstance(reference, torch.nn.Module) and ctx.distributed and dcfg.strategy == "fsdp2"):
        return reference, False
    return wrap_configured(reference, dcfg, ctx), True


def wrap_offline_models(trainer, model) -> None:
    """The models of a DPO / KTO ``trainer`` (``reference`` and ``is_peft`` set) placed for
    training: ``trainer.model``, the policy ``model`` wrapped for the strategy; its reference
    sharded under FSDP2 (:func:`shard_reference`; none for a reference-free loss or precomputed
    log-probs) with ``_reference_sharded``; TR-DPO's parameter pairs (:func:`setup_moving_reference`)."""
    dcfg = trainer.cfg.distributed
    trainer.model = wrap_configured(model, dcfg, trainer.ctx)
    trainer.moe = RouterAux(trainer.model, trainer.cfg.router_aux_loss_coef)  # TRL's MoE term (or off)
    trainer._reference_sharded = False
    if trainer.reference is not None:
        trainer.reference, trainer._reference_sharded = shard_reference(trainer.reference, dcfg, trainer.ctx)
    setup_moving_reference(trainer)
    setup_bema(trainer)  # after the reference is placed: it may follow the BEMA weights


# ------------------------------------------------------------------ TR-DPO: the moving reference


def moving_reference_params(policy, reference) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``[(reference parameter, policy parameter)]`` matched by name (a DDP wrapper looked
    through; under FSDP2 both are sharded alike, so each pair is two local shards of the same
    placement). ValueError when the two models do not have the same parameters and shapes (a
    ``ref_model`` folder of another architecture cannot be mixed with the policy)."""
    from rlhf_fast.distributed import unwrap

    pol = dict(unwrap(policy).named_parameters())
    ref = dict(unwrap(reference).named_parameters())
    if pol.keys() != ref.keys() or any(pol[n].shape != ref[n].shape for n in pol):
        diff = sorted(set(pol) ^ set(ref)) or [n for n in pol if pol[n].shape != ref[n].shape]
        raise ValueError("sync_ref_model needs a reference with the policy's parameters (names and shapes), "
                         f"they differ at {diff[:3]}; use a ref_model of the policy's architecture")
    return [(ref[n], pol[n]) for n in pol]


@torch.no_grad()
def sync_reference(pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]], alpha: float) -> None:
    """TR-DPO's update of the reference, in place: π_ref ← α·π_θ + (1 − α)·π_ref for each
    ``(reference, policy)`` parameter pair of :func:`moving_reference_params` — the operations
    of TRL's ``SyncRefModelCallback._sync_target_model`` (the same rounding). Sharded (FSDP2)
    parameters mix shard by shard, each rank its own, with no communication."""
    for ref, pol in pairs:
        ref.mul_(1.0 - alpha).add_(pol, alpha=alpha)


def reference_checkpoint_dir(directory: str) -> str:
    """The folder that holds the moving reference of the checkpoint ``directory``
    (``.../checkpoints/step_N`` → ``.../checkpoints/reference_step_N``): written before the
    checkpoint itself, so a complete checkpoint always has its reference."""
    directory = os.path.normpath(directory)
    return os.path.join(os.path.dirname(directory), "reference_" + os.path.basename(directory))


def save_moving_reference(trainer) -> None:
    """Write ``trainer.reference`` (TR-DPO's moving reference: training state) for the
    checkpoint of ``trainer.step``, atomically, before :func:`save_supervised` writes the
    checkpoint: one process a safetensors copy, several ranks (or strategy ddp / fsdp2) a
    sharded one (each FSDP2 rank its shard)."""
    from rlhf_fast.distributed import save_sharded

    from .checkpoint import checkpoint_dir, save_checkpoint

    directory = reference_checkpoint_dir(checkpoint_dir(trainer.run.path, trainer.step))
    extra = {"step": trainer.step}
    if trainer.cfg.distributed.strategy == "none":
        save_checkpoint(directory, models={"reference": trainer.reference}, extra=extra)
    else:
        save_sharded(directory, trainer.reference, None, trainer.ctx, extra=extra, complete_marker=True)


def prune_moving_references(run_dir: str) -> None:
    """Remove the reference folders whose checkpoint is gone (pruned, or never completed)."""
    from .checkpoint import prune_companions

    prune_companions(run_dir, "reference_")


def load_moving_reference(trainer, directory: str, step: int) -> None:
    """Restore ``trainer.reference`` from the checkpoint ``directory`` of ``step`` (in either
    format, into this wrapping). A checkpoint without one (a run begun with ``sync_ref_model``
    off) is refused once a sync has happened, since the reference it had is lost."""
    from rlhf_fast.distributed import load_sharded

    from .checkpoint import load_checkpoint
    from .sft import is_sharded_checkpoint

    folder = reference_checkpoint_dir(directory)
    if not os.path.isfile(os.path.join(folder, "COMPLETE")):
        if step >= trainer.cfg.ref_model_sync_steps:
            raise ValueError(f"checkpoint {directory} has no moving reference ({folder}) though step {step} is past "
                             f"ref_model_sync_steps ({trainer.cfg.ref_model_sync_steps}): was it written with "
                             "sync_ref_model off? Resume with that setting, or start a new run")
        return  # no sync yet: the reference is still the initial one
    if is_sharded_checkpoint(folder):
        load_sharded(folder, trainer.reference, None, trainer.ctx)
    else:
        load_checkpoint(folder, models={"reference": trainer.reference}, restore_rng=False)


def setup_moving_reference(trainer) -> None:
    """``trainer._sync_pairs``: the (reference, policy) parameter pairs TR-DPO mixes, or None
    without ``sync_ref_model``; a peft policy (passed as ``model``) is refused."""
    trainer._sync_pairs = None
    if not trainer.cfg.sync_ref_model:
        return
    if trainer.is_peft:
        raise ValueError("sync_ref_model cannot be used with a peft policy: its reference is the policy with its "
                         "adapters disabled, with no weights of its own to move (TRL refuses it too)")
    trainer._sync_pairs = moving_reference_params(trainer.model, trainer.reference)


def maybe_sync_reference(trainer) -> bool:
    """After an optimizer step: mix the policy into the reference when ``trainer.step`` is a
    multiple of ``ref_model_sync_steps`` (TRL's ``on_step_end``: its global step already
    counts the step, so the first sync follows step ``ref_model_sync_steps``, before that
    step's evaluation and checkpoint). Returns whether it synced. At the first call a run too
    short for any sync is warned about (TRL's default 512 steps exceeds our max_steps default)."""
    if trainer._sync_pairs is None:
        return False
    if not getattr(trainer, "_sync_span_checked", False):  # (max_steps is final by now)
        trainer._sync_span_checked = True
        k, n = trainer.cfg.ref_model_sync_steps, trainer.cfg.max_steps
        if k > n:
            import warnings

            warnings.warn(f"sync_ref_model: the reference never moves in this run: the first sync is at step {k} "
                          f"(ref_model_sync_steps), after max_steps {n}; lower ref_model_sync_steps", UserWarning,
                          stacklevel=2)
    if trainer.step % trainer.cfg.ref_model_sync_steps:
        return False
    sync_reference(trainer._sync_pairs, trainer.cfg.ref_model_mixup_alpha)
    return True


def save_offline(trainer) -> None:
    """The checkpoint of a DPO / KTO trainer: the moving reference first (TR-DPO), then
    :func:`save_supervised`'s (BEMA's buffers, policy, optimizer, scheduler, step, data position)."""
    if trainer._sync_pairs is not None:
        save_moving_reference(trainer)
    save_supervised(trainer, "policy")
    if trainer._sync_pairs is not None and trainer.ctx.is_main:
        prune_moving_references(trainer.run.path)


def resume_offline(trainer) -> None:
    """:func:`resume_supervised` with the state kept beside that checkpoint: TR-DPO's moving
    reference (then, there, BEMA's buffers), loaded, or refused, before the run folder is rewritten."""
    def companions(ck: str, step: int) -> None:
        if trainer._sync_pairs is not None:
            load_moving_reference(trainer, ck, step)

    resume_supervised(trainer, "policy", companions)


def train_offline(trainer) -> Dict[str, float]:
    """``train()`` of a DPO / KTO trainer: resumed from its checkpoint when there is one
    (:func:`resume_offline`), trained to ``max_steps`` with an evaluation before the first step
    (:func:`training_loop`), the final model and tokenizer saved to ``output_dir/final`` (and
    the BEMA model to ``bema/``); returns the last metrics."""
    resume_offline(trainer)
    return training_loop(trainer, has_eval=bool(trainer.eval_items), eval_at_start=True)


def open_offline_trainer(trainer, cfg) -> None:
    """:func:`~rlhf_fast.trainers.sft.open_trainer`, then a ``ref_model`` folder checked, so that
    a wrong path is named before the data and the policy load."""
    from rlhf_fast.models import loading

    open_trainer(trainer, cfg)
    if cfg.ref_model:
        loading.check_model_folder(cfg.ref_model, "ref_model")


def weighted_share(losses: torch.Tensor, weights: torch.Tensor, weight_total: float) -> torch.Tensor:
    """A micro-batch's part (0-dim) of the step's weighted mean L = Σ w·ℓ / Σ w: Σ weights·losses
    (``[B]`` each; 0 weights for a share that does not count) over the global ``weight_total``
    (all micro-batches and ranks; 1 in its place when it is 0, so nothing trains)."""
    return (losses * weights).sum() / (weight_total if weight_total > 0 else 1.0)


def offline_optimizer_step(trainer) -> Dict[str, float]:
    """The end of a DPO / KTO step once its gradients are in: :func:`optimizer_step`, then
    TR-DPO's reference update (:func:`maybe_sync_reference`, TRL's ``on_step_end``); returns the
    step's ``grad_norm``, ``lr`` (the one the step trained with) and ``epoch`` metrics."""
    # (BEMA's update ran in optimizer_step, before TR-DPO's: they commute, since bema.update_ref_model and
    # sync_ref_model are refused together and the BEMA buffers do not depend on the reference)
    gnorm = optimizer_step(trainer)
    maybe_sync_reference(trainer)
    # epoch: transformers' state.epoch (epochs done, counted in micro-batches), not the 0-based index
    return {"grad_norm": gnorm, **trainer.scaler.metrics(), "lr": trainer.step_lr,
            "epoch": trainer.batches.epochs_done(trainer.cfg.batch_size)}


def prepare_offline_models(cfg, policy, reference) -> None:
    """``disable_dropout`` (TRL's default): dropout off in the policy and in a separate
    reference model (:func:`rlhf_fast.trainers.common.disable_dropout`), before either is
    wrapped."""
    if not cfg.disable_dropout:
        return
    disable_dropout(policy)
    if isinstance(reference, torch.nn.Module) and reference is not policy and not hasattr(reference, "rlhf_wrapped"):
        disable_dropout(reference)


# ------------------------------------------------------------------ WPO: weights from the hidden states


# rows of logits one no-grad chunk of the WPO weights holds at once: 4M logits = 16 MB fp32
_WPO_CHUNK_ELEMS = 1 << 22


@torch.no_grad()
def log_sum_sq_probs(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[N]`` float32 log Σ_v p_v² of the next-token distributions softmax(h Wᵀ + b), from
    hidden states ``h`` ``[N, H]`` and the LM head ``weight`` ``[V, H]`` (``bias`` ``[V]``),
    in chunks of rows (at most ~4M logits at once, never ``[N, V]``): logsumexp(2z) −
    2·logsumexp(z), computed in float32, without gradient (TRL's ``log_sum_sq_probs``)."""
    V = weight.shape[0]
    rows = max(1, _WPO_CHUNK_ELEMS // V)
    w = weight.float()
    b = bias.float() if bias is not None else None
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], rows):
        z = h[s: s + rows].float() @ w.t()  # [rows, V]
        if b is not None:
            z = z + b
        out[s: s + rows] = torch.logsumexp(2.0 * z, -1) - 2.0 * torch.logsumexp(z, -1)
    return out


def head_log_sum_sq_probs(h: torch.Tensor, head: torch.nn.Module, transform) -> torch.Tensor:
    """:func:`log_sum_sq_probs` of a head the fused path cannot take (a scale, a softcap, a LoRA
    adapter: :func:`rlhf_fast.models.logprobs._logits_head`): the logits ``transform(head(h))``
    in chunks of rows, never ``[N, V]``. h ``[N, H]``; returns ``[N]`` float32, without gradient."""
    from rlhf_fast.models.lm_head import transform_logits

    linear = head.base_layer if hasattr(head, "base_layer") else head
    rows = max(1, _WPO_CHUNK_ELEMS // linear.out_features)
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    with torch.no_grad():
        for s in range(0, h.shape[0], rows):
            z = transform_logits(head(h[s: s + rows]), transform).float()  # [rows, V]
            out[s: s + rows] = torch.logsumexp(2.0 * z, -1) - 2.0 * torch.logsumexp(z, -1)
    return out


def wpo_token_logps(model, batch: Dict[str, torch.Tensor], *, packed: bool = False, return_entropy: bool = False,
                    return_top1: bool = False, return_mean_logit: bool = False, prefix_sharing: bool = False):
    """``(log-probs [N, T] float32, log Σ_v p_v² [N, T] float32)`` at each response token of
    ``batch``'s rows (0 elsewhere): the log-probs exactly as :func:`token_logps` (the same
    fused path, differentiable), and from the same forward's hidden states, without gradient,
    the log of the summed squared probabilities of the distribution that predicted each token
    (:func:`log_sum_sq_probs`) — the WPO weights' denominator. A head that cannot be fused
    (softcapping, a scale, a LoRA adapter) goes through its logits a chunk of rows at a time, as the
    log-probs do (the model's own full logits where only its forward is known to give them). ``packed``: one
    padding-free forward (:func:`rlhf_fast.trainers.packing.packed_target_states`), the log-probs
    as ``token_logps(..., packed=True)`` gives them; ``prefix_sharing``: the shared-prefix row of
    the pairs (rows i and i + N/2), as ``token_logps(..., prefix_sharing=True)``. ``return_entropy``: a third value, the
    entropy ``[N, T]`` float32 of each predicting distribution, from the same pass;
    ``return_top1`` / ``return_mean_logit``: further values in that order (``[N, T]`` bool / float32,
    as :func:`~rlhf_fast.models.logprobs.sequence_logprobs` gives them), from the same pass too."""
    from rlhf_fast.models import logprobs as L
    from rlhf_fast.models import moe_aux

    ids, am = batch["input_ids"], batch["attention_mask"]
    B, T = ids.shape
    target = L._target_mask(am, batch["response_mask"])
    tr, tc = target.nonzero(as_tuple=True)
    stats = dict(return_entropy=return_entropy, return_top1=return_top1, return_mean_logit=return_mean_logit)
    if not tr.numel():  # nothing to score: the plain path keeps every weight in the graph
        tok = token_logps(model, batch, packed=packed, prefix_sharing=prefix_sharing)
        zero = torch.zeros_like(tok)
        return ((tok, zero) + ((zero.clone(),) if return_entropy else ())
                + ((zero.bool(),) if return_top1 else ()) + ((zero.clone(),) if return_mean_logit else ()))
    labels = ids[tr, tc]
    head = dict(temperature=1.0, chunk_size=None, **stats)
    # a head the fused op cannot take but whose logits we can compute: those, a chunk at a time
    logits_head = None if L.unfusable_reason(model) is None else L._logits_head(model)
    if not (packed or prefix_sharing) and L.unfusable_reason(model) is not None and logits_head is None:
        aux = moe_aux.active(model)  # an MoE policy's router logits, as sequence_logprobs' own fallback
        out = model(input_ids=ids, attention_mask=am, position_ids=L.default_position_ids(am), use_cache=False,
                    **moe_aux.forward_kwargs(aux))
        if aux is not None:
            aux.record(out, am)
        logits = out.logits  # [B, T, V]: only the model's own forward gives them
        z = logits[tr, tc - 1]
        lp = L.logits_token_stats(z, labels, **stats)
        with torch.no_grad():
            zf = z.detach().float()
            lss = torch.logsumexp(2.0 * zf, -1) - 2.0 * torch.logsumexp(zf, -1)
    else:
        if packed or prefix_sharing:  # (a head neither path computes is refused: DPOTrainer checks it)
            from .packing import packed_target_states

            h, labels, tr, tc = packed_target_states(model, ids, am, target, prefix_sharing=prefix_sharing)
        else:  # as sequence_logprobs: only the states that predict a target
            lo, hi = torch.stack(torch.aminmax(tc)).tolist()
            h = L.hidden_states(model, ids, am, None, columns=(lo - 1, hi), select=(tr, tc - lo))  # [n, H]
        if logits_head is not None:
            lp = L.logits_head_token_stats(h, *logits_head, labels, **head)
            lss = head_log_sum_sq_probs(h.detach(), *logits_head)
        else:
            weight, bias = L.lm_head_params(model)
            lp = L.head_token_stats(h, weight, bias, labels, **head)
            lss = log_sum_sq_probs(h.detach(), weight.detach(), None if bias is None else bias.detach())
    lp, *rest = lp if (return_entropy or return_top1 or return_mean_logit) else (lp,)
    out = (L._scatter(lp, tr, tc, B, T, False), L._scatter(lss, tr, tc, B, T, False))
    return out + tuple(L._scatter(v.detach(), tr, tc, B, T, False) for v in rest)


def wpo_weights(tok: torch.Tensor, lss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` WPO weights (Zhou et al. 2024, eq. 2, as TRL's ``use_weighting``):
    exp(mean over each row's response tokens of log π(y_t) − log Σ_v π_v²), detached; ``tok`` /
    ``lss`` ``[N, T]`` from :func:`wpo_token_logps`, ``mask`` ``[N, T]`` the response tokens
    (an empty response counts 1 token, as TRL's clamp)."""
    m = mask[:, 1:].to(tok.dtype)
    with torch.no_grad():
        aligned = (tok[:, 1:] - lss[:, 1:]) * m
        return torch.exp(aligned.sum(1) / m.sum(1).clamp(min=1))


def _load_pairs(path: str, kind: str, dedup: bool, triples: bool = False) -> list:
    """The records of a ``data_kind`` ``kind`` file: PairRecords, or RankingRecords for
    ``rankings`` (:func:`_ranking_pairs` expands them after the eval split)."""
    from rlhf_fast.feedback.formats import load_records

    if kind == "labels":
        from .reward import _load_label_file

        return _load_label_file(path, "pairs", dedup=dedup)
    if kind == "rankings":
        return load_records(path, "rankings", dedup=dedup)
    return load_records(path, "pairs", dedup=dedup, triples=triples)  # (triples: TPO's gold reference)


def _ranking_pairs(records: list) -> list:
    """Every RankingRecord of ``records`` replaced by the pairs it implies (in place, in order)."""
    from rlhf_fast.feedback.formats import RankingRecord, rankings_to_pairs

    return [p for r in records for p in (rankings_to_pairs([r]) if isinstance(r, RankingRecord) else [r])]


# ------------------------------------------------------------------ trainer


class DPOTrainer:
    """Trains a causal-LM policy on preference pairs (see the module docstring).

    ``model`` / ``tokenizer`` / ``train_records`` / ``eval_records`` (PairRecords) override what
    the config would load; ``model`` may be a peft model (its adapters train, the reference is
    the initial policy: :func:`rlhf_fast.models.loading.make_reference`). ``train()`` returns the
    final metrics dict.
    """

    def __init__(self, cfg: DPOConfig, *, model=None, tokenizer=None, train_records=None, eval_records=None):
        if not isinstance(cfg, DPOConfig):
            raise TypeError(f"cfg must be a DPOConfig, got {type(cfg).__name__}")
        from .reward import synthetic_pairs

        open_offline_trainer(self, cfg)
        train_records, eval_records = load_split_records(
            cfg, lambda path: _load_pairs(path, cfg.data_kind, cfg.dedup, triples=tpo_loss_name(cfg) is not None),
            lambda: synthetic_pairs(cfg.seed, cfg.data_kind, cfg.data_kind == "rankings"), train_records, eval_records,
            expand=_ranking_pairs if cfg.data_kind == "rankings" else None)  # a ranking's pairs on one side
        train_records, eval_records = list(train_records), list(eval_records or [])
        self.weights = annotator_weight_map(cfg.annotator_weights,
                                            train_records if cfg.auto_annotator_weights else None)
        texts = [str(r.prompt) + " " + response_text(r.chosen) + " " + response_text(r.rejected)
                 for r in train_records[:2000]]
        model, self.tokenizer, self.pad_id, self.is_peft = load_offline_policy(cfg, model, tokenizer, texts,
                                                                               self.device)
        if cfg.padding_value is not None:  # only what the batches' padding holds: it is never attended
            vocab = model.get_input_embeddings().num_embeddings
            if cfg.padding_value >= vocab:
                raise ValueError(f"padding_value ({cfg.padding_value}) must be a token id below the model's "
                                 f"vocabulary size ({vocab})")
            self.pad_id = cfg.padding_value

        self.train_items, dropped = self._encode(train_records)
        self.eval_items, _ = self._encode(eval_records)
        self.dropped = dropped
        if train_records and not self.train_items:
            why = (f"has an empty prompt or, with truncation_mode keep_start, a prompt of max_len ({cfg.max_len}) "
                   "tokens or more" if cfg.truncation_mode == "keep_start" else "has an empty prompt")
            raise ValueError(f"no training pair left: each of the {len(train_records)} pairs {why}")

        # the reference: log-probs of every pair now (precompute_ref_logps), or a model kept for each
        # step; none at all for a reference-free loss (no copy of the policy, no reference forward)
        reference = None
        if not cfg.reference_free:
            reference = offline_reference(cfg, model, self.is_peft, self.device)
        prepare_offline_models(cfg, model, reference)
        if cfg.padding_free:  # before the reference log-probs are precomputed packed
            from .packing import check_packable

            check_packable("padding_free", model, reference)
        if cfg.prefix_sharing:  # no transformers fallback for its attention: refused now, not mid-run
            from .packing import check_prefix_shareable

            check_prefix_shareable("prefix_sharing", cfg.max_len, model, reference)
        if reference is not None and cfg.precompute_ref_logps:
            self._precompute(reference)
            reference = None
        self.reference = reference

        wrap_offline_models(self, model)
        self.batches = _Batches(len(self.train_items), cfg.batch_size, cfg.seed)
        steps_for_epochs(cfg, len(self.train_items))  # num_train_epochs: max_steps before the LR schedule
        init_optimization(self)

    # -------------------------------------------------------------- data

    def _encode(self, records) -> Tuple[List[Dict[str, Any]], int]:
        items, dropped = [], 0
        tpo = tpo_loss_name(self.cfg)
        for i, r in enumerate(records):
            try:  # TPO: the gold response too (a missing one is refused), the prompt its tokens shared by all three
                enc = (encode_pair(self.tokenizer, r.prompt, r.chosen, r.rejected, None) if tpo is None
                       else encode_triple(self.tokenizer, r, tpo))
            except ValueError as e:  # a conversational pair the chat template cannot split
                raise ValueError(f"pair {i} (prompt {_shown(r.prompt)}): {e}") from None
            cut = None if enc is None else truncate_pair(
                *enc[:3], self.cfg.max_len, self.cfg.truncation_mode, max_prompt_length=self.cfg.max_prompt_length,
                max_completion_length=self.cfg.max_completion_length)
            if cut is None:
                dropped += 1
                continue
            if gold_rows(self.cfg):  # the gold row, cut as each row is (tpo_alpha 0: none, as TRL)
                cut.update(truncate_gold(enc[0], enc[3], cut["prompt"], self.cfg))
            w = record_weight(self.weights, r.annotator)
            items.append({**cut, "margin": float(r.margin) if self.cfg.use_margin else 0.0, "weight": float(w)})
        return items, dropped

    def _batch(self, items) -> Dict[str, torch.Tensor]:
        rows = collate_pairs(items, self.pad_id, self.cfg.pad_to_multiple_of)
        return {k: v.to(self.device) for k, v in rows.items()}

    def _precompute(self, reference) -> None:
        """Each item's reference log-probs ``item["ref"] = (chosen, rejected)``, computed once."""
        attach_reference_logps(self, reference, self._batch, ld_alpha=self.cfg.ld_alpha, **self.cfg.pack_kwargs)

    # -------------------------------------------------------------- loss

    def _nll_tokens(self, item: Dict[str, Any]) -> int:
        """The tokens of ``item``'s chosen row its NLL term counts: the response; for orpo every
        token after the first (TRL's ORPO NLL spans prompt and response); for TPO its gold row's response.
        Only scored tokens count: a row keep_end cut to its response alone has no token before its first."""
        if self.cfg.loss_terms[0][0] == "orpo":
            return len(item["prompt"]) + len(item["chosen"]) - 1
        key = "gold" if "gold" in item else "chosen"
        p, y = item.get(key + "_prompt", item["prompt"]), item[key]
        return max(0, min(len(y), len(p) + len(y) - 1))  # (TRL's shifted completion mask)

    def _pair_stats(self, items, batch) -> Dict[str, torch.Tensor]:
        """Policy (with gradients) and reference log-probs of a micro-batch, and its per-pair
        losses and rewards ``[B]``: keys ``loss``, ``chosen_rewards`` / ``rejected_rewards``
        (detached), ``chosen_logps`` / ``rejected_logps`` (as logged), ``nll`` (Σ −log π over the
        NLL tokens of each chosen row, differentiable), ``nll_tokens``, and for orpo
        ``log_odds_chosen`` / ``log_odds_ratio``."""
        cfg = self.cfg
        B = len(items)
        terms = cfg.loss_terms
        orpo = terms[0][0] == "orpo"
        wpo = None
        packed = cfg.pack_kwargs  # one padding-free row: the same [2B, T] values back, so nothing below changes
        with autocast_context(self.device, cfg.bf16, cfg.fp16):
            if cfg.ld_alpha is None and not orpo and not cfg.use_weighting:
                logps, count, tstats = response_logps_metrics(self.model, batch, **packed)  # [2B] each
                nll_rows = slice(2 * B, 3 * B) if logps.shape[0] == 3 * B else slice(0, B)  # TPO: the gold rows'
                nll, nll_tokens = -logps[nll_rows], count[nll_rows]
            else:  # per-token values: the LD weighting, ORPO's NLL over the whole chosen rows, WPO's weights
                mask = response_mask(batch)
                if cfg.use_weighting:
                    tok, lss, *per_tok = wpo_token_logps(self.model, batch, **packed, **TOKEN_STATS)  # [2B, T]
                    wpo = wpo_weights(tok, lss, mask)  # [2B]
                else:
                    tok, *per_tok = token_logps(self.model, batch, full_rows=B if orpo else 0, **packed,
                                                **TOKEN_STATS)  # [2B, T] each
                tstats = response_token_stats(per_tok, mask)  # [2B] each: the response tokens only, as TRL's
                count = mask[:, 1:].sum(-1)
                resp = tok * mask
                logps = resp.sum(-1) if cfg.ld_alpha is None else ld_weighted_logps(resp, mask, cfg.ld_alpha)
                if orpo:
                    nll, nll_tokens = -tok[:B].sum(-1), batch["attention_mask"][:B, 1:].sum(-1)
                else:  # the NLL (sft / rpo) is unweighted, as TRL's sft loss
                    nll, nll_tokens = -resp[:B].sum(-1), count[:B]
            ref = None  # reference-free: none
            if not cfg.reference_free and all("ref" in it for it in items):
                ref = torch.tensor([it["ref"] for it in items], dtype=torch.float32, device=self.device).t().reshape(-1)
            elif not cfg.reference_free:
                if self.reference is None:  # precompute_ref_logps keeps no reference model (as TRL refuses too)
                    raise ValueError("these pairs have no precomputed reference log-probs and, with "
                                     "precompute_ref_logps, no reference model is kept to score them: pass pairs "
                                     "scored before training (the trainer's eval pairs), or set "
                                     "precompute_ref_logps false")
                ref = reference_logps(self.reference, batch, self._reference_sharded, ld_alpha=cfg.ld_alpha,
                                      **packed)
        st = {"nll": nll, "nll_tokens": nll_tokens, "tokens": count, **tstats}
        if cfg.reference_free:
            out = reference_free_loss(logps[:B], logps[B:2 * B], loss_type=terms[0][0], beta=cfg.beta,
                                      chosen_tokens=count[:B], rejected_tokens=count[B:2 * B],
                                      label_smoothing=cfg.label_smoothing, alpha=cfg.alpha,
                                      simpo_gamma=cfg.tpo_l_gamma if terms[0][0] == "tpo_l" else cfg.simpo_gamma)
            out["loss"] = out["loss"] * terms[0][1]
            st.update(out)
            return st
        margin = (torch.tensor([it["margin"] for it in items], dtype=torch.float32, device=self.device)
                  if cfg.use_margin else None)
        pair_terms = [(n, w) for n, w in terms if n != "sft"]
        if pair_terms:
            # ipo / sigmoid_norm divide by TRL's unshifted completion mask: every response token, also one at
            # column 0 (a keep_end row cut to its response alone), though that one has no log-prob
            comp = (batch["response_mask"] * batch["attention_mask"]).sum(-1)  # [2B]
            loss, rc, rr = dpo_loss(logps[:B], logps[B:], ref[:B].detach(), ref[B:].detach(), beta=cfg.beta,
                                    loss_type=[n for n, _ in pair_terms], loss_weights=[w for _, w in pair_terms],
                                    label_smoothing=cfg.label_smoothing, margin=margin, chosen_tokens=comp[:B],
                                    rejected_tokens=comp[B:2 * B], f_divergence_type=cfg.f_divergence_type,
                                    f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
                                    discopop_tau=cfg.discopop_tau)
            if wpo is not None:  # WPO: each pair's loss × its two responses' weights (TRL's use_weighting)
                loss = loss * (wpo[:B] * wpo[B:]).to(loss.dtype)
        else:  # only sft: the NLL term alone
            rc = cfg.beta * (logps[:B] - ref[:B]).detach().float()
            rr = cfg.beta * (logps[B:] - ref[B:]).detach().float()
            loss = torch.zeros_like(rc)
        if wpo is not None and cfg.nll_weight > 0:
            # TRL weights its sft term too: the micro-batch's token-mean NLL, spread over the pairs and
            # each × its pair weight, so the NLL × the micro-batch's mean pair weight
            st["nll"] = st["nll"] * (wpo[:B] * wpo[B:]).mean().to(st["nll"].dtype)
        st.update(loss=loss, chosen_rewards=rc, rejected_rewards=rr, chosen_logps=logps[:B].detach(),
                  rejected_logps=logps[B:].detach())
        return st

    @staticmethod
    def _sums(st: Dict[str, torch.Tensor], w: torch.Tensor, real: bool) -> torch.Tensor:
        """The ``N_SUMS`` sums the metrics are made of (float64, 0 for a share that does not
        count): Σw·loss, Σ chosen/rejected reward, Σ accuracy, Σ margin, Σ chosen/rejected
        logps, pairs, Σ chosen NLL, NLL tokens, Σ log σ(log-odds), Σ log-odds (orpo), Σ entropy
        over the response tokens of both rows, those tokens, Σ mean logit over the chosen / the
        rejected response tokens, those tokens, the chosen response tokens that are top-1."""
        if not real:
            return torch.zeros(N_SUMS, dtype=torch.float64, device=w.device)
        rc, rr = st["chosen_rewards"].double(), st["rejected_rewards"].double()
        lc = st["chosen_logps"].detach().double()
        zero = lc.new_zeros(())
        return torch.stack([(st["loss"].detach().double() * w.double()).sum(), rc.sum(), rr.sum(),
                            (rc > rr).double().sum(), (rc - rr).sum(), lc.sum(),
                            st["rejected_logps"].detach().double().sum(), lc.new_tensor(float(lc.numel())),
                            st["nll"].detach().double().sum(), st["nll_tokens"].double().sum(),
                            st["log_odds_ratio"].double().sum() if "log_odds_ratio" in st else zero,
                            st["log_odds_chosen"].double().sum() if "log_odds_chosen" in st else zero,
                            st["entropy"].double().sum() if "entropy" in st else zero,
                            st["tokens"].double().sum() if "tokens" in st else zero,
                            *DPOTrainer._logit_sums(st, zero)])

    @staticmethod
    def _logit_sums(st: Dict[str, torch.Tensor], zero: torch.Tensor) -> List[torch.Tensor]:
        """Σ mean logit over the chosen / rejected response tokens, those tokens, Σ chosen top-1
        tokens (0-dim float64 each; zeros without the statistics)."""
        if "mean_logit" not in st:
            return [zero] * 5
        B = st["chosen_logps"].shape[0]  # rows [chosen × B, rejected × B] (TPO: then gold × B)
        ml, n = st["mean_logit"].double(), st["tokens"].double()
        return [ml[:B].sum(), ml[B:2 * B].sum(), n[:B].sum(), n[B:2 * B].sum(), st["top1"][:B].double().sum()]

    def _metrics(self, tot: torch.Tensor, weight_sum: float, prefix: str = "") -> Dict[str, float]:
        t = tot.cpu().tolist()
        n = max(t[7], 1.0)
        loss = t[0] / weight_sum if weight_sum > 0 else 0.0
        nll = t[8] / max(t[9], 1.0)
        nll_weight = self.cfg.nll_weight
        if nll_weight > 0:
            loss += nll_weight * nll
        m = {"loss": loss, "rewards/chosen": t[1] / n, "rewards/rejected": t[2] / n, "rewards/accuracy": t[3] / n,
             "rewards/margin": t[4] / n, "logps/chosen": t[5] / n, "logps/rejected": t[6] / n}
        if nll_weight > 0:
            m["nll"] = nll
        if self.cfg.loss_terms[0][0] == "orpo":
            m.update({"log_odds_ratio": t[10] / n, "log_odds_chosen": t[11] / n})
        m["entropy"] = t[12] / t[13] if t[13] > 0 else 0.0  # TRL's: the token mean over both rows' responses
        # TRL's: token means over the chosen / rejected responses (0 without tokens); accuracy the chosen ones'
        m["logits/chosen"] = t[14] / t[16] if t[16] > 0 else 0.0
        m["logits/rejected"] = t[15] / t[17] if t[17] > 0 else 0.0
        m["mean_token_accuracy"] = t[18] / t[16] if t[16] > 0 else 0.0
        return {prefix + k: v for k, v in m.items()}

    # -------------------------------------------------------------- steps

    @torch.no_grad()
    def evaluate(self, items: Optional[Sequence[Dict[str, Any]]] = None) -> Dict[str, float]:
        """The step metrics over the eval pairs (``eval_`` prefix; empty dict without pairs):
        ``eval_loss`` is the weighted mean over every pair, as the training loss; an MoE policy with
        the load-balancing term on adds TRL's ``eval_aux_loss`` (the mean over the eval batches)
        and coef × it (RouterAux.add_eval_metrics)."""
        items = list(self.eval_items if items is None else items)
        if not items:
            return {}
        tot = torch.zeros(N_SUMS, dtype=torch.float64, device=self.device)
        wsum = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_sums = None
        with eval_mode(self.model):
            for s in range(0, len(items), self.cfg.batch_size):
                idx = list(range(s, min(s + self.cfg.batch_size, len(items))))
                chunk, real = local_share(idx, items, self.ctx)
                with self.moe.collect(evaluation=True) as aux:  # the policy's forward of the batch's rows
                    st = self._pair_stats(chunk, self._batch(chunk))
                if self.moe.enabled:
                    a = self.moe.eval_sums(aux, real, self.device)
                    aux_sums = a if aux_sums is None else aux_sums + a
                w = torch.tensor([it["weight"] for it in chunk], dtype=torch.float64, device=self.device)
                tot += self._sums(st, w, real)
                wsum += w.sum() if real else 0.0
        tot = self.ctx.all_reduce_sum(torch.cat([tot, wsum.view(1)]))
        if self.cfg.generate_during_eval:  # every rank (FSDP2 gathers weights); rank 0 writes
            from .eval_samples import generate_during_eval

            generate_during_eval(self, items)
        m = self._metrics(tot[:N_SUMS], float(tot[N_SUMS]), prefix="eval_")
        if aux_sums is not None:
            self.moe.add_eval_metrics(m, self.ctx.all_reduce_sum(aux_sums))
        return m

    def train_step(self) -> Dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches (fewer at an epoch's end:
        ``_Batches.step``); returns its metrics."""
        cfg, ctx = self.cfg, self.ctx
        self.model.train()
        idxs = self.batches.step(cfg.grad_accum)
        micro = [local_share(idx, self.train_items, ctx) for idx in idxs]
        # the denominators of the whole global step (all micro-batches, all ranks): the weighted
        # mean over pairs and the token mean of the RPO term do not depend on the split
        local = [sum(it["weight"] for it in items) if real else 0.0 for items, real in micro]
        tokens = [sum(self._nll_tokens(it) for it in items) if real else 0 for items, real in micro]
        den = ctx.all_reduce_sum(torch.tensor([sum(local), sum(tokens)], dtype=torch.float64, device=self.device))
        w_total, n_chosen = float(den[0]), float(den[1])
        nll_weight = cfg.nll_weight
        tot = torch.zeros(N_SUMS, dtype=torch.float64, device=self.device)
        aux_vals, aux_steps = [], self.moe.term_steps(ctx, sum(bool(r) for _, r in micro), len(micro))
        for i, (items, real) in enumerate(micro):
            with accumulation_context(self.model, i, len(micro)), offload_context(self), self.moe.collect() as aux:
                st = self._pair_stats(items, self._batch(items))
                w = torch.tensor([it["weight"] if real else 0.0 for it in items], dtype=st["loss"].dtype,
                                 device=self.device)
                loss = weighted_share(st["loss"], w, w_total)
                if nll_weight > 0:  # rpo_alpha, sft, cpo_alpha, orpo: the token mean over the whole step
                    nll = st["nll"].sum() * (1.0 if real else 0.0)
                    loss = loss + nll_weight * nll / max(n_chosen, 1.0)
                # DDP/FSDP2 average gradients over ranks; grad_scale turns that into the sum
                # TRL's MoE term (the policy's forward): coef × aux / grad_accum, left to DDP's average
                # (term_steps: a blank share's rank adds none, so the real ones weigh more)
                loss = self.moe.with_term(loss * ctx.grad_scale, aux, aux_steps, aux_vals, counts=real)
                self.scaler.scale(loss).backward()  # fp16: times the loss scale
            tot += self._sums(st, w, real)
        step = offline_optimizer_step(self)
        m = self._metrics(ctx.all_reduce_sum(tot), w_total)
        self.moe.add_metrics(m, aux_vals, ctx)  # (every rank's micro-batches)
        m.update(step)
        m.update(count_tokens(self, sum(pair_tokens(self.train_items[i]) for idx in idxs for i in idx)))
        return m

    _save = save_offline  # the checkpoint: the moving reference (TR-DPO), then policy and optimizer
    train = train_offline  # resume, train to max_steps, save output_dir/final; the last metrics


add_arguments, run = trainer_commands("dpo", DPOConfig, DPOTrainer)  # what rlhf_fast.cli calls


__all__ = ["DPOConfig", "DPOTrainer", "LOSS_TYPES", "dpo_loss", "reference_free_loss", "encode_pair", "collate_pairs",
           "response_logps", "response_logps_metrics", "token_logps", "offline_reference", "shard_reference",
           "add_arguments", "run"]
