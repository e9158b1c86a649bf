"""What a search returns: a page of hits, and how their scores are shown.

Apart from `search` (which makes them) so that a page can be read and printed without the
database and model code: `clipgallery search` answered by the running app (`appclient`) loads
only this.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SearchHit:
    id: int
    name: str
    description: str
    distance: float
    similarity: float | None
    thumbnail_url: str
    original_url: str
    width: int
    height: int
    mime_type: str
    # Hybrid search only: the reciprocal-rank-fusion score the page is ordered by, and whether
    # the name or description matched the query's words.
    score: float | None = None
    text_match: bool = False


@dataclass(frozen=True)
class SearchPage:
    hits: list[SearchHit]
    metric: str
    k: int
    offset: int
    has_more: bool
    exact: bool  # True: sequential scan (exact); False: HNSW index (approximate)
    hybrid: bool = False  # True: fused with full-text search over names and descriptions


def format_score(value: float, decimals: int = 3) -> str:
    """A similarity or distance as people read it: fixed decimals, and 0 where it rounds to 0 (a
    tiny negative value, e.g. an image's float distance to itself, would print "-0.000")."""
    return f"{round(value, decimals) + 0.0:.{decimals}f}"
