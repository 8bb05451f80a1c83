"""KTO trainer: the loss (``kto`` and ``apo_zero_unpaired``) and the KL reference point against
TRL's own ``KTOTrainer`` code (values, gradients, logged metrics, two ranks; integer annotator
weights as TRL's loss over repeated examples), no KL rows for ``apo_zero_unpaired``, annotator
weights (1 = unweighted exactly, 0 = the records dropped, auto weights from agreement), the
mismatched KL rows and the weight advice against what
TRL's data preparation builds, learning on synthetic data, a reference that does not move,
precomputed reference log-probs, exact resume, micro-batch split invariance, data validation,
config errors and the CLI."""

import collections
import dataclasses
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from rlhf_fast import cli
from rlhf_fast.feedback.formats import PairRecord, ScoreRecord
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.dpo import response_logps
from rlhf_fast.trainers.kto import (N_SUMS, BinaryRecord, KTOConfig, KTOTrainer, agreement_records, kl_partners,
                                    kto_kl, kto_loss, load_binary_records, to_binary, weight_advice)
from rlhf_fast.trainers.reward import synthetic_preference_records
from tests.test_reward import preference_tokenizer
from tests.test_trainer_common import untimed_metrics
from rlhf_fast.trainers.sft import collate, split_records

ROOT = Path(__file__).resolve().parent.parent
TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"

# tiny models: one thread is far faster than two on a shared, oversubscribed CPU
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _cfg(tmp_path, name="run", **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), batch_size=8, lr=3e-3, warmup_steps=2, eval_every=0,
                log_every=1, max_len=48, max_steps=6, device="cpu")
    base.update(kw)
    return KTOConfig(**base)


def _trainer(tmp_path, tok, name="run", records=None, eval_records=(), **kw):
    records = synthetic_preference_records(32, seed=1) if records is None else records
    return KTOTrainer(_cfg(tmp_path, name, **kw), train_records=records, eval_records=list(eval_records), tokenizer=tok)


def _tiny_model(tok):
    from rlhf_fast.models.tiny import tiny_causal_lm

    return tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2)


# ----------------------------------------------------------------------------- the loss vs TRL


def _trl_kto(P, cm, P_kl, cm_kl, labels, ref, ref_kl, *, beta, wd, wu, other_rank_kl=None, loss_type="kto",
             forwards=None):
    """TRL 1.x's ``KTOTrainer._compute_loss`` (``loss_type`` "kto" or "apo_zero_unpaired", whose
    ``calculate_KL`` TRL sets false) run as an unbound function on a stub trainer whose model
    returns the per-token log-probs ``P [B, T-1]`` of the rows and ``P_kl`` of the KL rows (0
    where TRL's label is -100), the reference log-probs given as precomputed. ``other_rank_kl``:
    the KL mean of a second rank, which TRL's gather of the KL estimate then returns beside this
    rank's. ``forwards``: a list that gets "rows" / "kl" per model call. Returns (loss, TRL's
    logged metrics)."""
    from trl.trainer.kto_trainer import KTOTrainer as TRLKTOTrainer

    inputs = {"input_ids": torch.zeros(P.shape[0], P.shape[1] + 1, dtype=torch.long),
              "attention_mask": torch.ones(P.shape[0], P.shape[1] + 1, dtype=torch.long), "completion_mask": cm,
              "KL_input_ids": torch.zeros(P_kl.shape[0], P_kl.shape[1] + 1, dtype=torch.long),
              "KL_attention_mask": torch.ones(P_kl.shape[0], P_kl.shape[1] + 1, dtype=torch.long),
              "KL_completion_mask": cm_kl, "label": labels, "ref_logps": ref, "ref_KL_logps": ref_kl}

    class Model:
        training = True

        def __call__(self, **kw):
            assert kw["fused_lm_head"] is True
            src = P if kw["input_ids"] is inputs["input_ids"] else P_kl
            if forwards is not None:
                forwards.append("rows" if src is P else "kl")
            lp = torch.where(kw["labels"][:, 1:] != -100, src, torch.zeros_like(src))
            z = torch.zeros_like(src)
            return types.SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z)

    calls = []

    def gather(x):  # TRL's first gather is of the KL estimate
        calls.append(1)
        if len(calls) == 1 and other_rank_kl is not None:
            return torch.stack([x, x.new_tensor(other_rank_kl)])
        return x

    model = Model()
    stub = types.SimpleNamespace(
        model=model, accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=gather),
        calculate_KL=loss_type == "kto", aux_loss_enabled=False, precompute_ref_logps=True, loss_type=loss_type,
        beta=beta, desirable_weight=wd, undesirable_weight=wu, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)})
    stub._compute_kl_logps = lambda m, b: TRLKTOTrainer._compute_kl_logps(stub, m, b)
    loss = TRLKTOTrainer._compute_loss(stub, model, inputs, False)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


# (labels, KL offset (+: z0 > 0, -: clamped to 0), λ_D, λ_U, a second rank, loss type)
TRL_CASES = {
    "mixed": ([1, 0, 1, 1, 0, 0, 1], 2.0, 1.0, 1.0, False, "kto"),
    "clamped": ([1, 0, 1, 1, 0, 0, 1], -3.0, 1.0, 1.0, False, "kto"),
    "weights": ([1, 0, 0, 0, 0, 1, 0], 1.5, 1.33, 0.7, False, "kto"),
    "desirable_only": ([1, 1, 1, 1, 1, 1, 1], 1.0, 1.0, 1.0, False, "kto"),
    "two_ranks": ([0, 1, 1, 0, 1, 0, 0], -0.5, 1.0, 1.2, True, "kto"),
    "apo": ([1, 0, 1, 1, 0, 0, 1], 2.0, 1.0, 1.0, False, "apo_zero_unpaired"),
    "apo_weights": ([1, 0, 0, 0, 0, 1, 0], 1.5, 1.33, 0.7, False, "apo_zero_unpaired"),
    "apo_undesirable_only": ([0, 0, 0, 0, 0, 0, 0], 1.0, 1.0, 1.0, False, "apo_zero_unpaired"),
}


def _trl_case(case, seed=7):
    """The tensors of a TRL_CASES case: per-token log-probs ``P [B, T-1]`` / ``P_kl`` (float64,
    requiring grad), completion masks, labels, summed log-probs and reference log-probs, and a
    second rank's KL rows."""
    labels_, offset, _, _, _, _ = TRL_CASES[case]
    g = torch.Generator().manual_seed(seed)
    B, T, Tk, beta = len(labels_), 9, 7, 0.3
    labels = torch.tensor(labels_, dtype=torch.bool)

    def mask(T_):
        cm = (torch.rand(B, T_, generator=g) > 0.35).long()  # completion tokens in holes, lengths differ
        cm[:, 0], cm[:, 1] = 0, 1
        return cm

    cm, cm_kl = mask(T), mask(Tk)
    P = (-3.0 * torch.rand(B, T - 1, generator=g, dtype=torch.float64)).requires_grad_()
    P_kl = (-3.0 * torch.rand(B, Tk - 1, generator=g, dtype=torch.float64)).requires_grad_()
    logps, kl_logps = (P * cm[:, 1:]).sum(1), (P_kl * cm_kl[:, 1:]).sum(1)
    ref = logps.detach() + torch.randn(B, generator=g, dtype=torch.float64) * 2
    ref_kl = kl_logps.detach() - offset + torch.randn(B, generator=g, dtype=torch.float64) * 0.3
    # the second rank's KL rows (its own mean), for the gather over ranks
    other_kl, other_ref = torch.randn(B, generator=g, dtype=torch.float64) - 20, torch.randn(B, generator=g,
                                                                                             dtype=torch.float64) - 21
    return types.SimpleNamespace(P=P, P_kl=P_kl, cm=cm, cm_kl=cm_kl, labels=labels, logps=logps, kl_logps=kl_logps,
                                 ref=ref, ref_kl=ref_kl, other_kl=other_kl, other_ref=other_ref, beta=beta)


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_loss_and_kl_estimate_equal_trls(case):
    pytest.importorskip("trl")
    _, _, wd, wu, two, loss_type = TRL_CASES[case]
    c = _trl_case(case)
    P, P_kl, labels, logps, beta = c.P, c.P_kl, c.labels, c.logps, c.beta
    apo = loss_type == "apo_zero_unpaired"
    other = float((c.other_kl - c.other_ref).mean()) if two else None

    # ours: z0 over every KL row of the step (both ranks' when two; none for apo), then the per-example losses
    if apo:
        z0 = None
    elif two:
        z0 = kto_kl(torch.cat([c.kl_logps, c.other_kl]), torch.cat([c.ref_kl, c.other_ref]))
    else:
        z0 = kto_kl(c.kl_logps, c.ref_kl)
    loss, rewards = kto_loss(logps, c.ref, labels, z0, beta=beta, desirable_weight=wd, undesirable_weight=wu,
                             loss_type=loss_type)
    ours = loss.mean()
    g_ours, g_ours_kl = torch.autograd.grad(ours, [P, P_kl], allow_unused=True)

    forwards = []
    theirs, m = _trl_kto(P, c.cm, P_kl, c.cm_kl, labels, c.ref, c.ref_kl, beta=beta, wd=wd, wu=wu,
                         other_rank_kl=other, loss_type=loss_type, forwards=forwards)
    g_theirs, = torch.autograd.grad(theirs, P)
    assert float(theirs.detach()) > 0.05 and float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-12)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)
    assert g_ours.abs().sum() > 0 and g_ours_kl is None  # z0 is detached: no gradient reaches the KL rows
    assert forwards == (["rows"] if apo else ["kl", "rows"])  # TRL's apo_zero_unpaired scores no KL row either
    # the reference point itself, and its clamp (TRL logs a constant 0 without one; we log none)
    if apo:
        assert m["kl"] == 0.0
    else:
        assert float(z0) == pytest.approx(m["kl"], rel=1e-12, abs=1e-15)
        assert (float(z0) == 0.0) == (case == "clamped")
    # the logged metrics, as the trainer makes them from its sums
    st = {"loss": loss, "rewards": rewards, "logps": logps, "desirable": labels, "weight": torch.ones_like(loss)}
    ms = KTOTrainer._metrics(KTOTrainer._sums(st, z0, True), kl=not apo)
    assert ms["loss"] == pytest.approx(float(theirs.detach()), rel=1e-12)
    assert ("kl" in ms) == (not apo) and (apo or ms["kl"] == pytest.approx(m["kl"]))
    for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert (k in ms) == (k in m), k
        if k in m:
            assert ms[k] == pytest.approx(m[k], rel=1e-12), k
    assert ("rewards/margin" in ms) == ("rewards/margins" in m)
    if "rewards/margins" in m:
        assert ms["rewards/margin"] == pytest.approx(m["rewards/margins"], rel=1e-12)
    assert ms["count/chosen"] == int(labels.sum()) and ms["count/rejected"] == int((~labels).sum())


@pytest.mark.parametrize("case", ["mixed", "weights", "apo_weights"])
def test_integer_annotator_weights_are_trls_loss_over_repeated_examples(case):
    """L = Σ w·ℓ / Σ w with integer weights is TRL's loss over the batch in which example i
    appears w_i times (0: left out) and the KL rows stay as they are (z0 is unweighted): the
    value, the gradient and the logged rewards (unweighted: over the distinct examples)."""
    pytest.importorskip("trl")
    _, _, wd, wu, _, loss_type = TRL_CASES[case]
    c = _trl_case(case)
    w = torch.tensor([2, 0, 1, 3, 1, 0, 2], dtype=torch.float64)
    z0 = None if loss_type != "kto" else kto_kl(c.kl_logps, c.ref_kl)
    loss, rewards = kto_loss(c.logps, c.ref, c.labels, z0, beta=c.beta, desirable_weight=wd, undesirable_weight=wu,
                             loss_type=loss_type)
    st = {"loss": loss, "rewards": rewards, "logps": c.logps, "desirable": c.labels, "weight": w}
    ours = (loss * w).sum() / w.sum()  # the trainer's step loss (train_step), one micro-batch, one rank
    g_ours, = torch.autograd.grad(ours, c.P)
    rep_ = torch.repeat_interleave(torch.arange(len(w)), w.long())
    theirs, m = _trl_kto(c.P[rep_], c.cm[rep_], c.P_kl, c.cm_kl, c.labels[rep_], c.ref[rep_], c.ref_kl, beta=c.beta,
                         wd=wd, wu=wu, loss_type=loss_type)
    g_theirs, = torch.autograd.grad(theirs, c.P)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-12)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)
    # the weights matter: no gradient reaches an example of weight 0, some reaches every other one
    assert ((g_ours.abs().sum(1) > 0) == (w > 0)).all()
    ms = KTOTrainer._metrics(KTOTrainer._sums(st, z0, True), kl=z0 is not None)
    assert ms["loss"] == pytest.approx(float(theirs.detach()), rel=1e-12)
    if z0 is not None:
        assert ms["kl"] == pytest.approx(m["kl"], rel=1e-12)  # the same KL rows: the same z0
    # the logged rewards stay unweighted means over the examples (TRL's over the distinct ones)
    _, m1 = _trl_kto(c.P, c.cm, c.P_kl, c.cm_kl, c.labels, c.ref, c.ref_kl, beta=c.beta, wd=wd, wu=wu,
                     loss_type=loss_type)
    for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert ms[k] == pytest.approx(m1[k], rel=1e-12), k


def test_loss_errors_and_kl_partners():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="ref_logps must have the shape"):
        kto_loss(x, x[:2], x.bool(), 0.0, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(x, x, x.bool(), 0.0, beta=0.0)
    with pytest.raises(ValueError, match="kl_logps"):
        kto_kl(x, x[:1])
    with pytest.raises(ValueError, match="loss_type must be one of"):
        kto_loss(x, x, x.bool(), 0.0, beta=0.1, loss_type="apo_zero")
    with pytest.raises(ValueError, match="kl .* is required for loss_type 'kto'"):
        kto_loss(x, x, x.bool(), None, beta=0.1)
    # apo_zero_unpaired ignores the reference point
    a, _ = kto_loss(x + 1, x, torch.tensor([True, False, True]), None, beta=0.5, loss_type="apo_zero_unpaired")
    b, _ = kto_loss(x + 1, x, torch.tensor([True, False, True]), 3.0, beta=0.5, loss_type="apo_zero_unpaired")
    assert torch.equal(a, b)
    # the rotation by one within blocks: (x_1, y_n), (x_2, y_1), ...; a short last block; a block of one
    assert kl_partners([0, 1, 2, 3, 4], 2) == [1, 0, 3, 2, 4]
    assert kl_partners([4, 2, 0, 1, 3], 3) == [2, 3, 4, 1, 0]


# ----------------------------------------------------------------------------- data preparation vs TRL


def _trl_prepared(records, block, max_len, wd=1.0, wu=1.0, tok=None):
    """TRL's ``KTOTrainer._prepare_dataset`` (tokenisation, eos, KL completions in blocks of its
    per-device batch, the weight advice) on a stub; returns the rows and the advice it logged."""
    from accelerate import PartialState
    from datasets import Dataset
    from trl.trainer.kto_trainer import KTOTrainer as TRLKTOTrainer

    PartialState()  # accelerate's logger needs it
    ds = Dataset.from_dict({"prompt": [r.prompt for r in records], "completion": [r.completion for r in records],
                            "label": [r.label for r in records]})
    stub = types.SimpleNamespace(_tokenizer=tok, calculate_KL=True, desirable_weight=wd, undesirable_weight=wu)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=max_len, per_device_train_batch_size=block)
    return list(TRLKTOTrainer._prepare_dataset(stub, ds, tok, args, "train"))


PROMPTS = ["describe: cat", "describe: red dog", "describe: one", "describe: the mat", "describe: big sun"]


def test_kl_rows_are_what_trl_builds(tmp_path, tok):
    pytest.importorskip("trl")
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    words = "the cat dog sat on mat big small red blue runs one two three yes no good".split()
    recs = [BinaryRecord(PROMPTS[i % 5], " " + " ".join(words[(3 * i + k) % len(words)] for k in range(1 + i % 7)),
                         i % 3 != 1) for i in range(10)]
    max_len = 12  # some rows (and KL rows) lose their completion's tail; no prompt (4-6 tokens) is cut
    tr = _trainer(tmp_path, tok, records=recs, batch_size=2, grad_accum=2, max_len=max_len)
    perm = tr.batches._perm
    rows = _trl_prepared([recs[i] for i in perm], 4, max_len, tok=tok)  # TRL reads its data in order
    trunc = lambda ids: ids[:max_len]  # noqa: E731  (TRL's collator cuts each row to max_length, keep-start)
    for k, row in enumerate(rows):
        it = tr.train_items[perm[k]]
        assert it["prompt"] == row["prompt_ids"]
        assert it["prompt"] + it["completion"] == trunc(row["prompt_ids"] + row["completion_ids"])
        assert it["prompt"] + it["kl"] == trunc(row["prompt_ids"] + row["KL_completion_ids"])
    # some KL rows borrow a completion that fit its own, shorter prompt but not theirs
    partner = kl_partners(perm, 4)
    assert any(len(it["prompt"] + tr.train_items[j]["completion"]) > max_len for it, j in zip(tr.train_items, partner))
    # a step's batches, collated: the rows and the KL rows TRL's collator gives for that batch
    collator = DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id, max_length=max_len)
    for s in (0, 4, 8):  # blocks of 4, the last one short
        idx = tr.batches.next()
        assert idx == perm[s: s + 4]
        items = [tr.train_items[i] for i in idx]
        theirs = collator([{k: rows[s + j][k] for k in ("prompt_ids", "completion_ids", "KL_completion_ids", "label")}
                           for j in range(len(idx))])
        for key, ours in (("", tr._batch(items)), ("KL_", tr._batch(items, "kl"))):
            assert torch.equal(ours["input_ids"], theirs[key + "input_ids"])
            assert torch.equal(ours["attention_mask"], theirs[key + "attention_mask"])
            assert torch.equal(ours["response_mask"], theirs[key + "completion_mask"])


@pytest.mark.parametrize("n_d,n_u,wd,wu", [(6, 2, 1.0, 1.0), (6, 2, 0.4, 1.0), (2, 6, 1.0, 1.0), (2, 6, 3.5, 1.0),
                                          (5, 5, 1.0, 3.0), (8, 0, 1.0, 1.0)])
def test_weight_advice_is_trls(tok, caplog, n_d, n_u, wd, wu):
    pytest.importorskip("trl")
    recs = [BinaryRecord(PROMPTS[i % 5], f" good {i}", i < n_d) for i in range(n_d + n_u)]
    with caplog.at_level(logging.WARNING):
        _trl_prepared(recs, 2, None, wd, wu, tok=tok)
    theirs = [r.getMessage() for r in caplog.records if "desirable_weight in" in r.getMessage()]
    ours = weight_advice(n_d, n_u, wd, wu)
    assert (ours is None) == (not theirs), (ours, theirs)
    if ours:  # the same ranges
        import re

        rng = lambda s: re.findall(r"desirable_weight in \[([\d.]+), ([\d.]+)\]", s)  # noqa: E731
        assert rng(ours) == rng(theirs[0]) and len(rng(ours)) == 2


# ----------------------------------------------------------------------------- training


def test_training_raises_the_reward_gap_on_held_out_data(tmp_path, tok):
    train, held_out = synthetic_preference_records(128, seed=1), synthetic_preference_records(32, seed=9)
    # (at seeds 0-3 this run ends with an eval margin of 1.0-1.7, a loss of 0.32-0.40 and a pair
    # accuracy of 0.75-0.97; the bounds below leave room for other CPUs' float kernels)
    tr = _trainer(tmp_path, tok, records=train, eval_records=held_out, max_steps=40, lr=3e-3, beta=0.5)
    before = tr.evaluate()
    assert before["eval_loss"] == pytest.approx(0.5, abs=1e-6) and before["eval_rewards/margin"] == 0.0
    assert before["eval_count/chosen"] == before["eval_count/rejected"] == 32
    for _ in range(40):
        m = tr.train_step()
    after = tr.evaluate()
    assert after["eval_rewards/margin"] > 0.5 and after["eval_loss"] < 0.45, (before, after)
    # per held-out pair: the desirable half now scores higher than the undesirable half
    items = tr.eval_items
    with torch.no_grad():
        lp, _ = response_logps(tr.model, tr._batch(items))
        ref, _ = response_logps(tr.reference, tr._batch(items))
    r = lp - ref
    assert float((r[:32] > r[32:]).float().mean()) > 0.7
    assert set(m) >= {"loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen",
                      "logps/rejected", "count/chosen", "count/rejected", "lr", "grad_norm"}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls transformers' deprecated is_gradient_checkpointing
@pytest.mark.parametrize("lora", [False, True], ids=["copy", "lora"])
def test_the_reference_does_not_move(tmp_path, tok, lora):
    from rlhf_fast.models.loading import AdapterDisabledReference

    if lora:
        pytest.importorskip("peft")
    tr = _trainer(tmp_path, tok, max_steps=3, lr=2e-2, lora={"r": 4} if lora else None)
    batch = tr._batch(tr.train_items[:6])
    if lora:  # the base with adapters disabled: no second model
        assert isinstance(tr.reference, AdapterDisabledReference) and tr.reference.policy is tr.model
        frozen = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_" not in n}
    else:
        assert isinstance(tr.reference, torch.nn.Module) and tr.reference is not tr.model
        assert not any(p.requires_grad for p in tr.reference.parameters())
        frozen = {n: p.detach().clone() for n, p in tr.reference.named_parameters()}
    with torch.no_grad():
        ref0, _ = response_logps(tr.reference, batch)
        pol0, _ = response_logps(tr.model, batch)
    torch.testing.assert_close(ref0, pol0)
    for _ in range(3):
        tr.train_step()
    with torch.no_grad():
        ref1, _ = response_logps(tr.reference, batch)
        pol1, _ = response_logps(tr.model, batch)
    assert torch.equal(ref0, ref1) and not torch.allclose(pol0, pol1, atol=1e-3)
    params = dict(tr.model.named_parameters() if lora else tr.reference.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_precomputed_reference_logps_equal_the_reference_model(tmp_path, tok, loss_type):
    recs = synthetic_preference_records(16, seed=2)
    a = _trainer(tmp_path, tok, "a", records=recs, eval_records=recs[:3], loss_type=loss_type)
    b = _trainer(tmp_path, tok, "b", records=recs, eval_records=recs[:3], precompute_ref_logps=True,
                 loss_type=loss_type)
    assert b.reference is None and all("ref" in it for it in b.train_items + b.eval_items)
    items = a.train_items[:5]
    with torch.no_grad():  # the rows and (kto) the KL rows
        lp, _ = response_logps(a.reference, a._batch(items))
        kl = response_logps(a.reference, a._batch(items, "kl"))[0] if loss_type == "kto" else None
    expected = torch.stack([lp, kl], 1) if loss_type == "kto" else lp[:, None]
    torch.testing.assert_close(torch.tensor([it["ref"] for it in b.train_items[:5]]), expected, rtol=1e-5, atol=1e-5)
    keys = ("loss", "kl", "rewards/margin", "grad_norm") if loss_type == "kto" else ("loss", "rewards/margin",
                                                                                    "grad_norm")
    for _ in range(2):
        ma, mb = a.train_step(), b.train_step()
        for k in keys:
            assert ma[k] == pytest.approx(mb[k], rel=1e-4, abs=1e-6), k
    ea, eb = a.evaluate(), b.evaluate()
    for k in ["eval_" + k for k in keys if k != "grad_norm"]:
        assert ea[k] == pytest.approx(eb[k], rel=1e-4, abs=1e-6), k


def _count_rows(tr):
    """Counts the rows each model embeds (policy / reference forwards): {"policy": n, "reference": n}."""
    rows = {"policy": 0, "reference": 0}
    for name, m in (("policy", tr.model), ("reference", tr.reference)):
        m.get_input_embeddings().register_forward_hook(
            lambda mod, args, out, _n=name: rows.__setitem__(_n, rows[_n] + args[0].shape[0]))
    return rows


def test_apo_zero_unpaired_builds_and_scores_no_kl_rows(tmp_path, tok):
    """The speed point of apo_zero_unpaired: one policy and one reference forward of the step's
    examples and nothing else — no KL rows built, scored or all-reduced (kto: twice the rows)."""
    recs = synthetic_preference_records(8, seed=3)  # 16 examples: steps of 8 in two micro-batches
    seen = {}
    for loss_type in ("kto", "apo_zero_unpaired"):
        tr = _trainer(tmp_path, tok, loss_type, records=recs, eval_records=recs[:3], batch_size=4, grad_accum=2,
                      loss_type=loss_type)
        rows = _count_rows(tr)
        reduces = []
        reduce = tr.ctx.all_reduce_sum
        tr.ctx.all_reduce_sum = lambda t, _r=reduces, _f=reduce: (_r.append(t.numel()), _f(t))[1]
        m = tr.train_step()
        seen[loss_type] = (dict(rows), list(reduces), m, [it.keys() for it in tr.train_items])
        rows.update(policy=0, reference=0)
        e = tr.evaluate()  # 6 eval examples
        seen[loss_type] += (dict(rows), e)
    rows, reduces, m, keys, eval_rows, e = seen["apo_zero_unpaired"]
    assert rows == {"policy": 8, "reference": 8} and eval_rows == {"policy": 6, "reference": 6}
    assert reduces == [N_SUMS]  # the metrics' sums only: no z0
    assert all("kl" not in k and "full" not in k for k in keys)
    assert "kl" not in m and "eval_kl" not in e and m["loss"] > 0 and "eval_rewards/margin" in e
    rows, reduces, m, keys, eval_rows, e = seen["kto"]
    assert rows == {"policy": 16, "reference": 16} and eval_rows == {"policy": 12, "reference": 12}
    assert reduces == [2, N_SUMS] and all("kl" in k for k in keys) and "kl" in m and "eval_kl" in e
    # a step of one example has nothing to pair it with for kto, and needs nothing for apo_zero_unpaired
    tr = _trainer(tmp_path, tok, "one", records=recs[:2], batch_size=1, loss_type="apo_zero_unpaired")
    assert tr.train_step()["count/chosen"] + tr.train_step()["count/rejected"] == 1


def _annotated(records, names):
    """Binary records, the i-th labelled by ``names[i % len(names)]``."""
    return [dataclasses.replace(r, annotator=names[i % len(names)]) for i, r in enumerate(to_binary(records))]


def _grads_at_step(tr):
    """Registers a hook that keeps the gradient the optimizer steps with; returns its holder."""
    held = {}
    tr.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: held.__setitem__("g", [p.grad.clone() for p in tr.model.parameters()]))
    return held


def test_annotator_weights_of_one_are_the_unweighted_loss_bit_for_bit(tmp_path, tok):
    """Every w_i = 1 (listed, unlisted, or auto weights without a shared item) gives the mean of
    the ℓ_i over the step, Σ ℓ / n, as before annotator weights existed: the same gradient bit
    for bit, the same loss."""
    import copy

    recs = _annotated(synthetic_preference_records(10, seed=4), ["a", "b", "c"])  # 20 examples
    for kw in (dict(annotator_weights={"a": 1.0, "b": 1}), dict(auto_annotator_weights=True)):
        tr = _trainer(tmp_path, tok, str(len(kw)) + next(iter(kw)), records=recs, batch_size=4, grad_accum=2, **kw)
        assert {it["weight"] for it in tr.train_items} == {1.0}
        for _ in range(2):  # the second step: z0 > 0 (the policy moved)
            idx = copy.deepcopy(tr.batches).next()
            micro = tr._micro(idx, tr.train_items)
            z0, refs = tr._reference_point(micro)
            tr.model.zero_grad()
            total = 0.0
            for (items, _), ref in zip(micro, refs):  # the unweighted objective, as the trainer had it
                st = tr._example_stats(items, ref, z0)
                (st["loss"].sum() * 1.0 / len(idx)).backward()
                total += float(st["loss"].detach().double().sum())
            expected = [p.grad.clone() for p in tr.model.parameters()]
            tr.model.zero_grad()
            held = _grads_at_step(tr)
            m = tr.train_step()
            assert all(torch.equal(g, e) for g, e in zip(held["g"], expected))
            assert m["loss"] == total / len(idx)
        assert m["kl"] > 0


def test_annotator_weight_zero_is_dropping_its_records(tmp_path, tok):
    """apo_zero_unpaired (no z0): weight 0 on an annotator gives the loss and the gradient of a
    run without its records; kto: the same losses, but z0 still counts its (label-free) KL rows."""
    good = _annotated(synthetic_preference_records(6, seed=5), ["good"])  # 12 examples
    bad = [dataclasses.replace(r, label=not r.label) for r in _annotated(synthetic_preference_records(4, seed=6),
                                                                         ["bad"])]
    both = good + bad  # 20 examples; one step each (the whole data), in two micro-batches
    w = dict(annotator_weights={"bad": 0.0, "good": 1.0})
    kw = dict(loss_type="apo_zero_unpaired", grad_clip=0.0)
    x = _trainer(tmp_path, tok, "x", records=both, batch_size=10, grad_accum=2, **w, **kw)
    y = _trainer(tmp_path, tok, "y", records=good, batch_size=6, grad_accum=2, **kw)
    gx, gy = _grads_at_step(x), _grads_at_step(y)
    mx, my = x.train_step(), y.train_step()
    assert mx["count/rejected"] + mx["count/chosen"] == 20 and my["count/rejected"] + my["count/chosen"] == 12
    assert mx["loss"] == pytest.approx(my["loss"], rel=1e-6)
    for a, b in zip(gx["g"], gy["g"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert any(a.abs().max() > 1e-3 for a in gx["g"])
    # kto: z0 is that of the unweighted run (every KL row), the loss the weighted mean of the good examples'
    kw = dict(loss_type="kto", grad_clip=0.0)
    x = _trainer(tmp_path, tok, "xk", records=both, batch_size=10, grad_accum=2, **w, **kw)
    u = _trainer(tmp_path, tok, "uk", records=both, batch_size=10, grad_accum=2, **kw)
    x.train_step(), u.train_step()
    u.model.load_state_dict(x.model.state_dict())  # the same policy: z0 > 0 now, the same step batch next
    mx, mu = x.train_step(), u.train_step()
    assert mx["kl"] == pytest.approx(mu["kl"], rel=1e-6) and mx["kl"] > 0.01
    assert mx["loss"] != pytest.approx(mu["loss"], rel=1e-3)


def test_auto_annotator_weights_from_binary_agreement(tmp_path, tok):
    """Several annotators label the same (prompt, response) items: w, x, y agree, z says the
    opposite every time, "solo" shares no item. Agreement with the others: x, y 2/3 (weight
    2p − 1 = 1/3), z 0 (the floor, 0.05); solo unmeasured (1); w listed explicitly (wins)."""
    from rlhf_fast.feedback.agreement import agreement_stats, annotator_weights

    items = [(PROMPTS[i % 5], f" good {i}", i % 3 != 0) for i in range(8)]
    recs = [BinaryRecord(p, c, lab if a != "z" else not lab, a) for a in "wxyz" for p, c, lab in items]
    recs += [BinaryRecord(PROMPTS[0], f" other {i}", i % 2 == 0, "solo") for i in range(4)]
    tr = _trainer(tmp_path, tok, records=recs, auto_annotator_weights=True, annotator_weights={"w": 2.0})
    assert tr.weights == pytest.approx({"w": 2.0, "x": 1 / 3, "y": 1 / 3, "z": 0.05, "solo": 1.0})
    weights = collections.Counter(round(it["weight"], 9) for it in tr.train_items)  # each example its annotator's
    assert weights == {2.0: 8, round(1 / 3, 9): 16, 0.05: 8, 1.0: 4}
    # scores: the binary label through score_threshold; pairs: agreement on the pairs, before unpairing (as DPO)
    third = {"w": 1 / 3, "x": 1 / 3, "y": 1 / 3, "z": 0.05}
    scores = [ScoreRecord(p, c, 1.0 if (lab if a != "z" else not lab) else -1.0, a) for a in "wxyz"
              for p, c, lab in items]
    assert annotator_weights(agreement_stats(agreement_records(scores, 0.0))) == pytest.approx(third)
    pairs = [PairRecord(p, c, " no", annotator=a) if (lab if a != "z" else not lab) else
             PairRecord(p, " no", c, annotator=a) for a in "wxyz" for p, c, lab in items]
    tr = _trainer(tmp_path, tok, "pairs", records=pairs, auto_annotator_weights=True)
    assert tr.weights == annotator_weights(agreement_stats(pairs)) == pytest.approx(third)
    assert collections.Counter(round(it["weight"], 9) for it in tr.train_items) == {round(1 / 3, 9): 48, 0.05: 16}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_micro_batch_split_does_not_change_the_step(tmp_path, tok, loss_type):
    import copy

    # 12 desirable, 8 undesirable, three annotators: weights 0, 2.5 and (unlisted) 1
    recs = _annotated(synthetic_preference_records(12, seed=1), ["a", "b", "c"])[:20]
    kw = dict(records=recs, desirable_weight=0.8, undesirable_weight=1.3, beta=0.5, grad_clip=0.0, lr=2e-2,
              annotator_weights={"a": 0.0, "b": 2.5}, loss_type=loss_type)
    kto = loss_type == "kto"
    one = _trainer(tmp_path, tok, "one", batch_size=8, grad_accum=1, **kw)
    two = _trainer(tmp_path, tok, "two", batch_size=4, grad_accum=2, **kw)
    for _ in range(3):  # steps of 8, 8 and 4 examples (the epoch's end: one micro-batch), then z0 > 0
        m1, m2 = one.train_step(), two.train_step()
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
        assert not kto or m1["kl"] == pytest.approx(m2["kl"], abs=1e-5)
    # the next step's objective written out: its 8 examples, the KL rows rotating their
    # completions by one, z0 clamped (kto), Σ w·ℓ / Σ w of the per-example losses
    idx = copy.deepcopy(one.batches).next()
    items = [one.train_items[i] for i in idx]
    z0 = None
    if kto:
        borrowed = [items[k - 1]["completion"] for k in range(len(items))]
        assert all(len(it["prompt"] + c) <= 48 for it, c in zip(items, borrowed))  # nothing to cut at max_len
        kl_rows = [{"input_ids": it["prompt"] + c, "response_mask": [0] * len(it["prompt"]) + [1] * len(c)}
                   for it, c in zip(items, borrowed)]
        with torch.no_grad():
            kl, _ = response_logps(one.model, collate(kl_rows, one.pad_id))
            ref_kl, _ = response_logps(one.reference, collate(kl_rows, one.pad_id))
        z0 = kto_kl(kl, ref_kl)
        assert float(z0) > 0.5
    with torch.no_grad():
        ref, _ = response_logps(one.reference, one._batch(items))
    logps, _ = response_logps(one.model, one._batch(items))
    desirable = torch.tensor([it["label"] for it in items])
    per, _ = kto_loss(logps, ref, desirable, z0, beta=0.5, desirable_weight=0.8, undesirable_weight=1.3,
                      loss_type=loss_type)
    w = torch.tensor([it["weight"] for it in items])
    objective = (per * w).sum() / w.sum()
    expected = torch.autograd.grad(objective, list(one.model.parameters()))
    assert len(items) == 8 and 0 < int(desirable.sum()) < 8 and {0.0, 2.5, 1.0} <= set(w.tolist())
    grads = {}
    for name, tr in (("one", one), ("two", two)):  # the accumulated gradient the optimizer steps with
        tr.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, _tr=tr, _name=name: grads.__setitem__(
                _name, [p.grad.clone() for p in _tr.model.parameters()]))
    m1, m2 = one.train_step(), two.train_step()
    # (rel 1e-4: after three AdamW steps the two runs' weights differ in the last bits — the
    # micro-batches sum the gradient in another order — and a reward is a difference of log-probs)
    for k in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "count/chosen", "grad_norm"):
        assert (k in m1) == (k in m2) == (kto or k != "kl"), k
        assert k not in m1 or m1[k] == pytest.approx(m2[k], rel=1e-4), k
    assert m1["loss"] == pytest.approx(float(objective.detach()), rel=1e-5)
    assert not kto or m1["kl"] == pytest.approx(float(z0), rel=1e-5)
    for g0, g1, g2 in zip(expected, grads["one"], grads["two"]):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(g2, g0, rtol=1e-4, atol=1e-6)  # (weights equal to the last bits only)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("extra", [dict(precompute_ref_logps=True, grad_accum=2), dict(lora={"r": 4}),
                                   dict(loss_type="apo_zero_unpaired", annotator_weights={"a": 0.5}),
                                   dict(sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.4)],
                         ids=["precomputed", "lora", "apo", "tr_dpo_moving_reference"])
def test_resume_is_exact(tmp_path, tok, extra):
    if "lora" in extra:
        pytest.importorskip("peft")
    recs = _annotated(synthetic_preference_records(9, seed=6), ["a", "b"])  # 18: epochs end inside the run
    evals = recs[:2] + recs[-2:]  # desirable and undesirable

    def run(name, stop):
        cfg = _cfg(tmp_path, name, max_steps=6, save_every=3, batch_size=4, **extra)
        t = KTOTrainer(cfg, train_records=recs, eval_records=evals, tokenizer=tok)
        if stop < 6:  # interrupted after step `stop` (its checkpoint written), then a new process
            while t.step < stop:
                t.train_step()
            t._save()
            t = KTOTrainer(cfg, train_records=recs, eval_records=evals, tokenizer=tok)
        t.train()
        ref = t.reference if isinstance(t.reference, torch.nn.Module) and t.reference is not t.model else None
        # the whole state: the policy, and the reference (TR-DPO moves it: synced at steps 2, 4, 6)
        params = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        params.update({"ref." + n: p.detach().clone() for n, p in (ref.named_parameters() if ref else [])})
        return params, untimed_metrics(cfg.output_dir)

    full, log_full = run("full", 6)
    resumed, log_res = run("resumed", 3)
    assert [m["step"] for m in log_res] == [4, 5, 6]  # it went on from step 3 (not from the start)
    assert full.keys() == resumed.keys() and all(torch.equal(full[n], resumed[n]) for n in full)
    late = lambda log: [m for m in log if m["step"] > 3]  # noqa: E731
    assert late(log_full) == late(log_res) and late(log_full)[-1]["step"] == 6
    assert "eval_rewards/margin" in log_full[-1] and log_full[-1]["epoch"] >= 1


# ----------------------------------------------------------------------------- data and config


def test_binary_records_are_validated_with_line_and_field(tmp_path):
    path = tmp_path / "fb.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "describe: cat", "completion": "good dog", "label": True}),
        json.dumps({"prompt": "describe: cat", "completion": "no", "label": "yes"}),
        json.dumps({"prompt": "describe: dog", "label": False}),
        "{not json",
        json.dumps({"prompt": "", "completion": "x", "label": 1}),
        json.dumps({"prompt": "describe: cat", "completion": "good dog", "label": True}),
    ]) + "\n")
    with pytest.raises(ValueError) as e:
        load_binary_records(str(path))
    text = str(e.value)
    first = text.splitlines()[0]
    assert "6 problem(s) in binary records" in first and "line 2: label: expected true or false, got 'yes'" in first
    for needle in (":3: completion: missing field", ":4: <line>: invalid JSON", ":5: prompt: empty text",
                   ":5: label: expected true or false, got 1", ":6: <record>: duplicate record (same as line 1)"):
        assert needle in text, needle
    path.write_text(path.read_text().splitlines()[0] + "\n" + path.read_text().splitlines()[5] + "\n")
    assert load_binary_records(str(path), dedup=True) == [BinaryRecord("describe: cat", "good dog", True)]
    # dedup: false keeps the repeat (each one trains), as load_records does for the other kinds
    assert load_binary_records(str(path), dedup=False) == [BinaryRecord("describe: cat", "good dog", True)] * 2


def test_data_kinds(tmp_path, tok):
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"prompt": f"describe: {w}", "response": f"good {w}", "score": s}) + "\n"
                              for w, s in (("cat", 0.9), ("dog", 0.5), ("sun", 0.2), ("mat", -1.0))))
    tr = KTOTrainer(_cfg(tmp_path, "sc", data=str(scores), data_kind="scores", score_threshold=0.5, eval_fraction=0.0),
                    tokenizer=tok, model=_tiny_model(tok))
    assert sorted(it["label"] for it in tr.train_items) == [False, False, True, True]  # >= 0.5 is desirable
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"describe: {w}", "chosen": f"good {w}", "rejected": "no"}) + "\n"
                             for w in ("cat", "dog", "sun")))
    tr = KTOTrainer(_cfg(tmp_path, "pr", data=str(pairs), data_kind="pairs", eval_fraction=0.0, batch_size=2),
                    tokenizer=tok, model=_tiny_model(tok))
    assert [it["label"] for it in tr.train_items] == [True] * 3 + [False] * 3  # TRL's unpairing order
    good_cat = tok("good cat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tr.train_items[0]["completion"] == good_cat
    assert to_binary([ScoreRecord("p", "r", 1.0, "ann")], 2.0) == [BinaryRecord("p", "r", False, "ann")]
    assert to_binary([PairRecord("p", "a", "b")]) == [BinaryRecord("p", "a", True), BinaryRecord("p", "b", False)]
    # the synthetic default: pairs held out before unpairing, so a pair's halves stay on one side
    tr = KTOTrainer(_cfg(tmp_path, "syn"), tokenizer=tok, model=_tiny_model(tok))
    _, held_out = split_records(synthetic_preference_records(seed=0), 0.1, 0)
    view = lambda items: [(it["prompt"], it["completion"], it["label"]) for it in items]  # noqa: E731
    assert view(tr.eval_items) == view(tr._encode(to_binary(held_out))[0])
    assert len(tr.train_items) == 2 * 461 and len(tr.eval_items) == 2 * 51
    with pytest.raises(ValueError, match="data must be set for data_kind='scores'"):
        KTOTrainer(_cfg(tmp_path, "none", data_kind="scores"), tokenizer=tok, model=_tiny_model(tok))


def test_weight_advice_is_printed_once(tmp_path, tok, capsys):
    recs = [BinaryRecord(PROMPTS[i % 5], f"good {i}", i < 9) for i in range(12)]  # 9 desirable, 3 undesirable
    tr = _trainer(tmp_path, tok, records=recs)
    err = capsys.readouterr().err
    assert tr.weight_advice and err.count("rlhf-fast kto: 9 desirable and 3 undesirable") == 1
    assert "undesirable_weight in [2.26, 3.0]" in err
    _trainer(tmp_path, tok, "ok", records=recs, undesirable_weight=2.5)
    assert capsys.readouterr().err == ""


def test_config_errors_name_the_field(tmp_path):
    for kw, needle in ((dict(beta=0.0), "beta must be a finite number > 0"), (dict(beta=float("nan")), "beta"),
                       (dict(desirable_weight=-1.0), "desirable_weight must be a finite number >= 0"),
                       (dict(undesirable_weight=float("inf")), "undesirable_weight"),
                       (dict(desirable_weight=0.0, undesirable_weight=0.0), "both 0"),
                       (dict(data_kind="labels"), "data_kind must be one of"),
                       (dict(score_threshold=float("nan")), "score_threshold"),
                       (dict(batch_size=1, grad_accum=1), "batch_size × grad_accum must be >= 2"),
                       (dict(max_len=1), "max_len must be >= 2"), (dict(lora="yes"), "lora"),
                       (dict(precompute_ref_logps="yes"), "precompute_ref_logps"), (dict(batch_size=0), "batch_size"),
                       (dict(loss_type="apo_zero"), "loss_type must be one of .'kto', 'apo_zero_unpaired'., got 'apo_zero'"),
                       (dict(annotator_weights={"ann": -0.5}), r"annotator_weights\['ann'\] must be a finite number >= 0"),
                       (dict(annotator_weights={"ann": float("nan")}), r"annotator_weights\['ann'\]"),
                       (dict(annotator_weights={"ann": "1"}), r"annotator_weights\['ann'\]"),
                       (dict(annotator_weights=[("ann", 1.0)]), "annotator_weights must be a mapping"),
                       (dict(annotator_weights={1: 1.0}), "annotator_weights keys must be annotator names"),
                       (dict(auto_annotator_weights="yes"), "auto_annotator_weights must be true or false")):
        with pytest.raises(ValueError, match=needle):
            _cfg(tmp_path, **kw)
    _cfg(tmp_path, batch_size=1, grad_accum=2)  # two examples per step: enough for the KL rows
    _cfg(tmp_path, batch_size=1, loss_type="apo_zero_unpaired")  # no KL rows: one example per step is fine


def test_cli(tmp_path, capsys):
    example = str(ROOT / "examples" / "kto.yaml")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "kto", example, "--max_steps", "2",
                           "--output_dir", str(out), "--device", "cpu"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "kto: 2 steps" in proc.stdout and "eval_rewards/margin" in proc.stdout and "kl=" in proc.stdout
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out / "final"))
    assert [m["step"] for m in read_metrics(str(out))] == [0, 2]  # the start's evaluation, the last step
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completion": "c", "label": "no"}) + "\n")
    for argv, needle in ((["--betaa", "1"], "unknown config key 'betaa'"),
                         (["--beta", "0"], "beta must be a finite number > 0"),
                         (["--data_kind", "labels"], "data_kind must be one of"),
                         (["--loss_type", "sigmoid"], "loss_type must be one of"),
                         (["--desirable_weight", "0", "--undesirable_weight", "0"], "both 0"),
                         (["--data", str(bad), "--output_dir", str(tmp_path / "b")],
                          "line 1: label: expected true or false, got 'no'"),
                         (["--output_dir", str(out), "--resume", "false"], "already holds a run")):
        assert cli.main(["kto", example] + argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        cli.main(["kto", "--help"])
    assert "desirable_weight" in capsys.readouterr().out
