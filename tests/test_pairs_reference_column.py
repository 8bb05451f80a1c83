"""A ``pairs`` row's ``reference`` is TPO's gold answer only for TPO (``load_records(...,
triples=True)``): every other reader of pairs files (the reward trainer, DPO's other losses, KTO)
ignores that key as any extra column, as before TPO came (an id, an empty string, text beside
conversational responses load), and ``dedup`` still merges rows that differ only in it."""

import json

import pytest

from rlhf_fast.feedback.formats import PairRecord, load_records
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records
from tests.test_reward import preference_tokenizer

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"
CHAT = lambda role, text: [{"role": role, "content": text}]  # noqa: E731

# rows a pairs file may hold, each with a `reference` column that is no TPO gold answer
FOREIGN_REFERENCES = {
    "an id": {"prompt": "Q1", "chosen": "yes", "rejected": "no", "reference": 17},
    "empty text": {"prompt": "Q2", "chosen": "yes", "rejected": "no", "reference": ""},
    "text beside chat responses": {"prompt": CHAT("user", "hi"), "chosen": CHAT("assistant", "a"),
                                   "rejected": CHAT("assistant", "b"), "reference": "doc 3, page 2"},
    "implicit prompt not repeated": {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5", "reference": "4"},
}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("name", sorted(FOREIGN_REFERENCES))
def test_a_pairs_file_with_another_reference_column_still_loads(tmp_path, name):
    """What every non-TPO reader of pairs calls (dpo._load_pairs, RewardTrainer, KTO's loader):
    the row loads as a PairRecord (TPO's gold-answer checks apply to TPO only)."""
    path = _write(tmp_path / "pairs.jsonl", [FOREIGN_REFERENCES[name]])
    (rec,) = load_records(path, "pairs")
    assert isinstance(rec, PairRecord)


def test_dedup_still_merges_pairs_that_differ_only_in_an_extra_field(tmp_path):
    """Two rows with the same prompt / chosen / rejected / annotator are one pair
    (the reward trainer's default ``dedup: true`` drops the repeat) whatever their ``reference``
    column holds."""
    rows = [{"prompt": "Q", "chosen": "yes", "rejected": "no", "reference": "from source A"},
            {"prompt": "Q", "chosen": "yes", "rejected": "no", "reference": "from source B"}]
    assert len(load_records(_write(tmp_path / "pairs.jsonl", rows), "pairs", dedup=True)) == 1


def test_reward_training_on_pairs_with_a_reference_id(tmp_path):
    """The reward trainer (no TPO anywhere) on a pairs file whose rows carry a numeric
    ``reference`` id builds."""
    recs = synthetic_preference_records(12, seed=3)
    rows = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected, "reference": i}
            for i, r in enumerate(recs)]
    cfg = RewardConfig(model=TINY, data=_write(tmp_path / "pairs.jsonl", rows), output_dir=str(tmp_path / "rm"),
                       batch_size=4, max_steps=1, max_len=48, device="cpu", eval_fraction=0.0)
    RewardTrainer(cfg, tokenizer=preference_tokenizer())
