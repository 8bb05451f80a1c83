"""Review of the fix commits 66c19ba (op contract), bc4d143 (pipeline walk) and 4a5fff0 (GOLD /
merging): each test pinned a defect the fixes left or introduced and failed before its own fix
(reference log-probs at ordinary temperatures no longer bit-identical; the divergence op at small
temperatures and with NaN logits; numpy temperatures; a peft policy with merge.target; an RL LoRA
run's relative base path; eval / generate --out inside a model folder or onto a run's files; KTO
and RL eval splits that leaked repeated items)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast import ops  # noqa: E402
from rlhf_fast.ops import reference  # noqa: E402
from tests.conftest import live_cpu_backends  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

needs_cpp = pytest.mark.skipif("cpp" not in live_cpu_backends(), reason="rlhf_fast._C is not built")


def _heads(seed=0, n=4, h=8, v=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)


# --------------------------------------------------------------------------- 66c19ba: temperatures


def test_reference_logprobs_at_ordinary_temperature_unchanged():
    # the line before 66c19ba (rlhf_fast/ops/reference.py, token_logprobs):
    #   z = logits.to(out_dtype(logits.dtype)) / temperature
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1000, generator=g) * 3
    lab = torch.randint(0, 1000, (64,), generator=g)
    old = torch.log_softmax(x / 0.7, -1).gather(-1, lab[:, None]).squeeze(-1)
    assert torch.equal(reference.token_logprobs(x, lab, temperature=0.7), old)


def test_divergence_reference_at_tiny_temperature_is_finite():
    h, w = _heads()
    with ops.use_backend("torch"):
        d = ops.fused_linear_divergence(h, w, h, w, beta=0.5, temperature=1e-40)
    assert torch.equal(d, torch.zeros_like(d))  # a student equal to its teacher: no divergence


@needs_cpp
def test_divergence_cpp_at_small_temperature_matches_reference():
    h, w = _heads()
    th, tw = _heads(seed=1)
    T = 1e-12
    with ops.use_backend("cpp"):
        same = ops.fused_linear_divergence(h, w, h, w, beta=0.5, temperature=T)
        fwd = ops.fused_linear_divergence(h, w, th, tw, beta=0.0, temperature=T)
    with ops.use_backend("torch"):
        ref = ops.fused_linear_divergence(h, w, th, tw, beta=0.0, temperature=T)
    assert torch.isfinite(fwd).all() and (fwd >= 0).all(), fwd
    torch.testing.assert_close(fwd, ref, rtol=1e-3, atol=0.0)
    assert same.abs().max().item() < 1e-3, same


# --------------------------------------------------------------------------- bc4d143: LoRA base paths


@pytest.fixture
def saved_model(tmp_path):
    """A tiny Llama and its tokenizer saved to tmp_path/base (what `rlhf-fast sft` leaves in final/)."""
    from tests.conftest import save_tiny_model

    return save_tiny_model(tmp_path / "base")


def test_rl_lora_final_names_its_base_by_an_absolute_path(saved_model, tmp_path, monkeypatch):
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import ModelConfig, PPOConfig, RLConfig, RolloutConfig
    from tests.test_rl_learning import PROMPTS, frac_a

    monkeypatch.chdir(tmp_path)
    cfg = RLConfig(estimator="grpo", steps=1, output_dir="run", progress=False,
                   model=ModelConfig(policy="base", lora={"r": 2}),
                   rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=3),
                   ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))
    RLTrainer(cfg, reward_fns=[frac_a], prompts=PROMPTS).train()
    base = json.loads((tmp_path / "run" / "final" / "policy" / "adapter_config.json").read_text())[
        "base_model_name_or_path"]
    assert os.path.isabs(base) and os.path.samefile(base, saved_model), base
    assert "policy: base\n" in (tmp_path / "run" / "config.yaml").read_text()  # the path as the user wrote it


# --------------------------------------------------------------------------- bc4d143: --out over inputs


def _main(*argv):
    from rlhf_fast import cli

    try:
        return cli.main(list(argv))
    except SystemExit as e:
        return e.code


def _prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"prompt": "the cat"}) + "\n")
    return str(p)


def test_eval_refuses_out_inside_the_policy_folder(saved_model, tmp_path, capsys):
    target = os.path.join(saved_model, "config.json")
    before = open(target).read()
    code = _main("eval", "--policy", saved_model, "--prompts", _prompts(tmp_path), "--max-new-tokens", "2",
                 "--reward-fn", "tests.test_rl_learning:frac_a", "--out", target)
    assert open(target).read() == before, "the policy's config.json was overwritten"
    assert code == 2 and "--out" in capsys.readouterr().err


def test_generate_refuses_out_inside_the_model_folder(saved_model, tmp_path, capsys):
    target = os.path.join(saved_model, "tokenizer.json")
    before = open(target).read()
    code = _main("generate", "--model", saved_model, "--prompts", _prompts(tmp_path), "--max_new_tokens", "2",
                 "--out", target)
    assert open(target).read() == before, "the model's tokenizer.json was overwritten"
    assert code == 2 and "--out" in capsys.readouterr().err


def test_rl_eval_fraction_holds_out_whole_prompts():
    from rlhf_fast.trainers.rl import split_eval_records
    from rlhf_fast.trainers.rl_config import DataConfig, RLConfig

    records = [(f"prompt {i // 2}", {}) for i in range(16)]  # each prompt twice (two answers to score)
    train, held = split_eval_records(RLConfig(data=DataConfig(eval_fraction=0.5)), records)
    assert {p for p, _ in train}.isdisjoint({p for p, _ in held})


@needs_cpp
def test_divergence_cpp_nan_student_logits_give_nan():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 16, generator=g), torch.randn(100, 16, generator=g)
    w_nan = w.clone()
    w_nan[7] = float("nan")  # one vocabulary entry's logit is NaN on every row
    with ops.use_backend("torch"):
        ref = ops.fused_linear_divergence(h, w_nan, h, w, beta=0.5)
    with ops.use_backend("cpp"):
        got = ops.fused_linear_divergence(h, w_nan, h, w, beta=0.5)
    assert ref.isnan().all()
    assert got.isnan().all(), got


def test_eval_run_refuses_out_onto_the_runs_config(tmp_path, capsys, monkeypatch):
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import (ModelConfig, PPOConfig, RewardConfig, RLConfig, RolloutConfig)
    from tests.test_rl_learning import PROMPTS

    run = tmp_path / "run"
    cfg = RLConfig(estimator="grpo", steps=1, output_dir=str(run), progress=False,
                   model=ModelConfig(policy="tiny:llama"),
                   reward=RewardConfig(functions=["tests.test_rl_learning:frac_a"]),
                   rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=3),
                   ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))
    RLTrainer(cfg, prompts=PROMPTS).train()
    target = run / "config.yaml"
    before = target.read_text()
    code = _main("eval", "--run", str(run), "--prompts", _prompts(tmp_path), "--max-new-tokens", "2",
                 "--out", str(target))
    assert target.read_text() == before, "the run's config.yaml was overwritten"
    assert code == 2 and "--out" in capsys.readouterr().err


# --------------------------------------------------------------------------- 4a5fff0: merge.target at setup


def test_merge_target_with_peft_policy_says_peft(saved_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(saved_model), LoraConfig(r=2, target_modules=["q_proj"]))
    cfg = SFTConfig(max_steps=1, batch_size=2, eval_every=0, warmup_steps=0, output_dir=str(tmp_path / "run"),
                    merge={"target": saved_model})
    with pytest.raises(ValueError, match=r"merge cannot be used with a peft \(LoRA\) policy"):
        SFTTrainer(cfg, model=model, tokenizer=AutoTokenizer.from_pretrained(saved_model)).train()


@pytest.mark.parametrize("t", ["int64", "float32"])
def test_numpy_temperature_is_accepted(t):
    import numpy as np

    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    lab = torch.arange(4)
    got = ops.token_logprobs(x, lab, temperature=getattr(np, t)(1))
    assert torch.equal(got, ops.token_logprobs(x, lab, temperature=1.0))


def test_kto_binary_split_holds_out_whole_items():
    from rlhf_fast.trainers.common import split_records
    from rlhf_fast.trainers.kto import BinaryRecord

    recs = [BinaryRecord(f"prompt {i}", f"answer {i}", ann != "carol", ann)
            for i in range(10) for ann in ("alice", "bob", "carol")]
    train, held = split_records(recs, 0.3, seed=0)
    assert {(r.prompt, r.completion) for r in train}.isdisjoint({(r.prompt, r.completion) for r in held})
