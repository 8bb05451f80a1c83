"""Repetition / presence / frequency penalties, no-repeat-n-gram and min_new_tokens on the
decode loop's logits: :class:`Penalties`, one per :meth:`HFRolloutEngine.generate` call.

Applied to a step's raw logits before the sampler's temperature / top-k / top-p / min-p, in
this order: repetition (transformers' RepetitionPenaltyLogitsProcessor), frequency then
presence (vLLM's ``apply_penalties`` order; transformers has neither), no-repeat-n-gram
(NoRepeatNGramLogitsProcessor), min_new_tokens (MinNewTokensLengthLogitsProcessor) — where
transformers has them, the order of ``generate``'s LogitsProcessorList. The result is float32
(``generate`` also casts the logits to float32 before its processors).

Every piece of state is a device tensor updated in place by one batched op per step (no
Python loop over rows, no host read): a ``[B, V + 1]`` bool "seen in prompt or response" for
the repetition penalty and a ``[B, V]`` float32 count of generated tokens (``scatter_add_``)
for the frequency / presence penalties; no-repeat-n-gram compares every n-gram window of a
``[B, P + R]`` token history with each row's last n - 1 tokens on the device (O(B·(P+R)·n)
per step, no ``.tolist()``: unlike transformers' per-row Python dictionaries it needs no host
sync). Left padding of the prompt is never a seen token nor part of an n-gram.
"""

from __future__ import annotations

from typing import Optional

import torch

NEG_INF = float("-inf")


class Penalties:
    """The penalty state of one generate call over ``B`` rows (prompts already repeated ``n``
    times), created by :meth:`build` only when some penalty is on, so a call without any
    allocates and computes nothing.

    Per step the engine calls :meth:`apply` on the step's logits (before sampling) and then
    :meth:`update` with the sampled tokens. :meth:`apply` never writes into its input (which
    may be a CUDA graph's output buffer or the model's output).
    """

    def __init__(self, params, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                 vocab: int, stop_ids: torch.Tensor):
        B, P = prompt_ids.shape
        dev = prompt_ids.device
        self.P, self.V = P, vocab
        self.rep = float(params.repetition_penalty)
        self.freq = float(params.frequency_penalty)
        self.pres = float(params.presence_penalty)
        self.ngram = int(params.no_repeat_ngram_size)
        self.min_new = int(params.min_new_tokens)
        real = prompt_mask.bool()
        # pad columns index the extra column V, dropped on use: padding is never "seen"
        self.seen = None
        if self.rep != 1.0:
            self.seen = torch.zeros(B, vocab + 1, dtype=torch.bool, device=dev)
            self.seen.scatter_(1, torch.where(real, prompt_ids, vocab).clamp(max=vocab), True)
        self.counts = None
        if self.freq != 0.0 or self.pres != 0.0:
            self.counts = torch.zeros(B, vocab, dtype=torch.float32, device=dev)
        self.hist = self.hist_ok = None
        if self.ngram > 0:
            self.hist = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=dev)
            self.hist_ok = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=dev)
            self.hist[:, :P] = prompt_ids
            self.hist_ok[:, :P] = real
        self.stop_ids = stop_ids if self.min_new > 0 and stop_ids.numel() > 0 else None

    @staticmethod
    def active(params) -> bool:
        """Whether ``params`` turns any penalty on."""
        return (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                or params.presence_penalty != 0.0 or params.no_repeat_ngram_size > 0 or params.min_new_tokens > 0)

    @classmethod
    def build(cls, params, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, vocab: int,
              stop_ids: torch.Tensor) -> Optional["Penalties"]:
        """The state for ``params`` over the left-padded prompts ``prompt_ids`` / ``prompt_mask``
        ``[Bp, P]`` int64 (each repeated ``params.n`` times: the response rows), logits of width
        ``vocab``, and the stop ids ``[S]`` int64 that min_new_tokens holds back; None (and
        nothing allocated) when every penalty is off."""
        if not cls.active(params):
            return None
        n = params.n
        return cls(params, prompt_ids.repeat_interleave(n, dim=0), prompt_mask.repeat_interleave(n, dim=0),
                   max_new_tokens, vocab, stop_ids)

    def apply(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The penalised logits ``[B, V]`` float32 (a new tensor) for decode step ``step``
        (0-based: ``step`` tokens generated so far), from the raw ``logits [B, V]``."""
        x = logits.float()
        if self.seen is not None:
            seen = self.seen[:, :self.V]
            # transformers' formula: a seen token's logit is divided by the penalty when
            # positive, multiplied when negative (both lower it for a penalty > 1)
            x = torch.where(seen, torch.where(x < 0, x * self.rep, x / self.rep), x)
        if self.counts is not None:
            # vLLM's order and formula (OpenAI's): frequency per occurrence, then presence once
            if self.freq != 0.0:
                x = x - self.freq * self.counts
            if self.pres != 0.0:
                x = x - self.pres * (self.counts > 0).float()
        if self.hist is not None:
            x = x.masked_fill(self._banned(self.P + step), NEG_INF)
        if self.stop_ids is not None and step < self.min_new:
            x = x.index_fill(1, self.stop_ids, NEG_INF)
        return x

    def _banned(self, cur: int) -> torch.Tensor:
        """``[B, V]`` bool: the tokens that would complete an n-gram already in a row's first
        ``cur`` columns (prompt + response, padding and finished rows' pad tokens excluded)."""
        n, V = self.ngram, self.V
        B = self.hist.shape[0]
        ban = torch.zeros(B, V + 1, dtype=torch.bool, device=self.hist.device)
        if cur < n:  # no complete n-gram yet (transformers: cur_len + 1 < ngram_size)
            return ban[:, :V]
        ctx, ok = self.hist[:, :cur], self.hist_ok[:, :cur]
        win, win_ok = ctx.unfold(1, n, 1), ok.unfold(1, n, 1).all(-1)  # [B, W, n], [B, W]
        tail, tail_ok = ctx[:, cur - n + 1:], ok[:, cur - n + 1:].all(-1)  # [B, n - 1], [B]
        match = win_ok & tail_ok[:, None] & (win[..., :-1] == tail[:, None]).all(-1)
        # every match writes the same True, so duplicate indices are harmless; no match -> column V
        ban.scatter_(1, torch.where(match, win[..., -1], V).clamp(max=V), True)
        return ban[:, :V]

    def update(self, tok: torch.Tensor, alive: torch.Tensor, step: int) -> None:
        """Record the tokens ``tok [B]`` int64 sampled at ``step`` for the rows ``alive [B]``
        bool (that were generating at it; a finished row's pad token is not recorded)."""
        if self.seen is not None:
            self.seen.scatter_(1, torch.where(alive, tok, self.V).clamp(max=self.V)[:, None], True)
        if self.counts is not None:
            # a finished row adds 0 (at column 0: its pad id need not be below V)
            self.counts.scatter_add_(1, torch.where(alive, tok, 0)[:, None], alive[:, None].float())
        if self.hist is not None:
            self.hist[:, self.P + step] = tok
            self.hist_ok[:, self.P + step] = alive


__all__ = ["Penalties"]
