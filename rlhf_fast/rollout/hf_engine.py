"""HFRolloutEngine: batched generation on a Hugging Face causal LM with a KV cache, every
token drawn by :func:`rlhf_fast.ops.sample`, the behaviour log-prob recorded as it is drawn.

One prefill per prompt: the prompt cache is computed once for the distinct prompts and
repeated ``n`` times (``DynamicCache.batch_repeat_interleave``, or ``reorder_cache`` for the
linear-attention / SSM states of hybrid models) for the group of samples.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
import time
import warnings
from typing import List, Optional, Sequence

import numpy as np
import torch

from rlhf_fast import ops

from ..distributed import gathered_params
from ..models.logprobs import default_position_ids, position_table_size, unwrap
from ..ops.sampling import _effective_top_k, sample_with_uniforms, sample_with_uniforms_unchecked
from .llama_decode import _CUDAGraphStep, _LlamaDecoder
from .penalties import Penalties
from .types import Prompts, RolloutBatch, RolloutEngine, SamplingParams


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class: type) -> str:
    """The forward's name for the KV cache: ``cache`` from transformers 5.25 (where
    ``past_key_values`` warns that it is deprecated), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _returned_cache(out, model):
    """The KV cache of ``model``'s output ``out``, under either name; TypeError when it has none
    (RWKV keeps its recurrent state in ``out.state``, RecurrentGemma inside its modules)."""
    cache = getattr(out, "cache", None)
    cache = cache if cache is not None else getattr(out, "past_key_values", None)
    if cache is None:
        raise TypeError(f"{type(unwrap(model)).__name__}'s forward returned no transformers Cache (no cache / "
                        f"past_key_values in its output): HFRolloutEngine decodes on one; models that keep their "
                        f"recurrent state elsewhere (RWKV, RecurrentGemma) are not supported")
    return cache


def _repeat_rows(cache, n: int, rows: int, device) -> None:
    """Repeat each of the ``rows`` batch rows of ``cache`` ``n`` times in place (consecutive
    copies). ``batch_repeat_interleave`` repeats keys / values only: transformers' linear-attention
    / conv / SSM cache layers (Mamba, LFM2, Qwen3-Next, Jamba, ...) have none, and its "hybrid"
    layers (Falcon-H1, Zamba) inherit the key / value one and would keep their states at ``rows``;
    for those caches ``reorder_cache`` (beam search's gather, defined by every layer) with the
    repeated row indices repeats everything (:func:`_select_rows`, MiniMax's states too)."""
    layers = getattr(cache, "layers", None) or ()
    if not hasattr(cache, "linear_cache") and all(
            hasattr(layer, "batch_repeat_interleave") and not hasattr(layer, "conv_states") for layer in layers):
        cache.batch_repeat_interleave(n)
    else:
        _select_rows(cache, torch.arange(rows, device=device).repeat_interleave(n))


def _select_rows(cache, idx: torch.Tensor) -> None:
    """Make ``cache``'s batch rows ``idx`` (``[b]`` int64, rows may repeat) its rows, in place:
    ``reorder_cache`` of every layer, and the linear-attention states MiniMax's cache keeps in a
    ``linear_cache`` list of its own, which that ``reorder_cache`` (DynamicCache's) leaves alone
    (and whose ``batch_repeat_interleave`` indexes the list past its last linear layer: IndexError
    when the last layer is full attention; generate never repeats it, it expands the inputs)."""
    cache.reorder_cache(idx)
    states = getattr(cache, "linear_cache", None)
    if isinstance(states, list):
        for i, s in enumerate(states):
            if isinstance(s, torch.Tensor):  # ([] for a layer with no linear state)
                states[i] = s.index_select(0, idx.to(s.device))


class HFRolloutEngine(RolloutEngine):
    """Generation engine on a transformers causal LM (plain or peft) and its tokenizer.

    Text prompts are encoded by :func:`rlhf_fast.feedback.formats.prompt_token_ids`: a chat
    rendered by ``render_prompt`` without the tokenizer's special tokens (its template writes
    its own bos, or none: TRL's ``apply_chat_template(tokenize=True)``, the SFT / DPO rows), other
    text with them, except that a text already starting with the bos keeps one bos, not two.
    ``device``: where prompts go (default: the model's device). The model is used as is
    (no copy): weights updated by the trainer are picked up by the next call.
    ``cuda_graphs``: on a CUDA device, with a model the preallocated-KV decoder supports (bare
    Llama / Mistral / Qwen2 / Qwen3 on sdpa, not FSDP-sharded), capture the decode step once per
    :meth:`generate` call as a CUDA graph and replay it per token; if the capture fails or its
    logits differ from the eager step's, the call warns and decodes eagerly.
    ``alive_check_every`` (attribute): decode steps between host reads of "have all rows
    finished?" — None: every step on the CPU, every 8 on a GPU, where the read is a device sync
    that would stop the host from queueing the next step. Steps run after the last row finished
    are trimmed, so the result does not depend on it.
    Sampling penalties (:class:`SamplingParams` repetition_penalty ... min_new_tokens) are
    applied to each step's logits after the decode forward, outside the CUDA graph (which
    stays the plain forward, captured and replayed as without penalties), with their state on
    the device and no host sync (:mod:`rlhf_fast.rollout.penalties`).
    """

    def __init__(self, model, tokenizer, *, device=None, cuda_graphs: bool = True):
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool, got {type(cuda_graphs).__name__}")
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise TypeError("tokenizer must be a transformers tokenizer (with encode/decode)")
        if not isinstance(model, torch.nn.Module) or getattr(unwrap(model), "config", None) is None:
            raise TypeError(f"model must be a transformers causal LM (a PreTrainedModel, or a peft / DDP wrapper "
                            f"of one), got {type(model).__name__}")
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a str, torch.device or None, got {type(device).__name__}")
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("tokenizer must define a pad_token_id (or at least an eos_token_id used as pad)")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        V = self._vocab_size()
        if not 0 <= self.pad_id < V:
            # it pads the prompts and the finished rows: fails deep in torch once a batch is padded
            which = "pad_token_id" if tokenizer.pad_token_id is not None else "pad_token_id (None: the eos_token_id)"
            raise ValueError(f"the tokenizer's {which} {self.pad_id} is outside the model's vocabulary [0, {V}): "
                             f"a pad token added to the tokenizer needs "
                             f"model.resize_token_embeddings(len(tokenizer)), or use an existing token "
                             f"(tokenizer.pad_token = tokenizer.eos_token)")
        self.cuda_graphs = cuda_graphs
        # decode steps between host reads of "all rows finished": None = 1 on the CPU, 8 on a GPU
        self.alive_check_every: Optional[int] = None
        self._cache_kw = _cache_kwarg(type(unwrap(model)))

    # ------------------------------------------------------------------ prompts

    def _encode(self, prompts: Prompts):
        """Token lists and texts of ``prompts`` (strings or lists of ids)."""
        if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise TypeError("prompts must be a non-empty list of str or a non-empty list of lists of token ids")
        if all(isinstance(p, str) for p in prompts):
            from rlhf_fast.feedback.formats import prompt_token_ids

            # a chat rendered by render_prompt without the tokenizer's special tokens (its template
            # writes its own bos, or none), plain text with them: the SFT / DPO rows' and TRL's ids
            ids = prompt_token_ids(self.tokenizer, prompts)
            texts = [str(p) for p in prompts]
        elif all(isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p) for p in prompts):
            ids = [list(p) for p in prompts]
            texts = None  # decoded once the ids are checked
        else:
            raise TypeError("prompts must be all str or all lists of int token ids")
        if any(len(p) == 0 for p in ids):
            raise ValueError("every prompt must have at least one token")
        # an id outside the embedding table fails deep in torch (a device-side assert on a GPU)
        V = self._vocab_size()
        for i, p in enumerate(ids):
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= V or any(type(t) is bool for t in p):
                bad = next(t for t in p if type(t) is bool or not 0 <= t < V)
                raise ValueError(f"prompts[{i}] holds token id {bad!r}: token ids must be ints in [0, {V}) "
                                 f"(the model's vocabulary; a tokenizer larger than the model's embedding?)")
        if texts is None:
            texts = [self.tokenizer.decode(p, skip_special_tokens=True) for p in ids]
        return ids, texts

    def _vocab_size(self) -> int:
        emb = unwrap(self.model).get_input_embeddings() if hasattr(unwrap(self.model), "get_input_embeddings") else None
        n = getattr(emb, "num_embeddings", None)
        return int(n) if n is not None else int(unwrap(self.model).config.vocab_size)

    def _check_length(self, P: int, max_new_tokens: int) -> None:
        """Refuse max_new_tokens beyond the model's positions (the trainers' rule; a huge value
        would allocate the whole response buffer up front), and prompt + response beyond a
        learned absolute position table (GPT-2's wpe), which would index past it."""
        positions = getattr(unwrap(self.model).config, "max_position_embeddings", None)
        if isinstance(positions, int) and max_new_tokens > positions:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) is more than the model's "
                             f"max_position_embeddings ({positions})")
        table = position_table_size(self.model)
        if table is not None and P + max_new_tokens > table:
            raise ValueError(f"the longest prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) is more than the "
                             f"{table} positions of the model's position embeddings; shorten the prompts")

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
            with torch.no_grad(), self._eager_generation():
                yield
        finally:
            self.model.train(was_training)

    def _eager_generation(self):
        """``torch.compiler.set_stance("force_eager")`` while the model's backbone is compiled
        (the trainers' ``torch_compile``: :func:`rlhf_fast.trainers.compile.compile_backbone`),
        else nothing. Decoding calls the backbone with a KV cache one token longer every step:
        compiled, it would recompile for new cache shapes up to dynamo's recompile limit, for
        forwards that run once; the trainers' compiled forwards are the scoring and update ones."""
        from ..models.logprobs import backbone
        from ..trainers.compile import compiled

        try:
            base = backbone(self.model)
        except TypeError:  # no base model to have been compiled
            return contextlib.nullcontext()
        return torch.compiler.set_stance("force_eager") if compiled(base) else contextlib.nullcontext()

    def _prefill(self, prompt_ids, prompt_mask):
        """One forward over the left-padded prompts ``[Bp, P]`` filling a fresh DynamicCache (or
        the model's own cache class); only the last position's logits are computed where the
        model supports it."""
        from transformers import DynamicCache

        base = unwrap(self.model)
        # a model with a cache class of its own (MiniMax; generate knows them by
        # _supports_default_dynamic_cache) refuses a DynamicCache: it makes its own when given none
        supports = getattr(type(base), "_supports_default_dynamic_cache", None)
        own = supports is not None and not supports()

        def args():
            kw = dict(input_ids=prompt_ids, attention_mask=prompt_mask,
                      position_ids=default_position_ids(prompt_mask), use_cache=True)
            if not own:
                kw[self._cache_kw] = DynamicCache(config=base.config)
            return kw

        try:
            return self.model(**args(), logits_to_keep=1)
        except TypeError as e:  # older/custom models without logits_to_keep
            if "logits_to_keep" not in str(e):
                raise
            return self.model(**args())

    # model types whose decode steps take no attention mask: generate's prepare_inputs_for_generation
    # drops it after the prefill, and their mixer multiplies the one new token's states by the mask,
    # so a [B, K] mask broadcasts them to K tokens (wrong logits, no error)
    _NO_STEP_MASK = ("mamba", "falcon_mamba", "mamba2")

    def _step_mask(self, mask):
        """The attention mask a decode step passes on to the model: ``mask`` (``[B, K]``), or
        None for the model types of ``_NO_STEP_MASK``."""
        model_type = getattr(getattr(unwrap(self.model), "config", None), "model_type", None)
        return None if model_type in self._NO_STEP_MASK else mask

    def _bool_mask_ok(self) -> bool:
        """Whether decode steps may pass a ready 4D boolean mask: sdpa attention on a
        full-attention Llama-style model (no sliding window, whose mask transformers builds)."""
        cfg = getattr(unwrap(self.model), "config", None)
        return (cfg is not None and getattr(cfg, "_attn_implementation", None) == "sdpa"
                and getattr(cfg, "model_type", None) in ("llama", "qwen2", "qwen3", "mistral")
                and getattr(cfg, "sliding_window", None) is None
                and all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or ())))

    def _decode_plan(self, gathered: bool):
        """``(static, graphs)``: whether the preallocated-KV decoder runs static steps, and
        whether they are captured as a CUDA graph — both when CUDA graphs are on, the device is
        CUDA and the weights are unsharded (FSDP2's gathered parameters are freed and
        re-gathered elsewhere after the call). Tests run the static steps without a graph."""
        on = self.cuda_graphs and self.device.type == "cuda" and not gathered
        return on, on

    def _eos_ids(self) -> List[int]:
        """The ids that end a response: the tokenizer's eos and every id of the model's
        ``generation_config.eos_token_id`` (an int or a list), as transformers' ``generate``
        stops on the latter — chat models end a turn on several (Llama-3 instruct:
        ``<|eot_id|>``, ``<|eom_id|>``, ``<|end_of_text|>``; Qwen2.5 instruct: ``<|im_end|>``,
        ``<|endoftext|>``), of which the tokenizer names one."""
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(getattr(unwrap(self.model), "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, torch.Tensor):
            gen_eos = gen_eos.flatten().tolist()
        if isinstance(gen_eos, int) and not isinstance(gen_eos, bool):
            gen_eos = [gen_eos]
        if isinstance(gen_eos, (list, tuple)):
            ids.update(int(t) for t in gen_eos if isinstance(t, int) and not isinstance(t, bool) and t >= 0)
        return sorted(ids)

    def _stop_ids(self, params: SamplingParams) -> torch.Tensor:
        """``[S]`` int64: ``params.stop_token_ids`` (ValueError for one the model cannot produce)
        and, unless ignore_eos, the eos ids inside the vocabulary (one outside it is never drawn,
        and min_new_tokens would index the logits with it)."""
        V = self._vocab_size()
        bad = [t for t in params.stop_token_ids if t >= V]
        if bad:
            raise ValueError(f"stop_token_ids holds {bad[0]}, outside the model's vocabulary [0, {V}): it could "
                             f"never be generated")
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop.update(t for t in self._eos_ids() if t < V)
        return torch.tensor(sorted(stop), dtype=torch.long, device=self.device)

    def _hits_stop_string(self, tokens: List[int], stop_strings: Sequence[str], before: int) -> bool:
        """Whether the generated ``tokens`` end a row on one of ``stop_strings``; ``before``: the
        token before the response (the prompt's last)."""
        # a stop string of L characters spans at most 4·L byte-level tokens; only the tail can
        # hold a new match (an earlier one would have stopped the row already)
        window = 4 * max(len(s) for s in stop_strings) + 1
        tail = tokens[-window:]
        # decoded after the token before it, whose own text is then cut off: decoded first, a
        # SentencePiece-style token loses its leading space ("▁blu" alone is "blu", which a stop
        # string " blu" misses, while generate's StopStringCriteria stops on it); a context that
        # does not decode to a prefix of the whole (bytes of one character) falls back to the tail
        ctx = tokens[-window - 1] if len(tokens) > window else before
        pre = self.tokenizer.decode([ctx], skip_special_tokens=False)
        text = self.tokenizer.decode([ctx] + tail, skip_special_tokens=False)
        text = text[len(pre):] if text.startswith(pre) else self.tokenizer.decode(tail, skip_special_tokens=False)
        return any(s in text for s in stop_strings)

    def _sample_rows(self, logits: torch.Tensor, uniforms: torch.Tensor, params: SamplingParams, checked: bool):
        """One draw per row of ``logits [B, V]`` from that row's own uniform (``uniforms [B]``
        float64 on the CPU, drawn from the row's generator): one batched inverse-CDF call
        (:func:`rlhf_fast.ops.sampling.sample_with_uniforms`) turns them into tokens, so a row's
        draw depends only on its logits and its uniform, not on its place in the batch.
        Finished rows draw too (with uniforms no live row uses) and are masked by the caller,
        as with ``ops.sample``. ``checked``: the arguments were checked on an earlier step."""
        draw = sample_with_uniforms_unchecked if checked else sample_with_uniforms
        # top_k >= V means off (0), as in the checked call: a value past int64 never reaches the op
        t, v = draw(logits, uniforms, temperature=float(params.temperature),
                    top_k=_effective_top_k(params.top_k, logits), top_p=float(params.top_p),
                    min_p=float(params.min_p))
        return t, v.float()

    def generate(self, prompts: Prompts, params: Optional[SamplingParams] = None) -> RolloutBatch:
        """Sample ``params.n`` responses per prompt; see :class:`RolloutBatch` for the layout."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids, texts = self._encode(prompts)
        self._check_length(max(len(p) for p in ids), params.max_new_tokens)
        t0 = time.perf_counter()
        prompt_ids, prompt_mask = self._left_pad(ids)  # [Bp, P]
        n, Bp, P = params.n, prompt_ids.shape[0], prompt_ids.shape[1]
        B = Bp * n
        gen, row_uniforms = None, None
        if params.sample_seeds is not None:
            if len(params.sample_seeds) != B:
                raise ValueError(f"sample_seeds must have one seed per response row "
                                 f"(len(prompts) × n = {B}), got {len(params.sample_seeds)}")
            if params.temperature > 0:  # greedy draws nothing
                # on the CPU whatever the device: the uniforms are drawn on the host, one per row
                # a row's k-th draw is the k-th torch.rand(1) of its generator, what a one-row
                # ops.sample call at that step would draw; rand(R) gives the same R numbers in one
                # call (the CPU generator fills a tensor serially), so they are drawn up front
                row_uniforms = torch.stack([torch.rand(params.max_new_tokens, generator=torch.Generator().manual_seed(s),
                                                   dtype=torch.float64) for s in params.sample_seeds])  # [B, R]
        elif params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        stop_ids = self._stop_ids(params)
        # FSDP2: the full weights on every rank for the whole call, so decode steps (as many
        # as this rank's rows need) run without collectives
        with self._eval_mode(), gathered_params(self.model) as gathered:
            R = params.max_new_tokens
            static, graphs = self._decode_plan(gathered)
            fast_mask = self._bool_mask_ok()
            fast = _LlamaDecoder(self.model, B, P, R, static=static) \
                if fast_mask and _LlamaDecoder.supported(self.model, gathered=gathered) else None
            if fast is not None and fast.prefills(P):
                # a short prompt on the C++ decode op (see _LlamaDecoder.prefills)
                logits = fast.prefill(prompt_ids, prompt_mask, n)
            else:
                out = self._prefill(prompt_ids, prompt_mask)
                logits = out.logits[:, -1]  # [Bp, V]
                cache = _returned_cache(out, self.model)
                if n > 1:
                    # the group shares one prefill: repeat the prompt's cache rows n times
                    _repeat_rows(cache, n, Bp, self.device)
                    logits = logits.repeat_interleave(n, dim=0)
                if fast is not None:
                    fast.load_cache(cache)
            # repetition / presence / frequency / n-gram / min_new_tokens state (None when all off:
            # then nothing below touches the logits); applied outside the decode forward, so a
            # CUDA-graph step stays the plain forward and its output buffer is only read
            pen = Penalties.build(params, prompt_ids, prompt_mask, R, logits.shape[-1], stop_ids)
            # preallocated [B, P + R] buffers written in place: no per-token torch.cat / stack
            attn = torch.zeros(B, P + R, dtype=torch.long, device=self.device)
            attn[:, :P] = prompt_mask.repeat_interleave(n, dim=0)
            resp = torch.full((B, R), self.pad_id, dtype=torch.long, device=self.device)
            resp_logp = torch.zeros(B, R, dtype=torch.float32, device=self.device)
            resp_mask = torch.zeros(B, R, dtype=torch.long, device=self.device)
            # the keys each row attends to, as the bool mask sdpa and the decode op take (a view of
            # it per step; static steps attend to all P + R columns under it, written in place)
            key_mask = attn.bool()
            full_mask = key_mask[:, None, None, :] if fast is not None and static else None
            # position of the next token: attended tokens so far - 1 (every prompt has a token)
            pos_ids = attn.sum(-1, keepdim=True) - 1  # [B, 1]
            graphed, graph_failed = None, not (static and graphs)
            alive = torch.ones(B, dtype=torch.bool, device=self.device)
            finished_by_stop = torch.zeros(B, dtype=torch.bool, device=self.device)
            check_ids = stop_ids.numel() > 0
            check_every = self.alive_check_every or (1 if self.device.type == "cpu" else 8)
            if params.stop_strings:  # decoded on the host every step anyway
                check_every = 1
            texts_so_far: List[List[int]] = [[] for _ in range(B)]
            # each row's last prompt token (left padding: the last column is always a real token)
            prompt_last = prompt_ids[:, -1].repeat_interleave(n).tolist() if params.stop_strings else None
            R_used = 0
            for step in range(R):
                if pen is not None:
                    logits = pen.apply(logits, step)  # a new float32 tensor
                if row_uniforms is None:
                    tok, lp = ops.sample(logits, temperature=float(params.temperature), top_k=params.top_k,
                                         top_p=float(params.top_p), min_p=float(params.min_p), generator=gen)
                else:
                    tok, lp = self._sample_rows(logits, row_uniforms[:, step], params, checked=step > 0)
                dead = ~alive
                tok = tok.masked_fill_(dead, self.pad_id)
                if pen is not None:
                    pen.update(tok, alive, step)
                resp[:, step] = tok
                resp_logp[:, step] = lp.float().masked_fill_(dead, 0.0)
                resp_mask[:, step] = alive
                R_used = step + 1
                hit = (tok == stop_ids[0]) if stop_ids.numel() == 1 else torch.isin(tok, stop_ids)
                stopped = alive & hit if check_ids else torch.zeros_like(alive)
                if params.stop_strings:
                    tl = tok.tolist()
                    for i in alive.nonzero().flatten().tolist():
                        texts_so_far[i].append(tl[i])
                        if not stopped[i] and self._hits_stop_string(texts_so_far[i], params.stop_strings,
                                                                          prompt_last[i]):
                            stopped[i] = True
                finished_by_stop |= stopped
                # finished rows keep feeding pad tokens, masked out, so shapes stay rectangular
                attn[:, P + step] = alive
                key_mask[:, P + step] = alive
                pos_ids += attn[:, P + step:P + step + 1]
                alive = alive & ~stopped
                # "all rows done?" reads a device flag on the host; on a GPU only every few steps,
                # so the host can queue the next steps meanwhile (the extra steps of finished rows
                # are masked and trimmed below)
                if step + 1 == R or ((step + 1) % check_every == 0 and not bool(alive.any())):
                    break
                if full_mask is not None:
                    col = P + step
                    if graphed is not None:
                        logits = graphed(tok, pos_ids, col)
                        continue
                    if not graph_failed:
                        try:
                            graphed = _CUDAGraphStep(fast, tok, full_mask, pos_ids, col)
                            logits = graphed.out
                            continue
                        except RuntimeError as e:
                            graph_failed = True
                            warnings.warn(f"CUDA-graph decoding is off for this generate call ({e}); "
                                          f"decoding eagerly", RuntimeWarning, stacklevel=2)
                    col_t = torch.full((1,), col, dtype=torch.long, device=tok.device)
                    logits = fast.step(tok, full_mask, pos_ids, col_t)
                    continue
                # sdpa takes a ready [B, 1, 1, K] boolean mask as is: skips transformers' per-call
                # mask construction (the same mask: one query row, every key up to now visible)
                mask_arg = key_mask[:, None, None, :P + step + 1] if fast_mask else attn[:, :P + step + 1]
                if fast is not None:
                    logits = fast.step(tok, mask_arg, pos_ids, P + step)
                    continue
                out = self.model(input_ids=tok.unsqueeze(1), attention_mask=self._step_mask(mask_arg),
                                 position_ids=pos_ids, use_cache=True, **{self._cache_kw: cache})
                logits = out.logits[:, -1]
                cache = _returned_cache(out, self.model)
        if check_every > 1:  # drop the steps run after every row had finished
            R_used = int(resp_mask[:, :R_used].any(0).nonzero().max()) + 1
        resp, resp_mask = resp[:, :R_used], resp_mask[:, :R_used]
        resp_logp = resp_logp[:, :R_used] * resp_mask
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
        the same early-stopping heuristic; a hypothesis ends on any eos id: the tokenizer's and
        the model's ``generation_config.eos_token_id``), on this engine's KV cache with one
        prefill per prompt shared by its beams. Deterministic beam search only (no sampling,
        no n-gram / repetition processors); the scores are not returned. ``num_beams=1`` is
        greedy search, as ``generate(num_beams=1)``: early_stopping and length_penalty do not
        change it. early_stopping: True, False or "never" (a numpy bool is read as the bool).
        """
        if isinstance(num_beams, bool) or not isinstance(num_beams, numbers.Integral) or num_beams < 1:
            raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if isinstance(early_stopping, np.bool_):
            early_stopping = bool(early_stopping)  # numpy's bool, as the numbers below
        # the algorithm tests `is True`: 1 or "true" (== True / truthy) would silently act as False
        if not (isinstance(early_stopping, bool) or (type(early_stopping) is str and early_stopping == "never")):
            raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) \
                or not abs(length_penalty) < float("inf"):
            raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
        # numpy scalars as Python numbers (an np.int64 beam count would make the buffers' shapes)
        num_beams, max_new_tokens, length_penalty = int(num_beams), int(max_new_tokens), float(length_penalty)
        if num_beams == 1:
            # generate(num_beams=1) is greedy search, which early_stopping / length_penalty (beam
            # options) do not change; one beam with early_stopping="never" would outlive an eos
            return self.greedy(prompts, max_new_tokens=max_new_tokens)
        ids, texts = self._encode(prompts)
        self._check_length(max(len(p) for p in ids), max_new_tokens)
        t0 = time.perf_counter()
        prompt_ids, prompt_mask = self._left_pad(ids)
        Bp, P = prompt_ids.shape
        nb, L, dev = num_beams, P + max_new_tokens, self.device
        eos_ids = torch.tensor(self._eos_ids(), dtype=torch.long, device=dev)
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

        with self._eval_mode(), gathered_params(self.model):
            out = self._prefill(prompt_ids, prompt_mask)
            cache = _returned_cache(out, self.model)
            _repeat_rows(cache, nb, Bp, dev)
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
                _select_rows(cache, beam_idx)
                attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
                pos = (attn.sum(-1, keepdim=True) - 1).clamp(min=0)
                out = self.model(input_ids=running[:, :, cur - 1].reshape(-1, 1),
                                 attention_mask=self._step_mask(attn), position_ids=pos, use_cache=True,
                                 **{self._cache_kw: cache})
                logits = out.logits[:, -1]
                cache = _returned_cache(out, self.model)
        resp = finished[:, 0, P:cur]
        return self._pack_fixed(prompt_ids, prompt_mask, resp, texts, time.perf_counter() - t0)

    def _pack_fixed(self, prompt_ids, prompt_mask, resp, texts, elapsed) -> RolloutBatch:
        """A RolloutBatch from finished responses ``[B, R]`` (cut after the first eos, any of
        :meth:`_eos_ids`)."""
        eos = set(self._eos_ids())
        mask = torch.ones_like(resp)
        reasons = []
        for i in range(resp.shape[0]):
            row = resp[i].tolist()
            cut = next((j + 1 for j, t in enumerate(row) if t in eos), None)
            reasons.append("length" if cut is None else "stop")
            mask[i, len(row) if cut is None else cut:] = 0
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
