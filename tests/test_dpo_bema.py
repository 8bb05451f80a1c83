"""BEMA in the DPO trainer (the ``bema`` section, rlhf_fast.trainers.bema): the reference and
the BEMA weights after every step against TRL's own ``BEMACallback`` (the experimental
``bema_for_ref_model`` one, driven with the same global steps) bit for bit, the BEMA model
saved at the end against its ``on_train_end``, a resumed run equal to an uninterrupted one, and
the configurations that cannot work; under DDP on two gloo ranks (this file is also the worker
they run) the same reference as one process, and an exact resume."""

import copy
import os
import sys
import types

if __name__ == "__main__":  # run as the worker: tests/ must not shadow packages (tests/triton/ does)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.trainers.bema import BEMAConfig, bema_checkpoint_dir  # noqa: E402
from rlhf_fast.trainers.config import load_config  # noqa: E402
from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer  # noqa: E402
from rlhf_fast.trainers.reward import synthetic_preference_records  # noqa: E402
from tests.test_reward import preference_tokenizer  # noqa: E402
from tests.test_trainer_common import untimed_metrics  # noqa: E402

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

# TRL's argument names; small frequencies so a few steps cover every branch
SCHEDULE = dict(update_freq=2, update_after=1, lag=1, multiplier=0.5, min_ema_multiplier=0.6, update_ref_model=True,
                ref_model_update_freq=3, ref_model_update_after=1)


@pytest.fixture(scope="module")
def tok():
    return preference_tokenizer()


def _kw(tmp_path, name, **kw):
    base = dict(model=TINY, output_dir=str(tmp_path / name), batch_size=4, lr=3e-2, warmup_steps=0, eval_every=0,
                log_every=1, max_len=48, max_steps=6, device="cpu", bema=dict(SCHEDULE))
    base.update(kw)
    return base


def _trainer(tmp_path, tok, name="run", records=16, **kw):
    return DPOTrainer(DPOConfig(**_kw(tmp_path, name, **kw)), tokenizer=tok, eval_records=[],
                      train_records=synthetic_preference_records(records, seed=3))


def _trl_callback(b: BEMAConfig):
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.bema_for_ref_model import BEMACallback

    return BEMACallback(**{f: getattr(b, f) for f in b.__dataclass_fields__})


def _equal(a, b) -> bool:
    a, b = list(a), list(b)
    return len(a) == len(b) and all(torch.equal(x.detach(), y.detach()) for x, y in zip(a, b))


@pytest.mark.parametrize("schedule", [
    SCHEDULE,
    # every step, TRL's powers, θ₀ at the start; the reference updated at steps 3 and 5 (from step 3, not 5)
    dict(update_freq=1, update_after=0, lag=10, update_ref_model=True, ref_model_update_freq=2,
         ref_model_update_after=3),
    # α ≡ 1 and no EMA (κ = 0: β = 1), the reference before update_after: the initial policy
    dict(update_freq=1, update_after=3, ema_power=0.0, bias_power=0.0, update_ref_model=True,
         ref_model_update_freq=1, ref_model_update_after=1),
], ids=["mixed", "every_step", "before_update_after"])
def test_reference_and_bema_weights_move_as_trls_callback(tmp_path, tok, schedule):
    """After every optimizer step the reference equals, bit for bit, a copy of the initial
    reference that TRL's experimental BEMACallback updates (on_train_begin, then on_step_end
    with the same global step and the live policy), and so do the BEMA weights (its
    running_model); the model saved at the end is its on_train_end's."""
    tr = _trainer(tmp_path, tok, bema=dict(schedule))
    b = tr.cfg.bema
    cb = _trl_callback(b)
    theirs = copy.deepcopy(tr.reference)
    args = types.SimpleNamespace(output_dir=str(tmp_path / "trl"))
    cb.on_train_begin(args, types.SimpleNamespace(global_step=0), None, model=tr.model)
    initial = [p.detach().clone() for p in tr.reference.parameters()]
    moved_at = []
    for step in range(1, 7):
        tr.train_step()
        cb.on_step_end(args, types.SimpleNamespace(global_step=step), None, model=tr.model, ref_model=theirs)
        assert _equal(tr.reference.parameters(), theirs.parameters()), step
        assert _equal(tr._bema.running, cb.running_model.parameters()), step
        assert _equal(tr._bema.ema, cb.ema_params) and _equal(tr._bema.theta0, cb.theta0_params), step
        assert not any(p.requires_grad for p in tr.reference.parameters())
        if not _equal(tr.reference.parameters(), initial):
            moved_at.append(step)
    # the reference is not the policy (it lags behind it), and it moved where the schedule says
    assert not _equal(tr.reference.parameters(), tr.model.parameters())
    # (before the first BEMA update the BEMA weights are the initial policy: a reference update changes nothing)
    bema_at = [s for s in range(1, 7) if s > b.update_after and (s - b.update_after) % b.update_freq == 0]
    ref_at = [s for s in range(1, 7)
              if s >= b.ref_model_update_after and (s - b.ref_model_update_after) % b.ref_model_update_freq == 0]
    first = min(s for s in ref_at if s >= bema_at[0])
    assert moved_at == list(range(first, 7)), (moved_at, first)
    # TRL's on_train_end saves running_model; ours RUN_DIR/bema at the end of train()
    tr.cfg.max_steps = 6
    tr.train()  # nothing left to train: checkpoint and final save, then the BEMA model
    cb.on_train_end(args, types.SimpleNamespace(is_world_process_zero=True), None)
    from safetensors.torch import load_file

    ours = load_file(os.path.join(tr.run.path, "bema", "model.safetensors"))
    trl_saved = load_file(os.path.join(args.output_dir, "bema", "model.safetensors"))
    assert ours.keys() == trl_saved.keys() and all(torch.equal(ours[k], trl_saved[k].to(ours[k].dtype)) for k in ours)
    assert os.path.isfile(os.path.join(tr.run.path, "bema", "tokenizer.json"))


def test_without_update_ref_model_only_the_bema_weights_move(tmp_path, tok):
    """TRL's default update_ref_model false: the reference stays the initial policy; the BEMA
    weights follow TRL's (base) BEMACallback and are saved at the end."""
    tr = _trainer(tmp_path, tok, bema=dict(update_freq=1, lag=2), max_steps=3)
    cb = _trl_callback(tr.cfg.bema)
    args = types.SimpleNamespace(output_dir=str(tmp_path / "trl"))
    cb.on_train_begin(args, None, None, model=tr.model)
    before = [p.detach().clone() for p in tr.reference.parameters()]
    for step in range(1, 4):
        tr.train_step()
        cb.on_step_end(args, types.SimpleNamespace(global_step=step), None, model=tr.model, ref_model=None)
        assert _equal(tr._bema.running, cb.running_model.parameters()), step
    assert _equal(tr.reference.parameters(), before)
    assert not _equal(tr._bema.running, before)


def test_default_has_no_bema(tmp_path, tok):
    tr = _trainer(tmp_path, tok, bema=None, max_steps=2, save_every=1)
    before = [p.detach().clone() for p in tr.reference.parameters()]
    tr.train()
    assert tr._bema is None and _equal(tr.reference.parameters(), before)
    assert not (tmp_path / "run" / "bema").exists()
    assert not any(p.name.startswith("bema_") for p in (tmp_path / "run" / "checkpoints").iterdir())


def test_resume_is_exact(tmp_path, tok):
    """A run stopped after step 3 (its checkpoint written) and resumed in a new trainer ends
    with the policy, reference, BEMA buffers, saved BEMA model and logged metrics of the
    uninterrupted run; the BEMA folders follow the kept checkpoints."""
    recs = synthetic_preference_records(24, seed=6)

    def run(name, stop):
        cfg = DPOConfig(**_kw(tmp_path, name, save_every=3, keep_checkpoints=1))
        t = DPOTrainer(cfg, train_records=recs, eval_records=recs[:4], tokenizer=tok)
        if stop < 6:
            while t.step < stop:
                t.train_step()
            t._save()
            t = DPOTrainer(cfg, train_records=recs, eval_records=recs[:4], tokenizer=tok)
        t.train()
        state = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        state.update({"ref." + n: p.detach().clone() for n, p in t.reference.named_parameters()})
        state.update({"bema." + n: v.clone() for n, v in t._bema.state_dict().items()})
        from safetensors.torch import load_file

        state.update({"saved." + k: v for k, v in load_file(os.path.join(t.run.path, "bema",
                                                                            "model.safetensors")).items()})
        return state, untimed_metrics(cfg.output_dir)

    full, log_full = run("full", 6)
    resumed, log_res = run("resumed", 3)
    assert full.keys() == resumed.keys() and all(torch.equal(full[n], resumed[n]) for n in full)
    late = lambda log: [m for m in log if m["step"] > 3]  # noqa: E731
    assert late(log_full) == late(log_res) and late(log_full)[-1]["step"] == 6
    root = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["bema_step_00000006", "step_00000006"]


def test_a_checkpoint_without_bema_state_is_refused(tmp_path, tok):
    tr = _trainer(tmp_path, tok, max_steps=2)
    tr.train()
    import shutil

    shutil.rmtree(bema_checkpoint_dir(str(tmp_path / "run" / "checkpoints" / "step_00000002")))
    with pytest.raises(ValueError, match="no BEMA state"):
        _trainer(tmp_path, tok, max_steps=3).train()
    # bema added to a run that had none: refused the same way
    _trainer(tmp_path, tok, name="off", bema=None, max_steps=1).train()
    with pytest.raises(ValueError, match="no BEMA state"):
        _trainer(tmp_path, tok, name="off", max_steps=2).train()


def test_config_errors_name_the_keys(tmp_path):
    bad = [(dict(sync_ref_model=True), "bema.update_ref_model and sync_ref_model"),
           (dict(precompute_ref_logps=True), "bema.update_ref_model and precompute_ref_logps"),
           (dict(lora={"r": 4}), "bema cannot be used with lora"),
           (dict(distributed={"strategy": "fsdp2"}), "bema cannot be used with distributed.strategy fsdp2"),
           (dict(bema=dict(SCHEDULE, update_freq=0)), "bema.update_freq must be an int >= 1"),
           (dict(bema=dict(SCHEDULE, update_freq=2.5)), "bema.update_freq must be an int >= 1"),
           (dict(bema=dict(SCHEDULE, ref_model_update_freq=0)), "bema.ref_model_update_freq"),
           (dict(bema=dict(SCHEDULE, update_after=-1)), "bema.update_after must be an int >= 0"),
           (dict(bema=dict(SCHEDULE, ref_model_update_after=True)), "bema.ref_model_update_after"),
           (dict(bema=dict(SCHEDULE, lag=-1)), "bema.lag must be an int >= 0"),
           (dict(bema=dict(SCHEDULE, ema_power=float("nan"))), "bema.ema_power"),
           (dict(bema=dict(SCHEDULE, bias_power=-0.1)), "bema.bias_power"),
           (dict(bema=dict(SCHEDULE, multiplier=-1.0)), "bema.multiplier"),
           (dict(bema=dict(SCHEDULE, lag=0, multiplier=0.0)), "bema.lag \\+ bema.multiplier must be > 0"),
           (dict(bema=dict(SCHEDULE, min_ema_multiplier=1.5)), "bema.min_ema_multiplier must be in"),
           (dict(bema=dict(SCHEDULE, update_ref_model="yes")), "bema.update_ref_model must be true or false"),
           (dict(bema=dict(SCHEDULE, device="gpu0")), "bema.device must be .cpu. or a CUDA device"),
           (dict(bema=dict(SCHEDULE, device="meta")), "bema.device must be .cpu. or a CUDA device"),
           (dict(bema=dict(SCHEDULE, freq=2)), "unknown key bema.freq")]
    bad += [(dict(loss_type=t), "bema.update_ref_model must be false") for t in ("simpo", "cpo", "orpo")]
    for extra, msg in bad:
        if "distributed" in extra:
            from rlhf_fast.distributed import DistributedConfig

            extra = dict(distributed=DistributedConfig(**extra["distributed"]))
        with pytest.raises(ValueError, match=msg):
            DPOConfig(**_kw(tmp_path, "x", **extra))
    with pytest.raises(TypeError, match="bema must be null"):
        DPOConfig(**_kw(tmp_path, "x", bema=3))
    # without update_ref_model the reference is not touched: these combine
    for extra in (dict(sync_ref_model=True), dict(precompute_ref_logps=True), dict(loss_type="simpo")):
        DPOConfig(**_kw(tmp_path, "x", bema=dict(update_freq=2), **extra))
    # YAML / command line: a section, off by default
    cfg = load_config(DPOConfig, overrides=["--bema.update_freq", "7", "--bema.update_ref_model", "true"])
    assert cfg.bema == BEMAConfig(update_freq=7, update_ref_model=True) and load_config(DPOConfig).bema is None


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_peft_policy_is_refused(tmp_path, tok):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from rlhf_fast.models.tiny import tiny_causal_lm

    model = get_peft_model(tiny_causal_lm(300, hidden_size=32, num_layers=1, num_heads=2),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="bema cannot be used with a peft policy"):
        DPOTrainer(DPOConfig(**_kw(tmp_path, "p")), model=model, tokenizer=tok,
                   train_records=synthetic_preference_records(8, seed=3), eval_records=[])


# ----------------------------------------------------------------------------- DDP: two gloo ranks


def _ddp_run(strategy: str, steps: int, out_dir: str):
    from rlhf_fast.distributed import DistributedConfig
    from rlhf_fast.trainers.sft import split_records

    train, _ = split_records(synthetic_preference_records(48, seed=0), 0.1, 0)
    # a BEMA update and a reference update after every step: a rank whose buffers drifted from
    # the others' (or a resume that lost them) could not match
    cfg = DPOConfig(model="tiny:llama:hidden_size=32,num_layers=2,num_heads=2", output_dir=out_dir, device="cpu",
                    batch_size=8, max_steps=steps, lr=5e-3, warmup_steps=0, lr_schedule="constant", eval_every=0,
                    log_every=1, save_every=2, max_len=48, beta=0.5,
                    bema=dict(update_freq=1, lag=2, update_ref_model=True, ref_model_update_freq=1),
                    distributed=DistributedConfig(strategy=strategy))
    tr = DPOTrainer(cfg, train_records=train, eval_records=[])
    tr.train()
    return tr


def worker(specs, root, out):
    results = {}
    for spec in specs:
        strategy, steps, name = spec.split(":")
        tr = _ddp_run(strategy, int(steps), os.path.join(root, name))
        state = {"ref." + n: p.detach().clone() for n, p in tr.reference.named_parameters()}
        state.update({"bema." + n: v.clone() for n, v in tr._bema.state_dict().items()})
        # every rank must hold the same buffers and reference (each updates its own)
        flat = torch.cat([v.flatten().double() for v in state.values()])
        spread = tr.ctx.all_reduce_sum((flat - tr.ctx.all_reduce_sum(flat.clone()) / tr.ctx.world_size).abs().sum())
        if tr.ctx.is_main:
            torch.save(state, os.path.join(root, name + ".state.pt"))
            results[spec] = {"world": tr.ctx.world_size, "spread": float(spread),
                             "loss": [m["loss"] for m in untimed_metrics(tr.run.path) if "loss" in m]}
    return results


def test_ddp_two_ranks_match_one_and_resume_exactly(tmp_path):
    from tests.torchrun_launch import launch

    root = str(tmp_path)
    # ddp:2:resumed runs 2 steps (checkpoint at the end), ddp:3:resumed goes on in that folder
    two = launch(__file__, root, 2, ["ddp:3:ddp", "ddp:2:resumed", "ddp:3:resumed"])
    one = launch(__file__, root, 1, ["none:3:one"])
    state = {n: torch.load(os.path.join(root, n + ".state.pt")) for n in ("ddp", "resumed", "one")}
    assert two["ddp:3:ddp"]["world"] == 2 and two["ddp:3:ddp"]["spread"] == 0.0
    assert two["ddp:3:resumed"]["spread"] == 0.0
    assert all(torch.equal(state["ddp"][k], state["resumed"][k]) for k in state["ddp"])
    assert two["ddp:3:ddp"]["loss"] == two["ddp:3:resumed"]["loss"]  # (the resumed log: steps 1-2, then 3)
    assert state["ddp"].keys() == state["one"].keys()
    for k in state["one"]:
        torch.testing.assert_close(state["ddp"][k], state["one"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert one["none:3:one"]["loss"] == pytest.approx(two["ddp:3:ddp"]["loss"], rel=1e-4, abs=1e-6)


if __name__ == "__main__":
    from tests.torchrun_launch import main

    main(worker)
