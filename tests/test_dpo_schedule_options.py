"""The DPO and KTO options shared with TRL's configs: ``precompute_ref_batch_size`` (the
reference precompute's forwards: their sizes, and the same log-probs), ``num_train_epochs``
(max_steps from the training examples, before the LR schedule) and ``disable_dropout`` (on by
default: a model with dropout configured gives equal training-mode forwards; off, it does not)."""

import pytest
import torch

from rlhf_fast.trainers import dpo as dpo_mod
from rlhf_fast.trainers.common import disable_dropout, load_causal_lm, read_metrics
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer, response_logps
from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
from rlhf_fast.trainers.reward import synthetic_preference_records
from tests.test_reward import preference_tokenizer

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _make(kind, tmp_path, tok, name="run", n=16, model=None, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), batch_size=4, lr=3e-3, warmup_steps=0, eval_every=0,
                log_every=1, max_len=48, max_steps=3, device="cpu")
    base.update(kw)
    cfg_cls, cls = (DPOConfig, DPOTrainer) if kind == "dpo" else (KTOConfig, KTOTrainer)
    return cls(cfg_cls(**base), train_records=synthetic_preference_records(n, seed=7), eval_records=[],
               tokenizer=tok, model=model)


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_precompute_ref_batch_size(tmp_path, tok, kind, monkeypatch):
    """The precompute's forwards take ``precompute_ref_batch_size`` items (null: batch_size) and
    give the same log-probs (to rounding: the padding differs)."""
    sizes = []
    real = dpo_mod.response_logps

    def spy(model, batch, **kw):
        sizes.append(batch["input_ids"].shape[0])
        return real(model, batch, **kw)

    monkeypatch.setattr(dpo_mod, "response_logps", spy)
    a = _make(kind, tmp_path, tok, "a", precompute_ref_logps=True)
    rows = 2  # DPO: chosen + rejected; KTO (kto): its row + its KL row
    n = len(a.train_items) + len(a.eval_items)
    assert sizes == [rows * min(4, n - s) for s in range(0, n, 4)]
    sizes.clear()
    b = _make(kind, tmp_path, tok, "b", precompute_ref_logps=True, precompute_ref_batch_size=3)
    assert sizes == [rows * min(3, n - s) for s in range(0, n, 3)]
    for x, y in zip(a.train_items, b.train_items):
        assert x["ref"] == pytest.approx(y["ref"], rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="precompute_ref_batch_size must be null or an int >= 1"):
        _make(kind, tmp_path, tok, "c", precompute_ref_batch_size=0)


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_num_train_epochs_sets_max_steps_before_the_schedule(tmp_path, tok, kind):
    tr = _make(kind, tmp_path, tok, num_train_epochs=1.5, max_steps=100, lr_schedule="linear", grad_accum=2)
    n = len(tr.train_items)  # DPO: pairs; KTO: examples, unpaired
    expected = -(-int(1.5 * n) // 8)  # ceil(epochs × n / (batch_size × grad_accum))
    assert tr.cfg.max_steps == expected
    # the linear schedule decays to 0 at that step, not at 100
    lam = tr.scheduler.lr_lambdas[0]
    assert lam(expected) == 0.0 and lam(expected - 1) > 0.0
    tr.train()
    assert read_metrics(tr.cfg.output_dir)[-1]["step"] == expected
    with pytest.raises(ValueError, match="num_train_epochs must be null or a finite number > 0"):
        _make(kind, tmp_path, tok, "bad", num_train_epochs=0)


def _with_dropout(tok):
    model, _ = load_causal_lm(TINY, tokenizer=tok)
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    return model


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_disable_dropout(tmp_path, tok, kind):
    """On (the default): two training-mode forwards of the policy (and of the reference) are
    equal; off: the policy's differ. The tiny models have no dropout, so the default changes
    nothing for them."""
    assert disable_dropout(load_causal_lm(TINY, tokenizer=tok)[0]) == 0
    assert DPOConfig().disable_dropout is True and KTOConfig().disable_dropout is True
    for on in (True, False):
        tr = _make(kind, tmp_path, tok, f"d{on}", model=_with_dropout(tok), disable_dropout=on)
        batch = tr._batch(tr.train_items[:4]) if kind == "kto" else tr._batch(tr.train_items[:2])
        tr.model.train()
        tr.reference.train()  # (the reference runs in eval mode anyway; its dropout is off too)
        with torch.no_grad():
            same = [torch.equal(response_logps(m, batch)[0], response_logps(m, batch)[0])
                    for m in (tr.model, tr.reference)]
        assert same == ([True, True] if on else [False, False]), on
    with pytest.raises(ValueError, match="disable_dropout must be true or false"):
        _make(kind, tmp_path, tok, "bad", disable_dropout="no")


@pytest.mark.parametrize("loss_type", ["cpo", "simpo", "orpo"])
def test_disable_dropout_of_the_reference_free_losses(tmp_path, tok, loss_type):
    """TRL's CPOConfig and ORPOConfig have ``disable_dropout`` (default true) too; our CPO,
    SimPO and ORPO are DPO loss types, whose policy (no reference is loaded) follows it."""
    for on in (True, False):
        tr = _make("dpo", tmp_path, tok, f"{loss_type}{on}", model=_with_dropout(tok), loss_type=loss_type,
                   disable_dropout=on)
        assert tr.reference is None or tr.reference is tr.model or not isinstance(tr.reference, torch.nn.Module)
        batch = tr._batch(tr.train_items[:2])
        tr.model.train()
        with torch.no_grad():
            same = torch.equal(response_logps(tr.model, batch)[0], response_logps(tr.model, batch)[0])
        assert same == on, on
