"""Annotator agreement and label-noise estimates from items labelled more than once.

An *item* is a prompt with an unordered pair of responses; a label is which of the two an
annotator preferred. When labels flip independently with probability ε, two labels of
the same item disagree with probability 2ε(1−ε), so the observed disagreement rate d
gives the noise estimate ε = (1 − √(1 − 2d)) / 2.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

from .formats import PairRecord


@dataclasses.dataclass
class AgreementStats:
    """Agreement over multiply-labelled items.

    ``n_items``: distinct items; ``n_multi``: items with ≥ 2 labels; ``n_label_pairs``: pairs
    of labels on the same item; ``agreement``: fraction of those pairs that agree (None
    without any); ``flip_rate``: the noise estimate ε; ``per_annotator``: id -> {"labels",
    "compared", "agreement" (with the other annotators), "majority_agreement"}. An
    annotator's own repeated labels of an item count in ``agreement`` and ``flip_rate`` (each
    label flips independently) but not in the per-annotator figures, which compare an
    annotator with the others only (``compared``: label pairs with another annotator;
    ``majority_agreement``: how often the label matches the strict majority of the other
    annotators' labels of the item, items with at least two such labels).
    """

    n_items: int
    n_multi: int
    n_label_pairs: int
    agreement: Optional[float]
    flip_rate: Optional[float]
    per_annotator: Dict[str, Dict[str, float]]


def flip_rate_from_disagreement(d: float) -> float:
    """ε with 2ε(1−ε) = d (capped at 0.5 when d ≥ 0.5: labels carry no signal)."""
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"disagreement must be in [0, 1], got {d}")
    return 0.5 if d >= 0.5 else (1.0 - math.sqrt(1.0 - 2.0 * d)) / 2.0


def _text(x) -> str:
    return x if isinstance(x, str) else json.dumps(x, sort_keys=True)


def agreement_stats(records: Sequence[PairRecord]) -> AgreementStats:
    """Per-annotator agreement and the flip-rate estimate from ``records`` (PairRecords;
    records without an annotator count as anonymous labellers)."""
    items: Dict[str, List[tuple]] = defaultdict(list)
    for i, r in enumerate(records):
        if not isinstance(r, PairRecord):
            raise TypeError(f"records must be PairRecord, got {type(r).__name__}")
        # texts, as record_item_key keys an item: a chat prompt whatever its dicts' key order,
        # conversational responses (message lists do not sort against each other)
        chosen = _text(r.chosen)
        a, b = sorted([chosen, _text(r.rejected)])
        key = json.dumps([_text(r.prompt), a, b])
        items[key].append((r.annotator if r.annotator is not None else f"<anon {i}>", chosen == a))
    agree = total = 0
    per = defaultdict(lambda: {"labels": 0, "compared": 0, "agreed": 0, "maj_compared": 0, "maj_agreed": 0})
    for labels in items.values():
        for ann, _ in labels:
            per[ann]["labels"] += 1
        for (a1, p1), (a2, p2) in itertools.combinations(labels, 2):
            total += 1
            agree += p1 == p2
            if a1 == a2:  # one annotator's repeat: self-consistency, not agreement with the others
                continue
            for a in (a1, a2):
                per[a]["compared"] += 1
                per[a]["agreed"] += p1 == p2
        if len(labels) >= 3:
            for k, (ann, p) in enumerate(labels):
                others = [q for (a, q) in labels if a != ann]  # the other annotators' labels only
                if len(others) < 2:
                    continue
                votes = sum(others)
                if 2 * votes != len(others):  # no majority on a tie
                    per[ann]["maj_compared"] += 1
                    per[ann]["maj_agreed"] += p == (2 * votes > len(others))
    out = {}
    for ann, c in per.items():
        if ann.startswith("<anon "):
            continue
        out[ann] = {
            "labels": c["labels"],
            "compared": c["compared"],
            "agreement": c["agreed"] / c["compared"] if c["compared"] else None,
            "majority_agreement": c["maj_agreed"] / c["maj_compared"] if c["maj_compared"] else None,
        }
    rate = agree / total if total else None
    return AgreementStats(
        n_items=len(items),
        n_multi=sum(len(v) >= 2 for v in items.values()),
        n_label_pairs=total,
        agreement=rate,
        flip_rate=flip_rate_from_disagreement(1.0 - rate) if rate is not None else None,
        per_annotator=out,
    )


def annotator_weights(stats: AgreementStats, *, floor: float = 0.05, default: float = 1.0) -> Dict[str, float]:
    """Weights for the loss from each annotator's agreement p with the others:
    max(floor, 2p − 1) (0 at chance, 1 when always agreeing); ``default`` when unmeasured."""
    out = {}
    for ann, s in stats.per_annotator.items():
        p = s["agreement"]
        out[ann] = default if p is None else max(floor, 2.0 * p - 1.0)
    return out


__all__ = ["AgreementStats", "agreement_stats", "annotator_weights", "flip_rate_from_disagreement"]
