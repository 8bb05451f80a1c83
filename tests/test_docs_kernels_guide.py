"""docs/kernels_in_your_trainer.md stays true: every Python block runs as written, and each
"equal to" claim holds against TRL's own functions (installed) or the peers' lines
transcribed here (verl, TRL GRPO's loss and advantages), on the CPU backends."""

import re
from pathlib import Path

import pytest
import torch

from rlhf_fast import ops

DOC = Path(__file__).resolve().parent.parent / "docs" / "kernels_in_your_trainer.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def test_the_guide_has_its_blocks():
    assert len(BLOCKS) == 5


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_every_block_runs(i):
    torch.manual_seed(0)
    exec(compile(BLOCKS[i], f"{DOC.name} block {i}", "exec"), {})


def test_token_logprobs_equal_trls():
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50)
    labels = torch.randint(0, 50, (3, 7))
    logp, ent = ops.token_logprobs(logits, labels, return_entropy=True)
    torch.testing.assert_close(logp, selective_log_softmax(logits, labels))
    torch.testing.assert_close(ent, entropy_from_logits(logits))
    torch.testing.assert_close(ops.token_logprobs(logits, labels, temperature=0.7),
                               selective_log_softmax(logits, labels, temperature=0.7))
    labels[0, 2] = -100
    assert ops.token_logprobs(logits, labels)[0, 2] == 0


def test_fused_head_equals_logits_then_trls_log_softmax():
    from trl.trainer.utils import selective_log_softmax

    torch.manual_seed(1)
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (2, 5))
    ours = ops.fused_linear_logprobs(hidden.reshape(-1, 16), weight, labels.reshape(-1)).view(2, 5)
    theirs = selective_log_softmax(hidden @ weight.T, labels)
    torch.testing.assert_close(ours, theirs)
    g_ours = torch.autograd.grad(ours.sum(), (hidden, weight))
    g_theirs = torch.autograd.grad(theirs.sum(), (hidden, weight))
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b)


def _peers_gae(rewards, values, gamma, lam):
    """verl's compute_gae_advantage_return / TRL's old PPOTrainer loop (the benchmark's
    transcription): every position of the row, masked or not."""
    from rlhf_fast.benchmarks.bench_gae_sampling import gae_python_loop

    return gae_python_loop(rewards, values, torch.ones_like(rewards), gamma=gamma, lam=lam)


def test_gae_equals_the_peers_loop_with_right_padding_and_skips_holes():
    torch.manual_seed(2)
    B, T = 4, 9
    lengths = torch.tensor([9, 5, 1, 7])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.randn(B, T, dtype=torch.float64) * mask
    values = torch.randn(B, T, dtype=torch.float64) * mask  # the peers zero the padding's values
    adv, ret = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    p_adv, p_ret = _peers_gae(rewards, values, 0.99, 0.95)
    torch.testing.assert_close(adv[mask], p_adv[mask])
    torch.testing.assert_close(ret[mask], p_ret[mask])
    assert (adv[~mask] == 0).all()
    # a hole (tokens 3-4 of row 0 not the policy's): ours equals the loop on the row without them
    holes = mask.clone()
    holes[0, 3:5] = False
    adv_h, _ = ops.gae(rewards, values, holes, gamma=0.99, lam=0.95)
    keep = holes[0]
    squeezed, _ = _peers_gae(rewards[:1, keep], values[:1, keep], 0.99, 0.95)
    torch.testing.assert_close(adv_h[0, keep], squeezed[0])
    assert not torch.allclose(adv_h[0, :3], p_adv[0, :3])  # the peers' loop runs through the hole


def test_group_advantages_equal_trls_and_verls():
    torch.manual_seed(3)
    G = 4
    scores = torch.randn(3 * G, dtype=torch.float64)
    scores[4:8] = 0.5  # a group whose answers tie: std 0
    # TRL GRPOTrainer._generate_and_score_completions (scale_rewards "group", transcribed)
    grouped = scores.view(-1, G)
    mean = grouped.mean(dim=1).repeat_interleave(G)
    std = grouped.std(dim=1).repeat_interleave(G)
    torch.testing.assert_close(ops.group_advantages(scores, G, kind="grpo", eps=1e-4), (scores - mean) / (std + 1e-4))
    # verl compute_grpo_outcome_advantage: torch.std of the group, epsilon 1e-6 (our default)
    torch.testing.assert_close(ops.group_advantages(scores, G, kind="grpo"), (scores - mean) / (std + 1e-6))
    torch.testing.assert_close(ops.group_advantages(scores, G, kind="grpo", normalize_std=False), scores - mean)
    torch.testing.assert_close(ops.group_advantages(scores, G, kind="dr_grpo"), scores - mean)
    # verl compute_rloo_outcome_advantage: s·n/(n−1) − mean·n/(n−1)
    torch.testing.assert_close(ops.group_advantages(scores, G, kind="rloo"), scores * G / (G - 1) - mean * G / (G - 1))


def test_policy_loss_equals_trls_and_verls():
    torch.manual_seed(4)
    B, T = 3, 8
    logp = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    old = logp.detach() + 0.3 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, T, dtype=torch.float64)
    mask = torch.rand(B, T) < 0.8
    mask[:, 0] = True
    eps_low, eps_high = 0.2, 0.28
    m = mask.double()

    def per_token_loss():
        # TRL GRPOTrainer._compute_loss, loss_type "dapo" (and verl compute_policy_loss without dual clip)
        coef_1 = torch.exp(logp - old)
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        return -torch.min(coef_1 * adv, coef_2 * adv)

    expected = {"token-mean": lambda x: (x * m).sum() / m.sum(),
                "seq-mean-token-sum": lambda x: (x * m).sum(-1).mean(),
                "seq-mean-token-mean": lambda x: ((x * m).sum(-1) / m.sum(-1)).mean(),
                "seq-mean-token-sum-norm": lambda x: (x * m).sum() / (B * T)}  # Dr. GRPO's (DESIGN.md)
    for agg, reduce in expected.items():
        theirs = reduce(per_token_loss())
        ours, _ = ops.ppo_policy_loss(logp, old, adv, mask, clip_low=eps_low, clip_high=eps_high, agg=agg)
        torch.testing.assert_close(ours, theirs, msg=agg)
        g_ours, = torch.autograd.grad(ours, logp)
        g_theirs, = torch.autograd.grad(theirs, logp)
        torch.testing.assert_close(g_ours, g_theirs, msg=agg)
    # normalizer: the denominator of token-mean replaced (here by a global count of 100 tokens)
    ours, _ = ops.ppo_policy_loss(logp, old, adv, mask, clip_low=eps_low, clip_high=eps_high, normalizer=100)
    torch.testing.assert_close(ours, (per_token_loss() * m).sum() / 100)
    # verl's seq-mean-token-sum-norm (core_algos.agg_loss: the sum of the rows' token sums / T)
    ours, _ = ops.ppo_policy_loss(logp, old, adv, mask, clip_low=eps_low, clip_high=eps_high,
                                  agg="seq-mean-token-sum-norm", normalizer=T)
    torch.testing.assert_close(ours, (per_token_loss() * m).sum(-1).sum() / T)


def test_sample_keeps_the_warpers_tokens_with_their_log_probs():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    torch.manual_seed(5)
    logits = torch.randn(6, 40) * 2
    warped = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.7)(None, logits)))
    kept = torch.isfinite(warped)
    logp_warped = warped.log_softmax(-1)
    gen = torch.Generator().manual_seed(0)
    seen = torch.zeros_like(kept)
    for _ in range(300):
        tokens, logp = ops.sample(logits, temperature=0.7, top_k=10, top_p=0.9, generator=gen)
        rows = torch.arange(6)
        assert kept[rows, tokens].all()
        torch.testing.assert_close(logp, logp_warped[rows, tokens])
        seen[rows, tokens] = True
    assert (seen == kept).all()  # every kept token is drawn at some point (300 draws, ≤ 10 tokens a row)
    greedy, lp = ops.sample(logits, temperature=0.0)
    assert torch.equal(greedy, logits.argmax(-1)) and (lp == 0).all()
    bad = logits.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="row 2"):
        ops.sample(bad, temperature=1.0)
