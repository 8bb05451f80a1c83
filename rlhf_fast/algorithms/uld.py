"""Universal Logit Distillation across tokenizers (TRL 1.16's experimental GOLD,
``trl/experimental/gold/gold_trainer.py``: ``ULDLoss``, ``build_teacher_inputs_from_texts``).

The student and the teacher tokenize the same text differently, so their distributions cannot be
compared id by id. Per answer (a row):

1. the student's prompt and answer are decoded to text and re-tokenized by the teacher's
   tokenizer (:func:`teacher_inputs`, TRL's ``build_teacher_inputs_from_texts``): prompt tokens,
   then answer tokens, then the teacher's eos; each answer token carries its UTF-8 byte span in
   the answer text (:func:`encode_with_byte_offsets`), as does each of the student's
   (:func:`student_byte_offsets`, TRL's ``_maybe_add_completion_byte_offsets``);
2. both answers' probabilities (each model at its own ``uld_*_temperature``) are aligned: with
   ``use_extended_uld`` the tokens are grouped where both tokenizations reach the same byte
   boundary (:func:`align_by_byte_offsets`) and each group's tokens merged into one distribution
   (:func:`merge_group_probabilities`, ``observed`` or ``bayesian``); without it the first
   min(len) positions pair up;
3. the aligned distributions are compared without a shared vocabulary: the L1 distance of the
   sorted probabilities (:func:`sorted_l1`), or with ``uld_use_hybrid_loss`` the generalised JSD
   over the tokens both vocabularies hold (same string) plus the sorted L1 over the rest
   (:func:`hybrid_loss`).

:func:`uld_row_loss` is one row's term (TRL's per-row loop body, same operations in the same
order, so the numbers are TRL's on the same logits); :func:`uld_loss` the whole batch as TRL's
``ULDLoss.__call__`` returns it; :func:`chunked_uld_loss` the memory-aware form the trainer uses:
from both models' last hidden states and heads, a few rows of logits at a time, each chunk
recomputed in the backward, summed (the trainer divides by the mini-batch's rows and tokens).

The byte-offset helpers are transcribed from ``trl/experimental/utils.py`` (TRL is not a
dependency of the package).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
MERGE_STRATEGIES = ("observed", "bayesian")
_EPS = 1e-8  # TRL's clamp of a merged group's scalar probabilities


@dataclass(frozen=True)
class ULDSettings:
    """The ULD loss's settings (TRL GOLDConfig's ``uld_*`` keys, ``use_extended_uld`` and ``beta``,
    read by ``ULDLoss.__init__``); ``matched_weight`` / ``unmatched_weight`` None: adaptive."""

    crossentropy_weight: float = 0.0
    distillation_weight: float = 1.0
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    skip_student_eos: bool = True
    skip_teacher_eos: bool = True
    use_extended_uld: bool = True
    merge_strategy: str = "observed"
    use_hybrid_loss: bool = False
    matched_weight: Optional[float] = None
    unmatched_weight: Optional[float] = None
    beta: float = 1.0


# ----------------------------------------------------------------------------- byte offsets (trl/experimental/utils.py)


def is_byte_level(backend) -> bool:
    """Whether a ``tokenizers`` backend is a ByteLevel BPE tokenizer (its pieces one char per byte):
    TRL's ``is_byte_level_tokenizer``."""
    return "ByteLevel" in repr(backend.pre_tokenizer) or "ByteLevel" in repr(backend.decoder)


def piece_byte_len(piece: str) -> int:
    """UTF-8 byte length of a ByteLevel piece (one char per byte): TRL's ``piece_byte_len``."""
    return len(piece)


def _bytes_to_unicode() -> dict:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
    bs += list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(n) for n in cs]))


_BYTE_LEVEL_DECODER = {ch: b for b, ch in _bytes_to_unicode().items()}


def _byte_level_piece_len(piece: str, text_bytes: bytes, start: int) -> Optional[int]:
    piece_bytes = []
    for ch in piece:
        if ch not in _BYTE_LEVEL_DECODER:
            return None
        piece_bytes.append(_BYTE_LEVEL_DECODER[ch])
    if piece_bytes and piece_bytes[0] == ord(" ") and text_bytes[start:start + 1] != b" ":
        piece_bytes = piece_bytes[1:]
    return len(piece_bytes)


def _split_repeated_byte_offsets(byte_offsets: list, tokens: list) -> list:
    """Split repeated char-derived spans of byte-fallback or byte-level tokens across their pieces."""
    normalized = list(byte_offsets)
    i = 0
    while i < len(byte_offsets):
        j = i + 1
        while j < len(byte_offsets) and byte_offsets[j] == byte_offsets[i]:
            j += 1
        if j - i > 1:
            start, end = byte_offsets[i]
            piece_lengths = [piece_byte_len(token) for token in tokens[i:j]]
            if sum(piece_lengths) == end - start:
                cursor = start
                for offset_idx, length in enumerate(piece_lengths, start=i):
                    normalized[offset_idx] = (cursor, cursor + length)
                    cursor += length
        i = j
    return normalized


def _normalize_byte_offsets(byte_offsets: list, tokens: list, text_bytes: bytes) -> list:
    byte_offsets = _split_repeated_byte_offsets(byte_offsets, tokens)
    normalized = []
    cursor = 0
    for idx, (start, end) in enumerate(byte_offsets):
        if start == end:
            normalized.append((cursor, cursor))
            continue
        piece_len = _byte_level_piece_len(tokens[idx], text_bytes, start)
        next_start = byte_offsets[idx + 1][0] if idx + 1 < len(byte_offsets) else None
        has_overlap = start < cursor or (next_start is not None and next_start < end)
        if piece_len is not None and (has_overlap or piece_len == end - start):
            candidate_start = max(start, cursor)
            candidate_end = candidate_start + piece_len
            if candidate_end <= end:
                start, end = candidate_start, candidate_end
        if start < cursor or end < start:
            raise ValueError("the tokenizer produced overlapping byte offsets that could not be normalized; "
                             "cross-tokenizer ULD needs monotonic byte offsets")
        normalized.append((start, end))
        cursor = end
    return normalized


def encode_with_byte_offsets(backend, texts: Sequence[str]) -> List[Tuple[List[int], List[Tuple[int, int]]]]:
    """Per text ``(ids, byte offsets)``: its tokens without special tokens and each token's
    ``(start, end)`` UTF-8 byte span in the text (TRL's ``encode_with_byte_offsets``). ValueError
    for a tokenizer that is not ByteLevel BPE (TRL raises NotImplementedError)."""
    if not is_byte_level(backend):
        raise ValueError("cross-tokenizer ULD with distill.use_extended_uld needs ByteLevel BPE tokenizers "
                         "(Llama-3, Qwen, SmolLM, ...); set distill.use_extended_uld false for others")
    out = []
    for text, enc in zip(texts, backend.encode_batch(list(texts), add_special_tokens=False)):
        char_to_byte = [0]
        for ch in text:
            char_to_byte.append(char_to_byte[-1] + len(ch.encode("utf-8")))
        offs = [(char_to_byte[s], char_to_byte[e]) for s, e in enc.offsets]
        out.append((list(enc.ids), _normalize_byte_offsets(offs, enc.tokens, text.encode("utf-8"))))
    return out


# ----------------------------------------------------------------------------- the two sides' inputs


def teacher_inputs(tokenizer, prompt_texts: Sequence[str], completion_texts: Sequence[str],
                   use_extended_uld: bool = True):
    """The teacher's batch from the student's texts (TRL's ``build_teacher_inputs_from_texts``):
    per row the prompt with the tokenizer's special tokens (a trailing eos dropped), the answer
    without, then one eos; right-padded. Returns ``(input_ids [B, Tt] int64, labels [B, Tt] int64
    (-100 on the prompt and padding), attention_mask [B, Tt] bool, byte_offsets [B, Tt, 2] int64)``:
    each answer token's byte span in its answer text, ``(len, len)`` for the eos, ``(0, 0)``
    elsewhere (all zeros without ``use_extended_uld``, which does not read them)."""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompt_ids = tokenizer(list(prompt_texts), add_special_tokens=True)["input_ids"]
    if use_extended_uld:
        encs = encode_with_byte_offsets(tokenizer.backend_tokenizer, completion_texts)
    else:
        ids = tokenizer(list(completion_texts), add_special_tokens=False)["input_ids"]
        encs = [(c, [(0, 0)] * len(c)) for c in ids]
    seqs, offs, n_prompt = [], [], []
    for p, (c_ids, c_offs), text in zip(prompt_ids, encs, completion_texts):
        if eos_id is not None and p and p[-1] == eos_id:  # so the answer extends the prompt cleanly
            p = p[:-1]
        content_len = len(text.encode("utf-8"))
        seq, off = list(p) + list(c_ids), [(0, 0)] * len(p) + list(c_offs)
        if eos_id is not None:
            seq.append(eos_id)
            off.append((content_len, content_len) if use_extended_uld else (0, 0))
        seqs.append(seq)
        offs.append(off)
        n_prompt.append(len(p))
    B, T = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((B, T), pad_id if pad_id is not None else 0, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.bool)
    byte_offsets = torch.zeros((B, T, 2), dtype=torch.long)
    for i, (seq, off, p) in enumerate(zip(seqs, offs, n_prompt)):
        input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        labels[i, p:len(seq)] = input_ids[i, p:len(seq)]
        attention[i, :len(seq)] = True
        byte_offsets[i, :len(seq)] = torch.tensor(off, dtype=torch.long).reshape(-1, 2)
    return input_ids, labels, attention, byte_offsets


def student_texts(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> Tuple[List[str], List[str]]:
    """``(prompt texts, answer texts)`` of the student's rows as TRL's on-policy generation decodes
    them (special tokens kept, no clean-up): the attended tokens before a row's first label, and its
    label tokens. input_ids / attention_mask / labels ``[B, T]`` (labels -100 off the answer)."""
    prompts, answers = [], []
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    for ids, am, lab in zip(input_ids.tolist(), attention_mask.tolist(), labels.tolist()):
        first = next((t for t, v in enumerate(lab) if v != IGNORE_INDEX), len(lab))
        prompts.append(tokenizer.decode([x for x, a in zip(ids[:first], am[:first]) if a], **kw))
        answers.append(tokenizer.decode([v for v in lab if v != IGNORE_INDEX], **kw))
    return prompts, answers


def student_byte_offsets(tokenizer, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, T, 2]`` int64: each label token's byte span in its row's answer text, from the pieces'
    byte lengths (TRL's ``_maybe_add_completion_byte_offsets``), ``(0, 0)`` elsewhere."""
    out = torch.zeros((*input_ids.shape, 2), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(input_ids.tolist(), labels.tolist())):
        cum = 0
        for t, (tid, v) in enumerate(zip(ids, lab)):
            if v == IGNORE_INDEX:
                continue
            nb = piece_byte_len(tokenizer.convert_ids_to_tokens([tid])[0])
            out[i, t, 0], out[i, t, 1] = cum, cum + nb
            cum += nb
    return out


def vocabulary_match(student_tokenizer, teacher_tokenizer) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(teacher ids [M], student ids [M])`` int64 of the token strings both vocabularies hold,
    by teacher id (TRL's ``_initialize_vocabulary_mapping``; ``[M]`` empty when none)."""
    s_vocab, pairs = student_tokenizer.get_vocab(), []
    for tok, t_id in teacher_tokenizer.get_vocab().items():
        if tok in s_vocab:
            pairs.append((t_id, s_vocab[tok]))
    pairs.sort()
    t = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    s = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return t, s


# ----------------------------------------------------------------------------- alignment and merging


def answer_span(labels: torch.Tensor) -> Tuple[int, int]:
    """``(first label index, label count)`` of one row's ``labels [T]`` (``(0, 0)`` without any):
    TRL's ``_get_start_and_size_answers``."""
    m = labels.ne(IGNORE_INDEX)
    if not bool(m.any()):
        return 0, 0
    return int(m.nonzero(as_tuple=True)[0][0]), int(m.sum())


def align_by_byte_offsets(s_offsets: list, t_offsets: list) -> Tuple[List[List[int]], List[List[int]]]:
    """Groups of student / teacher positions that end at the same byte boundary (TRL's
    ``_align_by_byte_offsets``): walk both ``[(start, end), ...]`` lists, advancing the side whose
    token ends earlier; a trailing remainder is one last group."""
    s_groups, t_groups = [], []
    s_start = t_start = s = t = 0
    n_s, n_t = len(s_offsets), len(t_offsets)
    while s < n_s and t < n_t:
        s_end, t_end = s_offsets[s][1], t_offsets[t][1]
        if s_end < t_end:
            s += 1
        elif s_end > t_end:
            t += 1
        else:
            s += 1
            t += 1
            s_groups.append(list(range(s_start, s)))
            t_groups.append(list(range(t_start, t)))
            s_start, t_start = s, t
    if s < n_s or t < n_t:
        s_groups.append(list(range(s_start, n_s)))
        t_groups.append(list(range(t_start, n_t)))
    return s_groups, t_groups


def merge_group_probabilities(probs: torch.Tensor, groups: List[List[int]], token_ids: Sequence[int],
                              strategy: str = "observed") -> torch.Tensor:
    """One distribution per group (TRL's ``_merge_probabilities_with_alignment_groups``): a group
    of one position keeps it; a longer one is ``observed``: the first position's distribution times
    the (clamped) probabilities of the tokens at the later positions, ``bayesian``: the last
    position's times those of the earlier ones. probs ``[T, V]``, token_ids ``[T]``; returns
    ``[len(groups), V]`` in probs' dtype (``probs`` itself when there is no group)."""
    if not groups:
        return probs
    aligned = torch.zeros(len(groups), probs.size(-1), device=probs.device, dtype=probs.dtype)
    for g, group in enumerate(groups):
        if len(group) > 1:
            if strategy == "bayesian":
                base, scalars = probs[group[-1]], group[:-1]
            else:
                base, scalars = probs[group[0]], group[1:]
            prod = 1.0
            for idx in scalars:
                prod *= probs[idx, token_ids[idx]].clamp_min(_EPS)
            aligned[g] = base * prod
        elif len(group) == 1:
            aligned[g] = probs[group[0]]
        else:
            aligned[g] = torch.zeros_like(probs[0])
    return aligned


# ----------------------------------------------------------------------------- the comparisons


def sorted_l1(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Σ |sorted student − sorted teacher| over positions and ranks / positions (the shorter
    vocabulary zero-padded): ULD's distance. student ``[n, Vs]``, teacher ``[n, Vt]``; 0-dim."""
    s = student.sort(dim=-1, descending=True).values
    t = teacher.sort(dim=-1, descending=True).values
    v = max(s.size(-1), t.size(-1))
    if s.size(-1) < v:
        s = F.pad(s, (0, v - s.size(-1)))
    if t.size(-1) < v:
        t = F.pad(t, (0, v - t.size(-1)))
    loss = F.l1_loss(s, t, reduction="sum")
    loss /= student.size(0)
    return loss


def jsd_from_probs(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's ``GOLDTrainer.generalized_jsd_loss(..., labels=None, temperature=1,
    reduction="batchmean", logits_are_probs=True)``: the generalised JSD of (unnormalised)
    probabilities ``[n, M]`` (logs of the values clamped at 1e-8), summed / n. beta 0: KL(teacher ‖
    student), 1: KL(student ‖ teacher)."""
    s_log = torch.log(student.clamp_min(1e-8))
    t_log = torch.log(teacher.clamp_min(1e-8))
    if beta == 0:
        jsd = F.kl_div(s_log, t_log, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t_log, s_log, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s_log.dtype, device=s_log.device)
        mix = torch.logsumexp(torch.stack([s_log + torch.log1p(-b), t_log + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(mix, t_log, reduction="none", log_target=True) \
            + (1 - b) * F.kl_div(mix, s_log, reduction="none", log_target=True)
    return jsd.sum() / max(jsd.size(0), 1)


def hybrid_loss(student: torch.Tensor, teacher: torch.Tensor, teacher_ids: torch.Tensor, student_ids: torch.Tensor,
                beta: float, matched_weight: Optional[float] = None, unmatched_weight: Optional[float] = None):
    """TRL's ``_compute_hybrid_uld_loss``: :func:`jsd_from_probs` over the matched tokens
    (``teacher_ids`` / ``student_ids`` ``[M]``, :func:`vocabulary_match`) plus :func:`sorted_l1`
    over each side's other tokens, weighted by ``matched_weight`` / ``unmatched_weight`` (None:
    M / Vt and 1 − that). student ``[n, Vs]``, teacher ``[n, Vt]``. Returns ``(loss, matched,
    unmatched)``, 0-dim each."""
    dev = student.device
    t_mask = torch.zeros(teacher.size(-1), dtype=torch.bool, device=dev)
    s_mask = torch.zeros(student.size(-1), dtype=torch.bool, device=dev)
    matched = torch.tensor(0.0, device=dev)
    m = teacher_ids.numel()
    if m > 0:
        t_ids, s_ids = teacher_ids.to(dev), student_ids.to(dev)
        t_mask[t_ids] = True
        s_mask[s_ids] = True
        matched = jsd_from_probs(student[:, s_ids], teacher[:, t_ids], beta)
    t_rest, s_rest = teacher[:, ~t_mask], student[:, ~s_mask]
    unmatched = torch.tensor(0.0, device=dev)
    if t_rest.size(-1) > 0 and s_rest.size(-1) > 0:
        unmatched = sorted_l1(s_rest, t_rest)
    if matched_weight is None:
        matched_weight = m / max(1, teacher.size(-1))
        unmatched_weight = 1.0 - matched_weight
    return matched_weight * matched + unmatched_weight * unmatched, matched, unmatched


# ----------------------------------------------------------------------------- one row, a batch


def _drop_first_group(s_offs, t_offs, s_start, s_size, t_start, t_size, cfg: ULDSettings):
    """``bayesian`` with an answer at index 0 (no logit predicts its first token): both spans less
    their first aligned group (extended) or first position. None when nothing is left."""
    if cfg.use_extended_uld:
        sg, tg = align_by_byte_offsets(s_offs[s_start:s_start + s_size].tolist(),
                                       t_offs[t_start:t_start + t_size].tolist())
        if not sg or not tg:
            return None
        s_drop, t_drop = len(sg[0]), len(tg[0])
    else:
        s_drop = t_drop = 1
    s_start, s_size, t_start, t_size = s_start + s_drop, s_size - s_drop, t_start + t_drop, t_size - t_drop
    if s_size <= 0 or t_size <= 0:
        return None
    return s_start, s_size, t_start, t_size


def uld_row_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_labels: torch.Tensor,
                 teacher_labels: torch.Tensor, student_ids: torch.Tensor, teacher_ids: torch.Tensor,
                 student_offsets: Optional[torch.Tensor], teacher_offsets: Optional[torch.Tensor],
                 cfg: ULDSettings, match: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """One row's distillation term, before ``distillation_weight`` (TRL's ``_compute_distillation_loss``
    loop body). student_logits ``[T, Vs]``, teacher_logits ``[Tt, Vt]`` (float), labels / ids
    ``[T]`` / ``[Tt]`` int64, offsets ``[T, 2]`` / ``[Tt, 2]`` (None without ``use_extended_uld``),
    ``match`` :func:`vocabulary_match`'s pair (``use_hybrid_loss``). Returns ``(loss 0-dim, matched,
    unmatched)``; the last two None unless hybrid; a row without a span to compare gives
    ``student_logits.sum() * 0``."""
    s_start, s_size = answer_span(student_labels)
    t_start, t_size = answer_span(teacher_labels)
    s_size -= int(cfg.skip_student_eos)
    t_size -= int(cfg.skip_teacher_eos)
    zero = (student_logits.sum() * 0.0, None, None)
    if s_size <= 0 or t_size <= 0:
        return zero
    bayes = cfg.merge_strategy == "bayesian"
    if bayes and (s_start == 0 or t_start == 0):
        spans = _drop_first_group(student_offsets, teacher_offsets, s_start, s_size, t_start, t_size, cfg)
        if spans is None:
            return zero
        s_start, s_size, t_start, t_size = spans
    k = 1 if bayes else 0  # bayesian: probs[j] predicts token j (the logit one position earlier)
    s_probs = F.softmax(student_logits[s_start - k:s_start + s_size - k] / cfg.student_temperature, dim=-1)
    t_probs = F.softmax(teacher_logits[t_start - k:t_start + t_size - k] / cfg.teacher_temperature, dim=-1)
    s_tok = student_ids[s_start:s_start + s_size].tolist()
    t_tok = teacher_ids[t_start:t_start + t_size].tolist()
    if cfg.use_extended_uld:
        sg, tg = align_by_byte_offsets(student_offsets[s_start:s_start + s_size].tolist(),
                                       teacher_offsets[t_start:t_start + t_size].tolist())
        # an empty side (the teacher's zero-width eos when it is kept) would merge to a zero distribution
        paired = [(a, b) for a, b in zip(sg, tg) if a and b]
        s_al = merge_group_probabilities(s_probs, [a for a, _ in paired], s_tok, cfg.merge_strategy)
        t_al = merge_group_probabilities(t_probs, [b for _, b in paired], t_tok, cfg.merge_strategy)
    else:
        n = min(len(s_tok), len(t_tok))
        s_al, t_al = s_probs[:n, :], t_probs[:n, :]
    if cfg.use_hybrid_loss and match is not None:
        return hybrid_loss(s_al, t_al, match[0], match[1], cfg.beta, cfg.matched_weight, cfg.unmatched_weight)
    return sorted_l1(s_al, t_al), None, None


def row_crossentropy_sum(student_logits: torch.Tensor, student_labels: torch.Tensor) -> torch.Tensor:
    """Σ over a row's label tokens of −log p(token) from the logit one position earlier (TRL's
    ``crossentropy_loss`` before its mean): logits ``[T, V]``, labels ``[T]``; 0-dim float."""
    return F.cross_entropy(student_logits[:-1], student_labels[1:], ignore_index=IGNORE_INDEX,
                           reduction="sum")


def uld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_labels: torch.Tensor,
             teacher_labels: torch.Tensor, student_ids: torch.Tensor, teacher_ids: torch.Tensor,
             student_offsets: Optional[torch.Tensor], teacher_offsets: Optional[torch.Tensor], cfg: ULDSettings,
             match: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """The batch's ULD loss as TRL's ``ULDLoss.__call__`` returns it: ``crossentropy_weight`` × the
    mean cross-entropy over the student's label tokens + ``distillation_weight`` × the mean over rows
    of :func:`uld_row_loss`. student_logits ``[B, T, Vs]``, teacher_logits ``[B, Tt, Vt]``, the rest
    as :func:`uld_row_loss` with a leading ``B``; 0-dim."""
    ce = 0.0
    if cfg.crossentropy_weight > 0:
        ce = cfg.crossentropy_weight * F.cross_entropy(
            student_logits[:, :-1].reshape(-1, student_logits.size(-1)), student_labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX)
    rows = [uld_row_loss(student_logits[i], teacher_logits[i], student_labels[i], teacher_labels[i],
                         student_ids[i], teacher_ids[i],
                         None if student_offsets is None else student_offsets[i],
                         None if teacher_offsets is None else teacher_offsets[i], cfg, match)[0]
            for i in range(student_logits.size(0))]
    return ce + cfg.distillation_weight * torch.stack(rows).mean()


# ----------------------------------------------------------------------------- from hidden states, in chunks


def _chunk_loss(hs, ws, bs, ts, ht, wt, bt, tt, s_labels, t_labels, s_ids, t_ids, s_offs, t_offs, cfg, match):
    """Σ row terms, Σ cross-entropy, Σ matched, Σ unmatched and the student's entropy sum at its
    label-predicting positions, over a chunk of rows (``hs [c, T, H]``, ``ht [c, Tt, Ht]``)."""
    from rlhf_fast.models.lm_head import head_logits
    from rlhf_fast.ops import reference

    dt = reference.out_dtype(hs.dtype)
    zs = head_logits(hs, ws, bs, ts, 1.0, dt)  # [c, T, Vs]
    with torch.no_grad():
        zt = head_logits(ht, wt, bt, tt, 1.0, reference.out_dtype(ht.dtype))  # [c, Tt, Vt]
    rows, ce, mat, unm, ent = [], [], [], [], []
    for i in range(zs.size(0)):
        loss, m, u = uld_row_loss(zs[i], zt[i], s_labels[i], t_labels[i], s_ids[i], t_ids[i],
                                  None if s_offs is None else s_offs[i], None if t_offs is None else t_offs[i],
                                  cfg, match)
        rows.append(loss)
        mat.append(loss.new_zeros(()) if m is None else m.detach())
        unm.append(loss.new_zeros(()) if u is None else u.detach())
        ce.append(row_crossentropy_sum(zs[i], s_labels[i]) if cfg.crossentropy_weight > 0 else zs[i].sum() * 0.0)
        with torch.no_grad():
            pred = zs[i, :-1][s_labels[i, 1:] != IGNORE_INDEX]
            ent.append(-(F.softmax(pred, -1) * F.log_softmax(pred, -1)).sum())
    return torch.stack(rows).sum(), torch.stack(ce).sum(), torch.stack(mat).sum(), torch.stack(unm).sum(), \
        torch.stack(ent).sum()


def chunked_uld_loss(student_hidden: torch.Tensor, student_head: tuple, teacher_hidden: torch.Tensor,
                     teacher_head: tuple, student_labels: torch.Tensor, teacher_labels: torch.Tensor,
                     student_ids: torch.Tensor, teacher_ids: torch.Tensor, student_offsets: Optional[torch.Tensor],
                     teacher_offsets: Optional[torch.Tensor], cfg: ULDSettings,
                     match: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, rows_per_chunk: int = 1):
    """The sums behind :func:`uld_loss` from both models' last hidden states: ``rows_per_chunk`` rows
    of logits at a time (each head through :func:`rlhf_fast.models.lm_head.head_logits`), each chunk
    recomputed in the backward (``torch.utils.checkpoint``), so no ``[B, T, V]`` logits of either
    model are kept. student_hidden ``[B, T, H]`` (differentiable), teacher_hidden ``[B, Tt, Ht]``;
    heads ``(weight [V, H], bias or None, HeadTransform)``; the rest as :func:`uld_loss`. Returns
    0-dim float tensors ``(Σ row terms, Σ label-token cross-entropy, Σ matched, Σ unmatched,
    Σ student entropy)``; only the first two carry gradients. :func:`uld_loss` = ce weight × the
    second / label tokens + distillation weight × the first / rows."""
    B = student_hidden.shape[0]
    grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_head[0].requires_grad)
    parts = []
    for s in range(0, B, rows_per_chunk):
        sl = slice(s, s + rows_per_chunk)
        args = (student_hidden[sl], *student_head, teacher_hidden[sl], *teacher_head, student_labels[sl],
                teacher_labels[sl], student_ids[sl], teacher_ids[sl],
                None if student_offsets is None else student_offsets[sl],
                None if teacher_offsets is None else teacher_offsets[sl], cfg, match)
        if grad:  # keep the chunk's hidden states, not its logits and softmaxes
            parts.append(torch.utils.checkpoint.checkpoint(_chunk_loss, *args, use_reentrant=False))
        else:
            parts.append(_chunk_loss(*args))
    return tuple(torch.stack([p[k] for p in parts]).sum() for k in range(5))


__all__ = ["IGNORE_INDEX", "MERGE_STRATEGIES", "ULDSettings", "align_by_byte_offsets", "answer_span",
           "chunked_uld_loss", "encode_with_byte_offsets", "hybrid_loss", "is_byte_level", "jsd_from_probs",
           "merge_group_probabilities", "piece_byte_len", "row_crossentropy_sum", "sorted_l1", "student_byte_offsets",
           "student_texts", "teacher_inputs", "uld_loss", "uld_row_loss", "vocabulary_match"]
