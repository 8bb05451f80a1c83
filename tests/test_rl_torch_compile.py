"""transformers' ``torch_compile`` / ``torch_compile_backend`` / ``torch_compile_mode`` in the RL
trainers (top-level RLConfig keys, as TRL's GRPOConfig inherits them from TrainingArguments):
the keys follow the offline trainers' rules and refuse what compile cannot run with (FSDP2,
``ppo.prefix_sharing``) by name; one GRPO step (with a reference) and one PPO step (with a
critic) with the backbones compiled (``aot_eager``) give the uncompiled step's metrics and
policy / critic gradients, and the policy, reference and critic backbones really ran compiled
(dynamo's counters); a LoRA policy (its adapter-disabled reference shares the backbone), a
distillation teacher and SDFT's EMA teacher too; generation stays eager (no graph compiled by
two rollouts of other lengths); checkpoints have no ``_orig_mod.`` keys and a run resumes across
compile on / off with the saved weights bit for bit."""

import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from rlhf_fast.distributed import DistributedConfig
from rlhf_fast.models.logprobs import backbone
from rlhf_fast.trainers.checkpoint import latest_checkpoint
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.compile import compiled
from rlhf_fast.trainers.config import load_config
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import KLConfig, OptimConfig, PPOConfig, RLConfig, RolloutConfig
from tests.test_rl_learning import TEXTS, frac_a

pytestmark = pytest.mark.usefixtures("one_thread")

AOT = {"torch_compile_backend": "aot_eager"}
# of different lengths: left padding, so a forward that ignored the attention mask would show
PROMPTS = ["q: a b c d", "x", "0 1 2", "a b", "x y z w v u", "q:"]
TIMINGS = ("time/", "tokens_per", "step_time")  # metrics that are wall-clock measurements


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and counts its own graphs (dynamo's state is per process)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _policy(family="llama"):
    """A 1-layer, hidden-32 model (one layer: less for dynamo to trace) and a 48-token tokenizer."""
    from rlhf_fast.models.tiny import tiny_causal_lm, train_tokenizer

    tok = train_tokenizer(TEXTS, 48)
    pol = tiny_causal_lm(len(tok), family=family, hidden_size=32, num_layers=1, num_heads=2, seed=0,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return pol, tok


def _config(tmp_path, name, estimator="grpo", compile_kw=None, **kw):
    base = dict(estimator=estimator, steps=1, output_dir=str(tmp_path / name), progress=False, sample_every=0,
                rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5),
                ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=4),
                optim=OptimConfig(lr=5e-3, critic_lr=1e-2), kl=KLConfig(coef=0.05, placement="loss"))
    base.update(kw)
    return RLConfig(**base, **(compile_kw or {}))


def _trainer(tmp_path, name, compile_kw=None, family="llama", **kw):
    pol, tok = _policy(family)
    return RLTrainer(_config(tmp_path, name, compile_kw=compile_kw, **kw), pol, tok, reward_fns=[frac_a],
                     prompts=PROMPTS)


def _step(tr):
    """(metrics, policy gradients, critic gradients) of one step, the gradients read as each
    optimizer is about to step."""
    got = {}

    def hook(key, model):
        def read(opt, args, kwargs):
            got[key] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return read

    handles = [tr.optimizer.register_step_pre_hook(hook("policy", tr.policy))]
    if tr.critic_optimizer is not None:
        handles.append(tr.critic_optimizer.register_step_pre_hook(hook("critic", tr.critic)))
    m = tr.step()
    for h in handles:
        h.remove()
    return m, got.get("policy"), got.get("critic")


def _same_rows(got, want, where):
    """Every metric of ``want`` but the timings is in ``got``, equal up to float rounding."""
    keys = [k for k in want if not k.startswith(TIMINGS)]
    assert len(keys) > 5 and set(keys) <= set(got), where
    for k in keys:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6, nan_ok=True), (where, k)


def _same_step(tmp_path, estimator, **kw):
    """One step uncompiled and one with every backbone compiled (aot_eager): equal metrics and
    gradients; returns the compiled trainer."""
    plain = _trainer(tmp_path, "plain", estimator=estimator, **kw)
    assert not plain.config.torch_compile and not compiled(backbone(plain.policy))
    m0, g0, c0 = _step(plain)
    assert _graphs() == 0
    comp = _trainer(tmp_path, "compiled", AOT, estimator=estimator, **kw)
    assert comp.config.torch_compile and comp.config.torch_compile_backend == "aot_eager"
    m1, g1, c1 = _step(comp)
    assert _graphs() >= 1  # the backbones ran through dynamo
    _same_rows(m1, m0, estimator)
    assert g0 and (c0 is not None) == (estimator == "gae")  # the hooks read the gradients
    for a, b in ((g0, g1), (c0, c1)):
        assert (a is None) == (b is None) and len(a or ()) == len(b or ())
        for x, y in zip(a or (), b or ()):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)
    return comp


# ------------------------------------------------------------------ the keys


def test_keys_follow_transformers_rules_and_what_cannot_run_is_refused():
    d = RLConfig()
    assert (d.torch_compile, d.torch_compile_backend, d.torch_compile_mode) == (False, None, None)
    assert RLConfig(torch_compile=True).torch_compile_backend == "inductor"
    c = RLConfig(torch_compile_mode="max-autotune")
    assert c.torch_compile and c.torch_compile_backend == "inductor"
    c = load_config(RLConfig, None, ["--torch_compile_backend", "aot_eager"])
    assert c.torch_compile and c.torch_compile_backend == "aot_eager" and c.torch_compile_mode is None
    for kw, key in ((dict(torch_compile_backend="nope"), "torch_compile_backend"),
                    (dict(torch_compile_mode="fastest"), "torch_compile_mode"),
                    (dict(torch_compile_backend="aot_eager", torch_compile_mode="max-autotune"), "torch_compile_mode"),
                    (dict(torch_compile="yes"), "torch_compile"),
                    (dict(torch_compile=True, distributed=DistributedConfig(strategy="fsdp2")), "fsdp2"),
                    (dict(torch_compile=True, ppo=PPOConfig(prefix_sharing=True, mini_batch_size=8,
                                                            micro_batch_size=8)), "ppo.prefix_sharing")):
        with pytest.raises(ValueError, match=key):
            RLConfig(**kw)
    # the same settings without compile stay accepted
    RLConfig(ppo=PPOConfig(prefix_sharing=True, mini_batch_size=8, micro_batch_size=8))


# ------------------------------------------------------------------ steps


def test_grpo_step_compiled_equals_uncompiled(tmp_path):
    tr = _same_step(tmp_path, "grpo")
    assert compiled(backbone(tr.policy)) and compiled(backbone(tr.reference))
    assert tr.reference is not tr.policy and backbone(tr.reference) is not backbone(tr.policy)
    # generation stays eager: two rollouts of other prompts and lengths compile nothing more
    n = _graphs()
    from rlhf_fast.rollout import SamplingParams

    tr.engine.generate(["q: a b", "0 1 2 3"], SamplingParams(n=2, max_new_tokens=7, seed=1))
    tr.engine.generate(["x"], SamplingParams(n=3, max_new_tokens=3, seed=2))
    assert _graphs() == n
    assert compiled(backbone(tr.policy))  # (and the trainer's own forwards are still compiled)


def test_lora_grpo_step_compiled_equals_uncompiled(tmp_path):
    """A LoRA policy: its reference (the adapters disabled) shares the compiled backbone."""
    from rlhf_fast.trainers.rl_config import ModelConfig

    tr = _same_step(tmp_path, "grpo", model=ModelConfig(lora={"r": 4}))
    assert compiled(backbone(tr.policy)) and backbone(tr.reference) is backbone(tr.policy)


def test_ppo_step_compiles_the_critic_and_equals_uncompiled(tmp_path):
    tr = _same_step(tmp_path, "gae")
    assert compiled(tr.critic.backbone) and compiled(backbone(tr.policy)) and compiled(backbone(tr.reference))
    # the critic's state dict is as without compile (its forward is an instance attribute, no wrapper)
    assert not any("_orig_mod" in k for k in tr.critic.state_dict())


def test_generation_through_transformers_forward_stays_eager(tmp_path):
    """GPT-2 decodes through the model's own forward every token (no preallocated-KV decoder):
    with the backbone compiled, rollouts of other lengths compile nothing."""
    tr = _trainer(tmp_path, "gpt2", AOT, family="gpt2", kl=KLConfig(coef=0.0))
    assert compiled(backbone(tr.policy)) and tr.reference is None
    from rlhf_fast.rollout import SamplingParams

    tr.engine.generate(["q: a b", "0 1 2 3"], SamplingParams(n=2, max_new_tokens=7, seed=1))
    tr.engine.generate(["x"], SamplingParams(n=3, max_new_tokens=3, seed=2))
    assert _graphs() == 0
    tr.step()  # the scoring and update forwards do run compiled
    assert _graphs() >= 1


def test_distillation_teacher_is_compiled(tmp_path):
    from rlhf_fast.trainers.distill import DistillationTrainer
    from rlhf_fast.trainers.rl_config import DistillConfig

    def run(name, compile_kw):
        pol, tok = _policy()
        teacher, _ = _policy()
        with torch.no_grad():
            for p in teacher.parameters():
                p.mul_(1.5)
        cfg = _config(tmp_path, name, "distill", compile_kw, kl=KLConfig(coef=0.0), distill=DistillConfig(beta=0.5))
        tr = DistillationTrainer(cfg, pol, tok, teacher_model=teacher, prompts=PROMPTS)
        return tr, _step(tr)

    _, (m0, g0, _) = run("plain", None)
    tr, (m1, g1, _) = run("compiled", AOT)
    assert compiled(backbone(tr.teacher)) and compiled(backbone(tr.policy)) and _graphs() >= 2
    assert "distill/divergence" in m0
    _same_rows(m1, m0, "distill")
    assert len(g0) == len(g1)
    for x, y in zip(g0, g1):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)


def test_sdft_ema_teacher_is_compiled(tmp_path):
    """SDFT's own teacher copy (``ema``: a deep copy of the policy) runs compiled, and the step
    equals the uncompiled one."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from rlhf_fast.trainers.rl_config import SDFTConfig
    from rlhf_fast.trainers.sdft import SDFTTrainer

    prompts = [{"prompt": "q: a b", "privileged_context": "a a a"}, {"prompt": "x", "privileged_context": "b c"}]

    def run(name, compile_kw):
        pol, tok = _policy()
        cfg = _config(tmp_path, name, "sdft", compile_kw, kl=KLConfig(coef=0.0),
                      rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=5),
                      ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4),
                      sdft=SDFTConfig(teacher_model_kind="ema", distillation_topk=7))
        tr = SDFTTrainer(cfg, pol, tok, prompts=prompts)
        return tr, _step(tr)

    _, (m0, g0, _) = run("plain", None)
    tr, (m1, g1, _) = run("compiled", AOT)
    teacher = tr.self_teacher.model
    assert compiled(backbone(teacher)) and compiled(backbone(tr.policy)) and _graphs() >= 2
    assert backbone(teacher) is not backbone(tr.policy) and backbone(teacher).forward.__self__ is backbone(teacher)
    _same_rows(m1, m0, "sdft")
    assert len(g0) == len(g1)
    for x, y in zip(g0, g1):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ checkpoints


def _state(tr):
    return {**{"policy." + n: t.clone() for n, t in tr.policy.state_dict().items()},
            **{"critic." + n: t.clone() for n, t in tr.critic.state_dict().items()}}


def test_checkpoints_have_no_orig_mod_keys_and_resume_across_compile(tmp_path):
    from safetensors.torch import load_file

    kw = dict(estimator="gae", steps=3, save_every=2, kl=KLConfig(coef=0.0))
    ref = _trainer(tmp_path, "plain", **kw)  # 3 steps uncompiled, uninterrupted
    ref.train()
    ref_rows = {m["step"]: m for m in read_metrics(ref.config.output_dir)}
    for first, then in ((True, False), (False, True)):
        name = f"{'c' if first else 'p'}2{'c' if then else 'p'}"
        a = _trainer(tmp_path, name, AOT if first else None, **kw)
        assert compiled(backbone(a.policy)) == first and compiled(a.critic.backbone) == first
        a.train(steps=2)  # stopped after the checkpoint at step 2
        saved = _state(a)
        ck = latest_checkpoint(a.config.output_dir)
        files = [os.path.join(r, f) for r, _, fs in os.walk(ck) for f in fs if f.endswith(".safetensors")]
        keys = [k for f in files for k in load_file(f)]
        assert len(files) >= 2 and keys and not any("_orig_mod" in k for k in keys)  # policy and critic
        pol, tok = _policy()  # a fresh process would rebuild the initial policy
        cfg = _config(tmp_path, name, compile_kw=AOT if then else None, resume=str(tmp_path / name), **kw)
        b = RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS)
        assert b.config.torch_compile == then and compiled(backbone(b.policy)) == then
        assert b.load(cfg.resume) == 2
        got = _state(b)
        assert got.keys() == saved.keys()
        for k in saved:  # the checkpoint restores the weights bit for bit, whichever way it was saved
            assert torch.equal(got[k], saved[k]), (name, k)
        b.train()
        rows = {m["step"]: m for m in read_metrics(cfg.resume)}
        assert sorted(rows) == [1, 2, 3]
        for s in rows:  # compiled steps differ from eager ones by float rounding only
            _same_rows(rows[s], ref_rows[s], (name, s))
    assert _graphs() >= 1
