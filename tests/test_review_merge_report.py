"""Review of model merging (rlhf_fast.models.merge, the ``rlhf-fast merge`` command), BEMA, the
best checkpoint and the run report: one test per defect found (compared with mergekit's
per-tensor functions and plan, TRL's MergeModelCallback / BEMACallback, transformers); each
failed before its fix."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhf_fast.models.merge import MergeConfig, merge_model_folders, merge_state_dicts, ties_tensor

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """Two tiny llama folders (2 layers, h=16) of one architecture, inside one parent folder."""
    from rlhf_fast.models.tiny import tiny_causal_lm

    root = tmp_path_factory.mktemp("review_merge") / "run"
    for name, seed in (("policy", 1), ("target", 2)):
        tiny_causal_lm(64, hidden_size=16, num_layers=2, num_heads=2, seed=seed).save_pretrained(root / name)
    return {"root": str(root), "policy": str(root / "policy"), "target": str(root / "target")}


def _cli(*argv):
    """``rlhf-fast merge ARGV`` in a subprocess: (exit code, stderr lines)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "merge", *argv], capture_output=True,
                       text=True, cwd=repo)
    return r.returncode, [line for line in r.stderr.strip().splitlines() if line.strip()]


# ---- per tensor ----

@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_ties_keeps_the_shape_of_a_scalar_tensor(method):
    """mergekit's merge_group stacks the task vectors on a new axis and sums it away: a 0-dim
    parameter (a learned scale) stays 0-dim. A (1,) tensor would not load into the model."""
    p, t = torch.tensor(1.0), torch.tensor(3.0)
    assert ties_tensor(p, t, 1.0, 1.0).shape == torch.Size([])
    out = merge_state_dicts({"scale": p}, {"scale": t}, method, target_model_density=1.0, dtype="float32")
    assert out["scale"].shape == torch.Size([]) and out["scale"].item() == 3.0


def test_layer_gradients_follow_each_layer_stack(tmp_path):
    """mergekit plans each module's layers on its own gradient (i / (N - 1) of that module): a
    model with a vision tower of 4 blocks beside 2 text layers reads a list setting at 0 and 1
    in the text layers and at 0, 1/3, 2/3, 1 in the blocks. The command (and the trainer hook)
    passed the text config's layer count, so the blocks read past the list (IndexError, a
    traceback); without it the text layers were stretched over the blocks' count."""
    import json

    from safetensors.torch import save_file

    names = ["model.layers.0.w", "model.layers.1.w"] + [f"visual.blocks.{i}.w" for i in range(4)]
    want_text, want_blocks = [0.0, 1.0], [0.0, 1 / 3, 2 / 3, 1.0]
    p = {n: torch.zeros(2) for n in names}
    t = {n: torch.ones(2) for n in names}
    out = merge_state_dicts(p, t, "linear", policy_model_weight=[1.0, 0.0], target_model_weight=[0.0, 1.0],
                            dtype="float32")
    assert [out[f"model.layers.{i}.w"][0].item() for i in range(2)] == want_text
    assert [out[f"visual.blocks.{i}.w"][0].item() for i in range(4)] == pytest.approx(want_blocks)
    folders = {}
    for name, sd in (("policy", p), ("target", t)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        save_file(sd, str(folders[name] / "model.safetensors"), metadata={"format": "pt"})
        (folders[name] / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    cfg = MergeConfig(method="ties", target_model_density=[0.0, 1.0], dtype="float32")
    merge_model_folders(str(folders["policy"]), str(folders["target"]), str(tmp_path / "out"), cfg)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert [got[f"model.layers.{i}.w"][0].item() for i in range(2)] == want_text
    assert [got[f"visual.blocks.{i}.w"].mean().item() for i in range(4)] == [0.0, 0.5, 0.5, 1.0]


# ---- model folders and the command ----

def test_overwrite_never_replaces_a_folder_holding_the_inputs(tiny_folders, tmp_path):
    """OUT_DIR that contains the policy or the target folder (their run folder) is refused even
    with overwrite: replacing it would delete the models being merged (and the rest of it)."""
    import shutil

    root = str(tmp_path / "run")
    shutil.copytree(tiny_folders["root"], root)
    policy, target = os.path.join(root, "policy"), os.path.join(root, "target")
    keep = os.path.join(root, "notes.txt")
    with open(keep, "w") as f:
        f.write("keep")
    try:
        for out in (root, str(tmp_path)):
            with pytest.raises(ValueError, match="out_dir .* holds the (policy|target)"):
                merge_model_folders(policy, target, out, overwrite=True)
    finally:
        survived = os.path.isfile(os.path.join(policy, "model.safetensors"))
        assert survived and os.path.isfile(keep), sorted(os.listdir(tmp_path))


def test_cli_refuses_unreadable_weights_in_one_line(tiny_folders, tmp_path):
    """A target folder whose model.safetensors is not a safetensors file (a torn download)
    exits 2 with one line naming the file, not a SafetensorError traceback."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_folders["target"], bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    code, err = _cli(tiny_folders["policy"], str(bad), str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and "model.safetensors" in err[0], err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_out_dir_that_cannot_be_written_in_one_line(tiny_folders, tmp_path):
    """OUT_DIR below a file, or empty, is refused before the merge, exit 2 with one line."""
    (tmp_path / "afile").write_text("x")
    for out in (str(tmp_path / "afile" / "merged"), ""):
        code, err = _cli(tiny_folders["policy"], tiny_folders["target"], out)
        assert code == 2 and len(err) == 1 and "out_dir" in err[0], (out, err)


# ---- the run report ----

def test_report_best_is_the_lowest_of_every_logged_loss():
    """The page says `best` is the lowest value for losses (transformers: a metric whose name
    ends in "loss" is lower-is-better), but SDFT / SDPO's distillation losses and the hybrid
    distillation's matched / unmatched losses got no best. The policy losses of
    advantage-weighted objectives keep none (their value is no measure of progress)."""
    from rlhf_fast.trainers.report import summarize_metric

    keys = ("sdft/distillation_loss", "self_distillation/distillation_loss", "matched_loss")
    nopol = ("policy/loss", "self_distillation/policy_loss")
    recs = [{"step": s, **{k: v for k in keys + nopol}} for s, v in ((1, 1.0), (2, 0.5), (3, 0.7))]
    assert [summarize_metric(recs, k).best for k in keys] == [(2, 0.5)] * 3
    assert [summarize_metric(recs, k).best for k in nopol] == [None, None]


# ---- the trainer hook ----

def test_trainer_merge_of_gathered_tied_weights(tmp_path, monkeypatch):
    """Under FSDP2 the gathered full state dict holds tied weights as separate copies (torch's
    get_model_state_dict gathers each name), so the model's own once-saved names must decide:
    with ``merge.target`` (a save_pretrained folder, no lm_head.weight) the first merge was
    refused after training ("the target model has no tensor 'lm_head.weight'"), which the set-up
    check (names from the model itself) had let pass; the initial-policy target and the merged
    folder held an lm_head.weight that save_pretrained leaves out."""
    import rlhf_fast.distributed as distributed
    from rlhf_fast.distributed import DistContext
    from rlhf_fast.models.tiny import tiny_causal_lm
    from rlhf_fast.trainers.merging import check_merge_target, initial_target, save_merged

    model = tiny_causal_lm(64, hidden_size=16, num_layers=2, num_heads=2, seed=1, tie_word_embeddings=True)
    tiny_causal_lm(64, hidden_size=16, num_layers=2, num_heads=2, seed=2,
                   tie_word_embeddings=True).save_pretrained(tmp_path / "target")
    saved = set(load_file(str(tmp_path / "target" / "model.safetensors")))
    assert "lm_head.weight" not in saved  # (what save_pretrained writes of a tied model)
    # FSDP2's full_state_dict: every name gathered into its own CPU tensor
    monkeypatch.setattr(distributed, "full_state_dict",
                        lambda m, ctx, strategy: {k: v.detach().clone() for k, v in m.state_dict().items()})
    ctx = DistContext()
    for target in (str(tmp_path / "target"), None):
        merge = MergeConfig(method="linear", target=target, dtype="float32")
        check_merge_target(merge, model)
        kept = initial_target(merge, model, ctx, "fsdp2")
        assert kept is None or set(kept) == saved
        folder = tmp_path / ("with_target" if target else "initial")
        save_merged(merge, kept, model, None, str(folder), ctx, "fsdp2")
        assert set(load_file(str(folder / "merged" / "model.safetensors"))) == saved
