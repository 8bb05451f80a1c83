"""TR-DPO's moving reference (``sync_ref_model``) in the DPO and KTO trainers: the reference
after each step against TRL's own ``SyncRefModelCallback`` (bit for bit, the same step counts),
the checkpoint holding it (a resumed run equals an uninterrupted one: tests/test_dpo.py and
tests/test_kto.py ``test_resume_is_exact``), and the configurations that cannot work."""

import copy
import types

import pytest
import torch

from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer, reference_checkpoint_dir
from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
from rlhf_fast.trainers.reward import synthetic_preference_records
from tests.test_reward import preference_tokenizer

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _kw(tmp_path, name, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), batch_size=4, lr=3e-2, warmup_steps=0, eval_every=0,
                log_every=1, max_len=48, max_steps=5, device="cpu", sync_ref_model=True, ref_model_sync_steps=2,
                ref_model_mixup_alpha=0.3)
    base.update(kw)
    return base


def _trainer(kind, tmp_path, tok, name="run", **kw):
    cfg = (DPOConfig if kind == "dpo" else KTOConfig)(**_kw(tmp_path, name, **kw))
    cls = DPOTrainer if kind == "dpo" else KTOTrainer
    return cls(cfg, train_records=synthetic_preference_records(16, seed=3), eval_records=[], tokenizer=tok)


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_the_reference_moves_as_trls_callback(tmp_path, tok, kind, monkeypatch):
    """After every optimizer step the reference equals, bit for bit, a copy of the initial
    reference that TRL's SyncRefModelCallback.on_step_end updates with the same global step."""
    pytest.importorskip("trl")
    from trl.trainer import callbacks
    from trl.trainer.callbacks import SyncRefModelCallback

    # no Accelerator in a unit test: the state it reads says "no DeepSpeed", its plain branch
    monkeypatch.setattr(callbacks, "AcceleratorState", lambda: types.SimpleNamespace(deepspeed_plugin=None))

    tr = _trainer(kind, tmp_path, tok)
    theirs = copy.deepcopy(tr.reference)
    callback = SyncRefModelCallback(ref_model=theirs, accelerator=None)
    args = types.SimpleNamespace(ref_model_sync_steps=2, ref_model_mixup_alpha=0.3)
    initial = [p.detach().clone() for p in tr.reference.parameters()]
    for step in range(1, 6):
        tr.train_step()
        callback.on_step_end(args, types.SimpleNamespace(global_step=step), None, model=tr.model)
        ours = list(tr.reference.parameters())
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs.parameters())), step
        moved = not all(torch.equal(a, b) for a, b in zip(ours, initial))
        assert moved == (step >= 2), step  # the first sync follows step 2, not step 1
        assert not any(p.requires_grad for p in ours)
    # the mix itself: step 4's reference is 0.3·policy + 0.7·(step 2's), not the policy
    assert not all(torch.equal(a, b) for a, b in zip(tr.reference.parameters(), tr.model.parameters()))


def test_sync_off_keeps_the_reference_and_writes_no_reference_folder(tmp_path, tok):
    tr = _trainer("dpo", tmp_path, tok, sync_ref_model=False, max_steps=2)
    before = [p.detach().clone() for p in tr.reference.parameters()]
    tr.train()
    assert all(torch.equal(a, b) for a, b in zip(before, tr.reference.parameters()))
    assert not any(p.name.startswith("reference_") for p in (tmp_path / "run" / "checkpoints").iterdir())


def test_reference_folders_follow_the_checkpoints(tmp_path, tok):
    """One reference folder per kept checkpoint (pruned with them); a checkpoint whose reference
    is missing is refused once a sync has happened."""
    tr = _trainer("dpo", tmp_path, tok, max_steps=4, save_every=1, keep_checkpoints=2)
    tr.train()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["reference_step_00000003", "reference_step_00000004",
                                                      "step_00000003", "step_00000004"]
    import shutil

    shutil.rmtree(reference_checkpoint_dir(str(root / "step_00000004")))
    tr = _trainer("dpo", tmp_path, tok, max_steps=5)
    with pytest.raises(ValueError, match="no moving reference"):
        tr.train()


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_config_errors_name_the_keys(tmp_path, kind):
    cls = DPOConfig if kind == "dpo" else KTOConfig
    bad = [(dict(precompute_ref_logps=True), "sync_ref_model and precompute_ref_logps"),
           (dict(lora={"r": 4}), "sync_ref_model cannot be used with lora"),
           (dict(ref_model_mixup_alpha=1.5), "ref_model_mixup_alpha must be in"),
           (dict(ref_model_mixup_alpha=float("nan")), "ref_model_mixup_alpha"),
           (dict(ref_model_sync_steps=0), "ref_model_sync_steps must be an int >= 1"),
           (dict(ref_model_sync_steps=2.5), "ref_model_sync_steps must be an int >= 1"),
           (dict(sync_ref_model="yes"), "sync_ref_model must be true or false")]
    if kind == "dpo":
        bad += [(dict(loss_type=t), "sync_ref_model must be left unset") for t in ("simpo", "cpo", "orpo")]
    for extra, msg in bad:
        with pytest.raises(ValueError, match=msg):
            cls(**_kw(tmp_path, "x", **extra))
    cls(**_kw(tmp_path, "x", sync_ref_model=False, precompute_ref_logps=True))  # off: no constraint


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_peft_policy_is_refused(tmp_path, tok):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from rlhf_fast.models.tiny import tiny_causal_lm

    model = get_peft_model(tiny_causal_lm(300, hidden_size=32, num_layers=1, num_heads=2),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="sync_ref_model cannot be used with a peft policy"):
        DPOTrainer(DPOConfig(**_kw(tmp_path, "p")), model=model, tokenizer=tok,
                   train_records=synthetic_preference_records(8, seed=3), eval_records=[])
