"""The schedule and dropout helpers every supervised trainer shares (trainers/common.py)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch
import transformers

from rlhf_fast.trainers.common import (check_training_schedule, disable_dropout, read_metrics, steps_for_epochs,
                                      supervised_scheduler)
from rlhf_fast.distributed import DistributedConfig


@dataclasses.dataclass
class _Cfg:
    max_len: int = 16
    batch_size: int = 4
    grad_accum: int = 2
    max_steps: int = 200
    log_every: int = 1
    warmup_steps: int = 0
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 1
    eval_fraction: float = 0.0
    lr: float = 1e-3
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    gradient_checkpointing: bool = False
    num_train_epochs: Optional[float] = None
    disable_dropout: bool = True
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


@pytest.mark.parametrize("epochs,n,expected", [
    (None, 100, 200),   # max_steps decides
    (1, 100, 13),       # ceil(100 / 8)
    (1, 96, 12),        # exact: no extra step
    (3, 96, 36),
    (0.5, 100, 7),      # ceil(6.25)
    (0.01, 100, 1),     # at least one step
    (3, 5, 3),          # 2 batches an epoch (the last one of 1 row), 2 micro-batches a step
])
def test_steps_for_epochs(epochs, n, expected):
    cfg = _Cfg(num_train_epochs=epochs)
    check_training_schedule(cfg)
    steps_for_epochs(cfg, n)
    assert cfg.max_steps == expected


def test_steps_for_epochs_of_whole_step_batches():
    cfg = _Cfg(num_train_epochs=2, batch_size=4, grad_accum=2)
    steps_for_epochs(cfg, 10, batch=8, batches_per_step=1)  # 2 step batches an epoch (8 and 2 rows)
    assert cfg.max_steps == 4


def test_steps_for_epochs_without_examples_is_an_error():
    with pytest.raises(ValueError, match="num_train_epochs"):
        steps_for_epochs(_Cfg(num_train_epochs=1), 0)


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), True, "2"])
def test_num_train_epochs_is_checked(bad):
    with pytest.raises(ValueError, match="num_train_epochs"):
        check_training_schedule(_Cfg(num_train_epochs=bad))


def test_disable_dropout_is_checked():
    with pytest.raises(ValueError, match="disable_dropout"):
        check_training_schedule(_Cfg(disable_dropout="yes"))


def _dropout_llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=64, attention_dropout=0.5)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.model.drop = torch.nn.Dropout(0.3)  # a Dropout module (unused by Llama; GPT-2-style models have one)
    return model.train()


def test_disable_dropout_makes_training_forwards_deterministic():
    model = _dropout_llama()
    ids = torch.randint(0, 64, (2, 12))
    # transformers applies attention_dropout through sdpa's dropout_p: the two forwards differ
    assert not torch.equal(model(ids).logits, model(ids).logits)
    assert disable_dropout(model) == 4  # the config, two attention modules, the Dropout module
    assert model.config.attention_dropout == 0.0 and model.model.drop.p == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert disable_dropout(model) == 0


def _lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_min_lr_ratio_is_transformers_cosine_with_min_lr():
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    cfg = _Cfg(max_steps=20, warmup_steps=0, min_lr_ratio=0.1)
    check_training_schedule(cfg)
    ours = supervised_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0), cfg)
    theirs = get_cosine_with_min_lr_schedule_with_warmup(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0), 0, 20, min_lr_rate=0.1)
    a, b = _lrs(ours, 21), _lrs(theirs, 21)
    assert a == pytest.approx(b, rel=1e-12, abs=1e-12)
    assert a[-1] == pytest.approx(0.2)


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "0.1"])
def test_min_lr_ratio_is_checked(bad):
    with pytest.raises(ValueError, match="min_lr_ratio"):
        check_training_schedule(_Cfg(min_lr_ratio=bad))


@pytest.mark.parametrize("module,cls", [("sft", "SFTConfig"), ("reward", "RewardConfig"), ("dpo", "DPOConfig"),
                                        ("kto", "KTOConfig")])
def test_every_offline_config_takes_min_lr_ratio(module, cls):
    import importlib

    from rlhf_fast.trainers.config import load_config

    config_cls = getattr(importlib.import_module(f"rlhf_fast.trainers.{module}"), cls)
    assert load_config(config_cls, None, ["--min_lr_ratio", "0.1"]).min_lr_ratio == 0.1
    with pytest.raises(ValueError, match="min_lr_ratio"):
        load_config(config_cls, None, ["--min_lr_ratio", "2"])


def test_rl_optim_min_lr_ratio(tmp_path):
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import OptimConfig
    from tests.test_rl_learning import PROMPTS, make_config, make_policy

    cfg = make_config(tmp_path, "gae", steps=2, optim=OptimConfig(lr=1e-3, critic_lr=1e-2, schedule="cosine",
                                                                   min_lr_ratio=0.25))
    tr = RLTrainer(cfg, *make_policy(), reward_fns=[lambda p, c: [0.0] * len(c)], prompts=PROMPTS)
    total = 2 * cfg.ppo.epochs * (cfg.batch_size // cfg.ppo.mini_batch_size)
    for sched in (tr.scheduler, tr.critic_scheduler):
        assert sched.lr_lambdas[0](0) == 1.0 and sched.lr_lambdas[0](total) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="optim.min_lr_ratio"):
        OptimConfig(min_lr_ratio=-1)


TIMED_METRICS = ("time/step", "train_tokens_per_second")


def assert_resumes_exactly(trainer, full, stop_at: int):
    """``trainer("resumed")`` (an offline trainer of ``trainer(name)``'s runs) stopped after
    ``stop_at`` steps and saved, then resumed by a fresh ``trainer("resumed")``: it ends with the
    uninterrupted run ``full``'s weights and logs what ``full`` logged after step ``stop_at``
    (steps 1..stop_at ran outside train(), unlogged). Returns the resumed trainer."""
    part = trainer("resumed")
    while part.step < stop_at:
        part.train_step()
    part._save()
    resumed = trainer("resumed")
    resumed.train()
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    assert untimed_metrics(resumed.cfg.output_dir) == untimed_metrics(full.cfg.output_dir)[stop_at:]
    return resumed


def untimed_metrics(run_dir: str) -> list:
    """metrics.jsonl of ``run_dir`` without the timings (``TIMED_METRICS``: the wall-clock seconds
    of a step and the throughput made of them), which differ between two runs of the same steps
    (for tests that compare runs record by record)."""
    return [{k: v for k, v in r.items() if k not in TIMED_METRICS} for r in read_metrics(run_dir)]
