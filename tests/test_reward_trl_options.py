"""Reward trainer options that TRL's RewardTrainer has: ``lora`` (fresh SEQ_CLS adapters, the score
head trained whole, as TRL's ``peft_config``; a peft model passed in keeps its own; ``final/`` the
merged model), ``center_rewards_coefficient`` (against TRL's own ``compute_loss``),
``disable_dropout`` and ``num_train_epochs`` (step count, exact resume)."""

import os

import pytest
import torch

from rlhf_fast.feedback.formats import PairRecord, RankingRecord, pad_right
from rlhf_fast.models.loading import load_reward_model, reward_scores
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records

from tests.test_reward import TINY, preference_tokenizer
from tests.test_trainer_common import assert_resumes_exactly

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _cfg(tmp_path, name, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), batch_size=8, lr=3e-2, warmup_steps=1, eval_every=0,
                log_every=1, max_len=48)
    base.update(kw)
    return RewardConfig(**base)


def _tiny_rm(tok, **kw):
    from rlhf_fast.models.tiny import tiny_reward_model

    return tiny_reward_model(len(tok), hidden_size=32, num_layers=1, num_heads=2, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **kw)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------ lora


def test_lora_config_values():
    from rlhf_fast.trainers.config import load_config

    assert load_config(RewardConfig, None, ["--lora.r", "4", "--lora.lora_alpha", "8"]).lora == {"r": 4, "lora_alpha": 8}
    with pytest.raises(ValueError, match="lora must be null or a mapping"):
        RewardConfig(lora=[4])
    with pytest.raises(ValueError, match="lora.task_type must be 'SEQ_CLS'"):
        RewardConfig(lora={"task_type": "CAUSAL_LM"})


def test_lora_matches_trl_trainables_freezes_the_base_resumes_and_saves_a_loadable_model(tmp_path, tok):
    """``lora``: the trainable parameters are exactly those of TRL's RewardTrainer given
    ``peft_config=LoraConfig(task_type="SEQ_CLS", ...)`` (the adapters and the whole score head);
    the base stays, the adapters and the head move and the training loss falls; a run stopped at step 2 and resumed equals
    an uninterrupted one (weights and log); final/ holds the merged model, which the RL trainer's
    and ``rlhf-fast eval``'s loader reads as a reward model and which scores as the trained one."""
    trl = pytest.importorskip("trl")
    import datasets
    import peft

    from rlhf_fast.models.loading import check_model_folder

    recs = synthetic_preference_records(24, seed=1)
    held = synthetic_preference_records(6, seed=2)
    lora = {"r": 4, "lora_alpha": 8}

    def trainer(name, max_steps=4):
        c = _cfg(tmp_path, name, max_steps=max_steps, save_every=2, lora=dict(lora))
        return RewardTrainer(c, model=_tiny_rm(tok), tokenizer=tok, train_records=recs, eval_records=held)

    fresh = trainer("fresh")
    init = _params(fresh.model)
    ours = sorted(n for n, p in fresh.model.named_parameters() if p.requires_grad)
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, save_strategy="no")
    ds = datasets.Dataset.from_list([{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in recs[:2]])
    ref = trl.RewardTrainer(model=_tiny_rm(tok), args=args, train_dataset=ds, processing_class=tok,
                            peft_config=peft.LoraConfig(task_type="SEQ_CLS", target_modules="all-linear", **lora))
    assert ours == sorted(n for n, p in ref.model.named_parameters() if p.requires_grad)
    assert any("score.modules_to_save" in n for n in ours) and all("lora_" in n or "modules_to_save" in n for n in ours)

    full = trainer("full")
    out = full.train()
    moved = []
    for n, p in full.model.named_parameters():
        if p.requires_grad:
            moved += [n] if not torch.equal(p, init[n]) else []
        else:
            assert torch.equal(p, init[n]), n  # the base (and the head's original copy) is frozen
    assert any("lora_B" in n for n in moved) and any("score.modules_to_save" in n for n in moved), moved
    # it learns: the loss on its training pairs falls (4 steps are too few for the held-out ones)
    assert full.evaluate(full.train_items)["eval_loss"] < fresh.evaluate(fresh.train_items)["eval_loss"] - 0.03
    assert "eval_accuracy" in out

    assert assert_resumes_exactly(trainer, full, 2).step == 4

    final = str(tmp_path / "full" / "final")
    assert not os.path.exists(os.path.join(final, "adapter_config.json"))
    check_model_folder(final, "reward.reward_model", tokenizer=True, reward=True)  # as rl.py checks it
    rm = load_reward_model(final)  # as rl.py and evaluate.py load it
    assert not any("lora_" in n for n, _ in rm.named_parameters())
    seqs = [it["seqs"][k] for it in full.eval_items for k in (0, 1)]
    ids, attn = pad_right(seqs, tok.pad_token_id)
    full.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(rm, ids, attn), reward_scores(full.model, ids, attn),
                                   rtol=1e-5, atol=1e-5)


def test_a_peft_model_keeps_its_adapters(tmp_path, tok):
    """A peft model passed as ``model`` trains its own adapters (nothing added), its final/ is the
    merged model; ``lora`` with a peft model is refused."""
    import peft

    recs = synthetic_preference_records(16, seed=3)

    def peft_rm():
        return peft.get_peft_model(_tiny_rm(tok), peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                                   target_modules=["q_proj", "v_proj"]))

    model = peft_rm()
    want = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    tr = RewardTrainer(_cfg(tmp_path, "own", max_steps=2), model=model, tokenizer=tok, train_records=recs,
                       eval_records=[])
    assert tr.model is model and sorted(n for n, p in tr.model.named_parameters() if p.requires_grad) == want
    assert all("q_proj" in n or "v_proj" in n or "score" in n for n in want)
    tr.train()
    rm = load_reward_model(str(tmp_path / "own" / "final"))
    ids, attn = pad_right([tr.train_items[0]["seqs"][0], tr.train_items[1]["seqs"][1]], tok.pad_token_id)
    tr.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(rm, ids, attn), reward_scores(tr.model, ids, attn),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already carries a peft adapter"):
        RewardTrainer(_cfg(tmp_path, "both", lora={}), model=peft_rm(), tokenizer=tok, train_records=recs)


# ------------------------------------------------------------------------ center_rewards_coefficient


def test_center_rewards_matches_trl_compute_loss(tmp_path, tok):
    """Pairs with margins: our loss (BT + c·mean((r_c + r_r)²)) and its gradient equal TRL's
    ``RewardTrainer.compute_loss`` on the same model and batch, with c = 0.3 and with None."""
    trl = pytest.importorskip("trl")
    import datasets

    recs = synthetic_preference_records(6, seed=4)
    for i, r in enumerate(recs):
        r.margin = 0.25 * i
    ds = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    for coef in (0.3, None):
        tr = RewardTrainer(_cfg(tmp_path, f"c{coef}", center_rewards_coefficient=coef), model=_tiny_rm(tok),
                           tokenizer=tok, train_records=recs, eval_records=[])
        args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, save_strategy="no",
                                center_rewards_coefficient=coef)
        ref = trl.RewardTrainer(model=tr.model, args=args, train_dataset=ds, processing_class=tok)
        assert ref.model is tr.model
        items = tr.train_items
        tr.model.train()
        ours = tr.loss(items)
        ours.backward()
        g_ours = {n: p.grad.clone() for n, p in tr.model.named_parameters()}
        tr.model.zero_grad(set_to_none=True)
        # TRL's batch: every chosen row, then every rejected row
        ids, attn = pad_right([it["seqs"][0] for it in items] + [it["seqs"][1] for it in items], tok.pad_token_id)
        margin = torch.tensor([it["margin"] for it in items])
        theirs = ref.compute_loss(tr.model, {"input_ids": ids, "attention_mask": attn, "margin": margin})
        theirs.backward()
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)
        for n, p in tr.model.named_parameters():
            torch.testing.assert_close(g_ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
        if coef is not None:
            with torch.no_grad():
                s = torch.stack(tr._scores(items))
            assert float(coef * ((s[:, 0] + s[:, 1]) ** 2).mean()) > 1e-3  # the term is not negligible here


def test_center_rewards_weights_rankings_and_config(tmp_path, tok):
    """Annotator weights weigh the centring term as the BT term (so a batch's loss is the
    weight-share sum of its halves' losses, as micro-batches and ranks combine); rankings add
    c·(2·mean score)² per item (the pairs term for K = 2); scores and bad values are refused."""
    recs = [PairRecord(r.prompt, r.chosen, r.rejected, annotator=a)
            for r, a in zip(synthetic_preference_records(8, seed=5), "uvuvvuvu")]
    tr = RewardTrainer(_cfg(tmp_path, "w", center_rewards_coefficient=0.5, annotator_weights={"u": 1.0, "v": 3.0}),
                       model=_tiny_rm(tok), tokenizer=tok, train_records=recs, eval_records=[])
    items = tr.train_items
    with torch.no_grad():
        w = torch.tensor([it["weight"] for it in items])
        whole = tr.loss(items)
        halves = sum(tr.loss(items[k:k + 4]) * (w[k:k + 4].sum() / w.sum()) for k in (0, 4))
        torch.testing.assert_close(whole, halves, rtol=1e-6, atol=1e-6)
        s = torch.stack(tr._scores(items))
        plain = tr.loss(items) - 0.5 * ((w * (s[:, 0] + s[:, 1]) ** 2).sum() / w.sum())
        tr.cfg.center_rewards_coefficient = None
        torch.testing.assert_close(plain, tr.loss(items), rtol=1e-6, atol=1e-6)

    ranks = [RankingRecord("rank: a", ["x good", "y", "z z"], [0, 2, 1]),
             RankingRecord("rank: b", ["good one", "two"], [0, 1])]
    tr = RewardTrainer(_cfg(tmp_path, "r", data_kind="rankings", center_rewards_coefficient=0.2),
                       model=_tiny_rm(tok), tokenizer=tok, train_records=ranks, eval_records=[])
    with torch.no_grad():
        scores = tr._scores(tr.train_items)
        with_c = tr.loss(tr.train_items, scores)
        tr.cfg.center_rewards_coefficient = None
        term = 0.2 * sum((2 * s.mean()) ** 2 for s in scores) / len(scores)
        torch.testing.assert_close(with_c - tr.loss(tr.train_items, scores), term, rtol=1e-5, atol=1e-7)
        # K = 2: exactly the pairs term
        assert float((2 * scores[1].mean()) ** 2) == pytest.approx(float((scores[1][0] + scores[1][1]) ** 2), rel=1e-6)

    for kw, needle in ((dict(center_rewards_coefficient=-0.1), "center_rewards_coefficient must be a finite number"),
                       (dict(center_rewards_coefficient=float("nan")), "center_rewards_coefficient"),
                       (dict(center_rewards_coefficient=0.1, data_kind="scores"), "center_rewards_coefficient must be null"),
                       (dict(num_train_epochs=0), "num_train_epochs"), (dict(disable_dropout="no"), "disable_dropout")):
        with pytest.raises(ValueError, match=needle):
            _cfg(tmp_path, "x", **kw)
    assert _cfg(tmp_path, "x", data_kind="scores").center_rewards_coefficient is None


# ------------------------------------------------------------------------------------ dropout, epochs


def _gpt2_rm_with_dropout(tok, p=0.3):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64, resid_pdrop=p, embd_pdrop=p,
                     attn_pdrop=p, num_labels=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(cfg)


def test_disable_dropout(tmp_path, tok):
    """With dropout in the model (GPT-2's, and LoRA's), ``disable_dropout`` (the default) makes
    two train-mode forwards equal; off, they differ. The tiny Llama has no dropout, so runs of
    the default model are the same either way."""
    from rlhf_fast.trainers.common import disable_dropout

    recs = synthetic_preference_records(8, seed=6)
    for off in (True, False):
        tr = RewardTrainer(_cfg(tmp_path, f"d{off}", disable_dropout=off, lora={"lora_dropout": 0.5}),
                           model=_gpt2_rm_with_dropout(tok), tokenizer=tok, train_records=recs, eval_records=[])
        tr.model.train()
        with torch.no_grad():
            a, b = (torch.stack(tr._scores(tr.train_items)) for _ in range(2))
        assert torch.equal(a, b) == off
        drops = [m.p for m in tr.model.modules() if isinstance(m, torch.nn.Dropout)]
        assert drops and all((p == 0) == off for p in drops)

    assert disable_dropout(_tiny_rm(tok)) == 0
    losses = []
    for off in (True, False):
        tr = RewardTrainer(_cfg(tmp_path, f"t{off}", disable_dropout=off, max_steps=2), tokenizer=tok,
                           train_records=recs, eval_records=[])
        losses.append([tr.train_step()["loss"] for _ in range(2)])
    assert losses[0] == losses[1]


def test_num_train_epochs_counts_steps_and_resumes_exactly(tmp_path, tok):
    """1.25 epochs of 16 pairs in batches of 8 is ceil(20 / 8) = 3 steps (whatever max_steps
    says), logged one by one, the LR schedule spanning them; with grad_accum 2, ceil(20 / 16) = 2.
    A run stopped at step 2 and resumed equals the uninterrupted one."""
    recs = synthetic_preference_records(16, seed=7)

    def trainer(name, **kw):
        c = _cfg(tmp_path, name, num_train_epochs=1.25, max_steps=50, save_every=2, lr_schedule="linear", **kw)
        return RewardTrainer(c, tokenizer=tok, train_records=recs, eval_records=[])

    full = trainer("full")
    assert full.cfg.max_steps == 3
    full.train()
    log = read_metrics(str(tmp_path / "full"))
    assert [r["step"] for r in log] == [1, 2, 3] and full.scheduler.get_last_lr()[0] == 0.0  # the decay ends at 3
    assert log[-1]["lr"] > 0  # the LR step 3 trained with (logged before the scheduler's step)
    assert full.batches.state() == {"epoch": 1, "pos": 8}
    assert trainer("ga", grad_accum=2).cfg.max_steps == 2

    assert_resumes_exactly(trainer, full, 2)
