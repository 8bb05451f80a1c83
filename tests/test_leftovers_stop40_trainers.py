"""Leftovers of stop 40 in the trainers: GKD's on/off-policy draw once per micro-batch (TRL
GKDTrainer.training_step's, gradient accumulation), KTO's self-paired KL row of a one-example
block (as TRL's rotation), and the one resume-restart predicate of the RL and A*-PO trainers."""

import contextlib
import os

import pytest
import torch

from rlhf_fast.trainers.distill import DistillationTrainer, gkd_on_policy, gkd_uniform
from rlhf_fast.trainers.rl_config import DistillConfig, PPOConfig, RolloutConfig
from tests.conftest import run_rows
from tests.test_distill import make_config, make_teacher
from tests.test_rl_learning import make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

RECORDS = [{"prompt": "q:", "completion": "a b"}, {"prompt": "x", "completion": "y z w"},
           {"prompt": "0", "completion": "1 2 3"}, {"prompt": "a b", "completion": "c d e f"}]


# ----------------------------------------------------------------------------- GKD: a draw per micro-batch


def gkd(tmp_path, lmbda=0.5, micro=2, seq_kd=False, **kw):
    pol, tok = make_policy()
    kw.setdefault("ppo", PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=micro))
    cfg = make_config(tmp_path, distill=DistillConfig(lmbda=lmbda, seq_kd=seq_kd), **kw)
    return DistillationTrainer(cfg, pol, tok, prompts=RECORDS, teacher_model=make_teacher(tok))


def trl_micro_batch_kinds(monkeypatch, lmbda, seed, step, n_micro):
    """TRL's own ``GKDTrainer.training_step`` (trl/experimental/gkd/gkd_trainer.py) run once per
    micro-batch of one optimizer step (what transformers' Trainer does under gradient
    accumulation), its ``random.random()`` answering with our draw of (seed, step, micro-batch):
    per micro-batch "student" (it generated with the model) or "data" (the inputs kept), and
    how many times it drew."""
    import trl.experimental.gkd.gkd_trainer as G

    tr = G.GKDTrainer.__new__(G.GKDTrainer)
    student = torch.nn.Linear(1, 1)
    tr.lmbda, tr.seq_kd, tr.teacher_model = lmbda, False, torch.nn.Linear(1, 1)
    tr.accelerator, tr.generation_kwargs, tr.generation_config = None, {}, None
    tr.args = type("Args", (), {"gradient_checkpointing_kwargs": None})()
    tr.generate_on_policy_outputs = lambda model, inputs, cfg: ("student",) * 3
    monkeypatch.setattr(G, "unwrap_model_for_generation",
                        lambda model, *a, **k: contextlib.nullcontext(model))
    monkeypatch.setattr(G.SFTTrainer, "training_step",
                        lambda self, model, inputs, n=None: inputs["input_ids"])
    draws = []

    def draw():
        draws.append(len(draws))
        return gkd_uniform(seed, step, len(draws) - 1)

    monkeypatch.setattr(G.random, "random", draw)
    kinds = [G.GKDTrainer.training_step(tr, student, {"input_ids": "data"}) for _ in range(n_micro)]
    return kinds, len(draws)


def next_prompts(tr):
    """The prompts the trainer's next step takes, in order (without taking them)."""
    pos = tr.prompt_pos
    which = tr._next_prompts()
    tr.prompt_pos = pos
    return which


def row_kinds(tr, data):
    """Per row of a rollout: "data" when its answer is its prompt's data completion (the
    tokens :meth:`DistillationTrainer.completion_ids` gives), else "student"."""
    by_text = {t: i for i, t in enumerate(tr.prompts)}
    out = []
    for row, (ptext, _, _) in enumerate(tr._last_texts):
        answer = data.input_ids[row][data.response_mask[row].bool()].tolist()
        out.append("data" if answer == tr.completion_ids(by_text[ptext])[1] else "student")
    return out


def test_gkd_draws_on_or_off_policy_once_per_micro_batch_as_trl(tmp_path, monkeypatch):
    # 4 prompts × 2 answers, micro-batches of 2 rows: gradient accumulation over 4 micro-batches
    tr = gkd(tmp_path, steps=8)
    G, mb = tr.config.rollout.group_size, tr.config.ppo.micro_batch_size
    n_micro = tr.config.batch_size // mb
    mixed = 0
    for step in range(8):
        tr.global_step = step
        which = next_prompts(tr)
        data, m = tr.rollout()
        # the rows in the step's prompt order, each prompt's G answers consecutive
        assert [t for t, _, _ in tr._last_texts] == [tr.prompts[i] for i in which for _ in range(G)]
        ours = row_kinds(tr, data)
        theirs, n_draws = trl_micro_batch_kinds(monkeypatch, 0.5, tr.config.seed, step, n_micro)
        assert n_draws == n_micro  # TRL: one draw per training_step, i.e. per micro-batch
        assert ours == [theirs[r // mb] for r in range(len(ours))], (step, ours, theirs)
        assert [ours[r] for r in range(0, len(ours), G)] == \
            ["student" if gkd_on_policy(tr.config.seed, step, 0.5, p * G // mb) else "data" for p in range(4)]
        assert m["distill/on_policy"] == ours.count("student") / len(ours)
        mixed += len(set(ours)) == 2
    assert mixed >= 2, mixed  # steps with both kinds of micro-batch (never under a per-step draw)


def test_gkd_one_micro_batch_per_step_draws_as_before(tmp_path):
    # a step of one micro-batch: its draw is the former per-step one (micro-batch 0's key)
    import random

    for s in range(20):
        former = random.Random(f"rlhf_fast.distill.lmbda:3:{s}").random()  # the per-step draw's key
        assert gkd_uniform(3, s) == gkd_uniform(3, s, 0) == former
    draws = [gkd_uniform(3, 5, j) for j in range(50)]
    assert len(set(draws)) == 50 and draws == [gkd_uniform(3, 5, j) for j in range(50)]
    frac = sum(gkd_on_policy(3, s, 0.3, j) for s in range(40) for j in range(10)) / 400
    assert abs(frac - 0.3) < 0.06, frac  # uniform across micro-batches too


def test_gkd_seq_kd_mixes_the_teachers_and_the_students_answers_per_micro_batch(tmp_path):
    tr = gkd(tmp_path, seq_kd=True, steps=8)
    G, mb, seed = tr.config.rollout.group_size, tr.config.ppo.micro_batch_size, tr.config.seed
    for step in range(8):
        on = [gkd_on_policy(seed, step, 0.5, p * G // mb) for p in range(4)]
        if len(set(on)) == 2:
            break
    tr.global_step = step
    which = next_prompts(tr)
    data, m = tr.rollout()
    assert m["distill/on_policy"] == sum(on) / 4
    assert [t for t, _, _ in tr._last_texts] == [tr.prompts[i] for i in which for _ in range(G)]
    assert tr.engine.model is tr.policy  # the student's engine is back
    # each row's answer scored by both models: the teacher's (peaked) argmax follows its own answers' tokens
    ids, am, rm = data.input_ids, data.attention_mask, data.response_mask.bool()
    pos = (am.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        top = tr.teacher(input_ids=ids, attention_mask=am.long(), position_ids=pos).logits.argmax(-1)
    agree = [float((top[r, :-1] == ids[r, 1:])[rm[r, 1:]].float().mean()) for r in range(ids.shape[0])]
    student = [a for r, a in enumerate(agree) if on[r // G]]
    teacher = [a for r, a in enumerate(agree) if not on[r // G]]
    assert min(teacher) > max(student), (teacher, student)


def test_gkd_per_micro_batch_draws_resume_exactly(tmp_path):
    def fresh(name, **kw):
        return gkd(tmp_path / name, steps=4, save_every=2, **kw)

    a = fresh("a")
    a.train()
    b = fresh("b")
    b.train(steps=2)
    c = fresh("b", resume=b.config.output_dir)
    c.train()
    ra, rc = run_rows(a.config.output_dir), run_rows(c.config.output_dir)
    assert [r["step"] for r in rc] == [1, 2, 3, 4] and ra == rc
    assert any(0.0 < r["distill/on_policy"] < 1.0 for r in ra), [r["distill/on_policy"] for r in ra]
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- KTO: a one-example block


def test_kto_one_example_block_pairs_with_itself_as_trls_rotation():
    """TRL 1.16 KTOTrainer._prepare_dataset's ``add_kl_completion_ids`` mapped over batches of the
    batch size (its ``datasets.map(batched=True, batch_size=...)``): a last batch of one example
    takes its own completion, as our kl_partners."""
    from datasets import Dataset

    from rlhf_fast.trainers.kto import kl_partners

    def add_kl_completion_ids(examples):  # trl/trainer/kto_trainer.py, verbatim
        examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
        return examples

    for n, block in ((9, 4), (5, 2), (7, 3), (1, 2)):
        ds = Dataset.from_dict({"completion_ids": [[i] for i in range(n)]})
        mapped = ds.map(add_kl_completion_ids, batched=True, batch_size=block)
        theirs = [c[0] for c in mapped["KL_completion_ids"]]
        assert kl_partners(list(range(n)), block) == theirs
        if n % block == 1:
            assert theirs[-1] == n - 1  # the self-pair


def test_kto_trainer_last_step_of_one_example_scores_its_own_completion(tmp_path):
    from rlhf_fast.trainers.kto import BinaryRecord, KTOConfig, KTOTrainer, kto_kl

    recs = [BinaryRecord(f"p{i}", f"c{i} d", i % 2 == 0) for i in range(5)]
    cfg = KTOConfig(output_dir=str(tmp_path / "run"), batch_size=2, grad_accum=2, max_steps=2, warmup_steps=0,
                    max_len=32, eval_fraction=0.0)
    tr = KTOTrainer(cfg, train_records=recs, eval_records=[])
    last = tr.batches._perm[4]  # the epoch's last step batch: one example
    it = tr.train_items[last]
    assert it["kl"] == it["completion"]
    micro = tr._micro([last], tr.train_items)
    z0, refs = tr._reference_point(micro)
    from rlhf_fast.trainers.dpo import response_logps

    with torch.no_grad():
        logp, _ = response_logps(tr.model, tr._batch(micro[0][0]))
    torch.testing.assert_close(z0, kto_kl(logp.float(), refs[0]), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the resume-restart predicate


def test_restart_predicate_is_shared_and_rl_errors_unchanged(tmp_path):
    from rlhf_fast.trainers import a2po, rl
    from rlhf_fast.trainers.rl import restarts_from_step_zero

    empty = tmp_path / "empty"
    empty.mkdir()
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.yaml").write_text("estimator: grpo\n")
    done = tmp_path / "done"
    (done / "checkpoints" / "step_2").mkdir(parents=True)
    (done / "checkpoints" / "step_2" / "COMPLETE").write_text("")
    (done / "config.yaml").write_text("estimator: grpo\n")
    assert [restarts_from_step_zero(str(p)) for p in (empty, started, done)] == [False, True, False]
    assert a2po.restarts_from_step_zero is restarts_from_step_zero  # A*-PO asks the same question
    assert not hasattr(a2po.A2POTrainer, "_resume_restarts")

    class Ctx:
        is_main, rank = True, 0

        def barrier(self):
            pass

    fake = type("T", (), {"ctx": Ctx()})()
    assert rl.RLTrainer._restarts(fake, str(done)) is False
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under .* and no run"):
        rl.RLTrainer._restarts(fake, str(empty))
    (started / "metrics.jsonl").write_text("{}\n")
    assert rl.RLTrainer._restarts(fake, str(started)) is True
    assert not (started / "metrics.jsonl").exists()  # the log of the run that starts again is dropped


# ----------------------------------------------------------------------------- dynamic sampling: one penalty


def test_dynamic_sampling_penalises_each_rounds_rewards_once(tmp_path, monkeypatch):
    """``RLTrainer._penalised`` (reward.missing_eos_penalty, then the clips) is pure — a new
    RewardOutput, ``out`` untouched — and row by row: DAPO's filter judges each sampling round on
    it, and ``rollout/uniform_group_frac`` penalises the kept rows again from their raw rewards
    (never a penalised total twice). Round 0: every answer scores 1 and stops (all groups uniform);
    round 1: only the first answer of the first group is cut, its reward 1 − 1 = 0 — the step
    keeps that informative group and one uniform one: half its groups uniform."""
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import DataConfig, RewardConfig
    from tests.test_rl_learning import PROMPTS
    from tests.test_rl_learning import make_config as rl_config

    pol, tok = make_policy()
    cfg = rl_config(tmp_path, "grpo", steps=1, data=DataConfig(prompts=PROMPTS, shuffle=False),
                    rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=4,
                                          dynamic_sampling=True, max_sampling_rounds=2),
                    reward=RewardConfig(missing_eos_penalty=1.0, clip=5.0))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[lambda p, c: [1.0] * len(c)], prompts=PROMPTS)
    real, calls = tr.engine.generate, []

    def gen(*a, **k):
        b = real(*a, **k)
        b.finish_reasons = ["length" if (calls and i == 0) else "stop" for i in range(len(b.finish_reasons))]
        calls.append(1)
        return b

    tr.engine.generate = gen
    penalised, seen = tr._penalised, []

    def spy(out, batch):
        before = out.total.clone()
        res = penalised(out, batch)
        assert torch.equal(out.total, before)  # pure: the input keeps its rewards
        seen.append(res.total.tolist())
        return res

    monkeypatch.setattr(tr, "_penalised", spy)
    _, m = tr.rollout()
    assert m["rollout/sampling_rounds"] == 2
    assert seen[:2] == [[1.0] * 8, [0.0] + [1.0] * 7]  # each round's raw rewards penalised
    assert all(min(s) >= 0.0 for s in seen)  # nothing penalised twice (that would give -1)
    assert m["rollout/uniform_group_frac"] == 0.5


class _TwoRanks:
    """Rank ``rank`` of two, for a trainer's ``ctx`` in one process (what ``_step_batch`` and
    ``_generate`` read of it)."""

    distributed, world_size, is_main, local_rank = True, 2, True, 0

    def __init__(self, rank):
        self.rank = rank


def test_gkd_micro_batch_j_draws_alike_on_every_rank(tmp_path):
    """4 prompts on two ranks (two each), micro-batches of one prompt: micro-batch j of each
    rank takes draw j (TRL: every process's ``random`` seeded alike), so in a step whose draws
    differ each rank trains its first prompt on one kind of answer and its second on the other,
    and both ranks call the student's generate once (FSDP2 gathers the weights in each call)."""
    tr = gkd(tmp_path, steps=40)
    seed = tr.config.seed
    step = next(s for s in range(40) if gkd_on_policy(seed, s, 0.5, 0) != gkd_on_policy(seed, s, 0.5, 1))
    on = [gkd_on_policy(seed, step, 0.5, j) for j in range(2)]
    tr.global_step = step
    calls = []
    real = tr.engine.generate
    tr.engine.generate = lambda prompts, params: calls.append(list(prompts)) or real(prompts, params)
    which = next_prompts(tr)
    for rank in (0, 1):
        calls.clear()
        tr.ctx = _TwoRanks(rank)
        batch, fields, extra, frac = tr._step_batch()
        tr.prompt_pos -= 4
        mine = which[2 * rank: 2 * rank + 2]
        assert calls == [[tr.prompts[mine[on.index(True)]]]] and frac == 0.5
        assert batch.prompt_texts == [tr.prompts[i] for i in mine for _ in range(2)]
        for j, i in enumerate(mine):
            answers = [batch.input_ids[r][batch.response_mask[r].bool()].tolist() for r in (2 * j, 2 * j + 1)]
            data = tr.completion_ids(i)[1]
            assert (answers == [data, data]) == (not on[j]), (rank, j)
        assert fields == [tr.prompt_fields[i] for i in mine]
        assert extra["_prompts"] == [tr._records["train"][i][0] for i in mine for _ in range(2)]
        assert batch.group_index.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_evaluate_examples_without_precomputed_reference_logps_names_the_option(tmp_path, loss_type):
    """KTO under precompute_ref_logps keeps no reference model: examples without their stored
    reference log-probs are refused by name (as DPO's), one of a batch included, not a TypeError
    deep in the log-prob code or a KeyError."""
    from tests.test_kto import _trainer
    from tests.test_reward import preference_tokenizer

    tr = _trainer(tmp_path, preference_tokenizer(), precompute_ref_logps=True, loss_type=loss_type)
    assert tr.reference is None
    assert tr.evaluate(tr.train_items[:4])["eval_loss"] > 0  # examples scored before training: fine
    fresh = [{k: v for k, v in it.items() if k != "ref"} for it in tr.train_items[:4]]
    with pytest.raises(ValueError, match="precompute_ref_logps"):
        tr.evaluate(fresh)
    with pytest.raises(ValueError, match="precompute_ref_logps"):
        tr.evaluate(tr.train_items[:3] + fresh[3:])


def test_rl_prompts_parquet_suffix_in_any_case(tmp_path):
    """A prompts file named ``.PARQUET`` is read as Parquet, as the feedback reader does (it was
    read as JSON lines: 'not UTF-8 text')."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from rlhf_fast.trainers.rl import read_prompt_records

    path = tmp_path / "train.PARQUET"
    pq.write_table(pa.Table.from_pylist([{"prompt": "2 + 2 =", "answer": "4"}]), str(path))
    assert read_prompt_records(str(path)) == [("2 + 2 =", {"answer": "4"})]
