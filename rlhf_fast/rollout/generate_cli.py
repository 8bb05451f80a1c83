"""``rlhf-fast generate``: responses of a model to a file of prompts, written as JSON lines.

    rlhf-fast generate --model DIR_OR_TINY_SPEC --prompts FILE.jsonl|txt --out OUT.jsonl
        [--temperature T --top_k K --top_p P --min_p P --max_new_tokens N --n N --seed S
         --num_beams B --repetition_penalty R --presence_penalty P --frequency_penalty F
         --no_repeat_ngram_size N --min_new_tokens N --stop TEXT ... --batch_size B --device D]

Prompts: a .txt file (one per non-empty line), a .jsonl or .parquet file of records whose
``prompt`` field (``--prompt_key``) is a text or a chat (a list of ``{role, content}``
messages, rendered with the tokenizer's chat template and the generation prompt, as the
trainers render them). Each output line is ``{"prompt", "response", "finish_reason"}`` plus
``"logp"`` (the response's summed log-prob under the processed sampling distribution) when
sampling; ``--n`` responses per prompt are consecutive lines. The file is written atomically
once every prompt is answered. Sampling draws each response from its own seed (derived from
``--seed``, the prompt's index and the sample's), so the output does not depend on
``--batch_size``. Beam search (``--num_beams`` > 1) returns the best beam per prompt and
takes no sampling option; greedy decoding (``--temperature 0``) takes no ``--top_k``,
``--top_p``, ``--min_p`` or ``--n`` > 1 (the penalties, ``--stop`` and ``--min_new_tokens``
apply to it). Bad input: exit code 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List

# options that greedy decoding (--temperature 0) ignores, with the value that means "off"
_NOT_GREEDY = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "n": 1}
# options that only sampling (not beam search) takes, with the value that means "off"
_SAMPLING_ONLY = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                  "frequency_penalty": 0.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0, "n": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options (each also spelled with dashes: ``--max-new-tokens``)."""
    def opt(name, **kw):
        dashed = "--" + name.replace("_", "-")
        names = ["--" + name] + ([dashed] if dashed != "--" + name else [])
        parser.add_argument(*names, dest=name, **kw)

    opt("model", required=True, help="a local model folder (save_pretrained) or a 'tiny:FAMILY[:k=v,...]' spec")
    opt("prompts", required=True, help=".txt (one prompt per line), .jsonl / .json or .parquet (records with a prompt)")
    opt("out", required=True, help="output .jsonl: one {prompt, response, finish_reason[, logp]} per response")
    opt("prompt_key", default="prompt", help="the prompt field of .jsonl / .json / .parquet records (default: prompt)")
    opt("temperature", type=float, default=None, help="0 = greedy (default 1.0)")
    opt("top_k", type=int, default=0, help="0 = off")
    opt("top_p", type=float, default=1.0, help="1 = off")
    opt("min_p", type=float, default=0.0, help="0 = off")
    opt("max_new_tokens", type=int, default=128)
    opt("n", type=int, default=1, help="responses per prompt")
    opt("seed", type=int, default=0, help="sampling seed (default 0: the same command gives the same file)")
    opt("num_beams", type=int, default=1, help="> 1: beam search (the best beam per prompt)")
    opt("repetition_penalty", type=float, default=1.0, help="transformers' repetition penalty (1 = off)")
    opt("presence_penalty", type=float, default=0.0, help="vLLM/OpenAI presence penalty in [-2, 2] (0 = off)")
    opt("frequency_penalty", type=float, default=0.0, help="vLLM/OpenAI frequency penalty in [-2, 2] (0 = off)")
    opt("no_repeat_ngram_size", type=int, default=0, help="ban repeating any n-gram of this size (0 = off)")
    opt("min_new_tokens", type=int, default=0, help="no eos / stop token before this many tokens (0 = off)")
    opt("stop", action="append", default=[], help="a stop string (repeatable)")
    opt("ignore_eos", action="store_true", help="do not stop at the eos ids")
    opt("batch_size", type=int, default=16, help="prompts per generate call")
    opt("device", default="auto", help="auto, cpu, cuda or cuda:N")


def _sampling_params(args):
    """The :class:`SamplingParams` of the command line (ValueError naming the option)."""
    from .types import SamplingParams

    try:
        return SamplingParams(
            temperature=1.0 if args.temperature is None else args.temperature, top_k=args.top_k, top_p=args.top_p,
            min_p=args.min_p, max_new_tokens=args.max_new_tokens, n=args.n, stop_strings=tuple(args.stop),
            ignore_eos=args.ignore_eos, repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size, min_new_tokens=args.min_new_tokens)
    except (ValueError, TypeError) as e:
        # the messages start with the field's name, which is the option's (--stop: stop_strings)
        msg = str(e)
        if msg.startswith("stop_strings"):
            msg = "stop" + msg[len("stop_strings"):]
        raise ValueError(f"--{msg}") from None


def _check_args(args) -> None:
    """Every option before the model is loaded."""
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be an int >= 1, got {args.batch_size}")
    if args.num_beams < 1:
        raise ValueError(f"--num_beams must be an int >= 1, got {args.num_beams}")
    if not -2**63 <= args.seed < 2**63:
        raise ValueError(f"--seed must be an int in [-2**63, 2**63), got {args.seed}")
    _sampling_params(args)
    if args.num_beams > 1:
        given = [k for k, off in _SAMPLING_ONLY.items() if getattr(args, k) != off]
        given += ["temperature"] if args.temperature is not None else []
        given += ["stop"] if args.stop else []
        given += ["ignore_eos"] if args.ignore_eos else []
        if given:
            raise ValueError(f"--num_beams {args.num_beams} (beam search) takes no sampling option; got "
                             + ", ".join("--" + k for k in given))
    elif args.temperature == 0:
        # greedy: the filters change nothing and --n would write n copies of one answer
        given = [k for k, off in _NOT_GREEDY.items() if getattr(args, k) != off]
        if given:
            raise ValueError("--temperature 0 (greedy) takes no " + ", ".join("--" + k for k in given)
                             + ": greedy decoding ignores the sampling filters, and --n > 1 would write copies of "
                               "one answer; sample with --temperature > 0 or drop them")
    _check_output_fits(args.n, [("", {})])  # --n alone, before the prompts are read
    from rlhf_fast.feedback.formats import saved_dataset_folder
    from rlhf_fast.trainers.config import check_out_not_input, check_output_path

    if os.path.isdir(args.prompts) and not saved_dataset_folder(args.prompts):
        # before the --out checks: an --out inside it is not what is wrong
        raise ValueError(f"--prompts {args.prompts} is a folder; expected a .txt, .jsonl / .json or .parquet "
                         "file (or a datasets save_to_disk folder)")
    check_output_path(args.out, "--out")
    check_out_not_input(args.out, {"--prompts": args.prompts, "--model": args.model}, "the responses")


def _memory_bytes() -> int:
    """This machine's physical memory in bytes (0: unknown, nothing is refused)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _check_output_fits(n: int, records: List[tuple]) -> None:
    """ValueError naming --n when the ``n`` × ``len(records)`` responses cannot fit in memory: the
    file is written once every prompt is answered, so its lines are held until then, each at
    least its JSON with an empty response. A lower bound, not a cap: a run it refuses would be
    killed for memory (a huge --n was, building its seeds)."""
    memory = _memory_bytes()
    if memory <= 0 or not records:
        return
    line = min(len(json.dumps({"prompt": p, "response": "", "finish_reason": "stop"}, ensure_ascii=False)) + 1
               for p, _ in records)
    need = n * len(records) * line
    if need > memory:
        prompts = f" × {len(records)} prompts" if len(records) > 1 else ""
        raise ValueError(f"--n {n}{prompts} = {n * len(records)} responses: held until the file is "
                         f"written, they take at least {need:.3g} bytes ({line} a response), more than this "
                         f"machine's memory ({memory / 2**30:.1f} GiB); lower --n or split --prompts")


def _row_seed(seed: int, prompt_index: int, sample: int) -> int:
    """The seed of response ``sample`` of prompt ``prompt_index``: one generator per response,
    so a response does not depend on which other prompts share its batch."""
    return (seed * 1_000_003 + prompt_index * 7919 + sample * 104_729) % 2**63


def run(args) -> int:
    """Generate for every prompt and write ``--out``; prints a one-line summary."""
    import time

    from rlhf_fast.feedback.formats import render_prompt
    from rlhf_fast.trainers.common import load_causal_lm, resolve_device
    from rlhf_fast.trainers.config import atomic_write_text
    from rlhf_fast.trainers.rl import read_prompt_records

    from .hf_engine import HFRolloutEngine

    _check_args(args)
    records = read_prompt_records(args.prompts, key=args.prompt_key, name="--prompts")
    _check_output_fits(args.n, records)
    device = resolve_device(args.device)
    # a tiny model's tokenizer is trained on the prompts (chats as their plain rendering)
    model, tok = load_causal_lm(args.model, texts=[render_prompt(p) for p, _ in records])
    model = model.to(device).eval()
    engine = HFRolloutEngine(model, tok, device=device)
    params = _sampling_params(args)
    texts = [render_prompt(p, tok) for p, _ in records]
    sampling = args.num_beams == 1 and params.temperature > 0
    out: List[Dict[str, Any]] = []
    tokens, t0 = 0, time.perf_counter()
    for lo in range(0, len(texts), args.batch_size):
        chunk = texts[lo:lo + args.batch_size]
        if args.num_beams > 1:
            b = engine.beam_search(chunk, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
            n = 1
        else:
            seeds = [_row_seed(args.seed, lo + i, k) for i in range(len(chunk)) for k in range(params.n)]
            b = engine.generate(chunk, _with_seeds(params, seeds))
            n = params.n
        logp = b.behaviour_logp.sum(1).tolist()
        tokens += b.num_generated_tokens
        for row in range(b.batch_size):
            rec = {"prompt": records[lo + row // n][0], "response": b.response_texts[row],
                   "finish_reason": b.finish_reasons[row]}
            if sampling:
                rec["logp"] = logp[row]
            out.append(rec)
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    secs = time.perf_counter() - t0
    print(f"rlhf-fast generate: wrote {len(out)} responses to {os.path.abspath(args.out)} "
          f"({tokens} tokens, {tokens / max(secs, 1e-9):.0f} tokens/s)")
    return 0


def _with_seeds(params, seeds):
    """``params`` with one sampling seed per response row."""
    import dataclasses

    return dataclasses.replace(params, sample_seeds=tuple(seeds))


__all__ = ["add_arguments", "run"]
