"""Review of padding-free packing, prefix sharing, SFT packing and BEMA
(rlhf_fast/trainers/packing.py, the packed paths of rlhf_fast/models/logprobs.py and
llama_forward.py, rlhf_fast/trainers/sft.py's packing, rlhf_fast/trainers/bema.py).

- ``packed_target_states`` / ``pack_shared_targets`` given a target no state predicts (a row's first
  token) took, under ``prefix_sharing``, packed index -1 for it (the padding before it): a crash in
  the shared-prefix attention, where the padding-free row drops such targets; and a token after a
  hole was predicted from the hole, where the padding-free row reads through it.
- SFT ``pad_to_multiple_of`` was refused with ``packing_strategy: wrapped``, whose chunks are
  ordinary padded rows (TRL pads them to the multiple).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.models import logprobs as L  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
V = 64


def _llama(seed=0):
    """A tiny random LlamaForCausalLM (eval mode, fp32, sdpa), every weight random."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     pad_token_id=0)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _pairs():
    """Two pairs (rows i and i + 2) sharing a prompt: the second pair left-padded, one of its rows
    with a hole (a padding token inside), the first right-padded: ids, attention mask ``[4, 9]``."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 0, 0],
                        [0, 0, 20, 21, 22, 0, 24, 25, 26],
                        [5, 6, 7, 30, 31, 0, 0, 0, 0],
                        [0, 0, 20, 21, 22, 40, 41, 42, 43]])
    return ids, (ids != 0).long()


def _previous_attended(am):
    """``[B, T]`` the column of each position's previous attended token in its row (-1: none)."""
    cols = torch.arange(am.shape[1]).expand_as(am)
    last = torch.where(am.bool(), cols, -1).cummax(1).values
    return torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], 1)


def test_packed_target_states_agree_on_targets_the_caller_did_not_filter():
    """Every attended token as a target, unfiltered (ORPO-style rows): a row's first token has no
    state that predicts it, and the token after a hole is predicted by the one before the hole (the
    packed rows read through holes; position ids count attended tokens). The padding-free row did
    so; the shared-prefix row took packed index -1 (the padding before the target) for a row's
    first token — a crash or another token's state — and must give the same targets, labels and
    states, each the padded forward's state of the previous attended token."""
    from rlhf_fast.trainers.packing import packed_target_states

    m = _llama()
    ids, am = _pairs()
    target = am.bool()
    with torch.no_grad():
        h0, y0, r0, c0 = packed_target_states(m, ids, am, target)
        h1, y1, r1, c1 = packed_target_states(m, ids, am, target, prefix_sharing=True)
        full = L.hidden_states(m, ids, am)  # [B, T, H] the padded forward (positions count attended tokens)
    prev = _previous_attended(am)
    want = target & (prev >= 0)
    assert torch.equal(torch.stack([r0, c0]), torch.stack(want.nonzero(as_tuple=True)))
    assert torch.equal(torch.stack([r1, c1]), torch.stack([r0, c0]))
    assert torch.equal(y1, y0) and torch.equal(y0, ids[r0, c0])
    torch.testing.assert_close(h0, full[r0, prev[r0, c0]], atol=2e-6, rtol=0)
    torch.testing.assert_close(h1, full[r1, prev[r1, c1]], atol=2e-6, rtol=0)


# ------------------------------------------------------------------ SFT pad_to_multiple_of with wrapped


@pytest.fixture(scope="module")
def sft_tok():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer
    from rlhf_fast.trainers.sft import synthetic_sft_records

    texts = sample_texts(64) + [r.prompt + r.completion for r in synthetic_sft_records(64)]
    return train_tokenizer(texts, 300, padding_side="right")


def test_wrapped_packing_takes_pad_to_multiple_of_as_trl(tmp_path, sft_tok):
    """``packing_strategy: wrapped`` chunks train as ordinary right-padded rows (the last chunk of a
    block is shorter), and TRL's collator pads them to ``pad_to_multiple_of`` (padding_free is off
    for wrapped): the config is accepted, every batch's width is a multiple, the ids equal TRL's
    collator's on the same chunks, and the step's metrics are the unrounded run's."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records

    def make(name, **kw):
        cfg = SFTConfig(model="tiny:llama:hidden_size=32,num_layers=1,num_heads=2",
                        output_dir=str(tmp_path / name), batch_size=3, max_len=20, max_steps=2,
                        warmup_steps=0, eval_every=0, log_every=1, device="cpu", packing=True,
                        packing_strategy="wrapped", **kw)
        return SFTTrainer(cfg, train_records=synthetic_sft_records(7), eval_records=[], tokenizer=sft_tok)

    tr = make("rounded", pad_to_multiple_of=8)
    rows = tr.train_rows
    assert len({len(r["input_ids"]) for r in rows}) > 1  # a short last chunk: padding to round
    idx = list(range(len(rows)))
    ours = tr._local_batch(idx, rows)
    theirs = DataCollatorForLanguageModeling(pad_token_id=tr.pad_id, pad_to_multiple_of=8)(
        [{"input_ids": r["input_ids"], "completion_mask": r["response_mask"]} for r in rows])
    assert ours["input_ids"].shape[1] % 8 == 0
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    a, b = make("plain").train(), tr.train()
    for k in ("loss", "grad_norm"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), k


# ------------------------------------------------------------------ packed rows never leak across sequences

_LEAK_CASES = {  # families / settings the main suite packs through transformers' forward only here
    "falcon_alibi": ("falcon", dict(alibi=True)),  # ALiBi biases from absolute key positions of the row
    "mistral_window": ("mistral", dict(sliding_window=4)),  # sequences past the window: transformers' forward
    "qwen2_window_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
}


@pytest.mark.parametrize("case", sorted(_LEAK_CASES))
def test_packed_row_equals_each_sequence_alone(case):
    """``packed=True`` (SFT packing, DPO padding_free) on families whose attention has ALiBi or a
    sliding window shorter than the sequences: log-probs and gradients equal those of each sequence
    run alone (no padding, no neighbour), rows of 1, 3, 9 and 12 tokens, left and right padded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fam, kw = _LEAK_CASES[case]
    cfg = AutoConfig.for_model(fam, vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids = torch.randint(3, V, (4, 12), generator=torch.Generator().manual_seed(2))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    am[2, -9:] = 0
    am[3, :11] = 0
    params = [p for p in m.parameters() if p.requires_grad]
    packed = L.sequence_logprobs(m, ids, am, packed=True)
    g_packed = torch.autograd.grad(packed.sum(), params, allow_unused=True)
    alone = torch.zeros_like(packed)
    total = None
    for i in range(ids.shape[0]):
        cols = am[i].bool().nonzero()[:, 0]
        lp = L.sequence_logprobs(m, ids[i:i + 1, cols], None)[0]
        alone[i, cols] = lp
        total = lp.sum() if total is None else total + lp.sum()
    g_alone = torch.autograd.grad(total, params, allow_unused=True)
    torch.testing.assert_close(packed, alone, atol=2e-6, rtol=0)
    for a, b in zip(g_packed, g_alone):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
