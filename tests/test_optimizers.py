"""TRL's optimizer and LR-schedule options in every trainer (trainers/common.py): ``optim`` with
``adam_beta1`` / ``adam_beta2`` / ``adam_epsilon`` / ``optim_args`` gives the optimizer class and
arguments transformers' Trainer gives, and the same steps; the transformers schedules with
``lr_scheduler_kwargs`` give transformers' multipliers; ``warmup_ratio`` is transformers'
warm-up count; a resume with another optimizer is refused clearly, and one with the same is
exact; config files, overrides and ``--print-config`` carry the keys."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import optimization as hf_opt

from rlhf_fast.trainers.common import (ADAMW_OPTIMS, HF_SCHEDULES, METRIC_SCHEDULES, OPTIMS, SCHEDULES,
                                       make_adamw, make_optimizer, make_scheduler, optimizer_cls_and_kwargs,
                                       read_metrics, supervised_optimizer, supervised_scheduler, warmup_steps_for)
from rlhf_fast.trainers.config import config_yaml, load_config
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records
from tests.test_offline_metrics import sft_tok  # noqa: F401 (a fixture)

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

# (optim, our optim_args, transformers' optim_args text): every optimizer, with arguments where it takes them
CASES = [
    ("adamw_torch", {}, None),
    ("adamw_torch_fused", {}, None),
    ("adafactor", {}, None),
    ("sgd", {"momentum": 0.9, "nesterov": True}, "momentum=0.9,nesterov=True"),
    ("sgd", {"momentum": 0.5, "dampening": 0.1}, "momentum=0.5,dampening=0.1"),
    ("adagrad", {"lr_decay": 0.01, "eps": 1e-9}, "lr_decay=0.01,eps=1e-9"),
    ("rmsprop", {"momentum": 0.5, "alpha": 0.9, "centered": True, "eps": 1e-7},
     "momentum=0.5,alpha=0.9,centered=true,eps=1e-7"),
]


def _theirs(tmp_path, optim, optim_args, *, betas=(0.9, 0.999), eps=1e-8, lr=3e-3):
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), report_to=[], optim=optim,
                                          optim_args=optim_args, learning_rate=lr, adam_beta1=betas[0],
                                          adam_beta2=betas[1], adam_epsilon=eps)
    return transformers.Trainer.get_optimizer_cls_and_kwargs(args)


@pytest.mark.parametrize("optim,ours_args,their_args", CASES)
def test_optimizer_class_and_arguments_are_transformers(tmp_path, optim, ours_args, their_args):
    adam = optim in ADAMW_OPTIMS
    betas, eps = ((0.8, 0.95), 1e-6) if adam else ((0.9, 0.999), 1e-8)  # Adam's keys: the AdamW names only
    ours = optimizer_cls_and_kwargs(optim, lr=3e-3, betas=betas, eps=eps, optim_args=ours_args)
    assert ours == _theirs(tmp_path, optim, their_args, betas=betas, eps=eps)


def test_every_plain_torch_optimizer_of_transformers_is_supported():
    """The transformers names whose optimizer needs no other package are exactly ours."""
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS, _get_adafactor, _get_adagrad, \
        _get_adamw_torch, _get_rmsprop, _get_sgd

    plain = {_get_adafactor, _get_adamw_torch, _get_sgd, _get_adagrad, _get_rmsprop}
    assert {str(k.value) for k, h in _OPTIMIZER_HANDLERS.items() if h in plain} == set(OPTIMS)


class _Net(torch.nn.Module):
    """A matrix (decayed), a bias and a norm gain (not decayed, by either grouping)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(6, 5)
        self.norm = torch.nn.Parameter(torch.ones(5) + 0.1 * torch.randn(5))

    def forward(self, x):
        return ((self.proj(x) * self.norm) ** 2).mean()


def _steps(model, opt, n=4):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(n):
        opt.zero_grad()
        model(x).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("optim,ours_args,their_args", CASES)
def test_steps_equal_the_optimizer_built_by_hand(tmp_path, optim, ours_args, their_args):
    """Four steps with weight decay 0.1 match transformers' optimizer over the Trainer's two
    parameter groups (decay on the matrix, none on bias and norm gain)."""
    betas, eps = ((0.8, 0.95), 1e-6) if optim in ADAMW_OPTIMS else ((0.9, 0.999), 1e-8)
    a = _Net()
    ours = _steps(a, make_optimizer(a.parameters(), lr=3e-2, weight_decay=0.1, optim=optim, betas=betas, eps=eps,
                                    optim_args=ours_args))
    b = _Net()
    cls, kw = _theirs(tmp_path, optim, their_args, betas=betas, eps=eps, lr=3e-2)
    groups = [{"params": [b.proj.weight], "weight_decay": 0.1}, {"params": [b.proj.bias, b.norm], "weight_decay": 0.0}]
    theirs = _steps(b, cls(groups, **kw))
    assert any(not torch.equal(p, q) for p, q in zip(ours, _Net().parameters()))  # it moved
    for p, q in zip(ours, theirs):
        # ours is the fused AdamW kernel where theirs (adamw_torch) is the for-loop one: rounding only
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)


def test_defaults_are_the_fused_adamw_as_before():
    a, b = _Net(), _Net()
    ours = supervised_optimizer(list(a.parameters()), SFTConfig(weight_decay=0.1, lr=3e-2))
    before = make_adamw(list(b.parameters()), 3e-2, 0.1)
    assert type(ours) is torch.optim.AdamW
    assert [{k: v for k, v in g.items() if k != "params"} for g in ours.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in before.param_groups]
    assert ours.param_groups[0]["fused"] is True
    for p, q in zip(_steps(a, ours), _steps(b, before)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_32bit", "galore_adamw", "lion_32bit", "lomo",
                                   "adamw_torch_4bit", "schedule_free_adamw", "nadam"])
def test_optimizers_needing_other_packages_are_refused(optim):
    with pytest.raises(ValueError, match=rf"optim must be one of \('adamw_torch', .*'rmsprop'\), got '{optim}'"):
        SFTConfig(optim=optim)
    with pytest.raises(ValueError, match="optim must be one of"):
        make_optimizer(_Net().parameters(), lr=1e-3, weight_decay=0.0, optim=optim)


@pytest.mark.parametrize("kw,match", [
    (dict(optim="sgd", adam_beta1=0.8), r"adam_beta1 applies to optim adamw_torch / adamw_torch_fused only"),
    (dict(optim="adafactor", adam_epsilon=1e-6), r"adam_epsilon applies to optim adamw_torch"),
    (dict(adam_beta2=1.0), r"adam_beta2 must be a number in \[0, 1\)"),
    (dict(adam_epsilon=0.0), r"adam_epsilon must be a finite number > 0"),
    (dict(optim="sgd", optim_args={"nesterov": True}), r"optim_args \{'nesterov': True\} for optim 'sgd': Nesterov"),
    (dict(optim="sgd", optim_args={"weight_decay": 0.1}), r"optim_args.weight_decay: set the weight_decay key"),
    (dict(optim="rmsprop", optim_args={"beta": 0.1}), r"optim_args.beta: optim 'rmsprop' takes \['alpha'"),
    (dict(optim_args={"momentum": 0.9}), r"optim_args.momentum: optim 'adamw_torch' takes no optim_args"),
    (dict(optim="sgd", optim_args={"momentum": "fast"}), r"optim_args.momentum must be a finite number"),
    (dict(optim="rmsprop", optim_args={"centered": 1}), r"optim_args.centered must be true or false"),
    (dict(optim="adagrad", optim_args={"lr_decay": -1.0}), r"optim_args .* for optim 'adagrad': Invalid lr_decay"),
    (dict(optim="adafactor", distributed={"strategy": "fsdp2"}), r"optim 'adafactor' is not supported with "
                                                                 r"distributed.strategy fsdp2"),
])
def test_bad_optimizer_settings_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        SFTConfig(**kw)


# (schedule, lr_scheduler_kwargs, transformers' own function and its keyword arguments)
HF_CASES = [
    ("constant_with_warmup", {}, hf_opt.get_constant_schedule_with_warmup, {}),
    ("cosine_with_restarts", {"num_cycles": 3}, hf_opt.get_cosine_with_hard_restarts_schedule_with_warmup,
     {"num_cycles": 3}),
    ("polynomial", {"power": 2.0, "lr_end": 1e-4}, hf_opt.get_polynomial_decay_schedule_with_warmup,
     {"power": 2.0, "lr_end": 1e-4}),
    ("inverse_sqrt", {"timescale": 5}, hf_opt.get_inverse_sqrt_schedule, {"timescale": 5}),
    ("cosine_with_min_lr", {"min_lr": 2e-3}, hf_opt.get_cosine_with_min_lr_schedule_with_warmup, {"min_lr": 2e-3}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1, "warmup_lr_rate": 0.2},
     hf_opt.get_cosine_with_min_lr_schedule_with_warmup_lr_rate, {"min_lr_rate": 0.1, "warmup_lr_rate": 0.2}),
    ("warmup_stable_decay", {"num_decay_steps": 6, "decay_type": "1-sqrt", "min_lr_ratio": 0.05},
     hf_opt.get_wsd_schedule, {"num_decay_steps": 6, "decay_type": "1-sqrt", "min_lr_ratio": 0.05}),
]


def _lrs(sched, steps):
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


def _sgd(lr=1e-2):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_the_transformers_schedules_are_all_the_lambda_ones():
    from transformers.trainer_utils import SchedulerType

    names = {str(s.value) for s in SchedulerType}
    assert names == set(SCHEDULES) | set(HF_SCHEDULES) | set(METRIC_SCHEDULES)
    assert [c[0] for c in HF_CASES] == list(HF_SCHEDULES)


@pytest.mark.parametrize("schedule,kwargs,fn,fn_kw", HF_CASES)
def test_transformers_schedules_give_transformers_multipliers(schedule, kwargs, fn, fn_kw):
    """An SFT config's schedule, warm-up from ``warmup_ratio`` (0.15 × 27 → 5 steps), equals
    transformers' function called by hand, at every step and past the end."""
    cfg = SFTConfig(lr=1e-2, max_steps=27, warmup_steps=0, warmup_ratio=0.15, lr_schedule=schedule,
                    lr_scheduler_kwargs=kwargs)
    ours = supervised_scheduler(_sgd(), cfg)
    assert isinstance(ours, torch.optim.lr_scheduler.LambdaLR)
    if fn in (hf_opt.get_inverse_sqrt_schedule, hf_opt.get_constant_schedule_with_warmup):  # no step count
        theirs = fn(_sgd(), num_warmup_steps=5, **fn_kw)
    else:
        theirs = fn(_sgd(), num_warmup_steps=5, num_training_steps=27, **fn_kw)
    a, b = _lrs(ours, 30), _lrs(theirs, 30)
    assert a == b and len(set(a)) > 5


@pytest.mark.parametrize("ratio,steps", [(0.1, 30), (0.07, 100), (0.07, 200), (0.5, 3), (0.01, 7), (0.25, 1),
                                         (0.999, 10)])
def test_warmup_ratio_is_transformers_warmup_count(tmp_path, ratio, steps):
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), report_to=[], warmup_steps=ratio)
    assert warmup_steps_for(0, ratio, steps) == args.get_warmup_steps(steps)
    assert warmup_steps_for(7, 0.0, steps) == 7


@pytest.mark.parametrize("kw,match", [
    (dict(warmup_ratio=0.1), r"warmup_ratio \(0.1\) and warmup_steps \(10\) both set the warm-up"),
    (dict(warmup_steps=0, warmup_ratio=1.0), r"warmup_ratio must be a number in \[0, 1\)"),
    (dict(warmup_steps=0, warmup_ratio=-0.1), r"warmup_ratio must be a number in \[0, 1\)"),
    (dict(lr_schedule="reduce_lr_on_plateau"), r"lr_schedule 'reduce_lr_on_plateau' has no warm-up .*set warmup_steps to 0, got 10"),
    (dict(lr_schedule="greedy"), r"lr_schedule 'greedy' has no warm-up .*set warmup_steps to 0, got 10"),
    (dict(lr_schedule="step"), r"lr_schedule must be one of \('constant', 'linear', 'cosine', 'constant_with_warmup'"),
    (dict(lr_schedule="cosine", lr_scheduler_kwargs={"num_cycles": 2}), r"lr_scheduler_kwargs apply to the "
                                                                         r"transformers schedules"),
    (dict(lr_schedule="polynomial", min_lr_ratio=0.1), r"min_lr_ratio applies to lr_schedule 'linear' / 'cosine'"),
    (dict(lr_schedule="cosine_with_min_lr"), r"lr_scheduler_kwargs \{\} do not fit lr_schedule 'cosine_with_min_lr'"),
    (dict(lr_schedule="polynomial", lr_scheduler_kwargs={"num_cycles": 2}),
     r"unexpected keyword argument 'num_cycles'"),
    (dict(lr_schedule="polynomial", lr_scheduler_kwargs={"lr_end": 1.0}), r"do not fit lr_schedule 'polynomial': "
                                                                           r"lr_end \(1.0\) must be smaller"),
    (dict(lr_scheduler_kwargs=[1]), r"lr_scheduler_kwargs must be a mapping"),
    # from Python, a count or fraction of the wrong type is named too (it once failed inside a comparison)
    (dict(eval_every="2"), r"eval_every must be an int >= 0, got '2'"),
    (dict(max_steps=True), r"max_steps must be an int >= 1, got True"),
    (dict(eval_fraction="0.1"), r"eval_fraction must be a number in \[0, 1\), got '0.1'"),
])
def test_bad_schedule_settings_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        SFTConfig(**kw)


@pytest.mark.parametrize("module,cls", [("sft", "SFTConfig"), ("reward", "RewardConfig"), ("dpo", "DPOConfig"),
                                        ("kto", "KTOConfig")])
def test_every_offline_config_takes_the_keys_from_yaml_and_overrides(tmp_path, module, cls):
    import importlib

    config_cls = getattr(importlib.import_module(f"rlhf_fast.trainers.{module}"), cls)
    path = tmp_path / "c.yaml"
    path.write_text("optim: rmsprop\noptim_args: {momentum: 0.5}\nlr_schedule: warmup_stable_decay\n"
                    "lr_scheduler_kwargs: {num_decay_steps: 20}\nwarmup_steps: 0\n")
    cfg = load_config(config_cls, str(path), ["--optim_args.centered", "true", "--optim_args.eps", "1e-7",
                                              "--warmup_ratio", "0.05", "--lr_scheduler_kwargs.decay_type", "linear"])
    assert cfg.optim == "rmsprop" and cfg.optim_args == {"momentum": 0.5, "centered": True, "eps": 1e-7}
    assert cfg.lr_scheduler_kwargs == {"num_decay_steps": 20, "decay_type": "linear"} and cfg.warmup_ratio == 0.05
    cfg = load_config(config_cls, None, ["--optim", "adamw_torch_fused", "--adam_beta1", "0.85", "--adam_beta2",
                                         "0.98", "--adam_epsilon", "1e-6"])
    assert (cfg.optim, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon) == ("adamw_torch_fused", 0.85, 0.98, 1e-6)
    with pytest.raises(ValueError, match="optim_args.momentum: optim 'adafactor' takes no optim_args"):
        load_config(config_cls, None, ["--optim", "adafactor", "--optim_args.momentum", "0.9"])


def test_print_config_lists_the_keys_beside_their_kin_and_round_trips(tmp_path, capsys):
    from rlhf_fast import cli

    args = ["--optim", "sgd", "--optim_args.momentum", "0.9", "--lr_schedule", "cosine_with_restarts",
            "--lr_scheduler_kwargs.num_cycles", "2", "--warmup_steps", "0", "--warmup_ratio", "0.1"]
    assert cli.main(["sft", "none", *args, "--print-config", "--output_dir", str(tmp_path / "never")]) == 0
    text = capsys.readouterr().out
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")]
    i = keys.index("weight_decay")
    assert keys[i:i + 10] == ["weight_decay", "optim", "adam_beta1", "adam_beta2", "adam_epsilon", "optim_args",
                              "warmup_steps", "warmup_ratio", "lr_schedule", "min_lr_ratio"]
    assert keys[i + 10] == "lr_scheduler_kwargs" and keys[0] == "model"
    (tmp_path / "printed.yaml").write_text(text)
    printed = load_config(SFTConfig, str(tmp_path / "printed.yaml"))
    again = load_config(SFTConfig, None, [*args, "--output_dir", str(tmp_path / "never")])
    assert config_yaml(printed) == config_yaml(again) == text
    assert printed.optim_args == {"momentum": 0.9} and printed.lr_scheduler_kwargs == {"num_cycles": 2}


# ------------------------------------------------------------------ trainers, checkpoints


@pytest.fixture(scope="module")
def tok(sft_tok):
    return sft_tok  # the SFT trainers' tokenizer (test_offline_metrics)


def _cfg(tmp_path, name="run", **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), max_steps=6, batch_size=8, lr=3e-3, warmup_steps=0,
                eval_every=0, log_every=1, max_len=48, device="cpu")
    base.update(kw)
    return SFTConfig(**base)


def test_warmup_ratio_counts_the_steps_num_train_epochs_sets(tmp_path, tok):
    recs = synthetic_sft_records(40)
    tr = SFTTrainer(_cfg(tmp_path, max_steps=100, num_train_epochs=2, warmup_ratio=0.5,
                         lr_schedule="constant_with_warmup"), train_records=recs, eval_records=[], tokenizer=tok)
    steps = tr.cfg.max_steps
    assert steps == 10  # 2 epochs of ceil(40 / 8) batches, not 100
    lam = tr.scheduler.lr_lambdas[0]
    assert [lam(s) for s in range(7)] == [s / 5 for s in range(5)] + [1.0, 1.0]  # 5 steps: ceil(0.5 × 10)


def _run(tmp_path, name, tok, recs, stop_at=None, **kw):
    """6 steps of SFT, checkpointing every 3; ``stop_at``: stop there and continue in a new trainer."""
    cfg = _cfg(tmp_path, name, save_every=3, **kw)
    t = SFTTrainer(cfg, train_records=recs, eval_records=[], tokenizer=tok)
    if stop_at is not None:
        while t.step < stop_at:
            t.train_step()
        t._save()
        t = SFTTrainer(_cfg(tmp_path, name, save_every=3, **kw), train_records=recs, eval_records=[], tokenizer=tok)
    t.train()
    return t, [p.detach().clone() for p in t.model.parameters()], read_metrics(cfg.output_dir)


@pytest.mark.parametrize("kw", [
    dict(optim="adafactor", weight_decay=0.01, lr_schedule="cosine_with_restarts",
         lr_scheduler_kwargs={"num_cycles": 2}, warmup_ratio=0.34),
    dict(optim="rmsprop", optim_args={"momentum": 0.5, "centered": True}, lr_schedule="polynomial",
         lr_scheduler_kwargs={"power": 2.0}),
])
def test_resume_with_another_optimizer_and_schedule_is_exact(tmp_path, tok, kw):
    recs = synthetic_sft_records(40)
    full, p_full, m_full = _run(tmp_path, "full", tok, recs, **kw)
    assert type(full.optimizer).__name__ == {"adafactor": "Adafactor", "rmsprop": "RMSprop"}[kw["optim"]]
    _, p_res, m_res = _run(tmp_path, "resumed", tok, recs, stop_at=3, **kw)
    for a, b in zip(p_full, p_res):
        assert torch.equal(a, b)
    after = [(m["step"], m["loss"], m["lr"]) for m in m_full if m["step"] > 3]
    assert after == [(m["step"], m["loss"], m["lr"]) for m in m_res] and len(after) == 3
    assert len({m["lr"] for m in m_full}) > 3  # the schedule moved


@pytest.mark.parametrize("first,then", [({}, dict(optim="adafactor")),  # an (untagged) AdamW state into Adafactor
                                        (dict(optim="adafactor"), dict(optim="sgd")),
                                        (dict(optim="sgd"), dict(optim="adamw_torch_fused"))])
def test_resume_with_a_different_optimizer_is_a_clear_error(tmp_path, tok, first, then):
    recs = synthetic_sft_records(16)
    SFTTrainer(_cfg(tmp_path, max_steps=2, save_every=1, **first), train_records=recs, eval_records=[],
               tokenizer=tok).train()
    log = read_metrics(str(tmp_path / "run"))
    was = first.get("optim", "adamw_torch")
    with pytest.raises(ValueError, match=rf"cannot restore optimizer .*the saved optimizer state is from optim "
                                         rf"'{was}', but this run's optim is '{then['optim']}': resume with optim "
                                         rf"'{was}'"):
        SFTTrainer(_cfg(tmp_path, max_steps=3, **then), train_records=recs, eval_records=[], tokenizer=tok).train()
    assert read_metrics(str(tmp_path / "run")) == log
    # AdamW under either of its names resumes the other's state
    if was == "adamw_torch":
        other = dict(optim="adamw_torch_fused")
        SFTTrainer(_cfg(tmp_path, max_steps=3, **other), train_records=recs, eval_records=[], tokenizer=tok).train()
        assert read_metrics(str(tmp_path / "run"))[-1]["step"] == 3


def test_adafactor_refuses_fsdp2_shards(tmp_path):
    """DTensor parameters (what FSDP2 leaves each rank) and a non-elementwise update: refused."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="optim 'adafactor' cannot step FSDP2-sharded parameters"):
            make_optimizer([p], lr=1e-3, weight_decay=0.0, optim="adafactor")
        assert type(make_optimizer([p], lr=1e-3, weight_decay=0.0, optim="rmsprop")).__name__ == "RMSprop"
    finally:
        dist.destroy_process_group()


def test_rl_optimizers_and_schedules(tmp_path):
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import OptimConfig
    from tests.test_rl_learning import PROMPTS, make_config, make_policy

    optim = OptimConfig(lr=1e-3, critic_lr=1e-2, name="rmsprop", optim_args={"momentum": 0.5},
                        schedule="polynomial", lr_scheduler_kwargs={"power": 2.0, "lr_end": 1e-5}, warmup_ratio=0.25)
    cfg = make_config(tmp_path, "gae", steps=2, optim=optim)
    tr = RLTrainer(cfg, *make_policy(), reward_fns=[lambda p, c: [0.0] * len(c)], prompts=PROMPTS)
    total = 2 * cfg.ppo.epochs * (cfg.batch_size // cfg.ppo.mini_batch_size)
    for opt, sched, lr in ((tr.optimizer, tr.scheduler, 1e-3), (tr.critic_optimizer, tr.critic_scheduler, 1e-2)):
        assert type(opt) is torch.optim.RMSprop and opt.param_groups[0]["momentum"] == 0.5
        theirs = hf_opt.get_polynomial_decay_schedule_with_warmup(_sgd(lr), -(-total // 4), total, power=2.0,
                                                                 lr_end=1e-5)
        assert [sched.lr_lambdas[0](s) for s in range(total + 1)] == \
            [theirs.lr_lambdas[0](s) for s in range(total + 1)]
    tr.train()
    assert tr.global_step == 2
    for kw, match in ((dict(name="adamw_8bit"), r"optim.name must be one of"),
                      (dict(name="sgd", adam_beta2=0.9), r"optim.adam_beta2 applies to optim.name adamw_torch"),
                      (dict(warmup_steps=2, warmup_ratio=0.1), r"optim.warmup_ratio \(0.1\) and optim.warmup_steps"),
                      (dict(schedule="reduce_lr_on_plateau"), r"optim.schedule 'reduce_lr_on_plateau' steps on a"),
                      (dict(schedule="cosine_with_min_lr"),
                       r"optim.lr_scheduler_kwargs \{\} do not fit optim.schedule"),
                      (dict(optim_args={"momentum": 0.9}), r"optim.optim_args.momentum: optim 'adamw_torch' takes")):
        with pytest.raises(ValueError, match=match):
            OptimConfig(**kw)
    cfg = load_config(type(cfg), None, ["--optim.name", "adagrad", "--optim.optim_args.lr_decay", "0.1",
                                        "--optim.schedule", "inverse_sqrt", "--optim.lr_scheduler_kwargs.timescale",
                                        "7"])
    assert cfg.optim.optim_args == {"lr_decay": 0.1} and cfg.optim.lr_scheduler_kwargs == {"timescale": 7}


def test_make_scheduler_keeps_our_schedules():
    """Ours stay ours (lr_lambda: the warm-up's first step is 1/warmup, not 0 as transformers')."""
    s = make_scheduler(_sgd(), warmup_steps=4, total_steps=10, kind="cosine")
    assert s.lr_lambdas[0](0) == 0.25
    t = make_scheduler(_sgd(), warmup_steps=4, total_steps=10, kind="constant_with_warmup")
    assert t.lr_lambdas[0](0) == 0.0 and t.lr_lambdas[0](4) == 1.0
    with pytest.raises(ValueError, match="min_ratio applies"):
        make_scheduler(_sgd(), total_steps=10, kind="polynomial", min_ratio=0.1)
