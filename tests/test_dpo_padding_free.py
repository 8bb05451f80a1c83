"""DPO ``padding_free``: each micro-batch's chosen and rejected rows scored as one packed row
(policy and reference). The packed row's ids and position ids, and the tokens it scores, are
those of TRL's padding-free collator (``DataCollatorForLanguageModeling(padding_free=True)``;
TRL 1.16's DPOTrainer turns its own ``padding_free`` off); the summed log-probs, token counts and
WPO / ORPO per-token values of a micro-batch with very unequal lengths equal the padded path's;
whole train steps (several loss types, with and without a reference, precomputed reference,
LD-DPO, WPO, reference-free, a batch-level loss, two micro-batches) give the padded step's
metrics and gradients, and evaluation its eval metrics; the reference forward is packed too;
config errors."""

import random

import pytest
import torch

from rlhf_fast.feedback.formats import PairRecord
from rlhf_fast.models import logprobs as L
from rlhf_fast.trainers import dpo as dpo_mod
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer, response_logps, token_logps, wpo_token_logps
from rlhf_fast.trainers.packing import check_packable, pack_targets
from tests.test_dpo import _step_grads
from tests.test_reward import preference_tokenizer

TINY = "tiny:llama:hidden_size=32,num_layers=2,num_heads=2,vocab_size=300"
WORDS = "red blue green cat dog sun moon one two three four five six".split()

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _records(n, seed=0):
    """Pairs whose responses range from 1 to 30 words (one of each pair short, the other long,
    alternately chosen), so a micro-batch is mostly padding when padded."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    out = []
    for i in range(n):
        short, long_ = words(rng.randint(1, 3)), words(rng.randint(15, 30))
        c, r = (short, long_) if i % 2 else (long_, short)
        out.append(PairRecord(f"say {words(rng.randint(1, 6))}:", c, r, annotator="a" if i % 3 else "b"))
    return out


def _trainer(tmp_path, tok, name, records=None, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), batch_size=6, lr=3e-3, warmup_steps=0, eval_every=0,
                log_every=1, max_len=64, max_steps=4, device="cpu", grad_clip=0.0, beta=0.3)
    base.update(kw)
    records = _records(24) if records is None else records
    return DPOTrainer(DPOConfig(**base), train_records=records, eval_records=_records(7, seed=9), tokenizer=tok)


def _twins(tmp_path, tok, **kw):
    """(padded, padding_free) trainers with the same weights and data; the policy's head is
    sharpened (peaked distributions: WPO weights far from 1) and a separate reference nudged off
    the policy (rewards not 0), identically in both."""
    out = []
    for pf in (False, True):
        tr = _trainer(tmp_path, tok, f"pf{int(pf)}", padding_free=pf, **kw)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            tr.model.get_output_embeddings().weight.mul_(8.0)
            if isinstance(tr.reference, torch.nn.Module) and tr.reference is not tr.model:
                for p in tr.reference.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        out.append(tr)
    return out


def _close(got, want, rel):
    """Float32 agreement relative to the tensor's scale: max |got − want| ≤ rel · max |want|
    (elementwise rtol is meaningless for gradient entries near 0, which sum cancelling terms)."""
    assert got.shape == want.shape
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= rel * scale + 1e-12, (err, scale)


def _unequal_batch(tr):
    """A micro-batch of 6 pairs with the most unequal lengths of the training items."""
    items = sorted(tr.train_items, key=lambda it: abs(len(it["chosen"]) - len(it["rejected"])))[-6:]
    batch = tr._batch(items)
    lengths = batch["attention_mask"].sum(-1)
    assert int(lengths.max()) > 4 * int(lengths.min())  # mostly padding in the short rows
    return batch


# ----------------------------------------------------------------------------- the packed row


def test_packed_row_is_trls_padding_free_row(tok):
    """ids, position ids and the scored tokens of the packed row equal TRL's padding-free
    collator's ``input_ids``, ``position_ids`` and ``labels != -100`` (the completion tokens; TRL
    masks each sequence's first token), for rows of very unequal lengths."""
    trl_sft = pytest.importorskip("trl.trainer.sft_trainer")
    rng = random.Random(3)
    rows = []
    for n_prompt, n_resp in ((3, 1), (2, 40), (5, 7), (1, 25)):
        ids = [rng.randrange(3, 300) for _ in range(n_prompt + n_resp)]
        rows.append({"input_ids": ids, "response_mask": [0] * n_prompt + [1] * n_resp})
    batch = dpo_mod.collate(rows, 0)
    target = L._target_mask(batch["attention_mask"], batch["response_mask"])
    pk = pack_targets(batch["input_ids"], batch["attention_mask"], target)

    examples = [{"input_ids": r["input_ids"], "labels": [t if m else -100 for t, m in zip(r["input_ids"],
                                                                                          r["response_mask"])]}
                for r in rows]
    theirs = trl_sft.DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert torch.equal(pk.ids, theirs["input_ids"]) and torch.equal(pk.position_ids, theirs["position_ids"])
    # TRL's model shifts the labels: the state at k predicts label k + 1
    assert (pk.src + 1).tolist() == (theirs["labels"][0] != -100).nonzero().flatten().tolist()
    assert torch.equal(batch["input_ids"][pk.rows, pk.cols], theirs["input_ids"][0, pk.src + 1])


def test_log_probs_of_an_unequal_micro_batch_equal_the_padded(tmp_path, tok):
    """Summed response log-probs and counts (plain and LD-weighted), ORPO's whole-row per-token
    values, and WPO's per-token log-probs and log Σ p² of the packed forward equal the padded
    forward's, with their gradients; the WPO path's log-probs are token_logps' packed ones."""
    tr = _twins(tmp_path, tok)[0]
    batch = _unequal_batch(tr)
    params = list(tr.model.parameters())
    for kw in ({}, {"ld_alpha": 0.4}):
        (a, na), (b, nb) = (response_logps(tr.model, batch, packed=p, **kw) for p in (False, True))
        assert torch.equal(na, nb)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        ga, gb = (torch.autograd.grad((x * torch.arange(1.0, 13.0)).sum(), params) for x in (a, b))
        for x, y in zip(ga, gb):
            _close(y, x, 1e-5)
    full_a, full_b = (token_logps(tr.model, batch, full_rows=6, packed=p) for p in (False, True))
    torch.testing.assert_close(full_b, full_a, rtol=1e-5, atol=1e-5)
    assert (full_b[:6, 1:] != 0).sum() == batch["attention_mask"][:6, 1:].sum()  # the prompts too
    (ta, la), (tb, lb) = (wpo_token_logps(tr.model, batch, packed=p) for p in (False, True))
    torch.testing.assert_close(tb, ta, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    assert (la != 0).any() and torch.equal(tb, token_logps(tr.model, batch, packed=True))
    mask = dpo_mod.response_mask(batch)
    torch.testing.assert_close(dpo_mod.wpo_weights(tb, lb, mask), dpo_mod.wpo_weights(ta, la, mask), rtol=1e-5,
                               atol=0)


# ----------------------------------------------------------------------------- whole steps


STEP_CASES = [
    dict(loss_type="sigmoid", rpo_alpha=0.5, annotator_weights={"a": 1.0, "b": 3.0}),
    dict(loss_type=["ipo", "apo_zero"], loss_weights=[0.5, 1.0], ld_alpha=0.5, grad_accum=2, batch_size=3),
    dict(loss_type="robust", label_smoothing=0.1, use_weighting=True, rpo_alpha=0.3),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], precompute_ref_logps=True),
    dict(loss_type="hinge", f_divergence_type="reverse_kl", use_weighting=True, ld_alpha=0.3),
    dict(loss_type="aot"),
    dict(loss_type="orpo", beta=0.5),
    dict(loss_type="simpo", cpo_alpha=0.5),
]
STEP_IDS = ["sigmoid_rpo_weights", "ipo_apo_ld_accum", "robust_wpo_rpo", "mpo_precomputed", "hinge_wpo_ld", "aot",
            "orpo", "simpo"]


@pytest.mark.parametrize("kw", STEP_CASES, ids=STEP_IDS)
def test_step_and_eval_equal_the_padded(tmp_path, tok, kw):
    """One optimizer step: every metric and the accumulated gradient equal the padded step's;
    then the eval metrics (the updated policy against the reference) equal too."""
    pad, pf = _twins(tmp_path, tok, **kw)
    (ma, ga), (mb, gb) = _step_grads(pad), _step_grads(pf)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-6), k
    if not pf.cfg.reference_free:
        assert abs(ma["rewards/margin"]) > 1e-4  # the reference differs from the policy: a real test
    for x, y in zip(ga, gb):
        _close(y, x, 2e-5)
    ea, eb = pad.evaluate(), pf.evaluate()
    assert ea.keys() == eb.keys() and "eval_loss" in ea
    for k in ea:
        assert eb[k] == pytest.approx(ea[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("kw,packs", [(dict(), 2), (dict(precompute_ref_logps=True), 1),
                                      (dict(loss_type="simpo"), 1)], ids=["reference", "precomputed", "simpo"])
def test_policy_and_reference_run_packed(tmp_path, tok, monkeypatch, kw, packs):
    """Each micro-batch is one packed row for the policy and one for the reference model (none
    when the reference log-probs are precomputed — they were computed packed, one row per chunk
    — or the loss is reference-free); no padded forward runs."""
    calls = []
    real_pack, real_hidden = L._pack, L.hidden_states

    def pack(ids, am):
        calls.append("pack")
        return real_pack(ids, am)

    def hidden(model, input_ids, *a, **k):
        calls.append(tuple(input_ids.shape))
        return real_hidden(model, input_ids, *a, **k)

    monkeypatch.setattr(L, "_pack", pack)
    monkeypatch.setattr(L, "hidden_states", hidden)
    tr = _trainer(tmp_path, tok, "spy", padding_free=True, batch_size=4, **kw)
    if kw.get("precompute_ref_logps"):  # 24 train + 7 eval pairs in chunks of 4: 8 packed reference rows
        assert calls.count("pack") == 8 and all(c[0] == 1 for c in calls if c != "pack")
    calls.clear()
    tr.train_step()
    assert calls.count("pack") == packs
    shapes = [c for c in calls if c != "pack"]
    assert len(shapes) == packs and all(s[0] == 1 for s in shapes), shapes


# ----------------------------------------------------------------------------- errors


def test_config_errors_name_the_field(tmp_path, tok):
    with pytest.raises(ValueError, match="padding_free"):
        DPOConfig(padding_free="yes")
    assert DPOConfig().padding_free is False
    tr = _trainer(tmp_path, tok, "ok", padding_free=True)
    unwrapped = L.unwrap(tr.model)
    unwrapped.config.final_logit_softcapping = 30.0  # a head that cannot be fused: no packed path
    with pytest.raises(ValueError, match="padding_free: true needs .*final_logit_softcapping"):
        check_packable("padding_free", tr.model)
    check_packable("padding_free", None)  # no reference: nothing to check
    with pytest.raises(ValueError, match="padding_free"):
        DPOTrainer(DPOConfig(model=TINY, output_dir=str(tmp_path / "bad"), device="cpu", padding_free=True),
                   model=tr.model, tokenizer=tok, train_records=_records(8), eval_records=[])
