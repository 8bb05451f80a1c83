"""Process reward models (PRM): ``rlhf-fast prm CONFIG.yaml [--key value ...]``.

TRL 0.x's ``PRMTrainer`` / ``PRMConfig`` (dropped from TRL 1.x; OpenRLHF's ``train_prm``): a
token classifier (``AutoModelForTokenClassification``, 2 labels) learns whether each step of a
step-by-step solution is correct. Data: TRL's "stepwise supervision" records, one JSON object a
line, ``{"prompt": str, "completions": [step, ...], "labels": [bool per step]}``
(:func:`load_stepwise_records`). Each record is tokenised as TRL's ``PRMTrainer.tokenize_row``
(:func:`tokenize_steps`): bos + the prompt, then every step followed by ``step_separator``, the
step's label (1 correct, 0 wrong) on the LAST token of its separator and -100 everywhere else;
``max_prompt_length`` keeps the prompt's last tokens, ``max_completion_length`` the steps' first,
``max_len`` (TRL's ``max_length``) the row's first; ``train_on_last_step_only`` labels only the
last step of training rows (evaluation rows keep every label, as TRL's ``is_eval``). The loss is
the cross-entropy at the labelled tokens, averaged over every labelled token of the global batch
(all micro-batches and ranks: transformers' ``num_items_in_batch`` with TRL's
``average_tokens_across_devices=True``).

Held-out metrics: ``eval_loss``, ``eval_accuracy`` (TRL's ``compute_accuracy``: the fraction of
labelled steps whose argmax is the label, a tie read as 0 as ``np.argmax`` reads it) and
``eval_solution_accuracy`` (a solution is correct iff all its labelled steps are; the fraction of
solutions whose predicted verdict, all steps predicted correct, is the label's).

The model is built from ``model``: a local folder (a causal LM's backbone gets a fresh 2-label
head, as TRL's ``AutoModelForTokenClassification.from_pretrained(..., num_labels=2)``) or a
``tiny:`` spec (the tiny causal LM's backbone likewise). ``final/`` holds ``save_pretrained`` of
the token classifier plus its tokenizer, and ``config.json`` records ``step_separator``, which
``reward.process_model`` in RL reads (:mod:`rlhf_fast.algorithms.process_rewards`).
Checkpoints, exact resume, torchrun (ddp / fsdp2), evaluation and the final save are the
SFT / reward trainers' (:mod:`rlhf_fast.trainers.sft`).

``lora`` (peft LoraConfig fields, as the reward trainer's; task_type TOKEN_CLS) trains fresh
adapters on the linear layers and, as peft does for TOKEN_CLS, the whole token-classification
head (``modules_to_save``; the head is added to ``exclude_modules`` so "all-linear" puts no
adapter on it, :func:`prm_lora`); the base weights stay frozen. A peft model passed as ``model``
keeps its own adapters. Either way ``final/`` holds the MERGED model (a plain token classifier
with ``step_separator`` in its config, what ``reward.process_model`` loads); checkpoints keep the
unmerged peft state (its trainable weights) and resume exactly. Not here yet: BEMA, merging.
"""

from __future__ import annotations

import dataclasses
import re
from itertools import chain
from typing import Any, Dict, List, Optional, Sequence

import torch

from rlhf_fast.distributed import DistributedConfig

from .common import (LoggingOptions, ModelInitOptions, OptimizerOptions, autocast_context, check_bool_fields,
                     check_lora_field, check_training_schedule, disable_dropout, load_split_records, pad_token_id,
                     steps_for_epochs, trainer_commands)
from .compile import CompileOptions
from .config import typed_config
from .sft import (_Batches, accumulation_context, count_tokens, eval_mode, init_optimization, local_share,
                  offload_context, open_trainer, optimizer_step, resume_supervised, save_supervised, training_loop,
                  wrap_configured)

IGNORE = -100  # transformers' ignore_index: tokens that carry no label
SEPARATOR_KEY = "step_separator"  # the saved model config's attribute that RL reads


@typed_config(loose=("data", "eval_data"))  # (rows or a path: common._check_data_source)
@dataclasses.dataclass
class PRMConfig(ModelInitOptions, OptimizerOptions, LoggingOptions, CompileOptions):
    """Process-reward-model settings (TRL 0.x's PRMConfig; see the module docstring).
    ``data`` / ``eval_data``: JSONL / Parquet of stepwise records (None: a synthetic arithmetic
    task, :func:`synthetic_stepwise_records`, so the defaults run); ``max_len`` is TRL's
    ``max_length``; ``max_prompt_length`` / ``max_completion_length``: null for no cap;
    ``step_separator``: the text after each step (its last token carries the step's label);
    ``train_on_last_step_only``: label only the last step of training rows. ``lora``: None, or
    LoraConfig fields ({} for r=8, alpha=16, every linear layer but the head; task TOKEN_CLS)."""

    model: str = "tiny:llama:hidden_size=64,num_layers=2,num_heads=4"
    data: Optional[str] = None
    eval_data: Optional[str] = None
    eval_fraction: float = 0.1
    output_dir: str = "runs/prm"
    max_len: int = 1024  # TRL's max_length (its default)
    max_prompt_length: Optional[int] = 512  # TRL's default; the prompt's last tokens
    max_completion_length: Optional[int] = None  # the steps' first tokens (separators included)
    step_separator: str = "\n"
    train_on_last_step_only: bool = False
    pad_to_multiple_of: Optional[int] = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    max_steps: int = 200
    grad_clip: float = 1.0
    bf16: Optional[bool] = None  # bf16 autocast, on CUDA only (null: true unless fp16, TRL's default)
    fp16: bool = False
    gradient_checkpointing: bool = False
    activation_offloading: bool = False
    disable_dropout: bool = True  # TRL's default (the token-classification head has dropout 0.1)
    num_train_epochs: Optional[float] = None
    eval_every: int = 50
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    resume: bool = True
    lora: Optional[Dict[str, Any]] = None  # LoraConfig fields ({}: r=8, alpha=16, every linear layer but the head)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def __post_init__(self):
        check_training_schedule(self)
        check_bool_fields(self, ("train_on_last_step_only", "resume"))
        check_lora_field(self)
        if self.lora is not None and self.lora.get("task_type", "TOKEN_CLS") not in ("TOKEN_CLS", None):
            # another task type would leave the token-classification head frozen at its random init
            raise ValueError(f"lora.task_type must be 'TOKEN_CLS' for a process reward model (or left out), "
                             f"got {self.lora['task_type']!r}")
        for name in ("max_prompt_length", "max_completion_length"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be null or an int >= 1, got {v!r}")
        if not isinstance(self.step_separator, str) or not self.step_separator:
            raise ValueError(f"step_separator must be a non-empty string, got {self.step_separator!r}")


@dataclasses.dataclass
class StepwiseRecord:
    """One solution: ``prompt``, its ``completions`` (the steps, in order) and one bool label per
    step (True: the step is correct)."""

    prompt: str
    completions: List[str]
    labels: List[bool]


def _row_problems(row: Any) -> List[tuple]:
    """``[(field, message)]`` of what is wrong with one stepwise row (empty when it is valid)."""
    if not isinstance(row, dict):
        return [("row", f"expected a JSON object, got {type(row).__name__}")]
    out = []
    if not isinstance(row.get("prompt"), str):
        out.append(("prompt", "missing" if "prompt" not in row else f"expected text, got {row['prompt']!r:.60}"))
    steps, labels = row.get("completions"), row.get("labels")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        out.append(("completions", "missing" if "completions" not in row else
                    f"expected a non-empty list of step strings, got {steps!r:.60}"))
    if "labels" not in row:
        out.append(("labels", "missing (one true/false per step)"))
    elif not isinstance(labels, list) or not all(isinstance(x, bool) for x in labels):
        out.append(("labels", f"expected a list of true/false, one per step, got {labels!r:.60}"))
    elif isinstance(steps, list) and len(labels) != len(steps):
        out.append(("labels", f"expected one label per step: {len(steps)} completions, {len(labels)} labels"))
    return out


def load_stepwise_records(source: Any, key: str = "data") -> List[StepwiseRecord]:
    """StepwiseRecords from a JSONL / Parquet path or a list of rows (dicts or StepwiseRecords).
    ValueError naming ``key``, the line and the field (``prompt``, ``completions``, ``labels``)
    for every bad row: labels missing, not bools, or not one per step."""
    from rlhf_fast.feedback.formats import Problem, _BadJSON, problems_error, read_rows

    if isinstance(source, (list, tuple)):
        source = [dataclasses.asdict(r) if isinstance(r, StepwiseRecord) else r for r in source]
    name, rows = read_rows(source, key)
    problems, out = [], []
    for line, row in rows:
        if isinstance(row, _BadJSON):
            problems.append(Problem(name, line, "row", row.message))
            continue
        bad = _row_problems(row)
        problems += [Problem(name, line, f, m) for f, m in bad]
        if not bad:
            out.append(StepwiseRecord(row["prompt"], list(row["completions"]), list(row["labels"])))
    if problems:
        raise problems_error(key, name, problems)
    return out


def synthetic_stepwise_records(n: int = 512, *, seed: int = 0, max_steps: int = 3,
                               max_digit: int = 2) -> List[StepwiseRecord]:
    """Solutions of small additions whose steps are decidable from their text: a step "a+b=c"
    (a, b in 0..``max_digit``) is correct iff c = a + b; half the steps are wrong, c then 3 to 5
    too large (so a tiny model learns it in tens of steps; chance step accuracy is ~0.5)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        steps, labels = [], []
        for _ in range(rng.randint(1, max_steps)):
            a, b = rng.randint(0, max_digit), rng.randint(0, max_digit)
            ok = rng.random() < 0.5
            steps.append(f"{a}+{b}={a + b if ok else a + b + rng.choice([3, 4, 5])}")
            labels.append(ok)
        out.append(StepwiseRecord("add the numbers:", steps, labels))
    return out


# Verifiable checks of an answer made of "a+b=c" lines (the synthetic additions' steps), as RL
# reward functions (``reward.functions: ["rlhf_fast.trainers.prm:synthetic_step_accuracy"]``): what
# a PRM's dense rewards should raise, logged with weight 0, or a format reward with weight 1.
_ADDITION_STEP = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*(\d+)\s*$")


def _line_fraction(completions: Sequence[str], test) -> List[float]:
    """Per completion: the fraction of its non-blank lines whose match (or None) passes ``test``
    (0 for an answer without a line)."""
    out = []
    for c in completions:
        lines = [s for s in c.split("\n") if s.strip()]
        out.append(sum(bool(test(_ADDITION_STEP.match(s))) for s in lines) / len(lines) if lines else 0.0)
    return out


def synthetic_well_formed(prompts, completions: Sequence[str], **fields) -> List[float]:
    """Format only: the fraction of an answer's lines that read "a+b=c"."""
    return _line_fraction(completions, lambda m: m is not None)


def synthetic_step_accuracy(prompts, completions: Sequence[str], **fields) -> List[float]:
    """The fraction of an answer's lines that read "a+b=c" with c = a + b."""
    return _line_fraction(completions, lambda m: m is not None and int(m[1]) + int(m[2]) == int(m[3]))


def synthetic_seen_errors(prompts, completions: Sequence[str], **fields) -> List[float]:
    """The fraction of an answer's lines wrong as :func:`synthetic_stepwise_records`' are (c = a + b + 3..5)."""
    return _line_fraction(completions, lambda m: m is not None and 3 <= int(m[3]) - int(m[1]) - int(m[2]) <= 5)


def synthetic_num_steps(prompts, completions: Sequence[str], **fields) -> List[float]:
    """An answer's non-blank lines."""
    return [float(sum(1 for s in c.split("\n") if s.strip())) for c in completions]


def tokenize_steps(tokenizer, prompt: str, completions: Sequence[str], labels: Sequence[bool], *,
                   step_separator: str = "\n", max_len: Optional[int] = None,
                   max_prompt_length: Optional[int] = None, max_completion_length: Optional[int] = None,
                   train_on_last_step_only: bool = False, is_eval: bool = False,
                   add_bos: bool = True) -> Dict[str, List[int]]:
    """TRL 0.x's ``PRMTrainer.tokenize_row``: ``{"input_ids": [T], "labels": [T]}`` (int lists).
    The prompt without special tokens after the tokenizer's bos (if any), each step without
    special tokens followed by ``step_separator``'s ids; a step's label (0/1) on its separator's
    last token, -100 elsewhere (and on every step but the last with ``train_on_last_step_only``,
    unless ``is_eval``); the prompt's last ``max_prompt_length`` tokens, the steps' first
    ``max_completion_length``, then the row's first ``max_len`` (each None: no cut). ``add_bos``
    False (ours): no bos before a prompt whose text already holds one (a chat template's)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    step_ids = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in completions]
    if train_on_last_step_only and not is_eval:
        lab = [IGNORE] * (len(labels) - 1) + [int(labels[-1])]
    else:
        lab = [int(x) for x in labels]
    sep = tokenizer.encode(step_separator, add_special_tokens=False)
    step_ids = [list(s) + sep for s in step_ids]
    completion = list(chain(*step_ids))
    step_labels = list(chain(*([IGNORE] * (len(s) - 1) + [x] for s, x in zip(step_ids, lab))))
    if add_bos and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + list(prompt_ids)
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if max_completion_length is not None:
        completion, step_labels = completion[:max_completion_length], step_labels[:max_completion_length]
    ids, out_labels = list(prompt_ids) + completion, [IGNORE] * len(prompt_ids) + step_labels
    if max_len is not None:
        ids, out_labels = ids[:max_len], out_labels[:max_len]
    return {"input_ids": ids, "labels": out_labels}


def check_separator(tokenizer, step_separator: str, key: str = "step_separator") -> None:
    """ValueError naming ``key`` when ``step_separator`` encodes to no token (no label position)."""
    if not tokenizer.encode(step_separator, add_special_tokens=False):
        raise ValueError(f"{key} {step_separator!r} encodes to no token with this tokenizer; choose a separator "
                         "the tokenizer keeps (its last token carries each step's label)")


def check_token_classifier(model, key: str = "model") -> None:
    """ValueError naming ``key`` unless ``model`` is a token classifier with 2 labels."""
    from rlhf_fast.distributed import unwrap
    from rlhf_fast.models.logprobs import unwrap as base_of

    base = base_of(unwrap(model))
    name = type(base).__name__
    if not name.endswith("ForTokenClassification") or getattr(base.config, "num_labels", None) != 2:
        raise ValueError(f"{key}: expected a token-classification model with 2 labels (as `rlhf-fast prm` saves), "
                         f"got {name} with num_labels={getattr(base.config, 'num_labels', None)}")


def token_classifier_from(causal) -> torch.nn.Module:
    """A fresh 2-label AutoModelForTokenClassification over ``causal``'s backbone (its weights
    copied; the head initialised from the global RNG): what TRL's ``from_pretrained(causal folder,
    num_labels=2)`` builds, for a model built in memory (a ``tiny:`` spec)."""
    import copy

    from transformers import AutoModelForTokenClassification

    cfg = copy.deepcopy(causal.config)
    cfg.num_labels, cfg.architectures = 2, None
    model = AutoModelForTokenClassification.from_config(cfg)
    getattr(model, model.base_model_prefix).load_state_dict(getattr(causal, causal.base_model_prefix).state_dict())
    return model.to(dtype=next(causal.parameters()).dtype).eval()


def load_prm_model(spec: str, *, texts: Sequence[str] = (), tokenizer=None, init_kwargs=None):
    """``(model, tokenizer)``: a 2-label token classifier from a local folder (a causal LM's or a
    PRM's) or a ``tiny:`` spec (the tiny causal LM's backbone, :func:`token_classifier_from`)."""
    import os

    from .common import load_causal_lm

    if isinstance(spec, str) and spec.startswith("tiny:"):
        causal, tok = load_causal_lm(spec, texts=list(texts), kind="causal", tokenizer=tokenizer,
                                     init_kwargs=init_kwargs)
        return token_classifier_from(causal), tok
    if not isinstance(spec, str) or not os.path.isdir(spec):
        raise ValueError(f"model must be a local folder or a 'tiny:' spec; {spec!r} is neither (nothing is downloaded)")
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from rlhf_fast.models.loading import (check_model_folder, check_model_init_kwargs, from_pretrained_kwargs,
                                          tokenizer_kwargs)

    check_model_folder(spec, "model", tokenizer=tokenizer is None)
    load_kw = from_pretrained_kwargs(check_model_init_kwargs(init_kwargs or {}))
    tok = tokenizer or AutoTokenizer.from_pretrained(spec, **tokenizer_kwargs(load_kw))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForTokenClassification.from_pretrained(spec, num_labels=2, **load_kw), tok


HEAD_NAMES = ("classifier", "score")  # peft's token-classification head names (its modules_to_save)


def prm_lora(lora: Dict[str, Any], model) -> Dict[str, Any]:
    """``lora`` (LoraConfig fields) for the token classifier ``model``: task TOKEN_CLS (peft then
    trains the head whole, as ``modules_to_save``) and the head kept out of the LoRA targets
    (added to ``exclude_modules``): peft's "all-linear" leaves out a causal LM's output layer and
    a SEQ_CLS head only, and a layer cannot carry LoRA and be saved whole (peft's TypeError).
    ValueError naming ``lora.target_modules`` when it lists the head."""
    from rlhf_fast.models.logprobs import unwrap as base_of

    base = base_of(model)
    heads = [n for n in HEAD_NAMES if isinstance(getattr(base, n, None), torch.nn.Module)]
    targets = lora.get("target_modules")
    if isinstance(targets, (list, tuple)) and set(heads) & set(targets):
        raise ValueError(f"lora.target_modules must not name the token-classification head {heads[0]!r}: it trains "
                         f"whole (peft's modules_to_save for TOKEN_CLS), got {list(targets)!r}")
    excl = lora.get("exclude_modules")
    if excl is None:
        excl = heads
    elif isinstance(excl, str):  # peft reads a string as one regex over the full module name
        excl = "|".join([f"(?:{excl})", *heads])
    else:
        excl = list(excl) + [h for h in heads if h not in excl]
    return {**lora, "task_type": "TOKEN_CLS", "exclude_modules": excl}


def pad_rows(items: Sequence[Dict[str, List[int]]], pad_id: int, pad_to_multiple_of: Optional[int] = None):
    """``(input_ids, attention_mask, labels)`` ``[B, T]`` int64 of tokenised rows, right-padded
    (labels with -100)."""
    from rlhf_fast.feedback.formats import pad_right

    ids, attn = pad_right([it["input_ids"] for it in items], pad_id, pad_to_multiple_of)
    labels = torch.full_like(ids, IGNORE)
    for i, it in enumerate(items):
        labels[i, :len(it["labels"])] = torch.tensor(it["labels"], dtype=torch.long)
    return ids, attn, labels


def step_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over labelled tokens (labels != -100) of the cross-entropy of ``logits`` ``[B, T, 2]``
    against ``labels`` ``[B, T]`` int64: a 0-dim float32 (divide by the labelled-token count of
    the global batch for TRL's mean)."""
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                             ignore_index=IGNORE, reduction="sum")


class PRMTrainer:
    """Trains a process reward model (see the module docstring). ``model`` / ``tokenizer`` /
    ``train_records`` / ``eval_records`` (StepwiseRecords or dicts) override what the config
    would load. ``train()`` returns the final metrics dict."""

    def __init__(self, cfg: PRMConfig, *, model=None, tokenizer=None, train_records=None, eval_records=None):
        if not isinstance(cfg, PRMConfig):
            raise TypeError(f"cfg must be a PRMConfig, got {type(cfg).__name__}")
        open_trainer(self, cfg)
        train_records, eval_records = load_split_records(
            cfg, lambda path: load_stepwise_records(path, "eval_data" if path == cfg.eval_data else "data"),
            lambda: synthetic_stepwise_records(seed=cfg.seed), train_records, eval_records)
        train_records = load_stepwise_records(list(train_records), "train_records")
        eval_records = load_stepwise_records(list(eval_records or []), "eval_records")
        if model is None:
            texts = [t for r in train_records[:2000] for t in [r.prompt, cfg.step_separator.join(r.completions)]]
            model, tokenizer = load_prm_model(cfg.model, texts=texts, tokenizer=tokenizer,
                                              init_kwargs=cfg.model_init_kwargs)
        elif tokenizer is None:
            raise ValueError("tokenizer must be given together with model")
        check_token_classifier(model)
        check_separator(tokenizer, cfg.step_separator)
        self.model, self.tokenizer = model.to(self.device), tokenizer
        self.pad_id = pad_token_id(tokenizer)
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.pad_id
        setattr(self.model.config, SEPARATOR_KEY, cfg.step_separator)  # saved in final/config.json for RL
        from rlhf_fast.models.loading import _is_peft, enable_activation_checkpointing, load_policy

        if cfg.lora is not None or _is_peft(self.model):
            # fresh adapters (task TOKEN_CLS: peft trains the head whole, as modules_to_save), or a
            # peft model's own; checkpointing then keeps input gradients past the frozen embeddings
            lora = None if cfg.lora is None else prm_lora(cfg.lora, self.model)
            self.model = load_policy(self.model, gradient_checkpointing=cfg.gradient_checkpointing, lora=lora)
        elif cfg.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.is_peft = _is_peft(self.model)
        if cfg.disable_dropout:  # after the adapters, so lora_dropout goes too (as the reward trainer)
            disable_dropout(self.model)
        self.model = wrap_configured(self.model, cfg.distributed, self.ctx)
        # rows with no label left after truncation train nothing: dropped (TRL keeps them, loss 0)
        self.train_items = [it for it in (self._encode(r, False) for r in train_records) if it["n_labels"]]
        if train_records and not self.train_items:
            raise ValueError(f"no training row keeps a labelled step after truncation (max_len {cfg.max_len}, "
                             f"max_prompt_length {cfg.max_prompt_length}, max_completion_length "
                             f"{cfg.max_completion_length}): raise them")
        self.eval_items = [it for it in (self._encode(r, True) for r in eval_records) if it["n_labels"]]
        self.batches = _Batches(len(self.train_items), cfg.batch_size, cfg.seed)
        steps_for_epochs(cfg, len(self.train_items))
        init_optimization(self)

    def _encode(self, r: StepwiseRecord, is_eval: bool) -> Dict[str, Any]:
        c = self.cfg
        row = tokenize_steps(self.tokenizer, r.prompt, r.completions, r.labels, step_separator=c.step_separator,
                             max_len=c.max_len, max_prompt_length=c.max_prompt_length,
                             max_completion_length=c.max_completion_length,
                             train_on_last_step_only=c.train_on_last_step_only, is_eval=is_eval)
        row["n_labels"] = sum(x != IGNORE for x in row["labels"])
        return row

    def _logits(self, items: Sequence[Dict[str, Any]]):
        """``(logits [B, T, 2], labels [B, T])`` of a micro-batch, on the trainer's device."""
        ids, attn, labels = pad_rows(items, self.pad_id, self.cfg.pad_to_multiple_of)
        with autocast_context(self.device, self.cfg.bf16, self.cfg.fp16):
            logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits
        return logits, labels.to(self.device)

    def loss(self, items: Sequence[Dict[str, Any]]) -> torch.Tensor:
        """The mean cross-entropy over the labelled tokens of ``items`` (0-dim float32)."""
        logits, labels = self._logits(items)
        return step_loss_sum(logits, labels) / max(sum(it["n_labels"] for it in items), 1)

    @torch.no_grad()
    def evaluate(self, items: Optional[Sequence[Dict[str, Any]]] = None) -> Dict[str, float]:
        """``eval_loss``, ``eval_accuracy`` (per labelled step) and ``eval_solution_accuracy``
        (per solution: all steps predicted correct vs all labelled correct) on ``items``. Several
        ranks: each evaluates its share of every batch (:func:`local_share`; a blank share still
        runs its forward, which FSDP2 needs, and counts nothing), the sums all-reduced: one
        process's metrics. Collective then: every rank calls it."""
        items = self.eval_items if items is None else items
        if not items:
            return {}
        tot = torch.zeros(4, dtype=torch.float64, device=self.device)  # (loss sum, labels, correct, solutions ok)
        with eval_mode(self.model):
            for i in range(0, len(items), self.cfg.batch_size):
                chunk, real = local_share(list(range(i, min(i + self.cfg.batch_size, len(items)))), items, self.ctx)
                logits, labels = self._logits(chunk)
                mask = labels != IGNORE
                pred = (logits[..., 1] > logits[..., 0]).long()  # np.argmax: a tie is label 0
                ok = lambda x: torch.where(mask, x == 1, torch.ones_like(mask)).all(-1)  # noqa: E731
                if real:
                    tot += torch.stack([step_loss_sum(logits, labels).double(), mask.sum().double(),
                                        ((pred == labels) & mask).sum().double(),
                                        (ok(pred) == ok(labels)).sum().double()])
        loss, n, correct, sol_ok = self.ctx.all_reduce_sum(tot).tolist()  # the sums over every rank's share
        return {"eval_loss": loss / max(n, 1), "eval_accuracy": correct / max(n, 1),
                "eval_solution_accuracy": sol_ok / len(items)}

    def train_step(self) -> Dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches (fewer at an epoch's end:
        ``_Batches.step``); the loss is normalised by the
        labelled tokens of all of them (on every rank), as transformers' ``num_items_in_batch``."""
        cfg, ctx = self.cfg, self.ctx
        self.model.train()
        batches = self.batches.step(cfg.grad_accum)
        n_global = max(sum(self.train_items[i]["n_labels"] for idx in batches for i in idx), 1)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, idx in enumerate(batches):
            chunk, real = local_share(idx, self.train_items, ctx)
            # DDP / FSDP2: the gradients reduced once, after the step's last micro-batch
            with accumulation_context(self.model, i, len(batches)), offload_context(self):
                logits, labels = self._logits(chunk)
                loss = step_loss_sum(logits, labels) * (float(real) / n_global)
                # DDP/FSDP2 average gradients over ranks; grad_scale turns that into the sum
                self.scaler.scale(loss * ctx.grad_scale).backward()
            total += loss.detach().double()
        gnorm = optimizer_step(self)
        m = {"loss": float(ctx.all_reduce_sum(total)), "grad_norm": gnorm, **self.scaler.metrics(),
             "lr": self.step_lr, "epoch": self.batches.epochs_done()}  # transformers' state.epoch
        m.update(count_tokens(self, sum(len(self.train_items[i]["input_ids"]) for idx in batches for i in idx)))
        return ctx.mean_metrics(m)

    def _save(self) -> None:
        save_supervised(self, "prm")

    def train(self) -> Dict[str, float]:
        """Train to ``max_steps`` (resuming when ``resume``); save to ``output_dir/final`` (a
        LoRA / peft run: the merged model, see :meth:`save_merged`)."""
        import os

        resume_supervised(self, "prm")
        out = training_loop(self, has_eval=bool(self.eval_items))
        if self.is_peft:
            # training_loop saved the adapter there; reward.process_model needs a plain token classifier
            self.save_merged(os.path.join(self.run.path, "final"))
        return out

    def save_merged(self, folder: str) -> None:
        """Write the peft PRM merged (``step_separator`` in its config) to ``folder``
        (:func:`~rlhf_fast.trainers.reward.save_merged_peft`): a plain
        AutoModelForTokenClassification folder, as a full fine-tune saves."""
        from transformers import AutoModelForTokenClassification

        from .reward import save_merged_peft

        save_merged_peft(self.model, self.tokenizer, folder, self.ctx, self.cfg.distributed.strategy,
                         AutoModelForTokenClassification)


add_arguments, run = trainer_commands("prm", PRMConfig, PRMTrainer)  # what rlhf_fast.cli calls


__all__ = ["PRMConfig", "PRMTrainer", "StepwiseRecord", "load_stepwise_records", "synthetic_stepwise_records",
           "tokenize_steps", "step_loss_sum", "load_prm_model", "prm_lora", "token_classifier_from",
           "check_token_classifier", "add_arguments", "run"]
