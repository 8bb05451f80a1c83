"""HFRolloutEngine: batched generation on a Hugging Face causal LM with a KV cache, every
token drawn by :func:`rlhf_fast.ops.sample`, the behaviour log-prob recorded as it is drawn.

One prefill per prompt: the prompt cache is computed once for the distinct prompts and
repeated ``n`` times (``DynamicCache.batch_repeat_interleave``) for the group of samples.
"""

from __future__ import annotations

import contextlib
import time
from typing import List, Optional, Sequence

import torch

from rlhf_fast import ops

from ..models.logprobs import default_position_ids, unwrap
from .types import Prompts, RolloutBatch, RolloutEngine, SamplingParams


class HFRolloutEngine(RolloutEngine):
    """Generation engine on a transformers causal LM (plain or peft) and its tokenizer.

    ``device``: where prompts go (default: the model's device). The model is used as is
    (no copy): weights updated by the trainer are picked up by the next call.
    """

    def __init__(self, model, tokenizer, *, device=None):
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise TypeError("tokenizer must be a transformers tokenizer (with encode/decode)")
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("tokenizer must define a pad_token_id (or at least an eos_token_id used as pad)")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ------------------------------------------------------------------ prompts

    def _encode(self, prompts: Prompts):
        """Token lists and texts of ``prompts`` (strings or lists of ids)."""
        if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise TypeError("prompts must be a non-empty list of str or a non-empty list of lists of token ids")
        if all(isinstance(p, str) for p in prompts):
            ids = [self.tokenizer(p)["input_ids"] for p in prompts]
            texts = list(prompts)
        elif all(isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p) for p in prompts):
            ids = [list(p) for p in prompts]
            texts = [self.tokenizer.decode(p, skip_special_tokens=True) for p in ids]
        else:
            raise TypeError("prompts must be all str or all lists of int token ids")
        if any(len(p) == 0 for p in ids):
            raise ValueError("every prompt must have at least one token")
        return ids, texts

    def _left_pad(self, ids: List[List[int]]):
        P = max(len(p) for p in ids)
        input_ids = torch.full((len(ids), P), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(ids), P), dtype=torch.long)
        for i, p in enumerate(ids):
            input_ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            attn[i, P - len(p):] = 1
        return input_ids.to(self.device), attn.to(self.device)

    # ------------------------------------------------------------------ sampling

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _prefill(self, prompt_ids, prompt_mask):
        """One forward over the left-padded prompts ``[Bp, P]`` filling a fresh DynamicCache;
        only the last position's logits are computed where the model supports it."""
        from transformers import DynamicCache

        kw = dict(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=default_position_ids(prompt_mask),
                  past_key_values=DynamicCache(config=unwrap(self.model).config), use_cache=True)
        try:
            return self.model(**kw, logits_to_keep=1)
        except TypeError as e:  # older/custom models without logits_to_keep
            if "logits_to_keep" not in str(e):
                raise
            kw["past_key_values"] = DynamicCache(config=unwrap(self.model).config)
            return self.model(**kw)

    def _stop_ids(self, params: SamplingParams) -> torch.Tensor:
        stop = set(params.stop_token_ids)
        if not params.ignore_eos and self.tokenizer.eos_token_id is not None:
            stop.add(self.tokenizer.eos_token_id)
        return torch.tensor(sorted(stop), dtype=torch.long, device=self.device)

    def _hits_stop_string(self, tokens: List[int], stop_strings: Sequence[str]) -> bool:
        # a stop string of L characters spans at most 4·L byte-level tokens; only the tail can
        # hold a new match (an earlier one would have stopped the row already)
        window = 4 * max(len(s) for s in stop_strings) + 1
        tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=False)
        return any(s in tail for s in stop_strings)

    def generate(self, prompts: Prompts, params: Optional[SamplingParams] = None) -> RolloutBatch:
        """Sample ``params.n`` responses per prompt; see :class:`RolloutBatch` for the layout."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids, texts = self._encode(prompts)
        t0 = time.perf_counter()
        prompt_ids, prompt_mask = self._left_pad(ids)  # [Bp, P]
        n, Bp, P = params.n, prompt_ids.shape[0], prompt_ids.shape[1]
        B = Bp * n
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        stop_ids = self._stop_ids(params)
        with self._eval_mode():
            out = self._prefill(prompt_ids, prompt_mask)
            logits = out.logits[:, -1]  # [Bp, V]
            cache = out.past_key_values
            if n > 1:
                # the group shares one prefill: repeat the prompt's cache rows n times
                cache.batch_repeat_interleave(n)
                logits = logits.repeat_interleave(n, dim=0)
            attn = prompt_mask.repeat_interleave(n, dim=0)  # [B, P] grows by one column per step
            tokens, logps, alive_cols = [], [], []
            alive = torch.ones(B, dtype=torch.bool, device=self.device)
            finished_by_stop = torch.zeros(B, dtype=torch.bool, device=self.device)
            texts_so_far: List[List[int]] = [[] for _ in range(B)]
            for step in range(params.max_new_tokens):
                tok, lp = ops.sample(logits, temperature=float(params.temperature), top_k=params.top_k,
                                     top_p=float(params.top_p), min_p=float(params.min_p), generator=gen)
                tok = torch.where(alive, tok, torch.full_like(tok, self.pad_id))
                lp = torch.where(alive, lp, torch.zeros_like(lp))
                tokens.append(tok)
                logps.append(lp)
                alive_cols.append(alive.clone())
                stopped = alive & torch.isin(tok, stop_ids) if stop_ids.numel() else torch.zeros_like(alive)
                if params.stop_strings:
                    tl = tok.tolist()
                    for i in alive.nonzero().flatten().tolist():
                        texts_so_far[i].append(tl[i])
                        if not stopped[i] and self._hits_stop_string(texts_so_far[i], params.stop_strings):
                            stopped[i] = True
                finished_by_stop |= stopped
                alive = alive & ~stopped
                if step + 1 == params.max_new_tokens or not bool(alive.any()):
                    break
                # finished rows keep feeding pad tokens, masked out, so shapes stay rectangular
                attn = torch.cat([attn, alive_cols[-1].long().unsqueeze(1)], dim=1)
                pos = (attn.sum(-1, keepdim=True) - 1).clamp(min=0)
                out = self.model(input_ids=tok.unsqueeze(1), attention_mask=attn, position_ids=pos,
                                 past_key_values=cache, use_cache=True)
                logits = out.logits[:, -1]
                cache = out.past_key_values
        resp = torch.stack(tokens, 1)  # [B, R]
        resp_mask = torch.stack(alive_cols, 1).long()  # [B, R]
        resp_logp = torch.stack(logps, 1).float() * resp_mask
        elapsed = time.perf_counter() - t0
        prompt_rep = prompt_ids.repeat_interleave(n, dim=0)
        prompt_mask_rep = prompt_mask.repeat_interleave(n, dim=0)
        zeros = torch.zeros_like(prompt_mask_rep)
        num = int(resp_mask.sum())
        resp_lists = [r[m.bool()].tolist() for r, m in zip(resp, resp_mask)]
        return RolloutBatch(
            input_ids=torch.cat([prompt_rep, resp], 1),
            attention_mask=torch.cat([prompt_mask_rep, resp_mask], 1),
            response_mask=torch.cat([zeros, resp_mask], 1),
            behaviour_logp=torch.cat([zeros.float(), resp_logp], 1),
            prompt_texts=[t for t in texts for _ in range(n)],
            response_texts=self.tokenizer.batch_decode(resp_lists, skip_special_tokens=True),
            group_index=torch.arange(Bp, device=self.device).repeat_interleave(n),
            num_generated_tokens=num,
            tokens_per_second=num / max(elapsed, 1e-9),
            prompt_length=P,
            finish_reasons=["stop" if s else "length" for s in finished_by_stop.tolist()],
        )

    # ------------------------------------------------------------------ evaluation

    def beam_search(self, prompts: Prompts, num_beams: int = 4, max_new_tokens: int = 32,
                    *, length_penalty: float = 1.0, early_stopping=False) -> RolloutBatch:
        """The best beam per prompt, for evaluation, packed as a :class:`RolloutBatch` (one row
        per prompt; behaviour_logp is 0: beams are not samples).

        Same algorithm as transformers' beam search (``generate(num_beams=...)``: 2·num_beams
        candidates per step, finished hypotheses scored sum-logp / length**length_penalty,
        the same early-stopping heuristic), on this engine's KV cache with one prefill per
        prompt shared by its beams.
        """
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        ids, texts = self._encode(prompts)
        t0 = time.perf_counter()
        prompt_ids, prompt_mask = self._left_pad(ids)
        Bp, P = prompt_ids.shape
        nb, L, dev = num_beams, P + max_new_tokens, self.device
        eos = self.tokenizer.eos_token_id
        eos_ids = torch.tensor([] if eos is None else [eos], dtype=torch.long, device=dev)
        keep = max(2, 1 + eos_ids.numel()) * nb  # candidates per step, so nb survive the finished ones
        top_nb = torch.arange(keep, device=dev) < nb
        offset = torch.arange(Bp, device=dev).view(-1, 1) * nb
        NEG = -1.0e9

        running = torch.full((Bp, nb, L), self.pad_id, dtype=torch.long, device=dev)
        running[:, :, :P] = prompt_ids[:, None]
        finished = running.clone()
        run_scores = torch.zeros(Bp, nb, device=dev)
        run_scores[:, 1:] = NEG  # all beams start identical: expand only the first
        fin_scores = torch.full((Bp, nb), NEG, device=dev)
        fin_done = torch.zeros(Bp, nb, dtype=torch.bool, device=dev)
        unsatisfied = torch.ones(Bp, 1, dtype=torch.bool, device=dev)

        def gather(t, idx):  # t [Bp, K, ...], idx [Bp, k]
            return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:]))

        with self._eval_mode():
            out = self._prefill(prompt_ids, prompt_mask)
            cache = out.past_key_values
            cache.batch_repeat_interleave(nb)
            logits = out.logits[:, -1].repeat_interleave(nb, dim=0)  # [Bp·nb, V]
            attn = prompt_mask.repeat_interleave(nb, dim=0)
            cur = P
            while True:
                V = logits.shape[-1]
                acc = (torch.log_softmax(logits.float(), -1).view(Bp, nb, V) + run_scores[:, :, None]).view(Bp, -1)
                top_lp, top_idx = torch.topk(acc, keep)  # [Bp, keep]
                origin, tok = top_idx // V, top_idx % V
                cand = gather(running, origin)
                cand[:, :, cur] = tok
                hits = torch.isin(tok, eos_ids) | (cur + 1 >= L)
                # next running beams: the best candidates that did not stop
                nxt = torch.topk(top_lp + hits.float() * NEG, nb)[1]
                running = gather(cand, nxt)
                run_scores = gather(top_lp + hits.float() * NEG, nxt)
                beam_idx = (gather(origin, nxt) + offset).flatten()
                # finished hypotheses: stopped candidates ranked within the top nb, length-normalised
                just = hits & top_nb[None]
                fin_lp = top_lp / ((cur + 1 - P) ** length_penalty)
                full = fin_done.all(-1, keepdim=True) & (early_stopping is True)
                fin_lp = fin_lp + full.float() * NEG + (~unsatisfied).float() * NEG + (~just).float() * NEG
                m_scores = torch.cat([fin_scores, fin_lp], 1)
                sel = torch.topk(m_scores, nb)[1]
                finished = gather(torch.cat([finished, cand], 1), sel)
                fin_scores = gather(m_scores, sel)
                fin_done = gather(torch.cat([fin_done, just], 1), sel)
                cur += 1
                best_len = (L - P) if (early_stopping == "never" and length_penalty > 0.0) else (cur - P)
                best_running = run_scores[:, :1] / (best_len ** length_penalty)
                worst_fin = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, torch.full_like(fin_scores, NEG))
                unsatisfied = unsatisfied & (best_running > worst_fin).any(-1, keepdim=True)
                go_on = bool(unsatisfied.any()) and not (bool(fin_done.all()) and early_stopping is True) \
                    and not bool(hits.all())
                if not go_on:
                    break
                cache.reorder_cache(beam_idx)
                attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
                pos = (attn.sum(-1, keepdim=True) - 1).clamp(min=0)
                out = self.model(input_ids=running[:, :, cur - 1].reshape(-1, 1), attention_mask=attn,
                                 position_ids=pos, past_key_values=cache, use_cache=True)
                logits = out.logits[:, -1]
                cache = out.past_key_values
        resp = finished[:, 0, P:cur]
        return self._pack_fixed(prompt_ids, prompt_mask, resp, texts, time.perf_counter() - t0)

    def _pack_fixed(self, prompt_ids, prompt_mask, resp, texts, elapsed) -> RolloutBatch:
        """A RolloutBatch from finished responses ``[B, R]`` (cut after the first eos)."""
        eos = self.tokenizer.eos_token_id
        mask = torch.ones_like(resp)
        reasons = []
        for i in range(resp.shape[0]):
            row = resp[i].tolist()
            cut = row.index(eos) + 1 if eos is not None and eos in row else len(row)
            mask[i, cut:] = 0
            reasons.append("stop" if cut < len(row) or (eos is not None and eos in row) else "length")
        resp = torch.where(mask.bool(), resp, torch.full_like(resp, self.pad_id))
        zeros = torch.zeros_like(prompt_mask)
        num = int(mask.sum())
        return RolloutBatch(
            input_ids=torch.cat([prompt_ids, resp], 1),
            attention_mask=torch.cat([prompt_mask, mask], 1),
            response_mask=torch.cat([zeros, mask], 1),
            behaviour_logp=torch.zeros(resp.shape[0], prompt_ids.shape[1] + resp.shape[1], device=resp.device),
            prompt_texts=list(texts),
            response_texts=self.tokenizer.batch_decode([r[m.bool()].tolist() for r, m in zip(resp, mask)],
                                                       skip_special_tokens=True),
            group_index=torch.arange(resp.shape[0], device=resp.device),
            num_generated_tokens=num,
            tokens_per_second=num / max(elapsed, 1e-9),
            prompt_length=prompt_ids.shape[1],
            finish_reasons=reasons,
        )


__all__ = ["HFRolloutEngine"]
