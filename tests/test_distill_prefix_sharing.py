"""Distillation with ``ppo.prefix_sharing``: each prompt computed once per group of its answers, by
the student's forward and backward and the teacher's forward.

:func:`distillation_loss` with ``prefix_groups`` against its padded path on hand-made groups
(answers sharing their first tokens, one group's answers identical, one-token answers, tool-result
holes in the loss mask, ragged groups; llama and qwen2 with grouped KV heads; group sizes 2 and 4;
beta 0, 0.5 and 1; padded heads' vocabulary rows; a scaled teacher head on the logits path): the
loss, its statistics and every student gradient, both backbones on one shared row. The trainer: one
step on the student's answers, one on the data's completions (``distill.lmbda`` 0) and one on the
teacher's (``distill.seq_kd``) equal to the padded step under the same group-level shuffle —
metrics and weights —, every forward a shared row of whole groups; evaluation; the refused
settings; two gloo ranks under FSDP2 against one process."""

import pytest
import torch

from rlhf_fast.models import llama_forward, tiny_causal_lm
from rlhf_fast.models import logprobs as L
from rlhf_fast.trainers.distill import DistillationTrainer, distillation_loss
from rlhf_fast.trainers.rl_config import (DISTILL_PPO_KEYS, DataConfig, DistillConfig, EvalConfig, KLConfig,
                                          ModelConfig, PPOConfig, RLConfig, RolloutConfig)
from tests.test_distill import fsdp2_matches_one_process, make_config, make_teacher
from tests.test_distill_gkd import RECORDS
from tests.test_rl_learning import PROMPTS, make_policy
from tests.test_rl_prefix_sharing import ADAM_REL, V, _close, _group_batch

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _models(family, kv_heads):
    """(student, teacher) of vocabulary V: the teacher wider (48 vs 32) and its head sharpened, so
    that the divergence is far from 0; random norms too, so a swapped weight shows."""
    out = []
    for hidden, seed, sharpen in ((32, 0, 1.0), (48, 5, 4.0)):
        m = tiny_causal_lm(V, family=family, hidden_size=hidden, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                           intermediate_size=48, seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            m.lm_head.weight.mul_(sharpen)
        out.append(m)
    out[1].requires_grad_(False)
    return out


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


class _Spy:
    """Records, per llama_forward call, ``(row shape, shared-prefix segments or None)``."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = llama_forward.hidden_states

        def spy(base, ids, *r, **k):
            self.calls.append((tuple(ids.shape), k.get("segments")))
            return real(base, ids, *r, **k)

        monkeypatch.setattr(llama_forward, "hidden_states", spy)

    def shared(self):
        return [seg is not None for _, seg in self.calls]


# ----------------------------------------------------------------------------- the loss


def _both(student, teacher, ids, am, rm, groups, **kw):
    """(loss, stats, student gradients) of the padded path, then of the shared path with ``groups``."""
    out = []
    for g in (None, groups):
        student.zero_grad(set_to_none=True)
        loss, st = distillation_loss(student, teacher, ids, am, rm, prefix_groups=g, **kw)
        loss.backward()
        out.append((loss.detach(), st, _grads(student)))
    return out


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("family,kv_heads,group_size", [("llama", None, 2), ("qwen2", 2, 4)])
def test_loss_stats_and_gradients_equal_the_padded(monkeypatch, family, kv_heads, group_size, beta):
    student, teacher = _models(family, kv_heads)
    ids, am, rm = _group_batch(group_size)
    B = ids.shape[0]
    groups = torch.arange(B).view(-1, group_size)
    kw = dict(beta=beta, temperature=0.7, normalizer=37.0)
    if beta == 0.5:  # padded heads: the first vocab_rows rows only (the divergence after the states is unchanged)
        kw["vocab_rows"] = V - 5
    spy = _Spy(monkeypatch)
    (l0, s0, g0), (l1, s1, g1) = _both(student, teacher, ids, am, rm, groups, **kw)
    # the padded path: two padded forwards; the shared one: student and teacher on one row each
    assert spy.shared() == [False, False, True, True]
    (shape_s, seg_s), (shape_t, seg_t) = spy.calls[2:]
    assert shape_s == shape_t and seg_s.groups == seg_t.groups and shape_s[0] == 1
    # each group's shared part holds its prompt, laid out once: the row is shorter by (K − 1) of them
    P = int(rm.float().argmax(1).max())  # (every answer starts at column P)
    prompt_len = am[:, :P].sum(1).view(-1, group_size)[:, 0]
    shared = torch.tensor([p for p, _ in seg_s.groups])
    assert bool((shared >= prompt_len).all())
    assert shape_s[1] == int(am.sum()) - (group_size - 1) * int(shared.sum())
    assert s1["tokens"] == s0["tokens"] == float(L._target_mask(am, rm).sum())
    assert float(l0) > 0.05  # a real comparison: the teacher is far from the student
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
    for k in ("divergence_sum", "entropy_sum"):
        assert s1[k] == pytest.approx(s0[k], rel=1e-5), k
    for a, b in zip(g1, g0):
        _close(a, b)
    assert any(float(g.abs().sum()) > 0 for g in g0)
    assert all(p.grad is None for p in teacher.parameters())


def test_ragged_groups_and_a_scaled_teacher_head(monkeypatch):
    """Groups of unequal sizes (-1 filling, :func:`row_groups`), and a teacher whose head scales its
    logits (Cohere's logit_scale on a llama backbone): the logits path after the shared states, equal
    to the padded path's."""
    student, teacher = _models("llama", None)
    teacher.config.logit_scale = 0.5
    ids, am, rm = _group_batch(4, seed=2)
    ragged = L.row_groups(torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3]))
    assert (ragged == -1).any()
    import rlhf_fast.trainers.distill as D

    seen = []
    td = D.transformed_divergence
    monkeypatch.setattr(D, "transformed_divergence", lambda *a, **k: seen.append(1) or td(*a, **k))
    (l0, s0, g0), (l1, s1, g1) = _both(student, teacher, ids, am, rm, ragged, beta=0.5, temperature=1.0)
    assert len(seen) == 2
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
    assert s1["entropy_sum"] == pytest.approx(s0["entropy_sum"], rel=1e-5)
    for a, b in zip(g1, g0):
        _close(a, b)


def test_a_batch_without_answer_tokens_and_bad_groups():
    """No answer token (a blank micro-batch): the padded blank path, a zero loss reaching every
    student weight. Groups that do not cover the rows once, and a backbone llama_forward cannot
    compute: ValueError."""
    student, teacher = _models("llama", None)
    ids, am, rm = _group_batch(2)
    groups = torch.arange(ids.shape[0]).view(-1, 2)
    loss, st = distillation_loss(student, teacher, ids, am, torch.zeros_like(rm), prefix_groups=groups)
    loss.backward()
    assert float(loss.detach()) == 0.0 and st == {"divergence_sum": 0.0, "entropy_sum": 0.0, "tokens": 0.0}
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0 for p in student.parameters())
    with pytest.raises(ValueError, match="prefix_groups must be a \\[G, K\\] tensor holding each of the"):
        distillation_loss(student, teacher, ids, am, rm, prefix_groups=groups[:-1])
    gpt2 = tiny_causal_lm(V, family="gpt2", hidden_size=32, num_layers=1, num_heads=2).requires_grad_(False)
    with pytest.raises(ValueError, match="prefix_sharing: the shared-prefix row runs only through"):
        distillation_loss(student, gpt2, ids, am, rm, prefix_groups=groups)


# ----------------------------------------------------------------------------- the trainer


_TIMES = ("time/", "tokens_per", "step_time")


def _pair(tmp_path, records=PROMPTS, group_size=2, prompts_per_step=4, mini=4, micro=2, **distill):
    """(padded, shared) trainers of one configuration, the padded one shuffling whole groups as the
    shared one does (so that both update on the same mini-batches)."""
    out = []
    for shared in (False, True):
        pol, tok = make_policy()
        cfg = make_config(tmp_path / str(shared), 0.5, distill=DistillConfig(beta=0.5, **distill),
                          rollout=RolloutConfig(prompts_per_step=prompts_per_step, group_size=group_size,
                                                max_new_tokens=6, temperature=0.9),
                          ppo=PPOConfig(epochs=2, mini_batch_size=mini, micro_batch_size=micro, prefix_sharing=shared))
        out.append(DistillationTrainer(cfg, pol, tok, prompts=records, teacher_model=make_teacher(tok)))
    a, b = out
    a._shuffle_units = b._shuffle_units
    return a, b


def _same_step(a, b, monkeypatch, on_policy):
    """One step of each (the shared one's forwards spied): metrics and weights equal; every
    forward of the shared step's update one shared row; returns the spied calls."""
    ma = a.step()
    spy = _Spy(monkeypatch)
    mb = b.step()
    keys = {k for k in ma if not k.startswith(_TIMES)}
    assert keys == {k for k in mb if not k.startswith(_TIMES)}
    for k in sorted(keys):
        assert mb[k] == pytest.approx(ma[k], rel=2e-5, abs=1e-7), k
    assert ma.get("distill/on_policy", 1.0) == float(on_policy) and ma["loss"] > 0.05
    for p, q in zip(a.policy.parameters(), b.policy.parameters()):
        _close(q.detach(), p.detach(), rel=ADAM_REL)
    assert any(not torch.equal(p, q) for p, q in zip(a.policy.parameters(), make_policy()[0].parameters()))
    cfg = b.config.ppo
    n_micro = cfg.epochs * b.config.batch_size // cfg.micro_batch_size
    update = [c for c in spy.calls if c[0][0] == 1]  # (generation's forwards are the engine's own)
    assert len(update) == 2 * n_micro and all(seg is not None for _, seg in update)  # student + teacher each
    # each micro-batch is whole groups: its prompts, each with group_size answers
    G = b.config.rollout.group_size
    assert all(len(seg.groups) == cfg.micro_batch_size // G and all(len(br) == G for _, br in seg.groups)
               for _, seg in update)
    return update


@pytest.mark.parametrize("group_size,micro", [(2, 2), (4, 4)])
def test_an_on_policy_step_equals_the_padded(tmp_path, monkeypatch, group_size, micro):
    a, b = _pair(tmp_path, group_size=group_size, prompts_per_step=8 // group_size, mini=4 * (group_size // 2),
                 micro=micro)
    _same_step(a, b, monkeypatch, on_policy=True)
    data, _ = b.rollout()  # each prompt's answers one group, shuffled as one unit
    assert data.group.tolist() == [i // group_size for i in range(8)]
    assert b._shuffle_units(data) == [group_size] * (8 // group_size)


def test_an_off_policy_step_on_the_data_completions_equals_the_padded(tmp_path, monkeypatch):
    """``distill.lmbda`` 0: the data's completions, each ``group_size`` times — a group's rows are
    identical, so its shared part is the whole row and each answer is computed once."""
    a, b = _pair(tmp_path, records=RECORDS, lmbda=0.0)
    update = _same_step(a, b, monkeypatch, on_policy=False)
    for shape, seg in update:
        assert all(branches == (0, 0) for _, branches in seg.groups) and shape[1] == sum(p for p, _ in seg.groups)


def test_an_off_policy_step_on_the_teachers_answers_equals_the_padded(tmp_path, monkeypatch):
    a, b = _pair(tmp_path, records=RECORDS, lmbda=0.0, seq_kd=True)
    _same_step(a, b, monkeypatch, on_policy=False)


def test_evaluation_shares_too(tmp_path, monkeypatch):
    def one(shared):
        pol, tok = make_policy()
        cfg = make_config(tmp_path / str(shared), 0.5, data=DataConfig(eval_prompts=["b", "1 2", "x y"]),
                          eval=EvalConfig(group_size=2, temperature=0.9),
                          ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8, prefix_sharing=shared))
        return DistillationTrainer(cfg, pol, tok, prompts=PROMPTS, teacher_model=make_teacher(tok))

    a = one(False).evaluate()
    spy = _Spy(monkeypatch)
    b = one(True).evaluate()
    rows = [seg for shape, seg in spy.calls if shape[0] == 1]
    assert len(rows) == 2 and all(len(seg.groups) == 3 and all(len(br) == 2 for _, br in seg.groups) for seg in rows)
    assert a.keys() == b.keys() and a["eval/loss"] > 0.05
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-5), k


# ----------------------------------------------------------------------------- refused settings


def _shared_config(tmp_path, **kw):
    kw.setdefault("ppo", PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=4, prefix_sharing=True))
    return make_config(tmp_path, **kw)


def test_the_config_takes_the_key_and_needs_whole_groups(tmp_path):
    assert "prefix_sharing" in DISTILL_PPO_KEYS
    cfg = RLConfig(estimator="distill", distill=DistillConfig(teacher="tiny:llama"), kl=KLConfig(coef=0.0),
                   ppo=PPOConfig(prefix_sharing=True))
    assert cfg.ppo.prefix_sharing
    for ro, mini, micro, key in ((RolloutConfig(prompts_per_step=2, group_size=4), 8, 2, "micro_batch_size"),
                                 (RolloutConfig(prompts_per_step=3, group_size=4), 6, 6, "mini_batch_size")):
        with pytest.raises(ValueError, match=rf"ppo.prefix_sharing .* ppo.{key} .* multiple of rollout.group_size"):
            make_config(tmp_path, rollout=ro, ppo=PPOConfig(mini_batch_size=mini, micro_batch_size=micro,
                                                            prefix_sharing=True))


def test_models_it_cannot_run_are_refused_at_the_start(tmp_path):
    from rlhf_fast.ops import use_backend
    from tests.test_distill_softcap import build

    pol, tok = make_policy()
    cfg = _shared_config(tmp_path)
    with pytest.raises(ValueError, match=r"ppo.prefix_sharing: true needs .*final_logit_softcapping.*distill.teacher"):
        DistillationTrainer(cfg, pol, tok, prompts=PROMPTS, teacher_model=build("gemma2", tok))
    gpt2 = tiny_causal_lm(len(tok), family="gpt2", hidden_size=32, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match=r"ppo.prefix_sharing: true needs .*\(GPT2Model\) is not one "
                                         r"rlhf_fast.models.llama_forward computes.*distill.teacher"):
        DistillationTrainer(cfg, pol, tok, prompts=PROMPTS, teacher_model=gpt2)
    with use_backend("torch"), pytest.raises(ValueError, match=r"ppo.prefix_sharing: true needs .*torch backend"):
        DistillationTrainer(cfg, pol, tok, prompts=PROMPTS, teacher_model=make_teacher(tok))
    DistillationTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS, teacher_model=gpt2)  # padded: as before
    lora = _shared_config(tmp_path, model=ModelConfig(lora={"r": 4}))
    with pytest.raises(ValueError, match=r"ppo.prefix_sharing: true needs .*not one rlhf_fast.models.llama_forward"):
        DistillationTrainer(lora, *make_policy(), prompts=PROMPTS, teacher_model=make_teacher(tok))


# ----------------------------------------------------------------------------- ranks


def test_two_fsdp2_ranks_match_one_process(tmp_path):
    """``torchrun`` with 2 gloo ranks and FSDP2 (student and teacher sharded, each rank's micro-batches
    shared rows of its own groups, blank micro-batches where a rank's share of a mini-batch runs out)
    logs the numbers of one process."""
    prompts = "count to five:\nlist three colours:\ngo on:\nwrite:\na b\nc d\nthe cat sat\nhello\n"
    fsdp2_matches_one_process(tmp_path, prompts, ["--rollout.group_size", "2", "--ppo.mini_batch_size", "4",
                                                  "--ppo.prefix_sharing", "true"])
