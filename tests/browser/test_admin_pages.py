"""Admin pages in Chromium against the production app: login, upload, manage, background jobs,
users, and the server-side refusal of every admin action without a live administrator session.

The app server is shared with other browser tests: every test uses its own user names, image
names and image contents, and never assumes an empty gallery.
"""

from __future__ import annotations

import io
import re
import uuid

import pytest
from PIL import Image
from playwright.sync_api import BrowserContext, Page, expect
from sqlalchemy import text

from clipgallery import auth, db
from clipgallery.api import SESSION_COOKIE
from clipgallery.search import search_image_bytes
from tests.conftest import encode, picture

pytestmark = pytest.mark.browser

PASSWORD = "a long test password"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def unique_jpeg() -> bytes:
    return encode(picture(uuid.uuid4().int % 2**32, (120, 90)), "JPEG", quality=90)


def log_in_with_cookie(context: BrowserContext, gallery, username: str | None = None) -> tuple[auth.CurrentUser, str]:
    """An administrator session put straight into the browser's cookie jar (the login form has its own test)."""
    user = gallery.create_admin(username or unique("admin"))
    token = gallery.session_token(user)
    context.add_cookies([{"name": SESSION_COOKIE, "value": token, "url": gallery.base_url}])
    return user, token


def end_session(gallery, token: str) -> None:
    with db.session_scope(gallery.settings) as session:
        auth.end_session(session, token)


def image_rows(gallery, where: str, **params) -> list:
    with db.session_scope(gallery.settings) as session:
        return session.execute(
            text(
                "SELECT i.id, i.name, i.description, i.stored_path, i.thumbnail_path, i.uploaded_by, "
                f"e.image_id IS NOT NULL AS embedded FROM images i LEFT JOIN image_embeddings e ON e.image_id = i.id "
                f"WHERE {where} ORDER BY i.id"
            ),
            params,
        ).all()


def stored_files(gallery) -> set[str]:
    storage = gallery.storage
    return {str(p.relative_to(storage.root)) for p in storage.iter_files()} if storage.root.exists() else set()


def submit_login(page: Page) -> None:
    page.get_by_role("form", name="Log in").get_by_role("button", name="Log in").click()


def choose_files(page: Page, files: list[tuple[str, str, bytes]]) -> None:
    page.get_by_test_id("upload-dropzone").locator("input[type=file]").set_input_files(
        [{"name": name, "mimeType": mime, "buffer": data} for name, mime, data in files]
    )
    expect(page.get_by_test_id("selected-file")).to_have_count(len(files))


# --- login -------------------------------------------------------------------------------------


def test_login_errors_and_lock_out(page: Page, gallery):
    username = unique("locky")
    gallery.create_admin(username)
    page.goto("/login")
    page.get_by_label("User name").fill(username)
    for attempt in range(auth.FREE_FAILURES):
        page.get_by_label("Password").fill(f"wrong password {attempt}")
        submit_login(page)
        expect(page.get_by_test_id("login-error")).to_have_text("Wrong user name or password.")
        page.get_by_label("Password").fill("")  # the next round waits for a fresh answer
    # The next attempt is refused before the password is even checked, with the time to wait.
    page.get_by_label("Password").fill(PASSWORD)
    submit_login(page)
    expect(page.get_by_test_id("login-error")).to_contain_text("Too many failed logins")
    expect(page.get_by_test_id("login-error")).to_contain_text(re.compile(r"try again in \d+ seconds"))
    expect(page).to_have_url(re.compile(r"/login/?$"))


def test_login_goes_to_next_but_never_off_site_and_logout(page: Page, gallery):
    username = unique("nexty")
    gallery.create_admin(username)
    page.goto("/login?next=/admin/users")
    page.get_by_label("User name").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    submit_login(page)
    expect(page).to_have_url(re.compile(r"/admin/users/?$"))
    expect(page.get_by_role("heading", name="Users", exact=True)).to_be_visible()
    expect(page.get_by_test_id("user-row").filter(has_text=username)).to_be_visible()

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(gallery.base_url + "/")
    expect(page.get_by_role("button", name="Log out")).to_have_count(0)

    page.goto("/login?next=//evil.example/steal")
    page.get_by_label("User name").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    submit_login(page)
    expect(page).to_have_url(gallery.base_url + "/")
    expect(page.get_by_role("button", name="Log out")).to_be_visible()


# --- refusals ----------------------------------------------------------------------------------

ADMIN_PATHS = ["/admin", "/admin/manage", "/admin/jobs", "/admin/users"]


@pytest.mark.parametrize("path", ADMIN_PATHS)
def test_anonymous_visitors_are_sent_to_the_login_page(page: Page, gallery, path: str):
    page.goto(path)
    expect(page).to_have_url(re.compile(r"/login/?\?next=" + re.escape(path) + "/?$"))
    expect(page.get_by_role("form", name="Log in")).to_be_visible()
    for testid in ("upload-dropzone", "manage-row", "start-index", "user-row"):
        expect(page.get_by_test_id(testid)).to_have_count(0)


# Speaks Reflex's socket.io protocol from inside the page: a fresh client (no cookie, never
# logged in) fires admin event handlers directly, and posts an upload to /_upload, as a script
# would; it returns every state update the server pushed back.
FIRE_EVENTS_JS = """
async ({events, upload, expectReplies, timeoutMs}) => {
  const token = crypto.randomUUID();
  const replies = [];
  const socketUrl = location.origin.replace(/^http/, "ws") + "/_event/?EIO=4&transport=websocket&token=";
  const ws = new WebSocket(socketUrl + token);
  const done = new Promise((resolve) => {
    const timer = setTimeout(resolve, timeoutMs);
    ws.onmessage = async (message) => {
      const data = String(message.data);
      if (data.startsWith("0")) { ws.send("40/_event,"); return; }
      if (data === "2") { ws.send("3"); return; }
      if (data.startsWith("40/_event")) {
        for (const event of events) {
          ws.send("42/_event," + JSON.stringify(["event", event]));
        }
        if (upload) {
          const form = new FormData();
          form.append("__reflex_event_args", JSON.stringify(upload.args));
          form.append("files", new Blob([Uint8Array.from(upload.bytes)], {type: "image/jpeg"}), upload.filename);
          const response = await fetch("/_upload", {method: "POST", body: form,
            headers: {"Reflex-Client-Token": token, "Reflex-Event-Handler": upload.handler}});
          replies.push("upload status " + response.status);
        }
        return;
      }
      if (data.startsWith("42/_event")) {
        replies.push(data);
        if (replies.filter((r) => r.includes("/login?next=")).length >= expectReplies) {
          clearTimeout(timer);
          resolve();
        }
      }
    };
  });
  await done;
  ws.close();
  return replies;
}
"""


def _event(handler: str, payload: dict, path: str) -> dict:
    return {"name": handler, "payload": payload, "router_data": {"pathname": path, "asPath": path, "query": {}}}


def test_admin_events_fired_without_a_login_are_refused_on_the_server(page: Page, gallery, tmp_path):
    from clipgallery.pages.admin_jobs import JobsState
    from clipgallery.pages.admin_manage import ManageState
    from clipgallery.pages.admin_upload import UploadState
    from clipgallery.pages.admin_users import UsersState

    victim = gallery.add_image(unique_jpeg(), "victim.jpg", unique("victim"), "must survive")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "never-indexed.jpg").write_bytes(unique_jpeg())
    intruder = unique("intruder")
    upload_bytes = unique_jpeg()
    upload_name = unique("smuggled")

    events = [
        _event(
            f"{UsersState.get_full_name()}.add_admin",
            {"form": {"username": intruder, "password": PASSWORD, "password_again": PASSWORD}},
            "/admin/users",
        ),
        _event(f"{ManageState.get_full_name()}.ask_delete", {"image_ids": [str(victim.image_id)]}, "/admin/manage"),
        _event(f"{ManageState.get_full_name()}.confirm_delete", {}, "/admin/manage"),
        _event(f"{ManageState.get_full_name()}.reembed", {"image_ids": [str(victim.image_id)]}, "/admin/manage"),
        _event(f"{ManageState.get_full_name()}.load", {}, "/admin/manage"),
        _event(f"{JobsState.get_full_name()}.start_index", {"form": {"folder": str(folder)}}, "/admin/jobs"),
        _event(f"{JobsState.get_full_name()}.start_reembed", {}, "/admin/jobs"),
    ]
    upload = {
        "handler": f"{UploadState.get_full_name()}.upload",
        "args": {"expected": 1},
        "filename": f"{upload_name}.jpg",
        "bytes": list(upload_bytes),
    }
    files_before = stored_files(gallery)

    page.goto("/login")
    replies = page.evaluate(
        FIRE_EVENTS_JS,
        {"events": events, "upload": upload, "expectReplies": len(events) + 1, "timeoutMs": 20000},
    )

    refusals = [r for r in replies if "/login?next=" in r]
    # Every handler answered, and every answer was the refusal (nothing listed, nothing done).
    assert len(refusals) == len(events) + 1, replies
    assert all("Please log in as an administrator" in r for r in refusals), refusals
    assert not any("manage-row" in r or "must survive" in r for r in replies)
    with db.session_scope(gallery.settings) as session:
        assert intruder not in {u.username for u in auth.list_users(session)}
    survivor = image_rows(gallery, "i.id = :id", id=victim.image_id)
    assert len(survivor) == 1 and survivor[0].embedded
    assert image_rows(gallery, "i.original_filename = 'never-indexed.jpg'") == []
    assert image_rows(gallery, "i.name = :n", n=upload_name) == []
    assert stored_files(gallery) == files_before


def test_a_revoked_session_cannot_delete_upload_or_index(page: Page, context: BrowserContext, gallery, tmp_path):
    name = unique("keepme")
    kept = gallery.add_image(unique_jpeg(), "keep.jpg", name, "still here")
    _, token = log_in_with_cookie(context, gallery)

    page.goto("/admin/manage")
    page.get_by_label("Filter by name or description").fill(name)
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_test_id("manage-row")).to_have_count(1)
    end_session(gallery, token)  # logged out elsewhere, or expired
    page.get_by_role("button", name=f"Delete {name}").click()
    expect(page).to_have_url(re.compile(r"/login/?\?next=/admin/manage/?$"))
    assert len(image_rows(gallery, "i.id = :id", id=kept.image_id)) == 1

    # Upload: the page is open and files are chosen while the session is still alive.
    _, token = log_in_with_cookie(context, gallery)
    upload_name = unique("late")
    page.goto("/admin")
    choose_files(page, [(f"{upload_name}.jpg", "image/jpeg", unique_jpeg())])
    files_before = stored_files(gallery)
    end_session(gallery, token)
    page.get_by_test_id("upload-button").click()
    expect(page).to_have_url(re.compile(r"/login/?\?next=/admin/?$"))
    assert image_rows(gallery, "i.name = :n", n=upload_name) == []
    assert stored_files(gallery) == files_before

    # Indexing a folder.
    folder = tmp_path / "late-folder"
    folder.mkdir()
    (folder / "late-index.jpg").write_bytes(unique_jpeg())
    _, token = log_in_with_cookie(context, gallery)
    page.goto("/admin/jobs")
    page.get_by_label("Folder on the server").fill(str(folder))
    end_session(gallery, token)
    page.get_by_test_id("start-index").click()
    expect(page).to_have_url(re.compile(r"/login/?\?next=/admin/jobs/?$"))
    assert image_rows(gallery, "i.original_filename = 'late-index.jpg'") == []


# --- upload ------------------------------------------------------------------------------------


def test_admin_uploads_an_image_that_a_searcher_then_finds(page: Page, context: BrowserContext, browser, gallery):
    user, _ = log_in_with_cookie(context, gallery)
    name = unique("Lighthouse at dusk")
    description = f"A red lighthouse on a rock, waves below ({uuid.uuid4().hex[:6]})"
    data = unique_jpeg()

    page.goto("/admin")
    choose_files(page, [("lighthouse_photo.jpg", "image/jpeg", data)])
    expect(page.get_by_role("img", name="lighthouse_photo.jpg")).to_be_visible()  # the preview
    name_input = page.get_by_label("Name", exact=True)
    expect(name_input).to_have_value("lighthouse photo")  # prefilled from the file name
    name_input.fill(name)
    page.get_by_label("Description").fill(description)
    page.get_by_test_id("upload-button").click()

    result = page.get_by_test_id("upload-result")
    expect(result).to_have_count(1)
    expect(result).to_have_attribute("data-status", "added")
    expect(result).to_contain_text("Added to the gallery.")
    expect(page.get_by_test_id("selected-file")).to_have_count(0)  # the selection is cleared

    rows = image_rows(gallery, "i.name = :n", n=name)
    assert len(rows) == 1
    row = rows[0]
    assert row.description == description and row.uploaded_by == user.id and row.embedded
    assert {row.stored_path, row.thumbnail_path} <= stored_files(gallery)

    # The searcher's image query with the same bytes ranks it first, at distance ~0.
    with db.session_scope(gallery.settings) as session:
        hits = search_image_bytes(session, gallery.embedder, data, k=5).hits
    assert hits[0].id == row.id and hits[0].distance < 1e-4

    searcher = browser.new_context(base_url=gallery.base_url)
    try:
        visitor = searcher.new_page()
        response = visitor.goto(f"/image/{row.id}")
        assert response is not None and response.ok
        expect(visitor.get_by_text(description)).to_be_visible()
    finally:
        searcher.close()


def decompression_bomb_png() -> bytes:
    out = io.BytesIO()
    Image.new("1", (9000, 9000)).save(out, "PNG", optimize=True)  # 81 megapixels in a few KB
    return out.getvalue()


def test_bad_and_duplicate_uploads(page: Page, context: BrowserContext, gallery):
    log_in_with_cookie(context, gallery)
    existing_name = unique("existing")
    existing_bytes = unique_jpeg()
    existing = gallery.add_image(existing_bytes, "existing.jpg", existing_name)
    bomb = decompression_bomb_png()
    assert len(bomb) < 200_000
    files_before = stored_files(gallery)
    count_before = len(image_rows(gallery, "true"))

    page.goto("/admin")
    choose_files(
        page,
        [
            ("notes.jpg", "image/jpeg", b"this is a text file wearing a .jpg name\n" * 20),
            ("bomb.png", "image/png", bomb),
            ("again.jpg", "image/jpeg", existing_bytes),
        ],
    )
    page.get_by_test_id("upload-button").click()
    results = page.get_by_test_id("upload-result")
    expect(results).to_have_count(3)
    expect(results.nth(0)).to_have_attribute("data-status", "rejected")
    expect(results.nth(0)).to_contain_text("notes.jpg")
    expect(results.nth(0)).to_contain_text(re.compile("not an image|cannot be read|not a supported", re.I))
    expect(results.nth(1)).to_have_attribute("data-status", "rejected")
    expect(results.nth(1)).to_contain_text(re.compile("pixels|too large", re.I))
    expect(results.nth(2)).to_have_attribute("data-status", "duplicate")
    expect(results.nth(2)).to_contain_text("Already in the gallery")
    expect(results.nth(2).get_by_role("link")).to_have_attribute("href", f"/image/{existing.image_id}")

    assert len(image_rows(gallery, "true")) == count_before
    assert stored_files(gallery) == files_before


# --- manage ------------------------------------------------------------------------------------


def test_manage_edit_reembed_and_delete(page: Page, context: BrowserContext, gallery):
    log_in_with_cookie(context, gallery)
    tag = uuid.uuid4().hex[:8]
    first = gallery.add_image(unique_jpeg(), "a.jpg", f"Harbour {tag}", "boats")
    second = gallery.add_image(unique_jpeg(), "b.jpg", f"Meadow {tag}", "flowers")
    rows = image_rows(gallery, "i.id IN (:a, :b)", a=first.image_id, b=second.image_id)
    files = {p for r in rows for p in (r.stored_path, r.thumbnail_path)}
    assert files <= stored_files(gallery)

    page.goto("/admin/manage")
    page.get_by_label("Filter by name or description").fill(tag)
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_test_id("manage-row")).to_have_count(2)
    expect(page.get_by_test_id("manage-page-label")).to_have_text("1–2 of 2 images")

    # Edit in a dialog.
    page.get_by_role("button", name=f"Edit Harbour {tag}").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_label("Name")).to_have_value(f"Harbour {tag}")
    dialog.get_by_label("Name").fill(f"Old harbour {tag}")
    dialog.get_by_label("Description").fill("fishing boats at low tide")
    dialog.get_by_role("button", name="Save").click()
    expect(dialog).to_have_count(0)
    expect(page.get_by_test_id("manage-row").filter(has_text=f"Old harbour {tag}")).to_contain_text(
        "fishing boats at low tide"
    )
    (edited,) = image_rows(gallery, "i.id = :id", id=first.image_id)
    assert (edited.name, edited.description) == (f"Old harbour {tag}", "fishing boats at low tide")

    # Re-embed one: its vector is written again.
    with db.session_scope(gallery.settings) as session:
        session.execute(text("DELETE FROM image_embeddings WHERE image_id = :id"), {"id": second.image_id})
        session.commit()
    row = page.get_by_test_id("manage-row").filter(has_text=f"Meadow {tag}")
    page.get_by_role("button", name="Filter").click()
    expect(row).to_contain_text("no vector")
    page.get_by_role("button", name=f"Re-embed Meadow {tag}").click()
    expect(row).not_to_contain_text("no vector")
    assert image_rows(gallery, "i.id = :id", id=second.image_id)[0].embedded

    # Delete both: select, confirm; rows, vectors and files go together.
    page.get_by_role("checkbox", name=f"Select Old harbour {tag}").click()
    page.get_by_role("checkbox", name=f"Select Meadow {tag}").click()
    expect(page.get_by_test_id("selected-count")).to_have_text("2 selected")
    page.get_by_test_id("delete-selected").click()
    alert = page.get_by_role("alertdialog")
    expect(alert).to_contain_text("Delete 2 images?")
    alert.get_by_test_id("confirm-delete").click()
    expect(page.get_by_test_id("manage-row")).to_have_count(0)
    expect(page.get_by_text("No image matches this filter.")).to_be_visible()
    assert image_rows(gallery, "i.id IN (:a, :b)", a=first.image_id, b=second.image_id) == []
    with db.session_scope(gallery.settings) as session:
        left = session.execute(
            text("SELECT count(*) FROM image_embeddings WHERE image_id IN (:a, :b)"),
            {"a": first.image_id, "b": second.image_id},
        ).scalar_one()
    assert left == 0
    assert not files & stored_files(gallery)


# --- background jobs ---------------------------------------------------------------------------


def test_bulk_index_and_reembed_from_the_ui(page: Page, context: BrowserContext, gallery, tmp_path):
    log_in_with_cookie(context, gallery)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    tag = uuid.uuid4().hex[:8]
    names = [f"bulk-{tag}-{n}.jpg" for n in range(3)]
    (folder / names[0]).write_bytes(unique_jpeg())
    (folder / names[1]).write_bytes(unique_jpeg())
    (folder / "sub" / names[2]).write_bytes(unique_jpeg())
    (folder / "labels.csv").write_text(
        "filename,title,colour\n" + "".join(f"{n},Title {tag} {i},colour{i}\n" for i, n in enumerate(names[:2]))
    )

    page.goto("/admin/jobs")
    # A folder that does not exist: a clear message, no job.
    page.get_by_label("Folder on the server").fill(str(tmp_path / "nowhere"))
    page.get_by_test_id("start-index").click()
    expect(page.get_by_test_id("job-error")).to_contain_text("is not a folder")

    page.get_by_label("Folder on the server").fill(str(folder))
    page.get_by_text("Include subfolders").click()
    page.get_by_text("Names and descriptions from a CSV file").click()
    page.get_by_label("CSV file on the server").fill(str(folder / "labels.csv"))
    page.get_by_label("Name template").fill("{title}")
    page.get_by_label("Description template").fill("a {colour} thing")
    page.get_by_test_id("start-index").click()
    summary = page.get_by_test_id("job-summary")
    expect(summary).to_contain_text("indexed 3, updated 0, reused 0, skipped 0")
    expect(page.get_by_test_id("job-error")).to_have_count(0)

    rows = image_rows(gallery, "i.original_filename LIKE :p", p=f"bulk-{tag}-%")
    assert len(rows) == 3 and all(r.embedded for r in rows)
    assert {r.name for r in rows} >= {f"Title {tag} 0", f"Title {tag} 1"}
    assert "a colour1 thing" in {r.description for r in rows}

    # A second run skips everything.
    page.get_by_test_id("start-index").click()
    expect(summary).to_contain_text("indexed 0, updated 0, reused 0, skipped 3")

    # Re-embed everything: one missing vector is computed again.
    with db.session_scope(gallery.settings) as session:
        session.execute(text("DELETE FROM image_embeddings WHERE image_id = :id"), {"id": rows[0].id})
        session.commit()
    page.get_by_test_id("start-reembed").click()
    expect(summary).to_contain_text(re.compile(r"re-embedded [1-9]\d* images?"))
    assert image_rows(gallery, "i.id = :id", id=rows[0].id)[0].embedded


# --- users -------------------------------------------------------------------------------------


def test_add_an_admin_and_change_own_password(page: Page, context: BrowserContext, gallery):
    me, _ = log_in_with_cookie(context, gallery, unique("owner"))
    newcomer = unique("newcomer")
    page.goto("/admin/users")
    expect(page.get_by_test_id("user-row").filter(has_text=me.username)).to_contain_text("you")

    def add(username: str, password: str) -> None:
        page.get_by_label("User name").fill(username)
        page.get_by_label("Password", exact=True).fill(password)
        page.get_by_label("Password again", exact=True).fill(password)
        page.get_by_role("button", name="Add administrator").click()

    add(newcomer, "newcomer password 1")
    expect(page.get_by_test_id("user-row").filter(has_text=newcomer)).to_contain_text("administrator")
    add(newcomer, "another password 1")  # the server's answer, shown in the form
    expect(page.get_by_role("alert").filter(has_text="already exists")).to_be_visible()
    with db.session_scope(gallery.settings) as session:
        assert auth.authenticate(session, newcomer, "newcomer password 1").is_admin

    page.get_by_label("Current password").fill(PASSWORD)
    page.get_by_label("New password", exact=True).fill("my new password 2")
    page.get_by_label("New password again").fill("my new password 2")
    page.get_by_role("button", name="Change password").click()
    expect(page.get_by_text("Password changed.")).to_be_visible()
    with db.session_scope(gallery.settings) as session:
        assert auth.authenticate(session, me.username, "my new password 2").id == me.id
    # This tab got a fresh session: admin pages still work.
    page.goto("/admin/manage")
    expect(page.get_by_test_id("manage-page-label")).to_be_visible()
    expect(page).to_have_url(re.compile(r"/admin/manage/?$"))
