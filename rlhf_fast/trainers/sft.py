"""Supervised fine-tuning: ``rlhf-fast sft CONFIG.yaml [--key value ...]``.

The loss is the mean negative log-prob of the completion tokens only (prompt tokens and
padding do not count; token t is predicted from tokens < t), computed with the fused log-prob
path :func:`rlhf_fast.models.logprobs.sequence_logprobs`, which never materialises the
``[B, T, V]`` logits; it equals ``F.cross_entropy`` with the prompt labelled -100 (TRL's
``completion_only_loss``). Gradient accumulation normalises by the completion tokens of the
whole optimizer step (one sum over every micro-batch and rank divided by one global count, as
TRL's ``num_items_in_batch``; not OpenRLHF's mean of per-micro-batch means), so the result
does not depend on the micro-batch split. ``completion_only_loss: false`` trains the prompt
tokens too. Conversational records ``{"messages": [...]}`` (TRL's "conversational language
modeling" format) are rendered whole by the tokenizer's chat template and train on every token,
or with ``assistant_only_loss: true`` on the assistant turns alone: each turn's content and the
template's end of turn, not its role header (:mod:`rlhf_fast.trainers.sft_data`, which works
with any prefix-stable template). Text records ``{"text": ...}`` (TRL's language-modeling
format, its ``dataset_text_field`` "text") train on every token, eos appended; a file holds
them alone (:func:`tokenize_sft`). ``loss_type: dft`` is TRL's Dynamic Fine-Tuning: each token's
NLL weighted by its detached probability, with the same global-token normalisation (the eval
loss stays the NLL). ``num_train_epochs`` sets ``max_steps`` from the training rows
(:func:`rlhf_fast.trainers.common.steps_for_epochs`); ``disable_dropout`` turns dropout off.
``truncation_mode`` (TRL's): a row longer than ``max_len`` keeps its first tokens (``keep_start``,
the default) or its last (``keep_end``: the completion or last turns and their eos), with its
mask cut alike (:func:`tokenize_sft`); under bfd ``packing`` too, where TRL ignores it.
``batch_size`` rows per micro-batch, ``grad_accum``
micro-batches per optimizer step (an epoch's last step those left, as transformers: no step
crosses an epoch's end); ``max_steps``, ``warmup_steps`` and the LR schedule count
optimizer steps; gradients are clipped once, on the accumulated gradient. AdamW's weight decay
applies to matrices only, not to biases and norm gains
(:func:`rlhf_fast.trainers.common.decay_param_groups`).
``packing`` is padding-free packing: each micro-batch's rows become one row whose position
ids restart at every document and whose attention stays inside each document (as TRL's
``padding_free`` / "bfd" with flash attention, not the simple packing whose attention
crosses documents; packed for the model types in ``logprobs.PACKED_TESTED`` / ``PACKED_CHECKED``,
others run the padded forward with a warning: the same values either way), so
it changes speed, not the loss. ``packing_strategy: wrapped`` is TRL's other packing: every
document tokenised whole, the documents concatenated in record order and cut into ``max_len``
chunks that train as plain rows (one causal attention and positions 0..max_len-1 over the chunk,
across its documents, as TRL's wrapped rows; :func:`sft_rows`), which changes the loss.
``eval_packing`` (null: as ``packing``, TRL's default) packs the eval set by the same strategy;
under ``bfd`` its loss is the same packed or not. Eval loss is the token-weighted mean
over the whole eval set (perplexity its exp), whatever the batch size. Also LR warm-up,
bf16 autocast on GPU, atomic checkpoints and exact resume. ``lora`` (LoraConfig fields) wraps
the model in fresh LoRA adapters, and a peft model passed as ``model`` (or an adapter folder
named by it) keeps its own: either way the adapters alone train and ``final/`` holds the
adapter (no merge is done). ``bema``
(TRL's ``BEMACallback``: :mod:`rlhf_fast.trainers.bema`) keeps the bias-corrected EMA of the
weights, saved as a model to ``RUN_DIR/bema`` at the end; its hooks live in the functions this
module shares with the reward, DPO and KTO trainers (``optimizer_step``, ``save_supervised``,
``resume_supervised``, ``training_loop``), so each of them has it.

Under ``torchrun`` with ``distributed.strategy`` ddp or fsdp2, each rank takes its contiguous
share of every global batch (so the global batch and the seed define the run, whatever the
number of ranks), the loss is normalised by the global completion-token count, rank 0 alone
writes the run folder, and checkpoints are sharded (``torch.distributed.checkpoint``) and
resumable on another number of ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from rlhf_fast.distributed import (DistContext, DistributedConfig, init_distributed, load_sharded, no_gradient_sync,
                                   save_sharded, wrap_model)
from rlhf_fast.feedback.formats import padded_length
from rlhf_fast.models.loading import enable_activation_checkpointing
from rlhf_fast.models.moe_aux import RouterAux, check_coef

from .checkpoint import (checkpoint_dir, checkpoint_step, keeping_hyperparameters, load_checkpoint, prune_checkpoints,
                         restoring_extra, save_checkpoint, staged_folder)
from .common import (MetricsLogger, autocast_context, begin_fresh_run, check_bool_fields, check_lora_field,
                     check_tokenizer_override_fields, check_training_schedule, disable_dropout, load_split_records,
                     open_supervised_run, pad_token_id, resolve_device, seed_everything, split_records,
                     steps_for_epochs, supervised_scheduler, trainer_commands, trainer_model, truncate_metrics)
from .common import LoggingOptions, ModelInitOptions, OptimizerOptions, supervised_optimizer
from .compile import CompileOptions, compile_configured
from .config import typed_config
from .merging import MergeOptions, check_merge_target, merge_into, setup_merge
from .common import (LOG_WINDOW_KEY, LogWindow, metric_to_step_on, schedule_metric, step_logged,
                     steps_on_metric)
from .mixed_precision import LossScaler
from .best_checkpoint import EXTRA_KEY as BEST_KEY, BestCheckpoint, load_best_model
from .bema import (BEMAConfig, check_bema_field, load_bema, maybe_bema_update, prune_bema, save_bema, save_bema_model,
                   setup_bema)
from .stop import StopOnSignal, TrainingStopped


LOSS_TYPES = ("nll", "dft")
# TRL's SFTConfig.truncation_mode: a row longer than max_len keeps its first / last max_len tokens
TRUNCATION_MODES = ("keep_start", "keep_end")
# TRL's SFTConfig.packing_strategy values we run ("bfd_split" is not one of them)
PACKING_STRATEGIES = ("bfd", "wrapped")


@typed_config(loose=("data", "eval_data"))  # (rows or a path: common._check_data_source)
@dataclasses.dataclass
class SFTConfig(ModelInitOptions, OptimizerOptions, LoggingOptions, CompileOptions, MergeOptions):
    """SFT settings. ``data``: a JSONL/Parquet of {prompt, completion} or {messages} records
    (None: a built-in synthetic copy task, so the defaults run); ``model``: a local folder or
    ``tiny:`` spec."""

    model: str = "tiny:llama:hidden_size=64,num_layers=2,num_heads=4"
    data: Optional[str] = None
    eval_data: Optional[str] = None
    eval_fraction: float = 0.1  # held out from ``data`` when no eval_data
    output_dir: str = "runs/sft"
    max_len: int = 256
    # TRL's: each batch's length rounded up to a multiple of this (tensor-core / kernel-friendly shapes); null: none
    pad_to_multiple_of: Optional[int] = None
    truncation_mode: str = "keep_start"  # a row over max_len keeps its first ("keep_start") or last ("keep_end") tokens
    batch_size: int = 8
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
    lora: Optional[Dict[str, Any]] = None  # LoraConfig fields ({}: r=8, alpha=16, every linear layer)
    packing: bool = False
    # how a packed set is packed (TRL's packing_strategy): "bfd", padding-free, attention inside each
    # document; "wrapped", the documents concatenated and cut into max_len chunks, attention across them
    packing_strategy: str = "bfd"
    eval_packing: Optional[bool] = None  # TRL's: whether the eval set is packed (null: as packing)
    eval_every: int = 50
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    resume: bool = True
    dedup: bool = True
    # prompt/completion records: loss on the completion only (false: on the prompt too)
    completion_only_loss: bool = True
    # {"messages"} records: loss on the assistant turns only (false: on every token), as TRL
    assistant_only_loss: bool = False
    loss_type: str = "nll"  # "nll", or "dft": each token's NLL weighted by its detached probability
    # TRL's: weight of an MoE model's router load-balancing loss (null: the model config's own; 0 if dense)
    router_aux_loss_coef: Optional[float] = None
    num_train_epochs: Optional[float] = None  # set: max_steps = ceil(epochs x ceil(batches an epoch / grad_accum))
    disable_dropout: bool = False  # p = 0 in every dropout (TRL's SFTConfig has no such key, nor do we by default)
    # TRL's tokenizer overrides (null: the tokenizer's own); final/ saves the changed tokenizer
    eos_token: Optional[str] = None  # a token of the vocabulary: the eos appended to completions and texts
    pad_token: Optional[str] = None  # a token of the vocabulary: the padding
    chat_template_path: Optional[str] = None  # a .jinja / .j2 file, or a tokenizer folder whose template is cloned
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    # TRL's BEMACallback (its argument names and defaults; rlhf_fast.trainers.bema): BEMA weights saved to RUN_DIR/bema
    bema: Optional[BEMAConfig] = None

    def __post_init__(self):
        check_training_schedule(self)
        check_lora_field(self)
        self.bema = check_bema_field(self, no_reference_update="the SFT trainer has no reference model")
        check_bool_fields(self, ("completion_only_loss", "assistant_only_loss", "resume", "dedup"))
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}")
        self._check_packing()
        check_tokenizer_override_fields(self)
        check_coef(self.router_aux_loss_coef)
        if not (self.model.startswith("tiny:") or self.model):
            raise ValueError("model must be a local folder or a 'tiny:' spec")

    def _check_packing(self) -> None:
        check_bool_fields(self, ("packing",))
        if self.eval_packing is not None and not isinstance(self.eval_packing, bool):
            raise ValueError(f"eval_packing must be true, false or null (as packing), got {self.eval_packing!r}")
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(f"packing_strategy must be one of {PACKING_STRATEGIES}, got {self.packing_strategy!r}")
        if (self.packing_strategy == "wrapped" and (self.packing or self.eval_packing)
                and self.truncation_mode != "keep_start"):
            # wrapped packing cuts no document to max_len (TRL ignores truncation_mode when packing)
            raise ValueError(f"truncation_mode {self.truncation_mode!r} has no effect with packing_strategy "
                             "'wrapped', which cuts the concatenated documents into max_len chunks and no "
                             "document on its own: leave truncation_mode at 'keep_start'")

    def packs(self, split: str) -> Optional[str]:
        """The packing strategy of the ``"train"`` or ``"eval"`` set, or None when it is not packed:
        the eval set follows ``packing`` unless ``eval_packing`` is set (TRL's rule)."""
        on = self.packing if split == "train" or self.eval_packing is None else self.eval_packing
        return self.packing_strategy if on else None


def synthetic_sft_records(n: int = 256, seed: int = 0) -> list:
    """A toy task whose loss visibly falls: the completion repeats the prompt's words."""
    from rlhf_fast.feedback.formats import SFTRecord

    rng = random.Random(seed)
    words = "red blue green cat dog sun moon one two three".split()
    out = []
    for _ in range(n):
        w = [rng.choice(words) for _ in range(rng.randint(2, 5))]
        out.append(SFTRecord(f"repeat: {' '.join(w)}\n", " ".join(w)))
    return out


def _cut(seq: List[int], max_len: int, mode: str) -> List[int]:
    """``seq``'s first (``keep_start``) or last (``keep_end``) ``max_len`` items."""
    return list(seq[:max_len]) if mode == "keep_start" else list(seq[max(0, len(seq) - max_len):])


def tokenize_sft(records: Sequence[Any], tokenizer, max_len: int, *, completion_only_loss: bool = True,
                 assistant_only_loss: bool = False, truncation_mode: str = "keep_start"
                 ) -> Tuple[List[Dict[str, List[int]]], int]:
    """Token rows ``{"input_ids", "response_mask"}`` (prompt + completion + eos; the mask
    marks completion and eos, or with ``completion_only_loss=False`` every token). Completions
    are cut to fit ``max_len``; records whose prompt leaves no room are dropped. Returns (rows,
    number dropped). ``response_mask`` is the mask of the tokens that train, whatever the record.

    A :class:`~rlhf_fast.feedback.formats.ChatRecord` (``{"messages"}``) is the conversation
    rendered by the chat template (:func:`rlhf_fast.trainers.sft_data.chat_tokens`; no eos is
    added, the template closes its turns), masked on its assistant turns with
    ``assistant_only_loss`` and on every token without; cut to its first ``max_len`` tokens
    and dropped when no token after the first is left to train.

    The prompt is tokenised as generation sees it (plain text with the tokenizer's special
    tokens such as bos — one bos where the text already starts with it, as
    :func:`~rlhf_fast.feedback.formats.prompt_token_ids`; TRL keeps two —, a chat through its
    template with the generation prompt and no second bos), so the prompt tokens are exactly
    those a rollout conditions on, and the completion as its continuation
    (:func:`rlhf_fast.trainers.sft_data.continuation_ids`: prompt + completion tokenised together,
    the prompt's tokens cut off, as TRL; alone where a token merges across the boundary). One eos
    is appended to the
    completion unless its text already ends with the eos token (as TRL's ``add_eos`` and
    OpenRLHF's SFTDataset do); a tokenizer without an eos is a ValueError naming ``eos_token``. Truncation keeps the start (TRL's ``keep_start``): the whole
    prompt and the first completion tokens; a completion cut short loses its eos (unlike
    OpenRLHF, which overwrites the last token with eos). For a chat prompt the completion
    is plain text followed by eos, not re-rendered by the template, so an end-of-turn
    marker that differs from eos is not trained.

    A :class:`~rlhf_fast.feedback.formats.TextRecord` (``{"text"}``, TRL's language-modeling
    format, ``dataset_text_field`` "text") trains every token: the text with the tokenizer's
    special tokens (e.g. bos), one eos appended unless it already ends with one, cut to its
    first ``max_len`` tokens, dropped when fewer than 2 tokens are left (TRL's SFTTrainer rows
    for a ``text`` dataset). Text records cannot be mixed with the other kinds (ValueError):
    TRL reads one format per dataset.

    ``truncation_mode="keep_end"`` (TRL's, which cuts every form the same way: the row's ids
    and its mask together) keeps the last ``max_len`` tokens of each row instead: a text's
    end, a conversation's last turns, a prompt–completion row's completion (with its eos) and
    as much of the prompt's end as fits; the mask stays aligned with the ids, and a row is
    dropped when no token after the first is left to train (an empty prompt still drops the
    record, as with ``keep_start``)."""
    from jinja2 import TemplateError

    from rlhf_fast.feedback.formats import ChatRecord, TextRecord, prompt_token_ids, render_prompt

    from .sft_data import chat_tokens, continuation_ids

    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    n_text = sum(isinstance(r, TextRecord) for r in records)
    if 0 < n_text < len(records):
        first = next(i for i, r in enumerate(records) if isinstance(r, TextRecord) != isinstance(records[0], TextRecord))
        raise ValueError(f"sft records mix {{'text'}} records ({n_text}) with prompt/completion or messages records "
                         f"({len(records) - n_text}), first at record {first}: use one format per dataset")
    rows, dropped = [], 0
    for i, r in enumerate(records):
        why = not_an_sft_record(f"sft record {i}", r)
        if why:
            raise TypeError(why)
        if tokenizer.eos_token_id is None and not isinstance(r, ChatRecord):
            # (TRL fails in its add_eos): rows without an end would teach the model never to stop
            raise ValueError(f"sft record {i}: the tokenizer has no eos token to end its "
                             f"{'text' if isinstance(r, TextRecord) else 'completion'} with, so the model would "
                             "never learn to stop: set eos_token (a token of the vocabulary)")
        if isinstance(r, TextRecord):
            ids = list(tokenizer(r.text)["input_ids"])  # the tokenizer's special tokens, as TRL's text rows
            eos = tokenizer.eos_token_id
            if eos is not None and not (ids and ids[-1] == eos):
                ids.append(eos)
            ids = _cut(ids, max_len, truncation_mode)
            if len(ids) < 2:  # position 0 is never predicted: nothing would train
                dropped += 1
                continue
            rows.append({"input_ids": ids, "response_mask": [1] * len(ids)})
            continue
        if isinstance(r, ChatRecord):
            try:
                ids, mask = chat_tokens(tokenizer, r.messages, assistant_only=assistant_only_loss)
            except ValueError as e:  # named, so a bad row among thousands can be found
                raise ValueError(f"sft record {i}: {e}") from None
            ids, mask = _cut(ids, max_len, truncation_mode), _cut(mask, max_len, truncation_mode)
            if not any(mask[1:]):  # position 0 is never predicted
                dropped += 1
                continue
            rows.append({"input_ids": ids, "response_mask": mask})
            continue
        # a chat template already writes its special tokens; plain text gets the tokenizer's (e.g. bos)
        try:
            text = render_prompt(r.prompt, tokenizer)
        except TemplateError as e:  # the template's raise_exception (Gemma: no system role, ...)
            raise ValueError(f"sft record {i}: the chat template refuses its prompt "
                             f"({type(e).__name__}: {e})") from None
        special = isinstance(r.prompt, str)
        p = tokenizer(text, add_special_tokens=special)["input_ids"]
        c = continuation_ids(tokenizer, text, p, r.completion, add_special_tokens=special)
        # the ids generation conditions on: a text that already starts with the bos text keeps one bos, not two
        p = prompt_token_ids(tokenizer, [text])[0]
        eos = tokenizer.eos_token_id
        if eos is not None and not (c and c[-1] == eos):  # a completion that already ends with eos keeps one
            c = c + [eos]
        if not completion_only_loss:  # TRL's completion_only_loss=False: the prompt trains too
            ids = _cut(p + c, max_len, truncation_mode)
            if len(ids) < 2:
                dropped += 1
                continue
            rows.append({"input_ids": ids, "response_mask": [1] * len(ids)})
            continue
        if truncation_mode == "keep_end" and p:
            ids = _cut(p + c, max_len, truncation_mode)
            mask = _cut([0] * len(p) + [1] * len(c), max_len, truncation_mode)
            if not any(mask[1:]):
                dropped += 1
                continue
            rows.append({"input_ids": ids, "response_mask": mask})
            continue
        if len(p) == 0 or len(p) >= max_len:
            dropped += 1
            continue
        c = c[: max_len - len(p)]
        rows.append({"input_ids": p + c, "response_mask": [0] * len(p) + [1] * len(c)})
    return rows, dropped


def not_an_sft_record(where: str, r: Any) -> Optional[str]:
    """Why ``r`` is not a record :func:`tokenize_sft` reads (an SFTRecord with a text completion,
    a ChatRecord or a TextRecord), the message starting with ``where``; None when it is one."""
    from rlhf_fast.feedback.formats import ChatRecord, SFTRecord, TextRecord

    if not isinstance(r, (SFTRecord, ChatRecord, TextRecord)):
        hint = " (rows as dicts go to SFTConfig.data)" if isinstance(r, dict) else ""
        return f"{where}: expected an SFTRecord, ChatRecord or TextRecord, got {type(r).__name__}{hint}"
    if isinstance(r, SFTRecord) and not isinstance(r.completion, str):
        return (f"{where}: the completion must be text, got {type(r.completion).__name__} (a conversational "
                "completion, TRL's list of messages, is not read: give the conversation as a ChatRecord, "
                "its messages the prompt's then the completion's, with assistant_only_loss: true)")
    return None


def sft_rows(records: Sequence[Any], tokenizer, cfg: SFTConfig, split: str
             ) -> Tuple[List[Dict[str, List[int]]], int]:
    """The token rows of the ``"train"`` or ``"eval"`` set (:func:`tokenize_sft` with ``cfg``'s
    options); returns (rows, records dropped). Under ``packing_strategy: wrapped`` (where
    :meth:`SFTConfig.packs` packs the set) every document is tokenised whole and the rows are
    TRL's wrapped chunks of ``max_len`` tokens (:func:`rlhf_fast.trainers.sft_data.pack_wrapped`),
    in record order (TRL's ``shuffle_dataset`` default, false); a record with nothing to train is
    still dropped first, where TRL keeps it as context for its neighbours."""
    from .sft_data import pack_wrapped

    wrapped = cfg.packs(split) == "wrapped"
    rows, dropped = tokenize_sft(records, tokenizer, sys.maxsize if wrapped else cfg.max_len,
                                 completion_only_loss=cfg.completion_only_loss,
                                 assistant_only_loss=cfg.assistant_only_loss, truncation_mode=cfg.truncation_mode)
    return (pack_wrapped(rows, cfg.max_len) if wrapped else rows), dropped


def apply_sft_tokenizer_overrides(cfg: SFTConfig, model, tokenizer) -> List[int]:
    """``cfg.eos_token`` / ``chat_template_path`` / ``pad_token`` applied to ``tokenizer`` and
    ``model`` in place, as TRL's SFTTrainer applies them
    (:func:`rlhf_fast.models.loading.apply_tokenizer_overrides`); returns the ids of the tokens
    a cloned template added. A peft model passed in cannot take new tokens (its embeddings are
    the base's): ValueError."""
    from rlhf_fast.models.loading import apply_tokenizer_overrides

    return apply_tokenizer_overrides(model, tokenizer, eos_token=cfg.eos_token, pad_token=cfg.pad_token,
                                     chat_template_path=cfg.chat_template_path)


def lora_with_new_tokens(lora, added: List[int]):
    """``lora`` (LoraConfig fields) with the ``added`` token ids' embedding rows trainable (peft's
    ``trainable_token_indices`` on ``embed_tokens``) and ``lm_head`` in ``modules_to_save``, as
    TRL's SFTTrainer does after cloning a chat template; ``lora`` itself unchanged when nothing
    was added (a copy is changed)."""
    if not added or lora is None:
        return lora
    import warnings

    if not isinstance(lora, dict):  # a peft.LoraConfig: as TRL, on a copy
        import copy

        lora = copy.deepcopy(lora)
        tti = lora.trainable_token_indices
        lora.trainable_token_indices = _merge_token_indices(tti, added)
        mts = lora.modules_to_save
    else:
        lora = {**lora, "trainable_token_indices": _merge_token_indices(lora.get("trainable_token_indices"), added)}
        mts = lora.get("modules_to_save")
    if not mts or "lm_head" not in mts:
        # as TRL 1.16's SFTTrainer: warned, and lm_head added, so the new tokens (the cloned
        # template's eos among them) can be learnt as outputs
        warnings.warn("chat_template_path added tokens to the tokenizer, but 'lm_head' is not in lora's "
                      "modules_to_save: added to it (as TRL does), so the model can learn to generate them",
                      stacklevel=2)
        mts = list(mts or []) + ["lm_head"]
        if isinstance(lora, dict):
            lora["modules_to_save"] = mts
        else:
            lora.modules_to_save = mts
    return lora


def _merge_token_indices(tti, added: List[int]):
    if tti is None:
        return {"embed_tokens": list(added)}
    if isinstance(tti, list):  # peft's list form means embed_tokens too
        return {"embed_tokens": list(tti) + list(added)}
    tti = dict(tti)
    tti["embed_tokens"] = list(tti.get("embed_tokens", [])) + list(added)
    return tti


def record_text(r: Any) -> str:
    """The text of an SFT record (prompt and completion, or every message), for training a
    ``tiny:`` model's tokenizer on the data."""
    from rlhf_fast.feedback.formats import ChatRecord, TextRecord

    if isinstance(r, ChatRecord):
        return " ".join(m.get("content") or "" for m in r.messages)  # a tool-call turn may have none
    if isinstance(r, TextRecord):
        return r.text
    return str(r.prompt) + " " + r.completion


def collate(rows: Sequence[Dict[str, List[int]]], pad_id: int,
            pad_to_multiple_of: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``response_mask`` ``[B, T]`` int64, T the
    longest row rounded up to a multiple of ``pad_to_multiple_of`` (TRL's; None: the longest)."""
    lengths = [len(r["input_ids"]) for r in rows]
    T = padded_length(max(lengths), pad_to_multiple_of)
    # padded Python lists, one tensor per field: per-row tensors cost more than the step's collate
    ids = torch.tensor([list(r["input_ids"]) + [pad_id] * (T - n) for r, n in zip(rows, lengths)], dtype=torch.long)
    resp = torch.tensor([list(r["response_mask"]) + [0] * (T - n) for r, n in zip(rows, lengths)], dtype=torch.long)
    attn = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def completion_nll_sum(model, batch: Dict[str, torch.Tensor], *, packed: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of −log p over completion tokens [0-dim float32], their count [0-dim int64])
    through the fused :func:`sequence_logprobs`."""
    loss, _, n = sft_loss_sum(model, batch, packed=packed)
    return loss, n


def sft_loss_sum(model, batch: Dict[str, torch.Tensor], *, packed: bool = False,
                 loss_type: str = "nll", return_entropy: bool = False, return_top1: bool = False):
    """(loss sum [0-dim float32, differentiable], NLL sum [0-dim float32, detached], trained-token
    count [0-dim int64]) over the tokens marked by ``batch["response_mask"]`` (and attended, not
    position 0), through the fused :func:`sequence_logprobs`, which gives logp [B, T] float32.

    ``loss_type`` "nll": the loss is Σ −logp (then the two sums are equal); "dft" (Dynamic
    Fine-Tuning, TRL's ``loss_type="dft"``): Σ −logp · sg(exp(logp)), each token's NLL weighted
    by its probability, the weight detached so the gradient is p·∇(−logp). The caller divides
    by the global count. ``return_entropy``: a fourth value, the sum over the same tokens of the
    entropy of the distribution that predicted each [0-dim float32, detached] (TRL's
    ``entropy`` metric is that sum over the count), from the same fused pass. ``return_top1``: a
    further value, how many of those tokens are the argmax of the logits that predicted them
    [0-dim int64] (TRL's ``mean_token_accuracy`` is that count over the count; ties go to the first
    maximal index, as torch.argmax), from the same pass too."""
    from rlhf_fast.models.logprobs import sequence_logprobs

    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    # the default call stays the old one
    top1 = {"return_top1": True} if return_top1 else {}
    out = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"],
                            response_mask=batch["response_mask"], packed=packed,
                            return_entropy=return_entropy, **top1)  # [B, T] (each)
    out = list(out) if (return_entropy or return_top1) else [out]
    logp = out.pop(0)
    ent = out.pop(0) if return_entropy else None
    mask = batch["response_mask"].bool() & batch["attention_mask"].bool()
    mask[:, 0] = False  # position 0 has no prediction
    nll = -(logp * mask)  # [B, T], 0 off the mask
    loss = (nll * logp.detach().exp()).sum() if loss_type == "dft" else nll.sum()
    res = (loss, nll.detach().sum(), mask.sum())
    if return_entropy:
        res += ((ent.detach() * mask).sum(),)
    if return_top1:
        res += ((out.pop(0) & mask).sum(),)
    return res


def input_tokens(rows: Sequence[Dict[str, List[int]]], idx: Sequence[int]) -> int:
    """The tokens of the rows ``idx`` of ``rows`` (each ``{"input_ids": [...]}``), padding not
    counted: what TRL's trainers add to ``num_tokens`` (the batch's ``attention_mask.sum()``,
    gathered over ranks) for a global batch ``idx``. Every rank knows the global batch, so the
    count needs no collective."""
    return sum(len(rows[i]["input_ids"]) for i in idx)


def count_tokens(trainer, step_tokens: int) -> Dict[str, int]:
    """Add the global input tokens of the step just trained to ``trainer.num_tokens`` (kept in
    checkpoints: a resumed run continues the count) and record them as ``trainer.step_tokens``,
    which :func:`training_loop` divides by the step's seconds (``train_tokens_per_second``).
    Returns ``{"num_tokens": the cumulative count}``, TRL's metric."""
    trainer.step_tokens = int(step_tokens)
    trainer.num_tokens += trainer.step_tokens
    return {"num_tokens": trainer.num_tokens}


class _Batches:
    """Deterministic, resumable batching: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n == 0:
            raise ValueError("no training examples left after tokenisation and filtering")
        self.n, self.bs, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._make_perm()

    def _make_perm(self):
        g = torch.Generator().manual_seed((self.seed * 1000003 + self.epoch) % 2**63)  # (any seed in [0, 2**63))
        return torch.randperm(self.n, generator=g).tolist()

    def next(self) -> List[int]:
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._make_perm()
        idx = self._perm[self.pos: self.pos + self.bs]
        self.pos += len(idx)
        return idx

    def step(self, micro_batches: int) -> List[List[int]]:
        """The batches (lists of example indices) of one optimizer step: ``micro_batches`` of
        them, fewer when the epoch ends first (transformers' last accumulation step of an epoch
        takes the batches left, ``_run_epoch``'s remainder), so no step crosses an epoch's end
        and each epoch trains every example once: 10 examples in batches of 4, 2 a step, are
        steps of 4 + 4 and 2."""
        idxs = [self.next()]
        while len(idxs) < micro_batches and self.pos < self.n:
            idxs.append(self.next())
        return idxs

    def epochs_done(self, micro_batch: Optional[int] = None) -> float:
        """transformers' ``state.epoch``: the epochs done, the current one by the share of its
        batches taken (8 rows in batches of 4: 0.5 after one batch, 1.0 after two). transformers
        counts micro-batches: ``micro_batch`` is their size where a batch here is several (KTO's
        step batches of batch_size × grad_accum); None: the batch size."""
        b = micro_batch or self.bs
        per_epoch = -(-self.n // b)  # batches an epoch, the last one short
        return self.epoch + -(-self.pos // b) / per_epoch

    def state(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, s: Dict[str, int]) -> None:
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])
        self._perm = self._make_perm()


# ------------------------------------------------------------------ trainer glue (shared with reward, DPO, KTO)


def setup_distributed(dcfg: DistributedConfig, device: str) -> Tuple[DistContext, torch.device]:
    """Join torchrun's process group when there is one; returns (context, this rank's device).

    One process without torchrun's environment gets a one-rank context and ``device`` as
    configured, so strategy "none" behaves exactly as a plain single-process run."""
    if dcfg.strategy == "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("distributed.strategy must be 'ddp' or 'fsdp2' under torchrun "
                         f"(WORLD_SIZE={os.environ['WORLD_SIZE']}), got 'none'")
    ctx = init_distributed(dcfg.backend, dcfg.timeout_s) if dcfg.strategy != "none" else DistContext()
    if ctx.distributed:
        return ctx, ctx.device  # torchrun: the local rank's GPU, or the CPU
    if dcfg.strategy != "none" and "WORLD_SIZE" not in os.environ:
        # not an error (the same config runs on one process, and equals its N-rank run), but a
        # user who forgot torchrun should not believe N devices are training
        print(f"rlhf-fast: distributed.strategy is {dcfg.strategy!r} but this process was not started by torchrun: "
              "training on one process (launch with `torchrun --nproc_per_node N -m rlhf_fast.cli ...` for N)",
              file=sys.stderr, flush=True)
    return ctx, resolve_device(device)


def open_trainer(trainer, cfg) -> None:
    """The start of an SFT / reward / DPO / KTO trainer, before any data or model is loaded:
    ``trainer.cfg``; ``ctx`` and ``device`` (:func:`setup_distributed`); ``run`` and
    ``_resume_from`` (:func:`open_supervised_run`, so a folder holding another run is refused at
    once; the folder of a fresh run is made by :func:`init_optimization`); then every RNG seeded
    with ``cfg.seed``."""
    trainer.cfg = cfg
    trainer.ctx, trainer.device = setup_distributed(cfg.distributed, cfg.device)
    trainer.run, trainer._resume_from = open_supervised_run(cfg, trainer.ctx.is_main)
    # the same seed on every rank: identical initial weights (FSDP2 shards each rank's copy)
    seed_everything(cfg.seed)


def wrap_configured(model, dcfg: DistributedConfig, ctx: DistContext):
    """``model`` wrapped for ``dcfg.strategy`` with ``dcfg``'s mixed precision and resharding
    (:func:`rlhf_fast.distributed.wrap_model`; as it is for strategy none or one process)."""
    return wrap_model(model, dcfg.strategy, ctx, mixed_precision=dcfg.mixed_precision,
                      reshard_after_forward=dcfg.reshard_after_forward)


def init_optimization(trainer) -> None:
    """``trainer.optimizer`` over the trainable parameters of ``trainer.model`` (wrapped by now)
    and its LR ``scheduler``, from ``trainer.cfg`` (whose ``max_steps`` must be final:
    :func:`~rlhf_fast.trainers.common.steps_for_epochs` first); ``step`` 0 and ``num_tokens`` 0
    (TRL's count of the input tokens trained, checkpointed). First, with ``torch_compile``, the
    backbones of ``trainer.model`` and its ``reference`` are compiled (:func:`compile_configured`:
    the last step of every offline trainer's setup, after wrapping and after every copy). Last,
    a fresh run's folder and config.yaml (:func:`begin_fresh_run`): only now that data, model and
    ``max_steps`` are settled, so a run refused before leaves nothing behind."""
    compile_configured(trainer)
    trainer.optimizer = supervised_optimizer([p for p in trainer.model.parameters() if p.requires_grad], trainer.cfg)
    trainer.scheduler = supervised_scheduler(trainer.optimizer, trainer.cfg)
    # fp16's loss scaler (a pass-through without fp16, or off CUDA)
    trainer.scaler = LossScaler(getattr(trainer.cfg, "fp16", False), trainer.device)
    trainer.step = 0
    trainer.num_tokens = 0
    trainer.best = BestCheckpoint.for_config(trainer.cfg)  # load_best_model_at_end's tracker (None: off)
    check_merge_target(getattr(trainer.cfg, "merge", None), trainer.model)
    if trainer._resume_from is None:
        begin_fresh_run(trainer.run, trainer.cfg, trainer.ctx.is_main)


def local_span(n: int, ctx: DistContext) -> Tuple[int, int]:
    """This rank's contiguous block ``[lo, hi)`` of ``n`` items. Near-equal blocks (unlike
    :meth:`DistContext.shard`) so the short last batch of an epoch also splits; a block may
    be empty when ``n`` < world size."""
    return n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size


def local_share(idx: List[int], items: Sequence[Any], ctx: DistContext) -> Tuple[List[Any], bool]:
    """This rank's contiguous share of the global batch ``idx`` of ``items`` and whether it is
    real: an empty share (fewer items than ranks) becomes one item that counts for nothing, so
    every rank still runs the forward/backward the collectives of DDP/FSDP2 expect."""
    lo, hi = local_span(len(idx), ctx)
    return ([items[i] for i in idx[lo:hi]], True) if hi > lo else ([items[idx[0]]], False)


def accumulation_context(model, i: int, n: int):
    """The context of the forward and backward of micro-batch ``i`` of the ``n`` of an optimizer
    step (``n``: the step's own count, fewer than grad_accum at an epoch's end): under DDP and
    FSDP2 no gradient reduction (:func:`~rlhf_fast.distributed.no_gradient_sync`) but for the
    last one, so the gradients are reduced once, after it."""
    return no_gradient_sync(model) if i < n - 1 else contextlib.nullcontext()


def offload_context(trainer):
    """The context of a micro-batch's forward and backward in an SFT / reward / DPO / KTO step:
    with ``cfg.activation_offloading``, TRL's activation offloading of ``trainer.model``
    (:func:`rlhf_fast.models.activation_offload.activation_offloading`, built at the first step
    and kept); else, and on a device it cannot offload from (the CPU: one warning), none."""
    off = getattr(trainer, "_activation_offload", None)
    if off is None:
        from rlhf_fast.models import activation_offload

        off = contextlib.nullcontext()
        if trainer.cfg.activation_offloading and not activation_offload.offloads_on(trainer.device):
            import warnings

            warnings.warn(f"activation_offloading: true does nothing on device {trainer.device.type}: activations "
                          "are offloaded from an accelerator's memory to the CPU's", RuntimeWarning, stacklevel=2)
        elif trainer.cfg.activation_offloading:
            off = activation_offload.activation_offloading(trainer.model)
        trainer._activation_offload = off
    return off


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode (no dropout) for the block, then back in the mode it was in."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def scalar_norm(x) -> float:
    """A gradient norm as a float (FSDP2 returns a DTensor)."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


class NullLogger:
    """Stands in for :class:`MetricsLogger` on ranks other than 0 (they log nothing)."""

    def log(self, step: int, metrics):
        return metrics

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def save_sharded_checkpoint(directory: str, model, optimizer, scheduler, ctx: DistContext,
                            extra: Dict[str, Any]) -> None:
    """A ``torch.distributed.checkpoint`` checkpoint in ``directory`` (every rank writes its
    shard) plus the scheduler state and ``extra`` in ``extra.json``, and ``COMPLETE``, all in a
    temporary folder renamed into place once every rank is done, so :func:`latest_checkpoint`
    never sees a half-written one."""
    extra = {**extra, "scheduler": scheduler.state_dict(), "format": "sharded"}
    save_sharded(directory, model, optimizer, ctx, extra=extra, complete_marker=True)


def is_sharded_checkpoint(directory: str) -> bool:
    """Whether ``directory`` was written by :func:`save_sharded_checkpoint` (DCP metadata)."""
    return os.path.isfile(os.path.join(directory, ".metadata"))


def load_any_checkpoint(directory: str, name: str, model, optimizer, scheduler,
                        ctx: DistContext) -> Dict[str, Any]:
    """Load a sharded checkpoint (written on any number of ranks, loaded into this wrapping)
    or a single-process one (``save_checkpoint`` format, into an unsharded model); returns
    the trainer's ``extra`` state, with the RNG states. The optimizer keeps the settings (lr, ...) it was
    built with."""
    with keeping_hyperparameters([optimizer], [scheduler]):
        if is_sharded_checkpoint(directory):
            extra = load_sharded(directory, model, optimizer, ctx, restore_rng=True)
            if not isinstance(extra, dict) or "scheduler" not in extra:
                checkpoint_step(directory, extra, ("step", "scheduler"))  # names the damage
            with restoring_extra(directory):
                scheduler.load_state_dict(extra.pop("scheduler"))
            return extra
        from rlhf_fast.distributed import unwrap

        # (under FSDP2 each rank takes its shard of the one-process checkpoint's full state)
        return load_checkpoint(directory, models={name: unwrap(model)}, optimizers={"optimizer": optimizer},
                               schedulers={"scheduler": scheduler})


def optimizer_step(trainer) -> float:
    """The end of an SFT / reward / DPO / KTO step once its gradients are in: clip them to
    ``cfg.grad_clip`` (0: no clipping), step the optimizer and LR scheduler (unless it steps on a
    metric: :func:`evaluate_and_step`), clear the gradients
    and count the step. Returns the gradient norm before clipping; ``trainer.step_lr`` is the LR
    the step trained with (read before the scheduler moves it: the ``lr`` the trainers log, as
    transformers 5 logs ``learning_rate``). Under fp16 (``trainer.scaler``)
    the norm is the unscaled gradient's (inf / nan on an overflow), and an overflowed step moves
    neither the weights nor the LR scheduler, as transformers' (it still counts)."""
    clip = trainer.cfg.grad_clip
    gnorm = trainer.scaler.clip_grad_norm_(trainer.optimizer, trainer.model.parameters(),
                                           clip if clip > 0 else float("inf"))
    trainer.step_lr = trainer.optimizer.param_groups[0]["lr"]
    stepped = trainer.scaler.step(trainer.optimizer)
    # reduce_lr_on_plateau / greedy step after evaluations (training_loop)
    if stepped and not steps_on_metric(trainer.scheduler):
        trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.step += 1
    maybe_bema_update(trainer)  # TRL's BEMACallback.on_step_end: its global step already counts this step
    return scalar_norm(gnorm)


def save_supervised(trainer, part: str) -> None:
    """The checkpoint of an SFT / reward / DPO trainer at ``trainer.step`` (its model under the
    name ``part``, optimizer, scheduler, step and data position; BEMA's buffers beside it, written
    first), then the pruning of old ones."""
    bema = getattr(trainer, "_bema", None) is not None
    if bema:  # (and a reference following them) before the checkpoint that needs them
        save_bema(trainer)
    extra = {"step": trainer.step, "data": trainer.batches.state(),
             "num_tokens": trainer.num_tokens}
    window = getattr(trainer, "_log_window", None)
    if window is not None and window.state():  # a stop inside a log window: its steps so far
        extra[LOG_WINDOW_KEY] = window.state()
    if trainer.scaler.enabled:  # fp16's loss scale (transformers' scaler.pt)
        extra["scaler"] = trainer.scaler.state_dict()
    best = getattr(trainer, "best", None)
    if best is not None:  # this step's evaluation judged first, so the checkpoint holds the best so far
        best.at_checkpoint(trainer.step)
        best.part = part
        extra[BEST_KEY] = best.state()
    directory = checkpoint_dir(trainer.run.path, trainer.step)
    if trainer.cfg.distributed.strategy == "none":
        save_checkpoint(directory, models={part: trainer.model}, optimizers={"optimizer": trainer.optimizer},
                        schedulers={"scheduler": trainer.scheduler}, extra=extra)
    else:
        save_sharded_checkpoint(directory, trainer.model, trainer.optimizer, trainer.scheduler, trainer.ctx, extra)
    merge_into(trainer, directory, checkpoint=True)  # TRL's MergeModelCallback.on_save (a product, not state)
    if trainer.ctx.is_main:
        prune_checkpoints(trainer.run.path, trainer.cfg.keep_checkpoints, None if best is None else best.step)
        if bema:
            prune_bema(trainer.run.path)
    trainer.ctx.barrier()


def resume_supervised(trainer, part: str, load_companions=None) -> None:
    """Continue an SFT / reward ``trainer`` from the checkpoint its run folder was opened with
    (``open_supervised_run``; nothing when it starts fresh): weights, optimizer, scheduler,
    step, data order, ``load_companions(checkpoint, step)`` (state kept beside the checkpoint:
    DPO's moving reference) and BEMA's buffers; then the log is cut back to that step
    and config.yaml rewritten, only once all of it has loaded (a refused resume leaves the
    folder as it was)."""
    ck, trainer._resume_from = trainer._resume_from, None
    setup_merge(trainer)  # the merge target defaults to the initial policy: kept before a checkpoint loads
    if ck is None:
        return
    extra = load_any_checkpoint(ck, part, trainer.model, trainer.optimizer, trainer.scheduler, trainer.ctx)
    step = checkpoint_step(ck, extra, ("step", "data"))
    if step > trainer.cfg.max_steps:
        # training on would do nothing, and config.yaml would then record a run shorter than its log
        raise ValueError(f"max_steps ({trainer.cfg.max_steps}) is below step {step}, which the run in "
                         f"{trainer.run.path} has reached; a resumed run can only train further (max_steps >= {step})")
    with restoring_extra(ck):
        trainer.batches.load(extra["data"])
    trainer.scaler.load_state_dict(extra.get("scaler"), f"checkpoint {ck}")
    trainer.step = step
    # (a checkpoint from before num_tokens was logged restarts the count at 0)
    trainer.num_tokens = int(extra.get("num_tokens", 0))
    if getattr(trainer, "best", None) is not None:  # the best so far (none in a checkpoint saved without it)
        with restoring_extra(ck):
            trainer.best.load(extra.get(BEST_KEY), trainer.run.path)
    if load_companions is not None:
        load_companions(ck, step)
    if getattr(trainer, "_bema", None) is not None:
        load_bema(trainer, ck, step)
    # a stop inside a log window logged its steps so far at its step: that record goes, and its
    # steps go back into the window, which the next log averages as the uninterrupted run does
    trainer._resumed_window = extra.get(LOG_WINDOW_KEY) or []
    if trainer.ctx.is_main:
        truncate_metrics(trainer.run.path, trainer.step - 1 if trainer._resumed_window else trainer.step)
        trainer.run.write_config(trainer.cfg)
    trainer.ctx.barrier()


@contextlib.contextmanager
def _exposed_logger(trainer, log):
    """``trainer._logger`` is the run's logger while the loop runs (None before and after, when
    it is closed): what evaluation hooks send tables through (DPO's ``generate_during_eval``)."""
    trainer._logger = log
    try:
        yield
    finally:
        trainer._logger = None


def training_loop(trainer, *, has_eval: bool, eval_at_start: bool = False) -> Dict[str, float]:
    """The step / eval / log / checkpoint loop shared by the SFT and reward trainers, from
    ``trainer.step`` to ``trainer.cfg.max_steps``; then the last checkpoint and the final
    model. ``trainer`` provides cfg, step, ctx, run, model, tokenizer, train_step(),
    evaluate() and _save(). Returns the last step's metrics (with a final evaluation)."""
    cfg = trainer.cfg
    if steps_on_metric(trainer.scheduler) and not has_eval:
        raise ValueError(f"lr_schedule {cfg.lr_schedule!r} steps on {schedule_metric(cfg)[0]} after each "
                         "evaluation, but the eval split is empty: give eval_data or a larger eval_fraction")
    best = getattr(trainer, "best", None)  # load_best_model_at_end's tracker
    if best is not None and not has_eval:
        raise ValueError(f"load_best_model_at_end compares {best.name} of the evaluations, but the eval split is "
                         "empty: give eval_data or a larger eval_fraction")
    last: Dict[str, float] = {}
    # log_every > 1: TRL / transformers average the steps between two logs
    window = trainer._log_window = LogWindow()
    resumed, trainer._resumed_window = getattr(trainer, "_resumed_window", []), []
    window.load(resumed)  # (the steps of a stop's window, from its checkpoint)
    with StopOnSignal() as stop:  # held through the final save: a signal then lets the run end
        with (MetricsLogger.for_config(trainer.run.path, cfg, resume_step=trainer.step,
                                       relogged=bool(resumed))
              if trainer.ctx.is_main else NullLogger()) as log, \
                _exposed_logger(trainer, log):
            if eval_at_start and trainer.step == 0 and has_eval:
                start = trainer.evaluate()
                if steps_on_metric(trainer.scheduler):  # a metric it lacks: refused before any step
                    metric_to_step_on(cfg, start)
                if best is not None:  # likewise (the start's evaluation has no checkpoint: it never competes)
                    best.value(start)
                log.log(0, start)
            saved_step = None  # the step of this session's latest checkpoint
            while trainer.step < cfg.max_steps:
                # a whole step's wall time, not a phase split, so no PhaseClock: train_step returns
                # Python floats read after the optimizer step (their .item() waits for the device),
                # so this already holds the step's GPU work and a synchronising clock changes nothing
                t0 = time.perf_counter()
                m = trainer.train_step()
                step_s = time.perf_counter() - t0  # logged, not returned: callers compare the metrics
                final = trainer.step == cfg.max_steps
                # the final evaluation joins the last step's record (one line per step in the log)
                if (cfg.eval_every and trainer.step % cfg.eval_every == 0) or (final and has_eval):
                    ev = evaluate_and_step(trainer)
                    if best is not None:  # judged when this step's checkpoint is saved (save_supervised)
                        best.observe(trainer.step, ev)
                    m.update(ev)
                # that step's seconds, as RL logs, and its throughput (timings: not returned either)
                window.add({**m, "time/step": step_s, **step_throughput(trainer, step_s)})
                # a stop signal ends the run at this step with a checkpoint (the last step goes on
                # to its final save anyway)
                signum = 0 if final else stop.requested(trainer.ctx)
                scheduled = bool(cfg.save_every and trainer.step % cfg.save_every == 0)
                # the steps since the last log, averaged; a checkpoint's step too, so that a run
                # resumed from it logs what the uninterrupted run logs
                if trainer.step % cfg.log_every == 0 or final or "eval_loss" in m or scheduled:
                    log.log(trainer.step, window.pop())
                elif signum:  # shown now; the checkpoint keeps the window for the resumed run's log
                    log.log(trainer.step, window.peek())
                saves = scheduled or bool(signum)
                if saves:
                    trainer._save()
                    saved_step = trainer.step
                if signum:
                    raise TrainingStopped(signum, trainer.step, trainer.run.path, continue_hint(cfg))
                last = m
            if "eval_loss" not in last and has_eval:  # nothing left to train (a finished run resumed)
                # (a plateau scheduler is not stepped: the run stepped on this evaluation before it ended)
                last.update(trainer.evaluate())
                if not (trainer.ctx.is_main and step_logged(trainer.run.metrics_path, trainer.step)):
                    log.log(trainer.step, last)  # (else that step keeps its one record in the log)
        if saved_step != trainer.step:  # (the last step's scheduled checkpoint is not written twice)
            trainer._save()
        if best is not None:  # transformers' _load_best_model, after the last checkpoint, before final/
            load_best_model(trainer, best.part)
        save_final_model(trainer.model, trainer.tokenizer, os.path.join(trainer.run.path, "final"), trainer.ctx,
                         cfg.distributed.strategy)
        merge_into(trainer, os.path.join(trainer.run.path, "final"), checkpoint=False)  # TRL's on_train_end
    if getattr(trainer, "_bema", None) is not None:  # TRL's BEMACallback.on_train_end
        save_bema_model(trainer)
    return last


def continue_hint(cfg) -> str:
    """How to continue an offline run stopped at a checkpoint (:class:`TrainingStopped`'s
    ``resume``): its command again, which resumes by default; a run started with ``resume``
    false needs it true, since the same command would be refused as a fresh start into a folder
    that holds a run (:func:`~rlhf_fast.trainers.common.check_fresh_run_dir`)."""
    if getattr(cfg, "resume", True):
        return "the same command"
    return "the same command with resume: true (--resume true)"


def evaluate_and_step(trainer) -> Dict[str, float]:
    """``trainer.evaluate()``, then a metric-driven LR scheduler (reduce_lr_on_plateau, greedy)
    stepped on its ``metric_for_best_model`` (``eval_loss`` by default: :func:`schedule_metric`),
    as transformers' ``Trainer._evaluate`` does after each evaluation (but not after the
    evaluation at the start: its ``skip_scheduler``)."""
    metrics = trainer.evaluate()
    if steps_on_metric(trainer.scheduler):
        trainer.scheduler.step(metric_to_step_on(trainer.cfg, metrics))
    return metrics


def step_throughput(trainer, step_s: float) -> Dict[str, float]:
    """``{"train_tokens_per_second": the global input tokens of the step just trained
    (``trainer.step_tokens``, :func:`count_tokens`) / its wall-clock seconds ``step_s``}``; empty
    for a trainer that does not count its tokens. transformers names its throughput so
    (``speed_metrics``), there averaged over the whole session, evaluations and saves included."""
    n = getattr(trainer, "step_tokens", None)
    if n is None or step_s <= 0:
        return {}
    return {"train_tokens_per_second": n / step_s}


def save_final_model(model, tokenizer, folder: str, ctx: DistContext, strategy: str) -> None:
    """``save_pretrained`` of the full model (and tokenizer) to ``folder`` by rank 0, written
    beside it and renamed into place (:func:`~rlhf_fast.trainers.checkpoint.staged_folder`), so a
    failed save leaves no torn model that reads as a finished run; under FSDP2 every rank takes
    part in gathering the full state dict first."""
    from rlhf_fast.distributed import full_state_dict, unwrap

    sd = full_state_dict(model, ctx, strategy)
    if ctx.is_main:
        base = unwrap(model)
        from rlhf_fast.models.loading import peft_save_kwargs

        kw = peft_save_kwargs(base)  # (a peft policy's adapters, not its reference's frozen copy)
        with staged_folder(folder) as tmp:
            if sd is not None:
                base.save_pretrained(tmp, state_dict=sd, **kw)
            else:
                base.save_pretrained(tmp, **kw)
            tokenizer.save_pretrained(tmp)
    ctx.barrier()


class SFTTrainer:
    """Fine-tunes a causal LM on prompt/completion or conversational records (see the module docstring).

    ``model`` / ``tokenizer`` / ``train_records`` / ``eval_records`` override what the
    config would load. ``train()`` returns the final metrics dict.
    """

    def __init__(self, cfg: SFTConfig, *, model=None, tokenizer=None, train_records=None, eval_records=None):
        if not isinstance(cfg, SFTConfig):
            raise TypeError(f"cfg must be an SFTConfig, got {type(cfg).__name__}")
        open_trainer(self, cfg)
        from rlhf_fast.feedback.formats import load_records

        train_records, eval_records = load_split_records(
            cfg, lambda path: load_records(path, "sft", dedup=cfg.dedup), lambda: synthetic_sft_records(seed=cfg.seed),
            train_records, eval_records)
        for name, recs in (("train_records", train_records), ("eval_records", eval_records or [])):
            why = next(filter(None, (not_an_sft_record(f"{name}[{j}]", r) for j, r in enumerate(recs))), None)
            if why:  # (before a tiny tokenizer is trained on their texts)
                raise TypeError(why)
        self.eval_records = list(eval_records or [])
        from rlhf_fast.models.loading import check_chat_template_path

        check_chat_template_path(cfg.chat_template_path)  # before a model is loaded
        model, tokenizer = trainer_model(cfg, model, tokenizer, lambda: [record_text(r) for r in train_records[:2000]])
        added = apply_sft_tokenizer_overrides(cfg, model, tokenizer)
        self.model, self.tokenizer = model.to(self.device), tokenizer
        dcfg = cfg.distributed
        if cfg.lora is not None:  # adapters on every linear layer (or as configured); they alone train
            from rlhf_fast.models.loading import load_policy

            self.model = load_policy(self.model, gradient_checkpointing=cfg.gradient_checkpointing,
                                     lora=lora_with_new_tokens(cfg.lora, added))
        elif cfg.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        if cfg.disable_dropout:  # after LoRA, so its adapters' dropout goes too
            disable_dropout(self.model)
        if "bfd" in (cfg.packs("train"), cfg.packs("eval")):  # refused now, not at the first packed batch
            from .packing import check_packable

            check_packable("eval_packing" if cfg.packs("train") != "bfd" else "packing", self.model)
        self.model = wrap_configured(self.model, dcfg, self.ctx)
        setup_bema(self)  # TRL's BEMACallback (or off)
        self.moe = RouterAux(self.model, cfg.router_aux_loss_coef)  # TRL's MoE load-balancing term (or off)
        self.pad_id = pad_token_id(tokenizer)
        from rlhf_fast.feedback.formats import ChatRecord

        if cfg.assistant_only_loss and not any(isinstance(r, ChatRecord) for r in train_records):
            # (TRL refuses it too: only a conversation has assistant turns to single out)
            raise ValueError("assistant_only_loss: true needs conversational records ({'messages': [...]}) in data; "
                             "prompt/completion records train on the completion already (completion_only_loss)")
        self.train_rows, dropped = sft_rows(train_records, tokenizer, cfg, "train")
        self.eval_rows, _ = sft_rows(self.eval_records, tokenizer, cfg, "eval")
        # bfd packs each micro-batch at the forward; wrapped chunks train as plain rows
        self._packed = {split: cfg.packs(split) == "bfd" for split in ("train", "eval")}
        self.dropped = dropped
        if train_records and not self.train_rows:
            raise ValueError(f"max_len ({cfg.max_len}) leaves no training example: each of the {len(train_records)} "
                             "records has no token left to train within max_len (an empty prompt, a prompt of at "
                             "least max_len tokens, or no assistant turn); raise max_len")
        if self.eval_records and not self.eval_rows:  # (else the run would go on without any evaluation)
            raise ValueError(f"max_len ({cfg.max_len}) leaves no eval example: each of the {len(self.eval_records)} "
                             "eval records has no token left to score within max_len (a prompt of at least max_len "
                             "tokens, or no assistant turn); raise max_len, or give other eval_data")
        steps_for_epochs(cfg, len(self.train_rows))  # before the scheduler, which counts max_steps
        self.batches = _Batches(len(self.train_rows), cfg.batch_size, cfg.seed)
        init_optimization(self)

    def _local_batch(self, idx: List[int], rows) -> Dict[str, torch.Tensor]:
        """This rank's contiguous share of the global batch ``idx`` (:func:`local_share`) on the
        device; a share that does not count has nothing in its response mask."""
        share, real = local_share(idx, rows, self.ctx)
        b = {k: v.to(self.device) for k, v in collate(share, self.pad_id, self.cfg.pad_to_multiple_of).items()}
        if not real:
            b["response_mask"] = torch.zeros_like(b["response_mask"])
        return b

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """``{"eval_loss", "eval_ppl", "eval_tokens", "eval_entropy", "eval_mean_token_accuracy"}``
        over the eval records (empty dict without). eval_loss is the token-mean NLL whatever
        ``loss_type`` (so eval_ppl is a perplexity); eval_entropy the token mean of the predicting
        distributions' entropy; eval_mean_token_accuracy the fraction of tokens that are their
        logits' argmax. An MoE model with the load-balancing term on adds TRL's
        ``eval_aux_loss`` (the mean over the eval batches) and coef × it to eval_loss, as TRL's
        ``compute_loss`` in evaluation (eval_ppl stays the NLL's)."""
        if not self.eval_rows:
            return {}
        tot = torch.zeros(4, dtype=torch.float64, device=self.device)  # (nll sum, tokens, entropy sum, top-1)
        aux_sums = None
        with eval_mode(self.model):
            for i in range(0, len(self.eval_rows), self.cfg.batch_size):
                idx = list(range(i, min(i + self.cfg.batch_size, len(self.eval_rows))))
                batch = self._local_batch(idx, self.eval_rows)
                with autocast_context(self.device, self.cfg.bf16, self.cfg.fp16), \
                        self.moe.collect(evaluation=True) as aux:
                    s, _, c, ent, top1 = sft_loss_sum(self.model, batch, packed=self._packed["eval"],
                                                      return_entropy=True, return_top1=True)
                tot += torch.stack([s.double(), c.double(), ent.double(), top1.double()])
                if self.moe.enabled:  # a share that does not count adds no batch
                    a = self.moe.eval_sums(aux, local_share(idx, self.eval_rows, self.ctx)[1], self.device)
                    aux_sums = a if aux_sums is None else aux_sums + a
            tot = self.ctx.all_reduce_sum(tot).cpu()  # the sums over every rank's share
            if aux_sums is not None:
                aux_sums = self.ctx.all_reduce_sum(aux_sums).cpu()
        tot, n, ent, top1 = float(tot[0]), int(tot[1]), float(tot[2]), float(tot[3])
        loss = tot / max(n, 1)
        m = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": n,
             "eval_entropy": ent / max(n, 1), "eval_mean_token_accuracy": top1 / max(n, 1)}
        self.moe.add_eval_metrics(m, aux_sums)
        return m

    def _save(self) -> None:
        save_supervised(self, "policy")

    def _maybe_resume(self) -> None:
        resume_supervised(self, "policy")

    def train_step(self) -> Dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches (fewer at an epoch's end:
        :meth:`_Batches.step`); returns its metrics."""
        cfg = self.cfg
        self.model.train()
        ctx = self.ctx
        idxs = self.batches.step(cfg.grad_accum)
        micro = [self._local_batch(idx, self.train_rows) for idx in idxs]
        # normalise by the completion tokens of the whole global step (all micro-batches, all
        # ranks), so neither the micro-batch split nor the number of ranks changes the loss
        n_local = sum(int((b["response_mask"][:, 1:].bool() & b["attention_mask"][:, 1:].bool()).sum())
                      for b in micro)
        n_tok = torch.tensor(n_local, dtype=torch.float64, device=self.device)
        n_trained = int(ctx.all_reduce_sum(n_tok))
        n_tok = max(n_trained, 1)  # (a step with nothing to train divides 0 by 1, as TRL's clamp)
        # (loss sum, nll sum, entropy sum, top-1 tokens)
        total = torch.zeros(4, dtype=torch.float64, device=self.device)
        aux_vals = []
        for i, b in enumerate(micro):
            with accumulation_context(self.model, i, len(micro)), offload_context(self), self.moe.collect() as aux:
                with autocast_context(self.device, cfg.bf16, cfg.fp16):
                    s, nll, _, ent, top1 = sft_loss_sum(self.model, b, packed=self._packed["train"],
                                                        loss_type=cfg.loss_type, return_entropy=True,
                                                        return_top1=True)
                # DDP/FSDP2 average gradients over ranks; grad_scale turns that into the sum
                # TRL's MoE term, a micro-batch mean: coef × aux / grad_accum, left to DDP's average
                loss = self.moe.with_term(s / n_tok * ctx.grad_scale, aux, len(micro), aux_vals)
                self.scaler.scale(loss).backward()  # fp16: times the loss scale
            total += torch.stack([s.detach().double(), nll.double(), ent.double(), top1.double()])
        gnorm = optimizer_step(self)
        total = ctx.all_reduce_sum(total)
        m = {"loss": float(total[0]) / n_tok, "grad_norm": gnorm, **self.scaler.metrics(),
             "lr": self.step_lr, "tokens": n_trained, "epoch": self.batches.epochs_done()}
        if cfg.loss_type != "nll":
            m["nll"] = float(total[1]) / n_tok  # comparable with eval_loss and across loss types
        # TRL's entropy: the token mean over the trained tokens (here of the whole step, every rank)
        m["entropy"] = float(total[2]) / n_tok
        # TRL's mean_token_accuracy: the trained tokens that are their logits' argmax, the same mean
        m["mean_token_accuracy"] = float(total[3]) / n_tok
        self.moe.add_metrics(m, aux_vals)  # TRL's aux_loss, and its weighted term in the loss
        m.update(count_tokens(self, sum(input_tokens(self.train_rows, idx) for idx in idxs)))
        return ctx.mean_metrics(m)

    def train(self) -> Dict[str, float]:
        """Train to ``max_steps`` (resuming from the latest checkpoint when ``resume``), save
        the final model and tokenizer to ``output_dir/final``; returns the last metrics."""
        self._maybe_resume()
        return training_loop(self, has_eval=bool(self.eval_rows), eval_at_start=True)


add_arguments, run = trainer_commands("sft", SFTConfig, SFTTrainer)  # what rlhf_fast.cli calls


__all__ = ["SFTConfig", "SFTTrainer", "LOSS_TYPES", "synthetic_sft_records", "tokenize_sft", "record_text", "collate",
           "completion_nll_sum", "sft_loss_sum", "sft_rows", "input_tokens", "count_tokens", "step_throughput",
           "PACKING_STRATEGIES", "split_records",
           "add_arguments", "run"]
