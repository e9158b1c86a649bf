"""Retrieval metrics on tiny rankings whose values were worked out by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from clipgallery.metrics import (
    METRIC_KEYS,
    average_precision,
    chance_scores,
    mean_scores,
    ndcg_at_k,
    precision_at_k,
    rank_by_distance,
    recall_at_k,
    score_query,
)

LOG3, LOG5 = math.log2(3), math.log2(5)


def test_two_relevant_in_five():
    ranking, relevant = [1, 2, 3, 4, 5], {2, 4}
    assert recall_at_k(ranking, relevant, 1) == 0.0
    assert recall_at_k(ranking, relevant, 2) == 1.0  # hit rate: one relevant item is enough
    assert recall_at_k(ranking, relevant, 10) == 1.0  # K beyond the list: whatever is there
    assert precision_at_k(ranking, relevant, 10) == pytest.approx(0.2)  # always divided by K
    assert precision_at_k(ranking, relevant, 4) == pytest.approx(0.5)
    assert average_precision(ranking, relevant) == pytest.approx((1 / 2 + 2 / 4) / 2)  # 0.5
    # DCG: ranks 2 and 4 -> 1/log2(3) + 1/log2(5); ideal: ranks 1 and 2 -> 1 + 1/log2(3).
    assert ndcg_at_k(ranking, relevant, 10) == pytest.approx((1 / LOG3 + 1 / LOG5) / (1 + 1 / LOG3))
    assert ndcg_at_k(ranking, relevant, 10) == pytest.approx(0.650921, abs=1e-6)


def test_perfect_and_worst_rankings():
    assert average_precision([7, 8, 1, 2], {7, 8}) == 1.0
    assert ndcg_at_k([7, 8, 1, 2], {7, 8}) == pytest.approx(1.0)
    # Relevant items last among four: AP = (1/3 + 2/4) / 2.
    assert average_precision([1, 2, 7, 8], {7, 8}) == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_fewer_than_k_relevant():
    ranking = list(range(1, 21))
    one = {1}
    # A single relevant item at the top: perfect except precision, which cannot exceed 1/10.
    assert precision_at_k(ranking, one, 10) == pytest.approx(0.1)
    assert ndcg_at_k(ranking, one, 10) == pytest.approx(1.0)  # ideal DCG uses min(K, R) items
    assert average_precision(ranking, one) == 1.0
    # Three relevant at ranks 1, 3, 12: the third lies outside the top 10.
    three = {1, 3, 12}
    assert precision_at_k(ranking, three, 10) == pytest.approx(0.2)
    assert ndcg_at_k(ranking, three, 10) == pytest.approx((1 + 1 / 2) / (1 + 1 / LOG3 + 1 / 2))
    assert average_precision(ranking, three) == pytest.approx((1 / 1 + 2 / 3 + 3 / 12) / 3)


def test_relevant_items_missing_from_the_ranking_count_as_zero():
    # Item 9 never comes back (e.g. a truncated or approximate answer): AP divides by R = 2.
    assert average_precision([1, 2, 3], {1, 9}) == pytest.approx(0.5)
    assert recall_at_k([], {1}, 10) == 0.0


def test_no_relevant_items():
    assert score_query([1, 2, 3], set()) is None
    with pytest.raises(ValueError, match="undefined"):
        average_precision([1, 2], set())
    with pytest.raises(ValueError, match="undefined"):
        ndcg_at_k([1, 2], set())
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k([1], {1}, 0)


def test_mean_leaves_out_queries_without_relevant_items():
    a = score_query([1, 2, 3, 4, 5], {2, 4})
    b = score_query([1, 2, 3], {1})
    mean = mean_scores([a, None, b, None])
    assert (mean.queries, mean.scored, mean.without_relevant) == (4, 2, 2)
    assert mean["map"] == pytest.approx((0.5 + 1.0) / 2)
    assert mean["recall@1"] == pytest.approx(0.5)
    assert mean["precision@10"] == pytest.approx((0.2 + 0.1) / 2)
    assert set(mean.as_dict()) == {*METRIC_KEYS, "queries", "scored", "without_relevant"}
    empty = mean_scores([None])
    assert empty.scored == 0 and math.isnan(empty["map"])


def test_ties_are_broken_by_id_like_the_sql():
    # Ids 3 and 9 tie at 0.1, ids 1 and 5 at 0.2: ORDER BY distance, id.
    ranking = rank_by_distance([5, 3, 9, 1], [0.2, 0.1, 0.1, 0.2])
    assert ranking == [3, 9, 1, 5]
    # The relevant item loses its tie to a smaller id: second, not first.
    scores = score_query(ranking, {9})
    assert scores.recall[1] == 0.0 and scores.recall[5] == 1.0
    assert scores.average_precision == pytest.approx(0.5)
    assert scores.ndcg_at_10 == pytest.approx(1 / LOG3)
    # Order of the input does not matter.
    assert rank_by_distance([1, 9, 3, 5], np.array([0.2, 0.1, 0.1, 0.2])) == ranking


def test_separate_full_ranking_for_average_precision():
    top = [1, 2]  # e.g. an index's top-2 answer
    full = [2, 1, 3]  # the deep ranking
    scores = score_query(top, {2}, full_ranking=full)
    assert scores.recall[1] == 0.0  # from `top`
    assert scores.average_precision == 1.0  # from `full`


def _brute_force_chance(n: int, r: int) -> dict[str, float]:
    relevant = set(range(r))
    per_perm = [score_query(list(p), relevant).as_dict() for p in itertools.permutations(range(n))]
    return {key: float(np.mean([s[key] for s in per_perm])) for key in METRIC_KEYS}


@pytest.mark.parametrize(("n", "r"), [(5, 2), (6, 1), (6, 6), (7, 3)])
def test_chance_scores_match_every_permutation(n, r):
    expected = _brute_force_chance(n, r)
    assert chance_scores(n, r) == pytest.approx(expected)


def test_chance_scores_reject_impossible_counts():
    with pytest.raises(ValueError):
        chance_scores(3, 0)
    with pytest.raises(ValueError):
        chance_scores(3, 4)
