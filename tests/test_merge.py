"""Model merging (rlhf_fast.models.merge; the ``merge`` section, rlhf_fast.trainers.merging; the
``rlhf-fast merge`` command): TRL's experimental MergeModelCallback / MergeConfig, whose merges
mergekit computes. Each method equals mergekit's per-tensor functions, transcribed below from
mergekit 0.1.5 (file and function named at each), bit for bit, in float32 / float16 / bfloat16,
with the roles TRL's ``create_merge_config_*`` give the two models (the policy is the base of
ties / dare_ties / slerp). (Run once against mergekit 0.1.5 itself on two tiny llama folders with
TRL's config dicts: linear, ties, slerp and their layer gradients bit-identical in float32,
float16 and bfloat16; dare_ties differs only by its random stream.) Also hand-computed values,
dare's seeded determinism, the slerp endpoints, the CLI end to end and its refusals, and the
trainer hook: merged folders loadable by transformers, equal to the merge of the live weights
with the initial ones, and an exact resume with them."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from rlhf_fast.models.merge import (MergeConfig, layer_fraction, linear_tensor, merge_model_folders, merge_state_dicts,
                                    random_sparsify, setting_at, slerp_tensor, tensor_generator, ties_tensor)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---- mergekit 0.1.5, transcribed (two inputs; the batch axis of TensorBatch is one output) ----

def mk_linear(p, t, wp, wt, normalize=True):
    """mergekit/merge_methods/linear.py: linear_merge (batch of one output)."""
    first = p
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = torch.tensor([[wp, wt]]).to(dtype)
    coefficient_shape = (1,) + (1,) * (first.ndim - 1)
    if normalize:
        denominator = weight.sum(dim=1).reshape(coefficient_shape)
    result = torch.zeros_like(first[None], dtype=dtype)
    for tensor, coefficient in zip((p[None], t[None]), weight.unbind(1)):
        result.addcmul_(tensor, coefficient.reshape(coefficient_shape))
    if normalize:
        result.div_(denominator)
    return result.to(first.dtype)[0]


def mk_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    """mergekit/merge_methods/slerp.py: slerp (one output, one chunk)."""
    v0, v1 = v0[None], v1[None]
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(v0.shape[0], -1)
    b = v1.reshape(v1.shape[0], -1)
    t = torch.tensor([t]).reshape(-1, 1).to(dtype)
    x, y = a.to(dtype), b.to(dtype)
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x, dim=1, keepdim=True)]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(y, dim=1, keepdim=True)]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((x / norm_a) * (y / norm_b)).sum(dim=1, keepdim=True)]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    result[:, :] = coef_a * x + coef_b * y
    return result.reshape(v0.shape)[0]


def mk_rescaled_masked_tensor(tensor, mask, l1, eps=1e-7):
    """mergekit/sparsify.py: rescaled_masked_tensor (norm None or l1)."""
    masked = tensor * mask
    if not l1:
        return masked
    before_scale, after_scale = tensor.abs().sum(), masked.abs().sum()
    if before_scale < eps or after_scale < eps:
        return masked
    return masked * (before_scale / after_scale)


def mk_magnitude(tensor, density):
    """mergekit/sparsify.py: magnitude (rescale_norm None, as ties' default)."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    w = tensor.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    topk = torch.argsort(w, descending=True)[:k]
    mask[topk] = 1
    return mk_rescaled_masked_tensor(tensor, mask.reshape_as(tensor), False)


def mk_bernoulli(tensor, density):
    """mergekit/sparsify.py: bernoulli with RescaleNorm.l1 (dare_ties' default rescale), global RNG."""
    if density >= 1:
        return tensor
    work_dtype = tensor.dtype if tensor.dtype == torch.bfloat16 else torch.float32
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density, dtype=work_dtype))
    res = mk_rescaled_masked_tensor(tensor.to(work_dtype), mask, True)
    return res.to(tensor.dtype)


def mk_get_mask(delta, mask_dtype):
    """mergekit/merge_methods/generalized_task_arithmetic.py: get_mask, method "sum"."""
    sign = delta.sign().to(mask_dtype)
    sign_weight = delta.sum(dim=0)
    majority_sign = (sign_weight >= 0).to(mask_dtype) * 2 - 1
    return sign == majority_sign


def mk_merge_group(base, other, weight, density, normalize, dare):
    """mergekit/merge_methods/generalized_task_arithmetic.py: GeneralizedTaskArithmeticMerge.merge_group
    for ties (magnitude) / dare_ties (random, rescale) with one non-base entry, lambda 1."""
    deltas = base.new_empty((1, *base.shape))
    delta = other - base
    delta = mk_bernoulli(delta, density) if dare else mk_magnitude(delta, density)
    deltas[0] = delta
    weights = torch.tensor([weight], dtype=deltas.dtype)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    mask = mk_get_mask(deltas, base.dtype)
    mixed_delta = (deltas * mask).sum(dim=0)
    divisor = (weights * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed_delta /= divisor
    return (base + mixed_delta).to(base.dtype)


def mk_evaluate_setting(setting, t):
    """mergekit/config.py: evaluate_setting (numbers and numeric lists)."""
    if isinstance(setting, (float, int)):
        return setting
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


def _pair(shape, dtype, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g)
    t = p + scale * torch.randn(shape, generator=g)
    return p.to(dtype), t.to(dtype)


def _bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), (a - b).abs().max()


# ---- per tensor: mergekit's numbers ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (6, 42), (3, 5, 4)])
def test_linear_and_slerp_equal_mergekit(dtype, shape):
    p, t = _pair(shape, dtype)
    for wp, wt, norm in ((0.5, 0.5, True), (0.3, 1.1, True), (0.3, 1.1, False), (1.0, -0.25, True)):
        _bits_equal(linear_tensor(p, t, wp, wt, norm), mk_linear(p, t, wp, wt, norm))
    for tv in (0.0, 0.3, 0.5, 0.9, 1.0):
        _bits_equal(slerp_tensor(tv, p, t), mk_slerp(tv, p, t))
    # near-colinear (lerp fallback) and antipodal pairs
    _bits_equal(slerp_tensor(0.4, p, 2 * p), mk_slerp(0.4, p, 2 * p))
    _bits_equal(slerp_tensor(0.4, p, -p), mk_slerp(0.4, p, -p))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (6, 42), (123,)])
def test_ties_equals_mergekit(dtype, shape):
    p, t = _pair(shape, dtype, seed=3)
    t = t.clone()
    t.view(-1)[0] = p.view(-1)[0]  # a zero task-vector entry (its sign mask is false)
    for w, d, norm in ((1.0, 1.0, True), (1.0, 0.3, True), (0.7, 0.5, False), (0.7, 0.5, True), (1.0, 0.0, True),
                       (-0.5, 0.6, True)):
        _bits_equal(ties_tensor(p, t, w, d, norm), mk_merge_group(p, t, w, d, norm, dare=False))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_ties_equals_mergekit_given_the_same_random_stream(dtype):
    """mergekit draws from torch's global generator; ours from a tensor's own generator: seeded
    alike, the two streams (and merges) are the same."""
    p, t = _pair((6, 42), dtype, seed=4)
    for w, d, norm in ((1.0, 0.5, True), (0.7, 0.3, False), (1.0, 1.0, True)):
        torch.manual_seed(11)
        want = mk_merge_group(p, t, w, d, norm, dare=True)
        got = ties_tensor(p, t, w, d, norm, dare=True, generator=torch.Generator().manual_seed(11))
        _bits_equal(got, want)


def test_settings_follow_mergekit_gradients():
    for setting in ([1.0, 0.7, 0.1], [0.2, 0.9], [0.5], 0.25):
        for where in (0.0, 0.2, 0.5, 2 / 3, 1.0):
            assert setting_at(setting, where) == pytest.approx(mk_evaluate_setting(setting, where), abs=0)
    # mergekit's plan.py: layer i of N at i / (N - 1) (one layer: 1); outside the layers 0
    assert layer_fraction("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    assert layer_fraction("model.layers.0.self_attn.q_proj.weight", 1) == 1.0
    assert layer_fraction("transformer.h.3.attn.c_attn.weight", 4) == 1.0
    assert layer_fraction("model.embed_tokens.weight", 5) == 0.0 == layer_fraction("lm_head.weight", 5)


# ---- hand-computed values ----

def test_hand_computed_values():
    p, t = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert linear_tensor(p, t, 0.5, 0.5).tolist() == [2.0, 4.0]
    assert linear_tensor(p, t, 1.0, 3.0).tolist() == [2.5, 5.0]  # (1·1 + 3·3) / 4, (2 + 18) / 4
    assert linear_tensor(p, t, 1.0, 3.0, normalize=False).tolist() == [10.0, 20.0]
    p0, t0 = torch.zeros(4), torch.tensor([4.0, -1.0, 2.0, -3.0])
    assert ties_tensor(p0, t0, 0.5, 0.5).tolist() == [4.0, 0.0, 0.0, -3.0]  # top 2 of |δ|; w normalised away
    assert ties_tensor(p0, t0, 0.5, 0.5, normalize=False).tolist() == [2.0, 0.0, 0.0, -1.5]
    assert ties_tensor(p0 + 1, t0 + 1, 1.0, 1.0).tolist() == (t0 + 1).tolist()  # TRL's defaults: the target
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    s = slerp_tensor(0.5, a, b)
    assert torch.allclose(s, torch.tensor([0.5 ** 0.5, 0.5 ** 0.5]), atol=1e-7)  # 45° on the unit circle
    s = slerp_tensor(1 / 3, 2 * a, 2 * b)
    assert torch.allclose(s, 2 * torch.tensor([0.8660254, 0.5]), atol=1e-6)  # 30°, norm kept
    assert slerp_tensor(0.5, torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])).tolist() == [1.5, 3.0]  # colinear


def test_dare_is_seeded_rescaled_and_leaves_the_global_rng_alone():
    p, t = _pair((64, 32), torch.float32, seed=5)
    delta = t - p
    state = torch.get_rng_state()
    a = merge_state_dicts({"w": p}, {"w": t}, "dare_ties", target_model_density=0.3, dtype="float32", seed=7)["w"]
    assert torch.equal(torch.get_rng_state(), state)
    b = merge_state_dicts({"w": p}, {"w": t}, "dare_ties", target_model_density=0.3, dtype="float32", seed=7)["w"]
    c = merge_state_dicts({"w": p}, {"w": t}, "dare_ties", target_model_density=0.3, dtype="float32", seed=8)["w"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = (a - p) != 0
    assert 0.2 < kept.float().mean() < 0.4
    # the kept entries are δ scaled by one factor, which keeps δ's L1 norm
    scale = (delta.abs().sum() / delta[kept].abs().sum()).item()
    assert torch.allclose((a - p)[kept], delta[kept] * scale, rtol=1e-5, atol=1e-6)
    # per-tensor streams: a tensor's merge does not depend on what else is merged
    two = merge_state_dicts({"v": p, "w": p}, {"v": t, "w": t}, "dare_ties", target_model_density=0.3,
                            dtype="float32", seed=7)
    assert torch.equal(two["w"], a) and not torch.equal(two["v"], a)
    g = tensor_generator(7, "w")
    assert torch.equal(random_sparsify(delta, 0.3, g), random_sparsify(delta, 0.3, tensor_generator(7, "w")))


def test_slerp_endpoints_are_the_policy_and_the_target():
    """TRL makes the policy slerp's base model: t = 0 gives the policy, t = 1 the target."""
    p, t = _pair((5, 9), torch.float32, seed=6, scale=1.0)
    assert torch.allclose(merge_state_dicts({"w": p}, {"w": t}, "slerp", t_values=0.0, dtype="float32")["w"], p,
                          atol=1e-6)
    assert torch.allclose(merge_state_dicts({"w": p}, {"w": t}, "slerp", t_values=1.0, dtype="float32")["w"], t,
                          atol=1e-6)


def test_state_dicts_dtype_gradients_and_refusals():
    p, t = _pair((4, 4), torch.float32, seed=8)
    sd_p = {"model.embed_tokens.weight": p, "model.layers.0.w": p, "model.layers.1.w": p, "ids": torch.arange(3)}
    sd_t = {"model.embed_tokens.weight": t, "model.layers.0.w": t, "model.layers.1.w": t, "ids": torch.arange(3)}
    out = merge_state_dicts(sd_p, sd_t, "linear", policy_model_weight=[1.0, 0.0], target_model_weight=[0.0, 1.0])
    assert list(out) == list(sd_p) and out["model.embed_tokens.weight"].dtype == torch.float16  # TRL's dtype
    assert torch.equal(out["model.embed_tokens.weight"], p.half())  # outside the layers: the gradient's start
    assert torch.equal(out["model.layers.0.w"], p.half()) and torch.equal(out["model.layers.1.w"], t.half())
    assert torch.equal(out["ids"], torch.arange(3))
    with pytest.raises(ValueError, match="target model has no tensor 'x'"):
        merge_state_dicts({"x": p}, {"y": p})
    with pytest.raises(ValueError, match=r"tensor 'x' is \(4, 4\) in the policy but \(2, 8\)"):
        merge_state_dicts({"x": p}, {"x": p.reshape(2, 8)})
    with pytest.raises(ValueError, match="non-floating tensor 'ids' differs"):
        merge_state_dicts({"ids": torch.arange(3)}, {"ids": torch.arange(3) + 1})
    with pytest.raises(ValueError, match="must not (sum to|be) 0"):
        merge_state_dicts({"x": p}, {"x": t}, "linear", policy_model_weight=1.0, target_model_weight=-1.0)


def test_config_defaults_and_refusals():
    """TRL's MergeConfig defaults per method; keys a method does not use refused."""
    assert MergeConfig().method_kwargs() == dict(method="linear", policy_model_weight=0.5, target_model_weight=0.5,
                                                 policy_model_density=None, target_model_density=None,
                                                 normalize=True, t_values=None, dtype="float16", seed=0)
    ties = MergeConfig(method="ties")
    assert (ties.policy_model_density, ties.target_model_density, ties.normalize) == ([1.0, 0.7, 0.1], [1.0], True)
    assert MergeConfig(method="dare_ties", normalize=0.0).normalize is False  # TRL's float spelling
    assert MergeConfig(method="slerp").t_values == 0.5
    for kw, msg in ((dict(method="task_arithmetic"), "merge.method must be one of"),
                    (dict(method="linear", t_values=0.3), "merge.t_values applies to method slerp"),
                    (dict(method="slerp", target_model_weight=1.0), "target_model_weight applies to method linear"),
                    (dict(method="ties", target_model_density=1.5), "merge.target_model_density must be"),
                    (dict(method="ties", target_model_density=[]), "non-empty list"),
                    (dict(normalize=0.5), "merge.normalize must be true or false"),
                    (dict(dtype="int8"), "merge.dtype must be one of"),
                    (dict(seed=-1), "merge.seed must be"),
                    (dict(merge_at_every_checkpoint="yes"), "merge_at_every_checkpoint must be true or false")):
        with pytest.raises(ValueError, match=msg):
            MergeConfig(**kw)


# ---- model folders and the command ----

def _cli(argv):
    """``rlhf-fast`` ARGV's exit code (argparse's refusals exit through SystemExit)."""
    from rlhf_fast.cli import main

    try:
        return main(argv)
    except SystemExit as e:
        return e.code

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from rlhf_fast.models.tiny import sample_texts, tiny_causal_lm, train_tokenizer

    root = tmp_path_factory.mktemp("merge_models")
    tok = train_tokenizer(sample_texts(32), 300, padding_side="right")
    out = {}
    for name, seed, layers in (("policy", 1, 2), ("target", 2, 2), ("other", 3, 1)):
        m = tiny_causal_lm(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                           bos_token_id=tok.bos_token_id, hidden_size=32, num_layers=layers, num_heads=2, seed=seed)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def test_cli_merges_two_folders_into_a_loadable_model(folders, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_fast.cli import main

    out = str(tmp_path / "merged")
    assert main(["merge", folders["policy"], folders["target"], out, "--method", "ties", "--target-density",
                 "1.0,0.5", "--dtype", "bfloat16"]) == 0
    assert "merge: ties of" in capsys.readouterr().out
    got = load_file(os.path.join(out, "model.safetensors"))
    p, t = load_file(folders["policy"] + "/model.safetensors"), load_file(folders["target"] + "/model.safetensors")
    want = merge_state_dicts(p, t, "ties", target_model_density=[1.0, 0.5], dtype="bfloat16", num_layers=2)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    # layer 0 reads density 1.0 (every entry moves), layer 1 0.5 (half of them stay the policy's)
    same = lambda k: (got[k] == p[k].bfloat16()).float().mean().item()  # noqa: E731
    assert same("model.layers.0.mlp.up_proj.weight") < 0.1 and same("model.layers.1.mlp.up_proj.weight") >= 0.5
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)  # the policy's tokenizer, copied
    assert model.dtype == torch.bfloat16 and len(tok) == 300
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, got["model.layers.1.mlp.up_proj.weight"])
    # slerp at t = 0 is the policy (TRL: the base model), in float16 by default
    out2 = str(tmp_path / "slerp0")
    assert main(["merge", folders["policy"], folders["target"], out2, "--method", "slerp", "--t", "0"]) == 0
    got = load_file(os.path.join(out2, "model.safetensors"))
    assert all(torch.allclose(got[k].float(), p[k].half().float(), atol=1e-3) for k in p)


@pytest.mark.parametrize("args, msg", [
    (["--method", "linear", "--t", "0.3"], "merge.t_values applies to method slerp"),
    (["--method", "nope"], "invalid choice: 'nope'"),
    (["--target-density", "a,b"], "expected a number or comma-separated numbers"),
    (["--normalize", "maybe"], "expected true or false"),
])
def test_cli_refusals_are_one_line_exit_2(folders, tmp_path, capsys, args, msg):
    assert _cli(["merge", folders["policy"], folders["target"], str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1 and err.startswith("rlhf-fast merge")


def test_cli_refuses_bad_folders(folders, tmp_path, capsys):
    import re

    cases = [([str(tmp_path / "missing"), folders["target"], str(tmp_path / "o")], "policy must be a model folder"),
             ([folders["policy"], str(tmp_path), str(tmp_path / "o")], "target: .* has no config.json"),
             ([folders["policy"], folders["other"], str(tmp_path / "o")], "the policy model has no tensor|"
              "target model has no tensor"),
             ([folders["policy"], folders["target"], folders["policy"]], "must not be the policy folder itself")]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    cases.append(([folders["policy"], folders["target"], str(tmp_path / "full")], "exists and is not empty"))
    for argv, msg in cases:
        assert _cli(["merge", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(msg, err), err
    assert (tmp_path / "full" / "x").read_text() == "keep" and not (tmp_path / "o").exists()
    assert merge_model_folders(folders["policy"], folders["target"], str(tmp_path / "full"), overwrite=True)
    assert sorted(os.listdir(tmp_path / "full")) == sorted(
        ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja"])


# ---- the trainer hook ----

TINY = "tiny:llama:hidden_size=32,num_layers=2,num_heads=2,vocab_size=300"


@pytest.fixture(scope="module")
def tok():
    from tests.test_reward import preference_tokenizer

    return preference_tokenizer()


def _sft(tmp_path, tok, name, **kw):
    from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records

    base = dict(model=TINY, output_dir=str(tmp_path / name), lr=3e-2, warmup_steps=0, eval_every=0, log_every=1,
                max_len=48, max_steps=4, device="cpu", batch_size=4)
    base.update(kw)
    return SFTTrainer(SFTConfig(**base), tokenizer=tok, train_records=synthetic_sft_records(24, seed=6),
                      eval_records=[])


def test_sft_writes_merged_folders_of_the_live_and_initial_weights(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    from rlhf_fast.models.merge import unique_state_dict

    t = _sft(tmp_path, tok, "run", save_every=2, keep_checkpoints=2,
             merge=dict(method="slerp", t_values=0.25, dtype="float32", merge_at_every_checkpoint=True))
    initial = {k: v.detach().clone() for k, v in unique_state_dict(t.model.state_dict()).items()}
    t.train()
    final = {k: v.detach().clone() for k, v in unique_state_dict(t.model.state_dict()).items()}
    got = load_file(os.path.join(t.run.path, "final", "merged", "model.safetensors"))
    want = merge_state_dicts(final, initial, "slerp", t_values=0.25, dtype="float32", num_layers=2)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    for step in (2, 4):
        assert os.path.isfile(os.path.join(t.run.path, "checkpoints", f"step_{step:08d}", "merged",
                                           "model.safetensors"))
    last = load_file(os.path.join(t.run.path, "checkpoints", "step_00000004", "merged", "model.safetensors"))
    assert all(torch.equal(last[k], got[k]) for k in got)  # the last checkpoint's weights are the final ones
    model = AutoModelForCausalLM.from_pretrained(os.path.join(t.run.path, "final", "merged"))
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, got["model.layers.1.mlp.up_proj.weight"])
    assert model.config.tie_word_embeddings == t.model.config.tie_word_embeddings
    assert os.path.isfile(os.path.join(t.run.path, "final", "merged", "tokenizer.json"))


def test_sft_resume_is_exact_with_merges_and_the_default_writes_none(tmp_path, tok):
    """dare_ties merges at every checkpoint: a run stopped after step 2 and resumed equals the
    uninterrupted run (weights, log, merged folders: the target is the initial policy in both)."""
    from tests.test_trainer_common import untimed_metrics

    merge = dict(method="dare_ties", target_model_density=0.5, target_model_weight=0.5, dtype="float32",
                 merge_at_every_checkpoint=True)

    def run(name, stop):
        t = _sft(tmp_path, tok, name, save_every=2, keep_checkpoints=1, merge=merge)
        if stop:
            t._maybe_resume()
            while t.step < stop:
                t.train_step()
            t._save()
            t = _sft(tmp_path, tok, name, save_every=2, keep_checkpoints=1, merge=merge)
        t.train()
        state = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        state.update({"final." + k: v for k, v in
                      load_file(os.path.join(t.run.path, "final", "merged", "model.safetensors")).items()})
        state.update({"ck." + k: v for k, v in load_file(os.path.join(
            t.run.path, "checkpoints", "step_00000004", "merged", "model.safetensors")).items()})
        return state, untimed_metrics(t.run.path)

    full, log_full = run("full", 0)
    resumed, log_res = run("resumed", 2)
    assert full.keys() == resumed.keys() and all(torch.equal(full[n], resumed[n]) for n in full)
    late = lambda log: [m for m in log if m["step"] > 2]  # noqa: E731
    assert late(log_full) == late(log_res)
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["step_00000004"]
    plain = _sft(tmp_path, tok, "plain", max_steps=1, save_every=1)
    plain.train()
    assert plain.cfg.merge is None
    assert not os.path.exists(os.path.join(plain.run.path, "final", "merged"))
    assert not os.path.exists(os.path.join(plain.run.path, "checkpoints", "step_00000001", "merged"))


def test_trainer_config_section_and_refusals(tmp_path, folders):
    from rlhf_fast.trainers.config import load_config
    from rlhf_fast.trainers.dpo import DPOConfig
    from rlhf_fast.trainers.kto import KTOConfig
    from rlhf_fast.trainers.reward import RewardConfig
    from rlhf_fast.trainers.sft import SFTConfig

    for cls in (SFTConfig, RewardConfig, DPOConfig, KTOConfig):
        assert load_config(cls).merge is None
        m = load_config(cls, None, ["--merge.method", "ties", "--merge.target_model_density", "0.5,0.2"]).merge
        assert m.method == "ties" and m.target_model_density == [0.5, 0.2]
        assert load_config(cls, None, ["--merge", "{}"]).merge == MergeConfig()
        with pytest.raises(ValueError, match="unknown key merge.weight"):
            cls(model=TINY, merge={"weight": 1.0})
        with pytest.raises(ValueError, match="merge cannot be used with lora"):
            cls(model=TINY, lora={"r": 4}, merge={})
        with pytest.raises(ValueError, match="merge.target must be a model folder"):
            cls(model=TINY, merge={"target": str(tmp_path / "nowhere")})
        assert cls(model=TINY, merge={"target": folders["target"]}).merge.target == folders["target"]


def test_rl_merges_checkpoints_and_final_and_resumes_exactly(tmp_path):
    """GRPO with ties merges at every checkpoint: <checkpoint>/merged and final/merged (beside
    final/policy) are the merges of the live policy with the initial one; a run stopped after
    step 2 and resumed ends with the same weights, log and merged folders."""
    from rlhf_fast.models.merge import unique_state_dict
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import KLConfig, ModelConfig, PPOConfig, RolloutConfig
    from tests.test_rl_learning import PROMPTS, frac_a, make_config, make_policy

    merge = dict(method="ties", target_model_density=0.5, dtype="float32", merge_at_every_checkpoint=True)

    def trainer(name, resume=False):
        pol, tok = make_policy()
        cfg = make_config(tmp_path / name, "grpo", steps=4, save_every=2, keep_checkpoints=1, merge=merge,
                          kl=KLConfig(coef=0.02, placement="loss"), rollout=RolloutConfig(prompts_per_step=2,
                          group_size=2, max_new_tokens=4), ppo=PPOConfig(epochs=1, mini_batch_size=4,
                                                                         micro_batch_size=4))
        if resume:
            cfg.resume = cfg.output_dir
        return RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS)

    a = trainer("a")
    initial = {k: v.detach().clone() for k, v in unique_state_dict(a.policy.state_dict()).items()}
    a.train()
    run = a.run_dir.path
    got = load_file(os.path.join(run, "final", "merged", "model.safetensors"))
    want = merge_state_dicts({k: v.detach() for k, v in unique_state_dict(a.policy.state_dict()).items()}, initial,
                             **a.config.merge.method_kwargs(), num_layers=2)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert sorted(os.listdir(os.path.join(run, "final"))) == ["merged", "policy"]
    ck = load_file(os.path.join(run, "checkpoints", "step_00000004", "merged", "model.safetensors"))
    assert all(torch.equal(ck[k], got[k]) for k in got)
    b = trainer("b")
    b.train(steps=2)
    assert os.path.isdir(os.path.join(b.run_dir.path, "checkpoints", "step_00000002", "merged"))
    c = trainer("b", resume=True)
    c.train()
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(p, q)
    got_c = load_file(os.path.join(c.run_dir.path, "final", "merged", "model.safetensors"))
    assert all(torch.equal(got_c[k], got[k]) for k in got)
    rows = lambda r: [{k: v for k, v in json.loads(ln).items() if not k.startswith(("time/", "tokens_per"))}  # noqa
                      for ln in open(os.path.join(r, "metrics.jsonl"))]
    assert rows(run) == rows(c.run_dir.path)
    with pytest.raises(ValueError, match="merge cannot be used with lora"):
        make_config(tmp_path / "x", "grpo", merge={}, model=ModelConfig(lora={"r": 4}))


@pytest.mark.parametrize("kind", ["reward", "dpo", "kto"])
def test_reward_dpo_kto_write_final_merged(tmp_path, tok, kind):
    """The hook lives in the loop the offline trainers share: each writes final/merged (a
    sequence-classification folder for the reward model), linear 0.5 / 0.5 with the initial weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_fast.models.merge import unique_state_dict
    from rlhf_fast.trainers.dpo import DPOConfig, DPOTrainer
    from rlhf_fast.trainers.kto import KTOConfig, KTOTrainer
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer, synthetic_preference_records

    cls, trainer_cls = {"reward": (RewardConfig, RewardTrainer), "dpo": (DPOConfig, DPOTrainer),
                        "kto": (KTOConfig, KTOTrainer)}[kind]
    cfg = cls(model=TINY, output_dir=str(tmp_path / kind), lr=3e-2, warmup_steps=0, eval_every=0, log_every=1,
              max_len=48, max_steps=2, device="cpu", batch_size=4, merge={"dtype": "float32"})
    t = trainer_cls(cfg, tokenizer=tok, train_records=synthetic_preference_records(16, seed=3), eval_records=[])
    initial = {k: v.detach().clone() for k, v in unique_state_dict(t.model.state_dict()).items()}
    t.train()
    folder = os.path.join(t.run.path, "final", "merged")
    got = load_file(os.path.join(folder, "model.safetensors"))
    live = {k: v.detach() for k, v in unique_state_dict(t.model.state_dict()).items()}
    want = merge_state_dicts(live, initial, dtype="float32", num_layers=2)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    loaded = (AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM).from_pretrained(folder)
    assert loaded.dtype == torch.float32
    assert not os.path.exists(os.path.join(t.run.path, "checkpoints", "step_00000002", "merged"))  # end only
