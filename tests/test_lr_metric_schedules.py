"""Metric-driven LR schedules of the offline trainers beyond ``reduce_lr_on_plateau`` on
``eval_loss`` (tests/test_lr_plateau.py): transformers' ``metric_for_best_model`` /
``greater_is_better`` (``TrainingArguments.__post_init__``: null -> "loss", greater unless the name
ends in "loss"; ``Trainer._evaluate``: ``lr_scheduler.step(metrics["eval_" + name])`` after each
evaluation but the start's) and its ``greedy`` schedule (``GreedyLR``, ``get_scheduler``):

- the logged LR equals a hand-driven torch ReduceLROnPlateau / transformers GreedyLR fed the
  logged metric (SFT, DPO, reward), and differs from the one fed eval_loss;
- a resume mid-run equals the straight run (greedy with its smoothing window too);
- names no evaluation logs are refused at the first evaluation, naming the key and the metrics
  it logged; type errors, keys without a metric schedule, a mode against greater_is_better and a
  greedy min_lr / max_lr that cannot hold lr when the config is checked.
"""

import pytest
import torch

from rlhf_fast.trainers.common import read_metrics, schedule_metric
from tests.test_lr_plateau import _cfg as plateau_cfg
from tests.test_lr_plateau import _sft
from tests.test_offline_metrics import sft_tok  # noqa: F401 (a fixture)

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"
TIMING = ("time/step", "train_tokens_per_second")
GREEDY_KW = {"patience": 0, "factor": 0.5, "min_lr": 1e-4, "max_lr": 0.1}
ACC_KW = {"patience": 0, "factor": 0.5, "mode": "max"}

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _cfg(tmp_path, name="run", **kw):
    """test_lr_plateau's SFT config, with transformers' greedy schedule unless ``kw`` says otherwise."""
    return plateau_cfg(tmp_path, name, **{"lr_schedule": "greedy", "lr_scheduler_kwargs": dict(GREEDY_KW), **kw})


def _hand(kind, lr, log, metric, kwargs):
    """The ``lr`` of each logged step after the start: a scheduler of ``kind`` built by
    transformers' get_scheduler at ``lr``, stepped on ``metric`` of every earlier record but the
    start's (transformers' skip_scheduler for eval_on_start); and the LR after the last."""
    from transformers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(kind, opt, scheduler_specific_kwargs=kwargs)
    lrs = []
    for rec in log:
        if rec["step"] == 0:
            continue
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(rec[metric])
    return lrs, opt.param_groups[0]["lr"]


@pytest.mark.parametrize("kind, kw", [
    ("greedy", dict(lr_scheduler_kwargs=dict(GREEDY_KW))),
    ("greedy", dict(metric_for_best_model="mean_token_accuracy", lr_scheduler_kwargs={**GREEDY_KW, "mode": "max"})),
    # (accuracy minimised: a run whose accuracy soon stops rising reduces at every evaluation in
    # mode max, as eval_loss would; in mode min the two metrics give other LRs)
    ("reduce_lr_on_plateau", dict(metric_for_best_model="eval_mean_token_accuracy", greater_is_better=False,
                                  lr_scheduler_kwargs={"patience": 0, "factor": 0.5})),
])
def test_sft_lr_follows_the_chosen_metric(tmp_path, sft_tok, kind, kw):
    tr = _sft(_cfg(tmp_path, lr_schedule=kind, **kw), sft_tok)
    tr.train()
    log = read_metrics(tr.cfg.output_dir)
    assert [r["step"] for r in log] == list(range(9))
    metric = schedule_metric(tr.cfg)[0]
    lrs, final = _hand(kind, 3e-2, log, metric, kw["lr_scheduler_kwargs"])
    assert [r["lr"] for r in log[1:]] == lrs and len(set(lrs)) >= 2, lrs
    assert tr.optimizer.param_groups[0]["lr"] == final == tr.scheduler.get_last_lr()[0]
    if metric != "eval_loss":  # the check tells the metrics apart
        assert _hand(kind, 3e-2, log, "eval_loss", kw["lr_scheduler_kwargs"])[0] != lrs
    if kind == "greedy":
        assert max(lrs) > 3e-2 or lrs[0] != lrs[1]  # greedy raises the LR too


@pytest.mark.parametrize("kind, kw", [
    # smoothing: the running window is part of the state a resume must bring back
    ("greedy", dict(metric_for_best_model="entropy", greater_is_better=False,
                    lr_scheduler_kwargs={**GREEDY_KW, "smooth": True, "window_size": 3})),
    ("reduce_lr_on_plateau", dict(metric_for_best_model="mean_token_accuracy", lr_scheduler_kwargs=ACC_KW)),
])
def test_resume_is_exact(tmp_path, sft_tok, kind, kw):
    full = _sft(_cfg(tmp_path, "full", save_every=2, lr_schedule=kind, **kw), sft_tok)
    full.train()
    _sft(_cfg(tmp_path, "resumed", save_every=2, max_steps=6, lr_schedule=kind, **kw), sft_tok).train()
    resumed = _sft(_cfg(tmp_path, "resumed", save_every=2, lr_schedule=kind, **kw), sft_tok)
    resumed.train()

    def strip(log):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in log]

    a, b = strip(read_metrics(full.cfg.output_dir)), strip(read_metrics(resumed.cfg.output_dir))
    assert a == b and len({r["lr"] for r in a[7:]}) + len({r["lr"] for r in a[1:7]}) >= 3
    assert resumed.scheduler.state_dict() == full.scheduler.state_dict()
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_greedy_resume_with_another_lr_scales_it(tmp_path, sft_tok):
    """As for reduce_lr_on_plateau: a resume at another lr keeps the changes made so far, scaled
    by new / old lr, and the new settings (here factor) apply from then on."""
    _sft(_cfg(tmp_path, save_every=2, max_steps=6), sft_tok).train()
    first = read_metrics(tmp_path / "run")
    tr = _sft(_cfg(tmp_path, save_every=2, lr=1.5e-2, lr_scheduler_kwargs={**GREEDY_KW, "factor": 0.25}), sft_tok)
    tr.train()
    log = read_metrics(tmp_path / "run")
    assert log[:7] == first
    from transformers.optimization import GreedyLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-2)
    hand = GreedyLR(opt, **GREEDY_KW)
    for r in first[1:]:
        hand.step(r["eval_loss"])
    hand.factor, hand._init_lrs = 0.25, [1.5e-2]
    opt.param_groups[0]["lr"] *= 1.5e-2 / 3e-2
    lrs = []
    for r in log[7:]:
        lrs.append(opt.param_groups[0]["lr"])
        hand.step(r["eval_loss"])
    assert [r["lr"] for r in log[7:]] == lrs
    assert tr.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("kind", ["dpo", "reward"])
def test_preference_trainers_step_on_their_metric(tmp_path, kind):
    from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records
    from tests.test_reward import preference_tokenizer

    cfg_cls, cls, metric = ((DPOConfig, DPOTrainer, "rewards/margin") if kind == "dpo"
                            else (RewardConfig, RewardTrainer, "accuracy"))
    kw = {**GREEDY_KW, "mode": "max"}
    cfg = cfg_cls(model=TINY, output_dir=str(tmp_path / kind), batch_size=4, lr=3e-2, warmup_steps=0, eval_every=1,
                  log_every=1, max_len=48, max_steps=5, device="cpu", lr_schedule="greedy", lr_scheduler_kwargs=kw,
                  metric_for_best_model=metric)
    recs = synthetic_preference_records(24, seed=7)
    tr = cls(cfg, train_records=recs[:16], eval_records=recs[16:], tokenizer=preference_tokenizer())
    tr.train()
    log = [r for r in read_metrics(cfg.output_dir) if r["step"] > 0]
    assert [r["step"] for r in log] == list(range(1, 6))
    lrs, final = _hand("greedy", 3e-2, [{"step": 0}] + log, "eval_" + metric, kw)
    assert [r["lr"] for r in log] == lrs and len(set(lrs)) >= 2, lrs
    assert tr.optimizer.param_groups[0]["lr"] == final


def test_unknown_metric_refused_at_the_first_evaluation(tmp_path, sft_tok):
    tr = _sft(_cfg(tmp_path, metric_for_best_model="acuracy", lr_scheduler_kwargs={**GREEDY_KW, "mode": "max"}),
              sft_tok)
    with pytest.raises(ValueError, match=r"metric_for_best_model 'acuracy': lr_schedule 'greedy' steps on "
                                         r"eval_acuracy, which this evaluation did not log; it logged \[.*"
                                         r"'eval_mean_token_accuracy'"):
        tr.train()
    assert tr.step == 0  # the start's evaluation: before any step
    # the reward trainer evaluates first after eval_every steps: refused there
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records
    from tests.test_reward import preference_tokenizer

    cfg = RewardConfig(model=TINY, output_dir=str(tmp_path / "rm"), batch_size=4, lr=3e-2, warmup_steps=0,
                       eval_every=2, max_len=48, max_steps=5, device="cpu", lr_schedule="reduce_lr_on_plateau",
                       metric_for_best_model="eval_mean_token_accuracy", lr_scheduler_kwargs={"mode": "max"})
    recs = synthetic_preference_records(24, seed=7)
    rm = RewardTrainer(cfg, train_records=recs[:16], eval_records=recs[16:], tokenizer=preference_tokenizer())
    with pytest.raises(ValueError, match=r"steps on eval_mean_token_accuracy, which this evaluation did not log; "
                                         r"it logged \[.*'eval_accuracy'"):
        rm.train()
    assert rm.step == 2


@pytest.mark.parametrize("kw, match", [
    (dict(metric_for_best_model=""), r"metric_for_best_model must be null or the name of an evaluation metric"),
    (dict(metric_for_best_model=3), r"metric_for_best_model must be null or the name"),
    (dict(metric_for_best_model="eval_"), r"metric_for_best_model must be null or the name"),
    (dict(greater_is_better="yes"), r"greater_is_better must be true, false or null, got 'yes'"),
    (dict(lr_schedule="cosine", lr_scheduler_kwargs={}, metric_for_best_model="loss"),
     r"metric_for_best_model / greater_is_better choose the metric .*'cosine' steps on none"),
    (dict(metric_for_best_model="accuracy"), r"metric_for_best_model 'accuracy' is better when greater "
                                             r"\(greater_is_better true, from its name\) but lr_scheduler_kwargs "
                                             r"mode is 'min' .*set lr_scheduler_kwargs mode: max"),
    (dict(greater_is_better=True), r"metric_for_best_model 'loss' is better when greater \(greater_is_better "
                                   r"true\)"),
    (dict(lr_schedule="reduce_lr_on_plateau", lr_scheduler_kwargs={"mode": "max"}, metric_for_best_model="loss"),
     r"'loss' is better when smaller .*set lr_scheduler_kwargs mode: min, or greater_is_better: true"),
    (dict(lr_scheduler_kwargs={**GREEDY_KW, "min_lr": 0.05}), r"lr_schedule 'greedy' moves the LR between "
                                                             r"lr_scheduler_kwargs min_lr \(0.05\) and max_lr"),
    (dict(lr_scheduler_kwargs={**GREEDY_KW, "max_lr": [1.0]}), r"lr_scheduler_kwargs max_lr must be a number"),
    (dict(lr_scheduler_kwargs={"patiense": 0}), r"lr_scheduler_kwargs key 'patiense' is not an argument of "
                                                r"transformers's GreedyLR"),
    (dict(lr_scheduler_kwargs={"factor": 1.5}), r"do not fit lr_schedule 'greedy': Factor should be < 1.0"),
    (dict(warmup_steps=2), r"lr_schedule 'greedy' has no warm-up"),
    (dict(eval_every=0, metric_for_best_model="entropy", greater_is_better=False), r"lr_schedule 'greedy' steps on eval_entropy after "
                                                          r"each evaluation: set eval_every > 0"),
])
def test_config_refusals_name_the_key(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, **kw)


def test_rules_are_transformers(tmp_path):
    """schedule_metric gives transformers' metric and greater_is_better; greedy's scheduler is
    the one transformers' get_scheduler builds (GreedyLR, the same state)."""
    from transformers import TrainingArguments
    from transformers.optimization import get_scheduler

    for name, gib in ((None, None), ("accuracy", None), ("eval_entropy", None), ("loss", True), ("acc", False)):
        args = TrainingArguments(output_dir=str(tmp_path / "hf"), lr_scheduler_type="greedy", eval_strategy="steps",
                                 eval_steps=1, report_to=[], metric_for_best_model=name, greater_is_better=gib)
        cfg = type("C", (), {"metric_for_best_model": name, "greater_is_better": gib})()
        ours, ours_gib = schedule_metric(cfg)
        want = args.metric_for_best_model
        assert ours == (want if want.startswith("eval_") else "eval_" + want) and ours_gib == args.greater_is_better
    tr_cfg = _cfg(tmp_path)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-2)
    from rlhf_fast.trainers.common import supervised_scheduler

    ref = get_scheduler("greedy", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-2),
                        scheduler_specific_kwargs=GREEDY_KW)
    mine = supervised_scheduler(opt, tr_cfg)
    assert type(mine) is type(ref) and mine.state_dict() == ref.state_dict()
