"""TRL's MoE router load-balancing term in the evaluation (:mod:`rlhf_fast.models.moe_aux`).

transformers' ``prediction_step`` calls the same ``compute_loss`` as training, so TRL 1.16's
SFT / DPO / KTO ``eval_loss`` is the mean over the eval batches (``evaluation_loop``) of each
batch's loss with its ``coef × aux_loss``, and its ``log`` adds ``eval_aux_loss``, the mean of
the batches' aux losses (``_metrics["eval"]``). Ours, on tiny Mixtral / Qwen2-MoE models:

- SFT: TRL's own ``evaluation_loop`` on our eval batches gives our ``eval_aux_loss``, and the
  same coef × aux in ``eval_loss`` (on one batch the whole eval_loss; over several ours keeps its
  token-mean NLL); the other eval metrics are those of the run without the term;
- DPO: TRL's ``_compute_loss`` in eval mode per batch, averaged as ``evaluation_loop``, is our
  eval_loss and eval_aux_loss; a LoRA policy's reference (its own base model, adapters off) adds
  nothing to it;
- KTO: eval_aux_loss is the mean of the examples' forwards' ``aux_loss`` (not the KL rows');
- coefficient 0, or a dense model: no eval_aux_loss, eval_loss as before.
"""

import copy

import pytest
import torch

from rlhf_fast.models import moe_aux
from rlhf_fast.models.logprobs import default_position_ids
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records
from tests.test_moe_aux_loss import _trl_dpo_loss, mixtral, qwen2_moe, sft_tok  # noqa: F401 (a fixture)

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"
COEF = 0.5  # large, so the term stands well above float32 rounding of the loss

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _own_aux(model, batch):
    """The model's own CausalLM ``aux_loss`` of ``batch`` (eval mode, no gradients)."""
    am = batch["attention_mask"]
    with torch.no_grad():
        return float(model.eval()(input_ids=batch["input_ids"], attention_mask=am,
                                  position_ids=default_position_ids(am), output_router_logits=True).aux_loss)


def _but_loss(m):
    return {k: v for k, v in m.items() if k not in ("eval_loss", "eval_aux_loss")}


# ----------------------------------------------------------------------------- SFT vs TRL's SFTTrainer


def _sft(tmp_path, name, tok, model, recs, coef):
    cfg = SFTConfig(model=TINY, output_dir=str(tmp_path / name), lr=3e-3, warmup_steps=0, eval_every=0, log_every=1,
                    max_len=24, max_steps=1, device="cpu", batch_size=4, router_aux_loss_coef=coef)
    return SFTTrainer(cfg, model=copy.deepcopy(model), tokenizer=tok, train_records=recs[:8], eval_records=recs[8:14])


def _trl_sft_eval(tmp_path, name, tok, model, batches, coef):
    """TRL's SFTTrainer evaluation (``evaluation_loop``, then ``log``: eval_loss and eval_aux_loss)
    over our eval batches, labels -100 off the completion tokens as its collator makes them."""
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer as TRLTrainer

    ds = Dataset.from_list([{"prompt": "a b", "completion": "c d"}])
    # bf16 false: else accelerate runs the CPU forward under bf16 autocast (ours is float32)
    args = TRLConfig(output_dir=str(tmp_path / name), report_to="none", use_cpu=True, max_length=24, bf16=False,
                     per_device_eval_batch_size=4, router_aux_loss_coef=coef)
    tt = TRLTrainer(model=copy.deepcopy(model), args=args, train_dataset=ds, processing_class=tok)
    inputs = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
               "labels": b["input_ids"].masked_fill(~(b["response_mask"].bool() & b["attention_mask"].bool()), -100)}
              for b in batches]
    logs = dict(tt.evaluation_loop(inputs, description="Evaluation", prediction_loss_only=True).metrics)
    tt.log(logs)
    return tt.state.log_history[-1]


@pytest.mark.parametrize("build", [mixtral, qwen2_moe], ids=["mixtral", "qwen2_moe"])
def test_sft_eval_equals_trls(tmp_path, sft_tok, build):
    pytest.importorskip("datasets")
    recs = synthetic_sft_records(16, seed=4)
    model = build(len(sft_tok))
    model.config.pad_token_id, model.config.eos_token_id = sft_tok.pad_token_id, sft_tok.eos_token_id
    on, off = (_sft(tmp_path, n, sft_tok, model, recs, c) for n, c in (("on", COEF), ("off", 0.0)))
    m_on, m_off = on.evaluate(), off.evaluate()
    rows = on.eval_rows
    batches = [on._local_batch(list(range(i, min(i + 4, len(rows)))), rows) for i in range(0, len(rows), 4)]
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    theirs, theirs_off = (_trl_sft_eval(tmp_path, n, sft_tok, model, batches, c)
                          for n, c in (("trl_on", COEF), ("trl_off", 0.0)))
    assert m_on["eval_aux_loss"] == pytest.approx(theirs["eval_aux_loss"], rel=1e-6)
    assert m_on["eval_aux_loss"] == pytest.approx(sum(_own_aux(model, b) for b in batches) / 2, rel=1e-6)
    assert "eval_aux_loss" not in m_off and "eval_aux_loss" not in theirs_off
    # the term TRL's eval_loss carries (its NLL part is the batches' mean of token means; ours the token mean)
    term = COEF * m_on["eval_aux_loss"]
    assert m_on["eval_loss"] - m_off["eval_loss"] == pytest.approx(term, rel=1e-9)
    assert theirs["eval_loss"] - theirs_off["eval_loss"] == pytest.approx(term, rel=1e-5)
    # nothing else moves: eval_ppl stays the NLL's perplexity
    assert _but_loss(m_on) == _but_loss(m_off)
    # one eval batch: TRL's whole eval_loss
    on.eval_rows = rows[:4]
    one = on.evaluate()
    assert one["eval_loss"] == pytest.approx(_trl_sft_eval(tmp_path, "trl_one", sft_tok, model, batches[:1],
                                                           COEF)["eval_loss"], rel=1e-6)


# ----------------------------------------------------------------------------- DPO / KTO


def _pref(tmp_path, kind, name, model, tok, coef, **kw):
    from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
    from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
    from rlhf_fast.trainers.reward import synthetic_preference_records

    cfg_cls, cls = (DPOConfig, DPOTrainer) if kind == "dpo" else (KTOConfig, KTOTrainer)
    cfg = cfg_cls(model=TINY, output_dir=str(tmp_path / name), batch_size=4, lr=3e-3, warmup_steps=0, eval_every=0,
                  log_every=1, max_len=40, max_steps=1, device="cpu", beta=0.3, router_aux_loss_coef=coef, **kw)
    recs = synthetic_preference_records(24, seed=5)
    return cls(cfg, model=copy.deepcopy(model), tokenizer=tok, train_records=recs[:16], eval_records=recs[16:])


@pytest.fixture(scope="module")
def pref_tok():
    from tests.test_reward import preference_tokenizer

    return preference_tokenizer()


def test_dpo_eval_equals_trls(tmp_path, pref_tok):
    pytest.importorskip("trl")
    from rlhf_fast.trainers.dpo import reference_logps

    model = mixtral(len(pref_tok), pad_token_id=pref_tok.pad_token_id, eos_token_id=pref_tok.eos_token_id)
    on, off = (_pref(tmp_path, "dpo", n, model, pref_tok, c) for n, c in (("on", COEF), ("off", 0.0)))
    with torch.no_grad():  # a reference that differs from the policy, so the DPO loss is not log 2 everywhere
        for tr in (on, off):
            torch.manual_seed(3)
            for p in tr.reference.parameters():
                p.add_(0.05 * torch.randn_like(p))
    m_on, m_off = on.evaluate(), off.evaluate()
    items = on.eval_items
    assert len(items) == 8  # two eval batches of 4: transformers' mean over batches is the mean over pairs
    losses, auxes = [], []
    for s in (0, 4):
        batch = on._batch(items[s:s + 4])
        with torch.no_grad():
            ref = reference_logps(on.reference, batch, False)
            loss, aux = _trl_dpo_loss(copy.deepcopy(on.model).eval(), batch, ref[:4], ref[4:], beta=0.3, coef=COEF)
        losses.append(float(loss))
        auxes.append(aux)
    assert m_on["eval_aux_loss"] == pytest.approx(sum(auxes) / 2, rel=1e-6)
    assert m_on["eval_loss"] == pytest.approx(sum(losses) / 2, rel=2e-5)
    assert m_on["eval_loss"] - m_off["eval_loss"] == pytest.approx(COEF * m_on["eval_aux_loss"], rel=1e-9)
    assert _but_loss(m_on) == _but_loss(m_off)


def test_dpo_lora_reference_adds_no_aux(tmp_path, pref_tok):
    """A LoRA policy's reference is its own base model with the adapters off: an evaluation's
    collection, which records forwards without gradients, must leave that forward out."""
    pytest.importorskip("peft")
    model = mixtral(len(pref_tok), pad_token_id=pref_tok.pad_token_id, eos_token_id=pref_tok.eos_token_id)
    tr = _pref(tmp_path, "dpo", "lora", model, pref_tok, COEF, lora={})
    assert tr.moe.enabled and not tr.cfg.precompute_ref_logps
    with torch.no_grad():  # adapters that change the routing, so the reference's forward would differ
        torch.manual_seed(4)
        for n, p in tr.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.3 * torch.randn_like(p))
    m = tr.evaluate()
    own = [_own_aux(tr.model, tr._batch(tr.eval_items[s:s + 4])) for s in (0, 4)]
    assert m["eval_aux_loss"] == pytest.approx(sum(own) / 2, rel=1e-6)
    # (the check can fail: the adapters-off forward's loss differs)
    with tr.model.disable_adapter():
        base = [_own_aux(tr.model, tr._batch(tr.eval_items[s:s + 4])) for s in (0, 4)]
    assert abs(sum(base) - sum(own)) > 1e-4


def test_kto_eval_aux_is_the_examples_forward(tmp_path, pref_tok):
    model = mixtral(len(pref_tok), pad_token_id=pref_tok.pad_token_id, eos_token_id=pref_tok.eos_token_id)
    on, off = (_pref(tmp_path, "kto", n, model, pref_tok, c) for n, c in (("on", COEF), ("off", 0.0)))
    assert on.kl_rows
    rows = []
    batch_of = on._batch
    on._batch = lambda items, key="completion": rows.append((key, batch_of(items, key))) or rows[-1][1]
    m_on, m_off = on.evaluate(), off.evaluate()
    mains = [b for k, b in rows if k == "completion"]
    assert len(mains) == len(on.eval_items) // 4 and any(k == "kl" for k, _ in rows)
    assert m_on["eval_aux_loss"] == pytest.approx(sum(_own_aux(model, b) for b in mains) / len(mains), rel=1e-6)
    assert m_on["eval_loss"] - m_off["eval_loss"] == pytest.approx(COEF * m_on["eval_aux_loss"], rel=1e-9)
    assert _but_loss(m_on) == _but_loss(m_off)


# ----------------------------------------------------------------------------- pieces


def test_collection_records_no_grad_forwards_only_in_evaluation():
    from rlhf_fast.models.logprobs import sequence_logprobs

    model = mixtral(64)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    aux = moe_aux.RouterAux(model)
    with torch.no_grad():
        with aux.collect() as col:  # training's: a no-grad forward is no term of the loss
            sequence_logprobs(model, ids, am)
        assert not col.parts and aux.eval_sums(col).tolist() == [0.0, 0.0]
        with aux.collect(evaluation=True) as col:
            sequence_logprobs(model, ids, am)
            with moe_aux.suspended():
                sequence_logprobs(model, ids, am)
            assert moe_aux.active(model) is col  # back after the suspended block
        assert len(col.parts) == 1
        assert aux.eval_sums(col).tolist() == [pytest.approx(_own_aux(model, {"input_ids": ids,
                                                                                 "attention_mask": am})), 1.0]
        assert aux.eval_sums(col, counts=False).tolist() == [0.0, 0.0]
    m = {"eval_loss": 1.0}
    aux.add_eval_metrics(m, torch.tensor([3.0, 2.0], dtype=torch.float64))
    assert m == {"eval_loss": 1.0 + 0.001 * 1.5, "eval_aux_loss": 1.5}
    aux.add_eval_metrics(m, torch.zeros(2, dtype=torch.float64))  # no batch counted: nothing
    assert m == {"eval_loss": 1.0 + 0.001 * 1.5, "eval_aux_loss": 1.5}
    off = moe_aux.RouterAux(model, 0.0)
    assert off.eval_sums(None) is None
    off.add_eval_metrics(m, None)
    assert m == {"eval_loss": 1.0 + 0.001 * 1.5, "eval_aux_loss": 1.5}


def test_dense_eval_has_no_aux(tmp_path, sft_tok):
    recs = synthetic_sft_records(16, seed=4)
    tr = SFTTrainer(SFTConfig(model=TINY, output_dir=str(tmp_path / "dense"), max_len=24, device="cpu", batch_size=4,
                              max_steps=1), tokenizer=sft_tok, train_records=recs[:8], eval_records=recs[8:])
    m = tr.evaluate()
    assert not tr.moe.enabled and "eval_aux_loss" not in m and m["eval_loss"] == pytest.approx(math_log(m["eval_ppl"]))


def math_log(x):
    import math

    return math.log(x)
