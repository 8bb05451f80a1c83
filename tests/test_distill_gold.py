"""GOLD (TRL's experimental GOLDTrainer): on-policy distillation from a teacher with another
tokenizer through TRL's ULD loss (rlhf_fast.algorithms.uld, ``distill.use_uld_loss``).

Checks: the loss and its gradients against TRL's own ``ULDLoss`` on the same logits and labels
(merge strategies, hybrid, extended ULD, eos skipping, ragged rows) and our teacher inputs
against ``build_teacher_inputs_from_texts``; one trainer step's loss and gradients against TRL's
loss on the same batch, and micro-batching; learning towards a different-tokenizer teacher; the
refusals."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from rlhf_fast.algorithms import uld
from rlhf_fast.models.tiny import tiny_causal_lm, train_tokenizer
from rlhf_fast.trainers.distill import DistillationTrainer
from rlhf_fast.trainers.rl_config import (DistillConfig, OptimConfig, PPOConfig, RLConfig, RolloutConfig)
from tests.conftest import run_rows
from tests.test_rl_learning import PROMPTS, TEXTS

trl_gold = pytest.importorskip("trl.experimental.gold.gold_trainer")

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

# the teacher's tokenizer: other merges, another size (the student's: 48 tokens on TEXTS)
TEACHER_TEXTS = ["a b a b a b", "q: a q: b", "0 1 2 3", "x y z", "ab ba aa bb", "c d e f g h"] * 4


@pytest.fixture(scope="module")
def toks():
    return train_tokenizer(TEXTS, 48), train_tokenizer(TEACHER_TEXTS, 64)


def trl_cfg(cfg: uld.ULDSettings):
    """The GOLDConfig attributes TRL's ULDLoss reads, from our settings."""
    return SimpleNamespace(uld_crossentropy_weight=cfg.crossentropy_weight,
                           uld_distillation_weight=cfg.distillation_weight,
                           uld_student_temperature=cfg.student_temperature,
                           uld_teacher_temperature=cfg.teacher_temperature, uld_skip_student_eos=cfg.skip_student_eos,
                           uld_skip_teacher_eos=cfg.skip_teacher_eos, use_extended_uld=cfg.use_extended_uld,
                           uld_token_merge_strategy=cfg.merge_strategy, uld_use_hybrid_loss=cfg.use_hybrid_loss,
                           uld_hybrid_matched_weight=cfg.matched_weight,
                           uld_hybrid_unmatched_weight=cfg.unmatched_weight, beta=cfg.beta)


def trl_student_offsets(tok, ids, labels):
    """TRL's GOLDTrainer._maybe_add_completion_byte_offsets on a batch."""
    ns = SimpleNamespace(use_uld_loss=True, teacher_tokenizer=tok, uld_loss_fn=SimpleNamespace(use_extended_uld=True),
                         _tokenizer=tok)
    sl = {"input_ids": ids, "labels": labels}
    trl_gold.GOLDTrainer._maybe_add_completion_byte_offsets(ns, sl)
    return sl["byte_offsets"]


def student_batch(tok, prompts, answers):
    """The student's on-policy layout: prompts left-padded, answers (+ eos) right-padded, labels on
    the answers; ragged on both sides."""
    p = [tok(x)["input_ids"] for x in prompts]
    c = [tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for x in answers]
    P, R = max(map(len, p)), max(map(len, c))
    ids = torch.full((len(p), P + R), tok.pad_token_id)
    am = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (a, b) in enumerate(zip(p, c)):
        ids[i, P - len(a):P] = torch.tensor(a)
        ids[i, P:P + len(b)] = torch.tensor(b)
        am[i, P - len(a):P + len(b)] = 1
        labels[i, P:P + len(b)] = torch.tensor(b)
    return ids, am, labels


CASES = {
    "observed": dict(),
    "bayesian": dict(merge_strategy="bayesian"),
    "positional": dict(use_extended_uld=False),
    "positional-bayesian": dict(use_extended_uld=False, merge_strategy="bayesian"),
    "keep-eos": dict(skip_student_eos=False, skip_teacher_eos=False),
    "keep-teacher-eos": dict(skip_teacher_eos=False, merge_strategy="bayesian"),
    "positional-keep-eos": dict(use_extended_uld=False, skip_student_eos=False, skip_teacher_eos=False),
    "hybrid-adaptive": dict(use_hybrid_loss=True, beta=0.5),
    "hybrid-fixed-kl": dict(use_hybrid_loss=True, matched_weight=0.7, unmatched_weight=0.2, beta=0.0),
    "hybrid-reverse-bayes": dict(use_hybrid_loss=True, beta=1.0, merge_strategy="bayesian"),
    "ce-temps": dict(crossentropy_weight=0.3, distillation_weight=2.0, student_temperature=0.7,
                     teacher_temperature=1.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_uld_loss_matches_trl(toks, case):
    stok, ttok = toks
    cfg = uld.ULDSettings(**CASES[case])
    prompts = ["q:", "a b c", "0 1", "x" + stok.eos_token]  # (the teacher drops a prompt's trailing eos)
    answers = ["a b a", "ab ba", " 2 3 4", ""]  # ragged, one empty answer (its eos only)
    ids, am, labels = student_batch(stok, prompts, answers)
    p_txt, c_txt = uld.student_texts(stok, ids, am, labels)
    # our texts and teacher inputs are TRL's
    assert c_txt[0] == stok.decode(labels[0][labels[0] != -100].tolist(), skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    ours_t = uld.teacher_inputs(ttok, p_txt, c_txt, cfg.use_extended_uld)
    trl_t = trl_gold.build_teacher_inputs_from_texts(ttok, p_txt, c_txt, use_extended_uld=cfg.use_extended_uld)
    for a, b in zip(ours_t, trl_t):
        assert torch.equal(a, b.to(a.dtype))
    t_ids, t_lab, _, t_off = ours_t
    s_off = uld.student_byte_offsets(stok, ids, labels)
    assert torch.equal(s_off, trl_student_offsets(stok, ids, labels))
    g = torch.Generator().manual_seed(3)
    zs = (3 * torch.randn(ids.shape[0], ids.shape[1], len(stok) + 3, generator=g, dtype=torch.float64))
    zt = (3 * torch.randn(t_ids.shape[0], t_ids.shape[1], len(ttok) + 5, generator=g, dtype=torch.float64))
    zs1, zs2 = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    match = uld.vocabulary_match(stok, ttok) if cfg.use_hybrid_loss else None
    ours = uld.uld_loss(zs1, zt, labels, t_lab, ids, t_ids, s_off if cfg.use_extended_uld else None,
                        t_off if cfg.use_extended_uld else None, cfg, match)
    trl_fn = trl_gold.ULDLoss(trl_cfg(cfg), student_tokenizer=stok, teacher_tokenizer=ttok)
    theirs = trl_fn(zs2, zt, labels, t_lab, ids, t_ids, s_off, t_off)
    ours.backward()
    theirs.backward()
    assert float(theirs.detach()) > 0
    torch.testing.assert_close(ours, theirs.reshape(()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zs1.grad, zs2.grad, rtol=1e-12, atol=1e-12)


def test_chunked_matches_whole(toks):
    """chunked_uld_loss (heads applied a row at a time, recomputed in the backward) = uld_loss."""
    stok, ttok = toks
    cfg = uld.ULDSettings(crossentropy_weight=0.5, use_hybrid_loss=True, beta=0.5)
    ids, am, labels = student_batch(stok, ["q:", "a b c", "0 1"], ["a b a", "ab ba", " 2 3"])
    p_txt, c_txt = uld.student_texts(stok, ids, am, labels)
    t_ids, t_lab, _, t_off = uld.teacher_inputs(ttok, p_txt, c_txt)
    s_off = uld.student_byte_offsets(stok, ids, labels)
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(*ids.shape, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(*t_ids.shape, 6, generator=g, dtype=torch.float64)
    ws = torch.randn(len(stok), 8, generator=g, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(len(ttok), 6, generator=g, dtype=torch.float64)
    match = uld.vocabulary_match(stok, ttok)
    from rlhf_fast.models.lm_head import HeadTransform

    rs, ce, _, _, _ = uld.chunked_uld_loss(hs, (ws, None, HeadTransform()), ht, (wt, None, HeadTransform()), labels,
                                           t_lab, ids, t_ids, s_off, t_off, cfg, match, rows_per_chunk=2)
    n = int(labels[:, 1:].ne(-100).sum())
    ours = cfg.distillation_weight * rs / ids.shape[0] + cfg.crossentropy_weight * ce / n
    ga = torch.autograd.grad(ours, (hs, ws))
    whole = uld.uld_loss(hs @ ws.T, ht @ wt.T, labels, t_lab, ids, t_ids, s_off, t_off, cfg, match)
    gb = torch.autograd.grad(whole, (hs, ws))
    torch.testing.assert_close(ours, whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- the trainer


def make_teacher(ttok, seed=7, a_bias=None):
    t = tiny_causal_lm(len(ttok), hidden_size=48, num_layers=2, num_heads=2, seed=seed,
                       pad_token_id=ttok.pad_token_id, bos_token_id=ttok.bos_token_id,
                       eos_token_id=ttok.eos_token_id)
    if a_bias is not None:  # a teacher that says "a": a head of zeros and a bias on the token "a"
        head = torch.nn.Linear(48, len(ttok), bias=True)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[ttok.convert_tokens_to_ids("a")] = a_bias
        t.lm_head = head
    return t


def gold_trainer(tmp_path, toks, lr=5e-3, mb=8, teacher=None, distill=None, steps=2, prefix_sharing=False,
                 eval_prompts=None, **kw):
    stok, ttok = toks
    folder = tmp_path / "teacher_tok"
    if not folder.exists():
        ttok.save_pretrained(str(folder))
    pol = tiny_causal_lm(len(stok), hidden_size=32, num_layers=2, num_heads=2, seed=0,
                         pad_token_id=stok.pad_token_id, bos_token_id=stok.bos_token_id,
                         eos_token_id=stok.eos_token_id)
    d = dict(use_uld_loss=True, teacher_tokenizer=str(folder))
    d.update(distill or {})
    cfg = RLConfig(estimator="distill", steps=steps, output_dir=str(tmp_path / "run"), progress=False, sample_every=0,
                   rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=6, temperature=1.0),
                   ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=mb, prefix_sharing=prefix_sharing),
                   optim=OptimConfig(lr=lr),
                   distill=DistillConfig(**d), **kw)
    return DistillationTrainer(cfg, pol, stok, prompts=PROMPTS, eval_prompts=eval_prompts,
                               teacher_model=teacher if teacher is not None else make_teacher(ttok))


def trl_step_loss(tr, data):
    """TRL's loss on our batch: the student's logits from its transformers forward (our position
    ids, as generation used them), TRL's decoding of prompt / completion (generate_on_policy_outputs'
    lines), build_teacher_inputs_from_texts, the teacher's forward, ULDLoss."""
    stok, ttok = tr.tokenizer, tr._uld.tokenizer
    ids, am = data.input_ids, data.attention_mask.long()
    labels = torch.where(data.response_mask.bool(), ids, -100)
    P = int(data.response_mask.float().argmax(1).min())
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    prompts = [stok.decode(ids[i, :P][am[i, :P].bool()].tolist(), **kw) for i in range(ids.shape[0])]
    comps = [stok.decode(ids[i, P:][labels[i, P:] != -100].tolist(), **kw) for i in range(ids.shape[0])]
    t_ids, t_lab, t_am, t_off = trl_gold.build_teacher_inputs_from_texts(ttok, prompts, comps)
    pos = (am.cumsum(1) - 1).clamp(min=0)
    zs = tr.policy(input_ids=ids, attention_mask=am, position_ids=pos).logits
    with torch.no_grad():
        zt = tr.teacher(input_ids=t_ids, attention_mask=t_am.long()).logits
    d = tr.config.distill
    cfg = SimpleNamespace(**{k: getattr(d, k) for k in ("uld_crossentropy_weight", "uld_distillation_weight",
                                                         "uld_student_temperature", "uld_teacher_temperature",
                                                         "uld_skip_student_eos", "uld_skip_teacher_eos",
                                                         "use_extended_uld", "uld_token_merge_strategy",
                                                         "uld_use_hybrid_loss", "uld_hybrid_matched_weight",
                                                         "uld_hybrid_unmatched_weight", "beta")})
    fn = trl_gold.ULDLoss(cfg, student_tokenizer=stok, teacher_tokenizer=ttok)
    return fn(zs, zt, labels, t_lab, ids, t_ids, trl_student_offsets(stok, ids, labels), t_off)


@pytest.mark.parametrize("distill", [dict(), dict(uld_use_hybrid_loss=True, beta=0.5, uld_crossentropy_weight=0.2,
                                                  uld_token_merge_strategy="bayesian")])
def test_trainer_step_matches_trl(tmp_path, toks, distill):
    tr = gold_trainer(tmp_path, toks, distill=distill)
    torch.manual_seed(0)
    data, _ = tr.rollout()
    assert bool(data.response_mask.any())
    st = tr.policy_backward(data)
    ours = [p.grad.clone() for p in tr.policy.parameters()]
    tr.policy.zero_grad(set_to_none=True)
    theirs = trl_step_loss(tr, data)
    theirs.backward()
    assert st["loss"] == pytest.approx(float(theirs.detach()), rel=1e-5, abs=1e-7)
    for a, p in zip(ours, tr.policy.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    # micro-batches of 3 rows (a ragged last one) give the same loss and gradient
    tr.policy.zero_grad(set_to_none=True)
    st3 = tr.policy_backward(data, micro_batch_size=3)
    assert st3["loss"] == pytest.approx(st["loss"], rel=1e-5)
    for a, p in zip(ours, tr.policy.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def student_a_prob(tr, prompts):
    """The student's mean probability of the token "a" right after each prompt."""
    tok = tr.tokenizer
    a = tok.convert_tokens_to_ids("a")
    with torch.no_grad():
        ps = [torch.softmax(tr.policy(input_ids=torch.tensor([tok(p)["input_ids"]])).logits[0, -1], -1)[a]
              for p in prompts]
    return float(torch.stack(ps).mean())


def test_learns_towards_other_tokenizer_teacher(tmp_path, toks):
    """A teacher (another tokenizer) that always says "a": with the hybrid loss the student's
    probability of "a" after held-out prompts rises, and far more than under lr 1e-12."""
    held = ["b", "1 2", "x y", "d e"]
    out = {}
    for lr in (1e-2, 1e-12):
        tr = gold_trainer(tmp_path / str(lr), toks, lr=lr, steps=30, teacher=make_teacher(toks[1], a_bias=12.0),
                          distill=dict(uld_use_hybrid_loss=True, uld_hybrid_matched_weight=1.0,
                                       uld_hybrid_unmatched_weight=1.0), eval_prompts=held)
        before, loss0 = student_a_prob(tr, held), tr.evaluate()["eval/loss"]
        tr.train()
        out[lr] = (before, student_a_prob(tr, held), loss0, tr.evaluate()["eval/loss"])
    (b1, a1, l1, m1), (b0, a0, l0, m0) = out[1e-2], out[1e-12]
    assert b1 == pytest.approx(b0) and l1 == pytest.approx(l0)
    assert a0 == pytest.approx(b0, rel=1e-3) and m0 == pytest.approx(l0, rel=1e-3)
    assert a1 > 5 * b1 and a1 > 0.15, out  # measured: 0.021 -> 0.28
    assert m1 < 0.25 * l1, out  # the held-out ULD loss: 4.8 -> 0.36


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kw,key", [
    (dict(use_uld_loss=1), "distill.use_uld_loss"),
    (dict(use_uld_loss=True, use_extended_uld="yes"), "distill.use_extended_uld"),
    (dict(use_uld_loss=True, uld_token_merge_strategy="max"), "distill.uld_token_merge_strategy"),
    (dict(use_uld_loss=True, uld_crossentropy_weight=-1.0), "distill.uld_crossentropy_weight"),
    (dict(use_uld_loss=True, uld_distillation_weight=float("nan")), "distill.uld_distillation_weight"),
    (dict(use_uld_loss=True, uld_student_temperature=0.0), "distill.uld_student_temperature"),
    (dict(use_uld_loss=True, uld_teacher_temperature=-1.0), "distill.uld_teacher_temperature"),
    (dict(use_uld_loss=True, uld_skip_student_eos=None), "distill.uld_skip_student_eos"),
    (dict(use_uld_loss=True, uld_skip_teacher_eos="no"), "distill.uld_skip_teacher_eos"),
    (dict(use_uld_loss=True, uld_use_hybrid_loss=1), "distill.uld_use_hybrid_loss"),
    (dict(use_uld_loss=True, uld_use_hybrid_loss=True, uld_hybrid_matched_weight=-0.1,
          uld_hybrid_unmatched_weight=1.0), "distill.uld_hybrid_matched_weight"),
    (dict(use_uld_loss=True, uld_use_hybrid_loss=True, uld_hybrid_matched_weight=0.5),
     "distill.uld_hybrid_unmatched_weight"),
    (dict(use_uld_loss=True, teacher_tokenizer=""), "distill.teacher_tokenizer"),
    # keys of no effect
    (dict(teacher_tokenizer="tok"), "distill.teacher_tokenizer"),
    (dict(uld_skip_teacher_eos=False), "distill.uld_skip_teacher_eos"),
    (dict(use_extended_uld=False), "distill.use_extended_uld"),
    (dict(use_uld_loss=True, uld_hybrid_matched_weight=0.5, uld_hybrid_unmatched_weight=0.5),
     "distill.uld_hybrid_matched_weight"),
    (dict(use_uld_loss=True, beta=0.5), "distill.beta"),
    (dict(use_uld_loss=True, objective="iw_opd"), "distill.objective"),
    (dict(use_uld_loss=True, lmbda=0.5, seq_kd=True), "distill.seq_kd"),
])
def test_config_refusals(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        DistillConfig(**kw)


def test_trainer_refusals(tmp_path, toks):
    stok, ttok = toks
    with pytest.raises(ValueError, match=r"ppo\.prefix_sharing"):
        gold_trainer(tmp_path / "a", toks, prefix_sharing=True)
    # a teacher tokenizer larger than the teacher's head
    small = tiny_causal_lm(8, hidden_size=16, num_layers=1, num_heads=2, seed=1)
    with pytest.raises(ValueError, match=r"distill\.teacher_tokenizer"):
        gold_trainer(tmp_path / "b", toks, teacher=small)
    # a teacher folder with another tokenizer, without use_uld_loss: the message points at it
    folder = tmp_path / "teacher"
    make_teacher(ttok).save_pretrained(str(folder))
    ttok.save_pretrained(str(folder))
    pol = tiny_causal_lm(len(stok), hidden_size=32, num_layers=2, num_heads=2, seed=0)
    cfg = RLConfig(estimator="distill", steps=1, output_dir=str(tmp_path / "run_c"), progress=False,
                   rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=4),
                   ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8),
                   distill=DistillConfig(teacher=str(folder)))
    with pytest.raises(ValueError, match=r"distill\.use_uld_loss"):
        DistillationTrainer(cfg, pol, stok, prompts=PROMPTS)
    # ...and with it, the folder's own tokenizer is the teacher's (the default)
    cfg = dataclasses.replace(cfg, distill=DistillConfig(teacher=str(folder), use_uld_loss=True))
    tr = DistillationTrainer(cfg, pol, stok, prompts=PROMPTS)
    assert tr._uld.tokenizer.get_vocab() == ttok.get_vocab()
    # a tokenizer that is not ByteLevel with use_extended_uld
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wl = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wtok = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    wfolder = tmp_path / "wl"
    wtok.save_pretrained(str(wfolder))
    with pytest.raises(ValueError, match=r"distill\.use_extended_uld"):
        gold_trainer(tmp_path / "d", toks, distill=dict(teacher_tokenizer=str(wfolder)))
    # the positional ULD of a non-ByteLevel teacher runs
    tr = gold_trainer(tmp_path / "e", toks, teacher=make_teacher(wtok),
                      distill=dict(teacher_tokenizer=str(wfolder), use_extended_uld=False))
    data, _ = tr.rollout()
    assert torch.isfinite(torch.tensor(tr.policy_backward(data)["loss"]))


# ----------------------------------------------------------------------------- resume and the CLI


def test_resume_is_exact(tmp_path, toks):
    """GOLD adds no state (the teacher's tokenizer is read again from distill.teacher_tokenizer):
    2 steps, a checkpoint, 2 more = 4 straight, bit for bit."""
    def fresh(name, **kw):
        return gold_trainer(tmp_path / name, toks, steps=4, save_every=2, distill=dict(uld_crossentropy_weight=0.1),
                            **kw)

    a = fresh("a")
    a.train()
    b = fresh("b")
    b.train(steps=2)
    c = fresh("b", resume=b.config.output_dir)
    c.train()

    rows = run_rows  # metrics.jsonl without the wall-clock timings

    ra, rc = rows(a.config.output_dir), rows(c.config.output_dir)
    assert [r["step"] for r in rc] == [1, 2, 3, 4] and ra == rc
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(p, q)


def test_cli_gold_run(tmp_path, toks, capsys):
    """``rlhf-fast distill`` with a tiny teacher on another tokenizer (distill.teacher_tokenizer)."""
    import json

    from rlhf_fast.cli import main

    folder = tmp_path / "ttok"
    toks[1].save_pretrained(str(folder))
    run = str(tmp_path / "run")
    args = ["distill", "none", "--output_dir", run, "--progress", "false", "--steps", "2", "--sample_every", "0",
            "--distill.teacher", "tiny:llama", "--distill.use_uld_loss", "true", "--distill.teacher_tokenizer",
            str(folder), "--distill.uld_use_hybrid_loss", "true", "--distill.beta", "0.5",
            "--rollout.max_new_tokens", "4", "--ppo.epochs", "1"]
    assert main(args) == 0
    rows = [json.loads(ln) for ln in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for k in ("loss", "distill/divergence", "matched_loss", "unmatched_loss", "entropy"):
        assert k in rows[-1] and rows[-1][k] == rows[-1][k], k
