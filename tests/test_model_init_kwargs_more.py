"""TRL's ``model_init_kwargs`` beyond the policy (tests/test_model_init_kwargs.py has that):
distillation's ``distill.teacher_model_init_kwargs`` (TRL's DistillationConfig / GKDConfig key)
loads a teacher folder as TRL's DistillationTrainer does and casts a tiny one; the RL reward-model
folders load with ``model.model_init_kwargs`` as TRL's GRPO loads reward-model paths; a policy
passed in memory keeps its dtype with a warning (TRL's); ``rlhf-fast eval --run`` rebuilds the
run's reference as the run loaded it; and a resume whose dtype differs from the checkpoint's is
refused naming the key, instead of continuing from cast weights."""

import copy
import dataclasses
import math
import os

import pytest
import torch

from rlhf_fast.models import loading
from rlhf_fast.models.tiny import tiny_causal_lm, tiny_reward_model
from rlhf_fast.trainers.checkpoint import check_state_dtypes, latest_checkpoint, load_checkpoint
from rlhf_fast.trainers.config import load_config
from rlhf_fast.trainers.distill import DistillationTrainer
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import DistillConfig, ModelConfig, PPOConfig, RLConfig, RolloutConfig
from rlhf_fast.trainers.rl_config import RewardConfig as RLRewardConfig
from tests.test_distill import make_config as distill_config
from tests.test_distill import make_teacher
from tests.test_rl_learning import PROMPTS, frac_a, make_config, make_policy

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytestmark = pytest.mark.usefixtures("one_thread_per_module")

BF16_EAGER = {"dtype": "bfloat16", "attn_implementation": "eager"}


def _dtypes(model):
    return {p.dtype for p in model.parameters()}


@pytest.fixture(scope="module")
def policy():
    return make_policy()


@pytest.fixture(scope="module")
def teacher_folders(policy, tmp_path_factory):
    """{"fp32" | "bf16": a teacher folder (the student's tokenizer) saved in that dtype}."""
    _, tok = policy
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        d = str(tmp_path_factory.mktemp("teacher") / name)
        make_teacher(tok).to(dtype).save_pretrained(d)
        tok.save_pretrained(d)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def rm_folder(policy, tmp_path_factory):
    """A tiny reward model saved in bf16 (so that ``auto`` and the float32 default differ)."""
    _, tok = policy
    d = str(tmp_path_factory.mktemp("rm") / "rm")
    rm = tiny_reward_model(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=3, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    rm.to(torch.bfloat16).save_pretrained(d)
    tok.save_pretrained(d)
    return d


# ----------------------------------------------------------------------------- distill.teacher_model_init_kwargs


def trl_distillation_teacher(path, teacher_model_init_kwargs):
    """The teacher TRL 1.16's DistillationTrainer.__init__ builds from a path (trl/trainer/
    distillation_trainer.py, "Teacher model setup"; one process, no revision, trust_remote_code
    False), transcribed."""
    from trl.trainer.utils import create_model_from_path

    teacher_model_init_kwargs = dict(teacher_model_init_kwargs or {})
    dtype = teacher_model_init_kwargs.get("dtype")
    teacher_model_init_kwargs["dtype"] = dtype if dtype in ["auto", None] else getattr(torch, dtype)
    teacher_model_init_kwargs.setdefault("trust_remote_code", False)
    return create_model_from_path(path, **teacher_model_init_kwargs)


def _distiller(tmp_path, policy, teacher, kw, **over):
    pol, tok = policy
    cfg = distill_config(tmp_path, distill=DistillConfig(teacher=teacher, teacher_model_init_kwargs=kw), **over)
    return DistillationTrainer(cfg, pol, tok, prompts=PROMPTS)


@pytest.mark.parametrize("saved,kw", [("fp32", BF16_EAGER), ("bf16", {"dtype": "auto"}),
                                      ("bf16", {"dtype": "float32"}), ("bf16", {"dtype": None})])
def test_teacher_folder_loads_as_trl_distillation_trainer(tmp_path, policy, teacher_folders, saved, kw):
    tr = _distiller(tmp_path, policy, teacher_folders[saved], kw)
    theirs = trl_distillation_teacher(teacher_folders[saved], kw)
    assert tr.teacher.dtype == theirs.dtype and _dtypes(tr.teacher) == _dtypes(theirs)
    assert tr.teacher.config._attn_implementation == theirs.config._attn_implementation
    for (n, a), (_, b) in zip(tr.teacher.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), n
    assert not any(p.requires_grad for p in tr.teacher.parameters()) and not tr.teacher.training
    # the student is untouched: model.model_init_kwargs is its key
    assert _dtypes(tr.policy) == {torch.float32}


def test_teacher_default_stays_float32(tmp_path, policy, teacher_folders):
    """{} loads a bf16-saved teacher in float32 (as before the key; TRL's default, dtype None,
    keeps the saved bf16: ``{dtype: auto}`` is TRL's behaviour, checked above)."""
    tr = _distiller(tmp_path, policy, teacher_folders["bf16"], {})
    assert _dtypes(tr.teacher) == {torch.float32}
    assert _dtypes(trl_distillation_teacher(teacher_folders["bf16"], None)) == {torch.bfloat16}


def test_bf16_teacher_trains_a_float32_student(tmp_path, policy, teacher_folders):
    """A bf16 teacher's divergence is the float32 teacher's up to bf16 rounding, and a step trains."""
    pol, tok = make_policy()  # (this test's own: it trains)
    cfg = lambda name, kw: distill_config(tmp_path / name, steps=1, distill=DistillConfig(  # noqa: E731
        teacher=teacher_folders["fp32"], teacher_model_init_kwargs=kw))
    bf = DistillationTrainer(cfg("bf", {"dtype": "bfloat16"}), pol, tok, prompts=PROMPTS)
    fp = DistillationTrainer(cfg("fp", {}), *make_policy(), prompts=PROMPTS)
    assert _dtypes(bf.teacher) == {torch.bfloat16} and _dtypes(fp.teacher) == {torch.float32}
    data, _ = bf.rollout()
    lb, _ = bf.distill_loss(data.input_ids, data.attention_mask, data.response_mask)
    lf, _ = fp.distill_loss(data.input_ids, data.attention_mask, data.response_mask)
    lb, lf = float(lb.detach()), float(lf.detach())
    assert math.isfinite(lb) and lb == pytest.approx(lf, rel=0.05) and lb != lf
    before = [p.detach().clone() for p in bf.policy.parameters()]
    bf.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, bf.policy.parameters()))


def test_tiny_teacher_is_cast_once_built(tmp_path, policy):
    tr = _distiller(tmp_path, policy, "tiny:llama", BF16_EAGER)
    assert _dtypes(tr.teacher) == {torch.bfloat16} and tr.teacher.config._attn_implementation == "eager"
    assert tr.teacher.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained leaves RoPE
    ref = _distiller(tmp_path / "b", policy, "tiny:llama", {})
    for a, b in zip(tr.teacher.parameters(), ref.teacher.parameters()):  # the same weights, cast
        assert torch.equal(a, b.to(torch.bfloat16))


def test_teacher_model_instance_with_the_key_is_refused(tmp_path, policy):
    pol, tok = policy
    cfg = distill_config(tmp_path, distill=DistillConfig(teacher_model_init_kwargs={"dtype": "bfloat16"}))
    with pytest.raises(ValueError, match=r"distill\.teacher_model_init_kwargs .*teacher_model=\.\.\. is already "
                                         "built"):
        DistillationTrainer(cfg, pol, tok, prompts=PROMPTS, teacher_model=make_teacher(tok))


@pytest.mark.parametrize("kw,match", [
    ({"revision": "main"}, r"\.revision: a revision names a commit"),
    ({"dtype": "float16"}, r"\.dtype: float16 weights are not supported .*set fp16: true"),
    ({"use_cache": False}, r"\.use_cache: not a supported from_pretrained keyword"),
    (["dtype"], r" must be a mapping"),
])
def test_teacher_key_refusals_name_it(kw, match):
    with pytest.raises(ValueError, match=r"distill\.teacher_model_init_kwargs" + match):
        DistillConfig(teacher_model_init_kwargs=kw)


def test_teacher_key_cli_form_and_other_estimators(tmp_path):
    cfg = load_config(RLConfig, None, ["--estimator", "distill", "--distill.teacher", "tiny:llama",
                                       "--distill.teacher_model_init_kwargs.torch_dtype", "bfloat16",
                                       "--distill.teacher_model_init_kwargs.attn_implementation", "eager"])
    assert cfg.distill.teacher_model_init_kwargs == BF16_EAGER
    assert DistillConfig().teacher_model_init_kwargs == {}
    with pytest.raises(ValueError, match=r"distill\.teacher_model_init_kwargs apply to estimator 'distill'"):
        load_config(RLConfig, None, ["--estimator", "grpo", "--distill.teacher_model_init_kwargs.dtype", "auto"])


# ----------------------------------------------------------------------------- RL reward-model folders


def trl_reward_model(path, model_init_kwargs):
    """TRL 1.16 GRPOTrainer.__init__'s reward model from a path (trl/trainer/grpo_trainer.py,
    "Reward functions"; RLOOTrainer's is the same lines), one process, transcribed."""
    from transformers import AutoModelForSequenceClassification

    model_init_kwargs = model_init_kwargs or {}
    model_init_kwargs.setdefault("trust_remote_code", False)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **model_init_kwargs)


@pytest.mark.parametrize("kw", [{"dtype": "bfloat16"}, BF16_EAGER, {"dtype": "auto"}, {"dtype": "float32"}])
def test_load_reward_model_as_trl_grpo(rm_folder, kw):
    ours = loading.load_reward_model(rm_folder, init_kwargs=loading.check_model_init_kwargs(kw))
    theirs = trl_reward_model(rm_folder, dict(kw))
    assert _dtypes(ours) == _dtypes(theirs) and ours.config._attn_implementation == theirs.config._attn_implementation
    for (n, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), n
    # the default is float32 whatever the saved dtype, as before the key (TRL without a dtype: the saved one)
    assert _dtypes(loading.load_reward_model(rm_folder, init_kwargs={})) == {torch.float32}
    assert _dtypes(trl_reward_model(rm_folder, {})) == {torch.bfloat16}
    with pytest.raises(ValueError, match="both given"):
        loading.load_reward_model(rm_folder, dtype=torch.bfloat16, init_kwargs={"dtype": "bfloat16"})


def _rm_sources(tr):
    from rlhf_fast.algorithms import RewardModelReward

    return [s for s, _ in tr.reward.sources if isinstance(s, RewardModelReward)]


def test_grpo_reward_model_folder_takes_model_init_kwargs(tmp_path, policy, rm_folder):
    from rlhf_fast.algorithms import RewardModelReward

    pol, tok = policy
    cfg = make_config(tmp_path, "grpo", steps=1, model=ModelConfig(model_init_kwargs=BF16_EAGER),
                      reward=RLRewardConfig(reward_model=rm_folder),
                      rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=4),
                      ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))
    with pytest.warns(UserWarning, match=r"model\.model_init_kwargs .* not applied to the policy passed as "
                                         r"policy=.*reward\.reward_model"):
        tr = RLTrainer(cfg, pol, tok, prompts=PROMPTS)
    (src,) = _rm_sources(tr)
    theirs = trl_reward_model(rm_folder, dict(BF16_EAGER))
    assert _dtypes(src.model) == {torch.bfloat16} and src.model.config._attn_implementation == "eager"
    # the in-memory policy (and the reference copied from it) keep their dtype, as TRL leaves an instance
    assert _dtypes(tr.policy) == _dtypes(tr.reference) == {torch.float32}
    for (n, a), (_, b) in zip(src.model.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), n
    prompts, answers = ["q:", "x", "0"], [" a b", " y", " 1 2 3"]
    got = src(prompts, answers, None)
    assert got == RewardModelReward(theirs.eval(), tok)(prompts, answers, None)  # bf16 scores, as TRL's model gives
    assert got != RewardModelReward(loading.load_reward_model(rm_folder), tok)(prompts, answers, None)  # not fp32's
    tr.train()


def test_no_warning_by_default(tmp_path, policy, recwarn):
    pol, tok = policy
    cfg = make_config(tmp_path, "grpo", steps=1, rollout=RolloutConfig(prompts_per_step=2, group_size=2,
                                                                        max_new_tokens=4),
                      ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))
    RLTrainer(cfg, pol, tok, prompts=PROMPTS, reward_fns=[frac_a])
    assert not [w for w in recwarn if "model_init_kwargs" in str(w.message)]


# ----------------------------------------------------------------------------- rlhf-fast eval --run


def _tiny_run(tmp_path, kw, steps=2, **over):
    cfg = make_config(tmp_path, "grpo", steps=steps, save_every=1,
                      model=ModelConfig(tiny_vocab_size=96, model_init_kwargs=kw),
                      rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=4),
                      ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4), **over)
    return cfg, RLTrainer(cfg, reward_fns=[frac_a], prompts=PROMPTS)


def test_eval_run_reference_and_policy_load_as_the_run(tmp_path, capsys):
    import json

    from rlhf_fast import cli
    from rlhf_fast.trainers.evaluate import run_initial_policy, trained_policy_kwargs

    cfg, tr = _tiny_run(tmp_path, BF16_EAGER, steps=1)
    reference = {k: v.clone() for k, v in tr.reference.state_dict().items()}
    tr.train()
    saved = load_config(RLConfig, os.path.join(cfg.output_dir, "config.yaml"))
    ref = run_initial_policy(saved)
    assert _dtypes(ref) == {torch.bfloat16} and ref.config._attn_implementation == "eager"
    for n, v in ref.state_dict().items():  # the reference the run trained against
        assert torch.equal(v, reference[n]), n
    assert trained_policy_kwargs(saved.model.model_init_kwargs) == {"dtype": "auto", "attn_implementation": "eager"}
    assert trained_policy_kwargs({}) == trained_policy_kwargs(None) == {}  # the default: as before
    out = str(tmp_path / "eval.json")
    assert cli.main(["eval", "--run", cfg.output_dir, "--max-new-tokens", "3", "--reward-fn",
                     "tests.test_rl_learning:frac_a", "--out", out]) == 0
    with open(out) as f:
        res = json.load(f)
    assert res["kl"] == res["kl"] and res["num_prompts"] == len(PROMPTS)
    capsys.readouterr()


# ----------------------------------------------------------------------------- resume with another dtype


def test_rl_resume_with_another_dtype_is_refused(tmp_path):
    cfg, tr = _tiny_run(tmp_path, {"dtype": "bfloat16"})
    tr.train()
    run = cfg.output_dir
    for kw, has, want in (({}, "bfloat16", "float32"), ({"dtype": "float32"}, "bfloat16", "float32")):
        saved = load_config(RLConfig, os.path.join(run, "config.yaml"), ["--steps", "3", "--resume", run])
        saved.model.model_init_kwargs = kw
        with pytest.raises(ValueError, match=rf"model 'policy' holds {has} weights .* has {want} ones: the run "
                                             r"was saved with another model\.model_init_kwargs dtype; resume with "
                                             rf"the one it trained with \(model\.model_init_kwargs: \{{dtype: {has}"):
            RLTrainer(saved, reward_fns=[frac_a], prompts=PROMPTS).train()
    # with the run's own config it continues
    saved = load_config(RLConfig, os.path.join(run, "config.yaml"), ["--steps", "3", "--resume", run])
    tr = RLTrainer(saved, reward_fns=[frac_a], prompts=PROMPTS)
    tr.train()
    assert tr.global_step == 3 and _dtypes(tr.policy) == {torch.bfloat16}


def test_offline_resume_with_another_dtype_is_refused(tmp_path):
    from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records

    recs = synthetic_sft_records(16)
    cfg = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, batch_size=4, lr=1e-2, warmup_steps=0,
                    eval_every=0, max_len=48, device="cpu", save_every=1,
                    model="tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300")
    SFTTrainer(cfg, train_records=recs, eval_records=[]).train()
    saved = load_config(SFTConfig, os.path.join(cfg.output_dir, "config.yaml"),
                        ["--max_steps", "2", "--model_init_kwargs.dtype", "bfloat16"])
    tr = SFTTrainer(saved, train_records=recs, eval_records=[])
    with pytest.raises(ValueError, match=r"holds float32 weights .* has bfloat16 ones: the run was saved with "
                                         r"another model_init_kwargs dtype; resume with the one it trained with "
                                         r"\(model_init_kwargs: \{dtype: float32\}\)"):
        tr._maybe_resume()


def test_check_state_dtypes_unit(tmp_path):
    model = tiny_causal_lm(64, hidden_size=32, num_layers=1, num_heads=2)
    same = {k: v.dtype for k, v in model.state_dict().items()}
    check_state_dtypes(model, same, "here")  # nothing to refuse
    check_state_dtypes(model, {"not.a.weight": torch.bfloat16, **same}, "here")  # unknown names: the load's job
    one = dict(same)
    one["model.norm.weight"] = torch.bfloat16
    with pytest.raises(ValueError, match=r"here holds bfloat16 weights \('model\.norm\.weight'\), but the model "
                                         r"being resumed has float32 ones: the run was saved with another "
                                         r"model_init_kwargs dtype"):
        check_state_dtypes(model, one, "here")
    # through load_checkpoint, and the weights are left as they were
    from rlhf_fast.trainers.checkpoint import checkpoint_dir, save_checkpoint

    save_checkpoint(checkpoint_dir(str(tmp_path), 1), models={"policy": loading.cast_model(
        tiny_causal_lm(64, hidden_size=32, num_layers=1, num_heads=2, seed=5), torch.bfloat16)}, extra={"step": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoint .*: model 'policy' holds bfloat16 weights .*another x\.y dtype"):
        load_checkpoint(latest_checkpoint(str(tmp_path)), models={"policy": model}, init_key="x.y")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


_SHARDED_RESUME = r'''
import os, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
from torch.distributed.fsdp import fully_shard
from rlhf_fast.distributed import DistContext, load_sharded, save_sharded
from rlhf_fast.models.loading import cast_model
from rlhf_fast.models.tiny import tiny_causal_lm

def sharded(dtype, seed):
    m = cast_model(tiny_causal_lm(64, hidden_size=32, num_layers=1, num_heads=2, seed=seed), dtype)
    for layer in m.model.layers:
        fully_shard(layer)
    fully_shard(m)
    return m

ctx, d = DistContext(), sys.argv[3]  # the test's tmp_path: nothing left behind in /tmp
src = sharded(torch.bfloat16, 5)
save_sharded(os.path.join(d, "ck"), src, None, ctx, {"step": 1})
try:
    load_sharded(os.path.join(d, "ck"), sharded(torch.float32, 1), None, ctx, init_key="model.model_init_kwargs")
    print("NOT REFUSED")
except ValueError as e:
    print("REFUSED", e)
same = sharded(torch.bfloat16, 1)
load_sharded(os.path.join(d, "ck"), same, None, ctx)
a, b = src.state_dict(), same.state_dict()
print("EQUAL", all(torch.equal(a[k].full_tensor(), b[k].full_tensor()) for k in a))
dist.destroy_process_group()
'''


def test_a_sharded_checkpoint_in_another_dtype_is_refused(tmp_path):
    """FSDP2's distributed checkpoint (DCP) would cast a bf16 checkpoint into float32 parameters
    without a word: load_sharded refuses it, naming the key; the same dtype loads exactly."""
    import subprocess
    import sys

    from tests.torchrun_launch import free_port

    script = tmp_path / "sharded_resume.py"
    script.write_text(_SHARDED_RESUME)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, str(script), root, str(free_port()), str(tmp_path)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "REFUSED" in r.stdout and "NOT REFUSED" not in r.stdout, r.stdout
    assert "model.model_init_kwargs" in r.stdout and "bfloat16" in r.stdout
    assert "EQUAL True" in r.stdout


def test_eval_run_takes_the_runs_reference_folder(tmp_path):
    """A run with a ``model.reference`` folder trained its KL against that model, not its initial
    policy: ``--run`` evaluates against it too (loaded with the run's kwargs)."""
    from rlhf_fast.trainers.evaluate import run_initial_policy

    cfg, tr = _tiny_run(tmp_path, BF16_EAGER, steps=1)
    folder = str(tmp_path / "ref")
    other = copy.deepcopy(tr.reference)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    other.save_pretrained(folder)
    tr.tokenizer.save_pretrained(folder)
    with_ref = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, reference=folder))
    ref = run_initial_policy(with_ref)
    assert _dtypes(ref) == {torch.bfloat16} and ref.config._attn_implementation == "eager"
    want = other.state_dict()
    assert all(torch.equal(v, want[n]) for n, v in ref.state_dict().items())
    initial = run_initial_policy(cfg)  # without one: the initial policy, as before
    assert not all(torch.equal(v, want[n]) for n, v in initial.state_dict().items())
