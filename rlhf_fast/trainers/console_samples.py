"""A table of logged completions on the console (TRL's ``print_prompt_completions_sample``):
what ``num_completions_to_print`` shows of samples.jsonl's rows while a run trains."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence, TextIO

# the keys every samples.jsonl row has; the rest are the reward sources' extra columns
_FIXED = ("step", "prompt", "completion", "reward")


def _text(value: Any) -> str:
    """A prompt or completion as shown: text as it is, chat messages one ``ROLE: content`` line
    each, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return "\n".join(f"{str(m.get('role', '')).upper()}: {m.get('content', '')}" for m in value)
    return json.dumps(value, default=str)


def _number(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def print_samples(rows: Sequence[Dict[str, Any]], step: int, file: Optional[TextIO] = None) -> None:
    """Print ``rows`` (samples.jsonl records: step, prompt, completion, reward, extra columns)
    as one rich table titled with ``step`` to ``file`` (default: standard output)."""
    from rich.console import Console
    from rich.table import Table

    extra = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in _FIXED]
    table = Table(title=f"Step {step}", show_header=True, header_style="bold", expand=True, show_lines=True)
    table.add_column("Prompt", style="yellow")
    table.add_column("Completion", style="green")
    table.add_column("Reward", justify="right", style="cyan")
    for name in extra:
        table.add_column(name)
    for row in rows:
        table.add_row(_text(row["prompt"]), _text(row["completion"]), _number(row.get("reward")),
                      *(_number(row.get(name)) for name in extra))
    Console(file=file, soft_wrap=False).print(table)
