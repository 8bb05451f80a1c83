"""Reward-model training: ``rlhf-fast reward CONFIG.yaml [--key value ...]``.

Pairs train with Bradley–Terry (optional margin, label smoothing for noisy labels,
per-annotator weights), rankings with Plackett–Luce (or as all implied pairs), scores with
regression. Held-out metrics: pairwise accuracy for pairs and rankings, Pearson and
Spearman correlation for scores. The final model is saved with ``save_pretrained`` (plus
its tokenizer), so ``AutoModelForSequenceClassification.from_pretrained`` reloads it.

``lora`` (peft LoraConfig fields, as SFT's; task_type SEQ_CLS) trains fresh adapters on the
linear layers and, as peft does for SEQ_CLS, the whole score head (``modules_to_save``); the
base weights stay frozen. A peft model passed as ``model`` keeps its own adapters (and trains
what peft marks trainable). Either way ``final/`` holds the MERGED model (adapters folded into
the base weights, the trained score head in place): a plain sequence-classification folder
that ``load_reward_model`` (``rlhf-fast ppo|grpo|rloo`` ``reward.reward_model``, ``rlhf-fast
eval --reward-model``) loads as any reward model; checkpoints keep the unmerged peft state.

``center_rewards_coefficient`` c (TRL's, Eisenstein et al. 2023) adds
c · mean((r_chosen + r_rejected)²) to the pairs loss, which drives the pair's mean score to 0;
the mean is weighted by the annotator weights as the Bradley–Terry term is (with unit weights
it is TRL's ``compute_loss`` term exactly). Rankings get c · mean over items of (2·m)², m the
mean score of the item's K responses (for K = 2 the pairs term exactly; ``rankings_as_pairs``
and ``labels`` train pairs, so the pairs term); scores (regression) refuse it, their targets
already fix the reward's offset. ``eval_loss`` includes the term, as TRL's. ``disable_dropout`` (default true,
as TRL's) zeroes every dropout probability of the model, adapters included;
``num_train_epochs`` sets ``max_steps`` to that many passes over the training items.
``eos_token`` / ``pad_token`` / ``chat_template_path`` change the tokenizer and the model as TRL's
RewardTrainer does (:func:`rlhf_fast.models.loading.apply_tokenizer_overrides`: the eos that ends
every scored sequence, the pad id the config carries, a template file or a tokenizer folder's
template cloned with its tokens, the embeddings resized; with ``lora`` the new tokens' embedding
rows train); ``final/`` holds the changed tokenizer.

``prefix_sharing`` (pairs and rankings; ours, as DPO's): each micro-batch's pairs run as one packed
row, each pair once as ``[prompt, chosen, rejected]`` with the rejected tokens attending to the
prompt and themselves only, position ids continuing from the prompt's end (a ranking's K responses
likewise: ``[prompt, response 1, ..., response K]``)
(:func:`rlhf_fast.models.logprobs.pack_shared_rows`), so every prompt token is scored once in the
forward and the backward; the score is read at each row's last token, the same values as the
padded batch's up to float rounding. Needs a Llama / Mistral / Qwen2 / Qwen3 backbone that
:mod:`rlhf_fast.models.llama_forward` computes (no LoRA, not the torch backend): a ValueError
naming ``prefix_sharing`` when the trainer starts otherwise, and for ``data_kind`` scores.

Under ``torchrun`` (``distributed.strategy`` ddp or fsdp2) each rank scores its contiguous
share of every global batch; the weighted-mean loss is normalised by the global weight sum,
so the run matches one process on the same global batch and seed. Rank 0 writes the run
folder; checkpoints are sharded and resumable on another number of ranks.

``bema`` (TRL's ``BEMACallback``, :mod:`rlhf_fast.trainers.bema`): the bias-corrected EMA of the
reward model's weights, saved to ``RUN_DIR/bema`` at the end (not with LoRA / peft).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from rlhf_fast.feedback.formats import pad_right
from rlhf_fast.feedback.losses import _weighted_mean, bradley_terry_loss, plackett_luce_loss, score_regression_loss
from rlhf_fast.models.loading import enable_activation_checkpointing
from rlhf_fast.ops._validate import finite

from .common import (annotator_weight_map, autocast_context, check_annotator_weights, check_bool_fields,
                     check_lora_field, check_tokenizer_override_fields, check_training_schedule, disable_dropout,
                     load_split_records, pad_token_id, record_weight, steps_for_epochs, trainer_commands,
                     trainer_model)
from .common import LoggingOptions, ModelInitOptions, OptimizerOptions
from .compile import CompileOptions
from .config import typed_config
from .merging import MergeOptions
from rlhf_fast.distributed import DistributedConfig

from .bema import BEMAConfig, check_bema_field, setup_bema

from .sft import (_Batches, accumulation_context, count_tokens, eval_mode, init_optimization, local_share,
                  offload_context, open_trainer, optimizer_step, resume_supervised, save_supervised, training_loop,
                  wrap_configured)


@typed_config(loose=("data", "eval_data"))  # (rows or a path: common._check_data_source)
@dataclasses.dataclass
class RewardConfig(ModelInitOptions, OptimizerOptions, LoggingOptions, CompileOptions, MergeOptions):
    """Reward-model settings. ``data``: JSONL/Parquet of ``data_kind`` records (None: a
    synthetic preference task with a hidden rule, so the defaults run); ``label_smoothing``
    ε makes the BT loss conservative for noisy labels; ``annotator_weights`` maps
    annotator ids to loss weights (``auto_annotator_weights`` derives them from agreement
    on items labelled more than once). ``lora``: None, or LoraConfig fields ({} for r=8,
    alpha=16, every linear layer; task_type is SEQ_CLS, so the score head trains whole);
    ``center_rewards_coefficient``: None or c >= 0 (pairs and rankings, see the module
    docstring); ``disable_dropout``: zero the model's dropout (TRL's default, true);
    ``num_train_epochs``: None, or the passes over the training items that set ``max_steps``;
    ``chat_template_kwargs``: template variables (e.g. ``{enable_thinking: false}``) for every chat
    the pairs render, prompt and conversational response alike (text values read as YAML), saved in
    the model's config (``rlhf_fast_reward_chat_template_kwargs``) so RL scores chats with them."""

    model: str = "tiny:llama:hidden_size=64,num_layers=2,num_heads=4"
    data: Optional[str] = None
    data_kind: str = "pairs"
    eval_data: Optional[str] = None
    eval_fraction: float = 0.1
    output_dir: str = "runs/reward"
    max_len: int = 256
    # TRL's: each batch's length rounded up to a multiple of this (tensor-core / kernel-friendly shapes); null: none
    pad_to_multiple_of: Optional[int] = None
    batch_size: int = 16
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
    gradient_checkpointing: bool = False  # transformers' activation checkpointing: less memory, one more forward
    # TRL's: the forward's saved activations wait in (pinned) CPU memory until the backward (an accelerator only)
    activation_offloading: bool = False
    label_smoothing: float = 0.0
    use_margin: bool = True
    annotator_weights: Dict[str, float] = dataclasses.field(default_factory=dict)
    auto_annotator_weights: bool = False
    rankings_as_pairs: bool = False
    lora: Optional[Dict[str, Any]] = None  # LoraConfig fields ({}: r=8, alpha=16, every linear layer)
    center_rewards_coefficient: Optional[float] = None  # TRL's; None adds no centring term
    disable_dropout: bool = True  # TRL's default; the tiny models have no dropout, so nothing moves for them
    num_train_epochs: Optional[float] = None  # None: max_steps counts the run
    prefix_sharing: bool = False  # pairs / rankings: one packed row per micro-batch, each prompt once
    eval_every: int = 50
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    resume: bool = True
    dedup: bool = True
    # TRL's tokenizer overrides (null: the tokenizer's own); final/ saves the changed tokenizer
    eos_token: Optional[str] = None  # a token of the vocabulary: the eos that ends every scored sequence
    pad_token: Optional[str] = None  # a token of the vocabulary: the padding (and the model config's pad id)
    chat_template_path: Optional[str] = None  # a .jinja / .j2 file, or a tokenizer folder to clone the template of
    # template variables for every chat rendered (e.g. {enable_thinking: false}; TRL: a row's own
    # chat_template_kwargs column); saved in final/'s config, RL scores chats with them
    chat_template_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    # TRL's BEMACallback (its argument names and defaults; rlhf_fast.trainers.bema): BEMA weights saved to RUN_DIR/bema
    bema: Optional[BEMAConfig] = None

    def __post_init__(self):
        from .rl_config import _template_kwargs

        check_training_schedule(self)
        check_tokenizer_override_fields(self)
        self.chat_template_kwargs = _template_kwargs("chat_template_kwargs", self.chat_template_kwargs)
        if self.data_kind not in ("pairs", "rankings", "scores", "labels"):
            raise ValueError(f"data_kind must be 'pairs', 'rankings', 'scores' or 'labels', got {self.data_kind!r}")
        check_bool_fields(self, ("prefix_sharing", "use_margin", "rankings_as_pairs", "auto_annotator_weights", "dedup",
                                 "resume"))
        if self.prefix_sharing and self.data_kind == "scores":
            raise ValueError("prefix_sharing applies to pairs and rankings (a prompt's responses share it), got "
                             "data_kind 'scores' (one response per prompt)")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        check_pairwise_only(self)
        check_annotator_weights(self)
        check_lora_field(self)
        if self.lora is not None and self.lora.get("task_type", "SEQ_CLS") not in ("SEQ_CLS", None):
            # another task type would leave the score head frozen at its random init
            raise ValueError(f"lora.task_type must be 'SEQ_CLS' for a reward model (or left out), "
                             f"got {self.lora['task_type']!r}")
        self.bema = check_bema_field(self, no_reference_update="the reward trainer has no reference model")
        if self.center_rewards_coefficient is not None:
            finite("center_rewards_coefficient", self.center_rewards_coefficient, ">= 0")
            if self.data_kind == "scores":
                raise ValueError("center_rewards_coefficient must be null for data_kind 'scores': the regression "
                                 "targets already fix the reward's offset (centring would pull against them)")


def check_pairwise_only(cfg: RewardConfig) -> None:
    """ValueError for an option of pairwise labels set with a ``data_kind`` that trains on
    none: ``label_smoothing`` (the Bradley–Terry loss's ε; Plackett–Luce and the score
    regression have no standard smoothed form) and ``auto_annotator_weights`` (agreement is
    counted on pairs; rankings give theirs, scores none)."""
    kind = "pairs" if cfg.data_kind == "rankings" and cfg.rankings_as_pairs else cfg.data_kind
    if cfg.label_smoothing and kind in ("rankings", "scores"):
        loss = "Plackett-Luce" if kind == "rankings" else "score regression"
        raise ValueError(f"label_smoothing applies to the Bradley-Terry loss of pairs, got label_smoothing="
                         f"{cfg.label_smoothing} with data_kind {cfg.data_kind!r} ({loss}); set it to 0"
                         + (" or rankings_as_pairs: true" if kind == "rankings" else ""))
    if cfg.auto_annotator_weights and kind == "scores":
        raise ValueError("auto_annotator_weights derives weights from annotators' agreement on pairs (or the pairs "
                         "of rankings), got data_kind 'scores'; set annotator_weights instead")


def synthetic_preference_records(n: int = 512, *, seed: int = 0, flip: float = 0.0) -> list:
    """Pairs separable by a hidden rule: the chosen response contains the word "good",
    the rejected one does not. ``flip`` swaps chosen/rejected for that fraction (noise)."""
    from rlhf_fast.feedback.formats import PairRecord

    rng = random.Random(seed)
    words = "the cat dog sat on mat big small red blue runs one two three yes no".split()
    out = []
    for _ in range(n):
        prompt = "describe: " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 4)))
        good = [rng.choice(words) for _ in range(rng.randint(3, 7))]
        good.insert(rng.randint(0, len(good)), "good")
        bad = [rng.choice(words) for _ in range(rng.randint(3, 8))]
        c, r = " ".join(good), " ".join(bad)
        if rng.random() < flip:
            c, r = r, c
        out.append(PairRecord(prompt, c, r))
    return out


def synthetic_pairs(seed: int, kind: str, refused: bool) -> list:
    """:func:`synthetic_preference_records` seeded by ``seed``: what a reward / DPO / KTO run
    without ``data`` trains on; ValueError naming the run's ``data_kind`` ``kind`` when that kind
    has no synthetic form (``refused``: the synthetic task has pairs only)."""
    if refused:
        raise ValueError(f"data must be set for data_kind={kind!r} (the synthetic task has pairs only)")
    return synthetic_preference_records(seed=seed)


def reward_lora(lora: Dict[str, Any], added: List[int]) -> Dict[str, Any]:
    """``lora`` (LoraConfig fields) for a reward model: task SEQ_CLS (peft trains the score head
    whole), and the embedding rows of the ``added`` token ids (a cloned chat template's) trainable
    through peft's ``trainable_token_indices``, as TRL's RewardTrainer sets them. TRL also appends
    "lm_head" to ``modules_to_save``, which a sequence-classification model does not have."""
    from .sft import _merge_token_indices

    lora = {**lora, "task_type": "SEQ_CLS"}
    if added:
        lora["trainable_token_indices"] = _merge_token_indices(lora.get("trainable_token_indices"), added)
    return lora


def _encode(tokenizer, prompt: Any, response: Any, max_len: int,
            chat_template_kwargs: Optional[Dict[str, Any]] = None) -> List[int]:
    from rlhf_fast.feedback.formats import reward_input_ids

    # prompt (a chat template writes its own special tokens; plain text is tokenized with the
    # response as one text, with the tokenizer's), response (chat messages: the template's turns
    # after the prompt), eos (unless already last); the end kept: the
    # score is read at the last token; chats rendered with the config's chat_template_kwargs
    return reward_input_ids(tokenizer, prompt, response, max_len, chat_template_kwargs=chat_template_kwargs)


def reward_response_format(records: Sequence[Any]) -> str:
    """The form of the responses of reward ``records`` (pairs' chosen / rejected, rankings'
    responses, scores' response): "conversational" when all are chat messages, "text" when all
    are text (or there are none), "mixed" otherwise. The reward trainer saves it in the model's
    config (:data:`rlhf_fast.feedback.formats.REWARD_FORMAT_ATTR`) for RL's
    :class:`rlhf_fast.algorithms.RewardModelReward`."""
    forms = set()
    for r in records:
        if hasattr(r, "chosen"):
            responses = [r.chosen, r.rejected]
        else:
            responses = list(r.responses) if hasattr(r, "responses") else [r.response]
        forms.update(isinstance(x, str) for x in responses)
    if len(forms) > 1:
        return "mixed"
    return "conversational" if forms == {False} else "text"


def check_reward_prefix_sharing(model, kind: str, max_len: int) -> None:
    """ValueError naming ``prefix_sharing`` when the reward trainer cannot run it: items that are
    neither pairs nor rankings, or a backbone :mod:`rlhf_fast.models.llama_forward` does not compute (a LoRA /
    peft model, another architecture, the torch backend forced)."""
    from rlhf_fast.models.logprobs import prefix_sharing_reason

    if kind not in ("pairs", "rankings"):
        raise ValueError(f"prefix_sharing applies to pairs and rankings, got data_kind {kind!r}")
    why = prefix_sharing_reason(model, max_len, lm_head=False)
    if why is not None:
        raise ValueError(f"prefix_sharing: true needs a backbone rlhf_fast.models.llama_forward computes, but {why}; "
                         "set prefix_sharing: false")


def shared_reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         groups: torch.Tensor) -> torch.Tensor:
    """:func:`rlhf_fast.models.loading.reward_scores` (``[N]`` float32, the score head at each
    row's last attended token) from one shared-prefix row: each group of rows ``groups [G, K]``
    (a pair's chosen and rejected, a ranking's responses; -1 fills a shorter group) laid out once, its common leading tokens scored once
    (:func:`rlhf_fast.models.logprobs.pack_shared_rows`); the last layer computes after its
    attention only the N states the head reads. input_ids / attention_mask ``[N, T]``, every row
    with at least one attended token."""
    from rlhf_fast.models.loading import last_token_index
    from rlhf_fast.models.logprobs import pack_shared_rows, shared_states, unwrap

    base = unwrap(model)
    head = getattr(base, "score", None)
    if head is None:
        head = getattr(base, "classifier", None)
    if not isinstance(head, torch.nn.Module):
        raise TypeError(f"model must be a sequence-classification model with a `score` head, got {type(base).__name__}")
    sr = pack_shared_rows(input_ids, attention_mask, groups)
    src = sr.at[torch.arange(input_ids.shape[0], device=input_ids.device), last_token_index(attention_mask)]
    out = head(shared_states(model, sr.ids, sr.position_ids, sr.segments, src))  # [N, 1]
    if out.shape[-1] != 1:
        raise ValueError(f"the reward head must output one score, got {out.shape[-1]}")
    return out[:, 0].float()


def score_texts(model, tokenizer, prompts: Sequence[Any], responses: Sequence[str], *, max_len: int = 1024,
                batch_size: int = 64) -> List[float]:
    """A trained reward model's scores of ``responses`` to ``prompts``, encoded exactly as
    :class:`RewardTrainer` encodes its training pairs (prompt, response, eos; the score read at
    the last attended token): :class:`rlhf_fast.algorithms.RewardModelReward` in batches."""
    from rlhf_fast.algorithms.rewards import RewardModelReward

    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and {len(responses)}")
    scorer = RewardModelReward(model, tokenizer, max_length=max_len)
    out: List[float] = []
    for i in range(0, len(prompts), batch_size):
        out += scorer(list(prompts[i:i + batch_size]), list(responses[i:i + batch_size]), None)
    return out


def _pearson(x: List[float], y: List[float]) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return sxy / (sx * sy) if sx > 0 and sy > 0 else float("nan")


def _ranks(x: List[float]) -> List[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2.0
        i = j + 1
    return r


class RewardTrainer:
    """Trains a scalar reward model (AutoModelForSequenceClassification, one label)."""

    def __init__(self, cfg: RewardConfig, *, model=None, tokenizer=None, train_records=None, eval_records=None):
        from rlhf_fast.feedback.formats import load_records, rankings_to_pairs

        if not isinstance(cfg, RewardConfig):
            raise TypeError(f"cfg must be a RewardConfig, got {type(cfg).__name__}")
        open_trainer(self, cfg)
        kind = "pairs" if cfg.data_kind == "labels" else cfg.data_kind
        load = _load_label_file if cfg.data_kind == "labels" else load_records
        train_records, eval_records = load_split_records(cfg, lambda path: load(path, kind, dedup=cfg.dedup),
                                                         lambda: synthetic_pairs(cfg.seed, kind, kind != "pairs"),
                                                         train_records, eval_records)
        train_records, eval_records = list(train_records), list(eval_records or [])
        if kind == "rankings" and cfg.rankings_as_pairs:
            train_records, kind = rankings_to_pairs(train_records), "pairs"
            eval_records = rankings_to_pairs(eval_records)
        self.kind = kind
        agreement = None
        if cfg.auto_annotator_weights:  # rankings agree through the pairs they imply (as with rankings_as_pairs)
            agreement = rankings_to_pairs(train_records) if kind == "rankings" else train_records
        self.weights = annotator_weight_map(cfg.annotator_weights, agreement)
        from rlhf_fast.models.loading import apply_tokenizer_overrides, check_chat_template_path

        check_chat_template_path(cfg.chat_template_path)  # before a model is loaded
        model, tokenizer = trainer_model(cfg, model, tokenizer, lambda: [t for r in train_records[:2000]
                                                                         for t in [str(r.prompt), *_texts(r)]],
                                         kind="reward")
        # as TRL's RewardTrainer, before the adapters; the items below are encoded with the result
        added = apply_tokenizer_overrides(model, tokenizer, eos_token=cfg.eos_token, pad_token=cfg.pad_token,
                                          chat_template_path=cfg.chat_template_path)
        self.model, self.tokenizer = model.to(self.device), tokenizer
        self.pad_id = pad_token_id(tokenizer)
        # as TRL: transformers' forward reads the last token that is not config.pad_token_id, so
        # it must be the id the rows are padded with (a model's other pad id read padding)
        self.model.config.get_text_config().pad_token_id = self.pad_id
        from rlhf_fast.feedback.formats import REWARD_FORMAT_ATTR, REWARD_TEMPLATE_KWARGS_ATTR

        # saved with the config (final/, checkpoints): RL then scores a chat answer as it trained,
        # rendered with the same template variables ({} too: a model trained without any)
        setattr(self.model.config, REWARD_FORMAT_ATTR, reward_response_format(train_records))
        setattr(self.model.config, REWARD_TEMPLATE_KWARGS_ATTR, dict(cfg.chat_template_kwargs))
        dcfg = cfg.distributed
        from rlhf_fast.models.loading import _is_peft

        if cfg.lora is not None or _is_peft(self.model):
            from rlhf_fast.models.loading import load_policy

            # fresh adapters (task SEQ_CLS: peft trains the `score` head whole, as modules_to_save),
            # or a peft model's own; checkpointing then keeps input gradients past the frozen embeddings
            lora = None if cfg.lora is None else reward_lora(cfg.lora, added)
            self.model = load_policy(self.model, gradient_checkpointing=cfg.gradient_checkpointing, lora=lora)
        elif cfg.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.is_peft = _is_peft(self.model)
        if cfg.prefix_sharing:  # no transformers fallback for its attention: refused now, not mid-run
            check_reward_prefix_sharing(self.model, kind, cfg.max_len)
        if cfg.disable_dropout:  # after the adapters, so lora_dropout goes too (as TRL, after get_peft_model)
            disable_dropout(self.model)
        self.model = wrap_configured(self.model, dcfg, self.ctx)
        setup_bema(self)  # TRL's BEMACallback (or off)
        self.train_items = [self._encode_record(r) for r in train_records]
        self.eval_items = [self._encode_record(r) for r in eval_records]
        self.batches = _Batches(len(self.train_items), cfg.batch_size, cfg.seed)
        steps_for_epochs(cfg, len(self.train_items))  # before the scheduler, whose decay spans max_steps
        init_optimization(self)

    def _encode_record(self, r) -> Dict[str, Any]:
        enc = lambda text: _encode(self.tokenizer, r.prompt, text, self.cfg.max_len,  # noqa: E731
                                   self.cfg.chat_template_kwargs)
        w = record_weight(self.weights, r.annotator)
        if self.kind == "pairs":
            return {"seqs": [enc(r.chosen), enc(r.rejected)], "margin": r.margin if self.cfg.use_margin else 0.0,
                    "weight": w}
        if self.kind == "rankings":
            return {"seqs": [enc(t) for t in r.responses], "ranking": list(r.ranking), "weight": w}
        return {"seqs": [enc(r.response)], "score": r.score, "weight": w}

    def _scores(self, items: Sequence[Dict[str, Any]]) -> List[torch.Tensor]:
        """One forward over every sequence of ``items``; per item a tensor of its scores."""
        from rlhf_fast.models.loading import reward_scores

        seqs = [s for it in items for s in it["seqs"]]
        ids, attn = pad_right(seqs, self.pad_id, self.cfg.pad_to_multiple_of)
        with autocast_context(self.device, self.cfg.bf16, self.cfg.fp16):
            if self.cfg.prefix_sharing:  # each item's rows one group: a pair's two, a ranking's K
                from rlhf_fast.models.logprobs import row_groups

                item = torch.tensor([i for i, it in enumerate(items) for _ in it["seqs"]], device=self.device)
                flat = shared_reward_scores(self.model, ids.to(self.device), attn.to(self.device), row_groups(item))
            else:
                flat = reward_scores(self.model, ids.to(self.device), attn.to(self.device))  # [N]
        out, k = [], 0
        for it in items:
            out.append(flat[k: k + len(it["seqs"])])
            k += len(it["seqs"])
        return out

    def loss(self, items: Sequence[Dict[str, Any]], scores: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """The weighted loss of a micro-batch of encoded items (0-dim float32); ``scores``
        from :meth:`_scores` when already computed."""
        if scores is None:
            scores = self._scores(items)
        w = torch.tensor([it["weight"] for it in items], dtype=torch.float32, device=self.device)
        coef = self.cfg.center_rewards_coefficient
        if self.kind == "pairs":
            s = torch.stack(scores)  # [B, 2]
            m = torch.tensor([it["margin"] for it in items], dtype=torch.float32, device=self.device)
            loss = bradley_terry_loss(s[:, 0], s[:, 1], margin=m, label_smoothing=self.cfg.label_smoothing, weights=w)
            if coef is not None:
                # TRL's c·mean((r_c + r_r)²), weighted as the BT term so the global weighted mean
                # (over micro-batches and ranks) stays one sum over one weight total
                loss = loss + coef * _weighted_mean((s[:, 0] + s[:, 1]) ** 2, w)
            return loss
        if self.kind == "rankings":
            K = max(len(s) for s in scores)
            S = torch.zeros(len(items), K, device=self.device)
            R = torch.full((len(items), K), -1, dtype=torch.long, device=self.device)
            for i, (s, it) in enumerate(zip(scores, items)):
                S[i, : len(s)] = s
                R[i, : len(s)] = torch.tensor(it["ranking"])
            loss = plackett_luce_loss(S, R, weights=w)
            if coef is not None:
                # (2·mean_k s_k)² per item: the pairs term for K = 2, and no larger for longer lists
                n = torch.tensor([len(s) for s in scores], dtype=torch.float32, device=self.device)
                loss = loss + coef * _weighted_mean((2.0 * S.sum(1) / n) ** 2, w)
            return loss
        pred = torch.cat(scores)
        target = torch.tensor([it["score"] for it in items], dtype=torch.float32, device=self.device)
        return score_regression_loss(pred, target, weights=w)

    @torch.no_grad()
    def evaluate(self, items: Optional[Sequence[Dict[str, Any]]] = None) -> Dict[str, float]:
        """Held-out metrics: ``eval_loss`` and ``eval_accuracy`` (pairs/rankings: fraction of
        ordered pairs scored the right way, ties count half) or ``eval_pearson`` /
        ``eval_spearman`` (scores)."""
        items = self.eval_items if items is None else items
        if not items:
            return {}
        losses, correct, total, preds, targets = [], 0.0, 0, [], []
        sums = torch.zeros(N_REWARD_SUMS, dtype=torch.float64, device=self.device)
        extremes = torch.full((2,), -math.inf, dtype=torch.float64, device=self.device)
        bs = self.cfg.batch_size
        with eval_mode(self.model):
            for i in range(0, len(items), bs):
                chunk = items[i: i + bs]
                chunk_scores = self._scores(chunk)
                # the chunk's loss is a weighted mean: weigh it by the chunk's total weight, so that
                # eval_loss is the weighted mean over all items (as the training loss), whatever the chunking
                losses.append((self.loss(chunk, chunk_scores).item(), sum(it["weight"] for it in chunk)))
                chunk_sums, chunk_ext = reward_sums(chunk_scores, self.kind == "pairs")
                sums, extremes = sums + chunk_sums, torch.maximum(extremes, chunk_ext)
                for it, s in zip(chunk, chunk_scores):
                    s = s.float().tolist()
                    if self.kind == "scores":
                        preds.append(s[0])
                        targets.append(it["score"])
                        continue
                    order = [0, 1] if self.kind == "pairs" else it["ranking"]
                    for a in range(len(order)):
                        for b in range(a + 1, len(order)):
                            d = s[order[a]] - s[order[b]]
                            correct += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
                            total += 1
        w_total = sum(n for _, n in losses)
        out = {"eval_loss": sum(l * n for l, n in losses if n > 0) / w_total if w_total > 0 else float("nan")}
        if self.kind == "scores":
            out.update(eval_pearson=_pearson(preds, targets), eval_spearman=_pearson(_ranks(preds), _ranks(targets)))
        else:
            out["eval_accuracy"] = correct / max(total, 1)
        # TRL's other eval metrics, but eval_accuracy: ours counts a tie as ½ (TRL's, a miss)
        out.update({f"eval_{k}": v for k, v in reward_metrics(sums, extremes, self.kind == "pairs").items()
                    if k != "accuracy"})
        return out

    def train_step(self) -> Dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches (fewer at an epoch's end:
        ``_Batches.step``)."""
        cfg, ctx = self.cfg, self.ctx
        self.model.train()
        # Σ loss, then the sums of the reward metrics (reward_sums); the extremes [max, −min] apart
        total = torch.zeros(1 + N_REWARD_SUMS, dtype=torch.float64, device=self.device)
        extremes = torch.full((2,), -math.inf, dtype=torch.float64, device=self.device)
        idxs = self.batches.step(cfg.grad_accum)
        step_tokens = sum(len(s) for idx in idxs for i in idx for s in self.train_items[i]["seqs"])
        # an empty share (fewer items than ranks) still runs one item, at weight 0
        micro = [local_share(idx, self.train_items, ctx) for idx in idxs]
        w_locals = [sum(it["weight"] for it in chunk) if real else 0.0 for chunk, real in micro]
        # the weight of the whole global step (all micro-batches, all ranks), as DPO / KTO: the
        # loss is Σ w·loss / Σ w over the step, so the micro-batch split does not change it
        w_total = float(ctx.all_reduce_sum(torch.tensor(sum(w_locals), dtype=torch.float64, device=self.device)))
        for i, ((chunk, real), w_local) in enumerate(zip(micro, w_locals)):
            # this micro-batch's weighted mean times its share of the step's weight
            frac = w_local / w_total if w_total > 0 else 0.0
            # DDP / FSDP2: the gradients reduced once, after the step's last micro-batch
            with accumulation_context(self.model, i, len(micro)), offload_context(self):
                scores = self._scores(chunk)
                loss = self.loss(chunk, scores) * frac
                # DDP/FSDP2 average gradients over ranks; grad_scale turns that into the sum
                self.scaler.scale(loss * ctx.grad_scale).backward()  # fp16: times the loss scale
            total[0] += loss.detach().double()
            if real:
                sums, ext = reward_sums(scores, self.kind == "pairs")
                total[1:] += sums
                extremes = torch.maximum(extremes, ext)
        gnorm = optimizer_step(self)
        total = ctx.all_reduce_sum(total)
        m = {"loss": float(total[0]), "grad_norm": gnorm, **self.scaler.metrics(),
             "lr": self.step_lr, "epoch": self.batches.epochs_done()}  # transformers' state.epoch
        m.update(reward_metrics(total[1:], ctx.all_reduce_max(extremes), self.kind == "pairs"))
        m.update(count_tokens(self, step_tokens))
        return ctx.mean_metrics(m)

    def _save(self) -> None:
        save_supervised(self, "reward")

    def train(self) -> Dict[str, float]:
        """Train to ``max_steps`` (resuming when ``resume``); save to ``output_dir/final`` (a
        LoRA / peft run: the merged model, see :meth:`save_merged`)."""
        resume_supervised(self, "reward")
        out = training_loop(self, has_eval=bool(self.eval_items))
        if self.is_peft:
            # training_loop saved the adapter there; the reward-model loaders need a plain model
            self.save_merged(os.path.join(self.run.path, "final"))
        return out

    def save_merged(self, folder: str) -> None:
        """Write the peft reward model merged to ``folder`` (:func:`save_merged_peft`): a plain
        AutoModelForSequenceClassification folder, as a full fine-tune saves."""
        from transformers import AutoModelForSequenceClassification

        save_merged_peft(self.model, self.tokenizer, folder, self.ctx, self.cfg.distributed.strategy,
                         AutoModelForSequenceClassification)


def save_merged_peft(model, tokenizer, folder: str, ctx, strategy: str, auto_class) -> None:
    """Write the peft classifier ``model`` (a reward model's or a PRM's) merged — each adapter
    folded into its base weight, the trained head in the original's place — with
    ``save_pretrained``, plus ``tokenizer``, to ``folder``, replacing what it held: a plain
    ``auto_class`` folder, as a full fine-tune saves. ``model`` itself stays unmerged. Under
    FSDP2 (``strategy``) every rank takes part in gathering the weights; rank 0 writes, beside
    ``folder``, and renames it into place (:func:`~rlhf_fast.trainers.checkpoint.staged_folder`:
    a failed merge leaves the folder as it was)."""
    from rlhf_fast.distributed import full_state_dict, unwrap as ddp_unwrap

    from .checkpoint import staged_folder

    sd = full_state_dict(model, ctx, strategy)  # a collective under FSDP2
    if ctx.is_main:
        peft_model = ddp_unwrap(model)
        with torch.no_grad():
            if sd is None:  # the process holds the full weights: merge a copy
                replica = copy.deepcopy(peft_model)
            else:  # FSDP2: an unsharded CPU replica of the same peft model, given the gathered weights
                import peft

                from rlhf_fast.models.logprobs import unwrap as base_of

                name = peft_model.active_adapter
                base = auto_class.from_config(base_of(peft_model).config)
                replica = peft.get_peft_model(base, copy.deepcopy(peft_model.peft_config[name]), adapter_name=name)
                replica.load_state_dict(sd)
            merged = replica.merge_and_unload()
        # a new folder, not written over the old: a folder with adapter_config.json loads as base + adapter
        with staged_folder(folder) as tmp:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        del replica, merged
    ctx.barrier()


N_REWARD_SUMS = 5  # reward_sums: Σ score, scores, Σ [r_c > r_r], Σ (r_c − r_r), pairs


def reward_sums(scores: Sequence[torch.Tensor], pairs: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The sums TRL's RewardTrainer metrics are made of, for a micro-batch's ``scores`` (one
    tensor of scores per item, :meth:`RewardTrainer._scores`): ``[N_REWARD_SUMS]`` float64 (Σ of
    every score, their count, and for ``pairs`` (each item's [chosen, rejected]) Σ 1[r_c > r_r],
    Σ (r_c − r_r) and the pairs; 0 otherwise) and ``[2]`` float64 ``[max score, −min score]``, so
    that summing the first and taking the max of the second over micro-batches and ranks gives
    the global values (:func:`reward_metrics`)."""
    flat = torch.cat([s.detach().reshape(-1) for s in scores]).double()
    out = flat.new_zeros(N_REWARD_SUMS)
    out[0], out[1] = flat.sum(), flat.numel()
    if pairs:
        s = torch.stack([x.detach() for x in scores]).double()  # [B, 2]
        out[2], out[3], out[4] = (s[:, 0] > s[:, 1]).double().sum(), (s[:, 0] - s[:, 1]).sum(), s.shape[0]
    return out, torch.stack([flat.max(), -flat.min()])


def reward_metrics(sums: torch.Tensor, extremes: torch.Tensor, pairs: bool) -> Dict[str, float]:
    """TRL's RewardTrainer metrics from the global :func:`reward_sums`: ``min_reward``,
    ``mean_reward``, ``max_reward`` over every scored sequence, and for pairs ``accuracy`` (the
    fraction with r_chosen > r_rejected, a tie counting as a miss) and ``margin`` (the mean of
    r_chosen − r_rejected). Empty when nothing was scored."""
    t = sums.cpu().tolist()
    if t[1] <= 0:
        return {}
    hi, neg_lo = extremes.cpu().tolist()
    m = {"min_reward": -neg_lo, "mean_reward": t[0] / t[1], "max_reward": hi}
    if pairs and t[4] > 0:
        m.update(accuracy=t[2] / t[4], margin=t[3] / t[4])
    return m


def _load_label_file(path: str, _kind: str, dedup: bool = True) -> list:
    """PairRecords from a file written by ``rlhf-fast label`` / ``rlhf-fast judge`` (A/B labels)."""
    from rlhf_fast.feedback.formats import dedup_records
    from rlhf_fast.feedback.label import labels_to_pairs, read_labels

    if os.path.isdir(path):  # (a save_to_disk folder passes the data check; labels are rlhf-fast label's JSONL)
        raise IsADirectoryError(f"labels file {path} is a folder; expected the JSONL file `rlhf-fast label` writes")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels file not found: {path}")
    recs = labels_to_pairs(path)
    if not recs:  # (an empty file is refused as such by the caller)
        n = len(read_labels(path))
        if n:
            raise ValueError(f"labels file {path} holds no A/B labels ({n} ties / skips carry no preference): "
                             "a reward model or DPO trains on A/B labels only")
    return dedup_records(recs) if dedup else recs


def _texts(r) -> List[str]:
    from rlhf_fast.feedback.formats import record_texts

    return record_texts(r)


add_arguments, run = trainer_commands("reward", RewardConfig, RewardTrainer)  # what rlhf_fast.cli calls


__all__ = ["RewardConfig", "RewardTrainer", "synthetic_preference_records", "score_texts", "reward_lora",
           "add_arguments", "run"]
