"""Pieces every trainer shares: seeding, LR schedule, metrics log, run folder."""

from __future__ import annotations

import json
import math
import os
import random
from typing import Any, Dict, List, Mapping, Optional

import torch

from .config import save_config, to_dict


def check_seed(name: str, seed) -> None:
    """ValueError unless ``seed`` is an int in [0, 2**63): torch's generators and the
    samplers' Philox keys take a 64-bit seed, and a larger one fails deep inside them."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {seed!r}")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) with ``seed``."""
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    check_seed("seed", seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, kind: str = "cosine", min_ratio: float = 0.0) -> float:
    """LR multiplier at ``step``: linear warm-up from 0 to 1 over ``warmup_steps``, then
    ``constant``, ``linear`` decay or ``cosine`` decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "linear":
        decay = 1.0 - progress
    elif kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"kind must be 'constant', 'linear' or 'cosine', got {kind!r}")
    return min_ratio + (1.0 - min_ratio) * decay


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int = 0,
    total_steps: int,
    kind: str = "cosine",
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR with linear warm-up then ``kind`` in ("constant", "linear", "cosine") decay.

    Call ``scheduler.step()`` once per optimizer step.
    """
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"kind must be 'constant', 'linear' or 'cosine', got {kind!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")

    def fn(step: int) -> float:
        return lr_lambda(step, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def supervised_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule of an SFT / reward / DPO / KTO config: ``warmup_steps``, then
    ``lr_schedule`` decay over ``max_steps`` down to ``min_lr_ratio`` × lr (TRL's
    ``cosine_with_min_lr`` with ``lr_scheduler_kwargs={"min_lr_rate": ...}``; 0: to zero)."""
    return make_scheduler(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps, kind=cfg.lr_schedule,
                          min_ratio=cfg.min_lr_ratio)


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().float().item() if v.numel() == 1 else v.detach().cpu().tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the line parseable by strict readers
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return _jsonable(v.item())
    return v


class MetricsLogger:
    """Appends one JSON object per step to ``run_dir/metrics.jsonl`` (flushed every line),
    and mirrors scalars to TensorBoard when ``tensorboard`` is importable."""

    def __init__(self, run_dir: str, *, tensorboard: bool = True, append: bool = True):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._f = open(self.path, "a" if append else "w", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tb"))
            except Exception:  # tensorboard not installed: the JSONL log is enough
                self._tb = None

    def log(self, step: int, metrics: Mapping[str, Any]) -> Dict[str, Any]:
        """Write ``{"step": step, **metrics}`` as one line; tensors become floats. Returns the record."""
        rec = {"step": int(step)}
        rec.update({str(k): _jsonable(v) for k, v in metrics.items()})
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))
        return rec

    def close(self) -> None:
        """Flush and close the log files."""
        if not self._f.closed:
            self._f.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(run_dir: str) -> list:
    """The records of ``run_dir/metrics.jsonl`` as a list of dicts."""
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(run_dir: str, step: int) -> None:
    """Drop records after ``step`` from ``run_dir/metrics.jsonl`` (on resume from a
    checkpoint at ``step``, so the log continues as if the run had never stopped)."""
    from .config import atomic_write_text

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    atomic_write_text(path, "".join(log_records_up_to(path, step)))


def log_records_up_to(path: str, step: int) -> list:
    """The lines of the JSONL log ``path`` whose record has ``step`` <= ``step``. A torn last
    line (the process died mid-write, after the checkpoint it resumes from) is dropped; a bad
    line elsewhere is a ValueError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{i + 1}: invalid JSON in the run's log") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object in the run's log")
        if rec.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    return keep


class RunDir:
    """A run's output folder: creates it and writes the resolved config as ``config.yaml``.

    Attributes: ``path``, ``checkpoints`` (its checkpoints folder), ``metrics_path``.
    """

    def __init__(self, path: str, config: Optional[Any] = None):
        if not isinstance(path, str) or not path:
            raise ValueError(f"run_dir must be a non-empty path, got {path!r}")
        self.path = os.path.abspath(path)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"output_dir {path}: expected a folder, found a file")
        os.makedirs(self.path, exist_ok=True)
        self.checkpoints = os.path.join(self.path, "checkpoints")
        self.metrics_path = os.path.join(self.path, "metrics.jsonl")
        if config is not None:
            self.write_config(config)

    def write_config(self, config: Any) -> str:
        """Write ``config`` (a dataclass) as ``config.yaml`` in the run folder; returns the path."""
        p = os.path.join(self.path, "config.yaml")
        save_config(config, p)
        return p

    def file(self, *parts: str) -> str:
        """A path inside the run folder (parents created)."""
        p = os.path.join(self.path, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def write_json(self, name: str, obj: Any) -> str:
        """Write ``obj`` as pretty JSON to ``name`` inside the run folder; returns the path."""
        from .config import atomic_write_text

        p = self.file(name)
        atomic_write_text(p, json.dumps(obj, indent=2, default=_jsonable))
        return p

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


def run_contents(path: str, *, include_log: bool = True) -> list:
    """What of a finished or interrupted run the folder ``path`` already holds: ``"checkpoints"``
    (complete ones), ``"final"`` (a saved model) and, with ``include_log``, a non-empty
    ``"metrics.jsonl"``. Empty when ``path`` does not exist."""
    from .checkpoint import latest_checkpoint

    held = []
    if not os.path.isdir(path):
        return held
    if latest_checkpoint(path) is not None:
        held.append("checkpoints")
    if os.path.exists(os.path.join(path, "final")):
        held.append("final")
    log = os.path.join(path, "metrics.jsonl")
    if include_log and os.path.isfile(log) and os.path.getsize(log) > 0:
        held.append("metrics.jsonl")
    return held


def check_fresh_run_dir(path: str, *, option: str = "output_dir", resume_hint: Optional[str] = "resume: true",
                        include_log: bool = True) -> None:
    """Refuse to start a new run in a folder that already holds one: its checkpoints, final
    model and metrics log would be mixed with (and partly overwritten by) the new run's.
    Raises ValueError naming ``option``, the folder, what it holds and how to continue it
    (``resume_hint``; None when it cannot be continued)."""
    held = run_contents(path, include_log=include_log)
    if held:
        how = f"continue it ({resume_hint}), or " if resume_hint else "it has no checkpoint to continue from: "
        raise ValueError(f"{option} {path} already holds a run ({', '.join(held)}): {how}"
                         f"choose another {option}, or remove that folder first")


def open_supervised_run(cfg, is_main: bool):
    """The run folder of an SFT / reward trainer and the checkpoint it will resume from (None
    for a fresh start). ``cfg.resume`` continues the latest complete checkpoint of
    ``cfg.output_dir``; a fresh start into a folder holding another run is refused
    (``check_fresh_run_dir``), except that with ``resume`` the log of a run interrupted before its
    first checkpoint is dropped and the run starts again. config.yaml is written now for a fresh
    start; a resumed run writes it once its checkpoint has loaded (``write_config``), so a failed
    resume leaves the folder as it was."""
    from .checkpoint import latest_checkpoint

    path = os.path.abspath(cfg.output_dir) if isinstance(cfg.output_dir, str) and cfg.output_dir else cfg.output_dir
    ck = latest_checkpoint(path) if cfg.resume and isinstance(path, str) else None
    if ck is None and isinstance(path, str):
        check_fresh_run_dir(path, include_log=not cfg.resume, resume_hint=None if cfg.resume else "resume: true")
    run = RunDir(cfg.output_dir)
    if ck is None and is_main:
        if os.path.exists(run.metrics_path):
            os.remove(run.metrics_path)
        run.write_config(cfg)
    return run, ck


def require_records(records: list, key: str, path: str) -> list:
    """``records`` loaded from the file ``path`` of the config key ``key``; ValueError if there
    are none (an empty file would otherwise fail later as 'no training examples left')."""
    if not records:
        raise ValueError(f"{key} {path} holds no records (the file is empty)")
    return records


def check_lora_field(cfg, name: str = "lora") -> None:
    """``cfg.lora``: None, or a mapping of peft LoraConfig fields ({} for r=8, alpha=16, every
    linear layer), whose values given as command-line text (``--lora.r 16``) are read as YAML;
    ValueError naming the field (``name``) otherwise."""
    if cfg.lora is None:
        return
    if not isinstance(cfg.lora, dict):
        raise ValueError(f"{name} must be null or a mapping of LoraConfig fields, got {cfg.lora!r}")
    import yaml

    # `--lora.r 16` arrives as text: read each value as YAML (16, 0.05, [q_proj, v_proj])
    cfg.lora = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in cfg.lora.items()}


def check_training_schedule(cfg) -> None:
    """The checks every supervised trainer config (SFT, reward) shares: ``distributed`` given as
    a dict becomes a ``DistributedConfig``; sizes and counts, eval_fraction, lr, grad_clip,
    lr_schedule and gradient_checkpointing in range. Raises TypeError / ValueError naming the field."""
    from rlhf_fast.distributed import DistributedConfig

    if isinstance(cfg.distributed, dict):
        cfg.distributed = DistributedConfig(**cfg.distributed)
    if not isinstance(cfg.distributed, DistributedConfig):
        raise TypeError(f"distributed must be a DistributedConfig, got {type(cfg.distributed).__name__}")
    for name in ("max_len", "batch_size", "grad_accum", "max_steps", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    for name, low in (("lr", "> 0"), ("grad_clip", ">= 0 (0 disables)"), ("weight_decay", ">= 0")):
        v = getattr(cfg, name)
        # nan passes every comparison: refused with inf, as neither trains anything
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                or (name == "lr" and v == 0):
            raise ValueError(f"{name} must be a finite number {low}, got {v!r}")
    check_seed("seed", cfg.seed)
    if cfg.lr_schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant', 'linear' or 'cosine', got {cfg.lr_schedule!r}")
    r = cfg.min_lr_ratio
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
        raise ValueError(f"min_lr_ratio must be a number in [0, 1] (the final LR over lr), got {r!r}")
    if not isinstance(cfg.gradient_checkpointing, bool):
        raise ValueError(f"gradient_checkpointing must be true or false, got {cfg.gradient_checkpointing!r}")
    if not isinstance(getattr(cfg, "disable_dropout", False), bool):
        raise ValueError(f"disable_dropout must be true or false, got {cfg.disable_dropout!r}")
    epochs = getattr(cfg, "num_train_epochs", None)
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float))
                               or not math.isfinite(epochs) or epochs <= 0):
        raise ValueError(f"num_train_epochs must be null or a finite number > 0, got {epochs!r}")


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when ``bf16``; a no-op context elsewhere (CPU trains in fp32)."""
    import contextlib

    if bf16 and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; otherwise ``torch.device(device)``, which
    must exist on this machine (ValueError naming it otherwise)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(expected) from None
    if dev.type not in ("cpu", "cuda"):  # mps, meta, xpu...: the kernels and trainers run on CPU or CUDA only
        raise ValueError(expected)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device {device!r} was asked for, but this machine has no CUDA device "
                             "(use 'cpu' or 'auto')")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {device!r} was asked for, but this machine has {n} CUDA device(s)")
    return dev


__all__ = ["check_seed", "seed_everything", "lr_lambda", "make_scheduler", "MetricsLogger", "read_metrics", "RunDir",
           "load_causal_lm", "parse_tiny_spec", "truncate_metrics",
           "autocast_context", "resolve_device", "to_dict"]


def parse_tiny_spec(spec: str) -> Dict[str, Any]:
    """``"tiny:llama:hidden_size=64,num_layers=2,vocab_size=300"`` -> keyword arguments
    (``family`` plus ints for sizes). ``"tiny:"`` alone means a default tiny llama."""
    if not spec.startswith("tiny:"):
        raise ValueError(f"model spec must start with 'tiny:', got {spec!r}")
    parts = spec[len("tiny:"):].split(":", 1)
    out: Dict[str, Any] = {"family": parts[0] or "llama"}
    if len(parts) > 1 and parts[1]:
        for kv in parts[1].split(","):
            if "=" not in kv:
                raise ValueError(f"model spec {spec!r}: expected key=value after the family, got {kv!r}")
            k, v = kv.split("=", 1)
            try:
                out[k.strip()] = int(v)
            except ValueError:
                raise ValueError(f"model spec {spec!r}: {k} must be an int, got {v!r}") from None
    return out


def load_causal_lm(spec: str, *, texts: Optional[list] = None, kind: str = "causal", tokenizer: Any = None):
    """``(model, tokenizer)`` from a local folder (save_pretrained output) or a ``tiny:`` spec.

    ``kind`` "causal" (AutoModelForCausalLM) or "reward" (AutoModelForSequenceClassification,
    one label). For ``tiny:`` specs a byte-level BPE tokenizer is trained on ``texts``
    (plus a small built-in corpus) unless ``tokenizer`` is given; spec keys: family,
    vocab_size (default 512), hidden_size, num_layers, num_heads, seed. Nothing is downloaded.
    """
    if kind not in ("causal", "reward"):
        raise ValueError(f"kind must be 'causal' or 'reward', got {kind!r}")
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model must be a local path or a 'tiny:' spec, got {spec!r}")
    if spec.startswith("tiny:"):
        from rlhf_fast.models.tiny import sample_texts, tiny_causal_lm, tiny_reward_model, train_tokenizer

        kw = parse_tiny_spec(spec)
        vocab = kw.pop("vocab_size", 512)
        allowed = {"family", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                   "max_position_embeddings", "seed"}
        bad = sorted(set(kw) - allowed)
        if bad:
            raise ValueError(f"model spec {spec!r}: unknown keys {bad} (valid: {sorted(allowed | {'vocab_size'})})")
        build = tiny_causal_lm if kind == "causal" else tiny_reward_model
        try:
            if tokenizer is None:
                corpus = list(texts or []) + sample_texts(64)
                # right padding: trainers build [prompt | completion | pad] rows
                tokenizer = train_tokenizer(corpus, vocab, padding_side="right")
            model = build(len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.bos_token_id, **kw)
        except ValueError as e:
            # the message alone ("num_layers must be ...") would not say which setting holds it
            raise ValueError(f"model spec {spec!r}: {e}") from None
        return model, tokenizer
    if not os.path.isdir(spec):
        raise ValueError(f"model must be a local folder or a 'tiny:' spec; {spec!r} is neither (nothing is downloaded)")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_fast.models.loading import _dtype_kwargs, check_model_folder

    check_model_folder(spec, "model", tokenizer=tokenizer is None)
    # float32 master weights whatever dtype the folder was saved in (transformers 5 loads the
    # saved dtype by default: a bf16 save would train in pure bf16); autocast does the rest
    fp32 = _dtype_kwargs(None)
    tok = tokenizer or AutoTokenizer.from_pretrained(spec)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if kind == "causal":
        model = AutoModelForCausalLM.from_pretrained(spec, **fp32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(spec, num_labels=1, **fp32)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    return model, tok


def add_config_arguments(parser, config_cls=None) -> None:
    """CLI arguments shared by the trainer commands: CONFIG.yaml ('none' for the defaults)
    then ``--key value`` overrides (``--a.b value`` for nested keys); ``--help`` lists the
    keys of ``config_cls`` with their defaults."""
    import argparse

    from .config import config_keys_help

    parser.add_argument("config", help="YAML config file ('none': defaults)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="--key value overrides (--a.b for nested keys); --print-config")
    if config_cls is not None:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = config_keys_help(config_cls)


def quiet_hf_progress() -> None:
    """No transformers progress bars ("Writing model shards" at every save) in a CLI run: its
    own log lines say what happens (a process-wide setting, so for the commands only)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run_trainer_cli(name: str, config_cls, trainer_cls, args) -> int:
    """Load ``config_cls`` from ``args`` (see :func:`add_config_arguments`), train with
    ``trainer_cls`` and print one summary line (rank 0 only under torchrun). With
    ``--print-config``: print the resolved config as YAML instead, and train nothing."""
    from .config import config_yaml, load_config, take_print_config

    path = None if args.config in ("none", "-") else args.config
    overrides, show = take_print_config(args.overrides)
    cfg = load_config(config_cls, path, overrides)
    if show:
        print(config_yaml(cfg), end="")
        return 0
    quiet_hf_progress()
    trainer = trainer_cls(cfg)
    m = trainer.train()
    if trainer.ctx.is_main:
        print(f"{name}: {trainer.step} steps, " + ", ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float))
              + f"; model saved to {os.path.join(trainer.run.path, 'final')}")
    return 0


def decay_param_groups(params, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW parameter groups over ``params``: weight decay on the matrices (linear and
    embedding weights, LoRA A/B), none on biases and norm gains (parameters of fewer than two
    dimensions), as TRL (transformers' Trainer, ``get_decay_parameter_names``) and OpenRLHF
    (``get_optimizer_grouped_parameters``) do: decaying an RMSNorm / LayerNorm gain pulls it
    towards 0, not towards its identity value 1. With ``weight_decay`` 0 there is one group
    (the layout of earlier checkpoints, which therefore still resume)."""
    params = list(params)
    if weight_decay == 0:
        return [{"params": params, "weight_decay": 0.0}]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def make_adamw(params: List[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over each parameter for the whole update; on a
    small model's CPU step 0.2 ms instead of 0.6) where every parameter is a plain CPU / CUDA
    float tensor; else the multi-tensor (foreach) one, e.g. for FSDP2's DTensor parameters."""
    from torch.distributed.tensor import DTensor

    fused = bool(params) and all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda")
                                 and p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
                                 for p in params)
    # weight decay on the matrices only (decay_param_groups: not on biases and norm gains)
    return torch.optim.AdamW(decay_param_groups(params, weight_decay), lr=lr,
                             **({"fused": True} if fused else {"foreach": True}))


def steps_for_epochs(cfg, n_examples: int, *, batch: Optional[int] = None, batches_per_step: Optional[int] = None
                     ) -> None:
    """When ``cfg.num_train_epochs`` is set, replace ``cfg.max_steps`` by the optimizer steps that
    pass over ``n_examples`` training examples that many times (TRL / transformers'
    ``num_train_epochs``; like theirs, a fractional count is allowed). An epoch is
    ceil(n_examples / batch) batches, its last one short when ``batch`` does not divide the
    examples (as the trainers' batchers cut it), and a step takes ``batches_per_step`` of them:
    max(1, ceil(epochs × ceil(n_examples / batch) / batches_per_step)). ``batch`` defaults to
    ``cfg.batch_size`` and ``batches_per_step`` to ``cfg.grad_accum`` (micro-batches); a trainer
    that batches whole steps passes batch = batch_size × grad_accum and batches_per_step = 1.
    Call it once the training examples are known and before the LR scheduler is built; a
    resumed run recomputes the same count."""
    epochs = getattr(cfg, "num_train_epochs", None)
    if epochs is None:
        return
    if n_examples < 1:
        raise ValueError("num_train_epochs needs training examples, and there are none")
    batch = cfg.batch_size if batch is None else batch
    per_step = cfg.grad_accum if batches_per_step is None else batches_per_step
    per_epoch = -(-n_examples // batch)
    # the small slack keeps 0.3 × 10 batches at 3 steps, not 4, against float rounding
    cfg.max_steps = max(1, math.ceil(epochs * per_epoch / per_step - 1e-9))


def disable_dropout(model: torch.nn.Module) -> int:
    """Turn off dropout in ``model`` for training (TRL's ``disable_dropout``, on by default for its
    DPO / KTO / reward trainers): p = 0 in every ``torch.nn.Dropout`` module, and a float
    ``attention_dropout`` of 0 on the model config and on every module that keeps one (transformers'
    attention modules apply it through sdpa, not through a Dropout module, so setting p alone
    would leave it on). Returns the number of settings changed (0: the model had no dropout)."""
    changed = 0
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p != 0:
            m.p = 0.0
            changed += 1
        if isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout != 0:
            m.attention_dropout = 0.0
            changed += 1
        cfg = getattr(m, "config", None)
        if isinstance(getattr(cfg, "attention_dropout", None), float) and cfg.attention_dropout != 0:
            cfg.attention_dropout = 0.0
            changed += 1
    return changed
