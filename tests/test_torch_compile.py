"""transformers' ``torch_compile`` / ``torch_compile_backend`` / ``torch_compile_mode`` in the
offline trainers (rlhf_fast.trainers.compile): the keys and their checks (transformers'
``TrainingArguments`` rules: a backend or mode turns compile on, the default backend is
inductor; names checked against ``torch._dynamo.list_backends`` and torch's mode list; the
settings compile cannot run with refused by name); one SFT / DPO / KTO / reward step with the
backbone compiled (``aot_eager``) gives the uncompiled step's loss and gradients, padded, packed,
with activation checkpointing and with LoRA, and the model really ran compiled (dynamo's
counters); evaluation too; checkpoints and ``final/`` have no ``_orig_mod.`` keys and load
without compile, and a run resumes exactly across compile on / off; one SFT step with the
default inductor backend."""

import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from rlhf_fast.models.logprobs import backbone
from rlhf_fast.trainers.checkpoint import latest_checkpoint
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.compile import compile_backbone, compiled
from rlhf_fast.trainers.config import load_config
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records
from tests.test_reward import preference_tokenizer

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"
COMMON = dict(model=TINY, lr=3e-3, warmup_steps=0, eval_every=0, log_every=1, max_len=48, max_steps=3,
              device="cpu", grad_clip=0.0)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and counts its own graphs (dynamo's caches and counters
    are per process)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def sft_tok():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(64) + [r.prompt + r.completion for r in synthetic_sft_records(64)], 300,
                           padding_side="right")


@pytest.fixture(scope="module")
def pref_tok():
    return preference_tokenizer()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _step(tr):
    """(metrics, gradients) of one train_step of ``tr``, read as the optimizer is about to step."""
    got = {}
    handle = tr.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: got.__setitem__("g", [p.grad.clone() for p in tr.model.parameters()
                                                        if p.grad is not None]))
    m = tr.train_step()
    handle.remove()
    return m, got["g"]


def _same_step(make, metrics=("loss",)):
    """One step of ``make(compile_kwargs)`` uncompiled and with the backbone compiled
    (aot_eager): equal metrics and gradients, and the compiled one ran dynamo graphs."""
    plain = make({})
    assert not plain.cfg.torch_compile and not compiled(backbone(plain.model))
    m0, g0 = _step(plain)
    assert _graphs() == 0
    comp = make({"torch_compile_backend": "aot_eager"})
    assert comp.cfg.torch_compile and compiled(backbone(comp.model))
    m1, g1 = _step(comp)
    assert _graphs() >= 1  # the backbone ran through dynamo
    for k in metrics:
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-6), k
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    return plain, comp


# ------------------------------------------------------------------ the keys


def test_keys_follow_transformers_rules_and_bad_values_are_refused():
    d = SFTConfig()
    assert (d.torch_compile, d.torch_compile_backend, d.torch_compile_mode) == (False, None, None)
    # transformers' TrainingArguments.__post_init__: backend or mode set -> compile on; on -> inductor
    assert SFTConfig(torch_compile=True).torch_compile_backend == "inductor"
    c = SFTConfig(torch_compile_backend="aot_eager")
    assert c.torch_compile and c.torch_compile_mode is None
    c = SFTConfig(torch_compile_mode="max-autotune")
    assert c.torch_compile and c.torch_compile_backend == "inductor"
    c = load_config(DPOConfig, None, ["--torch_compile_backend", "aot_eager"])
    assert c.torch_compile and c.torch_compile_backend == "aot_eager"
    for mode in ("default", "reduce-overhead", "max-autotune"):  # transformers' documented modes
        assert SFTConfig(torch_compile_mode=mode).torch_compile_mode == mode
    for kw, key in ((dict(torch_compile_backend="nope"), "torch_compile_backend"),
                    (dict(torch_compile_backend=3), "torch_compile_backend"),
                    (dict(torch_compile_mode="fastest"), "torch_compile_mode"),
                    (dict(torch_compile_backend="aot_eager", torch_compile_mode="max-autotune"), "torch_compile_mode"),
                    (dict(torch_compile="yes"), "torch_compile"),
                    (dict(torch_compile=True, activation_offloading=True), "activation_offloading"),
                    (dict(torch_compile=True, distributed={"strategy": "fsdp2"}), "fsdp2")):
        with pytest.raises(ValueError, match=key):
            SFTConfig(**kw)
    for cls in (DPOConfig, KTOConfig, RewardConfig):
        with pytest.raises(ValueError, match="prefix_sharing"):
            cls(torch_compile=True, prefix_sharing=True)
        assert cls(torch_compile_backend="eager").torch_compile


def test_compile_backbone_keeps_the_state_dict_and_is_idempotent():
    from rlhf_fast.models.tiny import tiny_causal_lm

    model = tiny_causal_lm(64, hidden_size=32, num_layers=1, num_heads=2)
    keys = list(model.state_dict())
    base = compile_backbone(model, "aot_eager")
    assert base is model.model and compiled(base) and list(model.state_dict()) == keys
    fn = base.forward
    compile_backbone(model, "aot_eager")
    assert base.forward.__func__ is fn.__func__  # a shared backbone is compiled once
    import copy

    twin = copy.deepcopy(model)  # the copy's compiled forward runs the copy, not the original
    assert twin.model.forward.__self__ is twin.model
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        twin.model.norm.weight.mul_(2)
        assert not torch.equal(twin.model(ids).last_hidden_state, model.model(ids).last_hidden_state)


# ------------------------------------------------------------------ compiled steps equal uncompiled ones


@pytest.mark.parametrize("variant", [{}, {"packing": True}, {"gradient_checkpointing": True}, {"lora": {}}],
                         ids=["padded", "packing", "checkpointing", "lora"])
def test_sft_step(tmp_path, sft_tok, variant):
    recs = synthetic_sft_records(16)

    def make(kw):
        cfg = SFTConfig(**COMMON, output_dir=str(tmp_path / f"run{len(kw)}"), batch_size=8, **variant, **kw)
        return SFTTrainer(cfg, train_records=recs[:8], eval_records=[], tokenizer=sft_tok)

    _same_step(make, metrics=("loss", "entropy", "mean_token_accuracy", "grad_norm"))


def test_sft_evaluation(tmp_path, sft_tok):
    recs = synthetic_sft_records(24)
    out = []
    for kw in ({}, {"torch_compile_backend": "aot_eager"}):
        cfg = SFTConfig(**COMMON, output_dir=str(tmp_path / f"run{len(kw)}"), batch_size=4, **kw)
        out.append(SFTTrainer(cfg, train_records=recs[:8], eval_records=recs[8:], tokenizer=sft_tok).evaluate())
    assert _graphs() >= 1
    assert out[1] == pytest.approx(out[0], rel=1e-5)


@pytest.mark.parametrize("variant", [{}, {"padding_free": True}], ids=["padded", "padding_free"])
def test_dpo_step(tmp_path, pref_tok, variant):
    recs = synthetic_preference_records(12, seed=1)

    def make(kw):
        cfg = DPOConfig(**{**COMMON, "max_len": 64}, output_dir=str(tmp_path / f"run{len(kw)}"), batch_size=6,
                        beta=0.3, **variant, **kw)
        tr = DPOTrainer(cfg, train_records=recs, eval_records=[], tokenizer=pref_tok)
        with torch.no_grad():  # a reference off the policy, so the rewards are not 0
            next(backbone(tr.reference).parameters()).add_(0.01)
        assert compiled(backbone(tr.reference)) == bool(kw)  # TRL's reference is compiled too
        return tr

    _same_step(make, metrics=("loss", "rewards/chosen", "rewards/margin", "logps/rejected"))


def test_kto_step(tmp_path, pref_tok):
    recs = synthetic_preference_records(16, seed=1)

    def make(kw):
        cfg = KTOConfig(**COMMON, output_dir=str(tmp_path / f"run{len(kw)}"), batch_size=8, **kw)
        return KTOTrainer(cfg, train_records=recs, eval_records=[], tokenizer=pref_tok)

    _same_step(make)


def test_reward_step(tmp_path, pref_tok):
    recs = synthetic_preference_records(16, seed=1)

    def make(kw):
        cfg = RewardConfig(**{**COMMON, "max_len": 64}, output_dir=str(tmp_path / f"run{len(kw)}"), batch_size=8,
                           **kw)
        return RewardTrainer(cfg, train_records=recs, eval_records=[], tokenizer=pref_tok)

    _same_step(make, metrics=("loss", "accuracy", "margin"))


# ------------------------------------------------------------------ checkpoints and resume


def _params(tr):
    return {k: v.detach().clone() for k, v in tr.model.named_parameters()}


def test_checkpoints_load_without_compile_and_resume_across_compile(tmp_path, sft_tok):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recs = synthetic_sft_records(40)

    def trainer(name, compile_, **kw):
        cfg = SFTConfig(**{**COMMON, "max_steps": 6}, output_dir=str(tmp_path / name), batch_size=4,
                        save_every=3, torch_compile=compile_, **({"torch_compile_backend": "aot_eager"}
                                                                  if compile_ else {}), **kw)
        return SFTTrainer(cfg, train_records=recs, eval_records=[], tokenizer=sft_tok)

    # the reference: 6 steps uncompiled, uninterrupted
    ref = trainer("plain", False)
    ref.train()
    ref_loss = {m["step"]: m["loss"] for m in read_metrics(ref.cfg.output_dir)}
    for first, then in ((True, False), (False, True)):
        name = f"{'c' if first else 'p'}2{'c' if then else 'p'}"
        a = trainer(name, first)
        while a.step < 3:
            a.train_step()
        a._save()
        saved = _params(a)
        folder = os.path.join(latest_checkpoint(a.cfg.output_dir), "models", "policy")
        keys = [k for f in os.listdir(folder) if f.endswith(".safetensors")
                for k in load_file(os.path.join(folder, f))]
        assert keys and not any("_orig_mod" in k for k in keys)
        b = trainer(name, then)
        b._maybe_resume()
        assert b.step == 3 and b.cfg.torch_compile == then
        got = _params(b)
        assert got.keys() == saved.keys()
        for k in saved:  # the checkpoint restores the weights bit for bit, whichever way it was saved
            assert torch.equal(got[k], saved[k]), k
        b.train()
        loss = {m["step"]: m["loss"] for m in read_metrics(b.cfg.output_dir)}
        assert sorted(loss) == [4, 5, 6]  # (the first 3 steps ran outside train(), unlogged)
        for s in loss:  # compiled steps differ from eager ones by float rounding only
            assert loss[s] == pytest.approx(ref_loss[s], rel=1e-4), (name, s)
    assert _graphs() >= 1
    # final/ (saved by a compiled run) loads into a plain model, its keys without _orig_mod.
    final = os.path.join(tmp_path, "p2c", "final")
    sd = load_file(os.path.join(final, "model.safetensors"))
    assert sd and not any("_orig_mod" in k for k in sd)
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert set(loaded.state_dict()) >= set(sd)


# ------------------------------------------------------------------ the default backend


def test_sft_step_with_inductor(tmp_path, sft_tok):
    """One step with transformers' default backend, inductor (a C++ compile: ~30 s on 2 cores)."""
    recs = synthetic_sft_records(8)
    grads = []
    for kw in ({}, {"torch_compile": True}):
        cfg = SFTConfig(**{**COMMON, "max_steps": 1}, output_dir=str(tmp_path / f"run{len(kw)}"), batch_size=4, **kw)
        tr = SFTTrainer(cfg, train_records=recs[:4], eval_records=[], tokenizer=sft_tok)
        assert tr.cfg.torch_compile_backend == ("inductor" if kw else None)
        grads.append(_step(tr))
    assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] >= 1
    assert grads[1][0]["loss"] == pytest.approx(grads[0][0]["loss"], rel=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
