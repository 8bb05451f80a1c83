"""TRL's ``pad_to_multiple_of`` in the offline trainers (SFT, reward, DPO, KTO): every batch's
length rounded up to the multiple, the ids equal to TRL's ``pad`` of the same rows, the steps'
metrics those of the unrounded run (padding is masked), and bad values or packed rows refused
naming the keys."""

import json

import pytest
import torch

from rlhf_fast.feedback import formats
from rlhf_fast.trainers import sft as sft_mod
from rlhf_fast.trainers.sft import collate
from tests.test_activation_offload import TRAINERS
from tests.test_offline_metrics import pref_tok, sft_tok  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def test_collate_equals_trls_pad():
    from trl.trainer.utils import pad

    rows = [{"input_ids": [5, 6, 7], "response_mask": [0, 1, 1]}, {"input_ids": [8] * 9, "response_mask": [1] * 9}]
    for m in (None, 1, 4, 8, 16):
        b = collate(rows, pad_id=3, pad_to_multiple_of=m)
        ids = [torch.tensor(r["input_ids"]) for r in rows]
        assert torch.equal(b["input_ids"], pad(ids, padding_value=3, pad_to_multiple_of=m)), m
        assert torch.equal(b["attention_mask"], pad([torch.ones_like(t) for t in ids], pad_to_multiple_of=m)), m
        assert b["response_mask"].shape == b["input_ids"].shape
    ids, attn = formats.pad_right([[1, 2, 3], [4]], pad_id=0, pad_to_multiple_of=8)
    assert ids.shape == (2, 8) and attn.tolist() == [[1, 1, 1] + [0] * 5, [1] + [0] * 7]


def _untimed(run_dir):
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/") and "per_second" not in k}
                for line in f]


@pytest.mark.parametrize("kind", ["sft", "dpo", "reward", "kto"])
def test_batches_are_rounded_and_steps_unchanged(tmp_path, request, monkeypatch, kind):
    make, tok = TRAINERS[kind]
    tok = request.getfixturevalue(tok)
    plain = make(tmp_path, tok, "plain")
    plain.train()
    widths = []
    real_collate, real_pad = sft_mod.collate, formats.pad_right

    def spy_collate(rows, pad_id, pad_to_multiple_of=None):
        out = real_collate(rows, pad_id, pad_to_multiple_of)
        widths.append(out["input_ids"].shape[1])
        return out

    def spy_pad(seqs, pad_id, pad_to_multiple_of=None):
        out = real_pad(seqs, pad_id, pad_to_multiple_of)
        widths.append(out[0].shape[1])
        return out

    import rlhf_fast.trainers.dpo as dpo_mod
    import rlhf_fast.trainers.kto as kto_mod
    import rlhf_fast.trainers.reward as reward_mod

    for mod in (sft_mod, dpo_mod, kto_mod):
        monkeypatch.setattr(mod, "collate", spy_collate)
    monkeypatch.setattr(reward_mod, "pad_right", spy_pad)
    rounded = make(tmp_path, tok, "rounded", pad_to_multiple_of=16)
    rounded.train()
    assert widths and all(w % 16 == 0 for w in widths), widths
    a, b = _untimed(str(tmp_path / "plain")), _untimed(str(tmp_path / "rounded"))
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for x, y in zip(a, b):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (k, x[k], y[k])


@pytest.mark.parametrize("kind, kw, msg", [
    ("sft", dict(pad_to_multiple_of=0), "pad_to_multiple_of must be null or an int >= 1"),
    ("dpo", dict(pad_to_multiple_of=2.5), "pad_to_multiple_of must be null or an int >= 1"),
    ("kto", dict(pad_to_multiple_of=True), "pad_to_multiple_of must be null or an int >= 1"),
    ("sft", dict(pad_to_multiple_of=8, packing=True), "packing: true"),
    ("dpo", dict(pad_to_multiple_of=8, padding_free=True), "padding_free: true"),
    ("dpo", dict(pad_to_multiple_of=8, prefix_sharing=True), "prefix_sharing: true"),
    ("reward", dict(pad_to_multiple_of=8, prefix_sharing=True), "prefix_sharing: true"),
])
def test_bad_values_and_packed_rows_are_refused(tmp_path, request, kind, kw, msg):
    make, tok = TRAINERS[kind]
    with pytest.raises(ValueError, match=msg):
        make(tmp_path, request.getfixturevalue(tok), "bad", **kw)


def test_orpo_padding_value_fills_the_padding_only(tmp_path, pref_tok, monkeypatch):
    """TRL ORPOConfig's ``padding_value`` (our DPO trainer's, any loss type): the padded positions
    of every batch hold it, the attended ones are unchanged, and the steps equal the run with
    the tokenizer's pad (padding is never attended); ids outside the vocabulary are refused."""
    make, _ = TRAINERS["dpo"]
    plain = make(tmp_path, pref_tok, "plain", loss_type="orpo")
    plain.train()
    batches = []
    real = sft_mod.collate

    def spy(rows, pad_id, pad_to_multiple_of=None):
        out = real(rows, pad_id, pad_to_multiple_of)
        batches.append(out)
        return out

    import rlhf_fast.trainers.dpo as dpo_mod

    monkeypatch.setattr(dpo_mod, "collate", spy)
    other = make(tmp_path, pref_tok, "other", loss_type="orpo", padding_value=7)
    other.train()
    assert other.pad_id == 7 != plain.pad_id
    assert any((b["attention_mask"] == 0).any() for b in batches)
    for b in batches:
        assert (b["input_ids"][b["attention_mask"] == 0] == 7).all()
    a, b = _untimed(str(tmp_path / "plain")), _untimed(str(tmp_path / "other"))
    for x, y in zip(a, b):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (k, x[k], y[k])
    with pytest.raises(ValueError, match="padding_value"):
        make(tmp_path, pref_tok, "bad", padding_value=-1)
    with pytest.raises(ValueError, match=r"padding_value \(10000\) must be a token id below"):
        make(tmp_path, pref_tok, "big", padding_value=10000)
