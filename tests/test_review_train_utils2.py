"""Review of the training utilities (second pass): activation offloading
(rlhf_fast/models/activation_offload.py), fp16 loss scaling (rlhf_fast/trainers/mixed_precision.py),
best-checkpoint tracking and BEMA, against plain PyTorch autograd, torch's GradScaler and TRL."""

import contextlib

import pytest
import torch
from torch import nn

from rlhf_fast.models.activation_offload import activation_offloading
from rlhf_fast.trainers.mixed_precision import LossScaler

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def everywhere(t: torch.Tensor) -> bool:
    """The fake accelerator: every CPU tensor counts as offloadable."""
    return True


def _sin_grad_after_inplace(off):
    """``sin(y)`` saves ``y``; ``y`` is then changed in place before the backward (a bug in the
    model code that plain autograd refuses). Returns the gradient the backward produced."""
    x = torch.linspace(-1.0, 1.0, 8, requires_grad=True)
    with off:
        y = x * 2
        z = y.sin()
        y.add_(1.0)
        loss = z.sum()
    loss.backward()
    return x.grad


def test_offloading_keeps_autograds_inplace_check_on_kept_tensors():
    """Plain autograd refuses a backward whose saved tensor was changed in place after the forward
    saved it ("modified by an inplace operation"). Under activation_offloading, a saved tensor the
    hooks keep on the device (below min_offload_size, a weight, an output-head tensor) came back
    without that version check, so the backward silently used the changed values: here
    2·cos(y + 1) instead of 2·cos(y) — a wrong gradient where PyTorch raises."""
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _sin_grad_after_inplace(contextlib.nullcontext())
    m = nn.Linear(2, 2)
    off = activation_offloading(m, offloadable=everywhere, min_offload_size=10**9)  # everything kept
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _sin_grad_after_inplace(off)


def test_disabled_scaler_warns_on_a_damaged_checkpoint_state():
    """A run without fp16 resumed from a checkpoint whose ``scaler`` entry is not a mapping (a
    damaged extra.json) failed with "AttributeError: 'list' object has no attribute 'get'" raised
    while formatting the warning that the state is dropped; it now gives that warning, naming the
    checkpoint (the state is unused without fp16)."""
    s = LossScaler(False, "cpu")
    with pytest.warns(RuntimeWarning, match="checkpoint ck was written by an fp16 run"):
        s.load_state_dict([65536.0], "checkpoint ck")


def test_bema_no_update_warning_is_true_about_the_reference():
    """With ``update_ref_model`` and no BEMA update within max_steps, the reference is still
    overwritten at every reference update that fits (steps 1..5 here, ref_model_update_freq 1)
    with the BEMA weights, which are the initial policy's (TRL's running model before any update):
    a reference loaded from ``ref_model`` (another model) does move. The warning said "the
    reference never moves"; it must say what it takes."""
    from rlhf_fast.trainers.bema import BEMAConfig, warn_if_no_update

    b = BEMAConfig(update_freq=100, update_ref_model=True, ref_model_update_freq=1)
    with pytest.warns(UserWarning, match="no BEMA update") as rec:
        assert warn_if_no_update(b, max_steps=5)
    msg = str(rec[0].message)
    assert "never moves" not in msg and "initial policy" in msg
    # no reference update within the run either: then it does stay as it is
    b = BEMAConfig(update_freq=100, update_ref_model=True, ref_model_update_freq=50, ref_model_update_after=0)
    with pytest.warns(UserWarning, match="the reference never moves"):
        warn_if_no_update(b, max_steps=5)


def test_missing_best_checkpoint_warning_says_what_differs_from_transformers(tmp_path):
    """Resumed with the recorded best checkpoint gone, transformers' Trainer only forgets its
    folder (``best_model_checkpoint = None``) and keeps ``best_metric`` as the bar a later
    evaluation must beat (transformers/trainer.py, the resume branch of ``_inner_training_loop``);
    ours forgets the metric too, so the best is chosen among the later checkpoints. The warning
    said "(transformers does the same)": it must say how it differs."""
    import types

    from rlhf_fast.trainers.best_checkpoint import BestCheckpoint

    cfg = types.SimpleNamespace(metric_for_best_model=None, greater_is_better=None, save_every=2, max_steps=10,
                                load_best_model_at_end=True)
    best = BestCheckpoint(cfg)
    state = {"metric_for_best_model": "eval_loss", "greater_is_better": False, "best_metric": 1.5,
             "best_global_step": 4}
    with pytest.warns(UserWarning, match="does not exist anymore") as rec:
        best.load(state, str(tmp_path))
    assert (best.metric, best.step) == (None, None)
    msg = str(rec[0].message)
    assert "transformers does the same" not in msg and "later checkpoints" in msg
