"""Retrieval metrics for one ranked result list, and their means over queries.

Definitions (binary relevance; `ranking` is the ranked candidate ids, best first; `relevant`
the set of ids that count as correct; R = |relevant|):

- **Recall@K** — *hit rate*: 1 if ANY relevant item is among the first K results, else 0.
  The alternative definition, the fraction of all relevant items found in the first K
  (|relevant ∩ top K| / R), is capped at K/R: with 100 images per class it cannot exceed
  0.10 at K = 10, which says little about a search box. We report the hit-rate definition
  everywhere (it is the usual "Recall@K" of image-text retrieval papers). For caption sets,
  where each query has exactly one relevant image, the two definitions coincide.
- **Precision@K** — |relevant ∩ top K| / K, always divided by K (also when R < K or when fewer
  than K results came back), so a query with 3 relevant items has at most 0.3 at K = 10.
- **Average precision** — over the FULL ranking of all candidates: the mean, over the R
  relevant items, of precision at the rank where each one appears; a relevant item missing
  from the ranking contributes 0 (the sum is divided by R, not by the number found).
  **mAP** is its mean over queries.
- **nDCG@K** — binary gains, DCG = Σ_{i ≤ K, item i relevant} 1 / log2(i + 1), divided by the
  ideal DCG of min(K, R) relevant items at the top.

Queries with no relevant item at all (R = 0, e.g. the only image of its class querying the
others) have no defined score: `score_query` returns None, and `mean_scores` leaves them out
of every mean and reports how many there were.

Ties: the metrics take a ranking, not scores, so ties were broken before they get here — by
image id, ascending, exactly as the search SQL does (``ORDER BY distance, id``). `rank_by_distance`
applies the same rule to distances computed outside the database (the pixel baseline), so
every method in a report is ranked under one rule. (We do not average over tie permutations:
with float distances exact ties are rare, and a deterministic rule keeps reports reproducible.)

All values are fractions in [0, 1]; reports may show them as percentages.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

RECALL_KS = (1, 5, 10)
PRECISION_K = 10
NDCG_K = 10
METRIC_KEYS = ("recall@1", "recall@5", "recall@10", "precision@10", "map", "ndcg@10")


def recall_at_k(ranking: Sequence[Hashable], relevant: Collection[Hashable], k: int) -> float:
    """1.0 if any relevant item is in the top k (hit rate), else 0.0."""
    _check_k(k)
    return 1.0 if any(item in relevant for item in ranking[:k]) else 0.0


def precision_at_k(ranking: Sequence[Hashable], relevant: Collection[Hashable], k: int = PRECISION_K) -> float:
    """Relevant items among the top k, divided by k."""
    _check_k(k)
    return sum(1 for item in ranking[:k] if item in relevant) / k


def average_precision(ranking: Sequence[Hashable], relevant: Collection[Hashable]) -> float:
    """Mean precision at the ranks of the relevant items, normalised by |relevant|.

    Relevant items that never appear in `ranking` count as zero, so a truncated ranking can
    only lower the score. Raises ValueError when nothing is relevant (undefined).
    """
    if not relevant:
        raise ValueError("average precision is undefined for a query without relevant items")
    hits = 0
    total = 0.0
    for rank, item in enumerate(ranking, start=1):
        if item in relevant:
            hits += 1
            total += hits / rank
    return total / len(relevant)


def ndcg_at_k(ranking: Sequence[Hashable], relevant: Collection[Hashable], k: int = NDCG_K) -> float:
    """Binary-relevance nDCG of the top k. Raises ValueError when nothing is relevant."""
    _check_k(k)
    if not relevant:
        raise ValueError("nDCG is undefined for a query without relevant items")
    dcg = sum(1.0 / math.log2(rank + 1) for rank, item in enumerate(ranking[:k], start=1) if item in relevant)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(k, len(relevant)) + 1))
    return dcg / ideal


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


@dataclass(frozen=True)
class QueryScores:
    """The metrics of one query (fractions)."""

    recall: dict[int, float]  # K -> hit rate at K
    precision_at_10: float
    average_precision: float
    ndcg_at_10: float

    def as_dict(self) -> dict[str, float]:
        return {
            **{f"recall@{k}": v for k, v in self.recall.items()},
            "precision@10": self.precision_at_10,
            "map": self.average_precision,
            "ndcg@10": self.ndcg_at_10,
        }


def score_query(
    ranking: Sequence[Hashable],
    relevant: Collection[Hashable],
    full_ranking: Sequence[Hashable] | None = None,
) -> QueryScores | None:
    """Every metric for one query; None when the query has no relevant item.

    `ranking` serves the @K metrics (it needs at least the top 10). `full_ranking`, the ranking
    of every candidate, serves average precision; it defaults to `ranking`. They are separate
    because an approximate index answers a top-10 query and a deep query differently, and the
    top-10 answer is the one users see.
    """
    relevant = relevant if isinstance(relevant, (set, frozenset)) else set(relevant)
    if not relevant:
        return None
    return QueryScores(
        recall={k: recall_at_k(ranking, relevant, k) for k in RECALL_KS},
        precision_at_10=precision_at_k(ranking, relevant, PRECISION_K),
        average_precision=average_precision(ranking if full_ranking is None else full_ranking, relevant),
        ndcg_at_10=ndcg_at_k(ranking, relevant, NDCG_K),
    )


@dataclass(frozen=True)
class MeanScores:
    """Means over the queries that have at least one relevant item."""

    values: dict[str, float]  # METRIC_KEYS -> mean (NaN when no query was scored)
    queries: int  # all queries asked
    scored: int  # queries with at least one relevant item (the means are over these)
    without_relevant: int = field(default=0)  # queries left out: nothing relevant to find

    def __getitem__(self, key: str) -> float:
        return self.values[key]

    def as_dict(self) -> dict[str, float | int]:
        return {
            **self.values,
            "queries": self.queries,
            "scored": self.scored,
            "without_relevant": self.without_relevant,
        }


def mean_scores(scores: Sequence[QueryScores | None]) -> MeanScores:
    """Mean of each metric over the scored queries; None entries are counted, not averaged."""
    scored = [s.as_dict() for s in scores if s is not None]
    values = {key: (float(np.mean([s[key] for s in scored])) if scored else math.nan) for key in METRIC_KEYS}
    return MeanScores(
        values=values, queries=len(scores), scored=len(scored), without_relevant=len(scores) - len(scored)
    )


def rank_by_distance(ids: Sequence[int], distances: Sequence[float] | np.ndarray) -> list[int]:
    """`ids` sorted by (distance, id) ascending — the tie rule of the search SQL."""
    ids_array = np.asarray(ids)
    order = np.lexsort((ids_array, np.asarray(distances, dtype=np.float64)))  # last key is primary
    return ids_array[order].tolist()


def chance_scores(candidates: int, relevant: int) -> dict[str, float]:
    """Expected metrics of a uniformly random ranking of `candidates` items of which `relevant`
    are relevant: the floor a model with random weights should sit near.

    Recall@K = 1 − C(N−R, K)/C(N, K); Precision@K = R/N; nDCG@K = (R/N)·Σ_{i≤K} 1/log2(i+1)
    over the ideal DCG; AP = (1/R)·Σ_k (R/N)·(1 + (k−1)(R−1)/(N−1))/k (the expected precision at
    rank k given a relevant item there).
    """
    n, r = candidates, relevant
    if r < 1 or n < r:
        raise ValueError(f"need 1 <= relevant <= candidates, got {relevant} of {candidates}")
    values: dict[str, float] = {}
    for k in RECALL_KS:
        kk = min(k, n)
        values[f"recall@{k}"] = 1.0 - math.comb(n - r, kk) / math.comb(n, kk)
    values["precision@10"] = (r / n) * min(PRECISION_K, n) / PRECISION_K
    dcg = (r / n) * sum(1.0 / math.log2(i + 1) for i in range(1, min(NDCG_K, n) + 1))
    values["ndcg@10"] = dcg / sum(1.0 / math.log2(i + 1) for i in range(1, min(NDCG_K, r) + 1))
    if n == 1:
        values["map"] = 1.0
    else:
        values["map"] = sum((1 + (k - 1) * (r - 1) / (n - 1)) / k for k in range(1, n + 1)) / n
    return {key: values[key] for key in METRIC_KEYS}
