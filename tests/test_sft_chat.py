"""SFT on conversations ({"messages": [...]}): the per-token mask from prefix diffs against
transformers' own ``return_assistant_tokens_mask`` on templates with ``{% generation %}``
markers (ours and TRL's shipped training templates), the rows and labels TRL's SFTTrainer
builds from the same data, the loss against cross-entropy on those labels, truncation and
dropped rows, the clear errors (no template, template not prefix-stable, assistant_only_loss on
prompt/completion data), and the CLI on a model folder whose tokenizer has a template."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast import cli
from rlhf_fast.feedback.formats import ChatRecord, SFTRecord
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, collate, completion_nll_sum, tokenize_sft
from rlhf_fast.trainers.sft_data import chat_tokens

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2"
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# ChatML whose generation block is exactly what our mask trains: content and the turn's close
CHATML_GEN = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
              "{{ m.content }}<|im_end|>\n{% endgeneration %}{% else %}{{ m.content }}<|im_end|>\n{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# earlier assistant turns render shortened (as templates that drop past reasoning do): not prefix-stable
UNSTABLE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}ok"
            "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = "red blue green cat dog sun moon one two three".split()


def chat_records(n, seed=0, system=True):
    """Conversations of 1-3 user/assistant exchanges (sometimes a system message first)."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "copy the words"}] if system and i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            w = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
            msgs += [{"role": "user", "content": f"repeat: {w}"}, {"role": "assistant", "content": w}]
        out.append(ChatRecord(msgs))
    return out


def trl_template(name):
    import trl

    with open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", name)) as f:
        return f.read()


@pytest.fixture(scope="module")
def chat_tok():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    texts = sample_texts(64) + [" ".join(m["content"] for m in r.messages) for r in chat_records(64)]
    tok = train_tokenizer(texts, 400, padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = CHATML_GEN
    return tok


def _with_template(tok, template):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


def _hf_mask(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


@pytest.mark.parametrize("template", ["chatml_gen", "llama3_training.jinja"])
def test_assistant_mask_equals_transformers_generation_mask(chat_tok, template):
    """On a template whose {% generation %} block is content + end of turn (ours, and TRL's own
    llama3 training template), the prefix-diff mask is transformers' assistant mask, token for
    token, and the ids are apply_chat_template's."""
    tok = _with_template(chat_tok, CHATML_GEN if template == "chatml_gen" else trl_template(template))
    n_trained = 0
    for rec in chat_records(12, seed=1):
        ids, mask = chat_tokens(tok, rec.messages, assistant_only=True)
        ref_ids, ref_mask = _hf_mask(tok, rec.messages)
        assert ids == ref_ids and mask == ref_mask
        n_trained += sum(mask)
        # every assistant turn ends on its end-of-turn token, and that token trains
        eot = tok.convert_tokens_to_ids("<|im_end|>" if template == "chatml_gen" else "<|eot_id|>")
        assert all(mask[t] for t in range(len(ids)) if ids[t] == eot and mask[t - 1])
        full_ids, full_mask = chat_tokens(tok, rec.messages, assistant_only=False)
        assert full_ids == ids and full_mask == [1] * len(ids)
    assert n_trained > 0


def test_trl_chatml_training_template_differs_only_by_the_generation_prompts_newline(chat_tok):
    """TRL's qwen2.5 training template opens {% generation %} before the newline that ends the
    role header; that newline is part of the generation prompt (given at inference), so our mask
    leaves it out. Every other token agrees with transformers' mask."""
    tok = _with_template(chat_tok, trl_template("qwen2_5_training.jinja"))
    head = tok("<|im_start|>assistant", add_special_tokens=False)["input_ids"]
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    for rec in chat_records(8, seed=2):
        ids, mask = chat_tokens(tok, rec.messages, assistant_only=True)
        ref_ids, ref_mask = _hf_mask(tok, rec.messages)
        assert ids == ref_ids
        extra = [t for t in range(len(ids)) if ref_mask[t] and not mask[t]]
        assert not [t for t in range(len(ids)) if mask[t] and not ref_mask[t]]
        # each left-out token is the newline right after "<|im_start|>assistant"
        assert extra and all(ids[t - len(head):t] == head and ids[t] == newline[0] for t in extra)
        assert len(extra) == sum(m["role"] == "assistant" for m in rec.messages)


@pytest.fixture(scope="module")
def trl_rows(chat_tok, tmp_path_factory):
    """{(assistant_only_loss): TRL SFTTrainer's prepared train dataset} for chat_records(10)."""
    pytest.importorskip("datasets")
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer as TRLTrainer

    from rlhf_fast.models.tiny import tiny_causal_lm

    ds = Dataset.from_list([{"messages": r.messages} for r in chat_records(10, seed=3)])
    out = {}
    for aol in (True, False):
        args = TRLConfig(output_dir=str(tmp_path_factory.mktemp("trl")), assistant_only_loss=aol, report_to="none",
                         use_cpu=True, max_length=40)
        model = tiny_causal_lm(len(chat_tok), hidden_size=32, num_layers=1, num_heads=2)
        out[aol] = TRLTrainer(model=model, args=args, train_dataset=ds, processing_class=chat_tok).train_dataset
    return out


@pytest.mark.parametrize("assistant_only", [True, False])
def test_rows_equal_trls_sft_trainer(chat_tok, trl_rows, assistant_only):
    """The rows tokenize_sft builds (ids, trained tokens, truncation to the first max_len,
    dropped rows) are those TRL's SFTTrainer prepares: input_ids, and labels != -100."""
    rows, dropped = tokenize_sft(chat_records(10, seed=3), chat_tok, 40, assistant_only_loss=assistant_only)
    ref = trl_rows[assistant_only]
    assert dropped == 10 - len(ref)
    assert [r["input_ids"] for r in rows] == [list(x) for x in ref["input_ids"]]
    assert [r["response_mask"] for r in rows] == [[int(t != -100) for t in x] for x in ref["labels"]]
    assert any(len(r["input_ids"]) == 40 for r in rows)  # truncation happened


def test_truncation_keeps_the_start_and_drops_rows_with_nothing_to_train(chat_tok):
    msgs = chat_records(1, seed=4, system=False)[0].messages
    ids, mask = chat_tokens(chat_tok, msgs, assistant_only=True)
    first = mask.index(1)
    rows, dropped = tokenize_sft([ChatRecord(msgs)], chat_tok, first + 3, assistant_only_loss=True)
    assert dropped == 0 and rows[0] == {"input_ids": ids[:first + 3], "response_mask": mask[:first + 3]}
    assert tokenize_sft([ChatRecord(msgs)], chat_tok, first, assistant_only_loss=True) == ([], 1)
    # a conversation without an assistant turn has nothing to train with assistant_only_loss
    user_only = ChatRecord([{"role": "user", "content": "the cat"}])
    assert tokenize_sft([user_only], chat_tok, 64, assistant_only_loss=True) == ([], 1)
    assert tokenize_sft([user_only], chat_tok, 64, assistant_only_loss=False)[1] == 0
    # position 0 is never predicted: one token left trains nothing
    assert tokenize_sft([user_only], chat_tok, 1, assistant_only_loss=False) == ([], 1)
    # prompt/completion records in the same list keep today's rows
    rec = SFTRecord("repeat: cat", "cat")
    assert tokenize_sft([rec, ChatRecord(msgs)], chat_tok, 64)[0][0] == tokenize_sft([rec], chat_tok, 64)[0][0]


def test_clear_errors(chat_tok, tmp_path):
    recs = chat_records(4)
    bare = _with_template(chat_tok, None)
    with pytest.raises(ValueError, match=r"conversations .* but the tokenizer has no chat template"):
        tokenize_sft(recs, bare, 64)
    with pytest.raises(ValueError, match=r"no chat template"):
        SFTTrainer(SFTConfig(model=TINY, output_dir=str(tmp_path / "a"), device="cpu", max_steps=1),
                   train_records=recs, eval_records=[], tokenizer=bare)
    unstable = _with_template(chat_tok, UNSTABLE)
    two_turns = [r for r in recs if sum(m["role"] == "assistant" for m in r.messages) > 1]
    with pytest.raises(ValueError, match=r"assistant_only_loss: the chat template is not prefix-stable: "
                                         r"messages\[:\d\] does not render as the start"):
        tokenize_sft(two_turns, unstable, 256, assistant_only_loss=True)
    tokenize_sft(two_turns, unstable, 256, assistant_only_loss=False)  # every token: no prefix needed
    with pytest.raises(ValueError, match=r"assistant_only_loss: true needs conversational records"):
        SFTTrainer(SFTConfig(model=TINY, output_dir=str(tmp_path / "b"), device="cpu", max_steps=1,
                             assistant_only_loss=True),
                   train_records=[SFTRecord("say cat", "cat")] * 4, eval_records=[], tokenizer=chat_tok)
    with pytest.raises(ValueError, match="assistant_only_loss must be true or false"):
        SFTConfig(assistant_only_loss="yes")


@pytest.mark.filterwarnings("ignore:Seems like")
@pytest.mark.parametrize("packed", [False, True])
def test_loss_equals_cross_entropy_on_transformers_assistant_labels(tmp_path, chat_tok, packed):
    """The trainer's loss on a conversation batch (loss and gradient) == F.cross_entropy with
    labels -100 off transformers' assistant mask (and on padding)."""
    cfg = SFTConfig(model=TINY, output_dir=str(tmp_path / "ce"), device="cpu", max_steps=1, max_len=256,
                    assistant_only_loss=True)
    recs = chat_records(6, seed=5)
    tr = SFTTrainer(cfg, train_records=recs, eval_records=[], tokenizer=chat_tok)
    assert len(tr.train_rows) == len(recs) and len({len(r["input_ids"]) for r in tr.train_rows}) > 1  # padding
    batch = collate(tr.train_rows, tr.pad_id)
    labels = torch.full_like(batch["input_ids"], -100)
    for i, r in enumerate(recs):
        ids, m = _hf_mask(chat_tok, r.messages)
        labels[i, :len(ids)] = torch.where(torch.tensor(m) == 1, torch.tensor(ids), -100)
    s, n = completion_nll_sum(tr.model, batch, packed=packed)
    logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert int(n) == int((labels[:, 1:] != -100).sum()) > 0
    torch.testing.assert_close(s / n, ce, rtol=1e-5, atol=1e-6)
    params = list(tr.model.parameters())
    g_ours = torch.autograd.grad(s / n, params)
    g_ref = torch.autograd.grad(ce, params)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_conversations_train_and_resume_exactly(tmp_path, chat_tok):
    """A conversational run: the eval loss falls, and a run stopped at step 3 and resumed
    equals the uninterrupted one."""
    recs = chat_records(48, seed=6)

    def run(name, steps, max_steps=6):
        c = SFTConfig(model=TINY, output_dir=str(tmp_path / name), device="cpu", max_steps=max_steps, save_every=3,
                      batch_size=8, lr=1e-2, warmup_steps=0, max_len=64, log_every=1, eval_every=0,
                      assistant_only_loss=True)
        t = SFTTrainer(c, train_records=recs[:40], eval_records=recs[40:], tokenizer=chat_tok)
        if steps < max_steps:
            while t.step < steps:
                t.train_step()
            t._save()
            t = SFTTrainer(c, train_records=recs[:40], eval_records=recs[40:], tokenizer=chat_tok)
        return t, t.train()

    full, out = run("full", 6)
    logged = read_metrics(full.cfg.output_dir)
    assert out["eval_loss"] < logged[0]["eval_loss"]
    # the eval set is masked as the training set is: its assistant turns only
    assert out["eval_tokens"] == sum(sum(chat_tokens(chat_tok, r.messages, assistant_only=True)[1][1:])
                                     for r in recs[40:])
    resumed, _ = run("resumed", 3)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert [m["loss"] for m in logged if m["step"] > 3] == \
        [m["loss"] for m in read_metrics(resumed.cfg.output_dir) if m["step"] > 3]


def test_cli_on_conversations(tmp_path, chat_tok, capsys):
    from rlhf_fast.models.tiny import tiny_causal_lm

    folder = tmp_path / "model"
    tiny_causal_lm(len(chat_tok), hidden_size=32, num_layers=1, num_heads=2).save_pretrained(str(folder))
    chat_tok.save_pretrained(str(folder))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": r.messages}) + "\n" for r in chat_records(8)))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: {folder}\ndata: {data}\nmax_steps: 2\nbatch_size: 2\ndevice: cpu\n")
    assert cli.main(["sft", str(cfg), "--output_dir", str(tmp_path / "out"), "--assistant_only_loss", "true",
                     "--loss_type", "dft"]) == 0
    assert "2 steps" in capsys.readouterr().out
    assert "assistant_only_loss: true" in (tmp_path / "out" / "config.yaml").read_text()
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "say cat", "completion": "cat"}) + "\n")
    assert cli.main(["sft", str(cfg), "--data", str(pc), "--output_dir", str(tmp_path / "o2"),
                     "--assistant_only_loss", "true"]) == 2
    assert "assistant_only_loss: true needs conversational records" in capsys.readouterr().err
