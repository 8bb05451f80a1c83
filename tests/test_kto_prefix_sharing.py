"""KTO's ``prefix_sharing``: the reference scores each example's row and its KL row (the same
prompt, another example's completion) as one shared-prefix pair. Steps, z0, metrics and weights
equal the padded run's (the reference forward at every step, and precomputed); the reference
forward is one shared row whose groups hold each prompt once; the settings it cannot run are
refused naming the key."""

import pytest
import torch

from rlhf_fast.feedback.formats import PairRecord
from rlhf_fast.models import llama_forward
from rlhf_fast.trainers.kto import KTOConfig
from tests.test_kto import _trainer, tok  # noqa: F401  (the tokenizer fixture)
from tests.test_trainer_common import TIMED_METRICS

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _records(n=16):
    """Pairs whose prompts are long next to their answers (the regime the key is for)."""
    words = "red blue green cat dog sun moon one two three".split()
    out = []
    for i in range(n):
        prompt = " ".join(words[(i + j) % len(words)] for j in range(18))
        out.append(PairRecord(prompt, " ".join(words[i % 10:i % 10 + 2]), " ".join(words[(i + 5) % 10:][:3])))
    return out


def _spy(monkeypatch, seen):
    """Records the shape and segments of every llama_forward call."""
    real = llama_forward.hidden_states

    def spy(base, input_ids, attention_mask, position_ids, columns=None, select=None, segments=None):
        seen.append((tuple(input_ids.shape), segments))
        return real(base, input_ids, attention_mask, position_ids, columns, select, segments)

    monkeypatch.setattr(llama_forward, "hidden_states", spy)


@pytest.mark.parametrize("precompute", [False, True])
def test_shared_reference_forward_gives_the_padded_steps(tmp_path, tok, monkeypatch, precompute):  # noqa: F811
    runs = {}
    for shared in (False, True):
        tr = _trainer(tmp_path, tok, f"r{int(shared)}", records=_records(), max_len=64, batch_size=4,
                      prefix_sharing=shared, precompute_ref_logps=precompute)
        seen = []
        _spy(monkeypatch, seen)
        logs = [{k: v for k, v in tr.train_step().items() if k not in TIMED_METRICS} for _ in range(2)]
        monkeypatch.undo()
        runs[shared] = (logs, [p.detach().clone() for p in tr.model.parameters()], seen)
    (lp, wp, seen_p), (ls, ws, seen_s) = runs[False], runs[True]
    for a, b in zip(lp, ls):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    for a, b in zip(wp, ws):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    shared_rows = [s for _, s in seen_s if s is not None]
    assert not any(s is not None for _, s in seen_p)
    if precompute:  # scored before training: no reference forward in the steps
        assert not shared_rows
    else:
        # one shared row per micro-batch reference forward, each group a row and its KL row
        assert shared_rows and all(shape[0] == 1 for shape, s in seen_s if s is not None)
        assert all(len(g) == 2 for s in shared_rows for g in s.groups)


def test_the_precomputed_reference_is_shared_too(tmp_path, tok, monkeypatch):  # noqa: F811
    seen = []
    _spy(monkeypatch, seen)
    tr = _trainer(tmp_path, tok, records=_records(), max_len=64, batch_size=4, prefix_sharing=True,
                  precompute_ref_logps=True)
    assert any(s is not None for _, s in seen)
    assert all(len(it["ref"]) == 2 for it in tr.train_items)


def test_refusals_name_the_key(tmp_path, tok):  # noqa: F811
    with pytest.raises(ValueError, match="prefix_sharing must be true or false"):
        KTOConfig(prefix_sharing="yes")
    with pytest.raises(ValueError, match="prefix_sharing shares .* needs loss_type 'kto'"):
        KTOConfig(prefix_sharing=True, loss_type="apo_zero_unpaired")
    assert KTOConfig().prefix_sharing is False
    from rlhf_fast.ops import use_backend

    with use_backend("torch"), pytest.raises(ValueError, match="prefix_sharing: true needs .*torch backend"):
        _trainer(tmp_path, tok, records=_records(), max_len=64, batch_size=4, prefix_sharing=True)
