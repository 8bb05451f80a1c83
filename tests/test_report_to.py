"""report_to / run_name (TRL's experiment-tracker keys): the names and "all" as transformers
resolves them, W&B runs (offline) of SFT and GRPO whose history is metrics.jsonl's numbers, a
resumed run continuing the same W&B run, trackio and MLflow through stand-in modules, the
default (TensorBoard when installed) unchanged, and clear errors for bad names and missing
packages."""

import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import types

import pytest
import torch
import yaml

from rlhf_fast.trainers import common
from rlhf_fast.trainers.common import MetricsLogger, read_metrics, record_scalars, resolve_report_to
from rlhf_fast.trainers.config import config_yaml, load_config

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_TB = importlib.util.find_spec("tensorboard") is not None
needs_wandb = pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install wandb)")


def _scalar_history(run_dir):
    """metrics.jsonl's records as a tracker sees them: step plus every int / float value."""
    return [{"step": r["step"], **record_scalars(r)} for r in read_metrics(run_dir)]


@pytest.fixture
def wandb_runs(monkeypatch, tmp_path):
    """W&B offline (no network, nothing written outside tmp_path), with every ``wandb.init``'s
    arguments and every ``Run.log``'s data recorded: a list of {"init": kwargs, "id", "logs"}
    (None when wandb is not installed)."""
    if not HAS_WANDB:
        return None
    import wandb

    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                 "WANDB_CONFIG_DIR": str(tmp_path / "wb_config"), "WANDB_CACHE_DIR": str(tmp_path / "wb_cache"),
                 "WANDB_DATA_DIR": str(tmp_path / "wb_data")}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    runs = []
    real_init, real_log = wandb.init, wandb.sdk.wandb_run.Run.log

    def init(**kw):
        run = real_init(**kw)
        runs.append({"init": kw, "id": run.id, "logs": []})
        return run

    def log(self, data, *a, **kw):
        runs[-1]["logs"].append(dict(data))
        return real_log(self, data, *a, **kw)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    return runs


class _Module(types.ModuleType):
    """A stand-in package that ``importlib.util.find_spec`` (how "installed" is decided) finds."""

    def __init__(self, name):
        super().__init__(name)
        self.__spec__ = importlib.machinery.ModuleSpec(name, None)
        self.calls = []


def fake_trackio():
    m = _Module("trackio")
    m.init = lambda **kw: m.calls.append(("init", kw))
    m.log = lambda metrics, step=None: m.calls.append(("log", step, dict(metrics)))
    m.finish = lambda: m.calls.append(("finish",))
    return m


def fake_mlflow():
    m = _Module("mlflow")

    def start_run(run_id=None, run_name=None, **kw):
        m.calls.append(("start_run", run_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id or "mlrun0"))

    m.start_run = start_run
    m.log_params = lambda params: m.calls.append(("log_params", dict(params)))
    m.log_metrics = lambda metrics, step=None: m.calls.append(("log_metrics", step, dict(metrics)))
    m.end_run = lambda: m.calls.append(("end_run",))
    return m


# -- names ---------------------------------------------------------------------------------------


def test_names_and_all_are_those_of_transformers(monkeypatch):
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    # every transformers name is ours or refused as "not supported here", none unknown
    assert set(common.TRACKERS) | set(common.HF_ONLY_TRACKERS) == set(INTEGRATION_TO_CALLBACK)
    assert not set(common.TRACKERS) & set(common.HF_ONLY_TRACKERS)
    # "all": the installed ones, in transformers' order (TrainingArguments.__post_init__ resolves
    # report_to="all" with get_available_reporting_integrations); with and without trackio/mlflow
    for extra in ((), ("trackio", "mlflow")):
        for name in extra:
            monkeypatch.setitem(sys.modules, name, _Module(name))
        monkeypatch.delenv("DISABLE_MLFLOW_INTEGRATION", raising=False)
        theirs = [n for n in get_available_reporting_integrations() if n in common.TRACKERS]
        assert resolve_report_to("all") == resolve_report_to(["all"]) == theirs
        assert set(extra) <= set(theirs)
    assert resolve_report_to("none") == resolve_report_to(["none"]) == []
    assert resolve_report_to("auto") == (["tensorboard"] if HAS_TB else [])
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # find_spec: not installed
    assert resolve_report_to("auto") == []
    assert "tensorboard" not in resolve_report_to("all")


def _offline_configs():
    from rlhf_fast.trainers.dpo import DPOConfig
    from rlhf_fast.trainers.kto import KTOConfig
    from rlhf_fast.trainers.reward import RewardConfig
    from rlhf_fast.trainers.rl_config import RLConfig
    from rlhf_fast.trainers.sft import SFTConfig

    return [SFTConfig, RewardConfig, DPOConfig, KTOConfig, RLConfig]


@pytest.mark.parametrize("cls", _offline_configs(), ids=lambda c: c.__module__.rsplit(".", 1)[-1])
def test_config_keys_are_checked_naming_report_to(cls, monkeypatch):
    cfg = load_config(cls)
    assert cfg.report_to == "auto" and cfg.run_name is None
    # listed after log_every
    keys = list(yaml.safe_load(config_yaml(cfg)))
    i = keys.index("log_every")
    assert keys[i + 1:i + 3] == ["report_to", "run_name"]
    monkeypatch.setitem(sys.modules, "trackio", fake_trackio())
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow())
    # comma-separated text is a list (the command line), a name stays a name
    assert load_config(cls, overrides=["--report_to", "trackio, mlflow"]).report_to == ["trackio", "mlflow"]
    assert load_config(cls, overrides=["--report_to", "mlflow"]).report_to == "mlflow"
    got = load_config(cls, overrides=["--report_to", "none", "--run_name", "r1"])
    assert (got.report_to, got.run_name) == ("none", "r1")
    bad = [("wandbb", r"report_to: unknown tracker 'wandbb'"),
           ("comet_ml", r"report_to: 'comet_ml' is a transformers integration not supported here"),
           ("all,trackio", r"report_to: 'all' stands alone"),
           ("trackio,trackio", r"report_to names a tracker twice")]
    for value, msg in bad:
        with pytest.raises(ValueError, match=msg):
            load_config(cls, overrides=["--report_to", value])
    with pytest.raises(ValueError, match=r"report_to must be one of"):
        load_config(cls, overrides=["--report_to", ""])
    with pytest.raises(ValueError, match=r"run_name must be null \(the output folder's name\) or a non-empty string"):
        load_config(cls, overrides=["--run_name", " "])
    # a named tracker whose package is missing: at config time, naming the pip package
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match=r"report_to 'wandb' needs the wandb package, which is not installed: "
                                         r"pip install wandb"):
        load_config(cls, overrides=["--report_to", "wandb"])
    with pytest.raises(ValueError, match=r"pip install wandb"):
        MetricsLogger("unused", report_to=["wandb"])


# -- the default, and none -----------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TB, reason="tensorboard is not installed")
def test_default_is_tensorboard_as_before_and_none_writes_no_tb_folder(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recs = [{"loss": torch.tensor(2.5), "lr": 1e-3, "n": 7, "ok": True, "hist": [1, 2], "note": "x"},
            {"loss": float("nan"), "lr": 5e-4, "n": 8, "eval/acc": torch.tensor(float("nan"))}]
    for report_to, tb in (("auto", True), ("tensorboard", True), ("none", False), (["none"], False)):
        run = tmp_path / str(report_to)
        with MetricsLogger(str(run), report_to=report_to) as log:
            logged = [log.log(i + 1, r) for i, r in enumerate(recs)]
            assert log.trackers == (["tensorboard"] if tb else [])
        assert read_metrics(str(run)) == json.loads(json.dumps(logged))
        assert os.path.isdir(run / "tb") == tb
        if tb:  # the scalars TensorBoard had before report_to: the int / float values, a tensor's nan too
            ea = EventAccumulator(str(run / "tb"))
            ea.Reload()
            got = {(t, e.step): e.value for t in ea.Tags()["scalars"] for e in ea.Scalars(t)}
            want = {(k, rec["step"]): float(v) for rec in logged for k, v in record_scalars(rec).items()}
            # a tensor's nan: text in the JSON line (strict JSON), a number for the trackers
            assert logged[1]["eval/acc"] == "nan"
            want[("eval/acc", 2)] = want[("loss", 2)] = float("nan")  # a float's nan too
            assert got.keys() == want.keys() == {("loss", 1), ("lr", 1), ("n", 1), ("loss", 2), ("lr", 2),
                                                 ("n", 2), ("eval/acc", 2)}
            for k, v in want.items():
                assert got[k] == pytest.approx(v, nan_ok=True)
    with MetricsLogger(str(tmp_path / "off"), tensorboard=False) as log:  # the old switch still wins
        assert log.trackers == []
    assert not os.path.exists(tmp_path / "off" / "tb")


def test_all_feeds_every_installed_tracker(tmp_path, monkeypatch, wandb_runs):
    trackio, mlflow = fake_trackio(), fake_mlflow()
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    run = str(tmp_path / "myrun")
    config = {"lr": 0.1, "rollout": {"group_size": 4}}
    with MetricsLogger(run, report_to="all", config=config) as log:
        assert log.trackers == [n for n in common.TRACKERS if (n != "tensorboard" or HAS_TB)
                                and (n != "wandb" or HAS_WANDB)]
        log.log(1, {"loss": torch.tensor(1.5), "flag": False, "text": "a"})
        log.log(2, {"loss": 0.5, "eval/x": 3})
    assert trackio.calls == [("init", dict(project="rlhf_fast", name="myrun", config=config, resume="allow")),
                             ("log", 1, {"loss": 1.5}), ("log", 2, {"loss": 0.5, "eval/x": 3}), ("finish",)]
    assert mlflow.calls == [("start_run", None, "myrun"),
                            ("log_params", {"lr": "0.1", "rollout.group_size": "4"}),
                            ("log_metrics", 1, {"loss": 1.5}), ("log_metrics", 2, {"loss": 0.5, "eval/x": 3}),
                            ("end_run",)]
    ids = json.load(open(os.path.join(run, "tracker_ids.json")))
    assert ids["mlflow"] == "mlrun0"
    if HAS_WANDB:
        [wb] = wandb_runs
        assert wb["init"] == dict(project="proj", name="myrun", config=config, dir=run, resume="allow", id=wb["id"])
        assert wb["logs"] == [{"step": 1, "loss": 1.5}, {"step": 2, "loss": 0.5, "eval/x": 3}]
        assert ids == {"wandb": wb["id"], "mlflow": "mlrun0"}
    # a second logger on the folder (a resumed run) continues the same W&B and MLflow runs
    mlflow.calls.clear()
    with MetricsLogger(run, report_to=["mlflow", "wandb"][:1 + HAS_WANDB], run_name="other", config=config) as log:
        log.log(2, {"loss": 0.25})
    assert mlflow.calls == [("start_run", "mlrun0", None), ("log_metrics", 2, {"loss": 0.25}), ("end_run",)]
    if HAS_WANDB:
        assert wandb_runs[1]["id"] == wb["id"] and wandb_runs[1]["init"]["id"] == wb["id"]
        assert wandb_runs[1]["init"]["name"] == "other"
        assert wandb_runs[1]["logs"] == [{"step": 2, "loss": 0.25}]


def test_a_tracker_that_fails_to_start_raises_and_leaves_no_open_run(tmp_path, monkeypatch):
    trackio, mlflow = fake_trackio(), fake_mlflow()

    def broken(**kw):
        raise RuntimeError("no server")

    trackio.init = broken
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    with pytest.raises(RuntimeError, match="no server"):
        MetricsLogger(str(tmp_path / "r"), report_to=["mlflow", "trackio"])
    assert mlflow.calls[-1] == ("end_run",)  # the tracker started before it was finished


# -- whole runs with W&B (offline) ---------------------------------------------------------------


@needs_wandb
def test_sft_run_reports_its_metrics_to_wandb(tmp_path, wandb_runs):
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer
    from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records

    recs = synthetic_sft_records(40)
    tok = train_tokenizer(sample_texts(32) + [r.prompt + r.completion for r in recs], 300, padding_side="right")
    cfg = SFTConfig(model="tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300",
                    output_dir=str(tmp_path / "sft-run"), max_steps=4, batch_size=8, warmup_steps=1, eval_every=2,
                    log_every=1, max_len=48, device="cpu", report_to="wandb")
    SFTTrainer(cfg, train_records=recs[:32], eval_records=recs[32:], tokenizer=tok).train()
    [wb] = wandb_runs
    hist = _scalar_history(cfg.output_dir)
    assert [h["step"] for h in hist] == [0, 1, 2, 3, 4] and "eval_loss" in hist[0] and "loss" in hist[1]
    assert wb["logs"] == hist
    assert wb["init"]["name"] == "sft-run" and wb["init"]["project"] == "rlhf_fast"
    assert wb["init"]["config"] == yaml.safe_load(open(os.path.join(cfg.output_dir, "config.yaml")))
    assert wb["init"]["config"]["report_to"] == "wandb"
    # the offline run is in the run folder, under the id kept there; no TensorBoard was asked for
    [offline] = [d for d in os.listdir(os.path.join(cfg.output_dir, "wandb")) if d.startswith("offline-run-")]
    assert offline.endswith(wb["id"])
    assert os.path.isfile(os.path.join(cfg.output_dir, "wandb", offline, f"run-{wb['id']}.wandb"))
    assert not os.path.exists(os.path.join(cfg.output_dir, "tb"))


@needs_wandb
def test_grpo_run_reports_to_wandb_and_a_resume_continues_its_run(tmp_path, wandb_runs):
    from rlhf_fast.trainers.checkpoint import latest_checkpoint
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import RolloutConfig
    from tests.test_rl_learning import PROMPTS, frac_a, make_config, make_policy

    cfg = make_config(tmp_path, "grpo", steps=4, save_every=2, report_to=["wandb"], run_name="grpo-1",
                      rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=4))
    pol, tok = make_policy()
    RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS).train(steps=3)  # checkpoints at 2 and 3
    first = _scalar_history(cfg.output_dir)
    assert [h["step"] for h in first] == [1, 2, 3] and "reward/total" in first[0]
    assert wandb_runs[0]["logs"] == first and wandb_runs[0]["init"]["name"] == "grpo-1"
    # the process died after logging step 3, before its checkpoint was complete: resume from step 2
    shutil.rmtree(latest_checkpoint(cfg.output_dir))
    cfg.resume = cfg.output_dir
    pol, tok = make_policy()
    RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS).train()
    hist = _scalar_history(cfg.output_dir)
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    assert len(wandb_runs) == 2 and wandb_runs[1]["id"] == wandb_runs[0]["id"]
    assert wandb_runs[1]["init"]["resume"] == "allow" and wandb_runs[1]["init"]["id"] == wandb_runs[0]["id"]
    # step 3 is logged again (the W&B run holds it twice, metrics.jsonl once), then step 4
    assert wandb_runs[1]["logs"] == hist[2:]
    assert wandb_runs[1]["init"]["config"]["resume"] is None  # config.yaml's: the run as it goes on


def test_mlflow_params_are_sent_100_at_a_time_without_overlong_values(tmp_path, monkeypatch):
    mlflow = fake_mlflow()
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    config = {"data": {"prompts": ["a prompt"] * 100}, "sec": {f"k{i}": i for i in range(205)}}
    MetricsLogger(str(tmp_path / "r"), report_to="mlflow", config=config).close()
    sent = [c[1] for c in mlflow.calls if c[0] == "log_params"]
    assert [len(p) for p in sent] == [100, 100, 5]
    assert {k: v for p in sent for k, v in p.items()} == {f"sec.k{i}": str(i) for i in range(205)}
