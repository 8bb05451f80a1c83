"""Config loading (YAML + overrides), checkpoints (exact resume) and the shared trainer pieces."""

import dataclasses
import json
import os
import random
import re
from typing import Dict, List, Literal, Optional, Tuple

import numpy as np
import pytest
import torch

from rlhf_fast.trainers.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, checkpoint_dir
from rlhf_fast.trainers.common import MetricsLogger, RunDir, lr_lambda, make_scheduler, read_metrics, seed_everything
from rlhf_fast.trainers.config import load_config, save_config, to_dict


# tiny models: one thread is far faster than two on a shared, oversubscribed CPU
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@dataclasses.dataclass
class Opt:
    lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.999)


@dataclasses.dataclass
class Cfg:
    name: str = "run"
    steps: int = 10
    bf16: bool = False
    max_len: Optional[int] = None
    tags: List[str] = dataclasses.field(default_factory=list)
    kind: Literal["a", "b"] = "a"
    weights: Dict[str, float] = dataclasses.field(default_factory=dict)
    opt: Opt = dataclasses.field(default_factory=Opt)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_and_overrides(tmp_path):
    p = _yaml(tmp_path, "name: x\nsteps: 5\ntags: [a, b]\nopt:\n  lr: 0.5\n")
    cfg = load_config(Cfg, p, ["--steps", "7", "--opt.betas", "0.1,0.2", "--bf16", "--max_len", "none",
                               "--kind=b", "--opt.lr", "-1e-2"])
    assert cfg == Cfg(name="x", steps=7, bf16=True, max_len=None, tags=["a", "b"], kind="b",
                      opt=Opt(lr=-0.01, betas=(0.1, 0.2)))
    # an override may fix a value the YAML gets wrong; validation runs on the merged result
    assert load_config(Cfg, _yaml(tmp_path, "steps: 0\n"), ["--steps", "2"]).steps == 2
    cfg2 = load_config(Cfg, None, ["--max_len", "12", "--bf16", "false", "--tags", "x,y"])
    assert cfg2.max_len == 12 and cfg2.bf16 is False and cfg2.tags == ["x", "y"]
    out = tmp_path / "resolved.yaml"
    save_config(cfg, str(out))
    assert load_config(Cfg, str(out), []) == cfg
    assert to_dict(cfg)["opt"]["betas"] == [0.1, 0.2]


@pytest.mark.parametrize("yaml_text,overrides,needle", [
    ("nme: x\n", [], "'nme'"),
    ("steps: abc\n", [], "'steps': expected int"),
    ("bf16: 3\n", [], "'bf16': expected bool"),
    ("opt:\n  lrr: 1\n", [], "'opt.lrr'"),
    ("opt: 5\n", [], "'opt'"),
    ("opt: 5\n", ["--opt.lr", "1"], "'opt': expected a mapping"),
    ("", ["--opt.lr", "fast"], "'opt.lr': expected float"),
    ("", ["--kind", "c"], "'kind': expected one of"),
    ("", ["--bogus", "1"], "'bogus'"),
    ("", ["--opt.betas", "1,2,3"], "'opt.betas'"),
    ("", ["--steps", "0"], "steps must be >= 1"),
    ("", ["steps", "3"], "expected '--key value'"),
    ("- a\n- b\n", [], "mapping"),
    ("a: [\n", [], "invalid YAML"),
])
def test_config_errors(tmp_path, yaml_text, overrides, needle):
    p = _yaml(tmp_path, yaml_text)
    with pytest.raises(ValueError) as e:
        load_config(Cfg, p, overrides)
    assert needle in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(Cfg, str(tmp_path / "nope.yaml"), [])


def _train(model, opt, sched, steps):
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 4)
        noise = np.random.randn() + random.random()
        loss = ((model(torch.nn.functional.dropout(x, 0.3)) - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _fresh():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = make_scheduler(opt, warmup_steps=2, total_steps=10, kind="cosine")
    return model, opt, sched


def test_checkpoint_resume_is_exact(tmp_path):
    seed_everything(3)
    model, opt, sched = _fresh()
    full = _train(model, opt, sched, 8)
    final = [p.detach().clone() for p in model.parameters()]

    seed_everything(3)
    model, opt, sched = _fresh()
    first = _train(model, opt, sched, 4)
    d = save_checkpoint(checkpoint_dir(str(tmp_path), 4), models={"policy": model}, optimizers={"opt": opt},
                        schedulers={"lr": sched}, extra={"step": 4})
    _train(model, opt, sched, 3)  # disturb everything, then restore
    seed_everything(99)
    model2, opt2, sched2 = _fresh()
    extra = load_checkpoint(latest_checkpoint(str(tmp_path)), models={"policy": model2},
                            optimizers={"opt": opt2}, schedulers={"lr": sched2})
    assert extra == {"step": 4} and d == latest_checkpoint(str(tmp_path))
    rest = _train(model2, opt2, sched2, 4)
    assert first + rest == full
    for a, b in zip(model2.parameters(), final):
        assert torch.equal(a, b)


def test_checkpoint_hf_model_and_latest(tmp_path):
    from rlhf_fast.models.tiny import tiny_causal_lm

    m = tiny_causal_lm(50, hidden_size=16, num_layers=1, num_heads=2, tie_word_embeddings=True, seed=1)
    save_checkpoint(checkpoint_dir(str(tmp_path), 1), models={"policy": m}, extra={"step": 1})
    save_checkpoint(checkpoint_dir(str(tmp_path), 2), models={"policy": m}, extra={"step": 2})
    os.makedirs(os.path.join(tmp_path, "checkpoints", "step_00000009"))  # incomplete: ignored
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000002")
    m2 = tiny_causal_lm(50, hidden_size=16, num_layers=1, num_heads=2, tie_word_embeddings=True, seed=2)
    assert load_checkpoint(latest_checkpoint(str(tmp_path)), models={"policy": m2})["step"] == 2
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError):
        load_checkpoint(latest_checkpoint(str(tmp_path)), models={"critic": m2})
    with pytest.raises(TypeError):
        save_checkpoint(str(tmp_path / "x"), extra={"bad": object()})
    assert latest_checkpoint(str(tmp_path / "none")) is None


def test_lr_schedule_and_metrics(tmp_path):
    assert lr_lambda(0, warmup_steps=4, total_steps=10) == pytest.approx(0.25)
    assert lr_lambda(3, warmup_steps=4, total_steps=10) == pytest.approx(1.0)
    assert lr_lambda(10, warmup_steps=4, total_steps=10, kind="cosine") == pytest.approx(0.0)
    assert lr_lambda(7, warmup_steps=4, total_steps=10, kind="linear") == pytest.approx(0.5)
    with pytest.raises(ValueError):
        make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), total_steps=5, kind="step")
    run = RunDir(str(tmp_path / "run"), Cfg())
    assert os.path.isfile(os.path.join(run.path, "config.yaml"))
    with MetricsLogger(run.path, tensorboard=False) as log:
        log.log(1, {"loss": torch.tensor(0.5), "acc": 1})
        log.log(2, {"loss": float("nan")})
        # flushed per line: readable while still open
        assert len(read_metrics(run.path)) == 2
    recs = read_metrics(run.path)
    assert recs[0] == {"step": 1, "loss": 0.5, "acc": 1}
    assert json.loads(open(run.metrics_path).readline())["step"] == 1


def test_dict_override_and_truncate_metrics(tmp_path):
    from rlhf_fast.trainers.common import truncate_metrics

    p = _yaml(tmp_path, "weights:\n  a: 1\n")
    cfg = load_config(Cfg, p, ["--weights.b", "0.5"])
    assert cfg.weights == {"a": 1.0, "b": 0.5}
    with pytest.raises(ValueError, match="'weights.b': expected float"):
        load_config(Cfg, p, ["--weights.b", "heavy"])
    with pytest.raises(ValueError, match="not a section"):
        load_config(Cfg, p, ["--steps.x", "1"])
    # a whole mapping as YAML flow text replaces the file's
    assert load_config(Cfg, p, ["--weights", "{b: 2, c: 0.25}"]).weights == {"b": 2.0, "c": 0.25}
    assert load_config(Cfg, p, ["--weights", '{"b": 3}']).weights == {"b": 3.0}
    assert load_config(Cfg, p, ["--weights", ""]).weights == {}
    for bad in ("[1, 2]", "b=2", "{b: [unclosed"):
        with pytest.raises(ValueError, match=r"'weights': expected a mapping .*--weights.NAME value"):
            load_config(Cfg, p, ["--weights", bad])
    with pytest.raises(ValueError, match="'weights.b': expected float"):
        load_config(Cfg, p, ["--weights", "{b: heavy}"])
    with MetricsLogger(str(tmp_path), tensorboard=False) as log:
        for s in range(1, 6):
            log.log(s, {"x": s})
    truncate_metrics(str(tmp_path), 3)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]


def test_resolve_device_names_a_device_this_machine_lacks():
    from rlhf_fast.trainers.common import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda:99"):
        resolve_device("cuda:99")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    # devices torch knows but nothing here runs on: refused up front, not by the first .to()
    for name in ("mps", "meta", "xpu"):
        with pytest.raises(ValueError, match=f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got '{name}'"):
            resolve_device(name)


def test_seeds_beyond_64_bits_are_refused_at_load():
    """torch's generators take a 64-bit seed: a larger one failed deep inside torch
    ("Overflow when unpacking long long") after the model was built."""
    from rlhf_fast.trainers.rl_config import RLConfig
    from rlhf_fast.trainers.sft import SFTConfig

    huge = str(2**63)
    for cls, key in ((RLConfig, "seed"), (RLConfig, "model.tiny_seed"), (SFTConfig, "seed")):
        with pytest.raises(ValueError, match=rf"{key} must be an int in \[0, 2\*\*63\), got {huge}"):
            load_config(cls, None, [f"--{key}", huge])
        with pytest.raises(ValueError, match=f"{key} must be an int"):
            load_config(cls, None, [f"--{key}", "-1"])
    assert load_config(RLConfig, None, ["--seed", str(2**63 - 1)]).seed == 2**63 - 1


def test_a_bare_key_that_is_not_a_bool_asks_for_its_value():
    from rlhf_fast.trainers.rl_config import RLConfig

    with pytest.raises(ValueError, match=r"--steps needs a value \(int\); only a true/false key may be given bare"):
        load_config(RLConfig, None, ["--steps"])
    with pytest.raises(ValueError, match=r"--rollout.top_k needs a value"):
        load_config(RLConfig, None, ["--rollout.top_k", "--steps", "2"])
    cfg = load_config(RLConfig, None, ["--progress", "--rollout.per_sample_seeds", "--steps=3"])
    assert cfg.progress is True and cfg.rollout.per_sample_seeds is True and cfg.steps == 3


def test_inline_prompts_and_a_prompts_file_together_are_refused():
    from rlhf_fast.trainers.rl_config import RLConfig

    with pytest.raises(ValueError, match="data.prompts and data.prompts_file are both set; give one of them"):
        load_config(RLConfig, None, ["--data.prompts", "a,b", "--data.prompts_file", "p.txt"])
    # the defaults, as a saved run's config.yaml holds them, or an emptied list are not "set"
    assert load_config(RLConfig, None, ["--data.prompts_file", "p.txt"]).data.prompts_file == "p.txt"
    from rlhf_fast.trainers.rl_config import DataConfig

    assert DataConfig(prompts=[], prompts_file="p.txt").prompts == []


def test_tiny_model_sizes_are_checked_with_the_setting_named():
    from rlhf_fast.trainers.common import load_causal_lm
    from rlhf_fast.trainers.rl_config import RLConfig

    for spec, msg in (("tiny:llama:num_layers=0", "num_layers must be an int >= 1, got 0"),
                      ("tiny:llama:hidden_size=-4", "hidden_size must be an int >= 1, got -4"),
                      ("tiny:qwen2:num_heads=0", "num_heads must be an int >= 1, got 0"),
                      ("tiny:llama:vocab_size=3", "vocab_size must be an int in [6, 16777216], got 3")):
        with pytest.raises(ValueError, match=re.escape(f"model spec {spec!r}: {msg}")):
            load_causal_lm(spec)
    for overrides, msg in ((["--model.tiny_vocab_size", "5"], "model.tiny_vocab_size must be >= 6, got 5"),
                           (["--model.tiny_num_layers", "0"], "model.tiny_num_layers must be an int > 0, got 0"),
                           (["--model.tiny_hidden_size", "30", "--model.tiny_num_heads", "4"],
                            "model.tiny_hidden_size (30) must be divisible by model.tiny_num_heads (4)"),
                           (["--model.policy", "tiny:bert"], "model.policy 'tiny:FAMILY' needs a family in")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            load_config(RLConfig, None, overrides)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_inf_numbers_are_refused_at_load(value):
    """nan passes every comparison (`nan <= 0` is False), so each range check also asks for a
    finite number: the config is refused when loaded, not steps later by the optimizer."""
    from rlhf_fast.trainers.reward import RewardConfig
    from rlhf_fast.trainers.rl_config import RLConfig
    from rlhf_fast.trainers.sft import SFTConfig

    for cls, key, name in ((RLConfig, "--optim.lr", "optim.lr"), (RLConfig, "--kl.coef", "kl.coef"),
                           (RLConfig, "--rollout.temperature", "rollout.temperature"),
                           (SFTConfig, "--lr", "lr"), (SFTConfig, "--grad_clip", "grad_clip"),
                           (RewardConfig, "--weight_decay", "weight_decay")):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            load_config(cls, None, [key, value])
    with pytest.raises(ValueError, match=r"reward.weights\[0\] must be a finite number"):
        load_config(RLConfig, None, ["--reward.functions", "m:f", "--reward.weights", value])
    with pytest.raises(ValueError, match="reward.reward_model_weight must be a finite number"):
        load_config(RLConfig, None, ["--reward.reward_model_weight", value])
    with pytest.raises(ValueError, match=r"annotator_weights\['x'\] must be a finite number >= 0"):
        load_config(RewardConfig, None, ["--annotator_weights.x", value])


def test_truncate_metrics_drops_a_torn_last_line(tmp_path):
    from rlhf_fast.trainers.common import truncate_metrics

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    truncate_metrics(str(tmp_path), 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    log.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: invalid JSON"):
        truncate_metrics(str(tmp_path), 2)


def test_output_paths_refuse_empty_and_config_files_are_readable(tmp_path):
    """An empty output path is refused naming the option; atomic_write_text gives the file the
    mode a plain open() would (mkstemp's 0600 made a run's config.yaml unreadable to others)."""
    from rlhf_fast.trainers.config import atomic_write_text, check_output_path

    with pytest.raises(ValueError, match="--out: expected a file path, got an empty string"):
        check_output_path("", "--out")
    umask = os.umask(0o022)
    try:
        path = tmp_path / "config.yaml"
        atomic_write_text(str(path), "a: 1\n")
        assert (os.stat(path).st_mode & 0o777) == 0o644
    finally:
        os.umask(umask)


def test_prune_counts_only_complete_checkpoints(tmp_path):
    """Incomplete or stray step_* folders above the newest checkpoint (an interrupted sharded
    save, a damaged copy) must not push the complete ones out: keep=2 keeps two complete ones."""
    from rlhf_fast.trainers.checkpoint import prune_checkpoints

    for s in (1, 2, 3):
        save_checkpoint(checkpoint_dir(str(tmp_path), s), extra={"step": s})
    for s in (8, 9):
        os.makedirs(checkpoint_dir(str(tmp_path), s))
    # what interrupted saves leave (a model copy each) goes too
    for leftover in (".tmp-step_00000004-abc", ".old-xyz"):
        os.makedirs(tmp_path / "checkpoints" / leftover / "models")
    prune_checkpoints(str(tmp_path), 2)
    left = sorted(os.listdir(tmp_path / "checkpoints"))
    assert left == ["step_00000002", "step_00000003", "step_00000008", "step_00000009"]
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000003")


def test_checkpoint_step_checks_extra(tmp_path):
    """A damaged or renamed checkpoint's trainer state is one ValueError naming extra.json and
    what to do, not a bare KeyError or a resume at the wrong step."""
    from rlhf_fast.trainers.checkpoint import checkpoint_step

    d = checkpoint_dir(str(tmp_path), 6)
    assert checkpoint_step(d, {"step": 6, "data": {}}, ("step", "data")) == 6
    assert checkpoint_step(str(tmp_path / "any_name"), {"step": 3}) == 3
    for extra, msg in (([1], "holds list"), ({}, "lacks 'step'"), ({"step": 6}, "lacks 'data'"),
                       ({"step": "abc", "data": 1}, "has step 'abc'"), ({"step": -1, "data": 1}, "has step -1"),
                       ({"step": 4, "data": 1}, "says step 4 but the folder is named for step 6")):
        with pytest.raises(ValueError, match=f"checkpoint .*step_00000006: extra.json {msg}.*(remove|rename)"):
            checkpoint_step(d, extra, ("step", "data"))


def test_keeping_hyperparameters_applies_the_new_lr(tmp_path):
    """A resume with another lr uses it (the optimizer's saved lr would otherwise silently win);
    with the same lr, the restored state is unchanged."""
    from rlhf_fast.trainers.checkpoint import keeping_hyperparameters

    seed_everything(3)
    model, opt, sched = _fresh()
    _train(model, opt, sched, 3)
    save_checkpoint(checkpoint_dir(str(tmp_path), 3), optimizers={"opt": opt}, schedulers={"lr": sched},
                    extra={"step": 3})
    before = [g["lr"] for g in opt.param_groups]
    for scale in (1.0, 10.0):
        m2 = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2 * scale)
        sched2 = make_scheduler(opt2, warmup_steps=2, total_steps=10, kind="cosine")
        with keeping_hyperparameters([opt2], [sched2]):
            load_checkpoint(latest_checkpoint(str(tmp_path)), optimizers={"opt": opt2}, schedulers={"lr": sched2})
        assert sched2.last_epoch == 3
        assert [g["lr"] for g in opt2.param_groups] == pytest.approx([x * scale for x in before])
        assert sched2.get_last_lr() == pytest.approx([x * scale for x in before])


@pytest.mark.parametrize("command", ["sft", "reward", "ppo", "grpo", "rloo"])
def test_print_config_round_trips_and_help_lists_every_key(tmp_path, command, capsys):
    """``--print-config`` prints the resolved config (file, overrides, the command's estimator)
    as YAML that loads back to the same config, and trains nothing; ``--help`` lists every
    settable key with its default."""
    from rlhf_fast import cli
    from rlhf_fast.trainers.config import config_keys
    from rlhf_fast.trainers.reward import RewardConfig
    from rlhf_fast.trainers.rl_config import RLConfig
    from rlhf_fast.trainers.sft import SFTConfig

    cls = {"sft": SFTConfig, "reward": RewardConfig}.get(command, RLConfig)
    key, value = ("lr", "0.00125") if cls is not RLConfig else ("rollout.group_size", "6")
    out_dir = tmp_path / "never"
    assert cli.main([command, "none", f"--{key}", value, "--print-config", "--output_dir", str(out_dir)]) == 0
    text = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(text)
    printed = load_config(cls, str(tmp_path / "printed.yaml"))
    assert printed.output_dir == str(out_dir) and not out_dir.exists()  # nothing was started
    if cls is RLConfig:
        assert printed.rollout.group_size == 6
        assert printed.estimator == {"ppo": "gae", "grpo": "grpo", "rloo": "rloo"}[command]
        again = load_config(cls, None, ["--rollout.group_size", "6", "--output_dir", str(out_dir),
                                        "--estimator", printed.estimator])
    else:
        assert printed.lr == 0.00125
        again = load_config(cls, None, ["--lr", "0.00125", "--output_dir", str(out_dir)])
    assert to_dict(printed) == to_dict(again)
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    shown = capsys.readouterr().out
    keys = config_keys(cls)
    assert len(keys) > 20 and any("." in k for k, _, _ in keys) == (cls is RLConfig or "distributed" in to_dict(cls()))
    for k, t, d in keys:
        assert re.search(rf"^  {re.escape(k)} +{re.escape(t)} = ", shown, re.M), k
        off_section = "." in k and getattr(cls(), k.split(".")[0]) is None  # (setting a key turns it on: bema)
        if (d is None or isinstance(d, (bool, int, float, str))) and not off_section:  # settable as listed
            text = "none" if d is None else str(d).lower() if isinstance(d, bool) else str(d)
            assert to_dict(load_config(cls, None, [f"--{k}", text])) == to_dict(load_config(cls)), k
    assert cli.main([command, "none", "--print-config", "--no_such_key", "1"]) == 2
    assert "unknown config key 'no_such_key'" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_peft_model_checkpoint_holds_its_adapters_and_loads_back(tmp_path):
    """peft's save_pretrained renames the adapter keys (its folder did not load back, so a LoRA
    run could not resume): the checkpoint holds the trainable weights under the model's own
    keys, and loading needs every one of them."""
    peft = pytest.importorskip("peft")
    from rlhf_fast.trainers.checkpoint import TRAINABLE_ONLY
    from rlhf_fast.trainers.common import load_causal_lm

    def model():
        torch.manual_seed(0)
        m, _ = load_causal_lm("tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300",
                              texts=["hello world"] * 8)
        return peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    a = model()
    with torch.no_grad():
        for n, p in a.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # trained adapters (lora_B starts at zero)
    opt = torch.optim.AdamW([p for p in a.parameters() if p.requires_grad])
    path = save_checkpoint(checkpoint_dir(str(tmp_path), 1), models={"policy": a}, optimizers={"opt": opt},
                           extra={"step": 1})
    folder = os.path.join(path, "models", "policy")
    assert os.path.isfile(os.path.join(folder, TRAINABLE_ONLY))
    from safetensors.torch import load_file

    saved = load_file(os.path.join(folder, "model.safetensors"))
    assert set(saved) == {n for n, p in a.named_parameters() if p.requires_grad} and len(saved) == 4
    b = model()
    load_checkpoint(path, models={"policy": b}, optimizers={"opt": torch.optim.AdamW(
        [p for p in b.parameters() if p.requires_grad])})
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    from safetensors.torch import save_file

    save_file({k: v for k, v in saved.items() if "v_proj" not in k}, os.path.join(folder, "model.safetensors"))
    with pytest.raises(ValueError, match="missing .*v_proj.lora_A"):
        load_checkpoint(path, models={"policy": model()})
