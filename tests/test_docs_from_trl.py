"""docs/from_trl.md stays true to both codebases: every TRL argument its tables name is a field of
the TRL config class (or a parameter of the trainer) named in the section's heading, every one of
our keys is a key of our config class (dotted keys walked through RLConfig's sections), the
``key: value`` settings of a row load together, and the YAML examples load into the right class.

The document's format (kept simple on purpose):

* a section is a ``### `` heading that names, in backticks, the TRL config class (``trl.…`` or
  ``transformers.…``) and one or more of our config classes (``rlhf_fast.…``);
* a table row is ``| TRL | ours | notes |``: the TRL cell holds backticked ``name`` or ``name=value``
  items (checked against the trainer's constructor when the cell says "(trainer argument)"); the
  ours cell is "not supported", "—", or backticked ``key`` / ``key: value`` items.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import re
import typing
import warnings
from pathlib import Path

import pytest
import yaml

from rlhf_fast.trainers.config import _is_optional, load_config

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "from_trl.md"

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _import(dotted: str):
    mod, name = dotted.rsplit(".", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(mod), name)


def _cells(line: str):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse(text: str):
    """[{heading, trl, ours, rows: [(trl cell, ours cell, line no)], yaml: [...], python: [...]}]"""
    sections, cur = [], None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("### "):
            names = re.findall(r"`([\w.]+)`", line)
            trl = [n for n in names if n.startswith(("trl.", "transformers."))]
            ours = [n for n in names if n.startswith("rlhf_fast.")]
            cur = None
            if trl or ours:
                assert len(trl) == 1 and ours, f"line {i + 1}: a section heading names one TRL class and ours: {line}"
                cur = {"heading": line, "trl": trl[0], "ours": ours, "rows": [], "yaml": [], "python": []}
                sections.append(cur)
        elif line.startswith("```"):
            lang, body, i = line[3:].strip(), [], i + 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if cur is not None and lang in ("yaml", "python"):
                cur[lang].append("\n".join(body))
        elif line.startswith("|") and cur is not None:
            cells = _cells(line)
            if cells[0] not in ("TRL", "") and not set(cells[0]) <= set("-: "):
                assert len(cells) == 3, f"line {i + 1}: expected | TRL | ours | notes |, got {line}"
                cur["rows"].append((cells[0], cells[1], i + 1))
        i += 1
    return sections


TEXT = DOC.read_text(encoding="utf-8")
SECTIONS = parse(TEXT)


def trl_names(cell: str):
    items = re.findall(r"`([^`]+)`", cell)
    return [re.match(r"\s*(\w+)", it).group(1) for it in items]


def our_items(cell: str):
    """[(key, value or None)] of the ours cell; None for 'not supported' / '—'."""
    if "not supported" in cell.lower() or cell.startswith("—"):
        return None
    items = re.findall(r"`([^`]+)`", cell)
    out = []
    for it in items:
        key, sep, value = it.partition(":")
        out.append((key.strip(), value.strip() if sep else None))
    return out


def key_exists(cls, dotted: str) -> bool:
    """``a.b.c`` is a settable key of the dataclass ``cls``: sections walked through nested
    dataclasses; the part after a dict-typed field (``lora.r``) is an entry of that mapping."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        if part not in fields:
            return False
        tp = _is_optional(typing.get_type_hints(cls)[part])[1]
        if i == len(parts) - 1:
            return not dataclasses.is_dataclass(tp)  # a leaf, not a whole section
        if typing.get_origin(tp) is dict or tp is dict:
            return i == len(parts) - 2
        if not dataclasses.is_dataclass(tp):
            return False
        cls = tp
    return False


def _trainer(config_path: str):
    if not config_path.endswith("Config"):
        return None
    return _import(config_path[: -len("Config")] + "Trainer")


def _set(data: dict, dotted: str, value):
    *sections, last = dotted.split(".")
    for s in sections:
        data = data.setdefault(s, {})
    data[last] = value


def _load_mapping(cls, data: dict, tmp_path: Path, name: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_config(cls, str(path))


# ----------------------------------------------------------------------------- the document itself


def test_document_covers_every_trainer():
    pytest.importorskip("trl")
    heads = {s["trl"] for s in SECTIONS}
    assert heads >= {"transformers.TrainingArguments", "trl.SFTConfig", "trl.RewardConfig", "trl.DPOConfig",
                     "trl.KTOConfig", "trl.GRPOConfig", "trl.RLOOConfig", "trl.experimental.cpo.CPOConfig",
                     "trl.experimental.orpo.ORPOConfig"}
    for s in SECTIONS:
        assert len(s["rows"]) >= 5, s["heading"]
        if s["trl"] != "transformers.TrainingArguments":
            assert len(s["yaml"]) == 1 and len(s["python"]) == 1, f"one worked example per trainer: {s['heading']}"
    assert "### What TRL has and we don't" in TEXT


def test_trl_arguments_exist():
    """(a) every TRL name of a table is a field of the heading's TRL config class (or, marked
    '(trainer argument)', a parameter of its trainer), and so is every keyword of each TRL snippet."""
    pytest.importorskip("trl")
    table_names = set()
    bad = []
    for s in SECTIONS:
        cfg = _import(s["trl"])
        fields = {f.name for f in dataclasses.fields(cfg)}
        trainer = _trainer(s["trl"])
        params = set(inspect.signature(trainer.__init__).parameters) if trainer else set()
        for trl_cell, _, line in s["rows"]:
            names = trl_names(trl_cell)
            if not names:
                bad.append(f"line {line}: no backticked TRL argument in {trl_cell!r}")
            is_trainer_arg = "(trainer argument)" in trl_cell
            for n in names:
                table_names.add(n)
                ok = n in params if is_trainer_arg else n in fields
                if not ok:
                    where = f"{trainer.__name__}.__init__" if is_trainer_arg else s["trl"]
                    bad.append(f"line {line}: {n!r} is not an argument of {where}")
        for src in s["python"]:
            for node in ast.walk(ast.parse(src)):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == s["trl"].rsplit(".", 1)[1]:
                    for kw in node.keywords:
                        if kw.arg not in fields:
                            bad.append(f"{s['trl']} snippet: {kw.arg!r} is not a field")
                        elif kw.arg not in table_names | _all_trl_names():
                            bad.append(f"{s['trl']} snippet: {kw.arg!r} is in no table")
    assert not bad, "\n".join(bad)


def _all_trl_names():
    return {n for s in SECTIONS for cell, _, _ in s["rows"] for n in trl_names(cell)}


def test_our_keys_exist(tmp_path):
    """(b) every key of the ours column is a key of each of the section's classes, and the
    row's ``key: value`` settings load together."""
    bad = []
    for s in SECTIONS:
        classes = [_import(c) for c in s["ours"]]
        for _, ours_cell, line in s["rows"]:
            items = our_items(ours_cell)
            if items is None:
                continue
            if not items:
                bad.append(f"line {line}: ours cell {ours_cell!r} names no key (or say 'not supported' / '—')")
            for cls in classes:
                data = {}
                for key, value in items:
                    if not key_exists(cls, key):
                        bad.append(f"line {line}: {key!r} is not a key of {cls.__name__}")
                    elif value is not None:
                        _set(data, key, yaml.safe_load(value))
                if data and not bad:
                    try:
                        _load_mapping(cls, data, tmp_path, f"row{line}")
                    except (ValueError, TypeError) as e:
                        bad.append(f"line {line}: {ours_cell} does not load into {cls.__name__}: {e}")
    assert not bad, "\n".join(bad)


def test_yaml_examples_load(tmp_path):
    """(c) each section's YAML example loads with load_config into the section's config class."""
    n = 0
    for s in SECTIONS:
        for j, src in enumerate(s["yaml"]):
            for c in s["ours"]:
                cls = _import(c)
                path = tmp_path / f"{cls.__name__}_{j}.yaml"
                path.write_text(src, encoding="utf-8")
                cfg = load_config(cls, str(path))
                assert isinstance(cfg, cls)
                n += 1
    assert n >= 8


def test_parser_catches_a_renamed_key(tmp_path):
    """The checks fail on a wrong name on either side (the guard against a parser that skips rows)."""
    grpo = next(s for s in SECTIONS if s["trl"] == "trl.GRPOConfig")
    from rlhf_fast.trainers.rl_config import RLConfig

    assert key_exists(RLConfig, "rollout.group_size") and not key_exists(RLConfig, "rollout.group_sizes")
    assert not key_exists(RLConfig, "rollout")  # a section is not a key
    from rlhf_fast.trainers.dpo import DPOConfig

    assert key_exists(DPOConfig, "lora.r") and not key_exists(DPOConfig, "lora.r.x")
    rows = {trl_names(t)[0]: o for t, o, _ in grpo["rows"]}
    assert our_items(rows["num_generations"]) == [("rollout.group_size", None)]
    assert our_items(rows["use_vllm"]) is None
    assert ("kl.placement", "loss") in our_items(rows["beta"])


# sections whose prose sends the reader to another table for the rest of their keys
INHERITS_ANOTHER_TABLE = {"trl.RLOOConfig": "map as in the GRPO table",
                          "trl.experimental.gkd.GKDConfig": "its table holds every other key",
                          "trl.experimental.gmpo.GMPOConfig": "map as in the GRPO table"}


def test_every_trl_field_has_a_row():
    """(c) every field a TRL config class adds to transformers' TrainingArguments has a row in
    its section (ours, "not supported" or "—"), so a TRL upgrade's new option cannot go
    unnoticed; `vllm_*` fields are covered by the document's "every `vllm_*`" sentences, and
    RLOO / GKD, whose prose refers to the GRPO / distillation tables, by those."""
    pytest.importorskip("trl")
    from transformers import TrainingArguments

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    missing = []
    for s in SECTIONS:
        cls = _import(s["trl"])
        if s["trl"] in INHERITS_ANOTHER_TABLE:
            heading_at = TEXT.index(s["heading"])
            assert INHERITS_ANOTHER_TABLE[s["trl"]] in TEXT[heading_at:heading_at + 2000], s["heading"]
            continue
        if cls is TrainingArguments:
            continue
        named = {n for cell, _, _ in s["rows"] for n in trl_names(cell)}
        for f in dataclasses.fields(cls):
            if f.name in base or f.name in named or (f.name.startswith("vllm_") and "every `vllm_*`" in TEXT):
                continue
            missing.append(f"{s['trl']}.{f.name}")
    assert not missing, "TRL fields without a row in docs/from_trl.md: " + ", ".join(missing)
