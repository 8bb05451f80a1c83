"""GKD's conversational data (TRL's ``{"messages": [...]}`` records, trl/experimental/gkd with its
``DataCollatorForChatML``) as distillation training data: the last message (the assistant's) is the
completion, the others the prompt — through the Python API and ``data.prompts_file`` (.jsonl and
.parquet) — giving exactly the batches of the equivalent ``{prompt, completion}`` chat records and,
where the prompt is a token prefix of the conversation, TRL's collator's token ids; the refused
records name the record and what was expected."""

import json
import os
import warnings

import pytest
import torch

from rlhf_fast.models.tiny import CHAT_TEMPLATE
from rlhf_fast.trainers.distill import DistillationTrainer, messages_record
from rlhf_fast.trainers.rl_config import DataConfig, DistillConfig, RolloutConfig
from tests.test_distill import make_config, make_teacher
from tests.test_distill_gkd import CHATS, rows_of
from tests.test_rl_learning import make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

MESSAGES = [{"messages": c["prompt"] + c["completion"]} for c in CHATS]
# a multi-turn conversation with a system turn: the prompt is every turn before the last answer
MULTI = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"},
                      {"role": "assistant", "content": "y"}, {"role": "user", "content": "a b"},
                      {"role": "assistant", "content": "c d"}], "id": 7}


def gkd(tmp_path, records, lmbda=0.0, **kw):
    pol, tok = make_policy()
    tok.chat_template = CHAT_TEMPLATE
    cfg = make_config(tmp_path, 1.0, distill=DistillConfig(beta=1.0, lmbda=lmbda),
                      rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=16, temperature=0.9))
    return DistillationTrainer(cfg, pol, tok, prompts=records, teacher_model=make_teacher(tok), **kw)


def test_a_messages_record_is_its_prompt_and_last_answer():
    rec = messages_record(MULTI, "prompt", "r")
    assert rec == {"prompt": MULTI["messages"][:-1], "completion": [MULTI["messages"][-1]], "id": 7}
    for same in ("text", CHATS[0], CHATS[0]["prompt"], {"prompt": "p", "messages": [1]}):
        assert messages_record(same, "prompt", "r") is same  # anything else as it was
    assert messages_record({"question": "q", "messages": [1]}, "question", "r")["question"] == "q"


@pytest.mark.parametrize("bad, match", [
    ({"messages": [{"role": "user", "content": "q"}]}, r"records\[0\]: the last of its 'messages' must be the "
                                                      r"assistant's answer .*got a 'user' message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "more"}]}, "must be the assistant's answer"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "hold only the answer"),
    ({"messages": "q"}, "'messages' must be a non-empty list of {role, content} messages .*got str"),
    ({"messages": []}, "must be a non-empty list"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "must be a non-empty list"),
    ({"messages": MESSAGES[0]["messages"], "completion": "a"}, "has both 'messages' and 'completion'"),
])
def test_bad_messages_records_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        messages_record(bad, "prompt", "records[0]")


def test_off_policy_batches_equal_the_prompt_completion_records_and_trls_collator(tmp_path):
    from trl.experimental.utils import DataCollatorForChatML

    a = gkd(tmp_path / "a", MESSAGES)
    b = gkd(tmp_path / "b", CHATS)
    assert a.prompts == b.prompts and a._completions == b._completions
    da, ma = a.rollout()
    db, _ = b.rollout()
    assert ma["distill/on_policy"] == 0.0
    for f in ("input_ids", "attention_mask", "response_mask"):
        assert torch.equal(getattr(da, f), getattr(db, f))
    # TRL GKD's collator on the same records: its prompt and completion ids, where its prompt's
    # tokens are a prefix of the conversation's (tests/test_distill_gkd.py: the other records
    # merge a token across the boundary, which TRL moves into its prompt)
    tok = a.tokenizer
    by_prompt = {a.prompts[i]: i for i in range(len(MESSAGES))}
    exact = 0
    for row, (ptext, _, _) in enumerate(a._last_texts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batch = DataCollatorForChatML(tokenizer=tok, max_length=100)([MESSAGES[by_prompt[ptext]]])
        keep = batch["labels"][0] != -100
        trl_prompt, trl_answer = batch["input_ids"][0][~keep].tolist(), batch["labels"][0][keep].tolist()
        prompt_ids, answer_ids = rows_of(da, row)
        if trl_prompt == prompt_ids:
            assert answer_ids == trl_answer
            exact += 1
    assert exact == 6  # three of the four records, twice each


def test_a_multi_turn_record_and_eval_prompts(tmp_path):
    tr = gkd(tmp_path, [MULTI] * 4, eval_prompts=[MULTI])
    assert tr._records["train"][0] == (MULTI["messages"][:-1], {"completion": [MULTI["messages"][-1]], "id": 7})
    assert tr.prompt_fields[0] == {"completion": [MULTI["messages"][-1]], "id": 7}
    assert tr.eval_prompts == tr.prompts[:1]  # evaluation samples after the same prompt
    tok = tr.tokenizer
    ptext = tok.apply_chat_template(MULTI["messages"][:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(MULTI["messages"], tokenize=False)
    assert tr.prompts[0] == ptext
    assert tr._completions[0][1] == tok(full[len(ptext):], add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match=r"prompts\[1\]: the last of its 'messages' must be the assistant's"):
        gkd(tmp_path, [MULTI, {"messages": MULTI["messages"][:-1]}])


def write(path, records):
    if str(path).endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_messages_file_reads_as_its_records(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    path = tmp_path / f"data{suffix}"
    write(path, MESSAGES)
    pol, tok = make_policy()
    tok.chat_template = CHAT_TEMPLATE
    cfg = make_config(tmp_path, distill=DistillConfig(lmbda=0.0), data=DataConfig(prompts_file=str(path)),
                      rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=16, temperature=0.9))
    tr = DistillationTrainer(cfg, pol, tok, teacher_model=make_teacher(tok))
    ref = gkd(tmp_path / "ref", CHATS)
    assert tr.prompts == ref.prompts and tr._completions == ref._completions


def test_cli_gkd_run_from_a_messages_file(tmp_path, capsys):
    from rlhf_fast.cli import main

    data = tmp_path / "data.jsonl"
    write(data, MESSAGES)
    run = str(tmp_path / "run")
    args = ["distill", "none", "--progress", "false", "--distill.teacher", "tiny:llama", "--distill.lmbda", "0.0",
            "--rollout.max_new_tokens", "4", "--ppo.epochs", "1", "--steps", "2"]
    assert main(args + ["--output_dir", run, "--data.prompts_file", str(data)]) == 0
    rows = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["distill/on_policy"] for r in rows] == [0.0, 0.0] and rows[-1]["num_tokens"] > 0
    bad = tmp_path / "bad.jsonl"
    write(bad, MESSAGES[:2] + [{"messages": MESSAGES[2]["messages"][:1]}])
    assert main(args + ["--output_dir", str(tmp_path / "x"), "--data.prompts_file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"data.prompts_file {bad}, line 3: the last of its 'messages' must be the assistant's answer" in err


def test_messages_evaluation_files_and_eval_run_read_as_training_does(tmp_path):
    """data.eval_prompts_file of {messages} records reads as the same chat prompts (the trainer's
    evaluation split), and ``rlhf-fast eval --run``'s split of a distillation run reads it alike."""
    from rlhf_fast.trainers.evaluate import run_prompt_records

    path = tmp_path / "eval.jsonl"
    write(path, MESSAGES)
    pol, tok = make_policy()
    tok.chat_template = CHAT_TEMPLATE
    cfg = make_config(tmp_path, distill=DistillConfig(lmbda=0.0), data=DataConfig(eval_prompts_file=str(path)),
                      rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=16, temperature=0.9))
    tr = DistillationTrainer(cfg, pol, tok, prompts=CHATS, teacher_model=make_teacher(tok))
    want = [c["prompt"] for c in CHATS]
    assert [p for p, _ in tr._records["eval"]] == want
    split, recs = run_prompt_records(cfg, "eval")
    assert split == "eval" and [p for p, _ in recs] == want
    assert all(f["completion"] == c["completion"] for (_, f), c in zip(recs, CHATS))
