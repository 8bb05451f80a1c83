"""Review of on-policy distillation (rlhf_fast/trainers/distill.py): defects found against TRL
1.16's DistillationTrainer / GKDTrainer and on awkward inputs, one test each."""

import os

import pytest
import torch

from rlhf_fast.models.tiny import tiny_causal_lm
from rlhf_fast.trainers.distill import DistillationTrainer
from rlhf_fast.trainers.rl_config import DistillConfig
from tests.test_distill import PROMPTS, make_config, make_teacher
from tests.test_distill_gkd import RECORDS
from tests.test_rl_learning import make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _padded_student(tok, extra):
    """The student of make_policy with ``extra`` padding rows past the tokenizer (head and embedding)."""
    return tiny_causal_lm(len(tok) + extra, hidden_size=32, num_layers=2, num_heads=2, seed=0,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)


@pytest.mark.parametrize("sampler", ["student", "teacher"])
def test_a_sampled_padding_row_token_does_not_crash_the_other_model(tmp_path, sampler):
    """Heads padded past the tokenizer to different sizes are accepted (compared over the
    tokenizer's rows), but the sampler draws from its whole head: a padding-row id (no token)
    the other model's embedding does not hold crashed its forward mid-run ("input_ids must be
    token ids in [0, 48)"). The student samples on-policy steps, the teacher seq_kd steps. An
    answer now ends before such a token: every trained id is a tokenizer id."""
    _, tok = make_policy()
    n = len(tok)
    if sampler == "student":  # the student's head has 40 rows the teacher cannot read
        pol, teacher, d = _padded_student(tok, 40), make_teacher(tok), DistillConfig()
        prompts = PROMPTS
    else:  # seq_kd: the teacher's head has 40 rows the student cannot read
        pol, teacher, d = make_policy()[0], make_teacher(tok, vocab=n + 40, scale=1.0), \
            DistillConfig(lmbda=0.0, seq_kd=True)
        prompts = RECORDS
    tr = DistillationTrainer(make_config(tmp_path, distill=d), pol, tok, prompts=prompts, teacher_model=teacher)
    assert tr._vocab_rows == n
    sampled = []
    gen = tr._generate
    tr._generate = lambda *a, **k: sampled.append(gen(*a, **k)) or sampled[-1]
    data, m = tr.rollout()
    raw = sampled[0][0]
    assert bool((raw.input_ids[raw.response_mask.bool()] >= n).any())  # the case arises
    out = tr.update(data)  # crashed in the other model's forward
    assert not bool((data.input_ids >= n).any())
    assert bool(data.response_mask.any())
    assert torch.isfinite(torch.tensor(out["loss"])) and out["loss"] > 0


def test_the_policy_itself_as_teacher_is_refused_clearly(tmp_path):
    """``teacher_model=`` the policy object (a user's self-distillation attempt): the teacher is
    frozen in place, which froze the student too, and the first update failed with torch's
    "element 0 of tensors does not require grad". Refused at construction, naming the fix; the
    student's parameters stay trainable."""
    pol, tok = make_policy()
    with pytest.raises(ValueError, match="teacher_model=.*the policy"):
        DistillationTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS, teacher_model=pol)
    assert all(p.requires_grad for p in pol.parameters())


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_an_empty_vocabulary_is_refused_by_the_divergence_op(backend):
    """Heads with no row (V = 0) have no next-token distribution: fused_linear_divergence returned
    zeros (a perfect match) where token_logprobs refuses such logits; now a ValueError naming
    student_weight."""
    from rlhf_fast import ops
    from tests.test_distill import divergence_backends

    if backend not in divergence_backends():
        pytest.skip(f"no {backend} backend here")
    h, w = torch.randn(3, 4), torch.randn(0, 4)
    with ops.use_backend(backend), pytest.raises(ValueError, match="student_weight .*vocabulary"):
        ops.fused_linear_divergence(h, w, h, w)


def test_uld_student_padding_row_token_does_not_crash(tmp_path, monkeypatch):
    """GOLD (distill.use_uld_loss, extended ULD): a student whose head has rows past its
    tokenizer samples them; such an id has no token piece, and the byte offsets failed with
    "object of type 'NoneType' has no len()" (TRL's piece_byte_len fails alike). The answer now
    ends before it, as in the same-tokenizer loss."""
    import tests.test_distill_gold as gold
    from rlhf_fast.models.tiny import train_tokenizer
    from tests.test_rl_learning import TEXTS

    stok, ttok = train_tokenizer(TEXTS, 48), train_tokenizer(gold.TEACHER_TEXTS, 64)
    build = gold.tiny_causal_lm
    monkeypatch.setattr(gold, "tiny_causal_lm", lambda v, **kw: build(v + 40 if v == len(stok) else v, **kw))
    tr = gold.gold_trainer(tmp_path, (stok, ttok))
    assert tr.policy.get_output_embeddings().weight.shape[0] == len(stok) + 40
    sampled = []
    gen = tr._generate
    tr._generate = lambda *a, **k: sampled.append(gen(*a, **k)) or sampled[-1]
    data, _ = tr.rollout()
    raw = sampled[0][0]
    assert bool((raw.input_ids[raw.response_mask.bool()] >= len(stok)).any())  # the case arises
    out = tr.update(data)
    assert not bool((data.input_ids >= len(stok)).any())
    assert torch.isfinite(torch.tensor(out["loss"]))
