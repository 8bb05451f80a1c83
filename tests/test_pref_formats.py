"""Conversational and implicit-prompt preference data (TRL's formats) for DPO, KTO and the
reward model: the token ids against TRL's own dataset preparation (``DPOTrainer`` /
``KTOTrainer`` / ``RewardTrainer._prepare_dataset``, called on the same records with the same
tiny tokenizer and chat template), the implicit-prompt split against ``trl.extract_prompt``,
text pairs keeping their ids, every format problem with its line and field, and a few steps of
each trainer on conversational data."""

import json
import types

import pytest
import torch

from rlhf_fast.feedback.formats import PairRecord, extract_prompt, load_records, reward_input_ids
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer, encode_pair
from rlhf_fast.trainers.kto import BinaryRecord, KTOConfig, KTOTrainer, load_binary_records
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer
from rlhf_fast.trainers.sft_data import completion_tokens

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2"
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = "red blue green cat dog sun moon one two three".split()


def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def conv_rows(n=6, seed=0):
    """TRL conversational preference rows: a 1- or 3-message chat prompt (some with a system
    message), one assistant message as chosen and as rejected."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        w = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
        prompt = _msgs(("system", "be brief")) if i % 3 == 0 else []
        if i % 2:
            prompt += _msgs(("user", "say " + w(2)), ("assistant", w(2)))
        prompt += _msgs(("user", "repeat " + w(3)))
        out.append({"prompt": prompt, "chosen": _msgs(("assistant", w(3))), "rejected": _msgs(("assistant", w(4)))})
    return out


@pytest.fixture(scope="module")
def tok():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    t = train_tokenizer(sample_texts(64) + [" ".join(WORDS)] * 8, 400, padding_side="right", add_bos=True)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    return t


def _trl_prepare(trainer_cls, rows, tok, **self_attrs):
    """TRL's own ``_prepare_dataset`` of ``trainer_cls`` on ``rows`` (no truncation)."""
    from datasets import Dataset

    fake = types.SimpleNamespace(_tokenizer=tok, **self_attrs)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_end")
    return trainer_cls._prepare_dataset(fake, Dataset.from_list(rows), tok, args, "train")


def _pairs(rows):
    return load_records(rows, "pairs")


# ------------------------------------------------------------------ conversational pairs


def test_conversational_pair_ids_equal_trl_dpo(tok):
    """encode_pair on conversational records == TRL DPOTrainer's prompt_ids / chosen_ids /
    rejected_ids; each response ends with the template's end of turn (not eos)."""
    from trl import DPOTrainer as TRLDPO

    rows = conv_rows(6)
    ref = _trl_prepare(TRLDPO, rows, tok)
    end = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    for rec, r in zip(_pairs(rows), ref):
        p, c, rj = encode_pair(tok, rec.prompt, rec.chosen, rec.rejected, max_len=10_000)
        assert (p, c, rj) == (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])
        assert c[-len(end):] == end and rj[-len(end):] == end and tok.eos_token_id not in c
        assert tok.decode(p).endswith("<|im_start|>assistant\n")


def test_conversational_pair_truncation_keeps_prompt_end(tok):
    """The text pairs' truncation rule applies unchanged: the prompt's start goes first."""
    rec = _pairs(conv_rows(2))[1]
    p, c, r = encode_pair(tok, rec.prompt, rec.chosen, rec.rejected, max_len=10_000)
    p2, c2, r2 = encode_pair(tok, rec.prompt, rec.chosen, rec.rejected, max_len=len(p) + max(len(c), len(r)) - 3)
    assert p2 == p[3:] and (c2, r2) == (c, r)


def test_text_pair_ids_unchanged(tok):
    """Text pairs (text prompt with bos; chat prompt + text response) keep today's ids: the
    prompt (tokenizer specials for text, the template's for a chat), the response, one eos."""
    eos = tok.eos_token_id
    for prompt in ("describe: the cat", _msgs(("user", "describe the dog"))):
        enc = encode_pair(tok, prompt, " red cat", "blue dog" + tok.eos_token, max_len=10_000)
        rendered = prompt if isinstance(prompt, str) else tok.apply_chat_template(prompt, tokenize=False,
                                                                                  add_generation_prompt=True)
        p = tok(rendered, add_special_tokens=isinstance(prompt, str))["input_ids"]
        assert enc == (p, tok(" red cat", add_special_tokens=False)["input_ids"] + [eos],
                       tok("blue dog", add_special_tokens=False)["input_ids"] + [eos])
        assert (enc[0][0] == tok.bos_token_id) == isinstance(prompt, str)


def test_boundary_merge_template_splits_as_trl(tok):
    """The tiny models' template ends its generation prompt with "assistant: ", whose space merges
    with the reply's first word: the prompt is cut to the tokens both rows share and the
    responses start there (TRL's common_prefix_length), with a warning; ids still equal TRL's."""
    import copy
    import warnings

    from trl import DPOTrainer as TRLDPO

    from rlhf_fast.models.tiny import CHAT_TEMPLATE
    from rlhf_fast.trainers import sft_data

    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    rows = conv_rows(4)
    ref = _trl_prepare(TRLDPO, rows, t)
    sft_data._warned_split = False
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = [encode_pair(t, r.prompt, r.chosen, r.rejected, 10_000) for r in _pairs(rows)]
    assert len([x for x in w if "not a token prefix" in str(x.message)]) == 1
    full_head = t(t.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
    assert len(got[0][0]) < len(full_head)  # the split really moved (else this test checks nothing)
    for g, r in zip(got, ref):
        assert g == (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])


# ------------------------------------------------------------------ implicit prompt


def implicit_rows():
    conv = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in conv_rows(4)]
    text = [{"chosen": "Q: what is red? A: the sun", "rejected": "Q: what is red? A: a dog"},
            {"chosen": "tell me one thing.two", "rejected": "tell me one thing.three"},
            {"chosen": "say hi please", "rejected": "say hello"}]
    return conv, text


def test_implicit_prompt_split_equals_trl_extract_prompt():
    from trl.data_utils import extract_prompt as trl_extract

    conv, text = implicit_rows()
    for row in conv + text:
        ref = trl_extract(row)
        assert extract_prompt(row["chosen"], row["rejected"]) == (ref["prompt"], ref["chosen"], ref["rejected"])
        rec, = load_records([row], "pairs")
        assert (rec.prompt, rec.chosen, rec.rejected) == (ref["prompt"], ref["chosen"], ref["rejected"])
    assert load_records([text[0]], "pairs")[0].chosen == " the sun"  # TRL: the space goes to the responses


def test_implicit_conversational_pair_ids_equal_trl_dpo(tok):
    """From implicit-prompt conversations all the way: TRL extracts and tokenizes; we load and encode."""
    from trl import DPOTrainer as TRLDPO

    conv, _ = implicit_rows()
    ref = _trl_prepare(TRLDPO, conv, tok)
    for rec, r in zip(_pairs(conv), ref):
        assert encode_pair(tok, rec.prompt, rec.chosen, rec.rejected, 10_000) == (
            r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])


# ------------------------------------------------------------------ problems


C, R = _msgs(("assistant", "yes")), _msgs(("assistant", "no"))
U = _msgs(("user", "hi"))


@pytest.mark.parametrize("row,field,needle", [
    ({"prompt": "p", "chosen": C, "rejected": R}, "prompt", "need a chat prompt"),
    ({"prompt": U, "chosen": C, "rejected": "no"}, "rejected", "both responses are text or both chat"),
    ({"prompt": U, "chosen": [], "rejected": R}, "chosen", "non-empty list of chat messages"),
    ({"prompt": U, "chosen": [{"role": "assistant"}], "rejected": R}, "chosen[0]", "chat message"),
    ({"prompt": U, "chosen": C, "rejected": _msgs(("assistant", " "))}, "rejected[0].content", "empty text"),
    ({"prompt": U, "chosen": C, "rejected": C}, "rejected", "identical"),
    ({"chosen": "yes", "rejected": "no"}, "prompt", "missing field (and chosen and rejected share no leading text"),
    ({"chosen": U + C, "rejected": U}, "chosen", "rejected is the start of chosen"),
    ({"chosen": U + C, "rejected": "hi"}, "rejected", "both be text or both chat"),
    ({"chosen": "say hi", "rejected": "say hi "}, "rejected", "chosen is the start of rejected"),
    ({"chosen": "ab", "rejected": "ac"}, "prompt", None),  # a one-letter prompt is a prompt
])
def test_pair_format_problems_name_line_and_field(row, field, needle):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    if needle is None:
        assert load_records([good, row], "pairs")[1] == PairRecord("a", "b", "c")
        return
    with pytest.raises(ValueError) as e:
        load_records([good, row], "pairs")
    line = str(e.value).splitlines()[1]
    assert line.startswith(f"<list>:2: {field}: ") and needle in line, line


def test_kto_conversational_binary_records(tok, tmp_path):
    """{prompt, completion: [messages], label} loads; its ids equal TRL KTOTrainer's; a text prompt is refused."""
    from trl import KTOTrainer as TRLKTO

    rows = [{"prompt": r["prompt"], "completion": r["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
            for i, r in enumerate(conv_rows(4))]
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"prompt": "p", "completion": C, "label": True}]))
    with pytest.raises(ValueError, match=r"b.jsonl:5: prompt: a conversational completion"):
        load_binary_records(str(path))
    recs = load_binary_records(rows)
    ref = _trl_prepare(TRLKTO, rows, tok, calculate_KL=False)
    for rec, r in zip(recs, ref):
        p, c, _ = encode_pair(tok, rec.prompt, rec.completion, rec.completion, 10_000)
        assert (p, c) == (r["prompt_ids"], r["completion_ids"])


def test_reward_conversational_ids_are_trls_plus_eos(tok):
    """The reward encoding of a conversational pair: TRL RewardTrainer's ids (the whole
    conversation through the template) and then the eos the head is read at (our rule, kept);
    text pairs unchanged."""
    from trl import RewardTrainer as TRLReward

    rows = conv_rows(4)
    ref = _trl_prepare(TRLReward, rows, tok)
    eos = tok.eos_token_id
    for rec, r in zip(_pairs(rows), ref):
        assert reward_input_ids(tok, rec.prompt, rec.chosen) == r["chosen_ids"] + [eos]
        assert reward_input_ids(tok, rec.prompt, rec.rejected) == r["rejected_ids"] + [eos]
    ids = reward_input_ids(tok, "p q", " r")
    assert ids == tok("p q")["input_ids"] + tok(" r", add_special_tokens=False)["input_ids"] + [eos]


# ------------------------------------------------------------------ trainers


def _train_rows(n=8):
    rows = conv_rows(n, seed=3)
    for i, r in enumerate(rows):
        r["annotator"] = "a" if i % 2 else "b"
    return rows


def test_trainers_run_on_conversational_pairs(tok, tmp_path):
    """DPO, KTO (pairs, unpaired) and the reward model load conversational JSONL and train 2
    steps (auto_annotator_weights included: the agreement statistic keys message lists)."""
    from rlhf_fast.models.tiny import tiny_causal_lm

    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _train_rows()))
    common = dict(model=TINY, data=str(path), batch_size=4, max_steps=2, eval_every=0, log_every=1, max_len=64,
                  device="cpu", auto_annotator_weights=True)
    model = lambda: tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2)  # noqa: E731
    dpo = DPOTrainer(DPOConfig(output_dir=str(tmp_path / "dpo"), **common), model=model(), tokenizer=tok)
    it = dpo.train_items[0]
    assert tok.decode(it["chosen"]).endswith("<|im_end|>\n")
    assert torch.isfinite(torch.tensor(dpo.train()["loss"]))
    kto = KTOTrainer(KTOConfig(output_dir=str(tmp_path / "kto"), data_kind="pairs", **common), model=model(),
                     tokenizer=tok)
    assert torch.isfinite(torch.tensor(kto.train()["loss"]))
    rm_common = {k: v for k, v in common.items()}
    rm = RewardTrainer(RewardConfig(output_dir=str(tmp_path / "rm"), **rm_common))
    assert rm.train_items[0]["seqs"][0][-1] == rm.tokenizer.eos_token_id
    assert torch.isfinite(torch.tensor(rm.train()["loss"]))


def test_kto_kl_rows_borrow_conversational_turns(tok, tmp_path):
    """The KL row another prompt borrows is the completion's turns as its own prompt renders them."""
    from rlhf_fast.models.tiny import tiny_causal_lm

    recs = [BinaryRecord(r["prompt"], r["chosen"], i % 2 == 0) for i, r in enumerate(conv_rows(4))]
    kto = KTOTrainer(KTOConfig(model=TINY, output_dir=str(tmp_path / "k"), batch_size=4, max_steps=1, eval_every=0,
                               max_len=200, device="cpu"), train_records=recs, eval_records=[],
                     model=tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2), tokenizer=tok)
    turns = {tuple(completion_tokens(tok, r.prompt, r.completion)[1][0]) for r in recs}
    items = kto.train_items
    assert all(tuple(it["completion"]) in turns and tuple(it["kl"]) in turns for it in items)
    assert any(it["kl"] != it["completion"] for it in items)  # really another example's turns
