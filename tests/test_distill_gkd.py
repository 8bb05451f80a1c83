"""GKD's options on the distillation trainer (TRL's experimental ``GKDTrainer`` / ``GKDConfig``):
``distill.lmbda`` (on- or off-policy per step, TRL's own ``training_step`` run on our per-step
draw), ``distill.seq_kd`` (the teacher answers the off-policy steps), the data's completions as
the off-policy answers (token ids against TRL's ChatML collator and SFT's rule), the loss on an
off-policy batch against TRL's ``generalized_jsd_loss``, exact resume with lmbda 0.5, TRL's
``num_tokens`` across a resume, and the refused settings."""

import contextlib
import json
import os
import warnings

import pytest
import torch

from rlhf_fast.models.tiny import CHAT_TEMPLATE
from rlhf_fast.rollout import HFRolloutEngine, SamplingParams
from rlhf_fast.trainers.distill import DistillationTrainer, gkd_on_policy, gkd_uniform
from rlhf_fast.trainers.rl_config import DistillConfig, PPOConfig, RLConfig, RolloutConfig
from tests.test_distill import make_config, make_teacher
from tests.conftest import run_rows
from tests.test_rl_learning import make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

RECORDS = [{"prompt": "q:", "completion": "a b"}, {"prompt": "x", "completion": "y z w"},
           {"prompt": "0", "completion": "1 2 3"}, {"prompt": "a b", "completion": "c d e f"}]
CHATS = [{"prompt": [{"role": "user", "content": p["prompt"]}],
          "completion": [{"role": "assistant", "content": p["completion"]}]} for p in RECORDS]


def gkd(tmp_path, lmbda=0.0, seq_kd=False, beta=1.0, records=RECORDS, chat=False, **kw):
    pol, tok = make_policy()
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    cfg = make_config(tmp_path, beta, distill=DistillConfig(beta=beta, lmbda=lmbda, seq_kd=seq_kd), **kw)
    return DistillationTrainer(cfg, pol, tok, prompts=records, teacher_model=make_teacher(tok))


def rows_of(data, i):
    """(prompt ids, answer ids) of row ``i`` of RolloutTensors ``data``: the attended tokens
    before the first answer token, and the answer tokens."""
    ids, am, rm = data.input_ids[i], data.attention_mask[i].bool(), data.response_mask[i].bool()
    first = int(rm.float().argmax())
    return ids[:first][am[:first]].tolist(), ids[rm].tolist()


# ----------------------------------------------------------------------------- the choice per step


def trl_choices(monkeypatch, lmbda, seq_kd, seed, steps):
    """Run TRL's own ``GKDTrainer.training_step`` (trl/experimental/gkd/gkd_trainer.py) on a bare
    instance, its ``random.random()`` replaced by our per-step draw :func:`gkd_uniform`, and
    record which answers it trains on: "student" (its ``generate_on_policy_outputs`` with the
    model), "teacher" (with ``self.teacher_model``: seq_kd) or "data" (the inputs unchanged)."""
    import trl.experimental.gkd.gkd_trainer as G

    tr = G.GKDTrainer.__new__(G.GKDTrainer)
    student, teacher = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    tr.lmbda, tr.seq_kd, tr.teacher_model = lmbda, seq_kd, teacher
    tr.accelerator, tr.generation_kwargs, tr.generation_config = None, {}, None
    tr.args = type("Args", (), {"gradient_checkpointing_kwargs": None})()
    tr.generate_on_policy_outputs = lambda model, inputs, cfg: ("student" if model is student else "teacher",) * 3
    monkeypatch.setattr(G, "unwrap_model_for_generation", lambda model, *a, **k: contextlib.nullcontext(model))
    monkeypatch.setattr(G.SFTTrainer, "training_step", lambda self, model, inputs, n=None: inputs["input_ids"])
    out = []
    for step in range(steps):
        monkeypatch.setattr(G.random, "random", lambda: gkd_uniform(seed, step))
        out.append(G.GKDTrainer.training_step(tr, student, {"input_ids": "data"}))
    return out


@pytest.mark.parametrize("lmbda", [0.0, 0.3, 0.5, 1.0])
def test_the_choice_per_step_is_trls_rule(monkeypatch, lmbda):
    ours = ["student" if gkd_on_policy(3, s, lmbda) else "data" for s in range(200)]
    assert ours == trl_choices(monkeypatch, lmbda, False, 3, 200)
    seq = ["student" if gkd_on_policy(3, s, lmbda) else "teacher" for s in range(200)]
    assert seq == trl_choices(monkeypatch, lmbda, True, 3, 200)
    frac = ours.count("student") / len(ours)
    assert abs(frac - lmbda) < 0.1, frac  # the draw is uniform
    # a function of (seed, step) alone: the same again, another for another seed
    assert [gkd_uniform(3, s) for s in range(5)] == [gkd_uniform(3, s) for s in range(5)]
    assert [gkd_uniform(3, s) for s in range(5)] != [gkd_uniform(4, s) for s in range(5)]


def test_the_trainer_logs_the_choice_and_draws_nothing_else(tmp_path):
    tr = gkd(tmp_path, lmbda=0.5, steps=8)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    on = []
    for _ in range(8):
        step = tr.global_step
        kind = tr._step_batch()[3]
        assert torch.equal(torch.get_rng_state(), state) or kind  # an off-policy step draws nothing of torch's
        on.append(kind)
        assert kind == gkd_on_policy(tr.config.seed, step, 0.5)
        tr.global_step += 1
        state = torch.get_rng_state()
    assert True in on and False in on, on


# ----------------------------------------------------------------------------- the off-policy answers


@pytest.mark.parametrize("chat", [False, True])
def test_off_policy_steps_train_on_exactly_the_data_completions(tmp_path, chat):
    tr = gkd(tmp_path, records=CHATS if chat else RECORDS, chat=chat,
             rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=16, temperature=0.9))
    tok = tr.tokenizer
    data, m = tr.rollout()
    assert m["distill/on_policy"] == 0.0 and data.input_ids.shape[0] == 8
    by_prompt = {tr.prompts[i]: i for i in range(len(RECORDS))}
    n_merged = 0
    for row, (ptext, _, _) in enumerate(tr._last_texts):
        rec = (CHATS if chat else RECORDS)[by_prompt[ptext]]
        prompt_ids, answer_ids = rows_of(data, row)
        if chat:
            # TRL GKD's collator on {"messages": prompt + completion} (trl/experimental/utils.py
            # DataCollatorForChatML): the whole conversation's tokens, the first len(prompt's tokens)
            # of them the prompt
            from trl.experimental.utils import DataCollatorForChatML

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                collate = DataCollatorForChatML(tokenizer=tok, max_length=100)
                b = collate([{"messages": rec["prompt"] + rec["completion"]}])
            keep = b["labels"][0] != -100
            trl_prompt, trl_answer = b["input_ids"][0][~keep].tolist(), b["labels"][0][keep].tolist()
            full = tok.apply_chat_template(rec["prompt"] + rec["completion"], tokenize=False)
            assert prompt_ids == tok(ptext)["input_ids"]  # the rollout's prompt ids, on- and off-policy
            assert answer_ids == tok(full[len(ptext):], add_special_tokens=False)["input_ids"]
            if trl_prompt == prompt_ids:  # the prompt is a token prefix of the conversation: TRL's ids exactly
                assert answer_ids == trl_answer
            else:  # "assistant: " + "1 2 3" tokenises " 1" across the boundary: TRL moves it into the prompt
                assert trl_prompt + trl_answer == (b["input_ids"][0]).tolist() and answer_ids != trl_answer
                n_merged += 1
        else:  # SFT's rule: the prompt as the engine encodes it, the completion's tokens and eos
            assert prompt_ids == tok(rec["prompt"])["input_ids"]
            assert answer_ids == tok(rec["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert rows_of(data, row ^ 1) == (prompt_ids, answer_ids)  # group_size 2: each completion twice
    assert n_merged == (2 if chat else 0)  # both kinds of chat record ran (the "0" prompt's two rows)


def test_a_completion_past_the_budget_is_cut_and_counts_as_truncated(tmp_path):
    long = [{"prompt": r["prompt"], "completion": "a b c d e f g h i j k"} for r in RECORDS]
    tr = gkd(tmp_path, records=long, rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=6,
                                                           temperature=0.9, mask_truncated=True))
    data, m = tr.rollout()
    assert m["completions/clipped_ratio"] == 1.0 and m["completions/max_length"] == 6
    assert int(data.response_mask.sum()) == 0  # mask_truncated: out of the loss, as a cut answer


def test_seq_kd_steps_train_on_the_teachers_answers(tmp_path):
    tr = gkd(tmp_path, seq_kd=True)
    cfg, ro = tr.config, tr.config.rollout
    data, m = tr.rollout()
    assert m["distill/on_policy"] == 0.0
    # the teacher's engine with the rollout's settings and step seed (rl.py RLTrainer._generate)
    prompts = [p for p, _, _ in tr._last_texts[::ro.group_size]]
    params = SamplingParams(temperature=ro.temperature, max_new_tokens=ro.max_new_tokens, n=ro.group_size,
                            seed=(cfg.seed * 1_000_003 + 0) % (2**31))
    ref = HFRolloutEngine(tr.teacher, tr.tokenizer).generate(prompts, params)
    assert torch.equal(data.input_ids, ref.input_ids)
    assert torch.equal(data.response_mask, ref.response_mask.bool())
    assert tr.engine.model is tr.policy  # the student's engine is back
    # the teacher's (peaked) argmax picks its own answers' tokens far more often than the student's (0.54 vs 0.02)
    def agreement(d):
        ids, am, rm = d.input_ids, d.attention_mask, d.response_mask
        pos = (am.long().cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            top = tr.teacher(input_ids=ids, attention_mask=am.long(), position_ids=pos).logits.argmax(-1)
        return float((top[:, :-1] == ids[:, 1:])[rm[:, 1:]].float().mean())

    own = gkd(tmp_path / "own", lmbda=1.0).rollout()[0]  # the same step on-policy: the student's answers
    assert agreement(data) > agreement(own) + 0.25, (agreement(data), agreement(own))


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_loss_on_an_off_policy_batch_equals_gkds(tmp_path, beta, temperature):
    """Temperature 1 is GKD's compute_loss (it never passes its temperature to the loss); 0.7
    passes ours to generalized_jsd_loss, which then divides both logits as we do."""
    from trl.experimental.gkd import GKDTrainer

    tr = gkd(tmp_path, beta=beta, rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=6,
                                                        temperature=temperature))
    data, _ = tr.rollout()
    ids, am, rm = data.input_ids, data.attention_mask, data.response_mask
    tr.policy.zero_grad(set_to_none=True)
    ours, _ = tr.distill_loss(ids, am, rm)
    ours.backward()
    g_ours = [p.grad.clone() for p in tr.policy.parameters()]
    tr.policy.zero_grad(set_to_none=True)
    pos = (am.long().cumsum(1) - 1).clamp(min=0)  # our positions (left padding), as generation used them
    s = tr.policy(input_ids=ids, attention_mask=am.long(), position_ids=pos).logits[:, :-1]
    with torch.no_grad():
        t = tr.teacher(input_ids=ids, attention_mask=am.long(), position_ids=pos).logits[:, :-1]
    labels = torch.where(rm[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    theirs = GKDTrainer.generalized_jsd_loss(s, t, labels, beta=beta, temperature=temperature)
    theirs.backward()
    torch.testing.assert_close(ours, theirs.float(), rtol=2e-5, atol=1e-6)
    for a, b in zip(g_ours, (p.grad for p in tr.policy.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # GKD's 'batchmean' with labels is per token: its num_items_in_batch path gives the same
    n = int((labels != -100).sum())
    with torch.no_grad():
        again = GKDTrainer.generalized_jsd_loss(s, t, labels, beta=beta, temperature=temperature, num_items_in_batch=n)
    torch.testing.assert_close(again, theirs.detach())


# ----------------------------------------------------------------------------- resume, num_tokens


def test_exact_resume_with_lmbda_half_and_num_tokens(tmp_path):
    def fresh(name, **kw):
        pol, tok = make_policy()
        cfg = make_config(tmp_path / name, steps=6, save_every=3, distill=DistillConfig(lmbda=0.5),
                          ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=2), **kw)
        return DistillationTrainer(cfg, pol, tok, prompts=RECORDS, teacher_model=make_teacher(tok))

    a = fresh("a")
    a.train()
    b = fresh("b")
    b.train(steps=3)
    c = fresh("b", resume=b.config.output_dir)
    c.train()

    rows = run_rows  # metrics.jsonl without the wall-clock timings

    ra, rc = rows(a.config.output_dir), rows(c.config.output_dir)
    assert [r["step"] for r in rc] == [1, 2, 3, 4, 5, 6] and ra == rc
    # one draw per micro-batch of 2 rows (one prompt of group_size 2): the student's share of each step
    on = [sum(gkd_on_policy(0, s, 0.5, p) for p in range(4)) / 4 for s in range(6)]
    assert [r["distill/on_policy"] for r in ra] == on
    assert len(set(on[:3])) > 1 and len(set(on[3:])) > 1  # different mixes, on both sides of the resume
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(p, q)
    assert c.num_tokens == a.num_tokens == ra[-1]["num_tokens"]
    # TRL's count: each step adds its rows' prompt tokens and answer tokens (strictly growing)
    steps = [r["num_tokens"] for r in ra]
    assert all(isinstance(n, int) for n in steps) and all(x < y for x, y in zip(steps, steps[1:]))


def test_num_tokens_counts_prompt_and_answer_tokens(tmp_path):
    tr = gkd(tmp_path, lmbda=1.0)
    data, m = tr.rollout()
    tok = tr.tokenizer
    # TRL DistillationTrainer._generate_and_score_completions: sum(len(prompt_ids)) + sum(completion_lengths)
    prompt_lengths = [len(tok(p)["input_ids"]) for p, _, _ in tr._last_texts]
    assert m["num_tokens"] == sum(prompt_lengths) + int(data.response_mask.sum()) == tr.num_tokens
    data, m2 = tr.rollout()
    assert m2["num_tokens"] > m["num_tokens"]


# ----------------------------------------------------------------------------- refused settings


@pytest.mark.parametrize("bad, match", [
    (dict(lmbda=1.5), "distill.lmbda"), (dict(lmbda=-0.1), "distill.lmbda"), (dict(lmbda="half"), "distill.lmbda"),
    (dict(lmbda=True), "distill.lmbda"), (dict(lmbda=float("nan")), "distill.lmbda"),
    (dict(seq_kd="yes"), "distill.seq_kd"), (dict(seq_kd=True), "distill.seq_kd"),
])
def test_bad_gkd_keys_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**bad)


def test_gkd_keys_need_estimator_distill_and_completions_need_no_tools(tmp_path):
    with pytest.raises(ValueError, match="distill.lmbda"):
        RLConfig(estimator="grpo", distill=DistillConfig(lmbda=0.5))
    with pytest.raises(ValueError, match="distill.lmbda .*rollout.tools"):
        make_config(tmp_path, rollout=RolloutConfig(prompts_per_step=4, group_size=2, tools=["m.py:f"]),
                    distill=DistillConfig(lmbda=0.5))
    make_config(tmp_path, rollout=RolloutConfig(prompts_per_step=4, group_size=2, tools=["m.py:f"]),
                distill=DistillConfig(lmbda=0.5, seq_kd=True))  # the teacher's answers may call tools


def test_off_policy_steps_need_completions(tmp_path):
    with pytest.raises(ValueError, match=r"distill.lmbda \(0.5\) < 1: training prompt 0 has no 'completion'"):
        gkd(tmp_path, lmbda=0.5, records=["q:", "x"])
    gkd(tmp_path, lmbda=0.5, seq_kd=True, records=["q:", "x"])  # the teacher answers instead
    gkd(tmp_path, lmbda=1.0, records=["q:", "x"])
    with pytest.raises(ValueError, match="training prompt 1: 'completion' must be text"):
        gkd(tmp_path, records=[RECORDS[0], {"prompt": "x", "completion": 3}])
    with pytest.raises(ValueError, match="after a text prompt"):
        gkd(tmp_path, records=[{"prompt": "x", "completion": CHATS[0]["completion"]}], chat=True)


def test_cli_gkd_run_from_a_prompt_completion_file(tmp_path, capsys):
    from rlhf_fast.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    run = str(tmp_path / "run")
    args = ["distill", "none", "--progress", "false", "--distill.teacher", "tiny:llama", "--distill.lmbda", "0.5",
            "--rollout.max_new_tokens", "4", "--ppo.epochs", "1"]
    assert main(args + ["--output_dir", run, "--steps", "4", "--save_every", "2",
                        "--data.prompts_file", str(data)]) == 0
    rows = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]
    # 4 prompts × 4 answers in micro-batches of 8 rows: two draws per step, two prompts each
    assert [r["distill/on_policy"] for r in rows] == [sum(gkd_on_policy(0, s, 0.5, j) for j in range(2)) / 2
                                                      for s in range(4)]
    assert main(["distill", "--resume", run, "--steps", "5"]) == 0
    more = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in more] == [1, 2, 3, 4, 5] and more[-1]["num_tokens"] > rows[-1]["num_tokens"]
    # without completions in the data, the error names the key and the record
    assert main(args + ["--output_dir", str(tmp_path / "x"), "--steps", "1"]) == 2
    assert "distill.lmbda (0.5) < 1: training prompt 0 has no 'completion' field" in capsys.readouterr().err
