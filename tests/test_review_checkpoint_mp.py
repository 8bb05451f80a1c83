"""Review of checkpoints (atomic writes, rotation, RNG), the best checkpoint and fp16 mixed
precision (ckpt2).

Each defect found is a strict xfail until it is fixed; each test fails on the code as reviewed
and passes once the behaviour it names is right. Tiny models, one thread, a few seconds each."""

import errno
import os

import pytest
import torch

from rlhf_fast.trainers import checkpoint as ckpt
from rlhf_fast.trainers import sft as sft_mod
from rlhf_fast.trainers.common import load_causal_lm
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records
from tests.test_trainer_common import untimed_metrics

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"


@pytest.fixture(scope="module")
def tok():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(64) + [r.prompt + r.completion for r in synthetic_sft_records(64)], 300,
                           padding_side="right")


def _with_dropout(tok):
    # the tiny models have no dropout; a resume is exact without the RNG then, so give it some
    model, _ = load_causal_lm(TINY, tokenizer=tok)
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    return model


def _cfg(out, steps, **kw):
    # a constant LR: the schedule does not depend on max_steps, so a run stopped early and
    # resumed trains with the straight run's LRs
    base = dict(model=TINY, output_dir=str(out), max_steps=steps, batch_size=4, lr=1e-2, warmup_steps=0,
                lr_schedule="constant", save_every=2, keep_checkpoints=0, log_every=1, max_len=48, device="cpu",
                seed=3)
    base.update(kw)
    return SFTConfig(**base)


def _train(cfg, tok):
    SFTTrainer(cfg, train_records=synthetic_sft_records(24), tokenizer=tok, model=_with_dropout(tok)).train()


@pytest.mark.parametrize("strategy", ["none", "ddp"])
def test_resume_with_dropout_equals_the_straight_run(tmp_path, tok, strategy):
    """A run with dropout stopped at step 2 and resumed to 4 logs what the straight 4-step run
    logs: the checkpoint restores the torch RNG the dropout masks come from. The sharded format
    (strategy ddp, one process here) wrote no RNG state at all (transformers saves
    ``rng_state_{rank}.pth`` per process), so step 3 differed: loss 5.5151 resumed vs 5.5366."""
    dist = {"distributed": {"strategy": strategy}}
    _train(_cfg(tmp_path / "straight", 4, **dist), tok)
    _train(_cfg(tmp_path / "resumed", 2, **dist), tok)
    _train(_cfg(tmp_path / "resumed", 4, **dist), tok)
    straight, resumed = untimed_metrics(tmp_path / "straight"), untimed_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed == straight


def test_the_last_step_is_checkpointed_once(tmp_path, tok, monkeypatch):
    """max_steps a multiple of save_every: the last step's checkpoint is written once (as
    transformers' Trainer and this project's RL trainer do), not written and then rewritten
    whole by the end-of-training save (a second full model + optimizer write)."""
    saved = []
    real = sft_mod.save_checkpoint

    def counting(directory, **kw):
        saved.append(os.path.basename(directory))
        return real(directory, **kw)

    monkeypatch.setattr(sft_mod, "save_checkpoint", counting)
    _train(_cfg(tmp_path / "run", 4), tok)
    assert saved == ["step_00000002", "step_00000004"]
    # not a multiple: the scheduled ones, then the last step's
    saved.clear()
    _train(_cfg(tmp_path / "run5", 5), tok)
    assert saved == ["step_00000002", "step_00000004", "step_00000005"]


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    """A save that fails midway (a full disk while writing the optimizer), over the same step or
    a new one, leaves the previous checkpoint loadable and the one latest_checkpoint finds, with
    no temporary folder left; steps compare as numbers (step 10 after step 9, and past 8 digits)."""
    model = torch.nn.Linear(3, 2)
    ckpt.save_checkpoint(ckpt.checkpoint_dir(tmp_path, 9), models={"m": model}, extra={"step": 9})

    class Full:
        def state_dict(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    for step in (9, 10):
        with pytest.raises(OSError, match="No space left"):
            ckpt.save_checkpoint(ckpt.checkpoint_dir(tmp_path, step), models={"m": model}, optimizers={"o": Full()},
                                 extra={"step": step})
    assert os.listdir(tmp_path / "checkpoints") == ["step_00000009"]
    assert ckpt.latest_checkpoint(str(tmp_path)) == ckpt.checkpoint_dir(tmp_path, 9)
    assert ckpt.load_checkpoint(ckpt.checkpoint_dir(tmp_path, 9), models={"m": model}) == {"step": 9}
    for step in (10, 10**8):
        ckpt.save_checkpoint(ckpt.checkpoint_dir(tmp_path, step), models={"m": model}, extra={"step": step})
        assert ckpt.latest_checkpoint(str(tmp_path)) == ckpt.checkpoint_dir(tmp_path, step)


def test_load_sharded_restores_the_rng_states_on_request(tmp_path):
    """save_sharded keeps this rank's RNG states; load_sharded brings them back for a resume
    (restore_rng, what the SFT-family and RL resumes pass) and leaves them alone otherwise (the
    best model's or a companion's load at the end of training)."""
    import random

    import numpy as np

    from rlhf_fast.distributed import DistContext, load_sharded, save_sharded

    ctx, model, path = DistContext(), torch.nn.Linear(3, 2), str(tmp_path / "step_00000001")
    torch.manual_seed(11)
    save_sharded(path, model, None, ctx, extra={"step": 1})
    want = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(5)
    load_sharded(path, model, None, ctx)  # no restore: the generators go on from where they are
    assert not torch.equal(torch.rand(3), want[0])
    torch.manual_seed(5)
    load_sharded(path, model, None, ctx, restore_rng=True)
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def test_rl_sharded_resume_restores_the_rng_states(tmp_path, monkeypatch):
    """An RL run with the sharded format (strategy ddp, one process) resumed: the torch RNG is
    the one the checkpoint was saved with (it was left at the resumed trainer's seeding)."""
    import rlhf_fast.distributed as dist_mod
    from rlhf_fast.distributed import DistributedConfig
    from rlhf_fast.trainers.rl import RLTrainer
    from tests.test_rl_learning import PROMPTS, frac_a, make_config, make_policy

    at_save = []
    real = dist_mod.save_sharded

    def spying(path, *a, **kw):
        at_save.append(torch.get_rng_state())
        return real(path, *a, **kw)

    def drawing(prompts, completions):  # frac_a, drawing from the torch RNG as a stochastic reward would
        torch.rand(1)
        return frac_a(prompts, completions)

    monkeypatch.setattr(dist_mod, "save_sharded", spying)
    cfg = make_config(tmp_path, "grpo", steps=2, save_every=2, distributed=DistributedConfig(strategy="ddp"))
    pol, tk = make_policy()
    RLTrainer(cfg, pol, tk, reward_fns=[drawing], prompts=PROMPTS).train()
    assert at_save
    pol, tk = make_policy()
    again = RLTrainer(cfg, pol, tk, reward_fns=[drawing], prompts=PROMPTS)
    assert not torch.equal(torch.get_rng_state(), at_save[0])  # (the new trainer seeded its own)
    assert again.load(cfg.output_dir) == 2
    assert torch.equal(torch.get_rng_state(), at_save[0])
