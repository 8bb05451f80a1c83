"""Feedback data: record formats and validation, agreement statistics, noise-aware losses,
the terminal labelling tool (``rlhf-fast label``) and AI judges (``rlhf-fast judge``)."""

from .agreement import AgreementStats, agreement_stats, annotator_weights, flip_rate_from_disagreement
from .formats import (KINDS, PairRecord, Problem, RankingRecord, ScoreRecord, SFTRecord, dedup_records,
                      filter_by_length, load_records, rankings_to_pairs, render_prompt, write_jsonl)
from .losses import bradley_terry_loss, plackett_luce_loss, score_regression_loss

__all__ = ["KINDS", "SFTRecord", "PairRecord", "RankingRecord", "ScoreRecord", "Problem", "load_records",
           "dedup_records", "filter_by_length", "rankings_to_pairs", "render_prompt", "write_jsonl",
           "AgreementStats", "agreement_stats", "annotator_weights", "flip_rate_from_disagreement",
           "bradley_terry_loss", "plackett_luce_loss", "score_regression_loss"]
