"""transformers' ``load_best_model_at_end`` in the offline trainers (rlhf_fast/trainers/best_checkpoint.py):

- the best step is the one transformers' rule picks (``Trainer._determine_best_metric``'s strict
  ``np.less`` / ``np.greater`` against the best so far, transcribed below) among the evaluations
  made at checkpoints; final/ (and the model in memory) holds that checkpoint's weights, not the
  last step's; ``best_checkpoint.json`` and each checkpoint's extra.json record it; SFT on
  ``eval_loss`` (a high LR: the loss falls, then rises), the reward trainer on ``eval_accuracy``
  and DPO on ``eval_rewards/accuracy`` (greater is better; ties keep the first), and
  ``greater_is_better: false`` on an accuracy;
- pruning never deletes the best checkpoint: ``prune_checkpoints`` keeps the same folders as
  transformers' own ``rotate_checkpoints`` (called here) after every save of a run, and in a run;
- a resume mid-run equals the straight run (the best so far comes back from the checkpoint);
- LoRA (the adapters) and the sharded checkpoint format (strategy ddp on one process) load too;
- bad configs are refused naming the keys, an unknown metric at the first evaluation;
- off (the default), checkpoints and the run folder are as before.
"""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlhf_fast.trainers.best_checkpoint import BEST_FILE, EXTRA_KEY
from rlhf_fast.trainers.checkpoint import checkpoint_dir, prune_checkpoints, save_checkpoint
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records
from tests.test_offline_metrics import sft_tok  # noqa: F401 (a fixture)
from tests.test_trainer_common import untimed_metrics

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"
STEPS = 10

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _cfg(tmp_path, name="run", **kw):
    # lr 0.05 constant: eval_loss falls to its lowest at step 4, then rises (4.20 at step 10)
    base = dict(model=TINY, output_dir=str(tmp_path / name), max_steps=STEPS, batch_size=8, lr=0.05, warmup_steps=0,
                lr_schedule="constant", eval_every=1, save_every=1, keep_checkpoints=0, log_every=1, max_len=48,
                device="cpu", load_best_model_at_end=True)
    base.update(kw)
    return SFTConfig(**base)


def _sft(cfg, tok, **kw):
    recs = synthetic_sft_records(48)
    return SFTTrainer(cfg, train_records=recs[:40], eval_records=recs[40:], tokenizer=tok, **kw)


def _hf_best(evals, greater_is_better):
    """transformers/trainer.py (5.x), ``Trainer._determine_best_metric``: its comparison
    transcribed, over ``evals`` = [(global_step, metric_value)] in order; returns
    ``(best_global_step, best_metric)``."""
    best_metric = best_global_step = None
    for global_step, metric_value in evals:
        operator = np.greater if greater_is_better else np.less
        if best_metric is None:
            best_metric = float("-inf") if greater_is_better else float("inf")
        if operator(metric_value, best_metric):
            best_metric = metric_value
            best_global_step = global_step
    return best_global_step, best_metric


def _checkpointed(log, key, save_every, max_steps=STEPS):
    """The (step, value) evaluations that compete: at a checkpoint (multiples of save_every and the
    last step), not the start's."""
    return [(r["step"], r[key]) for r in log
            if key in r and r["step"] > 0 and (r["step"] % save_every == 0 or r["step"] == max_steps)]


def _weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def _same(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _extra(run, step):
    with open(os.path.join(checkpoint_dir(run, step), "extra.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("save_every", [1, 2, 3])
def test_sft_loads_the_best_checkpoint(tmp_path, sft_tok, save_every, capsys):
    cfg = _cfg(tmp_path, save_every=save_every)
    tr = _sft(cfg, sft_tok)
    tr.train()
    log = read_metrics(cfg.output_dir)
    step, metric = _hf_best(_checkpointed(log, "eval_loss", save_every), greater_is_better=False)
    assert (tr.best.step, tr.best.metric) == (step, metric)
    # the planted shape: the best is neither the last step nor the first checkpoint
    assert step not in (save_every, STEPS) and metric < log[-1]["eval_loss"]
    best_dir, last_dir = checkpoint_dir(cfg.output_dir, step), checkpoint_dir(cfg.output_dir, STEPS)
    best_w = _weights(os.path.join(best_dir, "models", "policy"))
    assert _same(_weights(os.path.join(cfg.output_dir, "final")), best_w)
    assert not _same(_weights(os.path.join(last_dir, "models", "policy")), best_w)
    state = {k: v for k, v in tr.model.state_dict().items() if k in best_w}
    assert _same(state, best_w)
    record = json.load(open(os.path.join(cfg.output_dir, BEST_FILE)))
    assert record == {"metric_for_best_model": "eval_loss", "greater_is_better": False, "best_metric": metric,
                      "best_global_step": step, "best_model_checkpoint": best_dir}
    assert _extra(cfg.output_dir, STEPS)[EXTRA_KEY] == {k: record[k] for k in record if k != "best_model_checkpoint"}
    assert f"the best checkpoint is step {step} (eval_loss=" in capsys.readouterr().err


def test_only_checkpointed_evaluations_compete(tmp_path, sft_tok):
    """save_every 3, eval_every 1: the evaluations at 3, 6, 9 and 10 compete, and step 9 wins
    (3.35); transformers would take the best over every evaluation (step 4, 3.31, with no
    checkpoint) and then keep its last checkpointed best, step 3 (3.59) — the difference the module
    docstring names."""
    cfg = _cfg(tmp_path, save_every=3)
    tr = _sft(cfg, sft_tok)
    tr.train()
    log = read_metrics(cfg.output_dir)
    every = [(r["step"], r["eval_loss"]) for r in log if r["step"] > 0]
    assert _hf_best(every, False)[0] == 4 and tr.best.step == 9


@pytest.mark.parametrize("trainer, metric, gib", [("reward", "accuracy", None), ("reward", "eval_accuracy", False),
                                                   ("dpo", "rewards/accuracy", None)])
def test_greater_is_better_on_an_accuracy(tmp_path, trainer, metric, gib):
    from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records
    from tests.test_reward import preference_tokenizer

    cls, config, part, lr = ((RewardTrainer, RewardConfig, "reward", 0.01) if trainer == "reward"
                             else (DPOTrainer, DPOConfig, "policy", 0.03))
    cfg = config(model=TINY, output_dir=str(tmp_path / trainer), batch_size=4, lr=lr, warmup_steps=0,
                 lr_schedule="constant", eval_every=1, save_every=1, keep_checkpoints=0, log_every=1, max_len=48,
                 max_steps=STEPS, device="cpu", load_best_model_at_end=True, metric_for_best_model=metric,
                 greater_is_better=gib)
    # seeds whose runs tie at their best evaluation (checked below), for the tie rule to be exercised
    recs = synthetic_preference_records(40, seed=3 if trainer == "reward" else 7)
    tr = cls(cfg, train_records=recs[:24], eval_records=recs[24:], tokenizer=preference_tokenizer())
    tr.train()
    key = metric if metric.startswith("eval_") else "eval_" + metric
    evals = _checkpointed(read_metrics(cfg.output_dir), key, 1)
    greater = gib is None  # (from the name: it does not end in "loss")
    step, value = _hf_best(evals, greater)
    assert (tr.best.step, tr.best.metric, tr.best.greater_is_better) == (step, value, greater)
    # ties: the first of them stays the best (strict comparison), and it is not the last step
    assert step < STEPS and [v for _, v in evals].count(value) > 1
    best_w = _weights(os.path.join(checkpoint_dir(cfg.output_dir, step), "models", part))
    assert _same(_weights(os.path.join(cfg.output_dir, "final")), best_w)


def _hf_rotation(root, keep, best):
    """transformers' ``rotate_checkpoints`` on a mirror folder of ``checkpoint-N`` folders."""
    from transformers.trainer_utils import rotate_checkpoints

    rotate_checkpoints(root, save_total_limit=keep, best_model_checkpoint=None if best is None
                       else os.path.join(root, f"checkpoint-{best}"), use_mtime=False)
    return sorted(int(n.split("-")[1]) for n in os.listdir(root))


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_pruning_keeps_the_best_as_transformers(tmp_path, keep):
    rng = np.random.default_rng(keep)
    for trial in range(6):
        ours, theirs = tmp_path / f"ours{trial}", tmp_path / f"hf{trial}"
        best = None
        for step in range(1, 9):
            if rng.random() < 0.4:  # this step's evaluation is the new best
                best = step
            save_checkpoint(checkpoint_dir(str(ours), step), extra={"step": step})
            os.makedirs(theirs / f"checkpoint-{step}")
            prune_checkpoints(str(ours), keep, best)
            left = sorted(int(n[5:]) for n in os.listdir(ours / "checkpoints"))
            assert left == _hf_rotation(str(theirs), keep, best), (trial, step, best)
            assert best is None or best in left


@pytest.mark.parametrize("keep, left", [(1, [4, 10]), (2, [4, 10]), (3, [4, 9, 10])])
def test_a_run_keeps_its_best_checkpoint(tmp_path, sft_tok, keep, left):
    cfg = _cfg(tmp_path, keep_checkpoints=keep)
    tr = _sft(cfg, sft_tok)
    tr.train()
    assert tr.best.step == 4
    assert sorted(int(n[5:]) for n in os.listdir(os.path.join(cfg.output_dir, "checkpoints"))) == left
    assert _same(_weights(os.path.join(cfg.output_dir, "final")),
                 _weights(os.path.join(checkpoint_dir(cfg.output_dir, 4), "models", "policy")))


def test_resume_equals_the_straight_run(tmp_path, sft_tok):
    """Stopped at step 6 and resumed to 10 (save_every 2, two checkpoints kept): the best (step 4,
    before the stop) comes back from the checkpoint, survives the pruning, and final/ equals the
    straight run's; without it the resumed run would pick step 8."""
    straight = _cfg(tmp_path, "straight", save_every=2, keep_checkpoints=2)
    _sft(straight, sft_tok).train()
    first = _cfg(tmp_path, "resumed", save_every=2, keep_checkpoints=2, max_steps=6)
    _sft(first, sft_tok).train()
    tr = _sft(_cfg(tmp_path, "resumed", save_every=2, keep_checkpoints=2), sft_tok)
    tr.train()
    assert tr.best.step == 4
    a, b = (json.load(open(os.path.join(c.output_dir, BEST_FILE))) for c in (straight, tr.cfg))
    assert {k: v for k, v in a.items() if k != "best_model_checkpoint"} == \
        {k: v for k, v in b.items() if k != "best_model_checkpoint"}
    assert _same(_weights(os.path.join(straight.output_dir, "final")),
                 _weights(os.path.join(tr.cfg.output_dir, "final")))
    assert untimed_metrics(straight.output_dir) == untimed_metrics(tr.cfg.output_dir)
    left = [sorted(os.listdir(os.path.join(c.output_dir, "checkpoints"))) for c in (straight, tr.cfg)]
    assert left[0] == left[1] == ["step_00000004", "step_00000010"]


def test_lora_loads_the_best_adapters(tmp_path, sft_tok):
    # the adapters alone learn slowly here (eval_loss falls to the end): the highest loss is the
    # "best", so that it is not the last step
    cfg = _cfg(tmp_path, lora={}, lr=0.5, greater_is_better=True)
    tr = _sft(cfg, sft_tok)
    tr.train()
    log = read_metrics(cfg.output_dir)
    step, _ = _hf_best(_checkpointed(log, "eval_loss", 1), True)
    assert tr.best.step == step and step != STEPS
    saved = _weights(os.path.join(checkpoint_dir(cfg.output_dir, step), "models", "policy"))  # the adapters
    trainable = {n: p.detach() for n, p in tr.model.named_parameters() if p.requires_grad}
    assert sorted(saved) == sorted(trainable) and _same(saved, trainable)
    assert os.path.isfile(os.path.join(cfg.output_dir, "final", "adapter_model.safetensors"))


def test_sharded_checkpoints_load_the_best(tmp_path, sft_tok):
    """strategy ddp on one process writes torch.distributed.checkpoint folders: the best is loaded
    from one as a resume loads it, and the run equals the one-process one."""
    plain = _cfg(tmp_path, "plain")
    _sft(plain, sft_tok).train()
    cfg = _cfg(tmp_path, "ddp", distributed={"strategy": "ddp"})
    tr = _sft(cfg, sft_tok)
    tr.train()
    assert os.path.isfile(os.path.join(checkpoint_dir(cfg.output_dir, 4), ".metadata"))
    assert tr.best.step == 4
    assert _same(_weights(os.path.join(plain.output_dir, "final")), _weights(os.path.join(cfg.output_dir, "final")))


@pytest.mark.parametrize("kw, match", [
    (dict(eval_every=0), r"load_best_model_at_end chooses among evaluations: set eval_every > 0"),
    (dict(eval_fraction=0.0), r"load_best_model_at_end chooses among evaluations: give eval_data or an eval_fraction"),
    (dict(save_every=0), r"load_best_model_at_end needs a checkpoint at evaluations: save_every \(0\) must be a "
                         r"multiple of eval_every \(1\)"),
    (dict(save_every=3, eval_every=2), r"save_every \(3\) must be a multiple of eval_every \(2\)"),
    (dict(load_best_model_at_end="yes"), r"load_best_model_at_end must be true or false, got 'yes'"),
    (dict(load_best_model_at_end=False, metric_for_best_model="loss", lr_schedule="cosine"),
     r"'cosine' steps on none, and load_best_model_at_end is off .*set load_best_model_at_end: true"),
])
def test_bad_configs_name_the_keys(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, **kw)


def test_other_trainers_check_the_keys_too(tmp_path):
    from rlhf_fast.trainers.dpo import DPOConfig
    from rlhf_fast.trainers.kto import KTOConfig
    from rlhf_fast.trainers.reward import RewardConfig

    for cls in (RewardConfig, DPOConfig, KTOConfig):
        with pytest.raises(ValueError, match=r"save_every \(4\) must be a multiple of eval_every \(3\)"):
            cls(model=TINY, output_dir=str(tmp_path), eval_every=3, save_every=4, load_best_model_at_end=True)
        # a metric without a metric schedule is accepted when it chooses the best checkpoint
        cls(model=TINY, output_dir=str(tmp_path), eval_every=3, save_every=6, load_best_model_at_end=True,
            metric_for_best_model="loss", lr_schedule="cosine")


def test_unknown_metric_refused_at_the_first_evaluation(tmp_path, sft_tok):
    tr = _sft(_cfg(tmp_path, metric_for_best_model="acuracy"), sft_tok)
    with pytest.raises(ValueError, match=r"metric_for_best_model 'acuracy': load_best_model_at_end compares "
                                         r"eval_acuracy, which this evaluation did not log; it logged \[.*'eval_loss'"):
        tr.train()
    assert tr.step == 0


def test_empty_eval_split_refused(tmp_path, sft_tok):
    cfg = _cfg(tmp_path)
    tr = SFTTrainer(cfg, train_records=synthetic_sft_records(16), eval_records=[], tokenizer=sft_tok)
    with pytest.raises(ValueError, match=r"load_best_model_at_end compares eval_loss of the evaluations, but the "
                                         r"eval split is empty"):
        tr.train()


def test_off_by_default_nothing_changes(tmp_path, sft_tok):
    cfg = _cfg(tmp_path, load_best_model_at_end=False, keep_checkpoints=2)
    tr = _sft(cfg, sft_tok)
    assert SFTConfig().load_best_model_at_end is False and tr.best is None
    tr.train()
    assert sorted(_extra(cfg.output_dir, STEPS)) == ["data", "num_tokens", "step"]
    assert not os.path.exists(os.path.join(cfg.output_dir, BEST_FILE))
    assert sorted(os.listdir(os.path.join(cfg.output_dir, "checkpoints"))) == ["step_00000009", "step_00000010"]
    assert _same(_weights(os.path.join(cfg.output_dir, "final")),
                 _weights(os.path.join(checkpoint_dir(cfg.output_dir, STEPS), "models", "policy")))


def test_a_stop_signal_checkpoint_does_not_compete(tmp_path, sft_tok):
    """A stop signal after step 4 checkpoints there, off the save_every 3 schedule: its evaluation
    (the lowest eval_loss of the run) does not compete, as the straight run has no checkpoint
    there, so the resumed run equals the straight one (best step 9)."""
    import signal

    from rlhf_fast.trainers.stop import TrainingStopped

    straight = _cfg(tmp_path, "straight", save_every=3)
    _sft(straight, sft_tok).train()
    cfg = _cfg(tmp_path, "stopped", save_every=3)
    tr = _sft(cfg, sft_tok)
    step_once = tr.train_step

    def train_step():
        m = step_once()
        if tr.step == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
        return m

    tr.train_step = train_step
    with pytest.raises(TrainingStopped):
        tr.train()
    assert os.path.isdir(checkpoint_dir(cfg.output_dir, 4))
    resumed = _sft(cfg, sft_tok)
    resumed.train()
    assert resumed.best.step == 9
    assert _same(_weights(os.path.join(straight.output_dir, "final")), _weights(os.path.join(cfg.output_dir, "final")))


def test_kto_loads_the_best_checkpoint(tmp_path):
    from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
    from rlhf_fast.trainers.reward import synthetic_preference_records
    from tests.test_reward import preference_tokenizer

    cfg = KTOConfig(model=TINY, output_dir=str(tmp_path / "kto"), batch_size=4, lr=0.1, warmup_steps=0,
                    lr_schedule="constant", eval_every=1, save_every=1, keep_checkpoints=1, log_every=1, max_len=48,
                    max_steps=STEPS, device="cpu", load_best_model_at_end=True)
    recs = synthetic_preference_records(40, seed=7)
    tr = KTOTrainer(cfg, train_records=recs[:24], eval_records=recs[24:], tokenizer=preference_tokenizer())
    tr.train()
    step, _ = _hf_best(_checkpointed(read_metrics(cfg.output_dir), "eval_loss", 1), False)
    assert tr.best.step == step and step != STEPS
    assert sorted(os.listdir(os.path.join(cfg.output_dir, "checkpoints"))) == [os.path.basename(
        checkpoint_dir(cfg.output_dir, s)) for s in (step, STEPS)]
    assert _same(_weights(os.path.join(cfg.output_dir, "final")),
                 _weights(os.path.join(checkpoint_dir(cfg.output_dir, step), "models", "policy")))
