"""SFT semantics against what TRL's SFTTrainer / OpenRLHF's SFT compute: the loss equals
torch's cross-entropy on completion labels, one optimizer step does not depend on the
micro-batch split (gradients, clipping, update), eval loss is token-weighted, the LR schedule
counts optimizer steps, weight decay skips biases and norm gains, eos handling, and LoRA."""

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast.feedback.formats import SFTRecord
from rlhf_fast.models.logprobs import sequence_logprobs
from rlhf_fast.trainers.common import decay_param_groups, lr_lambda
from rlhf_fast.trainers.sft import (SFTConfig, SFTTrainer, collate, completion_nll_sum,
                                    synthetic_sft_records, tokenize_sft)

from .test_sft import TINY, tok  # noqa: F401  (the SFT tests' tiny model spec and tokenizer fixture)

# tiny models: one thread is far faster than two on a shared, oversubscribed CPU
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _cfg(tmp_path, name, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), max_steps=4, batch_size=8, lr=3e-3, warmup_steps=0,
                eval_every=0, log_every=1, max_len=48, device="cpu")  # fp32: exact comparisons
    base.update(kw)
    return SFTConfig(**base)


def _ce_labels(batch):
    labels = batch["input_ids"].clone()
    labels[(batch["response_mask"] == 0) | (batch["attention_mask"] == 0)] = -100
    return labels


@pytest.mark.parametrize("packed", [False, True])
def test_loss_equals_torch_cross_entropy(tmp_path, tok, packed):
    """sum / count of the fused path == F.cross_entropy(shifted logits, labels with the prompt
    and padding at -100), the loss TRL computes with completion_only_loss."""
    tr = SFTTrainer(_cfg(tmp_path, "ce"), train_records=synthetic_sft_records(16), eval_records=[], tokenizer=tok)
    batch = collate(tr.train_rows[:6], tr.pad_id)
    assert len({len(r["input_ids"]) for r in tr.train_rows[:6]}) > 1  # padding is present
    s, n = completion_nll_sum(tr.model, batch, packed=packed)
    logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = _ce_labels(batch)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert int(n) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(s / n, ce, rtol=1e-5, atol=1e-6)
    # gradients agree too
    g_fused = torch.autograd.grad(s / n, list(tr.model.parameters()))
    logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    g_ce = torch.autograd.grad(ce, list(tr.model.parameters()))
    for a, b in zip(g_fused, g_ce):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Seems like")
@pytest.mark.parametrize("packing", [False, True])
def test_one_step_micro_batch_one_equals_whole_batch(tmp_path, tok, packing):
    """batch 8 in one micro-batch vs 8 micro-batches of 1 row: the accumulated gradient, its
    norm, the clipped update and the logged loss agree (the rows have different numbers of
    completion tokens, so a mean of per-micro-batch means would differ)."""
    recs = synthetic_sft_records(8, seed=3)
    out = {}
    for name, kw in (("whole", dict(batch_size=8, grad_accum=1)), ("micro1", dict(batch_size=1, grad_accum=8))):
        # grad_clip small enough to clip: clipping must act on the accumulated gradient
        tr = SFTTrainer(_cfg(tmp_path, f"{name}{packing}", grad_clip=0.05, packing=packing, **kw),
                        train_records=recs, eval_records=[], tokenizer=tok)
        counts = {sum(r["response_mask"]) for r in tr.train_rows}
        assert len(counts) > 1
        seen = {}
        real_step = tr.optimizer.step

        def step(real_step=real_step, seen=seen, tr=tr):
            seen["grads"] = [p.grad.detach().clone() for p in tr.model.parameters()]
            return real_step()

        tr.optimizer.step = step
        m = tr.train_step()
        out[name] = (m, seen["grads"], [p.detach().clone() for p in tr.model.parameters()])
    (m1, g1, p1), (m2, g2, p2) = out["whole"], out["micro1"]
    assert m1["tokens"] == m2["tokens"]
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    assert m1["grad_norm"] > 0.05  # clipping was active
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in g1))
    assert float(total) == pytest.approx(0.05, rel=1e-4)  # the optimizer saw the clipped accumulated gradient
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_eval_loss_is_token_weighted_and_batch_size_free(tmp_path, tok):
    recs = synthetic_sft_records(24, seed=5)
    tr = SFTTrainer(_cfg(tmp_path, "ev"), train_records=recs[:8], eval_records=recs[8:], tokenizer=tok)
    ref = tr.evaluate()
    # the oracle: one cross-entropy over every eval completion token
    batch = collate(tr.eval_rows, tr.pad_id)
    with torch.no_grad():
        logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = _ce_labels(batch)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert ref["eval_tokens"] == int((labels[:, 1:] != -100).sum())
    assert ref["eval_loss"] == pytest.approx(float(ce), rel=1e-5)
    for bs in (1, 3, 16):
        tr.cfg.batch_size = bs
        got = tr.evaluate()
        assert got["eval_tokens"] == ref["eval_tokens"]
        assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6)
        assert got["eval_ppl"] == pytest.approx(ref["eval_ppl"], rel=1e-5)


@pytest.mark.filterwarnings("ignore:Seems like")
def test_lr_schedule_counts_optimizer_steps_under_grad_accum(tmp_path, tok):
    cfg = _cfg(tmp_path, "lr", batch_size=2, grad_accum=4, warmup_steps=2, lr_schedule="linear", max_steps=5,
               lr=1e-3)
    tr = SFTTrainer(cfg, train_records=synthetic_sft_records(16), eval_records=[], tokenizer=tok)
    used = []
    real_step = tr.optimizer.step

    def step():
        used.append(tr.optimizer.param_groups[0]["lr"])
        return real_step()

    tr.optimizer.step = step
    for _ in range(5):
        tr.train_step()
    expected = [1e-3 * lr_lambda(s, warmup_steps=2, total_steps=5, kind="linear") for s in range(5)]
    assert used == pytest.approx(expected)
    assert used[0] > 0 and used[1] == pytest.approx(1e-3)  # warm-up reaches the peak after warmup_steps updates


def test_weight_decay_skips_biases_and_norm_gains(tmp_path, tok):
    """With zero gradients an AdamW step only decays: matrices shrink by lr·wd, norm gains
    (RMSNorm weights, init 1) and biases stay."""
    from rlhf_fast.models.tiny import tiny_causal_lm

    model = tiny_causal_lm(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                           bos_token_id=tok.bos_token_id, hidden_size=32, num_layers=1, num_heads=2)
    bias = torch.nn.Parameter(torch.ones(32))
    model.model.layers[0].mlp.register_parameter("extra_bias", bias)  # a 1-D bias as GPT-2-style models have
    tr = SFTTrainer(_cfg(tmp_path, "wd", weight_decay=0.5, lr=0.1), model=model, tokenizer=tok,
                    train_records=synthetic_sft_records(8), eval_records=[])
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    for p in tr.model.parameters():
        p.grad = torch.zeros_like(p)
    tr.optimizer.step()
    norms = [n for n in before if "norm" in n]
    assert norms and "model.layers.0.mlp.extra_bias" in before
    for n, p in tr.model.named_parameters():
        if p.dim() < 2:
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5)), n
    # weight_decay 0: one group, every trainable parameter
    groups = decay_param_groups(list(tr.model.parameters()), 0.0)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(tr.model.parameters()))


def test_eos_appended_once_trained_and_counted_when_pad_is_eos(tok):
    recs = [SFTRecord("repeat: red cat\n", "red cat"), SFTRecord("repeat: red cat\n", "red cat" + tok.eos_token)]
    rows, _ = tokenize_sft(recs, tok, 48)
    assert rows[0] == rows[1]  # an eos already in the text is not doubled
    ids, mask = rows[0]["input_ids"], rows[0]["response_mask"]
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1 and mask[-1] == 1
    # pad id == eos id (a common setting): the real eos still counts, the padding does not
    short = tokenize_sft([SFTRecord("repeat: red\n", "red")], tok, 48)[0]
    batch = collate(rows[:1] + short, tok.eos_token_id)
    labels = _ce_labels(batch)
    assert int((labels[:, 1:] != -100).sum()) == sum(rows[0]["response_mask"]) + sum(short[0]["response_mask"])
    assert labels[0, len(ids) - 1] == tok.eos_token_id
    # truncation keeps the prompt and the start of the completion (keep_start); eos is cut with it
    p_len = mask.index(1)
    cut = tokenize_sft(recs[:1], tok, p_len + 2)[0][0]
    assert cut["input_ids"] == ids[:p_len + 2] and cut["response_mask"] == [0] * p_len + [1, 1]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_trains_adapters_only_and_saves_the_adapter(tmp_path, tok):
    peft = pytest.importorskip("peft")
    from rlhf_fast.models.tiny import tiny_causal_lm

    base = tiny_causal_lm(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id, hidden_size=32, num_layers=1, num_heads=2)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    cfg = _cfg(tmp_path, "lora", max_steps=3, lr=3e-2, weight_decay=0.1)
    tr = SFTTrainer(cfg, model=model, tokenizer=tok, train_records=synthetic_sft_records(16), eval_records=[])
    trainable = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert trainable == {id(p) for n, p in tr.model.named_parameters() if "lora_" in n}
    tr.train()
    for k, v in tr.model.get_base_model().state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k.replace("base_layer.", "")]), k
    # the adapters moved (lora_B starts at 0) and the fused loss still equals cross-entropy through them
    assert any(float(p.detach().abs().max()) > 0 for n, p in tr.model.named_parameters() if "lora_B" in n)
    batch = collate(tr.train_rows[:4], tr.pad_id)
    with torch.no_grad():
        s, n = completion_nll_sum(tr.model, batch)
        logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = _ce_labels(batch)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(s / n, ce, rtol=1e-5, atol=1e-6)
    # final/ holds the adapter, which loads back onto a fresh base to the same log-probs
    final = tmp_path / "lora" / "final"
    assert (final / "adapter_config.json").is_file()
    fresh = tiny_causal_lm(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                           bos_token_id=tok.bos_token_id, hidden_size=32, num_layers=1, num_heads=2)
    fresh.load_state_dict(frozen)
    loaded = peft.PeftModel.from_pretrained(fresh, str(final))
    with torch.no_grad():
        a = sequence_logprobs(tr.model, batch["input_ids"], batch["attention_mask"], response_mask=batch["response_mask"])
        b = sequence_logprobs(loaded, batch["input_ids"], batch["attention_mask"], response_mask=batch["response_mask"])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_every_trainers_optimizer_skips_biases_and_norm_gains():
    # every trainer's AdamW (make_adamw: fused on plain CPU / CUDA tensors) takes SFT's groups
    from rlhf_fast.trainers.common import make_adamw

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = make_adamw(list(model.parameters()), 1e-3, 0.1)
    by_wd = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    assert by_wd == {0.1: 16, 0.0: 4 + 4 + 4} and opt.defaults["fused"]
    assert len(make_adamw(list(model.parameters()), 1e-3, 0.0).param_groups) == 1


def test_a_bf16_model_folder_trains_with_float32_weights(tmp_path):
    # transformers 5 loads a folder in its saved dtype; the SFT / reward trainers keep float32
    # master weights (bf16 only as autocast), so AdamW never updates bf16 weights directly
    from rlhf_fast.models.tiny import sample_texts, tiny_causal_lm, train_tokenizer
    from rlhf_fast.trainers.common import load_causal_lm

    tok = train_tokenizer(sample_texts(16), 300)
    tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2).to(torch.bfloat16).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    for kind in ("causal", "reward"):
        model, _ = load_causal_lm(str(tmp_path), kind=kind)
        assert {p.dtype for p in model.parameters()} == {torch.float32}, kind
