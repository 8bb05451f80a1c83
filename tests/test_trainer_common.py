"""The schedule and dropout helpers every supervised trainer shares (trainers/common.py)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch
import transformers

from rlhf_fast.trainers.common import check_training_schedule, disable_dropout, steps_for_epochs
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
