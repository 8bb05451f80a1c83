"""DPO trainer: every loss type against TRL's own loss code (values, gradients, logged rewards),
the response log-probs against full logits (padding, a chat prompt), learning on synthetic
pairs, a reference that does not move (a frozen copy; with LoRA the adapter-disabled base, no
copy), exact resume (precomputed reference log-probs; LoRA), micro-batch split invariance,
config errors and the CLI."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from rlhf_fast import cli
from rlhf_fast.feedback.formats import PairRecord
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer, dpo_loss, encode_pair, response_logps
from rlhf_fast.trainers.reward import synthetic_preference_records
from tests.test_preference_losses import trl_dpo_loss as _trl_loss
from tests.test_reward import preference_tokenizer
from tests.test_trainer_common import untimed_metrics

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
    return DPOConfig(**base)


def _trainer(tmp_path, tok, name="run", records=None, eval_records=(), **kw):
    records = synthetic_preference_records(64, seed=1) if records is None else records
    return DPOTrainer(_cfg(tmp_path, name, **kw), train_records=records, eval_records=list(eval_records), tokenizer=tok)


# ----------------------------------------------------------------------------- the loss vs TRL


# (our loss_type, label_smoothing, rpo_alpha, TRL's loss_type list and weights)
TRL_CASES = [
    ("sigmoid", 0.0, 0.0, ["sigmoid"], [1.0]),
    ("robust", 0.2, 0.0, ["robust"], [1.0]),
    ("ipo", 0.0, 0.0, ["ipo"], [1.0]),
    ("hinge", 0.0, 0.0, ["hinge"], [1.0]),
    ("sigmoid", 0.0, 0.7, ["sigmoid", "sft"], [1.0, 0.7]),  # RPO: TRL's sft loss, weighted
    ("sigmoid", 0.2, 0.0, None, None),  # cDPO: (1-ε)·TRL sigmoid + ε·TRL sigmoid of the swapped pair
]


@pytest.mark.parametrize("loss_type,eps,rpo,trl_types,trl_weights", TRL_CASES,
                         ids=["sigmoid", "robust", "ipo", "hinge", "rpo", "cdpo"])
def test_losses_equal_trls(loss_type, eps, rpo, trl_types, trl_weights):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(3)
    B, T, beta = 6, 9, 0.3
    cm = (torch.rand(2 * B, T, generator=g) > 0.35).long()  # completion tokens in holes, lengths differ
    cm[:, 0] = 0  # position 0 is never predicted
    cm[:, 1] = 1
    P = (-3.0 * torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64)).requires_grad_()
    ref_c = (P[:B].detach() * cm[:B, 1:]).sum(1) + torch.randn(B, generator=g, dtype=torch.float64) * 2
    ref_r = (P[B:].detach() * cm[B:, 1:]).sum(1) + torch.randn(B, generator=g, dtype=torch.float64) * 2

    # ours: the response log-probs, per-pair losses and the step's aggregation
    logps = (P * cm[:, 1:]).sum(1)
    tokens = cm[:, 1:].sum(1)
    loss, rc, rr = dpo_loss(logps[:B], logps[B:], ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=eps,
                            chosen_tokens=tokens[:B], rejected_tokens=tokens[B:])
    ours = loss.mean() + rpo * (-logps[:B].sum() / tokens[:B].sum())
    g_ours, = torch.autograd.grad(ours, P)

    if trl_types is None:  # cDPO, the sigmoid loss of TRL < 1.0 (and OpenRLHF's DPOLoss)
        swap = torch.cat([cm[B:], cm[:B]])
        P_swap = torch.cat([P[B:], P[:B]])
        a, m = _trl_loss(P, cm, ref_c, ref_r, beta=beta, loss_types=["sigmoid"], loss_weights=[1.0])
        b, _ = _trl_loss(P_swap, swap, ref_r, ref_c, beta=beta, loss_types=["sigmoid"], loss_weights=[1.0])
        theirs = (1 - eps) * a + eps * b
    else:
        theirs, m = _trl_loss(P, cm, ref_c, ref_r, beta=beta, loss_types=trl_types, loss_weights=trl_weights,
                              label_smoothing=eps)
    g_theirs, = torch.autograd.grad(theirs, P)
    assert 0.05 < float(theirs.detach()) and float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-12)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)
    assert g_ours.abs().sum() > 0
    # the logged rewards (β·log-ratio), accuracy, margin and summed log-probs are TRL's too
    assert float(rc.mean()) == pytest.approx(m["rewards/chosen"], rel=1e-12)
    assert float(rr.mean()) == pytest.approx(m["rewards/rejected"], rel=1e-12)
    assert float((rc > rr).double().mean()) == pytest.approx(m["rewards/accuracies"], rel=1e-6)  # TRL's is fp32
    assert float((rc - rr).mean()) == pytest.approx(m["rewards/margins"], rel=1e-12)
    assert float(logps[:B].detach().mean()) == pytest.approx(m["logps/chosen"], rel=1e-12)
    assert float(logps[B:].detach().mean()) == pytest.approx(m["logps/rejected"], rel=1e-12)


def test_margin_and_loss_errors():
    g = torch.Generator().manual_seed(0)
    c, r, rc, rr = (torch.randn(5, generator=g) for _ in range(4))
    m = torch.rand(5, generator=g)
    for kind in ("sigmoid", "robust", "hinge"):  # βz − m: the same as a rejected log-prob higher by m/β
        with_m, *_ = dpo_loss(c, r, rc, rr, beta=0.5, loss_type=kind, label_smoothing=0.1 * (kind != "hinge"), margin=m)
        shifted, *_ = dpo_loss(c, r + m / 0.5, rc, rr, beta=0.5, loss_type=kind, label_smoothing=0.1 * (kind != "hinge"))
        torch.testing.assert_close(with_m, shifted)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(c, r, rc, rr, beta=0.5, loss_type="ipo")
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(c, r, rc, rr[:3], beta=0.5)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(c, r, rc, rr, beta=0.5, loss_type="kto")


# ----------------------------------------------------------------------------- log-probs and data


def test_response_logps_equal_full_logits_with_padding_and_chat(tmp_path, tok):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "describe: the cat"}]
    recs = [PairRecord("describe: red", "good big dog sat", "the mat"),
            PairRecord(chat, "good", "one two three yes no big small red blue"),
            PairRecord("describe: the dog on the mat", "sat good one two three", "no")]
    tr = _trainer(tmp_path, tok, records=recs, max_len=128)
    batch = tr._batch(tr.train_items)
    assert batch["attention_mask"].min() == 0  # rows of different lengths: right padding
    logps, count = response_logps(tr.model, batch)
    with torch.no_grad():
        logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]  # [2B, T-1]
    mask = (batch["response_mask"] * batch["attention_mask"])[:, 1:].bool()
    torch.testing.assert_close(logps.double(), (lp * mask).sum(-1), rtol=1e-5, atol=1e-5)
    assert count.tolist() == mask.sum(-1).tolist()
    # the rows: prompt as generation renders it (the chat through the template), response, eos;
    # the response mask covers exactly the response and eos
    it = tr.train_items[1]
    assert it["prompt"] == tok(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"]
    assert it["chosen"] == tok("good", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    B = len(recs)
    row = batch["input_ids"][B + 1][batch["response_mask"][B + 1].bool()].tolist()  # rejected rows follow chosen
    assert row == it["rejected"]
    # the reference starts as the policy
    st = tr._pair_stats(tr.train_items, batch)
    torch.testing.assert_close(st["chosen_rewards"], torch.zeros(B), atol=1e-6, rtol=0)


def test_truncation_keeps_the_prompts_end_and_the_responses_start(tok):
    prompt = "describe: " + " ".join(["the cat sat on the mat"] * 10)
    p_full = tok(prompt)["input_ids"]
    p, c, r = encode_pair(tok, prompt, "good dog " * 20, "no", 24)
    assert len(p) + len(c) <= 24 and len(p) + len(r) <= 24
    assert p == p_full[-len(p):] and len(p) == 12  # cut to half of max_len from its start
    assert c == tok("good dog " * 20, add_special_tokens=False)["input_ids"][:12]  # tail (and eos) dropped
    assert r == tok("no", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    p2, c2, _ = encode_pair(tok, "describe: red", "good", "no", 24)  # fits: untouched
    assert p2 == tok("describe: red")["input_ids"] and c2[-1] == tok.eos_token_id


# ----------------------------------------------------------------------------- training


def test_training_raises_reward_accuracy(tmp_path, tok):
    recs = synthetic_preference_records(128, seed=1)
    tr = _trainer(tmp_path, tok, records=recs, max_steps=16, lr=5e-3, beta=0.2, warmup_steps=2)
    before = tr.evaluate(tr.train_items)
    assert before["eval_loss"] == pytest.approx(0.693147, abs=1e-5) and before["eval_rewards/accuracy"] == 0.0
    for _ in range(16):
        m = tr.train_step()
    after = tr.evaluate(tr.train_items)
    assert after["eval_loss"] < 0.6 and after["eval_rewards/accuracy"] > 0.8, (before, after)
    assert after["eval_rewards/margin"] > 0 and set(m) >= {
        "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
        "logps/rejected", "lr", "grad_norm"}


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
        assert {n for n, p in tr.model.named_parameters() if p.requires_grad} == \
            {n for n, _ in tr.model.named_parameters() if "lora_" in n}
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


def test_precomputed_reference_logps_equal_the_reference_model(tmp_path, tok):
    recs = synthetic_preference_records(32, seed=2)
    a = _trainer(tmp_path, tok, "a", records=recs, rpo_alpha=0.5)
    b = _trainer(tmp_path, tok, "b", records=recs, rpo_alpha=0.5, precompute_ref_logps=True)
    assert b.reference is None and all("ref" in it for it in b.train_items)
    with torch.no_grad():
        lp, _ = response_logps(a.reference, a._batch(a.train_items[:5]))
    torch.testing.assert_close(torch.tensor([it["ref"] for it in b.train_items[:5]]).t().reshape(-1), lp,
                               rtol=1e-5, atol=1e-5)
    for _ in range(2):
        ma, mb = a.train_step(), b.train_step()
        for k in ("loss", "nll", "rewards/margin", "grad_norm"):
            assert ma[k] == pytest.approx(mb[k], rel=1e-4, abs=1e-6), k


def test_micro_batch_split_does_not_change_the_step(tmp_path, tok):
    recs = synthetic_preference_records(16, seed=4)
    for i, r in enumerate(recs):
        r.annotator = "careful" if i % 3 else "noisy"
    kw = dict(records=recs, rpo_alpha=0.3, annotator_weights={"careful": 1.0, "noisy": 0.2}, loss_type="robust",
              label_smoothing=0.1, grad_clip=0.0)
    one = _trainer(tmp_path, tok, "one", batch_size=8, grad_accum=1, **kw)
    two = _trainer(tmp_path, tok, "two", batch_size=4, grad_accum=2, **kw)
    assert sorted({it["weight"] for it in one.train_items}) == [0.2, 1.0]
    # the step's objective written out: Σ w·loss / Σ w over the pairs + α · token-mean NLL of the chosen
    items = [one.train_items[i] for i in one.batches._perm[:8]]
    logps, count = response_logps(one.model, one._batch(items))
    with torch.no_grad():
        ref, _ = response_logps(one.reference, one._batch(items))
    per, _, _ = dpo_loss(logps[:8], logps[8:], ref[:8], ref[8:], beta=0.1, loss_type="robust", label_smoothing=0.1)
    w = torch.tensor([it["weight"] for it in items])
    objective = (per * w).sum() / w.sum() + 0.3 * -logps[:8].sum() / count[:8].sum()
    expected = torch.autograd.grad(objective, list(one.model.parameters()))
    grads = {}
    for name, tr in (("one", one), ("two", two)):  # the accumulated gradient the optimizer steps with
        tr.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, _tr=tr, _name=name: grads.__setitem__(
                _name, [p.grad.clone() for p in _tr.model.parameters()]))
    m1, m2 = one.train_step(), two.train_step()
    for k in ("loss", "nll", "rewards/accuracy", "logps/chosen", "grad_norm"):
        assert m1[k] == pytest.approx(m2[k], rel=1e-5), k
    assert m1["loss"] == pytest.approx(float(objective.detach()), rel=1e-5)
    for g0, g1, g2 in zip(expected, grads["one"], grads["two"]):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(g2, g0, rtol=1e-4, atol=1e-7)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("extra", [dict(precompute_ref_logps=True, grad_accum=2), dict(lora={"r": 4}),
                                   dict(loss_type="orpo", beta=0.5, grad_accum=2),
                                   dict(sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.4)],
                         ids=["precomputed", "lora", "orpo_reference_free", "tr_dpo_moving_reference"])
def test_resume_is_exact(tmp_path, tok, extra):
    if "lora" in extra:
        pytest.importorskip("peft")
    recs = synthetic_preference_records(40, seed=6)

    def run(name, stop):
        cfg = _cfg(tmp_path, name, max_steps=6, save_every=3, batch_size=4, **extra)
        t = DPOTrainer(cfg, train_records=recs, eval_records=recs[:4], tokenizer=tok)
        if stop < 6:  # interrupted after step `stop` (its checkpoint written), then a new process
            while t.step < stop:
                t.train_step()
            t._save()
            t = DPOTrainer(cfg, train_records=recs, eval_records=recs[:4], tokenizer=tok)
        t.train()
        ref = t.reference if isinstance(t.reference, torch.nn.Module) and t.reference is not t.model else None
        # the whole state: the policy, and the reference (TR-DPO moves it: synced at steps 2, 4, 6)
        params = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        params.update({"ref." + n: p.detach().clone() for n, p in (ref.named_parameters() if ref else [])})
        return params, untimed_metrics(cfg.output_dir)

    full, log_full = run("full", 6)
    resumed, log_res = run("resumed", 3)
    assert full.keys() == resumed.keys() and all(torch.equal(full[n], resumed[n]) for n in full)
    late = lambda log: [m for m in log if m["step"] > 3]  # noqa: E731
    assert late(log_full) == late(log_res) and late(log_full)[-1]["step"] == 6
    assert "eval_rewards/accuracy" in log_full[-1]


# ----------------------------------------------------------------------------- the loss family in the trainer


def _step_grads(tr):
    """Runs one train_step of ``tr``; returns (its metrics, the accumulated gradient the
    optimizer steps with)."""
    got = {}
    handle = tr.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: got.__setitem__("g", [p.grad.clone() for p in tr.model.parameters()]))
    m = tr.train_step()
    handle.remove()
    return m, got["g"]


def _full_token_logps(model, batch):
    """``[2B, T-1]`` log π(token t+1 | tokens ≤ t) from the model's full logits (the plain path)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]


def _ld_sums(full, batch, ld_alpha):
    """The summed response log-probs ``[2B]`` of per-token ``full`` ``[2B, T-1]``, LD-weighted
    as TRL's _compute_loss does it (positions past the shorter response's length × ld_alpha)."""
    mask = (batch["response_mask"] * batch["attention_mask"])[:, 1:]
    if ld_alpha is None:
        return (full * mask).sum(1)
    n = mask.sum(1)
    shared = torch.minimum(*n.chunk(2)).repeat(2)[:, None]
    pos = mask.cumsum(1)
    return (full * mask * (pos <= shared)).sum(1) + ld_alpha * (full * mask * (pos > shared)).sum(1)


TRAINER_TRL_CASES = [
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO
    dict(loss_type="ipo", f_divergence_type="js_divergence", ld_alpha=0.5),
    dict(loss_type=["apo_zero", "exo_pair"], label_smoothing=0.01, ld_alpha=0.2, precompute_ref_logps=True),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.6], ld_alpha=0.3),  # the NLL is not LD-weighted
]


@pytest.mark.parametrize("kw", TRAINER_TRL_CASES, ids=["mpo", "ipo_js_ld", "apo_exo_ld_precomputed", "rpo_ld"])
def test_trainer_step_equals_trls(tmp_path, tok, kw):
    """The whole step (log-probs from the model, LD weighting of policy and reference, the loss
    list, the sft term) against TRL's _compute_loss fed the same model's per-token log-probs."""
    pytest.importorskip("trl")
    tr = _trainer(tmp_path, tok, batch_size=6, grad_clip=0.0, beta=0.3, **kw)
    if "precompute_ref_logps" not in kw:  # a reference that differs from the policy
        with torch.no_grad():
            for p in tr.reference.parameters():
                p.add_(0.05 * torch.randn_like(p))
    items = [tr.train_items[i] for i in tr.batches._perm[:6]]
    batch = tr._batch(items)
    with torch.no_grad():
        if "ref" in items[0]:
            ref = torch.tensor([it["ref"] for it in items]).t().reshape(-1)
        else:  # TRL's LD-weighted reference sums, written out on the full logits
            ref = _ld_sums(_full_token_logps(tr.reference, batch).double(), batch, kw.get("ld_alpha"))
    cm = (batch["response_mask"] * batch["attention_mask"])
    P = _full_token_logps(tr.model, batch).double()
    types_ = kw["loss_type"] if isinstance(kw["loss_type"], list) else [kw["loss_type"]]
    theirs, tm = _trl_loss(P, cm, ref[:6], ref[6:], beta=0.3, loss_types=types_, loss_weights=kw.get("loss_weights"),
                           label_smoothing=kw.get("label_smoothing", 0.0),
                           f_divergence_type=kw.get("f_divergence_type", "reverse_kl"), ld_alpha=kw.get("ld_alpha"))
    g_theirs = torch.autograd.grad(theirs, list(tr.model.parameters()))
    m, g_ours = _step_grads(tr)
    assert m["loss"] == pytest.approx(float(theirs.detach()), rel=2e-5)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b.float(), rtol=1e-3, atol=2e-6)
    for ours_k, trl_k in (("rewards/chosen", "rewards/chosen"), ("rewards/margin", "rewards/margins"),
                          ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")):
        assert m[ours_k] == pytest.approx(tm[trl_k], rel=1e-4, abs=1e-6), ours_k


def _trl_reference_free(tr, items, batch, loss_type, trl_loss_type=None, alpha=0.0):
    """TRL's CPOTrainer / ORPOTrainer ``get_batch_loss_metrics`` run on a stub whose model is
    ``tr.model`` (its full logits), on the trainer's rows: (loss, TRL's metrics). ``loss_type``
    is ours (orpo: ORPOTrainer); ``trl_loss_type`` CPOConfig's name for it when not simpo /
    sigmoid (cpo), ``alpha`` CPOConfig's AlphaPO alpha."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    cls = ORPOTrainer if loss_type == "orpo" else CPOTrainer
    B, cfg = len(items), tr.cfg
    labels = batch["input_ids"].masked_fill(~(batch["response_mask"].bool() & batch["attention_mask"].bool()), -100)
    trl_batch = {"chosen_input_ids": batch["input_ids"][:B], "chosen_attention_mask": batch["attention_mask"][:B],
                 "chosen_labels": labels[:B], "rejected_input_ids": batch["input_ids"][B:],
                 "rejected_attention_mask": batch["attention_mask"][B:], "rejected_labels": labels[B:]}
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    stub = types.SimpleNamespace(
        is_encoder_decoder=False, pad_token_id=tr.pad_id, padding_value=tr.pad_id, accelerator=acc,
        aux_loss_enabled=False, beta=cfg.beta, label_smoothing=cfg.label_smoothing, alpha=alpha,
        loss_type=trl_loss_type or {"simpo": "simpo", "cpo": "sigmoid"}.get(loss_type), cpo_alpha=cfg.cpo_alpha,
        simpo_gamma=cfg.simpo_gamma, concatenated_inputs=cls.concatenated_inputs, get_batch_logps=cls.get_batch_logps)
    stub.concatenated_forward = lambda model, b: cls.concatenated_forward(stub, model, b)
    if loss_type == "orpo":
        stub.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(stub, c, r)
    else:
        stub.cpo_loss = lambda c, r: CPOTrainer.cpo_loss(stub, c, r)

    def model(input_ids, attention_mask=None, use_cache=False):
        return types.SimpleNamespace(logits=tr.model(input_ids=input_ids, attention_mask=attention_mask).logits)

    return cls.get_batch_loss_metrics(stub, model, trl_batch)


REFERENCE_FREE_CASES = [dict(loss_type="simpo", simpo_gamma=0.3, beta=2.0),
                        dict(loss_type="simpo", cpo_alpha=0.0, label_smoothing=0.1, beta=2.0),
                        dict(loss_type="cpo", beta=0.2), dict(loss_type="orpo", beta=0.25)]


@pytest.mark.parametrize("kw", REFERENCE_FREE_CASES, ids=["cpo_simpo", "simpo", "cpo", "orpo"])
def test_reference_free_step_equals_trls(tmp_path, tok, kw):
    """simpo / cpo / orpo: the step's loss, gradient and logged metrics equal TRL's CPO / ORPO
    trainers' on the same model and rows (their NLL terms included: ORPO's over the prompt too)."""
    pytest.importorskip("trl")
    tr = _trainer(tmp_path, tok, batch_size=6, grad_clip=0.0, **kw)
    assert tr.reference is None
    items = [tr.train_items[i] for i in tr.batches._perm[:6]]
    theirs, tm = _trl_reference_free(tr, items, tr._batch(items), kw["loss_type"])
    g_theirs = torch.autograd.grad(theirs, list(tr.model.parameters()))
    m, g_ours = _step_grads(tr)
    assert m["loss"] == pytest.approx(float(theirs.detach()), rel=2e-5)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-6)
    pairs = [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
             ("rewards/accuracy", "rewards/accuracies"), ("rewards/margin", "rewards/margins"),
             ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")]
    if tr.cfg.nll_weight > 0:
        pairs.append(("nll", "nll_loss"))
    else:
        assert "nll" not in m and tm["nll_loss"] == 0
    if kw["loss_type"] == "orpo":
        pairs += [("log_odds_ratio", "log_odds_ratio"), ("log_odds_chosen", "log_odds_chosen")]
    for ours_k, trl_k in pairs:
        assert m[ours_k] == pytest.approx(tm[trl_k], rel=1e-4, abs=1e-6), ours_k


def test_reference_free_loads_no_reference(tmp_path, tok, monkeypatch):
    from rlhf_fast.models import loading
    from rlhf_fast.trainers import dpo as dpo_mod

    def refuse(*a, **k):
        raise AssertionError("a reference was built for a reference-free loss")

    for mod, name in ((dpo_mod, "offline_reference"), (dpo_mod, "shard_reference"), (dpo_mod, "reference_logps"),
                      (dpo_mod, "precompute_reference_logps"), (loading, "make_reference")):
        monkeypatch.setattr(mod, name, refuse)
    forwards = []
    real = dpo_mod.token_logps
    monkeypatch.setattr(dpo_mod, "token_logps", lambda model, *a, **k: forwards.append(model) or real(model, *a, **k))
    tr = _trainer(tmp_path, tok, loss_type="orpo", max_steps=2)
    assert tr.reference is None and not tr._reference_sharded
    tr.train_step()
    tr.evaluate(tr.train_items[:4])
    assert forwards and all(m is tr.model for m in forwards)  # one policy forward per micro-batch, nothing else
    # no second parameter set: every model reachable from the trainer is the policy
    mods = [v for v in vars(tr).values() if isinstance(v, torch.nn.Module)]
    assert mods == [tr.model]


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_training_learns(tmp_path, tok, loss_type):
    recs = synthetic_preference_records(128, seed=1)
    # ORPO's NLL spans the prompts too, which a tiny model learns first: a larger λ, and a lower bar
    kw, bar = ((dict(beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0, lr=5e-3), 0.8) if loss_type == "simpo"
               else (dict(beta=3.0, lr=1e-2), 0.75))
    tr = _trainer(tmp_path, tok, records=recs, max_steps=16, warmup_steps=2, loss_type=loss_type, **kw)
    before = tr.evaluate(tr.train_items)
    assert before["eval_rewards/accuracy"] < 0.5  # the initial policy: no better than chance
    for _ in range(16):
        m = tr.train_step()
    after = tr.evaluate(tr.train_items)
    assert after["eval_rewards/accuracy"] > bar, (before, after)
    assert after["eval_rewards/margin"] > before["eval_rewards/margin"] and after["eval_loss"] < before["eval_loss"]
    assert "rewards/margin" in m and ("log_odds_ratio" in m) == (loss_type == "orpo")


def test_weighted_combination_is_the_weighted_sum(tmp_path, tok):
    """loss_type [sigmoid, bco_pair] with weights [0.7, 0.3]: the step's loss and gradient are
    0.7 × sigmoid's + 0.3 × bco_pair's (a reference that differs from the policy)."""
    recs = synthetic_preference_records(16, seed=3)
    out = {}
    for name, kw in (("both", dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[0.7, 0.3])),
                     ("a", dict(loss_type="sigmoid")), ("b", dict(loss_type="bco_pair"))):
        tr = _trainer(tmp_path, tok, name, records=recs, grad_clip=0.0, **kw)
        with torch.no_grad():
            torch.manual_seed(0)
            for p in tr.reference.parameters():
                p.add_(0.05 * torch.randn_like(p))
        out[name] = _step_grads(tr)
    (mb, gb), (ma, ga), (mo, go) = out["both"], out["a"], out["b"]
    assert mb["loss"] == pytest.approx(0.7 * ma["loss"] + 0.3 * mo["loss"], rel=1e-6)
    assert abs(ma["loss"] - mo["loss"]) > 1e-3  # the two differ: the weights matter
    for x, y, z in zip(gb, ga, go):
        torch.testing.assert_close(x, 0.7 * y + 0.3 * z, rtol=1e-4, atol=1e-7)
    assert mb["rewards/margin"] == pytest.approx(ma["rewards/margin"], rel=1e-6)


SPLIT_CASES = [dict(loss_type=["nca_pair", "sft"], ld_alpha=0.5, annotator_weights={"noisy": 0.2}),
               dict(loss_type="orpo"), dict(loss_type="simpo", label_smoothing=0.1)]


@pytest.mark.parametrize("kw", SPLIT_CASES, ids=["nca_sft_ld", "orpo", "simpo"])
def test_micro_batch_split_does_not_change_the_new_losses(tmp_path, tok, kw):
    recs = synthetic_preference_records(16, seed=4)
    for i, r in enumerate(recs):
        r.annotator = "careful" if i % 3 else "noisy"
    m1, g1 = _step_grads(_trainer(tmp_path, tok, "one", records=recs, batch_size=8, grad_accum=1, grad_clip=0.0, **kw))
    m2, g2 = _step_grads(_trainer(tmp_path, tok, "two", records=recs, batch_size=4, grad_accum=2, grad_clip=0.0, **kw))
    for k in ("loss", "nll", "rewards/accuracy", "logps/chosen"):
        assert m1[k] == pytest.approx(m2[k], rel=1e-5), k
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_aot_depends_on_the_micro_batch_split(tmp_path, tok):
    """aot sorts over the micro-batch (documented): a split changes the step; the data and
    models are those of the split-invariance test above."""
    recs = synthetic_preference_records(16, seed=4)
    ms = []
    for name, bs, ga in (("one", 8, 1), ("two", 4, 2)):
        tr = _trainer(tmp_path, tok, name, records=recs, batch_size=bs, grad_accum=ga, loss_type="aot")
        with torch.no_grad():  # a reference far enough that it orders the pairs differently from the policy
            torch.manual_seed(0)
            for p in tr.reference.parameters():
                p.add_(0.5 * torch.randn_like(p))
        ms.append(tr.train_step())
    assert ms[0]["rewards/margin"] == pytest.approx(ms[1]["rewards/margin"], rel=1e-5)  # the same pairs
    assert abs(ms[0]["loss"] - ms[1]["loss"]) > 1e-6


def test_ld_alpha_log_probs_and_precomputed_reference(tmp_path, tok):
    recs = synthetic_preference_records(24, seed=8)
    a = _trainer(tmp_path, tok, "a", records=recs, ld_alpha=0.4)
    b = _trainer(tmp_path, tok, "b", records=recs, ld_alpha=0.4, precompute_ref_logps=True)
    batch = a._batch(a.train_items[:5])
    with torch.no_grad():
        lp, _ = response_logps(a.model, batch, ld_alpha=0.4)
        full = _full_token_logps(a.model, batch).double()
    torch.testing.assert_close(lp.double(), _ld_sums(full, batch, 0.4), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lp, response_logps(a.model, batch)[0])  # lengths differ: the weighting acts
    torch.testing.assert_close(torch.tensor([it["ref"] for it in b.train_items[:5]]).t().reshape(-1), lp,
                               rtol=1e-5, atol=1e-5)  # the precomputed reference is LD-weighted too
    for _ in range(2):
        ma, mb = a.train_step(), b.train_step()
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-4)


# ----------------------------------------------------------------------------- config and CLI


def test_config_errors_name_the_field(tmp_path):
    for kw, needle in ((dict(beta=0.0), "beta must be a finite number > 0"), (dict(beta=float("nan")), "beta"),
                       (dict(loss_type="kto"), "loss_type must be one of"),
                       (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
                       (dict(label_smoothing=-0.1), "label_smoothing"),
                       (dict(loss_type="ipo", label_smoothing=0.1),
                        r"label_smoothing .* applies to loss_type \[.*'robust', 'sigmoid'"),
                       (dict(loss_type="ipo", use_margin=True), "use_margin"),
                       (dict(rpo_alpha=-1.0), "rpo_alpha"), (dict(data_kind="scores"), "data_kind"),
                       (dict(max_len=1), "max_len must be >= 2"), (dict(lora="yes"), "lora"),
                       (dict(annotator_weights={"a": -1.0}), "annotator_weights"),
                       (dict(precompute_ref_logps="yes"), "precompute_ref_logps"), (dict(batch_size=0), "batch_size"),
                       (dict(loss_type=["sigmoid", "nope"]), r"loss_type must be one of .*\['nope'\]"),
                       (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights must have one weight"),
                       (dict(loss_weights=[float("inf")]), r"loss_weights\[0\]"),
                       (dict(loss_type=["simpo", "sigmoid"]), "loss_type: the reference-free loss 'simpo' must be"),
                       (dict(loss_type="orpo", ref_model="some/folder"), "ref_model must be left unset"),
                       (dict(loss_type="cpo", precompute_ref_logps=True), "precompute_ref_logps must be left unset"),
                       (dict(loss_type="simpo", rpo_alpha=0.5), "rpo_alpha must be left unset .*cpo_alpha"),
                       (dict(loss_type="orpo", use_margin=True), "use_margin must be left unset"),
                       (dict(loss_type="simpo", ld_alpha=0.5), "ld_alpha must be left unset"),
                       (dict(loss_type="cpo", f_divergence_type="forward_kl"), "f_divergence_type must be left unset"),
                       (dict(loss_type="orpo", label_smoothing=0.1), "label_smoothing .* not \\['orpo'\\]"),
                       (dict(loss_type="exo_pair"), "label_smoothing must be > 0 for loss_type 'exo_pair'"),
                       (dict(loss_type="sppo_hard", f_divergence_type="js_divergence"), "f_divergence_type 'js_div"),
                       (dict(f_divergence_type="kl"), "f_divergence_type must be one of"),
                       (dict(ld_alpha=1.5), r"ld_alpha must be null or in \[0, 1\]"),
                       (dict(discopop_tau=0.0), "discopop_tau"), (dict(cpo_alpha=-1.0), "cpo_alpha"),
                       (dict(loss_type="apo_zero", use_margin=True), "use_margin applies"),
                       (dict(loss_type="aot", annotator_weights={"a": 0.5}), "annotator_weights / auto_annotator"),
                       (dict(loss_type="aot_unpaired", auto_annotator_weights=True), "do not apply to loss_type")):
        with pytest.raises(ValueError, match=needle):
            _cfg(tmp_path, **kw)


def test_data_kinds(tmp_path, tok):
    ranked = tmp_path / "rank.jsonl"
    ranked.write_text("".join(json.dumps({"prompt": f"describe: {w}", "responses": ["good one", "two", "no"],
                                          "ranking": [0, 1, 2]}) + "\n" for w in ("cat", "dog")))
    tr = DPOTrainer(_cfg(tmp_path, "rk", data=str(ranked), data_kind="rankings", eval_fraction=0.0), tokenizer=tok,
                    model=_tiny_model(tok))
    assert len(tr.train_items) == 6  # every implied pair of each ranking
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"item": i, "key": str(i), "prompt": "p", "a": f"a{i}", "b": f"b{i}",
                                          "label": lab, "annotator": "h"}) + "\n"
                              for i, lab in enumerate(["A", "B", "tie"])))
    tr = DPOTrainer(_cfg(tmp_path, "lb", data=str(labels), data_kind="labels", eval_fraction=0.0), tokenizer=tok,
                    model=_tiny_model(tok))
    assert len(tr.train_items) == 2  # the tie carries no preference
    assert tr.train_items[1]["chosen"] == tok("b1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def _tiny_model(tok):
    from rlhf_fast.models.tiny import tiny_causal_lm

    return tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2)


def test_cli(tmp_path, capsys):
    example = str(ROOT / "examples" / "dpo.yaml")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "dpo", example, "--max_steps", "2",
                           "--output_dir", str(out), "--device", "cpu"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "dpo: 2 steps" in proc.stdout and "eval_rewards/accuracy" in proc.stdout
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out / "final"))
    assert [m["step"] for m in read_metrics(str(out))] == [0, 2]  # the start's evaluation, the last step
    capsys.readouterr()
    # --print-config: the resolved config as YAML that loads back, nothing started; --help lists the keys
    from rlhf_fast.trainers.config import config_keys, load_config, to_dict

    assert cli.main(["dpo", example, "--beta", "0.25", "--lora.r", "4", "--print-config", "--output_dir",
                     str(tmp_path / "never")]) == 0
    (tmp_path / "printed.yaml").write_text(capsys.readouterr().out)
    printed = load_config(DPOConfig, str(tmp_path / "printed.yaml"))
    assert printed.beta == 0.25 and printed.lora == {"r": 4} and not (tmp_path / "never").exists()
    assert to_dict(printed) == to_dict(load_config(DPOConfig, example, ["--beta", "0.25", "--lora.r", "4",
                                                                        "--output_dir", str(tmp_path / "never")]))
    with pytest.raises(SystemExit):
        cli.main(["dpo", "--help"])
    shown = capsys.readouterr().out
    assert all(f"  {k} " in shown for k, _, _ in config_keys(DPOConfig))
    for argv, needle in ((["--betaa", "1"], "unknown config key 'betaa'"),
                         (["--beta", "0"], "beta must be a finite number > 0"),
                         (["--loss_type", "kto"], "loss_type must be one of"),
                         (["--output_dir", str(out), "--resume", "false"], "already holds a run")):
        assert cli.main(["dpo", example] + argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
