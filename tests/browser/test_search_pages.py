"""The searcher's pages in Chromium: search by words, image upload, paste and URL; the results
grid (order, captions on hover / focus / tap, columns per width); shareable addresses; browse
with filters; the image page. The model has random weights, so rankings are arbitrary, except
that an image's own bytes find that image first at similarity 1.000.
"""

from __future__ import annotations

import base64
import functools
import http.server
import re
import threading
from datetime import date, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Browser, Page, expect

pytestmark = pytest.mark.browser

PHOTOS = Path(__file__).resolve().parents[3] / "shared" / "evaldata" / "imagenette_val1k" / "images"
# One photo of each class, with the names and descriptions a person would give them. "Seaside"
# words are shared by two descriptions so a text filter has something to narrow.
SEED = [
    ("n02102040", "Springer spaniel on the lawn", "Photo of a brown and white English springer spaniel"),
    ("n01440764", "Tench caught at dawn", "Photo of an angler holding a green tench by the lake"),
    ("n02979186", "Old cassette player", "Photo of a car cassette deck with big buttons"),
    ("n03000684", "Chainsaw at work", "Photo of a tree surgeon cutting branches with a chain saw"),
    ("n03028079", "Village church", "Photo of a stone church with a tall spire in the fog"),
    ("n03394916", "French horn recital", "Photo of a brass French horn shining on stage"),
    ("n03417042", "Garbage truck", "Photo of a garbage truck on its seaside morning round"),
    ("n03425413", "Gas pump", "Photo of an old gas pump at a seaside filling station"),
    ("n03445777", "Golf ball on the green", "Photo of a golf ball next to the flag"),
    ("n03888257", "Parachute in the sky", "Photo of a parachutist under a bright canopy"),
]
MARKER = "seaside"  # occurs in exactly two seeded descriptions


def _first_photo(wnid: str) -> Path:
    return sorted((PHOTOS / wnid).iterdir())[0]


@pytest.fixture(scope="module")
def empty_at_start(gallery) -> bool:
    """Whether the gallery was empty when this module started (it is when run on its own)."""
    return gallery.count("images") == 0


@pytest.fixture(scope="module")
def seeded(gallery, empty_at_start) -> list[dict]:
    images = []
    for wnid, name, description in SEED:
        path = _first_photo(wnid)
        data = path.read_bytes()
        outcome = gallery.add_image(data, f"{name.lower().replace(' ', '-')}.jpg", name, description)
        images.append({"id": outcome.image_id, "name": name, "description": description, "bytes": data})
    return images


def tiles(page: Page):
    return page.get_by_test_id("result-tile")


def scores(page: Page) -> list[float]:
    return [float(s) for s in tiles(page).evaluate_all("els => els.map(e => e.dataset.score)")]


def tile_ids(page: Page, among=None) -> list[int]:
    """The image ids of the page's tiles in order (or of the tiles in the locator `among`)."""
    return [int(i) for i in (among or tiles(page)).evaluate_all("els => els.map(e => e.dataset.id)")]


# --- states that need an empty gallery or a filter matching nothing ---------------------------


@pytest.mark.empty_gallery
def test_empty_gallery_explains_how_to_add_images(page: Page, gallery, empty_at_start):
    # tests/conftest.py runs this test before any other, while the shared app is still empty.
    assert empty_at_start, "the gallery was not empty: was this test moved after others that add images?"
    page.goto("/search?q=anything")
    empty = page.get_by_test_id("empty-gallery")
    expect(empty).to_be_visible()
    expect(empty).to_contain_text("No images yet")
    expect(empty).to_contain_text("clipgallery index")
    expect(empty.get_by_role("link", name="upload form")).to_have_attribute("href", "/admin")
    page.goto("/browse")
    expect(page.get_by_test_id("empty-gallery")).to_be_visible()


def test_filter_matching_nothing_shows_the_no_match_state(page: Page, seeded):
    page.goto("/browse?text=zzz-no-such-word")
    expect(page.get_by_test_id("no-match")).to_contain_text("No images match these filters")
    expect(page.get_by_test_id("empty-gallery")).to_have_count(0)
    # The same filter narrows a similarity search: a no-match state, not "no images yet".
    page.goto("/search?q=a+photo&text=zzz-no-such-word")
    expect(page.get_by_test_id("no-match")).to_contain_text("No matching images")
    expect(page.get_by_test_id("empty-gallery")).to_have_count(0)
    # A minimum similarity nothing reaches also gives the no-match state.
    page.goto("/search?q=a+photo&min=0.9999")
    expect(page.get_by_test_id("no-match")).to_be_visible()


# --- text search and the grid ---------------------------------------------------------------


def test_text_search_returns_an_ordered_grid(page: Page, seeded, gallery):
    page.goto("/")
    page.get_by_label("Search words").fill("a dog on the grass")
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page).to_have_url(re.compile(r"/search\?q=a\+dog\+on\+the\+grass$"))
    expect(page.get_by_test_id("results-header")).to_contain_text("Results for “a dog on the grass”")
    expect(page.get_by_label("Search words")).to_have_value("a dog on the grass")  # shown and editable
    expected = min(20, gallery.count("images"))
    expect(tiles(page)).to_have_count(expected)
    values = scores(page)
    assert values == sorted(values, reverse=True), values
    assert all(-1.0 <= v <= 1.0 for v in values)
    first = page.get_by_test_id("result-tile").first
    img = first.get_by_role("img")
    expect(img).to_have_attribute("loading", "lazy")
    names = {s["name"] for s in seeded}
    alts = tiles(page).get_by_role("img").evaluate_all("els => els.map(e => e.alt)")
    assert names <= set(alts) or len(alts) == 20, alts  # alt text = the image's name
    expect(first.get_by_test_id("tile-score")).to_have_text(re.compile(r"^-?\d\.\d{3}$"))


def test_word_matches_ranked_up_by_hybrid_search_are_marked(page: Page, seeded):
    """Hybrid search can put a word match above a closer image: its score badge carries a mark
    (and says why in its tooltip), so an out-of-order number does not look like a bug."""
    seaside = {s["id"] for s in seeded if MARKER in s["description"]}
    page.goto(f"/search?q={MARKER}+morning")
    expect(tiles(page).first).to_be_visible()
    marked = tiles(page).filter(has=page.get_by_test_id("tile-text-match"))
    expect(marked).to_have_count(2)
    assert set(tile_ids(page, marked)) == seaside
    # Matching words and near enough to be among the vector side's candidates: ranked first.
    assert set(tile_ids(page)[:2]) == seaside
    badge = marked.first.get_by_test_id("tile-score")
    expect(badge).to_have_text(re.compile(r"^-?\d\.\d{3}$"))
    expect(badge).to_have_attribute("title", re.compile("ranked up: its name or description has your words"))


def test_caption_appears_on_hover_and_on_keyboard_focus(page: Page, seeded):
    page.goto(f"/search?q=seaside&text={MARKER}")
    expect(tiles(page)).to_have_count(2)
    first, second = tiles(page).nth(0), tiles(page).nth(1)
    description = first.get_by_test_id("tile-description")
    expect(description).to_be_hidden()
    first.hover()
    expect(description).to_be_visible()
    expect(description).to_contain_text(MARKER)

    # Keyboard: Tab from the query box until a tile link holds the focus.
    page.mouse.move(0, 0)
    expect(description).to_be_hidden()
    page.get_by_label("Search words").focus()
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('cg-tile-link')"):
            break
    else:
        pytest.fail("Tab never reached a result tile")
    focused_id = page.evaluate("document.activeElement.closest('.cg-tile').dataset.id")
    focused = page.locator(f".cg-tile[data-id='{focused_id}']")
    expect(focused.get_by_test_id("tile-description")).to_be_visible()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none"), outline  # a visible focus ring
    other = second if focused_id == first.get_attribute("data-id") else first
    expect(other.get_by_test_id("tile-description")).to_be_hidden()
    # Enter opens the focused image.
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(rf"/image/{focused_id}$"))


def test_caption_appears_on_tap(browser: Browser, base_url, seeded):
    context = browser.new_context(base_url=base_url, viewport={"width": 375, "height": 800}, has_touch=True)
    try:
        page = context.new_page()
        page.goto(f"/search?q=seaside&text={MARKER}")
        first = tiles(page).first
        expect(first.get_by_test_id("tile-description")).to_be_hidden()
        first.locator("a.cg-tile-link").tap()
        expect(first.get_by_test_id("tile-description")).to_be_visible()
        assert "/search" in page.url  # the first tap shows the caption and stays
        first.locator("a.cg-tile-link").tap()  # the second opens the image
        expect(page).to_have_url(re.compile(r"/image/\d+$"))
    finally:
        context.close()


@pytest.mark.parametrize(("width", "columns"), [(375, 2), (768, 3), (1440, 5)])
def test_grid_columns_per_width_and_screenshots(page: Page, seeded, screenshot_dir, width, columns):
    page.set_viewport_size({"width": width, "height": 900})
    # Only this module's photos (other modules seed synthetic images): every description says "Photo".
    # Two descriptions hold "seaside": their tiles come first, marked as word matches.
    page.goto("/search?q=everyday+things+by+the+seaside&k=10&text=photo")
    expect(tiles(page)).to_have_count(10)
    template = page.get_by_test_id("results-grid").evaluate("g => getComputedStyle(g).gridTemplateColumns")
    assert len(template.split()) == columns, template
    tops = tiles(page).evaluate_all("els => els.map(e => Math.round(e.getBoundingClientRect().top))")
    assert tops.count(tops[0]) == columns, tops  # the first row holds `columns` tiles
    page.evaluate("document.fonts.ready")
    # Wait for the thumbnails in view (lazy ones below the fold stay unloaded, as they should).
    page.wait_for_function(
        "[...document.images].filter(i => i.getBoundingClientRect().top < innerHeight).every(i => i.complete)"
    )
    page.screenshot(path=str(screenshot_dir / f"results-{width}.png"))


# --- image queries --------------------------------------------------------------------------


def open_home(page: Page) -> None:
    """The home page, once its on_load has run (the gallery status is shown): an upload sent
    before then would race the page's own reset."""
    page.goto("/")
    expect(page.get_by_test_id("image-count")).to_be_visible()


def _query_input(page: Page):
    return page.locator("#image-query input[type=file]")


def test_image_query_by_upload_ranks_that_image_first(page: Page, seeded, gallery):
    target = seeded[3]
    open_home(page)
    _query_input(page).set_input_files({"name": "query.jpg", "mimeType": "image/jpeg", "buffer": target["bytes"]})
    expect(page).to_have_url(re.compile(r"/search$"))
    expect(page.get_by_test_id("results-header")).to_contain_text("Results for your image")
    expect(page.get_by_test_id("query-preview")).to_be_visible()
    expect(tiles(page).first).to_have_attribute("data-id", str(target["id"]))
    expect(tiles(page).first).to_have_attribute("data-score", "1.000")
    best = page.get_by_role("link", name="more like the best match")
    expect(best).to_have_attribute("href", f"/similar/{target['id']}")


def test_image_query_by_paste(page: Page, seeded):
    target = seeded[5]
    open_home(page)
    expect(page.get_by_test_id("image-drop-zone")).to_be_visible()
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "image.jpg", {type: "image/jpeg"}));
            document.body.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data, bubbles: true}));
        }""",
        base64.b64encode(target["bytes"]).decode(),
    )
    expect(page.get_by_test_id("results-header")).to_contain_text("pasted-image.jpg")
    expect(tiles(page).first).to_have_attribute("data-id", str(target["id"]))
    expect(tiles(page).first).to_have_attribute("data-score", "1.000")


def test_bad_upload_shows_an_error_and_stores_nothing(page: Page, seeded, gallery):
    from tests.conftest import files_on_disk

    images_before = gallery.count("images")
    files_before = files_on_disk(gallery.storage)
    open_home(page)
    _query_input(page).set_input_files(
        {"name": "holiday.jpg", "mimeType": "image/jpeg", "buffer": b"this is a text file, not a JPEG\n" * 10}
    )
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("That file cannot be used as a query image")
    expect(alert).to_contain_text("Not a supported image")
    expect(tiles(page)).to_have_count(0)
    assert gallery.count("images") == images_before
    assert files_on_disk(gallery.storage) == files_before


@pytest.fixture(scope="module")
def image_server(tmp_path_factory, seeded):
    root = tmp_path_factory.mktemp("remote-images")
    (root / "remote.jpg").write_bytes(seeded[7]["bytes"])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_query_ranks_that_image_first_and_reloads(page: Page, seeded, image_server):
    target = seeded[7]
    page.goto("/")
    page.get_by_role("textbox", name="Image URL").fill(f"{image_server}/remote.jpg")
    page.get_by_role("button", name="Search by URL").click()
    expect(page).to_have_url(re.compile(r"/search\?url=http"))
    expect(tiles(page).first).to_have_attribute("data-id", str(target["id"]))
    expect(tiles(page).first).to_have_attribute("data-score", "1.000")
    expect(page.get_by_test_id("results-header")).to_contain_text(f"{image_server}/remote.jpg")
    page.reload()
    expect(tiles(page).first).to_have_attribute("data-id", str(target["id"]))


def test_forbidden_url_shows_the_refusal(page: Page, seeded):
    page.goto("/")
    page.get_by_role("textbox", name="Image URL").fill("http://10.0.0.1/x.jpg")
    page.get_by_role("button", name="Search by URL").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("The image could not be fetched")
    expect(alert).to_contain_text("public addresses")
    expect(tiles(page)).to_have_count(0)


# --- addresses, history, paging -------------------------------------------------------------


def test_results_address_reloads_and_history_works(page: Page, seeded):
    page.goto("/search?q=red+shoes&k=4")
    expect(tiles(page)).to_have_count(4)
    first_ids = tile_ids(page)
    page.get_by_role("link", name="Next").click()
    expect(page).to_have_url(re.compile(r"page=2"))
    expect(page.get_by_test_id("page-number")).to_have_text("Page 2")
    expect(tiles(page)).to_have_count(4)
    second_ids = tile_ids(page)
    assert not set(first_ids) & set(second_ids)
    page.reload()
    expect(page.get_by_test_id("page-number")).to_have_text("Page 2")
    expect(tiles(page).first).to_have_attribute("data-id", str(second_ids[0]))
    assert tile_ids(page) == second_ids

    # A new query from the results page, then back and forward.
    page.get_by_label("Search words").fill("blue sky")
    page.get_by_label("Search words").press("Enter")
    expect(page).to_have_url(re.compile(r"q=blue\+sky"))
    query = parse_qs(urlsplit(page.url).query)
    assert query["k"] == ["4"] and "page" not in query  # options kept, back to page 1
    expect(page.get_by_test_id("results-header")).to_contain_text("blue sky")
    page.go_back()
    expect(page).to_have_url(re.compile(r"q=red\+shoes&k=4&page=2"))
    expect(page.get_by_test_id("results-header")).to_contain_text("red shoes")
    expect(page.get_by_label("Search words")).to_have_value("red shoes")
    expect(tiles(page).first).to_have_attribute("data-id", str(second_ids[0]))
    page.go_forward()
    expect(page.get_by_test_id("results-header")).to_contain_text("blue sky")


def test_options_and_filters_go_into_the_address(page: Page, seeded):
    page.goto("/search?q=things")
    page.get_by_role("button", name="Options & filters").click()
    page.get_by_label("Name or description contains").fill(MARKER)
    page.get_by_role("combobox", name="Results per page").click()
    page.get_by_role("option", name="10", exact=True).click()
    page.get_by_role("button", name="Apply").click()
    expect(page).to_have_url(re.compile(rf"k=10.*text={MARKER}"))
    expect(tiles(page)).to_have_count(2)
    expect(page.get_by_test_id("filter-count")).to_have_text("1")

    # A date range: nothing was added from two days ahead on, everything until then (two days: any
    # time zone's today is before it).
    later = (date.today() + timedelta(days=2)).isoformat()
    page.get_by_label("Added from").fill(later)
    page.get_by_role("button", name="Apply").click()
    expect(page).to_have_url(re.compile(rf"from={later}"))
    expect(tiles(page)).to_have_count(0)
    expect(page.get_by_test_id("filter-count")).to_have_text("2")
    page.get_by_label("Added from").fill("")
    page.get_by_label("Added until").fill(later)
    page.get_by_role("button", name="Apply").click()
    expect(page).to_have_url(re.compile(rf"to={later}"))
    expect(tiles(page)).to_have_count(2)


# --- browse and the image page --------------------------------------------------------------


def test_browse_lists_newest_first_with_filters(page: Page, seeded, gallery):
    page.goto("/browse")
    expect(page.get_by_test_id("browse-grid")).to_be_visible()
    expect(page.get_by_test_id("browse-total")).to_have_text(f"{gallery.count('images')} images")
    page.get_by_label("Name or description contains").fill(MARKER)
    page.get_by_role("button", name="Apply filters").click()
    expect(page).to_have_url(re.compile(rf"/browse\?text={MARKER}$"))
    expect(tiles(page)).to_have_count(2)
    # Newest first: the gas pump was added after the garbage truck.
    names = tiles(page).get_by_role("img").evaluate_all("els => els.map(e => e.alt)")
    assert names == ["Gas pump", "Garbage truck"], names
    expect(tiles(page).first.get_by_test_id("tile-score")).to_have_count(0)  # no scores when browsing
    page.get_by_role("combobox", name="Order").click()
    page.get_by_role("option", name="Oldest first").click()
    expect(page).to_have_url(re.compile(r"sort=oldest"))
    expect(tiles(page).first.get_by_role("img")).to_have_attribute("alt", "Garbage truck")


def test_image_page_shows_metadata_download_and_more_like_this(page: Page, seeded):
    target = seeded[4]
    page.goto(f"/image/{target['id']}")
    expect(page.get_by_test_id("image-name")).to_have_text(target["name"])
    expect(page.get_by_test_id("image-description")).to_have_text(target["description"])
    expect(page.get_by_test_id("meta-format")).to_have_text("JPEG")
    expect(page.get_by_test_id("meta-dimensions")).to_have_text(re.compile(r"^\d+ × \d+ px$"))
    expect(page.get_by_test_id("meta-filename")).to_have_text("village-church.jpg")
    expect(page.get_by_test_id("full-image")).to_have_attribute("alt", target["name"])

    href = page.get_by_test_id("download-link").get_attribute("href")
    assert href and href.endswith("?download=1")
    response = page.request.get(href)
    assert response.ok
    assert response.headers["content-disposition"].startswith("attachment")
    assert "village-church.jpg" in response.headers["content-disposition"]
    assert response.body() == target["bytes"]

    similar = page.get_by_test_id("similar-grid").get_by_test_id("result-tile")
    expect(similar.first).to_be_visible()
    ids = similar.evaluate_all("els => els.map(e => Number(e.dataset.id))")
    assert ids and target["id"] not in ids
    values = [float(s) for s in similar.evaluate_all("els => els.map(e => e.dataset.score)")]
    assert values == sorted(values, reverse=True)


def test_more_like_this_from_a_tile(page: Page, seeded):
    target = seeded[0]
    page.goto(f"/browse?text={target['name'].split()[0]}")
    tile = page.locator(f".cg-tile[data-id='{target['id']}']")
    tile.hover()
    tile.get_by_role("link", name=f"More like {target['name']}").click()
    expect(page).to_have_url(re.compile(rf"/similar/{target['id']}$"))
    expect(page.get_by_test_id("results-header")).to_contain_text(f"More like “{target['name']}”")
    expect(tiles(page).first).to_be_visible()
    assert target["id"] not in tile_ids(page)
    page.reload()
    expect(page.get_by_test_id("results-header")).to_contain_text(f"More like “{target['name']}”")


def test_unknown_image_is_a_calm_message(page: Page, seeded):
    page.goto("/image/999999")
    expect(page.get_by_test_id("image-error")).to_contain_text("No image with id 999999")
    page.goto("/search?q=x&metric=nonsense")
    expect(page.get_by_role("alert")).to_contain_text("Unknown metric")
