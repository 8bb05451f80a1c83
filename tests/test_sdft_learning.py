"""SDFT learns what the privileged context tells its teacher: a tiny policy first trained (plain
SFT loop here) to copy the answer after "q{i}\\n\\n{X}" but to answer "q{i}" at random
learns, within 15 SDFT steps, each prompt's answer X without the context; with lr 1e-12, or
with a teacher that reads no context, it does not."""

import os
import random

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from rlhf_fast.trainers.rl_config import OptimConfig, PPOConfig, RLConfig, RolloutConfig, SDFTConfig  # noqa: E402
from rlhf_fast.trainers.sdft import SDFTTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

LETTERS = "abcd"
ANSWERS = "cadb"  # prompt i's answer (the privileged context), not the letter order


def _student_text(i, letter):
    return f"q{i} {letter}"


def _teacher_text(i, letter):  # SDFT's default template "{prompt}\n\n{privileged_context}", then the answer
    return f"q{i}\n\n{letter} {letter}"


@pytest.fixture(scope="module")
def pretrained(one_thread_per_module):
    """(tokenizer, state dict) of a 2-layer hidden-32 llama after 40 AdamW steps (lr 2e-2, 16 rows)
    on half teacher-format rows (copy the context) and half student-format rows (a random letter)."""
    from rlhf_fast.models.tiny import tiny_causal_lm, train_tokenizer

    n = len(ANSWERS)
    texts = [f(i, x) for i in range(n) for x in LETTERS for f in (_student_text, _teacher_text)] * 3
    tok = train_tokenizer(texts, 40)
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=0, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    rng = random.Random(0)
    for _ in range(40):
        rows = []
        for _ in range(16):
            f = _teacher_text if rng.random() < 0.5 else _student_text
            rows.append(tok(f(rng.randrange(n), rng.choice(LETTERS)))["input_ids"] + [tok.eos_token_id])
        w = max(map(len, rows))
        ids = torch.tensor([[tok.pad_token_id] * (w - len(r)) + r for r in rows])
        am = torch.tensor([[0] * (w - len(r)) + [1] * len(r) for r in rows])
        loss = model(input_ids=ids, attention_mask=am, labels=ids.masked_fill(am == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tok, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _policy(pretrained):
    from rlhf_fast.models.tiny import tiny_causal_lm

    tok, state = pretrained
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=0, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.load_state_dict(state)
    return model.eval(), tok


@torch.no_grad()
def p_answer(model, tok, context=False):
    """Mean over the prompts of p(" X" | prompt), the prompt with its context when ``context``."""
    out = []
    for i, x in enumerate(ANSWERS):
        prompt = f"q{i}\n\n{x}" if context else f"q{i}"
        head, full = tok(prompt)["input_ids"], tok(f"{prompt} {x}")["input_ids"]
        assert full[:len(head)] == head
        lp = model(input_ids=torch.tensor([full])).logits[0, :-1].float().log_softmax(-1)
        out.append(float(sum(lp[j - 1, full[j]] for j in range(len(head), len(full))).exp()))
    return sum(out) / len(out)


def run_sdft(tmp_path, pretrained, lr=1e-2, context=True, steps=15, **sdft):
    pol, tok = _policy(pretrained)
    prompts = [{"prompt": f"q{i}", "privileged_context": x if context else ""} for i, x in enumerate(ANSWERS)]
    cfg = RLConfig(estimator="sdft", steps=steps, output_dir=str(tmp_path / "run"), progress=False, sample_every=0,
                   seed=0, rollout=RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=3),
                   ppo=PPOConfig(epochs=1, mini_batch_size=16, micro_batch_size=16), optim=OptimConfig(lr=lr),
                   sdft=SDFTConfig(distillation_topk=10, **sdft))
    tr = SDFTTrainer(cfg, pol, tok, prompts=prompts)
    history = tr.train()
    return p_answer(tr.policy, tok), history


def test_pretrained_policy_answers_at_chance_without_the_context(pretrained):
    pol, tok = _policy(pretrained)
    assert p_answer(pol, tok, context=True) > 0.8  # the teacher knows the answer
    assert p_answer(pol, tok) < 0.3  # the student does not (chance: 1/4, before the end of text)


@pytest.mark.parametrize("kind,least", [
    ("base", 0.9),  # measured 0.99 (from 0.11)
    ("ema", 0.4),  # measured 0.71: the teacher drifts with the student (its copying weakens)
])
def test_sdft_learns_the_answer_of_the_privileged_context(tmp_path, pretrained, kind, least):
    p, history = run_sdft(tmp_path, pretrained, teacher_model_kind=kind)
    assert p > least, p
    assert history[-1]["loss"] < 0.2 * history[0]["loss"]


def test_lr_1e_12_does_not_learn(tmp_path, pretrained):
    pol, tok = _policy(pretrained)
    p, _ = run_sdft(tmp_path, pretrained, lr=1e-12)
    assert p == pytest.approx(p_answer(pol, tok), abs=1e-4)


def test_a_teacher_without_the_context_does_not_learn_the_answer(tmp_path, pretrained):
    p, _ = run_sdft(tmp_path, pretrained, context=False)
    assert p < 0.3, p
