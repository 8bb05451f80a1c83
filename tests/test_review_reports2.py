"""Review of the run report and the metrics logging (rep): the report's better direction of RL's
validation metrics, non-finite Python floats reaching the trackers, TensorBoard after a resume
(each step once, as metrics.jsonl), and the metrics of the steps between two logged ones
(averaged, as TRL / transformers log them)."""

import json
import math
import os
import shutil

import pytest

from rlhf_fast.cli import main
from tests.test_rl_cli import _small

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _records(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _tb_scalars(run, tag):
    """``[(step, value)]`` of the scalar ``tag`` as TensorBoard shows it: every event file of
    ``run/tb`` in order, the events a restart (SessionLog.START at ``purge_step``) purges left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run, "tb"), purge_orphaned_data=True)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _sft(run, *extra):
    return main(["sft", "none", "--output_dir", run, "--model", TINY, "--max_len", "48",
                 "--warmup_steps", "1", "--device", "cpu", "--eval_every", "0", "--eval_fraction", "0",
                 "--batch_size", "4", *extra])


# ----------------------------------------------------------------------------- the report


def test_report_best_of_rl_validation_rewards():
    """RL's periodic evaluation logs verl's ``eval/mean@n`` / ``best@k`` / ``worst@k`` /
    ``maj@k``, each a mean reward (higher is better, as ``eval/reward/total``), but the report
    gave them no best (direction 0: "neither is better")."""
    from rlhf_fast.trainers.report import direction, summarize_metric

    keys = ("eval/mean@4", "eval/best@2", "eval/best@4", "eval/worst@2", "eval/maj@4")
    recs = [{"step": s, **dict.fromkeys(keys, v)} for s, v in ((2, 0.25), (4, 0.75), (6, 0.5))]
    assert [summarize_metric(recs, k).best for k in keys] == [(4, 0.75)] * len(keys)
    assert direction("eval/reward_std") == 0 and direction("eval/response_length") == 0  # (unchanged)


# ----------------------------------------------------------------------------- the trackers


def test_a_nan_python_float_reaches_tensorboard(tmp_path):
    """transformers' TensorBoardCallback writes every float, NaN included (a loss turning NaN
    shows on the plot); MetricsLogger sent a NaN tensor but dropped a NaN Python float — what
    the offline trainers' train_step returns — so the step vanished from TensorBoard."""
    import torch

    from rlhf_fast.trainers.common import MetricsLogger

    run = str(tmp_path / "run")
    with MetricsLogger(run, report_to="tensorboard") as log:
        log.log(1, {"loss": 1.5, "kl": torch.tensor(0.5)})
        log.log(2, {"loss": float("nan"), "kl": float("inf")})
        log.log(3, {"loss": 1.0, "kl": torch.tensor(float("-inf"))})
    assert [r["loss"] for r in _records(run)] == [1.5, "nan", 1.0]  # (strict JSON, unchanged)
    loss, kl = _tb_scalars(run, "loss"), _tb_scalars(run, "kl")
    assert [s for s, _ in loss] == [1, 2, 3] and math.isnan(loss[1][1])
    assert kl[1:] == [(2, math.inf), (3, -math.inf)]


def _drop_last_checkpoint(run, step):
    """The run as if it had been killed after logging ``step`` but before saving its checkpoint."""
    shutil.rmtree(os.path.join(run, "checkpoints", f"step_{step:08d}"))
    shutil.rmtree(os.path.join(run, "final"))


def test_tensorboard_holds_each_step_once_after_a_resume(tmp_path):
    """A resumed run continues exactly: metrics.jsonl drops the steps after the checkpoint it
    resumes from, but TensorBoard kept the first attempt's events of those steps beside the new
    ones (loss at steps 1 2 3 4 3 4). SummaryWriter's ``purge_step`` hides them."""
    sft = str(tmp_path / "sft")
    args = ("--max_steps", "4", "--save_every", "2", "--log_every", "1", "--report_to", "tensorboard")
    assert _sft(sft, *args) == 0
    _drop_last_checkpoint(sft, 4)
    assert _sft(sft, *args) == 0  # resumes from step 2 (resume: true by default)
    assert [r["step"] for r in _records(sft)] == [1, 2, 3, 4]
    assert [s for s, _ in _tb_scalars(sft, "loss")] == [1, 2, 3, 4]

    grpo = str(tmp_path / "grpo")
    cfg = _small(tmp_path, steps=3, save_every=2, report_to="tensorboard")
    assert main(["grpo", cfg, "--output_dir", grpo]) == 0
    _drop_last_checkpoint(grpo, 3)
    assert main(["grpo", "--resume", grpo]) == 0
    assert [r["step"] for r in _records(grpo)] == [1, 2, 3]
    assert [s for s, _ in _tb_scalars(grpo, "reward/total")] == [1, 2, 3]


# ----------------------------------------------------------------------------- log_every


def test_log_every_averages_the_steps_since_the_last_log(tmp_path):
    """With ``log_every`` k, transformers logs the mean loss of the k steps since the last log
    (``tr_loss / (global_step - _globalstep_last_logged)``) and TRL the mean of each of its
    metrics over them; the trainers logged the k-th step's values alone, the other k − 1 steps
    dropped (SFT's default log_every is 10). The learning rate is the current one in both. A
    checkpoint's step is logged too, so that a resumed run logs what the uninterrupted one does."""
    from rlhf_fast.trainers.common import LogWindow

    window = LogWindow()
    for v in (1.0, float("nan"), 3.0):
        window.add({"loss": v, "lr": v, "note": f"v{v}"})
    window.add({"eval_loss": 7})
    # TRL leaves NaN values out of the mean; lr the current; text and a single value as they are
    assert window.pop() == {"loss": 2.0, "lr": 3.0, "note": "v3.0", "eval_loss": 7} and window.pop() == {}
    # the report's totals count each logged mean for the steps it stands for
    from rlhf_fast.trainers.report import _timing

    lines = _timing([{"step": 2, "time/step": 1.0, "tokens": 10}, {"step": 4, "time/step": 3.0, "tokens": 20},
                     {"step": 5, "time/step": 2.0, "tokens": 30}], {"log_every": 2})
    assert lines[0].startswith("- **Wall time**: 10 s, the sum of `time/step` over the 5 steps of 3 logged")
    assert lines[1].startswith("- **Tokens trained**: 90 (")
    every1, every2 = str(tmp_path / "every1"), str(tmp_path / "every2")
    for run, k in ((every1, "1"), (every2, "2")):
        assert _sft(run, "--max_steps", "4", "--save_every", "0", "--log_every", k,
                    "--report_to", "none") == 0
    one, two = _records(every1), _records(every2)
    assert [r["step"] for r in two] == [2, 4]
    for i, rec in enumerate(two):
        pair = one[2 * i: 2 * i + 2]
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert rec[key] == pytest.approx((pair[0][key] + pair[1][key]) / 2, rel=1e-6), (rec["step"], key)
        assert rec["lr"] == pair[1]["lr"] and rec["num_tokens"] == pair[1]["num_tokens"]  # current / running
    # a checkpoint's step is logged too, so a run resumed from it logs what the uninterrupted run logs
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    args = ("--max_steps", "4", "--save_every", "2", "--log_every", "3", "--report_to", "none")
    for run in (full, cut):
        assert _sft(run, *args) == 0
    _drop_last_checkpoint(cut, 4)
    assert _sft(cut, *args) == 0

    def untimed(run):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "train_tokens_per", "tokens_per"))}
                for r in _records(run)]

    assert [r["step"] for r in _records(full)] == [2, 3, 4] and untimed(full) == untimed(cut)
    assert untimed(full)[1]["loss"] == one[2]["loss"]  # step 3: the window after step 2's log
    # RL: TRL's GRPO averages its reward, KL, entropy, ... over the steps since the last log
    for name, k in (("grpo1", 1), ("grpo2", 2)):
        (tmp_path / name).mkdir()
        cfg = _small(tmp_path / name, steps=4, save_every=0, sample_every=0, report_to="none", log_every=k)
        assert main(["grpo", cfg, "--output_dir", str(tmp_path / name / "run")]) == 0
    one, two = _records(str(tmp_path / "grpo1" / "run")), _records(str(tmp_path / "grpo2" / "run"))
    assert [r["step"] for r in two] == [2, 4]
    for i, rec in enumerate(two):
        pair = one[2 * i: 2 * i + 2]
        for key in ("reward/total", "reward/std", "entropy", "response_length/mean", "policy/loss"):
            want = (pair[0][key] + pair[1][key]) / 2
            assert rec[key] == pytest.approx(want, rel=1e-6, abs=1e-9), (rec["step"], key)
        assert rec["reward/dropped_total"] == pair[1]["reward/dropped_total"]
    full, cut = tmp_path / "grpo_full", tmp_path / "grpo_cut"
    for d in (full, cut):
        d.mkdir()
        cfg = _small(d, steps=4, save_every=2, sample_every=0, report_to="none", log_every=3)
        assert main(["grpo", cfg, "--output_dir", str(d / "run")]) == 0
    _drop_last_checkpoint(str(cut / "run"), 4)
    assert main(["grpo", "--resume", str(cut / "run")]) == 0
    assert [r["step"] for r in _records(str(full / "run"))] == [2, 3, 4]
    assert untimed(str(full / "run")) == untimed(str(cut / "run"))
    # a train() call that ends before `steps` (its checkpoint's step) logs the steps it left unlogged
    from tests.test_rl_trainer import _trainer

    tr = _trainer(tmp_path / "calls", steps=4, save_every=0, log_every=3)
    tr.train(steps=1)
    assert [r["step"] for r in _records(tr.config.output_dir)] == [1]
    tr.train()
    assert [r["step"] for r in _records(tr.config.output_dir)] == [1, 3, 4]
