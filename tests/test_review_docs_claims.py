"""Review of the user docs' concrete claims (README.md, docs/*.md, benchmarks/README.md): each test
checks one statement a doc makes against the code, or by running a tiny case. The doc tests that
already check names, commands, keys and defaults (test_docs_*.py, test_review_doc_snippets.py,
test_review_docs_config.py) are not repeated here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _read(rel: str) -> str:
    return (ROOT / rel).read_text(encoding="utf-8")


def _flat(text: str) -> str:
    """``text`` with every run of whitespace one space (a sentence wrapped over lines reads whole)."""
    return " ".join(text.split())


# ------------------------------------------------------------------------ docs/kernels_in_your_trainer.md


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("broken", ["nan", "+inf", "-inf row"])
def test_sample_refuses_a_row_without_distribution_on_the_cpu_on_every_backend(backend, broken):
    """The guide: "A row of NaN logits is refused on the CPU (a ValueError naming the row); on a
    GPU, where checking would cost a host sync, rows with NaN or +inf logits give a defined token
    and a NaN log-prob". The pure-PyTorch backend (``RLHF_FAST_BACKEND=torch``, or an install
    without the extension: ``RLHF_FAST_NO_EXT=1``) drew a token with a NaN log-prob on CPU tensors
    where the C++ kernel raises."""
    from rlhf_fast import ops

    logits = torch.randn(3, 9, generator=torch.Generator().manual_seed(0))
    if broken == "nan":
        logits[1, 4] = float("nan")
    elif broken == "+inf":
        logits[1, 4] = float("inf")
    else:
        logits[1] = float("-inf")
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match=r"row 1\b"):
            ops.sample(logits, temperature=0.7, generator=torch.Generator().manual_seed(1))
        if broken == "nan":  # greedy has no answer for NaN either
            with pytest.raises(ValueError, match=r"NaN \(row 1\)"):
                ops.sample(logits, temperature=0.0)
        else:  # greedy: defined with +inf (the first maximum); an all -inf row refused, as the C++ kernel
            if broken == "+inf":
                tok, logp = ops.sample(logits, temperature=0.0)
                assert tok[1].item() == 4 and logp[1].item() == 0.0
            else:
                with pytest.raises(ValueError, match=r"row 1\b"):
                    ops.sample(logits, temperature=0.0)
        # the per-sample-seed draw (rollout.per_sample_seeds) refuses them as well
        from rlhf_fast.ops.sampling import sample_with_uniforms

        with pytest.raises(ValueError, match=r"row 1\b"):
            sample_with_uniforms(logits, torch.full((3,), 0.5), temperature=0.7)
        # the finite rows still sample
        ok = torch.randn(2, 9)
        tok, logp = ops.sample(ok, temperature=0.7)
        assert torch.isfinite(logp).all()
    # README's op notes say it beside "NaN logits give NaN log-probs on every backend"
    text = _flat(_read("README.md"))
    start = text.index("NaN logits give NaN log-probs on every backend")
    assert "`sample` refuses a row without a distribution" in text[start:start + 200]


# ----------------------------------------------------------------------------- docs/rlvr.md


def test_rlvr_describes_the_gsm8k_marker_fallback_as_extract_answer_reads_it():
    """rlvr.md said answer_match reads "the number right after the last `####` followed by one
    ..., else the last number". A completion with a `####` that no number follows (a markdown
    heading, "#### abc 5") is read as the last marker's first line (verl's strict GSM8K scorer
    finds no answer there), not as its last number: "#### abc 5" against answer 5 scores 0."""
    from rlhf_fast.algorithms.rule_rewards import answer_match, extract_answer

    assert extract_answer("so #### abc 5") == "abc 5"
    assert answer_match(["p"], ["so #### abc 5"], answer=["5"]) == [0.0]
    text = _flat(_read("docs/rlvr.md"))
    start = text.index("rule_rewards:answer_match`: it compares")
    sentence = text[start:text.index("with `answer`", start)]
    assert "first line" in sentence, sentence


# ----------------------------------------------------------------------------- benchmarks/README.md


def test_benchmarks_readme_names_every_gpu_lease_stage():
    """benchmarks/README.md: "`STAGES=...` picks stages (triton-tests, ...)" lists the stages of
    tools/gpu_lease.sh; its default STAGES also runs bench-e2e-dpo and bench-e2e-distill, which the
    list left out (so a user picking stages from the doc could not select them)."""
    script = _read("tools/gpu_lease.sh")
    default = re.search(r'^STAGES=\$\{STAGES:-"([^"]+)"\}', script, flags=re.M)
    assert default, "tools/gpu_lease.sh: no default STAGES"
    stages = set(default.group(1).split())
    assert {s for s in re.findall(r"^want ([\w-]+) &&", script, flags=re.M)} == stages
    text = _flat(_read("benchmarks/README.md"))
    listed = re.search(r"picks stages \(([^)]+)\)", text)
    assert listed, "benchmarks/README.md: no stage list"
    assert {s.strip() for s in listed.group(1).split(";")[0].split(",")} == stages


# ----------------------------------------------------------------------------- README.md: rlhf-fast report


def test_readme_report_row_names_every_kind_the_report_reads():
    """README's `rlhf-fast report` row lists the kinds a report recognises from config.yaml; the
    report also reads PRM runs (``rlhf-fast prm``: its own metrics and settings), which the list
    left out."""
    from rlhf_fast.trainers.report import KIND_MARKERS, RL_FAMILIES, run_kind

    kinds = set(RL_FAMILIES) | {k for k, _ in KIND_MARKERS}
    row = next(line for line in _read("README.md").splitlines()
               if line.startswith("| `rlhf-fast report RUN_DIR`"))
    listed = re.search(r"kind \(([^)]+), from config\.yaml\)", row)
    assert listed, row
    assert {k.strip() for k in listed.group(1).split("/")} == kinds
    assert run_kind({"step_separator": "\n", "max_prompt_length": 512}) == "prm"


# ----------------------------------------------------------------------------- --help of the offline commands


def _offline_help_defaults(command: str):
    """{dotted key: default} as ``rlhf-fast COMMAND --help`` lists them (Python literals only)."""
    import ast
    import contextlib
    import io

    from rlhf_fast import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main([command, "--help"])
    stated = {}
    for line in out.getvalue().splitlines():
        m = re.match(r"^  (\S+)\s+.+? = (.*)$", line)
        if m:
            try:
                stated[m.group(1)] = ast.literal_eval(m.group(2))
            except (ValueError, SyntaxError):
                pass
    return stated


@pytest.mark.parametrize("command", ["sft", "reward", "prm", "dpo", "kto"])
def test_offline_help_states_the_defaults_the_command_runs_with(command):
    """README: "`--help` lists every config key with its type and default". The offline
    commands' --help listed ``bf16 Optional[bool] = None`` while ``rlhf-fast COMMAND none`` runs
    with bf16 true (TRL's rule: true unless fp16), the value --print-config shows and README calls
    "the offline trainers' default" (the RL commands' --help is checked the same way in
    test_review_docs_config.py)."""
    from rlhf_fast.trainers.config import load_config, to_dict
    from rlhf_fast.trainers.dpo import DPOConfig
    from rlhf_fast.trainers.kto import KTOConfig
    from rlhf_fast.trainers.prm import PRMConfig
    from rlhf_fast.trainers.reward import RewardConfig
    from rlhf_fast.trainers.sft import SFTConfig

    classes = {"sft": SFTConfig, "reward": RewardConfig, "prm": PRMConfig, "dpo": DPOConfig, "kto": KTOConfig}

    stated = _offline_help_defaults(command)
    assert len(stated) > 40 and "bf16" in stated
    effective = to_dict(load_config(classes[command], None))
    wrong = []
    for key, value in stated.items():
        got = effective
        for part in key.split("."):
            got = got.get(part) if isinstance(got, dict) else None
        if "." in key and effective.get(key.split(".")[0]) is None:
            continue  # an optional section that is off (bema, merge): its keys' defaults apply once set
        if got != (list(value) if isinstance(value, tuple) else value):
            wrong.append(f"{key}: --help says {value!r}, the command runs {got!r}")
    assert not wrong, "\n".join(wrong)


# ----------------------------------------------------------------------------- README.md: resume: false


def test_resume_false_into_a_run_folder_is_refused_as_the_readme_says(tmp_path, capsys):
    """README: "(SFT, reward, DPO and KTO runs resume their `output_dir` by default; `resume:
    false` starts afresh)". In the folder of an earlier run it does not start afresh (nor
    overwrite, as TRL's overwrite_output_dir would): the run is refused before anything is
    written, as "A new run into a folder that already holds a run ... is refused" says further
    on. The sentence on resume: false says so."""
    from rlhf_fast import cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n', encoding="utf-8")
    code = cli.main(["sft", "none", "--output_dir", str(run), "--resume", "false", "--max_steps", "1"])
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    text = _flat(_read("README.md"))
    start = text.index("`resume: false` starts afresh")
    clause = text[start:text.index(". ", start)]  # to the end of its sentence
    assert "refused" in clause, clause
