"""rlhf_fast.algorithms: estimators against plain-Python oracles, KL controllers, reward
sources and their error handling, reward shaping, and RLConfig validation."""

import math

import pytest
import torch

from rlhf_fast.algorithms import (
    AdaptiveKLController,
    CombinedReward,
    FixedKLController,
    LengthPenalty,
    RepetitionPenalty,
    RewardError,
    RunningMoments,
    compute_advantages,
    load_callable,
    make_kl_controller,
    shape_scores,
    token_rewards,
)
from rlhf_fast.ops import reference


def _mask():
    # left-padded prompt + right-padded response style holes, one row with a single token
    return torch.tensor([[0, 0, 1, 1, 1, 0],
                         [0, 1, 1, 1, 1, 1],
                         [0, 0, 0, 1, 0, 0],
                         [0, 1, 1, 0, 0, 0]], dtype=torch.bool)


def _rows(mask):
    return [[t for t in range(mask.shape[1]) if mask[b, t]] for b in range(mask.shape[0])]


def test_token_rewards_places_score_on_last_token_and_kl_everywhere():
    m = _mask()
    s = torch.tensor([1.0, -2.0, 3.0, 0.5])
    kl = torch.rand(m.shape)
    r = token_rewards(s, m, kl=kl, kl_coef=0.1)
    for b, pos in enumerate(_rows(m)):
        for t in range(m.shape[1]):
            want = 0.0
            if t in pos:
                want = -0.1 * float(kl[b, t]) + (float(s[b]) if t == pos[-1] else 0.0)
            assert r[b, t].item() == pytest.approx(want, abs=1e-6)


def test_gae_estimator_matches_python_loop():
    torch.manual_seed(0)
    m = _mask()
    s = torch.randn(4)
    v = torch.randn(m.shape)
    kl = torch.randn(m.shape)
    adv, ret = compute_advantages("gae", s, m, values=v, kl=kl, kl_coef=0.2, gamma=0.9, lam=0.8)
    r = token_rewards(s, m, kl=kl, kl_coef=0.2)
    for b, pos in enumerate(_rows(m)):
        last, nv = 0.0, 0.0
        for t in reversed(pos):
            delta = float(r[b, t]) + 0.9 * nv - float(v[b, t])
            last = delta + 0.9 * 0.8 * last
            nv = float(v[b, t])
            assert adv[b, t].item() == pytest.approx(last, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(last + float(v[b, t]), abs=1e-5)
    assert (adv[~m] == 0).all()


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_match_python(kind):
    torch.manual_seed(1)
    m = torch.ones(6, 3, dtype=torch.bool)
    m[:, 0] = False
    s = torch.randn(6)
    kl = torch.rand(6, 3)
    adv, _ = compute_advantages(kind, s, m, kl=kl, kl_coef=0.1, group_size=3)
    eff = [float(s[i]) - 0.1 * float((kl[i] * m[i]).sum()) for i in range(6)]
    for g in range(2):
        grp = eff[3 * g:3 * g + 3]
        mean = sum(grp) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / 2)
        for j in range(3):
            x = grp[j]
            want = {"grpo": (x - mean) / (std + 1e-6), "dr_grpo": x - mean,
                    "rloo": x - (sum(grp) - x) / 2}[kind]
            assert adv[3 * g + j, 1].item() == pytest.approx(want, abs=1e-4)
            assert adv[3 * g + j, 0].item() == 0.0
            assert adv[3 * g + j, 2].item() == pytest.approx(want, abs=1e-4)


def test_reinforce_pp_is_whitened_token_returns():
    torch.manual_seed(2)
    m = _mask()
    s = torch.randn(4)
    kl = torch.randn(m.shape)
    adv, ret = compute_advantages("reinforce++", s, m, kl=kl, kl_coef=0.05, gamma=0.95)
    r = token_rewards(s, m, kl=kl, kl_coef=0.05)
    vals = []
    for b, pos in enumerate(_rows(m)):
        g = 0.0
        for t in reversed(pos):
            g = float(r[b, t]) + 0.95 * g
            assert ret[b, t].item() == pytest.approx(g, abs=1e-5)
            vals.append((b, t, g))
    xs = [g for _, _, g in vals]
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    for b, t, g in vals:
        assert adv[b, t].item() == pytest.approx((g - mean) / math.sqrt(var + 1e-8), abs=1e-4)


def _whiten_rank(rank, world, store, out):
    """One gloo rank of the test below: its half of the batch, advantages whitened with the
    global statistics through ``group``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        s, m, kl, v = _global_batch()
        rows = slice(rank * 2, rank * 2 + 2)
        res = {est: compute_advantages(est, s[rows], m[rows], values=v[rows] if est == "gae" else None,
                                       kl=kl[rows], kl_coef=0.05, gamma=0.95, whiten=est == "gae",
                                       group=dist.group.WORLD)
               for est in ("reinforce++", "gae")}
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _global_batch():
    g = torch.Generator().manual_seed(5)
    m = _mask()
    s, kl, v = torch.randn(4, generator=g) * 3, torch.randn(m.shape, generator=g), torch.randn(m.shape, generator=g)
    return s, m, kl, v


def test_whitening_over_ranks_uses_the_global_batch(tmp_path):
    """REINFORCE++ normalises advantages over the global batch (Hu 2025; OpenRLHF's
    replay_buffer.normalize all-reduces its statistics): two ranks holding half the rows each
    get exactly the advantages one process computes on all rows — with the rank's own
    statistics they would not (the halves differ in mean and spread). The same for GAE with
    ``whiten``."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "adv")
    mp.spawn(_whiten_rank, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    s, m, kl, v = _global_batch()
    for est in ("reinforce++", "gae"):
        want = compute_advantages(est, s, m, values=v if est == "gae" else None, kl=kl, kl_coef=0.05,
                                  gamma=0.95, whiten=est == "gae")
        got = [torch.load(f"{out}.{r}")[est] for r in range(2)]
        torch.testing.assert_close(torch.cat([got[0][0], got[1][0]]), want[0], rtol=1e-5, atol=1e-5, msg=est)
        torch.testing.assert_close(torch.cat([got[0][1], got[1][1]]), want[1], rtol=1e-5, atol=1e-5, msg=est)
        local = compute_advantages(est, s[:2], m[:2], values=v[:2] if est == "gae" else None, kl=kl[:2],
                                   kl_coef=0.05, gamma=0.95, whiten=est == "gae")[0]
        assert not torch.allclose(local, want[0][:2], atol=1e-3), est  # the test can tell them apart


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_in_the_loss_has_the_documented_expected_gradient(kind):
    """What β·KL in the loss optimises (KLConfig's docstring): the exact expectation over the
    policy's own samples of ∇ kl_penalty(logp(a), ref(a)) is ∇KL(π‖ref) for k2, ∇KL(ref‖π) for
    k3 (the GRPO estimator) and 0 for k1. A categorical policy over 5 actions."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    p = logp.exp().detach()
    # E_{a~π}[k(a)] with the sampling distribution held fixed: Σ_a π(a)·k(a), π(a) a constant
    est = (p * reference.kl_penalty(logp, ref, kind)).sum()
    (grad,) = torch.autograd.grad(est, theta, retain_graph=True)
    forward = (logp.exp() * (logp - ref)).sum()
    reverse = (ref.exp() * (ref - logp)).sum()
    want = {"k1": torch.zeros(5, dtype=torch.float64),
            "k2": torch.autograd.grad(forward, theta, retain_graph=True)[0],
            "k3": torch.autograd.grad(reverse, theta, retain_graph=True)[0]}[kind]
    torch.testing.assert_close(grad, want)
    assert kind == "k1" or want.abs().max() > 1e-3


def test_advantage_whitening_and_errors():
    m = _mask()
    adv, _ = compute_advantages("dr_grpo", torch.arange(4.0), m, group_size=2, whiten=True)
    sel = adv[m]
    assert sel.mean().abs() < 1e-5 and sel.std().item() == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="values"):
        compute_advantages("gae", torch.zeros(4), m)
    with pytest.raises(ValueError, match="estimator"):
        compute_advantages("a2c", torch.zeros(4), m)


def test_adaptive_kl_controller_moves_the_right_way():
    hi = AdaptiveKLController(0.1, target=1.0, horizon=100)
    for _ in range(5):
        before = hi.value
        hi.update(5.0, 10)  # KL above target -> stronger penalty
        assert hi.value > before
    # the proportional error is clipped at +0.2: factor 1 + 0.2 * 10 / 100
    assert hi.value == pytest.approx(0.1 * 1.02 ** 5)
    lo = AdaptiveKLController(0.1, target=1.0, horizon=100)
    lo.update(0.9, 10)  # below target -> weaker, by 1 + (0.9 - 1) * 10 / 100
    assert lo.value == pytest.approx(0.1 * 0.99)
    lo.update(0.0, 10)  # error clipped at -0.2
    assert lo.value == pytest.approx(0.1 * 0.99 * 0.98)
    lo.update(float("nan"), 10)
    assert lo.value == pytest.approx(0.1 * 0.99 * 0.98)
    f = FixedKLController(0.3)
    f.update(100.0, 10)
    assert f.value == 0.3
    c = make_kl_controller("adaptive", 0.2, 3.0, 50)
    c.update(6.0, 5)
    d = make_kl_controller("adaptive", 1.0, 1.0, 1)
    d.load_state_dict(c.state_dict())
    assert (d.value, d.target, d.horizon) == (c.value, 3.0, 50.0)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0)
    with pytest.raises(ValueError, match="kind"):
        make_kl_controller("pid", 0.1)


def test_combined_reward_weights_and_per_source():
    def digits(prompts, comps):
        return [float(sum(c.isdigit() for c in x)) for x in comps]

    r = CombinedReward([digits, LengthPenalty(target=2), RepetitionPenalty(2)], weights=[1.0, 0.5, 2.0])
    out = r(["p", "q"], ["12", "aaaa"])
    assert out.per_source["digits"].tolist() == [2.0, 0.0]
    assert out.per_source["length_penalty"].tolist() == [0.0, -2.0]
    # "aaaa": character 2-grams aa, aa, aa -> 2 of 3 repeated
    assert out.per_source["repetition_penalty"][1].item() == pytest.approx(-2 / 3)
    assert out.total.tolist() == pytest.approx([2.0, -1.0 - 4 / 3])
    assert out.valid.all()


def test_bad_rewards_raise_naming_the_source_or_are_dropped():
    def nan_on_b(prompts, comps):
        return [float("nan") if c == "b" else 1.0 for c in comps]

    def boom(prompts, comps):
        if "x" in comps:
            raise RuntimeError("judge offline")
        return [0.5] * len(comps)

    with pytest.raises(RewardError, match="nan_on_b.*non-finite"):
        CombinedReward([nan_on_b])(["p"] * 3, ["a", "b", "c"])
    with pytest.raises(RewardError, match="boom.*judge offline"):
        CombinedReward([boom])(["p"] * 2, ["a", "x"])
    with pytest.raises(RewardError, match="returned 1 rewards for 2"):
        CombinedReward([lambda p, c: [1.0]])(["p"] * 2, ["a", "b"])
    out = CombinedReward([nan_on_b, boom], on_bad_reward="drop")(["p"] * 4, ["a", "b", "x", "c"])
    assert out.valid.tolist() == [True, False, False, True]
    assert out.dropped == {"nan_on_b": 1, "boom": 1}
    assert out.total.tolist() == [1.5, 0.0, 0.0, 1.5]
    with pytest.raises(ValueError, match="on_bad_reward"):
        CombinedReward([boom], on_bad_reward="ignore")


def test_load_callable(tmp_path):
    f = tmp_path / "rw.py"
    f.write_text("def score(prompts, completions):\n    return [1.0] * len(completions)\n")
    fn = load_callable(f"{f}:score")
    assert fn(["a"], ["b"]) == [1.0]
    assert load_callable("math:sqrt")(4.0) == 2.0
    with pytest.raises(ValueError, match="module:function"):
        load_callable("math.sqrt")
    with pytest.raises(ValueError, match="no callable"):
        load_callable("math:nope")
    with pytest.raises(ValueError, match="cannot import"):
        load_callable("no_such_module_xyz:f")


def test_shape_scores_whiten_and_clip():
    s = torch.tensor([1.0, 2.0, 3.0, 10.0])
    w = shape_scores(s, whiten=True)
    assert w.mean().abs() < 1e-6 and w.std().item() == pytest.approx(1.0, abs=1e-4)
    assert shape_scores(s, clip=2.5).tolist() == [1.0, 2.0, 2.5, 2.5]
    rm = RunningMoments()
    shape_scores(s[:2], whiten=True, moments=rm)
    shape_scores(s[2:], whiten=True, moments=rm)
    assert rm.mean == pytest.approx(4.0) and rm.var == pytest.approx(float(s.var(unbiased=False)))
    with pytest.raises(ValueError, match="clip"):
        shape_scores(s, clip=0.0)


def test_group_estimators_through_ops_match_reference():
    s = torch.randn(8)
    m = torch.ones(8, 2, dtype=torch.bool)
    adv, _ = compute_advantages("rloo", s, m, group_size=4)
    assert torch.allclose(adv[:, 0], reference.group_advantages(s, 4, kind="rloo"), atol=1e-6)


def test_rl_config_validation():
    from rlhf_fast.trainers.rl_config import KLConfig, PPOConfig, RLConfig, RolloutConfig

    RLConfig()
    with pytest.raises(ValueError, match="estimator"):
        RLConfig(estimator="a2c")
    with pytest.raises(ValueError, match="group_size"):
        RLConfig(estimator="grpo", rollout=RolloutConfig(group_size=1))
    with pytest.raises(ValueError, match="mini_batch_size"):
        RLConfig(rollout=RolloutConfig(prompts_per_step=3, group_size=2), ppo=PPOConfig(mini_batch_size=4,
                                                                                       micro_batch_size=2))
    with pytest.raises(ValueError, match="micro_batch_size"):
        PPOConfig(mini_batch_size=8, micro_batch_size=3)
    with pytest.raises(ValueError, match="kl.placement"):
        KLConfig(placement="logits")
    with pytest.raises(ValueError, match="dual_clip"):
        PPOConfig(dual_clip=0.5)
    with pytest.raises(ValueError, match="rollout.top_p"):
        RolloutConfig(top_p=0.0)
    with pytest.raises(ValueError, match="rollout.cuda_graphs"):
        RolloutConfig(cuda_graphs="no")


def test_probe_bad_parameters_are_named():
    """Probe: out-of-range KL-controller parameters (inf, negative / nan n_steps, a huge n_steps that
    made β negative), kl of the wrong shape for group estimators, non-finite kl_coef, lists for
    tensors, NaN into running moments (poisoning every later step), bad CombinedReward weights and
    reward sources returning huge ints are named, not opaque or silently wrong."""
    from rlhf_fast.algorithms import RewardModelReward, gae_advantages

    for kw in (dict(init=float("inf")), dict(horizon=float("inf")), dict(target=float("inf"))):
        with pytest.raises(ValueError, match="must be a finite number"):
            AdaptiveKLController(**{"init": 0.1, "target": 6.0, "horizon": 10, **kw})
    c = AdaptiveKLController(0.1, target=6.0, horizon=10)
    for n in (-1, float("nan")):
        with pytest.raises(ValueError, match="n_steps must be a finite number >= 0"):
            c.update(1.0, n)
    with pytest.raises(TypeError, match="current_kl must be a number"):
        c.update("1", 5)
    assert c.update(0.0, 1000) == pytest.approx(0.1 * 0.8)  # at most one horizon per update: β stays > 0
    with pytest.raises(ValueError, match=r"state\['value'\] must be a finite number >= 0"):
        c.load_state_dict({"value": -1.0})
    m = torch.ones(6, 3)
    with pytest.raises(ValueError, match=r"kl must have shape \(6, 3\)"):
        compute_advantages("grpo", torch.randn(6), m, group_size=3, kl=torch.zeros(6, 4), kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef must be a finite number"):
        compute_advantages("reinforce++", torch.randn(6), m, kl=torch.zeros(6, 3), kl_coef=float("nan"))
    with pytest.raises(TypeError, match="scores must be a tensor"):
        compute_advantages("grpo", [1.0] * 6, m, group_size=3)
    with pytest.raises(TypeError, match="rewards must be a tensor"):
        gae_advantages([[1.0, 2.0, 3.0]], torch.zeros(1, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="at least one column"):
        token_rewards(torch.randn(6), torch.ones(6, 0))
    mo = RunningMoments()
    with pytest.raises(ValueError, match="finite values only"):
        shape_scores(torch.tensor([1.0, float("nan")]), whiten=True, moments=mo)
    assert mo.count == 0
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        shape_scores(torch.ones(3), whiten=True, eps=-1.0)
    with pytest.raises(ValueError, match="clip must be a number > 0"):
        shape_scores(torch.ones(3), clip="1")
    one = lambda p, c: [1.0] * len(c)  # noqa: E731
    with pytest.raises(ValueError, match="weights must be a list with one entry per source"):
        CombinedReward([one, one], weights=[1.0])
    for w in (float("nan"), "x"):
        with pytest.raises(ValueError, match="weight of reward source .* must be a finite number"):
            CombinedReward([(one, w)])
    with pytest.raises(ValueError, match=r"sources\[0\] must be a source or a \(source, weight\) pair"):
        CombinedReward([(one, 1.0, 2.0)])
    with pytest.raises(TypeError, match="sources must be a list"):
        CombinedReward(None)
    with pytest.raises(RewardError, match="must return a list of B=2 floats"):
        CombinedReward([lambda p, c: [10**400, 1]])(["a", "b"], ["x", "y"])
    # text is not a reward (float("1") would take it); bools are, as verifiable rewards return them
    with pytest.raises(RewardError, match="must return a list of B=2 floats, got list: a reward must be a number, "
                                          "got text '1'"):
        CombinedReward([lambda p, c: ["1", "2"]])(["a", "b"], ["x", "y"])
    assert CombinedReward([lambda p, c: [True, False]])(["a", "b"], ["x", "y"]).total.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="max_length must be an int >= 1"):
        RewardModelReward(torch.nn.Linear(2, 1), max_length=0)
    with pytest.raises(ValueError, match="target must be a finite number >= 0 or None"):
        LengthPenalty(target="5")


def test_reward_model_reward_scores_as_the_reward_trainer_encodes():
    # RL scores a trained reward model on the encoding it learned: prompt, response, eos (the
    # joint text without eos read the score at another token), whatever the lengths in the batch
    from rlhf_fast.algorithms import RewardModelReward
    from rlhf_fast.models.loading import reward_scores
    from rlhf_fast.models.tiny import sample_texts, tiny_reward_model, train_tokenizer
    from rlhf_fast.trainers.reward import _encode

    tok = train_tokenizer(sample_texts(32), 300)
    rm = tiny_reward_model(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=3, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).eval()
    prompts, responses = ["the cat", "a dog that runs"], [" sat on the mat today", " runs"]
    got = RewardModelReward(rm, tok, max_length=6)(prompts, responses, None)
    with torch.no_grad():
        want = [reward_scores(rm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
                for ids in (_encode(tok, p, r, 6) for p, r in zip(prompts, responses))]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert RewardModelReward(rm, tok)([], [], None) == []
