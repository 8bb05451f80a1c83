"""Epoch boundaries of the offline trainers (SFT, DPO, reward, PRM) against transformers'
``Trainer``: with ``grad_accum`` > 1 an optimizer step never crosses an epoch's end (the last
step of an epoch accumulates the micro-batches left, ``get_batch_samples``' remainder), so every
epoch trains each row exactly once; the step count is ceil(epochs × ceil(batches / grad_accum))
(``set_initial_training_values``) and the logged ``epoch`` is ``state.epoch`` (1.0 at the end of
the first epoch). The rows each step trains are read where every trainer takes its global batch
(``local_share``)."""

import math

import pytest
import torch

from rlhf_fast.trainers import dpo as dpo_mod
from rlhf_fast.trainers import prm as prm_mod
from rlhf_fast.trainers import reward as reward_mod
from rlhf_fast.trainers import sft as sft_mod
from rlhf_fast.trainers.reward import synthetic_preference_records

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = "tiny:llama:hidden_size=16,num_layers=1,num_heads=2,vocab_size=300"
N, BS, GA = 10, 4, 2  # 3 micro-batches an epoch (4, 4, 2): steps of 2 and 1 micro-batches


@pytest.fixture(scope="module")
def pref_tok():
    from tests.test_reward import preference_tokenizer

    return preference_tokenizer()


@pytest.fixture(scope="module")
def sft_tok():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(32) + [r.prompt + r.completion for r in sft_mod.synthetic_sft_records(16)],
                           300, padding_side="right")


@pytest.fixture(scope="module")
def prm_tok():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    recs = prm_mod.synthetic_stepwise_records(32, seed=9)
    return train_tokenizer(sample_texts(32) + [r.prompt + "\n" + "\n".join(r.completions) for r in recs], 300,
                           padding_side="right")


def _base(tmp_path, name, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), batch_size=BS, grad_accum=GA, lr=1e-3, warmup_steps=0,
                eval_every=0, log_every=1, max_steps=100, device="cpu")
    base.update(kw)
    return base


def _trainer(kind, tmp_path, toks, name="run", **kw):
    """A ``kind`` trainer over N training items, no eval split."""
    if kind == "sft":
        cfg = sft_mod.SFTConfig(**_base(tmp_path, name, max_len=48, **kw))
        return sft_mod.SFTTrainer(cfg, train_records=sft_mod.synthetic_sft_records(N), eval_records=[],
                                  tokenizer=toks["sft"])
    if kind == "dpo":
        cfg = dpo_mod.DPOConfig(**_base(tmp_path, name, max_len=64, **kw))
        return dpo_mod.DPOTrainer(cfg, train_records=synthetic_preference_records(N, seed=3), eval_records=[],
                                  tokenizer=toks["pref"])
    if kind == "reward":
        cfg = reward_mod.RewardConfig(**_base(tmp_path, name, max_len=64, **kw))
        return reward_mod.RewardTrainer(cfg, train_records=synthetic_preference_records(N, seed=3), eval_records=[],
                                        tokenizer=toks["pref"])
    cfg = prm_mod.PRMConfig(**_base(tmp_path, name, max_len=64, **kw))
    return prm_mod.PRMTrainer(cfg, train_records=prm_mod.synthetic_stepwise_records(N, seed=1), eval_records=[],
                              tokenizer=toks["prm"])


def _n_items(tr) -> int:
    return len(tr.train_rows if hasattr(tr, "train_rows") else tr.train_items)


def _record_steps(kind, tr, monkeypatch, steps):
    """Train ``steps`` optimizer steps; returns ([the global indices of each step's micro-batches], [logged epoch])."""
    mod = {"sft": sft_mod, "dpo": dpo_mod, "reward": reward_mod, "prm": prm_mod}[kind]
    seen = []
    real = mod.local_share

    def spy(idx, items, ctx):
        seen.append(list(idx))
        return real(idx, items, ctx)

    monkeypatch.setattr(mod, "local_share", spy)
    per_step, epochs = [], []
    for _ in range(steps):
        seen.clear()
        m = tr.train_step()
        per_step.append(list(seen))
        epochs.append(m["epoch"])
    return per_step, epochs


@pytest.fixture(scope="module")
def toks(pref_tok, sft_tok, prm_tok):
    return {"pref": pref_tok, "sft": sft_tok, "prm": prm_tok}


@pytest.mark.parametrize("kind", ["sft", "dpo", "reward", "prm"])
def test_each_epoch_trains_every_row_once(tmp_path, toks, monkeypatch, kind):
    """2 epochs of 10 items at 4 × 2: transformers' 2 steps an epoch (micro-batches 4 + 4, then 2),
    4 steps; each epoch's steps train a permutation of the 10 items (a new one the second epoch);
    the logged epoch is 2/3, 1, 5/3, 2."""
    tr = _trainer(kind, tmp_path, toks, num_train_epochs=2)
    assert _n_items(tr) == N
    assert tr.cfg.max_steps == 4  # ceil(2 × ceil(3 / 2))
    per_step, epochs = _record_steps(kind, tr, monkeypatch, 4)
    assert [[len(i) for i in s] for s in per_step] == [[4, 4], [2], [4, 4], [2]]
    first = [i for s in per_step[:2] for idx in s for i in idx]
    second = [i for s in per_step[2:] for idx in s for i in idx]
    assert sorted(first) == sorted(second) == list(range(N))
    assert first != second  # reshuffled each epoch (seeded by the seed and the epoch)
    assert epochs == pytest.approx([2 / 3, 1.0, 5 / 3, 2.0])


@pytest.mark.parametrize("epochs, steps", [(2.5, 5), (3, 6)])
def test_step_count_is_transformers(tmp_path, toks, epochs, steps):
    """max_steps = ceil(epochs × ceil(ceil(N / batch_size) / grad_accum)), transformers'
    ``set_initial_training_values`` (10 rows at 4 × 2: 2 steps an epoch; the old count,
    ceil(epochs × 3 / 2), gave 4 and 5)."""
    tr = _trainer("sft", tmp_path, toks, num_train_epochs=epochs)
    assert tr.cfg.max_steps == steps == math.ceil(epochs * 2)


def test_short_step_loss_is_its_own_token_mean(tmp_path, toks, monkeypatch):
    """The short last step of an epoch is normalised by the tokens it has (transformers'
    ``num_items_in_batch`` of the micro-batches it actually got): its loss equals grad_accum 1's
    loss of the same 2 rows (the same model, weights not moved: lr 1e-30)."""
    a = _trainer("sft", tmp_path, toks, "a", num_train_epochs=1, lr=1e-30)
    per_step, _ = _record_steps("sft", a, monkeypatch, 1)
    last = a.train_step()
    b = _trainer("sft", tmp_path, toks, "b", max_steps=3, grad_accum=1, lr=1e-30)
    monkeypatch.undo()
    ms = [b.train_step() for _ in range(3)]
    assert last["loss"] == pytest.approx(ms[2]["loss"], rel=1e-6)
    assert last["epoch"] == ms[2]["epoch"] == 1.0


def test_resume_at_an_epoch_end_is_exact(tmp_path, toks):
    """A 2-epoch run stopped after the first epoch's short step (step 2) and resumed equals the
    uninterrupted run: weights and the rows of each step."""
    full = _trainer("sft", tmp_path, toks, "full", num_train_epochs=2)
    full.train()
    part = _trainer("sft", tmp_path, toks, "part", num_train_epochs=2, save_every=2)
    while part.step < 2:
        part.train_step()
    part._save()
    resumed = _trainer("sft", tmp_path, toks, "part", num_train_epochs=2, save_every=2)
    resumed.train()
    assert resumed.step == full.step == 4
    assert resumed.batches.state() == full.batches.state() == {"epoch": 1, "pos": N}
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_kto_short_step_moe_term_over_its_micro_batches(tmp_path, pref_tok):
    """KTO's last step of an epoch (6 examples at 2 × 2: steps of 4 and 2 examples) has one
    micro-batch; TRL divides that step's loss, the MoE term coef × aux included, by the
    micro-batches it has (``current_gradient_accumulation_steps`` = 1), not by grad_accum 2:
    with both runs at the same weights before step 2, the gradients with and without the term
    differ by ∇ coef × aux of that micro-batch."""
    import copy

    from rlhf_fast.models.logprobs import default_position_ids
    from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
    from tests.test_moe_aux_loss import _grads, mixtral

    model = mixtral(len(pref_tok), pad_token_id=pref_tok.pad_token_id, eos_token_id=pref_tok.eos_token_id)
    recs = synthetic_preference_records(3, seed=5)  # 6 examples
    trs, got, rows = {}, {}, {}
    for name, coef in (("on", 0.05), ("off", 0.0)):
        cfg = KTOConfig(model="tiny:llama", output_dir=str(tmp_path / name), batch_size=2, grad_accum=2, lr=3e-3,
                        warmup_steps=0, eval_every=0, log_every=1, max_len=40, max_steps=2, device="cpu",
                        grad_clip=0.0, router_aux_loss_coef=coef)
        tr = trs[name] = KTOTrainer(cfg, model=copy.deepcopy(model), tokenizer=pref_tok, train_records=recs,
                                    eval_records=[])
        assert len(tr.train_items) == 6
        tr.train_step()
        rows[name] = []
        batch_of = tr._batch
        tr._batch = (lambda items, key="completion", r=rows[name], f=batch_of:
                     r.append((key, f(items, key))) or r[-1][1])
        tr.optimizer.register_step_pre_hook(lambda opt, a, k, n=name, tr=tr: got.__setitem__(n, _grads(tr.model)))
    trs["off"].model.load_state_dict(trs["on"].model.state_dict())  # the same weights before step 2
    pol = copy.deepcopy(trs["on"].model).train()
    m_on, _ = trs["on"].train_step(), trs["off"].train_step()
    mains = [b for k, b in rows["on"] if k == "completion"]
    assert len(mains) == 1 and m_on["epoch"] == 1.0
    b = mains[0]
    aux = pol(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
              position_ids=default_position_ids(b["attention_mask"]), output_router_logits=True).aux_loss
    g_aux = torch.autograd.grad(0.05 * aux, list(pol.parameters()), allow_unused=True)
    for a, o, c in zip(got["on"], got["off"], g_aux):
        torch.testing.assert_close(a - o, torch.zeros_like(a) if c is None else c, rtol=1e-3, atol=1e-7)
