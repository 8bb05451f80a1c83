"""`rlhf-fast report RUN_DIR`: the page of real short SFT / DPO / GRPO runs holds the numbers of
their metrics.jsonl (recomputed here), links the PNGs that `rlhf-fast plot` writes and the
config, shows samples.jsonl's completions escaped; partial runs (stopped, no eval, NaN, empty
log, no samples) get a page that says so; bad input exits 2 with one line and writes nothing."""

import dataclasses
import json
import math
import os
import re
import shutil

import pytest
import yaml

from rlhf_fast.cli import main
from rlhf_fast.trainers.config import save_config, to_dict
from rlhf_fast.trainers.report import format_number, md_text, render_report, run_kind, summarize_metric
from tests.test_rl_cli import _small

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


# ----------------------------------------------------------------------------- helpers


def _records(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _num(v):
    """A logged value as a float (the loggers write non-finite floats as text)."""
    return float(v) if isinstance(v, (int, float, str)) and not isinstance(v, bool) else None


def _expected(records, key, better):
    """(first, last, best) as (step, value) of ``key`` in ``records``, computed from the log
    without the report's code: best is the max (better=+1) / min (-1) finite value, earliest step."""
    pts = [(r["step"], _num(r[key])) for r in records if key in r and _num(r[key]) is not None]
    finite = [p for p in pts if math.isfinite(p[1])]
    best = None
    if better and finite:
        target = (max if better > 0 else min)(v for _, v in finite)
        best = next(p for p in finite if p[1] == target)
    return pts[0], pts[-1], best


def _metric_rows(text):
    """{metric: (first, last, best, count)} from the page's metrics table; each cell
    ``(step, value)`` or None for '—'."""
    def cell(c):
        if c == "—":
            return None
        m = re.fullmatch(r"(\S+) \(step (\d+)\)", c)
        return int(m.group(2)), float(m.group(1))

    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.fullmatch(r"\| `([^`]+)` \| (.+?) \| (.+?) \| (.+?) \| (.+?) \|", line)
        if m:
            rows[m.group(1)] = (cell(m.group(2)), cell(m.group(3)), cell(m.group(4)), m.group(5))
    return rows


def _check_numbers(text, records, directions):
    rows = _metric_rows(text)
    for key, better in directions.items():
        first, last, best = _expected(records, key, better)
        got = rows[key]
        for g, e in zip(got[:3], (first, last, best)):
            if e is None:
                assert g is None, key
            else:
                assert g[0] == e[0] and (g[1] == pytest.approx(e[1], rel=1e-5, abs=1e-12)
                                         or math.isnan(g[1]) and math.isnan(e[1])), (key, g, e)
    return rows


def _links(text, start):
    """The targets of the page's links and images, resolved from the folder ``start``."""
    return [os.path.normpath(os.path.join(start, t.strip("<>"))) for t in re.findall(r"\]\(([^)]+)\)", text)]


def _report(run, *extra):
    assert main(["report", run, *extra]) == 0
    out = extra[extra.index("--out") + 1] if "--out" in extra else os.path.join(run, "report.md")
    with open(out, encoding="utf-8") as f:
        return f.read()


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Short real runs through the CLI: SFT (eval every 2 steps), DPO (no evaluation), GRPO."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--model", TINY, "--max_len", "48", "--log_every", "1", "--warmup_steps", "1", "--report_to", "none",
              "--device", "cpu"]
    sft, dpo, grpo = (str(root / n) for n in ("sft", "dpo", "grpo"))
    assert main(["sft", "none", "--output_dir", sft, "--max_steps", "4", "--eval_every", "2", "--save_every", "2",
                 "--batch_size", "4", *common]) == 0
    assert main(["dpo", "none", "--output_dir", dpo, "--max_steps", "3", "--eval_every", "0", "--eval_fraction", "0",
                 "--batch_size", "4", *common]) == 0
    cfg = _small(root, steps=3, sample_every=1, save_every=2, report_to="none")
    assert main(["grpo", cfg, "--output_dir", grpo]) == 0
    return {"sft": sft, "dpo": dpo, "grpo": grpo}


def test_sft_report_numbers_plots_and_links(runs):
    run = runs["sft"]
    text = _report(run)
    recs = _records(run)
    assert "- **Kind**: sft\n" in text and "- **Steps**: 4 of 4 planned" in text
    assert "- **Status**: finished" in text and "- **Model**: tiny:llama:hidden\\_size=32," in text
    assert "| `lr` | 0.001 |" in text and "| `max_steps` | 4 |" in text  # the settings table, from config.yaml
    rows = _check_numbers(text, recs, {"loss": -1, "eval_loss": -1, "eval_ppl": -1, "grad_norm": 0, "lr": 0})
    assert rows["eval_loss"][0][0] == 0  # the evaluation before the first step
    # every logged step's tokens, summed
    assert f"**Tokens trained**: {sum(r['tokens'] for r in recs if 'tokens' in r)} " in text
    # the plots are plot.py's PNGs in RUN_DIR/plots, each linked once, relative to the page
    pngs = sorted(os.path.join(run, "plots", n) for n in os.listdir(os.path.join(run, "plots")))
    assert pngs and all(p.endswith(".png") for p in pngs)
    links = _links(text, run)
    assert sorted(p for p in links if p.endswith(".png")) == pngs
    assert os.path.join(run, "config.yaml") in links and all(os.path.exists(p) for p in links)
    assert "## Sample completions" not in text  # not an RL run


def test_dpo_report_without_evaluation(runs):
    run = runs["dpo"]
    text = _report(run)
    recs = _records(run)
    assert "- **Kind**: dpo\n" in text and "- **Steps**: 3 of 3 planned" in text
    assert "| `beta` | 0.1 |" in text and "| `loss_type` | sigmoid |" in text
    rows = _check_numbers(text, recs, {"loss": -1, "rewards/accuracy": 1, "rewards/margin": 1, "rewards/chosen": 0})
    assert not any(k.startswith("eval") for k in rows)  # the run never evaluated
    # the offline loop logs each logged step's seconds (time/step): the wall time is their sum
    times = [r["time/step"] for r in recs if "time/step" in r]
    assert len(times) == 3 and f"- **Wall time**: {format_number(sum(times))} s, the sum of `time/step` over " \
        "3 logged steps\n" in text
    # the offline trainers' throughput (trained input tokens per second), averaged over the logged steps
    tps = [r["train_tokens_per_second"] for r in recs if "train_tokens_per_second" in r]
    assert len(tps) == 3 and f"- **Throughput**: {format_number(sum(tps) / 3)} trained (input) tokens/s " in text
    _check_numbers(text, recs, {"entropy": 0, "num_tokens": 0})


def test_grpo_report_samples_timing_and_out_elsewhere(runs, tmp_path):
    run = runs["grpo"]
    out = str(tmp_path / "reports" / "grpo report.md")
    text = _report(run, "--out", out, "--samples", "2")
    recs = _records(run)
    assert "- **Kind**: grpo\n" in text and "- **Steps**: 3 of 3 planned" in text
    _check_numbers(text, recs, {"reward/total": 1, "kl/seq": 0, "entropy": 0, "policy/clip_frac": 0,
                                "response_length/mean": 0, "policy/loss": 0})
    wall = sum(r["time/step"] for r in recs)
    m = re.search(r"\*\*Wall time\*\*: (\S+) s", text)
    assert float(m.group(1)) == pytest.approx(wall, rel=1e-5)
    # links relative to the page's own folder, which is not the run's
    links = _links(text, os.path.dirname(out))
    assert all(os.path.exists(p) for p in links) and os.path.join(run, "plots", "reward.png") in links
    assert not os.path.exists(os.path.join(run, "report.md"))
    # the first 2 completions of the first and of the last sampled step, in samples.jsonl's order
    with open(os.path.join(run, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    want = [s for s in samples if s["step"] == 1][:2] + [s for s in samples if s["step"] == 3][:2]
    section = text.split("## Sample completions", 1)[1]
    got = [line for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(got) == 4
    for line, s in zip(got, want):
        cells = line.split(" | ")
        assert cells[0] == f"| {s['step']}" and cells[1:3] == [md_text(s["prompt"]), md_text(s["completion"])]
        assert float(cells[3].rstrip(" |")) == pytest.approx(s["reward"], rel=1e-5, abs=1e-12)


def test_partial_rl_run_stopped_nan_and_torn_line(runs, tmp_path):
    """A copy of the GRPO run cut back to its step-2 checkpoint, without final/ and samples,
    whose last records hold NaN and a line torn by a crash: the page says it stopped at the
    checkpoint, counts the NaN, never takes it as best, and shows it as the last value."""
    run = str(tmp_path / "stopped")
    shutil.copytree(runs["grpo"], run, ignore=shutil.ignore_patterns("final", "step_00000003", "samples.jsonl",
                                                                      "plots", "report.md"))
    recs = [r for r in _records(run) if r["step"] <= 2]
    recs[-1]["reward/total"] = "nan"
    recs[0]["kl/seq"] = "inf"
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 3, "reward/tot')
    text = _report(run)
    assert "- **Steps**: 2 of 3 planned" in text
    assert "stopped (no `final/`): its latest checkpoint is step 2 (`checkpoints/step_00000002`)" in text
    assert f"rlhf-fast grpo --resume {run}" in text
    rows = _check_numbers(text, recs, {"reward/total": 1, "kl/seq": 0})
    assert rows["reward/total"][1][0] == 2 and math.isnan(rows["reward/total"][1][1])
    assert rows["reward/total"][2] == (1, pytest.approx(recs[0]["reward/total"], rel=1e-5))
    assert rows["reward/total"][3] == "2 (1)" and rows["kl/seq"][3] == "2 (1)"
    assert "None logged (samples.jsonl is absent or empty" in text
    # a checkpoint past the last logged step (log_every > 1) counts as done
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write(json.dumps(recs[0]) + "\n")
    assert "- **Steps**: 2 of 3 planned" in _report(run)


def _offline_run(tmp_path, cfg, lines, name="run"):
    run = tmp_path / name
    run.mkdir()
    save_config(cfg, str(run / "config.yaml"))
    (run / "metrics.jsonl").write_text(lines)
    return str(run)


def test_empty_log_and_no_metrics_yet(tmp_path):
    from rlhf_fast.trainers.sft import SFTConfig

    run = _offline_run(tmp_path, SFTConfig(model=TINY, max_steps=50), "")
    text = _report(run)
    assert "- **Steps**: 0 of 50 planned" in text and "stopped (no `final/`): it has no checkpoint" in text
    assert "metrics.jsonl holds no records" in text and "None: no metric has a finite value yet." in text
    assert not os.path.exists(os.path.join(run, "plots"))
    os.remove(os.path.join(run, "metrics.jsonl"))  # a run that died before opening its log
    assert "metrics.jsonl holds no records" in _report(run)
    # only NaN so far: tabulated, nothing plotted, no best
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1, "loss": "nan"}\n')
    rows = _metric_rows(_report(run))
    assert math.isnan(rows["loss"][0][1]) and rows["loss"][2] is None and rows["loss"][3] == "1 (1)"


def test_samples_are_escaped_for_markdown(tmp_path):
    """Completions that hold table pipes, emphasis, HTML, backticks and line breaks come out as
    the same text when a Markdown parser (CommonMark + GFM tables) reads the page."""
    md_it = pytest.importorskip("markdown_it")
    from rlhf_fast.trainers.rl_config import RLConfig

    run = _offline_run(tmp_path, RLConfig(estimator="gae", steps=2), '{"step": 1, "reward/total": 0.5}\n')
    hostile = ["a | b", "*not em* _x_ `code` [l](http://x) ![i](y)", "<script>alert(1)</script> &amp; ~~s~~",
               "line one\nline two", "  two spaces around  ", "\\|", "", "x" * 500]
    with open(os.path.join(run, "samples.jsonl"), "w") as f:
        for i, c in enumerate(hostile):
            f.write(json.dumps({"step": 1, "prompt": f"p{i} | *q*", "completion": c, "reward": i}) + "\n")
        f.write("not json\n")
    assert "none shown (--samples 0)" in _report(run, "--samples", "0", "--no-plots")
    text = _report(run, "--samples", str(len(hostile)))
    assert "- **Kind**: ppo (estimator gae)" in text and "(1 unreadable lines skipped)" in text
    table = "\n".join(line for line in text.split("## Sample completions", 1)[1].splitlines()
                      if line.startswith("|"))
    tokens = md_it.MarkdownIt("commonmark").enable("table").parse(table + "\n")
    cells = []
    for i, t in enumerate(tokens):
        if t.type == "td_open":
            kids = tokens[i + 1].children or []
            assert all(k.type == "text" or (k.type == "html_inline" and k.content == "<br>")
                       or k.type in ("em_open", "em_close") for k in kids), [k.type for k in kids]
            cells.append("".join("\n" if k.type == "html_inline" else k.content for k in kids))
    rows = [cells[i:i + 4] for i in range(0, len(cells), 4)]
    assert len(rows) == len(hostile)
    for i, (row, c) in enumerate(zip(rows, hostile)):
        assert row[1] == f"p{i} | *q*"
        shown = "(empty)" if c == "" else (c if len(c) <= 400 else c[:400] + " … (100 more characters)")
        assert row[2] == shown and row[3] == str(i)


# ----------------------------------------------------------------------------- the kind of a run


def test_kind_of_every_trainers_config():
    from rlhf_fast.trainers.dpo import DPOConfig
    from rlhf_fast.trainers.kto import KTOConfig
    from rlhf_fast.trainers.reward import RewardConfig
    from rlhf_fast.trainers.rl_config import RLConfig
    from rlhf_fast.trainers.sft import SFTConfig

    for cls, kind in ((SFTConfig, "sft"), (RewardConfig, "reward"), (DPOConfig, "dpo"), (KTOConfig, "kto")):
        assert run_kind(to_dict(cls())) == kind
    for est, kind in (("gae", "ppo"), ("reinforce++", "ppo"), ("grpo", "grpo"), ("dr_grpo", "grpo"),
                      ("rloo", "rloo"), ("distill", "distill")):
        assert run_kind(to_dict(RLConfig(estimator=est, scale_rewards="none" if est == "dr_grpo" else None))) == kind
    with pytest.raises(ValueError, match="none of their keys"):
        run_kind({"model": "x", "lr": 1})
    with pytest.raises(ValueError, match="unknown estimator 'ppo2'"):
        run_kind({"estimator": "ppo2", "rollout": {}})


def test_best_follows_the_metrics_direction():
    recs = [{"step": 1, "loss": 2.0, "eval_accuracy": 0.5, "kl": 0.1},
            {"step": 2, "loss": "nan", "eval_accuracy": 0.75, "kl": 0.3},
            {"step": 3, "loss": 1.0, "eval_accuracy": 0.75, "kl": 0.2},
            {"step": 4, "loss": 1.5}]
    assert summarize_metric(recs, "loss").best == (3, 1.0)
    assert summarize_metric(recs, "eval_accuracy").best == (2, 0.75)  # the first step that reached it
    s = summarize_metric(recs, "kl")
    assert s.best is None and s.first == (1, 0.1) and s.last == (3, 0.2) and s.points == 3
    assert summarize_metric(recs, "absent") is None


# ----------------------------------------------------------------------------- bad input


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    from rlhf_fast.trainers.sft import SFTConfig

    run = _offline_run(tmp_path, SFTConfig(model=TINY), '{"step": 1, "loss": 1.0}\n')
    (tmp_path / "plain").mkdir()
    (tmp_path / "file.txt").write_text("x")
    cases = [
        ([str(tmp_path / "missing")], "no such folder"),
        ([str(tmp_path / "file.txt")], "expected a run folder, found a file"),
        ([str(tmp_path / "plain")], "not a run folder (no config.yaml"),
        ([run, "--out", str(tmp_path)], f"--out {tmp_path}: expected a file, found a folder"),
        ([run, "--samples", "-1"], "--samples must be an int >= 0"),
    ]
    for argv, msg in cases:
        capsys.readouterr()
        assert main(["report", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("rlhf-fast report: error: ") and msg in err and err.count("\n") == 1, err
    assert not os.path.exists(os.path.join(run, "report.md")) and not os.path.exists(os.path.join(run, "plots"))
    # a good page stays as it was when a later one cannot be made (written atomically, after checks)
    text = _report(run)
    for bad_log, msg in (('{"step": 1}\n{oops\n{"step": 2}\n', "metrics.jsonl:2: invalid JSON"),):
        with open(os.path.join(run, "metrics.jsonl"), "w") as f:
            f.write(bad_log)
        capsys.readouterr()
        assert main(["report", run]) == 2 and msg in capsys.readouterr().err
    with open(os.path.join(run, "report.md")) as f:
        assert f.read() == text
    for bad_cfg, msg in (("- a list\n", "expected a mapping of config keys"),
                         (yaml.safe_dump({"model": "x"}), "none of their keys")):
        with open(os.path.join(run, "config.yaml"), "w") as f:
            f.write(bad_cfg)
        capsys.readouterr()
        assert main(["report", run]) == 2 and msg in capsys.readouterr().err


def test_render_report_is_plain_text_without_plots(tmp_path):
    from rlhf_fast.trainers.kto import KTOConfig

    cfg = dataclasses.replace(KTOConfig(), model=TINY, max_steps=2)
    run = _offline_run(tmp_path, cfg, '{"step": 1, "loss": 0.7, "kl": 0.0}\n{"step": 2, "loss": 0.6, "kl": 0.1}\n')
    text = render_report(run, run, plot=False)
    assert "- **Kind**: kto" in text and "Not drawn (--no-plots)" in text
    assert "| `desirable_weight` | 1.0 |" in text and not os.path.exists(os.path.join(run, "plots"))
