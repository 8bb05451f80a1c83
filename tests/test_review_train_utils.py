"""Review of the shared training utilities (LR schedules and warm-up, gradient accumulation's
loss normalisation, BEMA): each test pins a defect found against transformers / TRL or against
what docs/from_trl.md says."""

import types
import warnings
from pathlib import Path

import pytest
import torch

from rlhf_fast.trainers.common import lr_lambda
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records
from tests.test_reward import preference_tokenizer

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "from_trl.md"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def ptok():
    return preference_tokenizer()


def _reward_step(tmp_path, ptok, recs, batch_size, grad_accum):
    """One reward step over ``recs`` in ``grad_accum`` micro-batches of ``batch_size``: (its logged
    loss, Σ w·loss / Σ w over the items scored by the initial model, grad_norm)."""
    cfg = RewardConfig(model=TINY, output_dir=str(tmp_path / f"r{batch_size}x{grad_accum}"), batch_size=batch_size,
                       grad_accum=grad_accum, lr=1e-2, warmup_steps=0, eval_every=0, eval_fraction=0, max_steps=1,
                       max_len=64, seed=0, annotator_weights={"careful": 1.0, "noisy": 0.1})
    tr = RewardTrainer(cfg, train_records=recs, eval_records=[], tokenizer=ptok)
    with torch.no_grad():
        scores = tr._scores(tr.train_items)
        per = [tr.loss([it], [s]).item() for it, s in zip(tr.train_items, scores)]
    w = [it["weight"] for it in tr.train_items]
    m = tr.train_step()
    return m["loss"], sum(a * b for a, b in zip(w, per)) / sum(w), m["grad_norm"]


def test_reward_grad_accum_split_keeps_the_weighted_step_loss(tmp_path, ptok):
    """docs/from_trl.md (``gradient_accumulation_steps``): the loss is normalised over the whole
    optimizer step, so the micro-batch split does not change it. With annotator weights the
    reward trainer's step loss is Σ w·loss / Σ w over all the step's items (as DPO / KTO's
    weighted_share and the reward eval_loss), whether 4 × 1 or 2 × 2 (micro-batches of unequal
    weight: 0.2 and 2)."""
    recs = synthetic_preference_records(4, seed=4)
    for i, r in enumerate(recs):
        r.annotator = "careful" if i >= 2 else "noisy"
    whole, expected, g1 = _reward_step(tmp_path, ptok, recs, 4, 1)
    split, expected2, g2 = _reward_step(tmp_path, ptok, recs, 2, 2)
    assert whole == pytest.approx(expected, rel=1e-5)
    assert expected2 == pytest.approx(expected, rel=1e-6)
    assert split == pytest.approx(expected, rel=1e-5)  # was the unweighted mean of the two micro-batch means
    assert g2 == pytest.approx(g1, rel=1e-4)


def test_min_lr_ratio_with_the_constant_schedule_is_refused():
    """``min_lr_ratio`` ends a linear / cosine decay; ``constant`` has none, so a non-zero value
    did nothing at all (the LR stayed at lr). Refused naming the key, as with transformers'
    schedules, in the offline configs and RL's ``optim`` section alike."""
    from rlhf_fast.trainers.rl_config import OptimConfig
    from rlhf_fast.trainers.sft import SFTConfig

    with pytest.raises(ValueError, match="min_lr_ratio"):
        SFTConfig(lr_schedule="constant", min_lr_ratio=0.5)
    with pytest.raises(ValueError, match="optim.min_lr_ratio"):
        OptimConfig(schedule="constant", min_lr_ratio=0.5)
    SFTConfig(lr_schedule="constant", min_lr_ratio=0.0)  # (0, the default, stays accepted)
    from rlhf_fast.trainers.common import make_scheduler

    with pytest.raises(ValueError, match="min_ratio"):  # the Python API too
        make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), total_steps=10,
                       kind="constant", min_ratio=0.5)


def _row(key: str) -> str:
    for line in DOCS.read_text().splitlines():
        if line.startswith(f"| `{key}` |"):
            return line
    raise AssertionError(f"no row for {key} in {DOCS}")


def test_docs_state_the_warmup_formula_that_differs_from_transformers():
    """Our ``constant`` / ``linear`` / ``cosine`` warm up as (step + 1) / warmup_steps (the first
    step already trains), transformers' as step / warmup_steps (its first step has LR 0): the
    docs row said "our constant with warm-up is constant_with_warmup", which is false; it must
    state the difference."""
    from transformers.optimization import get_constant_schedule_with_warmup

    theirs = get_constant_schedule_with_warmup(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 4)
    assert [lr_lambda(s, warmup_steps=4, total_steps=10, kind="constant") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [theirs.lr_lambdas[0](s) for s in range(4)] == [0.0, 0.25, 0.5, 0.75]
    row = _row("lr_scheduler_type")
    assert "so our `constant` with warm-up is `constant_with_warmup`" not in row
    assert "(step + 1) / `warmup_steps`" in row and "step / `warmup_steps`" in row
    # the recipes the row gives for transformers' exact cosine / linear with a warm-up hold
    import transformers.optimization as hf

    from rlhf_fast.trainers.common import supervised_scheduler
    from rlhf_fast.trainers.sft import SFTConfig

    assert "`cosine_with_min_lr` with `lr_scheduler_kwargs: {min_lr_rate: 0}` for `cosine`" in row
    assert "`polynomial` with `{power: 1, lr_end: 0}` for `linear`" in row
    for sched, kw, fn in (("cosine_with_min_lr", {"min_lr_rate": 0}, hf.get_cosine_schedule_with_warmup),
                          ("polynomial", {"power": 1, "lr_end": 0}, hf.get_linear_schedule_with_warmup)):
        cfg = SFTConfig(lr=1e-3, max_steps=12, warmup_steps=4, lr_schedule=sched, lr_scheduler_kwargs=kw)
        ours = supervised_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), cfg)
        ref = fn(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), 4, 12)
        assert [ours.lr_lambdas[0](s) for s in range(13)] == [ref.lr_lambdas[0](s) for s in range(13)]


def test_bema_warns_when_no_update_fits_in_the_run():
    """TRL's defaults (update_freq 400) with our default max_steps 200: no BEMA update ever
    happens and RUN_DIR/bema silently holds the initial weights. A warning says so once, at the
    first step; a run long enough for an update stays silent."""
    from rlhf_fast.trainers.bema import BEMAConfig, BEMAState, maybe_bema_update

    model = torch.nn.Linear(2, 2)

    def trainer(max_steps, **kw):
        t = types.SimpleNamespace(cfg=types.SimpleNamespace(max_steps=max_steps), step=0)
        t._bema = BEMAState(BEMAConfig(**kw), model)
        return t

    t = trainer(200)
    with pytest.warns(UserWarning, match=r"bema: no BEMA update .*step 400.*max_steps 200"):
        t.step = 1
        maybe_bema_update(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.step = 2
        maybe_bema_update(t)  # once only
        ok = trainer(10, update_freq=4, update_after=3)  # first update at step 7
        ok.step = 1
        maybe_bema_update(ok)
    with pytest.warns(UserWarning, match=r"step 8 .*max_steps 7"):
        late = trainer(7, update_freq=4, update_after=4)
        late.step = 1
        maybe_bema_update(late)


def test_logged_lr_is_the_lr_the_step_trained_with(tmp_path, ptok):
    """transformers 5's Trainer logs ``learning_rate`` as read before ``lr_scheduler.step()``
    ("get learning rate before update"): the LR the logged step's update used. Ours logged
    ``get_last_lr()`` after the scheduler's step, i.e. the next step's LR (0 at the last step of
    a decay to 0, while the step itself trained at a positive LR)."""
    from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records

    cfg = SFTConfig(model=TINY, output_dir=str(tmp_path / "lr"), batch_size=2, lr=1e-3, warmup_steps=0,
                    lr_schedule="linear", max_steps=3, eval_every=0, eval_fraction=0, max_len=32)
    tr = SFTTrainer(cfg, train_records=synthetic_sft_records(8), eval_records=[], tokenizer=ptok)
    used, real_step = [], tr.optimizer.step

    def step(*a, **kw):
        used.append(tr.optimizer.param_groups[0]["lr"])
        return real_step(*a, **kw)

    tr.optimizer.step = step
    logged = [tr.train_step()["lr"] for _ in range(3)]
    assert used == pytest.approx([1e-3, 2e-3 / 3, 1e-3 / 3])
    assert logged == used


def test_sync_ref_model_warns_when_no_sync_fits_in_the_run():
    """TRL's default ref_model_sync_steps (512) with our default max_steps (200): the reference
    never moves, and the run is plain DPO without a word. A warning says so once; a run long
    enough for a sync stays silent."""
    from rlhf_fast.trainers.dpo import maybe_sync_reference

    def trainer(max_steps, sync_steps):
        cfg = types.SimpleNamespace(max_steps=max_steps, ref_model_sync_steps=sync_steps, ref_model_mixup_alpha=0.6)
        return types.SimpleNamespace(cfg=cfg, step=1, _sync_pairs=[])

    t = trainer(200, 512)
    with pytest.warns(UserWarning, match=r"sync_ref_model: .*step 512.*max_steps 200"):
        maybe_sync_reference(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.step = 2
        maybe_sync_reference(t)  # once only
        maybe_sync_reference(trainer(4, 4))
        off = trainer(2, 512)
        off._sync_pairs = None  # sync_ref_model off: nothing to say
        maybe_sync_reference(off)


def test_docs_list_the_training_defaults_that_differ_from_trl():
    """docs/from_trl.md's opening lists the defaults that differ from TRL's ("Set them explicitly
    when you port a TRL run"). Each training hyper-parameter of SFTConfig whose default differs
    from TRL 1.16's SFTConfig must be named there: a port that leaves ``warmup_steps`` out gets 10
    warm-up steps here and none in TRL."""
    import dataclasses

    import trl

    from rlhf_fast.trainers.sft import SFTConfig

    theirs = {f.name: f.default for f in dataclasses.fields(trl.SFTConfig)}
    ours = {f.name: f.default for f in dataclasses.fields(SFTConfig)}
    text = DOCS.read_text()
    intro = text[text.index("The defaults differ from TRL's"):text.index("Set them explicitly")]
    pairs = {"learning_rate": "lr", "max_length": "max_len", "lr_scheduler_type": "lr_schedule",
             "warmup_steps": "warmup_steps", "gradient_checkpointing": "gradient_checkpointing",
             "max_grad_norm": "grad_clip", "weight_decay": "weight_decay"}
    differ = [o for t, o in pairs.items() if theirs[t] != ours[o]]
    assert "warmup_steps" in differ and "grad_clip" not in differ
    missing = [o for o in differ if f"`{o}" not in intro]
    assert not missing, missing


def test_reward_and_prm_log_the_epochs_done(tmp_path):
    """transformers' Trainer logs ``epoch`` (state.epoch: epochs done, counted in micro-batches)
    for every trainer; the reward and PRM trainers logged none."""
    from rlhf_fast.trainers.prm import PRMTrainer, synthetic_stepwise_records
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records
    from tests.test_prm import _cfg as prm_cfg
    from tests.test_reward import preference_tokenizer

    cfg = RewardConfig(model=TINY, output_dir=str(tmp_path / "rm"), batch_size=4, lr=1e-3, warmup_steps=0,
                       eval_every=0, max_len=48, max_steps=3)
    tr = RewardTrainer(cfg, train_records=synthetic_preference_records(8, seed=7), eval_records=[],
                       tokenizer=preference_tokenizer())
    assert len(tr.train_items) == 8
    assert [tr.train_step()["epoch"] for _ in range(3)] == [0.5, 1.0, 1.5]
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    recs = synthetic_stepwise_records(8, seed=3)
    ptok = train_tokenizer(sample_texts(64) + [r.prompt + "\n" + "\n".join(r.completions) for r in recs], 300,
                           padding_side="right")
    pr = PRMTrainer(prm_cfg(tmp_path, "prm", batch_size=4, max_steps=3), train_records=recs, eval_records=[],
                    tokenizer=ptok)
    assert len(pr.train_items) == 8
    assert [pr.train_step()["epoch"] for _ in range(3)] == [0.5, 1.0, 1.5]
