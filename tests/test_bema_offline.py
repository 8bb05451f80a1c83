"""BEMA (the ``bema`` section, rlhf_fast.trainers.bema) in the SFT, KTO and reward trainers, whose
hooks run in the loop they share with DPO (sft.optimizer_step, save_supervised,
resume_supervised, training_loop): after every step the BEMA buffers equal TRL's base
``BEMACallback`` (trl/trainer/callbacks.py) driven over the same weights with the same global
steps, bit for bit, and the ``bema/`` model saved at the end equals its ``on_train_end``'s; an
exact SFT resume with the BEMA folders following the kept checkpoints; ``update_ref_model``
refused where TRL has no such reference update; the default writes nothing of BEMA."""

import os
import types

import pytest
import torch
from safetensors.torch import load_file

from rlhf_fast.trainers.bema import BEMAConfig
from rlhf_fast.trainers.config import load_config
from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records
from tests.test_dpo_bema import _equal
from tests.test_reward import preference_tokenizer
from tests.test_trainer_common import untimed_metrics

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

# TRL's argument names; small frequencies so a few steps cover θ₀ at update_after and the β floor
SCHEDULE = dict(update_freq=2, update_after=1, lag=1, multiplier=0.5, min_ema_multiplier=0.6)


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _base(tmp_path, name, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), lr=3e-2, warmup_steps=0, eval_every=0, log_every=1,
                max_len=48, max_steps=5, device="cpu", bema=dict(SCHEDULE))
    base.update(kw)
    return base


def _sft(tmp_path, tok, name="sft", records=None, **kw):
    records = synthetic_sft_records(24, seed=2) if records is None else records
    return SFTTrainer(SFTConfig(**_base(tmp_path, name, batch_size=4, **kw)), tokenizer=tok, train_records=records,
                      eval_records=[])


def _kto(tmp_path, tok, name="kto", **kw):
    return KTOTrainer(KTOConfig(**_base(tmp_path, name, batch_size=4, **kw)), tokenizer=tok, eval_records=[],
                      train_records=synthetic_preference_records(16, seed=3))


def _reward(tmp_path, tok, name="reward", **kw):
    return RewardTrainer(RewardConfig(**_base(tmp_path, name, batch_size=4, **kw)), tokenizer=tok, eval_records=[],
                         train_records=synthetic_preference_records(16, seed=3))


def _trl_base_callback(b: BEMAConfig):
    """TRL's generic BEMACallback (no reference update: its arguments are BEMAConfig's but the ref_* ones)."""
    from trl.trainer.callbacks import BEMACallback

    names = [f for f in b.__dataclass_fields__ if f != "update_ref_model" and not f.startswith("ref_model_")]
    return BEMACallback(**{f: getattr(b, f) for f in names})


def _saved(folder):
    return load_file(os.path.join(folder, "bema", "model.safetensors"))


@pytest.mark.parametrize("make", [_sft, _kto, _reward], ids=["sft", "kto", "reward"])
def test_bema_weights_move_as_trls_callback(tmp_path, tok, make):
    """After every optimizer step θ₀, the EMA and the BEMA weights equal, bit for bit, those of
    TRL's BEMACallback (on_train_begin, then on_step_end with the same global step and the live
    policy / reward model); RUN_DIR/bema is its on_train_end's model (and our buffers')."""
    pytest.importorskip("trl")
    tr = make(tmp_path, tok)
    cb = _trl_base_callback(tr.cfg.bema)
    args = types.SimpleNamespace(output_dir=str(tmp_path / "trl"))
    cb.on_train_begin(args, types.SimpleNamespace(global_step=0), None, model=tr.model)
    initial = [p.detach().clone() for p in tr._bema.running]
    for step in range(1, 6):
        tr.train_step()
        assert tr.step == step
        cb.on_step_end(args, types.SimpleNamespace(global_step=step), None, model=tr.model)
        assert _equal(tr._bema.running, cb.running_model.parameters()), step
        assert _equal(tr._bema.ema, cb.ema_params) and _equal(tr._bema.theta0, cb.theta0_params), step
    # (BEMA updates at steps 3 and 5: the weights moved, and they are not the policy's)
    assert not _equal(tr._bema.running, initial) and not _equal(tr._bema.running, tr.model.parameters())
    tr.train()  # nothing left to train: the checkpoint, final/, then bema/
    cb.on_train_end(args, types.SimpleNamespace(is_world_process_zero=True), None)
    ours, theirs = _saved(tr.run.path), _saved(args.output_dir)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k].to(ours[k].dtype)) for k in ours)
    mine = tr._bema.model_state_dict(tr.model)
    assert all(torch.equal(ours[k], mine[k]) for k in ours)
    assert os.path.isfile(os.path.join(tr.run.path, "bema", "tokenizer.json"))
    root = os.path.join(tr.run.path, "checkpoints")
    assert sorted(os.listdir(root)) == ["bema_step_00000005", "step_00000005"]


def test_sft_resume_is_exact(tmp_path, tok):
    """An SFT run stopped after step 2 (its checkpoint written) and resumed in a new trainer ends
    with the weights, BEMA buffers, saved BEMA model and logged metrics of the uninterrupted run;
    the BEMA folders follow the kept checkpoints."""
    recs = synthetic_sft_records(24, seed=6)

    def run(name, stop):
        kw = dict(save_every=2, keep_checkpoints=1, max_steps=5)
        t = _sft(tmp_path, tok, name, recs, **kw)
        if stop < 5:
            while t.step < stop:
                t.train_step()
            t._save()
            t = _sft(tmp_path, tok, name, recs, **kw)
        t.train()
        state = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        state.update({"bema." + n: v.clone() for n, v in t._bema.state_dict().items()})
        state.update({"saved." + k: v for k, v in _saved(t.run.path).items()})
        return state, untimed_metrics(t.run.path)

    full, log_full = run("full", 5)
    resumed, log_res = run("resumed", 2)
    assert full.keys() == resumed.keys() and all(torch.equal(full[n], resumed[n]) for n in full)
    late = lambda log: [m for m in log if m["step"] > 2]  # noqa: E731
    assert late(log_full) == late(log_res) and late(log_full)[-1]["step"] == 5
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["bema_step_00000005", "step_00000005"]


def test_a_checkpoint_without_bema_state_is_refused_before_the_folder_changes(tmp_path, tok):
    _reward(tmp_path, tok, bema=None, max_steps=1).train()
    config = (tmp_path / "reward" / "config.yaml").read_text()
    with pytest.raises(ValueError, match="no BEMA state"):
        _reward(tmp_path, tok, max_steps=2).train()
    assert (tmp_path / "reward" / "config.yaml").read_text() == config


def test_defaults_write_no_bema(tmp_path, tok):
    for make in (_sft, _kto, _reward):
        tr = make(tmp_path, tok, bema=None, max_steps=2, save_every=1)
        tr.train()
        assert tr._bema is None and tr.cfg.bema is None
        assert not os.path.exists(os.path.join(tr.run.path, "bema"))
        assert not any(n.startswith("bema_") for n in os.listdir(os.path.join(tr.run.path, "checkpoints")))
    for cls in (SFTConfig, KTOConfig, RewardConfig):
        assert load_config(cls).bema is None
        assert load_config(cls, None, ["--bema", "{update_freq: 3}"]).bema == BEMAConfig(update_freq=3)


def test_config_errors_name_the_keys(tmp_path):
    for cls, why in ((SFTConfig, "the SFT trainer has no reference model"),
                     (RewardConfig, "the reward trainer has no reference model"),
                     (KTOConfig, "not KTO's")):
        with pytest.raises(ValueError, match=f"bema.update_ref_model must be false: .*{why}"):
            cls(**_base(tmp_path, "x", bema=dict(SCHEDULE, update_ref_model=True)))
        with pytest.raises(ValueError, match="bema cannot be used with lora"):
            cls(**_base(tmp_path, "x", lora={"r": 4}))
        with pytest.raises(ValueError, match="bema.update_freq must be an int >= 1"):
            cls(**_base(tmp_path, "x", bema=dict(update_freq=0)))
        with pytest.raises(ValueError, match="unknown key bema.freq"):
            cls(**_base(tmp_path, "x", bema=dict(freq=2)))
        # the reference's own schedule keys are inert without update_ref_model (as in DPO's config)
        assert cls(**_base(tmp_path, "x", bema=dict(ref_model_update_freq=5))).bema.ref_model_update_freq == 5


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_peft_sft_model_is_refused(tmp_path, tok):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from rlhf_fast.models.tiny import tiny_causal_lm

    model = get_peft_model(tiny_causal_lm(300, hidden_size=32, num_layers=1, num_heads=2),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="bema cannot be used with a peft policy"):
        SFTTrainer(SFTConfig(**_base(tmp_path, "p", batch_size=4)), model=model, tokenizer=tok,
                   train_records=synthetic_sft_records(8), eval_records=[])
