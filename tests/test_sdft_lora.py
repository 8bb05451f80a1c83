"""SDFT with a LoRA policy (``model.lora``): the ``base`` teacher is the base model with the
adapters off (the loss and gradients those of TRL's math with a fresh copy of the base model as
the teacher), the ``live`` teacher the adapted policy itself; a whole step moves the adapters
only; an ``ema`` teacher of a LoRA policy is refused."""

import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from rlhf_fast.trainers.rl_config import ModelConfig, PPOConfig, SDFTConfig  # noqa: E402
from rlhf_fast.trainers.sdft import SDFTTrainer  # noqa: E402
from tests.test_rl_learning import make_policy  # noqa: E402
from tests.test_sdft import PROMPTS, make_config, trl_step_loss  # noqa: E402

pytest.importorskip("peft")
pytestmark = [pytest.mark.usefixtures("one_thread_per_module"), pytest.mark.filterwarnings("ignore::FutureWarning")]

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}


def lora_trainer(tmp_path, kind, **kw):
    pol, tok = make_policy()
    torch.manual_seed(0)  # the same adapter initialisation in every run
    cfg = make_config(tmp_path, SDFTConfig(teacher_model_kind=kind, distillation_topk=7), model=ModelConfig(lora=LORA),
                      ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8), **kw)
    tr = SDFTTrainer(cfg, pol, tok, prompts=PROMPTS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adapters away from zero, so the adapted policy is not the base model
        for n, p in tr.policy.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return tr


def lora_grads(tr):
    return {n: p.grad.detach().clone() for n, p in tr.policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["base", "live"])
def test_lora_step_loss_and_gradients_equal_trl(tmp_path, kind):
    tr = lora_trainer(tmp_path, kind)
    assert all("lora_" in n for n, p in tr.policy.named_parameters() if p.requires_grad)
    data, _ = tr.rollout()
    P = tr._rollout_rows[0]
    # the teacher TRL's math reads: the base model itself (a fresh copy, no adapters) or the adapted policy
    teacher = make_policy()[0] if kind == "base" else tr.policy
    view = SimpleNamespace(config=tr.config, policy=tr.policy, teacher=teacher, _keeps_old_logp=tr._keeps_old_logp)
    tr.policy.zero_grad(set_to_none=True)
    ref, tok_mean = trl_step_loss(view, data, P)
    ref.backward()
    expected = lora_grads(tr)
    tr.policy.zero_grad(set_to_none=True)
    st = tr.policy_backward(data, 3)
    assert st["loss"] == pytest.approx(float(ref), rel=1e-5, abs=1e-8)
    assert abs(float(ref)) > 1e-4
    assert st["distillation_loss"] == pytest.approx(tok_mean, rel=1e-5, abs=1e-8)
    got = lora_grads(tr)
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-7, msg=n)
    # the other teacher gives another loss: the test tells the two apart
    other = tr.policy if kind == "base" else make_policy()[0]
    alt, _ = trl_step_loss(SimpleNamespace(**{**vars(view), "teacher": other}), data, P)
    assert abs(float(alt) - float(ref)) > 1e-3 * abs(float(ref))


@pytest.mark.parametrize("kind", ["base", "live"])
def test_a_lora_step_moves_the_adapters_only(tmp_path, kind):
    tr = lora_trainer(tmp_path, kind, steps=1)
    before = {n: p.detach().clone() for n, p in tr.policy.named_parameters()}
    m = tr.train()[-1]
    assert m["loss"] > 0
    for n, p in tr.policy.named_parameters():
        assert torch.equal(p, before[n]) != ("lora_" in n), n


def test_an_ema_teacher_of_a_lora_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sdft.teacher_model_kind 'ema' with model.lora is not supported"):
        lora_trainer(tmp_path, "ema")
