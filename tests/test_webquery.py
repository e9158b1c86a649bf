"""The web pages' adapter: addresses ⇄ query options, filters, and error messages for people."""

from __future__ import annotations

from datetime import date

import pytest

from clipgallery.config import Settings
from clipgallery.embedding import ModelUnavailableError
from clipgallery.fetch import FetchError
from clipgallery.gallery import ModelMismatchError, NotFoundError
from clipgallery.imaging import RejectedImage
from clipgallery.search import InvalidQuery, SearchHit, SearchPage
from clipgallery.webquery import (
    FilterParams,
    QueryOptions,
    _results,
    describe_error,
    make_url,
    options_params,
    parse_options,
)

SETTINGS = Settings(default_k=20, max_k=500, index_metric="cosine")


def test_options_from_an_address_are_clamped_and_round_trip():
    options = parse_options({"k": "40", "min": "0.25", "metric": "l2", "page": "3"}, SETTINGS)
    assert options == QueryOptions(k=40, page=3, metric="l2", min_similarity=0.25)
    assert options.offset == 80
    assert options_params(options, SETTINGS) == {"k": "40", "min": "0.25", "metric": "l2", "page": "3"}
    assert parse_options({"k": "100000", "page": "-2"}, SETTINGS).k == 100  # the web page maximum
    assert parse_options({"k": "lots", "min": "high"}, SETTINGS) == QueryOptions(20, 1, "cosine", None)
    assert options_params(parse_options({}, SETTINGS), SETTINGS) == {}  # defaults stay out of the address


def test_filters_round_trip_and_refuse_bad_values():
    filters = FilterParams.from_params({"text": " beach ", "by": "ann", "from": "2024-01-02", "format": "PNG"})
    assert filters.to_params() == {"text": "beach", "by": "ann", "from": "2024-01-02", "format": "png"}
    assert filters.count == 4
    image_filters = filters.to_filters()
    assert image_filters.added_from == date(2024, 1, 2) and image_filters.mime_type == "image/png"
    assert FilterParams(uploader="any", fmt="any").to_params() == {}
    with pytest.raises(InvalidQuery, match="not a date"):
        FilterParams(date_to="31/12/2024").to_filters()
    with pytest.raises(InvalidQuery, match="Unknown format"):
        FilterParams(fmt="bmp").to_filters()


def test_make_url_drops_empty_values():
    assert make_url("/search", {"q": "red shoes", "k": "", "page": "2"}) == "/search?q=red+shoes&page=2"
    assert make_url("/browse", {}) == "/browse"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RejectedImage("Not a supported image."), "That file cannot be used as a query image: Not a supported image."),
        (FetchError("clipgallery only fetches images from public addresses."), "The image could not be fetched: "),
        (ModelUnavailableError("No model: set CLIPGALLERY_MODEL."), "No model: set CLIPGALLERY_MODEL."),
        (ModelMismatchError("Run `clipgallery reembed`."), "Run `clipgallery reembed`."),
        (InvalidQuery("The query is empty."), "The query is empty."),
        (NotFoundError("No image with id 7."), "No image with id 7."),
    ],
)
def test_expected_errors_become_their_own_message(error, expected):
    assert describe_error(error).startswith(expected)


def test_unexpected_errors_are_summarised_not_dumped(caplog):
    message = describe_error(KeyError("secret internals"))
    assert message.startswith("Something went wrong on the server (KeyError)")
    assert "secret internals" not in message
    assert "secret internals" in caplog.text  # the details go to the log


def _hit(image_id: int, similarity: float, text_match: bool) -> SearchHit:
    return SearchHit(
        image_id, f"img {image_id}", "", 1.0 - similarity, similarity, "/t.jpg", "/o.jpg", 1, 1, "image/jpeg",
        score=0.01, text_match=text_match,
    )  # fmt: skip


def test_tiles_mark_word_matches_and_never_show_minus_zero():
    page = SearchPage(
        [_hit(1, -0.0004, True), _hit(2, 0.3127, False), _hit(3, -0.0126, False)],
        "cosine", k=3, offset=0, has_more=False, exact=True, hybrid=True,
    )  # fmt: skip
    tiles = _results(page, session=None).tiles  # the session is read only for an empty first page
    assert [t.score for t in tiles] == ["0.000", "0.313", "-0.013"]
    assert [t.text_match for t in tiles] == [True, False, False]
    assert "ranked up: its name or description has your words" in tiles[0].score_title
    assert "ranked up" not in tiles[1].score_title
    l1_hit = SearchHit(4, "img 4", "", -0.00001, None, "/t.jpg", "/o.jpg", 1, 1, "image/jpeg")
    distances = _results(SearchPage([l1_hit], "l1", 1, 0, False, True), None).tiles
    assert distances[0].score == "0.000" and "L1 distance" in distances[0].score_title
