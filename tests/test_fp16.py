"""``fp16`` (transformers' / TRL's ``fp16=True``): float16 autocast, fp32 weights, a dynamic loss
scale (rlhf_fast.trainers.mixed_precision.LossScaler).

The scaler logic is checked against torch's GradScaler driven by hand the way transformers'
Trainer and accelerate drive it (scale, unscale before clipping, step or skip, the LR scheduler
stepped only when the optimizer step was not skipped). fp16 applies on CUDA only, a no-op on
the CPU (as accelerate, as our bf16): the default and the CPU runs are bit-for-bit those without
the key. The CUDA path runs here on the CPU by adding "cpu" to FP16_DEVICES (torch's CPU autocast
takes float16 and GradScaler("cpu") works): SFT, DPO, GRPO and PPO (critic) steps stay close to
fp32's, an inf gradient skips its step and its scheduler step, and resume is exact with the
scaler's state. ``-m cuda`` tests run the real GPU path."""

import contextlib
import math

import pytest
import torch

import rlhf_fast.models.logprobs as logprobs
from rlhf_fast.distributed import DistributedConfig
from rlhf_fast.trainers import mixed_precision as mp
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
from rlhf_fast.trainers.kto import KTOConfig
from rlhf_fast.trainers.mixed_precision import LossScaler
from rlhf_fast.trainers.reward import RewardConfig, synthetic_preference_records
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import PPOConfig, RLConfig, RolloutConfig
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records
from tests.test_reward import preference_tokenizer
from tests.test_rl_learning import PROMPTS, make_config, make_policy
from tests.test_trainer_common import untimed_metrics

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"
INF = float("inf")

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture
def cpu_fp16():
    """The CUDA fp16 path (autocast float16 + GradScaler) on the CPU."""
    with mp.fp16_devices("cpu"):
        yield


@pytest.fixture(scope="module")
def tok():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(64) + [r.prompt + r.completion for r in synthetic_sft_records(64)], 300,
                           padding_side="right")


@pytest.fixture(scope="module")
def ptok():
    return preference_tokenizer()


@pytest.fixture
def autocast_seen(monkeypatch):
    """The CPU autocast dtype (None: off) at each sequence_logprobs / policy_loss call."""
    seen = []

    def spy(fn):
        def wrapped(*a, **k):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return fn(*a, **k)
        return wrapped

    for name in ("sequence_logprobs", "policy_loss"):
        monkeypatch.setattr(logprobs, name, spy(getattr(logprobs, name)))
    return seen


def _steps(trainer):
    """The training steps' records of ``trainer``'s metrics.jsonl."""
    return [m for m in read_metrics(trainer.run.path) if "loss" in m]


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _plant_inf(model, trainer, steps, attr="step"):
    """Make the gradient of ``model``'s first parameter inf in the backwards of the optimizer steps
    ``steps`` (counted by ``trainer.<attr>`` before the step)."""
    p = next(model.parameters())
    return p.register_hook(lambda g: g + INF if getattr(trainer, attr) in steps else g)


# ----------------------------------------------------------------------------- the scaler vs torch's, by hand


def _linear(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return m, opt, sched


def _loss(m, k, bad):
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
    loss = ((m(x) - y) ** 2).mean()
    return loss * INF if k in bad else loss  # a planted overflow: inf / nan gradients


def test_loss_scaler_equals_torch_gradscaler_driven_as_transformers(cpu_fp16):
    bad = {2, 3, 6}
    a, opt_a, sched_a = _linear()
    ours = LossScaler(True, "cpu")
    b, opt_b, sched_b = _linear()
    ref = torch.amp.GradScaler("cpu")
    for k in range(8):
        ours.scale(_loss(a, k, bad)).backward()
        gn_a = float(ours.clip_grad_norm_(opt_a, a.parameters(), 1.0))
        stepped = ours.step(opt_a)
        if stepped:
            sched_a.step()
        opt_a.zero_grad(set_to_none=True)
        # transformers' Trainer: accelerator.backward (scaler.scale(loss).backward()), clip_grad_norm_
        # (unscale_gradients, then torch's clip), optimizer.step (AcceleratedOptimizer.step: scaler.step +
        # update, the skip seen as the patched optimizer.step not called), and
        # `if not accelerator.optimizer_step_was_skipped: lr_scheduler.step()`
        ref.scale(_loss(b, k, bad)).backward()
        ref.unscale_(opt_b)
        gn_b = float(torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0))
        called, orig = [], opt_b.step  # (accelerate's patch_optimizer_step)
        opt_b.step = lambda *x, **kw: (called.append(1), orig(*x, **kw))[1]
        ref.step(opt_b)
        ref.update()
        del opt_b.step
        if called:
            sched_b.step()
        opt_b.zero_grad(set_to_none=True)
        assert stepped == bool(called) == (k not in bad), k
        assert ours.get_scale() == ref.get_scale() == 65536.0 / 2 ** sum(j <= k for j in bad)
        assert (math.isfinite(gn_a), math.isfinite(gn_b)) == (k not in bad,) * 2
        if k not in bad:
            assert gn_a == gn_b
        assert sched_a.last_epoch == sched_b.last_epoch == sum(j not in bad for j in range(k + 1))
        for x, y in zip(a.parameters(), b.parameters()):
            assert torch.equal(x, y)
    assert ours.state_dict() == ref.state_dict()


def test_grad_norm_is_the_unscaled_gradients(cpu_fp16):
    """A power-of-two scale and its inverse are exact: the norm, and the step, equal fp32's bit for bit."""
    a, opt_a, _ = _linear()
    b, opt_b, _ = _linear()
    ours, plain = LossScaler(True, "cpu"), LossScaler(False, "cpu")
    for k in range(3):
        ours.scale(_loss(a, k, ())).backward()
        plain.scale(_loss(b, k, ())).backward()
        assert float(ours.clip_grad_norm_(opt_a, a.parameters(), 0.5)) == \
            float(torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5))
        assert ours.step(opt_a) and plain.step(opt_b)
        opt_a.zero_grad(), opt_b.zero_grad()
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)
    assert ours.metrics() == {"loss_scale": 65536.0} and plain.metrics() == {}


def test_an_unscaled_backward_is_refused(cpu_fp16):
    a, opt, _ = _linear()
    s = LossScaler(True, "cpu")
    _loss(a, 0, ()).backward()
    with pytest.raises(RuntimeError, match="LossScaler.scale"):
        s.step(opt)
    assert not LossScaler(True, "meta").enabled  # a device type not in FP16_DEVICES: off


def test_scaler_state_load_checks_and_warns(cpu_fp16):
    s = LossScaler(True, "cpu")
    with pytest.warns(RuntimeWarning, match="starts afresh"):
        s.load_state_dict(None, "ck")
    with pytest.raises(ValueError, match="ck: the fp16 loss-scaler state"):
        s.load_state_dict({"scale": -1.0}, "ck")
    state = {"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
             "_growth_tracker": 7}
    s.load_state_dict(state, "ck")
    assert s.state_dict() == state
    with pytest.warns(RuntimeWarning, match="dropped"):
        LossScaler(False, "cpu").load_state_dict(state, "ck")


# ----------------------------------------------------------------------------- configs


OFFLINE = [SFTConfig, RewardConfig, DPOConfig, KTOConfig]


@pytest.mark.parametrize("cls", OFFLINE)
def test_offline_config_keys(cls):
    assert cls().bf16 is True and cls().fp16 is False  # the defaults, as before
    c = cls(fp16=True)
    assert c.fp16 is True and c.bf16 is False  # TRL: bf16 defaults to `not fp16`
    assert cls(bf16=False).bf16 is False
    with pytest.raises(ValueError, match="fp16 must be true or false"):
        cls(fp16="yes")
    with pytest.raises(ValueError, match="bf16 must be true or false"):
        cls(bf16=1)
    with pytest.raises(ValueError, match="fp16 and bf16 cannot both be true"):
        cls(fp16=True, bf16=True)
    with pytest.raises(ValueError, match="distributed.mixed_precision: false"):
        cls(fp16=True, distributed={"strategy": "fsdp2"})
    assert cls(fp16=True, distributed={"strategy": "fsdp2", "mixed_precision": False}).fp16
    assert cls(fp16=True, distributed={"strategy": "ddp"}).fp16


def test_rl_config_keys():
    assert RLConfig().fp16 is False and RLConfig(fp16=True).fp16
    with pytest.raises(ValueError, match="fp16 must be true or false"):
        RLConfig(fp16="yes")
    with pytest.raises(ValueError, match="fp16 and bf16 cannot both be true"):
        RLConfig(fp16=True, bf16=True)
    with pytest.raises(ValueError, match="distributed.mixed_precision: false"):
        RLConfig(fp16=True, distributed=DistributedConfig(strategy="fsdp2"))
    assert RLConfig(fp16=True, distributed=DistributedConfig(strategy="fsdp2", mixed_precision=False)).fp16
    with pytest.raises(ValueError, match="fp16 is not supported with ppo.trpo"):
        RLConfig(fp16=True, estimator="gae", ppo=PPOConfig(trpo=True))


# ----------------------------------------------------------------------------- SFT


def _sft(tmp_path, tok, name, records=None, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), max_steps=3, batch_size=8, lr=3e-3, warmup_steps=2,
                eval_every=0, log_every=1, max_len=48, device="cpu", bf16=False)
    base.update(kw)
    recs = synthetic_sft_records(40) if records is None else records
    return SFTTrainer(SFTConfig(**base), train_records=recs, eval_records=[], tokenizer=tok)


def test_sft_fp16_on_the_cpu_changes_nothing(tmp_path, tok, autocast_seen):
    a = _sft(tmp_path, tok, "fp32")
    a.train()
    b = _sft(tmp_path, tok, "fp16", fp16=True)
    b.train()
    assert not b.scaler.enabled and set(autocast_seen) == {None}
    assert untimed_metrics(a.run.path) == untimed_metrics(b.run.path)
    assert "loss_scale" not in read_metrics(b.run.path)[-1]
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(x, y)


def test_sft_fp16_trains_close_to_fp32(tmp_path, tok, cpu_fp16, autocast_seen):
    a = _sft(tmp_path, tok, "fp32")
    a.train()
    assert set(autocast_seen) == {None}
    autocast_seen.clear()
    b = _sft(tmp_path, tok, "fp16", fp16=True)
    b.train()
    assert autocast_seen and set(autocast_seen) == {torch.float16}
    assert all(p.dtype == torch.float32 for p in b.model.parameters())
    ma, mb = _steps(a), _steps(b)
    assert [m["loss_scale"] for m in mb] == [65536.0] * 3
    for x, y in zip(ma, mb):
        assert y["loss"] == pytest.approx(x["loss"], rel=5e-3) and y["loss"] != x["loss"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=2e-2)
        assert y["lr"] == x["lr"]
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=2e-3)


def test_sft_overflow_skips_the_step_and_the_scheduler(tmp_path, tok, cpu_fp16):
    tr = _sft(tmp_path, tok, "skip", fp16=True, warmup_steps=4, max_steps=6)  # the LR moves every step
    _plant_inf(tr.model, tr, {1})
    m0 = tr.train_step()
    w0, opt_steps = _weights(tr.model), tr.optimizer.state[next(tr.model.parameters())]["step"].clone()
    m1 = tr.train_step()
    assert math.isfinite(m0["grad_norm"]) and not math.isfinite(m1["grad_norm"])
    assert (m0["loss_scale"], m1["loss_scale"]) == (65536.0, 32768.0)
    # the logged lr is the one a step trained with: the skipped step's is the next step's too
    assert m1["lr"] != m0["lr"] and tr.scheduler.last_epoch == 1  # transformers: no scheduler step on a skip
    assert tr.step == 2  # the step still counts (global_step)
    assert all(torch.equal(x, y) for x, y in zip(w0, tr.model.parameters()))
    assert torch.equal(tr.optimizer.state[next(tr.model.parameters())]["step"], opt_steps)
    m2 = tr.train_step()
    assert math.isfinite(m2["grad_norm"]) and m2["loss_scale"] == 32768.0 and m2["lr"] == m1["lr"]


def _resumable(tmp_path, tok, name, stop, hook=True, **kw):
    """4 fp16 SFT steps with an overflow at the first, straight or stopped after ``stop`` and resumed."""
    recs = synthetic_sft_records(40)
    tr = _sft(tmp_path, tok, name, recs, max_steps=4, save_every=2, **kw)
    if hook:
        _plant_inf(tr.model, tr, {0})
    if stop:
        while tr.step < stop:
            tr.train_step()
        tr._save()
        tr = _sft(tmp_path, tok, name, recs, max_steps=4, save_every=2, **kw)
    tr.train()
    return tr


def test_sft_resume_is_exact_with_the_scaler_state(tmp_path, tok, cpu_fp16):
    full = _resumable(tmp_path, tok, "full", 0, fp16=True)
    res = _resumable(tmp_path, tok, "res", 2, fp16=True)
    mf, mr = untimed_metrics(full.run.path), untimed_metrics(res.run.path)
    assert [m["loss_scale"] for m in mf] == [32768.0] * 4 and not math.isfinite(float(mf[0]["grad_norm"]))
    assert [m for m in mf if m["step"] > 2] == mr  # (the steps before the stop were not logged)
    for x, y in zip(full.model.parameters(), res.model.parameters()):
        assert torch.equal(x, y)


def test_sft_resume_across_precisions_warns(tmp_path, tok, cpu_fp16):
    recs = synthetic_sft_records(40)
    tr = _sft(tmp_path, tok, "a", recs, max_steps=1)
    tr.train()
    with pytest.warns(RuntimeWarning, match="without fp16 loss scaling"):
        tr = _sft(tmp_path, tok, "a", recs, max_steps=2, fp16=True)
        tr.train()
    assert read_metrics(tr.run.path)[-1]["loss_scale"] == 65536.0
    with pytest.warns(RuntimeWarning, match="loss scale is dropped"):
        _sft(tmp_path, tok, "a", recs, max_steps=3).train()


# ----------------------------------------------------------------------------- DPO


def _dpo(tmp_path, tok, name, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), batch_size=8, lr=3e-3, warmup_steps=1, eval_every=0,
                log_every=1, max_len=48, max_steps=2, device="cpu", bf16=False)
    base.update(kw)
    return DPOTrainer(DPOConfig(**base), train_records=synthetic_preference_records(32, seed=1), eval_records=[],
                      tokenizer=tok)


def test_dpo_fp16_trains_close_to_fp32(tmp_path, ptok, cpu_fp16, autocast_seen):
    a = _dpo(tmp_path, ptok, "fp32")
    a.train()
    autocast_seen.clear()
    b = _dpo(tmp_path, ptok, "fp16", fp16=True)
    b.train()
    assert autocast_seen and set(autocast_seen) == {torch.float16}
    ma, mb = _steps(a), _steps(b)
    assert [m["loss_scale"] for m in mb] == [65536.0, 65536.0]
    for x, y in zip(ma, mb):
        for k in ("loss", "rewards/margin", "logps/chosen"):
            assert y[k] == pytest.approx(x[k], rel=2e-2, abs=2e-3), k
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=5e-2)


def _offline(cls, trainer_cls, tmp_path, tok, name, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), batch_size=8, lr=3e-3, warmup_steps=1, eval_every=0,
                log_every=1, max_len=48, max_steps=2, device="cpu", bf16=False)
    base.update(kw)
    tr = trainer_cls(cls(**base), train_records=synthetic_preference_records(32, seed=1), eval_records=[],
                     tokenizer=tok)
    tr.train()
    return _steps(tr)


@pytest.mark.parametrize("kind", ["kto", "reward"])
def test_kto_and_reward_fp16_train_close_to_fp32(tmp_path, ptok, kind, cpu_fp16, autocast_seen):
    from rlhf_fast.trainers.kto import KTOTrainer
    from rlhf_fast.trainers.reward import RewardTrainer

    cls, trainer_cls = {"kto": (KTOConfig, KTOTrainer), "reward": (RewardConfig, RewardTrainer)}[kind]
    ma = _offline(cls, trainer_cls, tmp_path, ptok, "fp32")
    mb = _offline(cls, trainer_cls, tmp_path, ptok, "fp16", fp16=True)
    assert [m["loss_scale"] for m in mb] == [65536.0, 65536.0] and "loss_scale" not in ma[0]
    assert torch.float16 in autocast_seen or kind == "reward"  # (the reward model does not use sequence_logprobs)
    for x, y in zip(ma, mb):
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-2, abs=2e-3)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=5e-2) and y["grad_norm"] != x["grad_norm"]


# ----------------------------------------------------------------------------- RL (GRPO, PPO with a critic)


def n_chars(prompts, completions):
    return [float(len(c)) for c in completions]


def _rl(tmp_path, estimator, name, steps=2, **kw):
    torch.manual_seed(0)
    pol, tok = make_policy()
    cfg = make_config(tmp_path / name, estimator, steps=steps,
                      rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5), **kw)
    return RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)


@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_rl_fp16_trains_close_to_fp32(tmp_path, estimator, cpu_fp16, autocast_seen):
    ma = _rl(tmp_path, estimator, "fp32").train()
    autocast_seen.clear()
    tr = _rl(tmp_path, estimator, "fp16", fp16=True)
    mb = tr.train()
    assert autocast_seen and set(autocast_seen) == {torch.float16}
    assert all(p.dtype == torch.float32 for p in tr.policy.parameters())
    keys = ["policy/loss", "policy/kl", "entropy"] + (["value/loss"] if estimator == "gae" else [])
    for y in mb:
        assert y["policy/loss_scale"] == 65536.0
        assert ("value/loss_scale" in y) == (estimator == "gae")
        assert all(math.isfinite(y[k]) for k in keys + ["policy/grad_norm"]), y
    # the same answers at the first step (generation is not autocast), scored and trained under
    # fp16 autocast: close to fp32's numbers (later steps sample from weights that differ a little)
    assert ma[0]["reward/total"] == mb[0]["reward/total"]
    for k in keys + ["policy/grad_norm"]:
        assert mb[0][k] == pytest.approx(ma[0][k], rel=0.05, abs=0.02), k
    # (the fused LM head computes in its inputs' dtypes under autocast, as the Triton kernel and
    # fused_linear_divergence: fp32 weights and hidden states give fp32 logits, so the CPU
    # numbers may equal fp32's; the autocast regions are checked above)


def test_rl_overflow_skips_and_resume_keeps_the_scales(tmp_path, cpu_fp16):
    tr = _rl(tmp_path, "gae", "run", steps=1, fp16=True, save_every=1,
             ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8, max_grad_norm=1.0))
    _plant_inf(tr.policy, tr, {0}, attr="global_step")
    lr0 = tr.scheduler.get_last_lr()[0]
    w0 = _weights(tr.policy)
    m = tr.train()[0]
    assert not math.isfinite(m["policy/grad_norm"]) and m["policy/loss_scale"] == 32768.0
    assert all(torch.equal(x, y) for x, y in zip(w0, tr.policy.parameters()))
    assert tr.scheduler.last_epoch == 0 and tr.scheduler.get_last_lr()[0] == lr0
    # the critic has its own scaler (its value loss, ~10 here, overflows fp16 at 2**16 on its own)
    assert tr.critic_scheduler.last_epoch == int(m["value/loss_scale"] == 65536.0)
    again = _rl(tmp_path, "gae", "again", steps=2, fp16=True,
                ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8, max_grad_norm=1.0))
    again.load(str(tmp_path / "run" / "run"))
    assert again.scaler.get_scale() == 32768.0 and again.critic_scaler.get_scale() == m["value/loss_scale"]
    assert again.scaler.state_dict() == tr.scaler.state_dict()
    assert again.critic_scaler.state_dict() == tr.critic_scaler.state_dict()


def test_rl_fp16_on_the_cpu_changes_nothing(tmp_path):
    a = _rl(tmp_path, "grpo", "fp32").train()
    tr = _rl(tmp_path, "grpo", "fp16", fp16=True)
    b = tr.train()
    untimed = [{k: v for k, v in m.items() if not k.startswith("time/") and k != "tokens_per_second"} for m in a]
    assert untimed == [{k: v for k, v in m.items() if not k.startswith("time/") and k != "tokens_per_second"}
                       for m in b]
    assert not tr.scaler.enabled


def _online_dpo(tmp_path):
    from tests import test_online_dpo as t

    return t.trainer(tmp_path, fp16=True), contextlib.nullcontext()


def _distill(tmp_path):
    from tests import test_distill as t

    # (the divergence op computes in its inputs' dtypes inside the autocast region, C++ kernel included)
    return t.trainer(tmp_path, fp16=True), contextlib.nullcontext()


@pytest.mark.parametrize("build", [_online_dpo, _distill], ids=["online_dpo", "distill"])
def test_subclass_backwards_are_scaled(tmp_path, build, cpu_fp16):
    """Online DPO and distillation run their own policy_backward through RLTrainer.update: under
    fp16 each scales its loss and trains with a loss scale (a bare backward() would make
    LossScaler refuse the step rather than divide an unscaled gradient by 2**16)."""
    tr, backend = build(tmp_path)
    with backend:
        hist = tr.train()
    for m in hist:
        assert m["policy/loss_scale"] > 0 and math.isfinite(m["loss"])


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_sft_fp16_on_cuda(tmp_path, tok, autocast_seen):
    tr = _sft(tmp_path, tok, "cuda", fp16=True, device="cuda")
    tr.train()
    assert tr.scaler.enabled and all(p.dtype == torch.float32 for p in tr.model.parameters())
    m = _steps(tr)
    assert all(r["loss_scale"] > 0 and math.isfinite(r["loss"]) for r in m)
    ref = _sft(tmp_path, tok, "cuda32", device="cuda")
    ref.train()
    for x, y in zip(_steps(ref), m):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-2)


@pytest.mark.cuda
def test_grpo_fp16_on_cuda(tmp_path):
    tr = _rl(tmp_path, "gae", "cuda", fp16=True, device="cuda")
    assert tr.scaler.enabled and tr.critic_scaler.enabled
    for m in tr.train():
        assert m["policy/loss_scale"] > 0 and math.isfinite(m["policy/loss"])
