"""Review of rlhf_fast.ops as a kernel library swapped into other trainers
(docs/kernels_in_your_trainer.md): what the guide says about the peers (verl, OpenRLHF, TRL,
transformers) against their transcribed code, and arguments a peer's config hands over.

Peers transcribed here (verbatim but for names):
- verl ``compute_gae_advantage_return``: volcengine/verl, verl/trainer/ppo/core_algos.py @
  012be9d9dcb7c38499f23616142870d2682757fc (the loop, before its whitening).
- OpenRLHF ``get_advantages_and_returns``: OpenRLHF/OpenRLHF,
  openrlhf/trainer/ppo_utils/experience_maker.py @ 01359b469bab646981001011e4b58109aeb789d5.
- TRL 1.16 GRPOTrainer._compute_loss, ``loss_type="dapo"`` (installed in .venv):
  ``normalizer = num_items_in_batch / accelerator.num_processes``.
"""

import re
from pathlib import Path

import pytest
import torch

from rlhf_fast import ops

DOC = Path(__file__).resolve().parent.parent / "docs" / "kernels_in_your_trainer.md"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _doc() -> str:
    return " ".join(DOC.read_text().split())  # one line: the checks do not depend on wrapping


def _verl_gae_loop(token_level_rewards, values, response_mask, gamma, lam):
    """verl compute_gae_advantage_return's loop (returns before the advantages' whitening)."""
    nextvalues = 0
    lastgaelam = 0
    advantages_reversed = []
    gen_len = token_level_rewards.shape[-1]
    for t in reversed(range(gen_len)):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        # skip values and TD-error on observation tokens
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def _openrlhf_gae(values, rewards, action_mask, gamma, lambd):
    """OpenRLHF get_advantages_and_returns (NaiveExperienceMaker)."""
    lastgaelam = 0
    advantages_reversed = []
    response_length = rewards.size(1)
    values = action_mask * values
    rewards = action_mask * rewards
    for t in reversed(range(response_length)):
        nextvalues = values[:, t + 1] if t < response_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lambd * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def test_gae_with_holes_equals_verls_loop_and_the_guide_says_so():
    torch.manual_seed(0)
    B, T = 3, 9
    r = torch.randn(B, T, dtype=torch.float64)
    v = torch.randn(B, T, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:5] = False  # a hole (tool output inside the answer)
    mask[1, 6:] = False   # right padding
    mask[2, :2] = False   # left padding
    adv, ret = ops.gae(r, v, mask, gamma=0.99, lam=0.95)
    v_adv, v_ret = _verl_gae_loop(r, v, mask.double(), 0.99, 0.95)
    # verl's loop skips the hole exactly as ours does: equal on every response token
    torch.testing.assert_close(adv[mask], v_adv[mask], rtol=0, atol=1e-12)
    torch.testing.assert_close(ret[mask], v_ret[mask], rtol=0, atol=1e-12)
    # OpenRLHF's loop runs through the hole (its zeroed values and rewards): it differs there
    o_adv, _ = _openrlhf_gae(v, r, mask.double(), 0.99, 0.95)
    assert not torch.allclose(adv[0, :3], o_adv[0, :3])
    torch.testing.assert_close(adv[1:][mask[1:]], o_adv[1:][mask[1:]])  # padding only: equal
    text = _doc()
    assert "the peers' loop runs through them" not in text
    assert re.search(r"verl's loop skips them too", text), "the guide must say verl's GAE skips holes like ours"
    assert re.search(r"then whitens", text), "the guide must say verl's compute_gae_advantage_return whitens"


def test_top_k_ties_the_guide_states_how_the_kept_set_differs_from_the_warper():
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, -1.0]])
    warper_kept = torch.isfinite(TopKLogitsWarper(2)(None, logits.clone()))[0]
    gen = torch.Generator().manual_seed(0)
    drawn = set()
    for _ in range(200):
        tok, logp = ops.sample(logits, top_k=2, generator=gen)
        drawn.add(tok.item())
        torch.testing.assert_close(logp, torch.tensor([-0.6931472]))  # 1/2 each (the warper: 1/3)
    # transformers keeps every token tied with the k-th (3 here); ours keeps exactly k, lower index first
    assert warper_kept.nonzero().flatten().tolist() == [1, 2, 3]
    assert drawn == {1, 2}
    text = _doc()
    assert "the kept set is the same; ties are broken by the lower index" not in text
    assert re.search(r"ties at the k-th", text), "the guide must say where ties make the kept sets differ"


def test_normalizer_under_data_parallel_is_the_global_count_over_the_ranks():
    """DDP / FSDP average the ranks' gradients: TRL's dapo divides by num_items_in_batch /
    num_processes. The guide's "global token count" alone gives 1/world_size of the gradient."""
    torch.manual_seed(1)
    W, B, T = 2, 4, 6  # two ranks of 2 rows each
    logp = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    old = logp.detach() + 0.2 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, T, dtype=torch.float64)
    mask = torch.rand(B, T) < 0.7
    mask[:, 0] = True
    full, _ = ops.ppo_policy_loss(logp, old, adv, mask, agg="token-mean")
    g_full, = torch.autograd.grad(full, logp)

    def ddp_grad(normalizer):
        grads = []
        for rows in torch.arange(B).chunk(W):
            loss, _ = ops.ppo_policy_loss(logp[rows], old[rows], adv[rows], mask[rows], normalizer=normalizer)
            g, = torch.autograd.grad(loss, logp)
            grads.append(g)
        return sum(grads) / W  # DDP's all-reduce average

    n_global = int(mask.sum())
    torch.testing.assert_close(ddp_grad(n_global / W), g_full)
    torch.testing.assert_close(ddp_grad(n_global), g_full / W)
    text = _doc()
    assert re.search(r"divided by the number of ranks", text), \
        "the guide must say the normalizer is the global count / world size under DDP / FSDP"


def _np_float_calls():
    """One call per op with every float coefficient made by ``c`` (values exact in float32)."""
    torch.manual_seed(2)
    x = torch.randn(2, 4)
    m = torch.ones(2, 4, dtype=torch.bool)
    logits = torch.randn(3, 10)
    h, w, y = torch.randn(2, 4, 8), torch.randn(10, 8), torch.randint(0, 10, (2, 4))
    return {
        "ppo_policy_loss": lambda c: ops.ppo_policy_loss(x, x.flip(0), x, m, clip_low=c(0.25), clip_high=c(0.375),
                                                         dual_clip=c(3.0), normalizer=c(8.0))[0],
        "ppo_value_loss": lambda c: ops.ppo_value_loss(x, x.flip(0), x, m, clip=c(0.25))[0],
        "gae": lambda c: ops.gae(x, x.flip(0), m, gamma=c(0.5), lam=c(0.75))[0],
        "discounted_returns": lambda c: ops.discounted_returns(x, m, gamma=c(0.5)),
        "group_advantages": lambda c: ops.group_advantages(x.flatten(), 4, eps=c(0.25)),
        "masked_whiten": lambda c: ops.masked_whiten(x, m, eps=c(0.25)),
        "sample": lambda c: ops.sample(logits, top_p=c(0.75), min_p=c(0.125),
                                       generator=torch.Generator().manual_seed(0))[1],
        "fused_linear_policy_loss": lambda c: ops.fused_linear_policy_loss(
            h, w, y, x, x, m, ref_logp=x.flip(0), kl_coef=c(0.5), entropy_coef=c(0.25), clip_low=c(0.25))[0],
        "fused_linear_divergence": lambda c: ops.fused_linear_divergence(
            h.reshape(-1, 8), w, h.reshape(-1, 8).flip(0), w, beta=c(0.25), reduction="sum"),
    }


@pytest.mark.parametrize("op", ["ppo_policy_loss", "ppo_value_loss", "gae", "discounted_returns",
                                "group_advantages", "masked_whiten", "sample", "fused_linear_policy_loss",
                                "fused_linear_divergence"])
def test_numpy_float_arguments_are_numbers(op):
    """A coefficient read through numpy (np.float32: a config array's item, a schedule) is a
    number: temperature and the integer arguments take numpy scalars; the float ones refused
    them with "must be a number ..., got np.float32(0.2)"."""
    np = pytest.importorskip("numpy")
    call = _np_float_calls()[op]
    torch.testing.assert_close(call(np.float32), call(float))


def _verl_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6):
    """verl compute_grpo_outcome_advantage (norm_adv_by_std_in_grpo=True), volcengine/verl @ 012be9d9."""
    from collections import defaultdict

    scores = token_level_rewards.sum(dim=-1)
    id2score = defaultdict(list)
    id2mean, id2std = {}, {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
                id2std[idx] = torch.tensor(1.0)
            else:
                scores_tensor = torch.stack(id2score[idx])
                id2mean[idx] = torch.mean(scores_tensor)
                id2std[idx] = torch.std(scores_tensor)
        for i in range(bsz):
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
        scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


def test_group_advantages_against_verls_grpo_and_the_group_of_one():
    torch.manual_seed(3)
    scores = torch.randn(6)
    mask = torch.ones(6, 4)
    last_token = scores[:, None] * torch.tensor([[0.0, 0, 0, 1]])  # the score on the last token
    verl, _ = _verl_grpo_outcome_advantage(last_token, mask, [0, 0, 0, 1, 1, 1])
    torch.testing.assert_close(ops.group_advantages(scores, 3), verl[:, 0])  # groups of 3: equal
    # a group of one answer: verl keeps the score (mean 0, std 1), TRL and ours give 0
    verl1, _ = _verl_grpo_outcome_advantage(scores[:, None].clone(), mask[:, :1], list(range(6)))
    assert torch.allclose(verl1[:, 0], scores / (1 + 1e-6)) and (ops.group_advantages(scores, 1) == 0).all()
    assert re.search(r"a group of one answer", _doc()), "the guide must say where verl's GRPO advantage differs"


def test_dtype_claim_holds_for_sample():
    logits = torch.randn(3, 7, dtype=torch.float64)
    _, logp = ops.sample(logits, generator=torch.Generator().manual_seed(0))
    assert logp.dtype == torch.float64 or re.search(r"`sample`'s log-prob is float32", _doc())


def _verl_kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl core_algos.kl_penalty, volcengine/verl @ 012be9d9 (the kinds the guide names)."""
    if kl_penalty in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_penalty == "abs":
        return (logprob - ref_logprob).abs()
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if kl_penalty in ("low_var_kl", "k3"):
        kl = ref_logprob - logprob
        kl = torch.clamp(kl, min=-20, max=20)
        ratio = torch.exp(kl)
        kld = (ratio - kl - 1).contiguous()
        return torch.clamp(kld, min=-10, max=10)
    raise NotImplementedError


def _openrlhf_compute_approx_kl(log_probs, log_probs_base, kl_estimator="k1"):
    """OpenRLHF openrlhf/models/utils.py @ 02a260574f3edbc8b4888c3d9a98fae20398d945."""
    if kl_estimator == "k1":
        log_ratio = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k2":
        log_ratio = log_probs.float() - log_probs_base.float()
        log_ratio = log_ratio**2 / 2.0
    if kl_estimator == "k3":
        log_ratio = log_probs.float() - log_probs_base.float()
        log_ratio = -log_ratio
        log_ratio = log_ratio.exp() - 1 - log_ratio
    return log_ratio


def test_kl_and_masked_mean_section_against_verl_and_openrlhf():
    torch.manual_seed(4)
    logp = torch.randn(3, 5) * 0.8
    ref = torch.randn(3, 5) * 0.8
    for ours, verl in (("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl"), ("abs", "abs")):
        torch.testing.assert_close(ops.kl_penalty(logp, ref, ours), _verl_kl_penalty(logp, ref, verl))
        if ours != "abs":
            torch.testing.assert_close(ops.kl_penalty(logp, ref, ours),
                                       _openrlhf_compute_approx_kl(logp, ref, ours))
    # the guide's number: logp − ref = −3 gives 16.09 here and in OpenRLHF, 10 in verl's low_var_kl
    d = torch.tensor([-3.0])
    assert abs(ops.kl_penalty(d, torch.zeros(1), "k3").item() - 16.0855) < 1e-3
    assert _verl_kl_penalty(d, torch.zeros(1), "low_var_kl").item() == 10.0
    up = torch.tensor([11.5])  # "or above it by more than 11": 10.5 here, 10 in verl
    assert abs(ops.kl_penalty(up, torch.zeros(1), "k3").item() - 10.5) < 1e-4
    assert _verl_kl_penalty(up, torch.zeros(1), "low_var_kl").item() == 10.0
    torch.testing.assert_close(ops.kl_penalty(d, torch.zeros(1), "k3"),
                               _openrlhf_compute_approx_kl(d, torch.zeros(1), "k3"))
    # masked_mean: OpenRLHF's / verl's (values * mask).sum(dim) / mask.sum(dim); an empty row 0, theirs NaN
    mask = torch.rand(3, 5) < 0.6
    mask[0] = True
    mask[2] = False
    x = torch.randn(3, 5)
    theirs = (x * mask).sum(1) / mask.sum(1)
    ours = ops.masked_mean(x, mask, 1)
    torch.testing.assert_close(ours[:2], theirs[:2])
    assert theirs[2].isnan() and ours[2] == 0
    torch.testing.assert_close(ops.masked_mean(x, mask.float(), dim=1), ours)
    text = _doc()
    assert "verl's kind names `kl` / `low_var_kl` are our `k1` / `k3`" in text
    assert "ours is 16.09, verl's 10" in text


def _trl_grpo_compute_loss(logp, entropies, old, adv, mask, *, loss_type, entropy_coef=0.0, beta=0.0, ref=None):
    """TRL 1.16's own GRPOTrainer._compute_loss (imported, not transcribed) on a stand-in trainer:
    the model's forward replaced by the given per-token log-probs and entropies; one process,
    no gradient accumulation, token-level importance sampling."""
    import types
    from collections import defaultdict

    from trl import GRPOTrainer

    class _Accelerator:
        num_processes, sync_gradients = 1, True

        def gather(self, x):
            return x

        gather_for_metrics = gather

        def reduce(self, x, reduction="sum"):
            return x

    B, T = logp.shape
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, entropies, None), aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False, max_completion_length=T,
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=_Accelerator(), _entropy_bonus_enabled=entropy_coef != 0.0, entropy_coef=entropy_coef,
        use_adaptive_entropy=False, _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref}
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def test_entropy_term_of_the_fused_loss_against_trls_own_compute_loss():
    torch.manual_seed(5)
    B, T, H, V = 3, 6, 8, 30
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    mask = torch.arange(T)[None, :] < torch.tensor([[6], [2], [4]])  # rows of different lengths
    logp, entropy = ops.token_logprobs(hidden @ weight.T, labels, return_entropy=True)
    old = logp.detach() + 0.2 * torch.randn(B, T, dtype=torch.float64)
    ref = logp.detach() + 0.2 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    A = adv[:, None].expand(B, T)
    coef, beta = 0.1, 0.04
    trl = _trl_grpo_compute_loss(logp, entropy, old, adv, mask, loss_type="grpo", entropy_coef=coef, beta=beta,
                                 ref=ref)
    fused, _ = ops.fused_linear_policy_loss(hidden, weight, labels, old, A, mask, ref_logp=ref, kl_coef=beta,
                                            entropy_coef=coef, clip_low=0.2, clip_high=0.28,
                                            agg="seq-mean-token-mean")
    assert abs(fused.item() - trl.item()) > 1e-6  # one agg for every term: not TRL's token-mean entropy bonus
    # the guide's recipe: the entropy bonus apart, as a token mean
    no_bonus, _ = ops.fused_linear_policy_loss(hidden, weight, labels, old, A, mask, ref_logp=ref, kl_coef=beta,
                                               clip_low=0.2, clip_high=0.28, agg="seq-mean-token-mean")
    recipe = no_bonus - coef * ops.masked_mean(entropy, mask)
    torch.testing.assert_close(recipe, trl)
    g_ours, = torch.autograd.grad(recipe, hidden, retain_graph=True)
    g_trl, = torch.autograd.grad(trl, hidden)
    torch.testing.assert_close(g_ours, g_trl)
    assert "TRL 1.16's entropy bonus (`entropy_coef`) is a token mean whatever its `loss_type`" in _doc()


def test_verls_compute_policy_loss_is_ours_with_dual_clip_3():
    """verl core_algos.compute_policy_loss (volcengine/verl @ 012be9d9; agg_loss token-mean /
    seq-mean-token-mean of that version), clip_ratio_c=3.0 by default."""
    torch.manual_seed(6)
    B, T = 3, 8
    logp = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    old = logp.detach() + 1.5 * torch.randn(B, T, dtype=torch.float64)  # ratios past 3 for the dual clip
    adv = torch.randn(B, T, dtype=torch.float64) * 2
    mask = torch.rand(B, T) < 0.8
    mask[:, 0] = True
    m = mask.double()

    def verl(loss_agg_mode, cliprange_low=0.2, cliprange_high=0.28, clip_ratio_c=3.0):
        negative_approx_kl = torch.clamp(logp - old, min=-20.0, max=20.0)
        ratio = torch.exp(negative_approx_kl)
        pg_losses1 = -adv * ratio
        pg_losses2 = -adv * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
        clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
        pg_losses3 = -adv * clip_ratio_c
        clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
        pg_losses = torch.where(adv < 0, clip_pg_losses2, clip_pg_losses1)
        if loss_agg_mode == "token-mean":
            return (pg_losses * m).sum() / m.sum()
        return ((pg_losses * m).sum(-1) / m.sum(-1)).mean()

    for agg in ("token-mean", "seq-mean-token-mean"):
        theirs = verl(agg)
        ours, stats = ops.ppo_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                                          agg=agg)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(theirs, logp)[0])
    assert stats["dual_clip_frac"] > 0  # the dual clip did act on this batch
    assert "its dual clip, always on with `clip_ratio_c=3.0`, is our `dual_clip=3.0`" in _doc()
