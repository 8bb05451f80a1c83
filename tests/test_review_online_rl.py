"""Review of the less-travelled RL options: the adaptive KL controller against Ziegler et al.'s
formula as TRL (0.x PPOTrainer) and OpenRLHF have it (numpy / tensor inputs; its settings refused
with the fixed controller), the TRPO line search's memory (its surrogate forwards by
``ppo.micro_batch_size``), A*-PO's Stage 1 (called again; LoRA adapters that do not start at 0)
and the A*-PO docs row of TRL's ``top_k``."""

import os
import re

import pytest
import torch

from rlhf_fast.algorithms.kl_control import AdaptiveKLController
from rlhf_fast.trainers.a2po import A2POTrainer
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import (A2POConfig, KLConfig, ModelConfig, OptimConfig, PPOConfig, RLConfig,
                                          RolloutConfig)
from tests.test_rl_learning import PROMPTS, frac_a, make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- adaptive KL


def peer_adaptive_kl(value, target, horizon, current, n_steps):
    """TRL 0.11 trl/trainer/utils.py AdaptiveKLController.update (OpenRLHF's
    openrlhf/models/utils.py is the same lines), transcribed."""
    proportional_error = min(max(current / target - 1, -0.2), 0.2)
    mult = 1 + proportional_error * n_steps / horizon
    return value * mult


@pytest.mark.parametrize("current, n_steps", [(3.0, 200), (0.0, 200), (1.5, 350), (0.5, 150)])
def test_adaptive_kl_is_ziegler_past_one_horizon(current, n_steps):
    # β moved by at most one horizon's change per update (1 ± 0.2), also when the KL is above
    # target; TRL / OpenRLHF and the README's β(1 + e·n/horizon) move it by e·n/horizon
    # (0.1 → 0.14 for 2 horizons above target, ours 0.12). The multiplier only reaches 0 at 5.
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(current, n_steps) == pytest.approx(peer_adaptive_kl(0.1, 1.0, 100, current, n_steps))
    # and β stays positive where the peers' turns negative (10 horizons below target: 1 − 0.2·10)
    assert ctl.update(0.0, 1000) > 0.0 and ctl.update(5.0, 1000) > 0.0


def test_adaptive_kl_takes_numpy_and_tensor_numbers():
    # a numpy int64 count failed as "n_steps must be a finite number >= 0, got np.int64(10)" and
    # a float32 KL (np.mean of a float32 array) as "current_kl must be a number" (TRL's np.clip
    # takes both); one-element tensors were taken for the KL but not for the count
    import numpy as np

    want = AdaptiveKLController(0.1, target=1.0, horizon=100).update(2.0, 10)
    for kl, n in ((np.float32(2.0), 10), (2.0, np.int64(10)), (torch.tensor(2.0), torch.tensor(10))):
        assert AdaptiveKLController(0.1, target=1.0, horizon=100).update(kl, n) == pytest.approx(want)
    with pytest.raises(ValueError, match="n_steps must be a finite number >= 0"):
        AdaptiveKLController(0.1, target=1.0, horizon=100).update(2.0, np.int64(-1))


@pytest.mark.parametrize("kw, key", [(dict(target=3.0), "kl.target"), (dict(horizon=500.0), "kl.horizon")])
def test_adaptive_kl_settings_with_the_fixed_controller_are_refused(kw, key):
    # kl.target / kl.horizon with the default fixed controller did nothing (β stayed kl.coef):
    # a run ported from TRL 0.x's PPOConfig (adap_kl_ctrl true by default, target 6, horizon
    # 10000) that set them trained with a fixed β, silently
    with pytest.raises(ValueError, match=re.escape(key) + ".*kl.controller 'adaptive'"):
        KLConfig(coef=0.05, **kw)
    assert KLConfig(coef=0.05, controller="adaptive", **kw).controller == "adaptive"


# ----------------------------------------------------------------------------- TRPO


def test_trpo_line_search_forwards_by_micro_batches(tmp_path):
    # the line search's surrogate forwards ran the whole mini-batch at once (16 rows here with
    # ppo.micro_batch_size 4): the memory that micro-batching saves in the update came back in
    # the no-grad forwards (a run that fits its micro-batches ran out of memory there)
    pol, tok = make_policy()
    rows = []
    pol.model.register_forward_pre_hook(
        lambda m, a, kw: rows.append((kw.get("input_ids") if kw.get("input_ids") is not None else a[0]).shape[0]),
        with_kwargs=True)
    cfg = RLConfig(estimator="grpo", steps=1, output_dir=str(tmp_path / "run"), progress=False,
                   rollout=RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=4),
                   ppo=PPOConfig(epochs=1, mini_batch_size=16, micro_batch_size=4, trpo=True, trpo_max_kl=1e-4),
                   optim=OptimConfig(lr=5e-2), kl=KLConfig(coef=0.01))
    tr = RLTrainer(cfg, pol, tok, prompts=PROMPTS, reward_fns=[frac_a])
    data, _ = tr.rollout()
    rows.clear()
    m = tr.update(data)
    assert rows and max(rows) <= 4, rows
    # and the step is still the line search's: the bound holds on the whole mini-batch
    from rlhf_fast.models.logprobs import sequence_logprobs
    from rlhf_fast.ops import reference

    with torch.no_grad():
        lp = sequence_logprobs(tr.policy, data.input_ids, data.attention_mask, response_mask=data.response_mask)
    d = lp - data.old_logp
    assert float(reference.masked_mean(0.5 * d * d, data.response_mask)) <= 1e-4 + 1e-7
    assert 0.0 <= m["policy/trpo_step_frac"] <= 1.0


# ----------------------------------------------------------------------------- A*-PO


def _a2po(tmp_path, reward_fns, **kw):
    pol, tok = make_policy()
    cfg = RLConfig(estimator="a2po", steps=2, output_dir=str(tmp_path / "run"), progress=False,
                   rollout=RolloutConfig(prompts_per_step=2, group_size=1, max_new_tokens=4),
                   ppo=PPOConfig(epochs=1, mini_batch_size=2, micro_batch_size=2),
                   a2po=kw.pop("a2po", A2POConfig(num_value_samples=2)), **kw)
    return A2POTrainer(cfg, pol, tok, prompts=PROMPTS, reward_fns=reward_fns)


def _zero_on_x_and_0(prompts, completions):
    return [0.0 if p in ("x", "0") else 1.0 for p in prompts]


def test_a2po_stage1_called_again_answers_the_given_prompts(tmp_path):
    # once the filter had dropped prompts, a second estimate_values() indexed the kept prompts
    # with the given prompts' numbers: IndexError (or the wrong prompts' answers)
    tr = _a2po(tmp_path, [_zero_on_x_and_0])
    first = tr.estimate_values().clone()
    assert tr.prompts == ["q:", "a b"]
    again = tr.estimate_values()
    assert again.tolist() == first.tolist()
    assert tr.prompts == ["q:", "a b"]


def test_a2po_refuses_lora_adapters_that_do_not_start_at_zero(tmp_path):
    # Stage 1 samples the policy (adapters on) as the initial policy, while the reference is
    # the policy with its adapters off: with init_lora_weights false (or PiSSA / OLoRA, which
    # move the base weights) the two differ (log-probs 0.14 apart on the tiny model), so V* and
    # the regression's log π/π_ref were of two different models
    with pytest.raises(ValueError, match="model.lora.init_lora_weights"):
        _a2po(tmp_path, [frac_a], model=ModelConfig(lora={"init_lora_weights": False, "r": 4}))
    # fresh adapters that add 0 (peft's default, and gaussian: B = 0) are the initial policy
    from rlhf_fast.models.logprobs import sequence_logprobs

    for init in (True, "gaussian"):
        tr = _a2po(tmp_path / str(init), [frac_a], model=ModelConfig(lora={"init_lora_weights": init, "r": 4}))
        ids = torch.tensor([[5, 9, 17, 23, 40, 41]])
        with torch.no_grad():
            a = sequence_logprobs(tr.policy, ids, torch.ones_like(ids))
            b = sequence_logprobs(tr.reference, ids, torch.ones_like(ids))
        torch.testing.assert_close(a, b)


def test_a2po_docs_top_k_row_says_what_trls_none_samples_with():
    # TRL's A2POConfig.top_k None goes to GenerationConfig(top_k=None), which transformers 5
    # fills with the model's generation_config top_k or its default 50: TRL samples top-50, not
    # "TRL None = our 0" (no top-k) as the row said
    from transformers import GenerationConfig

    pol, _ = make_policy()
    g = GenerationConfig(max_new_tokens=4, do_sample=True, temperature=1.0, top_p=1.0, top_k=None, pad_token_id=0)
    resolved, _ = pol._prepare_generation_config(g)
    assert resolved.top_k == 50
    with open(os.path.join(ROOT, "docs", "from_trl.md"), encoding="utf-8") as f:
        text = f.read()
    a2po = text[text.index("### A2POTrainer / A2POConfig"):]
    a2po = a2po[:a2po.index("\n### ")]
    row = re.search(r"^\| `top_k` \|.*$", a2po, re.M).group(0)
    assert "50" in row and "TRL None = our 0" not in row, row

