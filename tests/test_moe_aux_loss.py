"""TRL's ``router_aux_loss_coef``: a Mixture-of-Experts policy's router load-balancing loss in our
trainers (:mod:`rlhf_fast.models.moe_aux`), on tiny Mixtral / Qwen2-MoE models built from a config.

- the aux loss collected from our forward equals the ``aux_loss`` of the model's own CausalLM
  forward, for left- and right-padded batches;
- SFT: one step with gradient accumulation gives TRL 1.16's ``SFTTrainer.compute_loss`` loss, aux
  metric and gradients (TRL driven on the same batches); ``router_aux_loss_coef: 0`` turns it off;
- DPO: the loss and gradients of TRL's ``DPOTrainer._compute_loss`` (on a stub trainer, TRL's
  fused head) with the aux term; KTO: the term is coef × aux / grad_accum of the examples' forward;
- GRPO: the policy update adds coef × aux / the accumulation steps (``policy/aux_loss`` logged);
- a dense model: nothing changes (metrics.jsonl equal with the key absent or 0), a non-zero
  coefficient is refused naming the key, as is an MoE whose module has no loss function.
"""

import collections
import copy
import types

import pytest
import torch

from rlhf_fast.models import moe_aux
from rlhf_fast.models.logprobs import default_position_ids, sequence_logprobs
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records

MAX_LEN = 24
TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def mixtral(vocab: int, seed: int = 0, **ids):
    """A 2-layer, hidden-32 Mixtral with 4 experts, 2 per token (config router_aux_loss_coef 0.001)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128, sliding_window=None, **ids)
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg).eval()


def qwen2_moe(vocab: int, seed: int = 0):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                         shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    return Qwen2MoeForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def sft_tok():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(64) + [r.prompt + r.completion for r in synthetic_sft_records(64)], 300,
                           padding_side="right")


def _grads(model):
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- the loss itself


@pytest.mark.parametrize("build", [mixtral, qwen2_moe], ids=["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_aux_loss_equals_the_models_own(build, side):
    """Collected from sequence_logprobs' forward (the backbone asked for router logits), the loss
    is the CausalLM forward's ``aux_loss`` for the same batch and mask, and its gradient too."""
    model = build(64)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (3, 9), generator=g)
    am = torch.ones_like(ids)
    lens = [9, 5, 3]
    for i, n in enumerate(lens):
        if side == "left":
            am[i, : 9 - n] = 0
        else:
            am[i, n:] = 0
    aux = moe_aux.RouterAux(model)
    assert aux.enabled and aux.coef == pytest.approx(0.001)
    with aux.collect() as col:
        sequence_logprobs(model, ids, am)
    ours = col.loss()
    theirs = model(input_ids=ids, attention_mask=am, position_ids=default_position_ids(am),
                   output_router_logits=True).aux_loss
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    g_ours = torch.autograd.grad(ours, list(model.parameters()), allow_unused=True)
    g_theirs = torch.autograd.grad(theirs, list(model.parameters()), allow_unused=True)
    for a, b in zip(g_ours, g_theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    # the padding counts nowhere: the unpadded first row alone is not the batch's loss
    unmasked = model(input_ids=ids, output_router_logits=True).aux_loss
    assert float(theirs.detach()) != pytest.approx(float(unmasked.detach()), rel=1e-4)


def test_two_forwards_count_as_one_batch_and_no_grad_forwards_are_not_recorded():
    model = mixtral(64)
    ids = torch.randint(3, 64, (4, 6), generator=torch.Generator().manual_seed(2))
    am = torch.ones_like(ids)
    am[1, 4:] = 0
    aux = moe_aux.RouterAux(model)
    with aux.collect() as col:
        sequence_logprobs(model, ids[:2], am[:2])
        sequence_logprobs(model, ids[2:], am[2:])
        with torch.no_grad():  # a KL row's or a reference's forward: no term of the loss
            sequence_logprobs(model, ids, am)
    assert len(col.parts) == 2
    whole = model(input_ids=ids, attention_mask=am, position_ids=default_position_ids(am),
                  output_router_logits=True).aux_loss
    torch.testing.assert_close(col.loss(), whole, rtol=1e-6, atol=0)


def test_a_reference_adds_nothing():
    """A peft policy's reference (the same weights, adapters off) and a separate reference copy
    are not the policy's forward: nothing of theirs is collected."""
    from rlhf_fast.models.loading import load_policy, make_reference

    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    am = torch.ones_like(ids)
    for pol in (load_policy(mixtral(64), lora={}), mixtral(64)):
        ref = make_reference(pol)
        aux = moe_aux.RouterAux(pol)
        with aux.collect() as col:
            sequence_logprobs(ref, ids, am)
            assert not col.parts
            sequence_logprobs(pol, ids, am)
        assert len(col.parts) == 1


# ----------------------------------------------------------------------------- SFT vs TRL's SFTTrainer


def _sft(tmp_path, name, tok, model, recs, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), lr=3e-3, warmup_steps=0, eval_every=0, log_every=1,
                max_len=MAX_LEN, max_steps=2, device="cpu", grad_clip=0.0, batch_size=4, grad_accum=2)
    base.update(kw)
    return SFTTrainer(SFTConfig(**base), model=model, tokenizer=tok, train_records=recs, eval_records=[])


def _record_step(tr):
    """Run one train_step, returning (metrics, its micro-batches, the gradients the optimizer saw)."""
    seen, batches = {}, []
    local = tr._local_batch
    tr._local_batch = lambda idx, rows: batches.append(local(idx, rows)) or batches[-1]
    tr.optimizer.register_step_pre_hook(lambda opt, a, k: seen.__setitem__("g", _grads(tr.model)))
    m = tr.train_step()
    return m, batches, seen["g"]


def test_sft_step_equals_trls_sft_trainer(tmp_path, sft_tok):
    """batch 4 × grad_accum 2, default coefficient (Mixtral's 0.001): our step's loss, aux_loss and
    accumulated gradient are TRL's compute_loss on the same micro-batches (num_items_in_batch the
    step's tokens, the aux term divided by the 2 accumulation steps), summed as its Trainer sums them."""
    pytest.importorskip("datasets")
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer as TRLTrainer

    recs = synthetic_sft_records(8, seed=4)
    model = mixtral(len(sft_tok), pad_token_id=sft_tok.pad_token_id, eos_token_id=sft_tok.eos_token_id)
    ds = Dataset.from_list([{"prompt": r.prompt, "completion": r.completion} for r in recs])
    tt = TRLTrainer(model=copy.deepcopy(model), args=TRLConfig(output_dir=str(tmp_path / "trl"), report_to="none",
                                                               use_cpu=True, max_length=MAX_LEN),
                    train_dataset=ds, processing_class=sft_tok)
    assert tt.aux_loss_enabled and tt.router_aux_loss_coef == pytest.approx(0.001)
    tr = _sft(tmp_path, "ours", sft_tok, copy.deepcopy(model), recs)
    m, batches, g_ours = _record_step(tr)
    assert len(batches) == 2 and any(bool((b["attention_mask"] == 0).any()) for b in batches)  # padded rows

    labels = [b["input_ids"].masked_fill(~(b["response_mask"].bool() & b["attention_mask"].bool()), -100)
              for b in batches]
    n_items = sum(int((lab[:, 1:] != -100).sum()) for lab in labels)
    tt.model.train()
    tt.current_gradient_accumulation_steps = 2
    total = 0.0
    for b, lab in zip(batches, labels):
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": lab}
        loss = tt.compute_loss(tt.model, inputs, num_items_in_batch=torch.tensor(n_items))
        loss.backward()
        total += float(loss.detach())
    trl_aux = tt._metrics["train"]["aux_loss"]
    assert len(trl_aux) == 2 and m["aux_loss"] == pytest.approx(sum(trl_aux) / 2, rel=1e-6)
    assert m["loss"] == pytest.approx(total, rel=1e-6)
    for a, p in zip(g_ours, tt.model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)


def test_sft_coef_zero_turns_it_off(tmp_path, sft_tok, monkeypatch):
    """``router_aux_loss_coef: 0`` on an MoE: no router logits are asked for, no aux_loss metric,
    and the loss is the NLL alone (TRL's too: its config then disables output_router_logits)."""
    recs = synthetic_sft_records(8, seed=4)
    model = mixtral(len(sft_tok), pad_token_id=sft_tok.pad_token_id, eos_token_id=sft_tok.eos_token_id)
    on = _sft(tmp_path, "on", sft_tok, copy.deepcopy(model), recs)
    off = _sft(tmp_path, "off", sft_tok, copy.deepcopy(model), recs, router_aux_loss_coef=0.0)
    assert on.moe.enabled and not off.moe.enabled
    m_on = on.train_step()
    monkeypatch.setattr(moe_aux.RouterLogits, "record", lambda *a: pytest.fail("router logits recorded"))
    m_off = off.train_step()
    assert "aux_loss" not in m_off and m_on["aux_loss"] > 1.0
    assert m_on["loss"] == pytest.approx(m_off["loss"] + 0.001 * m_on["aux_loss"], rel=1e-6)


# ----------------------------------------------------------------------------- DPO / KTO


def _trl_dpo_loss(model, batch, ref_c, ref_r, *, beta, coef):
    """trl/trainer/dpo_trainer.py ``DPOTrainer._compute_loss`` (sigmoid, precomputed reference) on a
    stub trainer with the MoE term on (``aux_loss_enabled``, ``router_aux_loss_coef``), ``model``
    patched by TRL's ``add_fused_lm_head``: loss = DPO loss + coef × outputs.aux_loss."""
    from trl.trainer.dpo_trainer import DPOTrainer as TRLDPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                                unwrap_model=lambda x: x)
    stub = types.SimpleNamespace(
        model=model, accelerator=acc, aux_loss_enabled=True, router_aux_loss_coef=coef, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
        loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _total_train_tokens=0, _tp_size=1, args=types.SimpleNamespace(discopop_tau=0.05,
                                                                      gradient_checkpointing_kwargs=None),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": batch["response_mask"] * batch["attention_mask"],
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = TRLDPOTrainer._compute_loss(stub, model, inputs, False)
    return loss, stub._metrics["train" if model.training else "eval"]["aux_loss"][0]


def test_dpo_step_equals_trls_compute_loss(tmp_path):
    pytest.importorskip("trl")
    from rlhf_fast.trainers import dpo as dpo_mod
    from rlhf_fast.trainers.reward import synthetic_preference_records
    from tests.test_reward import preference_tokenizer

    tok = preference_tokenizer()
    model = mixtral(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    cfg = dpo_mod.DPOConfig(model=TINY, output_dir=str(tmp_path / "dpo"), batch_size=4, lr=3e-3, warmup_steps=0,
                            eval_every=0, log_every=1, max_len=40, max_steps=2, device="cpu", grad_clip=0.0,
                            beta=0.3)
    tr = dpo_mod.DPOTrainer(cfg, model=copy.deepcopy(model), tokenizer=tok,
                            train_records=synthetic_preference_records(16, seed=5), eval_records=[])
    assert tr.moe.enabled
    with torch.no_grad():  # a reference that differs from the policy, so the DPO loss has a gradient
        for p in tr.reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    items = [tr.train_items[i] for i in tr.batches._perm[:4]]
    batch = tr._batch(items)
    with torch.no_grad():
        ref = dpo_mod.reference_logps(tr.reference, batch, False)
    theirs_model = copy.deepcopy(tr.model).train()
    theirs, trl_aux = _trl_dpo_loss(theirs_model, batch, ref[:4], ref[4:], beta=0.3, coef=0.001)
    g_theirs = torch.autograd.grad(theirs, list(theirs_model.parameters()), allow_unused=True)
    got = {}
    tr.optimizer.register_step_pre_hook(lambda opt, a, k: got.__setitem__("g", _grads(tr.model)))
    m = tr.train_step()
    assert m["aux_loss"] == pytest.approx(trl_aux, rel=1e-6)
    assert m["loss"] == pytest.approx(float(theirs), rel=2e-5)
    for a, b in zip(got["g"], g_theirs):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=1e-3, atol=2e-6)


def test_kto_adds_coef_times_aux_over_grad_accum(tmp_path):
    """TRL's KTO adds coef × aux of the examples' forward (its KL rows run without gradients) to
    each micro-batch's loss, which its Trainer divides by the accumulation steps: the gradients
    with and without the term differ by ∇ coef × Σ_micro aux / grad_accum."""
    from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
    from rlhf_fast.trainers.reward import synthetic_preference_records
    from tests.test_reward import preference_tokenizer

    tok = preference_tokenizer()
    model = mixtral(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    recs = synthetic_preference_records(16, seed=5)
    out = {}
    for name, coef in (("on", 0.05), ("off", 0.0)):
        cfg = KTOConfig(model=TINY, output_dir=str(tmp_path / name), batch_size=2, grad_accum=2, lr=3e-3,
                        warmup_steps=0, eval_every=0, log_every=1, max_len=40, max_steps=2, device="cpu",
                        grad_clip=0.0, router_aux_loss_coef=coef)
        tr = KTOTrainer(cfg, model=copy.deepcopy(model), tokenizer=tok, train_records=recs, eval_records=[])
        rows = []
        batch_of = tr._batch
        tr._batch = lambda items, key="completion": rows.append((key, batch_of(items, key))) or rows[-1][1]
        got = {}
        tr.optimizer.register_step_pre_hook(lambda opt, a, k, got=got, tr=tr: got.__setitem__("g", _grads(tr.model)))
        out[name] = (tr.train_step(), got["g"], [b for k, b in rows if k == "completion"])
    (m_on, g_on, mains), (m_off, g_off, _) = out["on"], out["off"]
    assert "aux_loss" not in m_off and len(mains) == 2
    pol = copy.deepcopy(model).train()
    auxes = [pol(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                 position_ids=default_position_ids(b["attention_mask"]), output_router_logits=True).aux_loss
             for b in mains]
    assert m_on["aux_loss"] == pytest.approx(float(sum(auxes)) / 2, rel=1e-6)
    g_aux = torch.autograd.grad(0.05 * sum(auxes) / 2, list(pol.parameters()), allow_unused=True)
    for a, b, c in zip(g_on, g_off, g_aux):
        torch.testing.assert_close(a - b, torch.zeros_like(a) if c is None else c, rtol=1e-3, atol=1e-7)


# ----------------------------------------------------------------------------- GRPO


def test_grpo_update_adds_coef_times_aux_over_accumulation_steps(tmp_path):
    """TRL's GRPO: loss + coef × aux / current_gradient_accumulation_steps, aux the micro-batch's
    forward (its attention mask: prompt and completion); here a mini-batch of 8 in micro-batches
    of 4 (2 steps): the gradient with the term minus the one without is ∇ coef × Σ aux / 2, and
    update() logs policy/aux_loss."""
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import PPOConfig, RolloutConfig
    from tests.test_rl_learning import PROMPTS, TEXTS, make_config
    from rlhf_fast.models.tiny import train_tokenizer

    tok = train_tokenizer(TEXTS, 48)
    pol = mixtral(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    cfg = make_config(tmp_path, "grpo", steps=2, rollout=RolloutConfig(prompts_per_step=2, group_size=4,
                                                                        max_new_tokens=5),
                      ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=4, router_aux_loss_coef=0.05))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[lambda p, c: [float(len(x)) for x in c]], prompts=PROMPTS)
    assert tr.moe.enabled and tr.moe.coef == 0.05
    data, _ = tr.rollout()
    assert data.input_ids.shape[0] == 8
    tr.policy.zero_grad(set_to_none=True)
    st_on = tr.policy_backward(data)
    g_on = _grads(tr.policy)
    on = tr.moe
    tr.moe = moe_aux.RouterAux(tr.policy, 0.0)
    tr.policy.zero_grad(set_to_none=True)
    st_off = tr.policy_backward(data)
    g_off = _grads(tr.policy)
    tr.policy.zero_grad(set_to_none=True)
    assert "aux_loss" not in st_off and st_on["loss"] == pytest.approx(st_off["loss"], rel=1e-6)
    pol2 = copy.deepcopy(tr.policy)
    auxes = []
    for s in (0, 4):
        ids, am = data.input_ids[s:s + 4], data.attention_mask[s:s + 4].long()
        auxes.append(pol2(input_ids=ids, attention_mask=am, position_ids=default_position_ids(am),
                          output_router_logits=True).aux_loss)
    assert st_on["aux_loss"] == pytest.approx(float(sum(auxes)) / 2, rel=1e-6)
    g_aux = torch.autograd.grad(0.05 * sum(auxes) / 2, list(pol2.parameters()), allow_unused=True)
    for a, b, c in zip(g_on, g_off, g_aux):
        torch.testing.assert_close(a - b, torch.zeros_like(a) if c is None else c, rtol=1e-3, atol=1e-7)
    tr.moe = on
    m = tr.update(data)
    assert m["policy/aux_loss"] > 1.0


# ----------------------------------------------------------------------------- dense models, errors


def test_dense_model_unchanged_and_nonzero_coef_refused(tmp_path, sft_tok):
    from tests.test_trainer_common import untimed_metrics

    recs = synthetic_sft_records(8, seed=4)
    runs = []
    for name, kw in (("absent", {}), ("zero", dict(router_aux_loss_coef=0.0))):
        tr = SFTTrainer(SFTConfig(model=TINY, output_dir=str(tmp_path / name), lr=3e-3, warmup_steps=0, eval_every=0,
                                  log_every=1, max_len=MAX_LEN, max_steps=2, device="cpu", batch_size=4, **kw),
                        tokenizer=sft_tok, train_records=recs, eval_records=[])
        assert not tr.moe.enabled
        tr.train()
        runs.append(untimed_metrics(str(tmp_path / name)))
    assert runs[0] == runs[1] and all("aux_loss" not in r for r in runs[0])
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        SFTTrainer(SFTConfig(model=TINY, output_dir=str(tmp_path / "bad"), max_len=MAX_LEN, device="cpu",
                             router_aux_loss_coef=0.01), tokenizer=sft_tok, train_records=recs, eval_records=[])
    from rlhf_fast.models.tiny import tiny_causal_lm

    dense = tiny_causal_lm(64, hidden_size=32, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="ppo.router_aux_loss_coef"):
        moe_aux.RouterAux(dense, 0.5, "ppo.router_aux_loss_coef")
    for bad in (-0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="router_aux_loss_coef"):
            SFTConfig(router_aux_loss_coef=bad)
    # an MoE config whose modeling module has no load_balancing_loss_func: refused, not guessed
    dense.config.output_router_logits = False
    with pytest.raises(TypeError, match="load_balancing_loss_func"):
        moe_aux.RouterAux(dense, 0.5)
    assert not moe_aux.RouterAux(dense, 0.0).enabled


def test_rl_config_key():
    from rlhf_fast.trainers.rl_config import PPOConfig

    assert PPOConfig().router_aux_loss_coef is None and PPOConfig(router_aux_loss_coef=0.0).router_aux_loss_coef == 0
    with pytest.raises(ValueError, match="ppo.router_aux_loss_coef"):
        PPOConfig(router_aux_loss_coef=-1.0)
