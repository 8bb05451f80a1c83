"""``lr_schedule: reduce_lr_on_plateau`` in the offline trainers, as transformers' Trainer runs it
(``trainer.py``: no per-step ``lr_scheduler.step()`` for a ReduceLROnPlateau, and
``lr_scheduler.step(metrics["eval_" + metric_for_best_model])`` after each evaluation but the one
at the start): the LR sequence of a run equals a torch ReduceLROnPlateau driven by hand with the
run's logged ``eval_loss``; transformers builds the same scheduler; a resume is exact; the keys
that cannot work with it are refused by name."""

import pytest
import torch

from rlhf_fast.trainers.common import PLATEAU_METRIC, check_schedule_fields, read_metrics
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records
from tests.test_offline_metrics import sft_tok  # noqa: F401 (a fixture)

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"
KW = {"patience": 0, "factor": 0.5}
# run-to-run timings: not part of what a resume must reproduce
TIMING = ("time/step", "train_tokens_per_second")

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok(sft_tok):
    return sft_tok  # the SFT trainers' tokenizer (test_offline_metrics)


def _cfg(tmp_path, name="run", **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), max_steps=8, batch_size=8, lr=3e-2, warmup_steps=0,
                eval_every=1, log_every=1, max_len=48, device="cpu", lr_schedule="reduce_lr_on_plateau",
                lr_scheduler_kwargs=dict(KW))
    base.update(kw)
    return SFTConfig(**base)


def _sft(cfg, tok):
    recs = synthetic_sft_records(48)
    return SFTTrainer(cfg, train_records=recs[:40], eval_records=recs[40:], tokenizer=tok)


def _by_hand(lr, log, kwargs):
    """The ``lr`` each logged training step should show: a torch ReduceLROnPlateau stepped on the
    ``eval_loss`` of every earlier step's record (the evaluation at step 0 excluded:
    transformers' ``skip_scheduler`` for ``eval_on_start``), and the LR after the last one."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
    lrs = []
    for rec in log:
        if rec["step"] == 0:
            continue
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(rec[PLATEAU_METRIC])
    return lrs, opt.param_groups[0]["lr"]


def test_lr_follows_a_plateau_scheduler_driven_by_the_logged_eval_loss(tmp_path, tok):
    tr = _sft(_cfg(tmp_path), tok)
    tr.train()
    log = read_metrics(tr.cfg.output_dir)
    assert [r["step"] for r in log] == list(range(9)) and all(PLATEAU_METRIC in r for r in log)
    lrs, final = _by_hand(3e-2, log, KW)
    assert [r["lr"] for r in log[1:]] == lrs
    assert len(set(lrs)) >= 2, lrs  # the run does reduce (else the check above says little)
    assert tr.optimizer.param_groups[0]["lr"] == final == tr.scheduler.get_last_lr()[0]
    assert tr.scheduler.last_epoch == 8  # stepped once per evaluation after the start's, and only then


def test_transformers_builds_the_same_scheduler(tmp_path, tok):
    from transformers import TrainingArguments
    from transformers.optimization import get_scheduler

    tr = _sft(_cfg(tmp_path, lr_scheduler_kwargs={**KW, "threshold": 0.01, "min_lr": 1e-4}), tok)
    ref = get_scheduler("reduce_lr_on_plateau", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-2),
                        scheduler_specific_kwargs={**KW, "threshold": 0.01, "min_lr": 1e-4})
    assert type(tr.scheduler) is type(ref) is torch.optim.lr_scheduler.ReduceLROnPlateau
    mine = tr.scheduler.state_dict()
    n = len(tr.optimizer.param_groups)
    # (plus the LR it started from, for a resume at another lr)
    assert mine == {**ref.state_dict(), "min_lrs": [1e-4] * n, "_last_lr": [3e-2] * n, "base_lrs": [3e-2] * n}
    # the metric: transformers' default metric_for_best_model for this schedule, with its eval_ prefix
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), lr_scheduler_type="reduce_lr_on_plateau",
                             eval_strategy="steps", eval_steps=1, report_to=[])
    assert PLATEAU_METRIC == "eval_" + args.metric_for_best_model and args.greater_is_better is False
    with pytest.raises(ValueError, match="requires an eval strategy"):
        TrainingArguments(output_dir=str(tmp_path / "hf"), lr_scheduler_type="reduce_lr_on_plateau", report_to=[])


def test_resume_is_exact(tmp_path, tok):
    """Stopped at step 6 (after the first reductions) and resumed to 8: the same log, weights and
    scheduler state as the run that went straight to 8."""
    full = _sft(_cfg(tmp_path, "full", save_every=2), tok)
    full.train()
    _sft(_cfg(tmp_path, "resumed", save_every=2, max_steps=6), tok).train()
    resumed = _sft(_cfg(tmp_path, "resumed", save_every=2), tok)
    resumed.train()

    def strip(log):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in log]

    a, b = strip(read_metrics(full.cfg.output_dir)), strip(read_metrics(resumed.cfg.output_dir))
    assert a == b
    assert len({r["lr"] for r in a[1:]}) >= 2  # reductions on both sides of the resume
    assert resumed.scheduler.state_dict() == full.scheduler.state_dict()
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_resume_with_another_lr_and_factor_uses_them(tmp_path, tok):
    """As for the other schedules, a resume trains at the config's lr: the reductions made so far
    scale it (the LR at step 6 × new lr / old lr), and the new factor applies from then on; the
    best eval_loss and the counters carry over."""
    _sft(_cfg(tmp_path, save_every=2, max_steps=6), tok).train()
    first = read_metrics(tmp_path / "run")
    tr = _sft(_cfg(tmp_path, save_every=2, lr=6e-2, lr_scheduler_kwargs={**KW, "factor": 0.25}), tok)
    tr.train()
    log = read_metrics(tmp_path / "run")
    assert log[:7] == first and [r["step"] for r in log] == list(range(9))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-2)
    hand = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **KW)
    for r in first[1:]:
        hand.step(r[PLATEAU_METRIC])
    hand.factor, opt.param_groups[0]["lr"] = 0.25, opt.param_groups[0]["lr"] * 6e-2 / 3e-2
    lrs = []
    for r in log[7:]:
        lrs.append(opt.param_groups[0]["lr"])
        hand.step(r[PLATEAU_METRIC])
    assert [r["lr"] for r in log[7:]] == lrs and lrs[0] < 6e-2  # the reductions before the resume kept
    assert tr.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert tr.scheduler.state_dict() == {**hand.state_dict(), "base_lrs": [6e-2]}


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_dpo_and_kto_step_on_their_eval_loss(tmp_path, kind):
    from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
    from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
    from rlhf_fast.trainers.reward import synthetic_preference_records
    from tests.test_reward import preference_tokenizer

    cfg_cls, cls = (DPOConfig, DPOTrainer) if kind == "dpo" else (KTOConfig, KTOTrainer)
    kw = {**KW, "threshold": 0.05}  # a small model's DPO loss falls slowly: reductions within 5 steps
    cfg = cfg_cls(model=TINY, output_dir=str(tmp_path / kind), batch_size=4, lr=3e-2, warmup_steps=0, eval_every=1,
                  log_every=1, max_len=48, max_steps=5, device="cpu", lr_schedule="reduce_lr_on_plateau",
                  lr_scheduler_kwargs=kw)
    recs = synthetic_preference_records(24, seed=7)
    tr = cls(cfg, train_records=recs[:16], eval_records=recs[16:], tokenizer=preference_tokenizer())
    tr.train()
    log = read_metrics(cfg.output_dir)
    assert [r["step"] for r in log] == list(range(6))
    lrs, final = _by_hand(3e-2, log, kw)
    assert [r["lr"] for r in log[1:]] == lrs and len(set(lrs)) >= 2, lrs
    assert tr.optimizer.param_groups[0]["lr"] == final and tr.scheduler.last_epoch == 5


@pytest.mark.parametrize("kw, match", [
    (dict(eval_every=0), r"lr_schedule 'reduce_lr_on_plateau' steps on eval_loss .*set eval_every > 0"),
    (dict(eval_fraction=0.0), r"lr_schedule 'reduce_lr_on_plateau' .*give eval_data or an eval_fraction > 0"),
    (dict(warmup_steps=2), r"lr_schedule 'reduce_lr_on_plateau' has no warm-up .*set warmup_steps to 0, got 2"),
    (dict(warmup_ratio=0.1), r"lr_schedule 'reduce_lr_on_plateau' has no warm-up .*set warmup_ratio to 0, got 0.1"),
    (dict(min_lr_ratio=0.1), r"lr_schedule 'reduce_lr_on_plateau' takes no min_lr_ratio"),
    (dict(lr_scheduler_kwargs={"patiense": 0}), r"lr_scheduler_kwargs key 'patiense' is not an argument of torch's "
                                                r"ReduceLROnPlateau"),
    (dict(lr_scheduler_kwargs={"factor": 1.5}), r"lr_scheduler_kwargs \{'factor': 1.5\} do not fit lr_schedule "
                                                r"'reduce_lr_on_plateau': Factor should be < 1.0"),
    (dict(lr_scheduler_kwargs={"min_lr": [0.0, 0.0]}), r"lr_scheduler_kwargs min_lr must be a number"),
    # greedy is supported (tests/test_lr_metric_schedules.py); its default min_lr, 0.001, above lr is refused
    (dict(lr_schedule="greedy", lr=1e-4), r"lr_schedule 'greedy' moves the LR between lr_scheduler_kwargs min_lr "
                                          r"\(0.001\) and max_lr \(1.0\), which must hold lr \(0.0001\)"),
])
def test_refusals_name_the_key(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, **kw)


def test_refused_where_nothing_passes_a_metric(tmp_path, tok):
    # an empty eval split (eval_records given): refused before the first step
    cfg = _cfg(tmp_path)
    tr = SFTTrainer(cfg, train_records=synthetic_sft_records(16), eval_records=[], tokenizer=tok)
    with pytest.raises(ValueError, match=r"lr_schedule 'reduce_lr_on_plateau' steps on eval_loss .*eval split is "
                                         r"empty"):
        tr.train()
    assert tr.step == 0
    # the online trainers' schedules (no eval_every passed) still refuse it
    with pytest.raises(ValueError, match=r"optim.schedule 'reduce_lr_on_plateau' steps on a metric"):
        check_schedule_fields("reduce_lr_on_plateau", {}, 0.0, 0, 0.0, lr=1e-3, total_steps=10, prefix="optim.",
                              schedule_key="schedule")
