"""Distillation with LM heads whose logits are transformed after the matmul (Gemma 2's
``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``): the
transform reproduces each model's own logits, the loss and gradients equal TRL's own
``_chunked_divergence_loss`` (which takes the scale and softcap) for student / teacher pairs where
either, both or neither head is transformed, at temperature 0.7, the logits path holds one chunk
of rows at a time (forward and backward), a short run lowers the held-out divergence, generation
samples from the softcapped distribution, and heads nothing can compute are refused."""

import math

import pytest
import torch

from rlhf_fast.models.logprobs import hidden_states, sequence_logprobs
from rlhf_fast.ops import reference
from rlhf_fast.trainers import distill as D
from rlhf_fast.trainers.distill import DistillationTrainer, HeadTransform, head_logits, head_transform
from rlhf_fast.trainers.rl_config import DataConfig, DistillConfig, EvalConfig, PPOConfig, RolloutConfig
from tests.test_distill import EVAL_PROMPTS, TRAIN_PROMPTS, make_config, make_teacher, student_grads
from tests.test_rl_learning import PROMPTS, make_policy

pytestmark = [pytest.mark.usefixtures("one_thread_per_module"),
              pytest.mark.filterwarnings("ignore:rlhf_fast. falling back:RuntimeWarning")]

SOFTCAP, COHERE_SCALE, GRANITE_SCALING = 5.0, 0.25, 4.0


def build(family, tok, hidden=32, seed=0, sharpen=1.0):
    """A tiny causal LM of ``family`` ("gemma2": softcapped at 5, "cohere": logits × 0.25,
    "granite": logits / 4, "llama": plain) on ``tok``, its head times ``sharpen``."""
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig

    if family == "llama":
        model = make_teacher(tok, hidden=hidden, seed=seed, scale=sharpen)
        return model
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = {"gemma2": lambda: Gemma2Config(head_dim=hidden // 2, final_logit_softcapping=SOFTCAP, **common),
           "cohere": lambda: CohereConfig(logit_scale=COHERE_SCALE, **common),
           "granite": lambda: GraniteConfig(logits_scaling=GRANITE_SCALING, **common)}[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


def trl_args(family):
    """TRL's ``_chunked_divergence_loss`` keywords of a model of ``family``, written from the
    family (not read by our code): scale, softcap."""
    return {"gemma2": (1.0, SOFTCAP), "cohere": (COHERE_SCALE, None), "granite": (1 / GRANITE_SCALING, None),
            "llama": (1.0, None)}[family]


def trainer(tmp_path, student_family, teacher_family, *, beta=1.0, temperature=0.7, chunk_size=None, teacher_hidden=48,
            **kw):
    _, tok = make_policy()
    cfg = make_config(tmp_path, beta, distill=DistillConfig(beta=beta, chunk_size=chunk_size),
                      rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=6,
                                            temperature=temperature), **kw)
    student = build(student_family, tok, seed=0)
    teacher = build(teacher_family, tok, hidden=teacher_hidden, seed=7, sharpen=20.0)
    return DistillationTrainer(cfg, student, tok, prompts=PROMPTS, teacher_model=teacher)


# ----------------------------------------------------------------------------- the transform


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_the_head_transform_gives_the_models_own_logits(tok_and_batch, family):
    tok, ids, am = tok_and_batch
    model = build(family, tok, sharpen=20.0)  # large logits: the softcap bites
    tf = head_transform(model)
    assert tf != HeadTransform() and tf == HeadTransform(*trl_args(family))
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=am).logits  # [B, T, V]
        h = hidden_states(model, ids, am)
        ours = head_logits(h, model.lm_head.weight, model.lm_head.bias, tf, 1.0, torch.float32)
        plain = h @ model.lm_head.weight.t()
    keep = am.bool()
    torch.testing.assert_close(ours[keep], own[keep], rtol=1e-5, atol=1e-5)
    assert (plain[keep] - own[keep]).abs().max() > 1.0  # the transform matters here
    assert head_transform(build("llama", tok)) == head_transform(torch.nn.Linear(2, 2)) == HeadTransform()


@pytest.fixture(scope="module")
def tok_and_batch():
    _, tok = make_policy()
    x = tok(["hello world", "a b"], return_tensors="pt", padding=True)
    return tok, x["input_ids"], x["attention_mask"]


# ----------------------------------------------------------------------------- TRL parity


def trl_loss(tr, data, student_family, teacher_family, num_items):
    """TRL's loss on ``data`` as tests/test_distill.py's ``trl_loss`` computes it (the backbones'
    states at the completion columns), with TRL's scale and softcap of each family."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    ids, am = data.input_ids, data.attention_mask
    P = int(data.response_mask.float().argmax(1).min())
    pos = (am.long().cumsum(1) - 1).clamp(min=0)

    def last_hidden(model):
        return model.model(input_ids=ids, attention_mask=am.long(), position_ids=pos).last_hidden_state[:, P - 1:-1]

    hs = last_hidden(tr.policy)
    with torch.no_grad():
        ht = last_hidden(tr.teacher)
    (ss, sc), (ts, tc) = trl_args(student_family), trl_args(teacher_family)
    loss, ent, n = _chunked_divergence_loss(
        hs, ht, tr.policy.lm_head.weight, tr.teacher.lm_head.weight, am[:, P:].long(), tr.config.distill.beta,
        num_items_in_batch=num_items, student_logit_scale=ss, teacher_logit_scale=ts,
        student_final_logit_softcapping=sc, teacher_final_logit_softcapping=tc,
        temperature=tr.config.rollout.temperature)
    return loss, float(ent), int(n)


PAIRS = [("gemma2", "gemma2"), ("cohere", "granite"), ("llama", "gemma2"), ("gemma2", "llama")]


@pytest.mark.parametrize("student,teacher", PAIRS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_and_gradients_equal_trl(tmp_path, student, teacher, beta):
    tr = trainer(tmp_path, student, teacher, beta=beta, chunk_size=7)
    data, _ = tr.rollout()
    n = int(data.response_mask.sum())
    tr.policy.zero_grad(set_to_none=True)
    ref, ent, n_trl = trl_loss(tr, data, student, teacher, torch.tensor(float(n)))
    ref.backward()
    g_trl = student_grads(tr)
    assert n_trl == n > 7  # several chunks
    tr.policy.zero_grad(set_to_none=True)
    st = tr.policy_backward(data, 3)  # three micro-batches
    assert st["loss"] == pytest.approx(float(ref.detach()), rel=1e-5)
    assert st["loss"] > 0.05
    assert st["entropy"] == pytest.approx(ent / n, rel=1e-5)
    for a, b in zip(student_grads(tr), g_trl):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in tr.teacher.parameters())


def test_plain_heads_keep_the_fused_op(tmp_path, monkeypatch):
    """Two plain heads never reach the logits path (the fused op's numbers, bit for bit)."""
    called = []
    monkeypatch.setattr(D, "transformed_divergence", lambda *a, **k: called.append(1))
    tr = trainer(tmp_path, "llama", "llama")
    data, _ = tr.rollout()
    tr.policy_backward(data, 8)
    assert not called


def test_a_blank_micro_batch_reaches_every_student_weight(tmp_path):
    """No answer token in a micro-batch (a rank whose share ran out): a zero loss whose backward
    gives zero gradients to every student weight, softcapped head included."""
    tr = trainer(tmp_path, "gemma2", "cohere")
    data, _ = tr.rollout()
    tr.policy.zero_grad(set_to_none=True)
    loss, st = tr.distill_loss(data.input_ids, data.attention_mask, torch.zeros_like(data.response_mask))
    loss.backward()
    assert float(loss.detach()) == 0.0 and st["tokens"] == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in tr.policy.parameters())


# ----------------------------------------------------------------------------- memory


def test_the_logits_path_holds_one_chunk_forward_and_backward(tmp_path, monkeypatch):
    """With chunk_size 5: nothing of vocabulary width is kept for the backward (the chunks are
    recomputed there), and every divergence, forward and backward, sees at most 5 rows."""
    tr = trainer(tmp_path, "gemma2", "cohere", beta=0.5, chunk_size=5, teacher_hidden=64)
    data, _ = tr.rollout()
    V = len(tr.tokenizer)
    assert V not in (32, 64)  # no hidden width looks like a row of logits
    rows, phase = [], ["forward"]
    real = reference.divergence_from_logits

    def spy(zs, zt, beta):
        rows.append((phase[0], zs.shape[0]))
        return real(zs, zt, beta)

    monkeypatch.setattr(reference, "divergence_from_logits", spy)
    kept = []

    def pack(t):
        if t.dim() >= 1 and t.shape[-1] == V and t.numel() > V:
            kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, st = tr.distill_loss(data.input_ids, data.attention_mask, data.response_mask)
    phase[0] = "backward"
    loss.backward()
    n = int(st["tokens"])
    assert n > 10 and not kept, kept
    fwd = [r for p, r in rows if p == "forward"]
    bwd = [r for p, r in rows if p == "backward"]
    assert sum(fwd) == sum(bwd) == n and max(fwd + bwd) <= 5


# ----------------------------------------------------------------------------- learning


def eval_divergence(tmp_path, lr, steps=20):
    _, tok = make_policy()
    cfg = make_config(tmp_path, 1.0, lr, steps=steps, eval_every=steps, data=DataConfig(eval_prompts=EVAL_PROMPTS),
                      eval=EvalConfig(group_size=4, temperature=0.9),
                      rollout=RolloutConfig(prompts_per_step=8, group_size=2, max_new_tokens=6, temperature=0.7),
                      ppo=PPOConfig(epochs=1, mini_batch_size=16, micro_batch_size=16))
    tr = DistillationTrainer(cfg, build("gemma2", tok), tok, prompts=TRAIN_PROMPTS,
                             teacher_model=build("cohere", tok, hidden=48, seed=7, sharpen=16.0))
    before = tr.evaluate()["eval/distill/divergence"]
    hist = tr.train()
    assert all(math.isfinite(h["loss"]) for h in hist)
    return before, hist[-1]["eval/distill/divergence"]


def test_a_softcapped_student_moves_towards_a_scaled_teacher(tmp_path):
    """A Gemma 2 student (softcap 5) and a Cohere teacher (logits × 0.25), temperature 0.7: the
    held-out divergence after 20 steps / before, measured over seeds 0–2: 0.25–0.36 (lr 3e-2;
    0.62–0.68 at lr 1e-2); with lr ≈ 0 it stays (the evaluation's sampling noise only)."""
    before, after = eval_divergence(tmp_path / "a", 3e-2)
    assert after < 0.6 * before, (before, after)
    before0, after0 = eval_divergence(tmp_path / "b", 1e-12)
    assert before0 == pytest.approx(before) and after0 > 0.9 * before0, (before0, after0)


# ----------------------------------------------------------------------------- generation


def test_generation_samples_from_the_softcapped_distribution():
    """The rollout engine's behaviour log-probs of a softcapped Gemma 2 are the log-probs of its
    softcapped logits (transformers' forward applies the cap; only Llama-family models take the
    engine's own decoder), not those of the plain head."""
    from rlhf_fast.rollout import HFRolloutEngine, SamplingParams

    _, tok = make_policy()
    model = build("gemma2", tok, sharpen=20.0).eval()
    out = HFRolloutEngine(model, tok).generate(PROMPTS[:3], SamplingParams(temperature=0.8, max_new_tokens=5, n=2,
                                                                           seed=3))
    ids, am, rm = out.input_ids, out.attention_mask, out.response_mask.bool()
    with torch.no_grad():
        lp = sequence_logprobs(model, ids, am, response_mask=rm, temperature=0.8)
        h = hidden_states(model, ids, am)
        plain = torch.log_softmax((h @ model.lm_head.weight.t()) / 0.8, -1)[:, :-1]
        plain = plain.gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(out.behaviour_logp.float()[rm], lp[rm], rtol=1e-4, atol=1e-4)
    assert (plain[rm[:, 1:]] - lp[:, 1:][rm[:, 1:]]).abs().max() > 0.1


# ----------------------------------------------------------------------------- refused heads


def test_a_head_nothing_can_compute_is_refused(tmp_path):
    _, tok = make_policy()
    teacher = make_teacher(tok)
    teacher.config.mup_width_scale = 2.0  # in logprobs' unfusable keys; TRL reads no such scale
    with pytest.raises(ValueError, match=r"teacher's LM head \(distill.teacher\): config.mup_width_scale=2.0 "):
        DistillationTrainer(make_config(tmp_path), *make_policy(), prompts=PROMPTS, teacher_model=teacher)
    student, tok = make_policy()
    student.lm_head = torch.nn.Sequential(student.lm_head)
    student.get_output_embeddings = lambda: student.lm_head
    with pytest.raises(ValueError, match="the student's LM head: the LM head is a Sequential, not a Linear"):
        DistillationTrainer(make_config(tmp_path), student, tok, prompts=PROMPTS, teacher_model=make_teacher(tok))
