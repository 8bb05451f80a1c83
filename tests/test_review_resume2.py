"""Review of exact resume for recent features (resume2): the averaged ``log_every`` windows
(:class:`~rlhf_fast.trainers.common.LogWindow`) across a stop signal. Checked and found exact
(no test: behaviour correct): log_every 3 / save_every 2 kill-and-resume for DPO, KTO, reward,
PRM, GRPO, PPO, online DPO, A*-PO, distill (every record, final weights, samples.jsonl, tb/
steps), dynamic sampling, eval.group_size 2, load_best_model_at_end with TRL metric names and
mask_truncated with whiten_advantages. Tiny models, one thread."""

import os
import signal

import pytest
import torch

from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.stop import TrainingStopped
from tests.test_sft import TINY, _cfg, tok  # noqa: F401 (the tokenizer fixture)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

_TIMED = ("time/", "tokens_per", "train_tokens_per", "step_time")


def _untimed(run):
    return [{k: v for k, v in r.items() if not k.startswith(_TIMED)} for r in read_metrics(run)]


def _tb_steps(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run, "tb"), purge_orphaned_data=True)
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_sft_stop_inside_a_log_window_resumes_to_the_uninterrupted_log(tmp_path, tok):  # noqa: F811
    """log_every 3: an uninterrupted run logs steps 3 and 5 (each the mean of its window). A stop
    signal at step 1 logged step 1 alone and the resumed run logged step 3 as the mean of steps
    2-3 only (loss 0.7629 where the uninterrupted run's mean of 1-2 is 0.7280 in DPO): an extra
    record and a different mean. The stop's pending window now travels in its checkpoint."""
    from rlhf_fast.trainers.sft import SFTTrainer, synthetic_sft_records

    recs = synthetic_sft_records(40)

    def trainer(name, signal_at=None):
        t = SFTTrainer(_cfg(tmp_path, output_dir=str(tmp_path / name), max_steps=5, save_every=4, log_every=3,
                            report_to="tensorboard"), train_records=recs, eval_records=[], tokenizer=tok)
        if signal_at is not None:
            step = t.train_step

            def signalled():  # the signal arrives in the middle of a step
                if t.step + 1 == signal_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return step()

            t.train_step = signalled
        return t

    full = trainer("full")
    full.train()
    run = str(tmp_path / "stopped")
    with pytest.raises(TrainingStopped):
        trainer("stopped", signal_at=1).train()
    assert [r["step"] for r in read_metrics(run)] == [1]  # the stopped run's log shows where it stopped
    resumed = trainer("stopped")
    resumed.train()
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert [r["step"] for r in read_metrics(run)] == [3, 4, 5]
    assert _untimed(str(tmp_path / "full")) == _untimed(run)
    assert _tb_steps(run, "loss") == [3, 4, 5]


def test_rl_stop_inside_a_log_window_resumes_to_the_uninterrupted_log(tmp_path):
    """As for SFT, RL with log_every 3: a stop at step 2 logged step 2 (mean of 1-2) and the
    resumed run step 3 alone; the uninterrupted run logs step 3 as the mean of 1-3."""
    from rlhf_fast.trainers.rl import RLTrainer
    from tests.test_rl_learning import PROMPTS, frac_a, make_policy
    from tests.test_rl_trainer import _trainer

    calls = []

    def signalling(prompts, completions):  # frac_a, with SIGTERM during the 2nd step's scoring
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return frac_a(prompts, completions)

    signalling.__name__ = "frac_a"
    a = _trainer(tmp_path / "a", steps=4, save_every=0, log_every=3)
    a.train()
    b = _trainer(tmp_path / "b", reward_fns=(signalling,), steps=4, save_every=0, log_every=3)
    with pytest.raises(TrainingStopped):
        b.train()
    out = b.config.output_dir
    assert [r["step"] for r in read_metrics(out)] == [2]
    cfg = b.config
    cfg.resume = out
    pol, tk = make_policy()
    RLTrainer(cfg, pol, tk, reward_fns=[frac_a], prompts=PROMPTS).train()
    assert [r["step"] for r in read_metrics(out)] == [3, 4]
    assert _untimed(a.config.output_dir) == _untimed(out)
