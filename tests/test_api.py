"""The JSON API over real HTTP against the running production app and its real database."""

import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import encode, jpeg, picture

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(app_server):
    app, _ = app_server
    with httpx.Client(base_url=f"http://127.0.0.1:{app.port}", timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def seeded(gallery):
    ids = [
        gallery.add_image(jpeg(900 + n), f"api{n}.jpg", f"API image {n}", f"api description {n}").image_id
        for n in range(6)
    ]
    return ids


@pytest.fixture(scope="module")
def admin_token(gallery):
    return gallery.api_token(gallery.create_admin("api-admin"))


def _error(response, status, code=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["status"] == status and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body["error"]["message"]


def test_health(client):
    response = client.get("/api/health")
    assert response.status_code == 200
    body = response.json()
    assert body["database"]["ok"] and "pgvector" in body["database"]["detail"]
    assert body["model"]["ok"] and "tiny-vit" in body["model"]["detail"]
    assert body["vector_index"].startswith("none: fewer than 5,000 vectors")  # the default, in a small gallery


def test_text_search_pages_and_scores(client, seeded):
    params = {"q": "api", "k": 3, "text": "API image", "hybrid": "false"}
    first = client.get("/api/search", params=params).json()
    # The app runs with the default settings: a gallery this small has no vector index (exact).
    assert first["metric"] == "cosine" and first["exact"] is True and first["k"] == 3
    assert first["hybrid"] is False
    assert len(first["results"]) == 3 and first["has_more"] and first["next_offset"] == 3
    scores = [hit["similarity"] for hit in first["results"]]
    assert scores == sorted(scores, reverse=True)
    hit = first["results"][0]
    assert hit["similarity"] == pytest.approx(1 - hit["distance"])
    assert hit["score"] is None and hit["text_match"] is False
    assert hit["page_url"] == f"/image/{hit['id']}"
    # The 96 x 72 JPEGs fit the gallery's 256-px thumbnails: they are shown as uploaded.
    assert hit["thumbnail_url"] == hit["original_url"] and hit["original_url"].startswith("/files/originals/")
    second = client.get("/api/search", params={**params, "offset": 3}).json()
    assert {h["id"] for h in first["results"]}.isdisjoint(h["id"] for h in second["results"])
    assert {h["id"] for h in first["results"] + second["results"]} == set(seeded)
    # By default words are also matched against names and descriptions ("API image N" here).
    hybrid = client.get("/api/search", params={"q": "api", "k": 6}).json()
    assert hybrid["hybrid"] is True and all(h["text_match"] for h in hybrid["results"])
    fused = [h["score"] for h in hybrid["results"]]
    assert fused == sorted(fused, reverse=True)


def test_image_search_by_upload_finds_the_same_image_first(client, seeded):
    response = client.post("/api/search/image", files={"file": ("q.jpg", jpeg(903), "image/jpeg")}, params={"k": 2})
    assert response.status_code == 200, response.text
    top = response.json()["results"][0]
    assert top["id"] == seeded[3] and top["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_image_details_similar_and_files(client, seeded):
    details = client.get(f"/api/images/{seeded[0]}").json()
    assert details["name"] == "API image 0" and details["description"] == "api description 0"
    assert details["mime_type"] == "image/jpeg" and details["has_embedding"]
    similar = client.get(f"/api/images/{seeded[0]}/similar", params={"k": 10}).json()["results"]
    assert seeded[0] not in [h["id"] for h in similar] and similar
    original = client.get(details["original_url"])
    assert original.status_code == 200 and original.content == jpeg(900)
    assert "immutable" in original.headers["cache-control"]
    assert original.headers["x-content-type-options"] == "nosniff"
    download = client.get(details["original_url"], params={"download": 1})
    assert 'attachment; filename="api0.jpg"' in download.headers["content-disposition"]
    thumb = client.get(details["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize(
    "path",
    ["/files/../../etc/passwd", "/files/originals/../../../etc/passwd", "/files/other/x", "/files/thumbs/no/such.webp"],
)
def test_files_outside_the_store_are_not_served(client, path):
    assert client.get(path).status_code == 404


@pytest.mark.parametrize(
    "params,status,code",
    [
        ({"q": "x", "k": 0}, 422, "invalid_request"),
        ({"q": "x", "k": 100000}, 422, "invalid_request"),
        ({"q": ""}, 422, "invalid_request"),
        ({}, 422, "invalid_request"),
        ({"q": "x", "metric": "hamming"}, 422, "invalid_request"),
        ({"q": "x", "metric": "l1", "min_similarity": 0.5}, 400, "invalid_query"),
        ({"q": "x", "format": "text/html"}, 400, "invalid_query"),
        ({"q": "x" * 2000}, 422, "invalid_request"),
    ],
)
def test_bad_search_parameters_get_the_error_shape(client, params, status, code):
    _error(client.get("/api/search", params=params), status, code)


def test_unknown_image_is_404(client):
    _error(client.get("/api/images/987654"), 404, "not_found")
    _error(client.get("/api/images/987654/similar"), 404, "not_found")


def test_bad_image_queries(client, gallery):
    before = gallery.count("images")
    _error(client.post("/api/search/image", files={"file": ("x.jpg", b"not an image", "image/jpeg")}), 415)
    _error(client.post("/api/search/image", files={"file": ("x.jpg", b"", "image/jpeg")}), 400, "image_empty")
    big = b"\xff\xd8" + b"0" * (31 * 1024 * 1024)
    _error(client.post("/api/search/image", files={"file": ("x.jpg", big, "image/jpeg")}), 413)
    _error(client.post("/api/search/image"), 422)
    assert gallery.count("images") == before


@pytest.fixture(scope="module")
def image_server():
    png = encode(picture(950), "PNG")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://10.0.0.1/secret.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", png
    server.shutdown()


def test_url_search(client, gallery, image_server):
    base, png = image_server
    stored = gallery.add_image(png, "served.png", "Served over HTTP")
    response = client.post("/api/search/url", json={"url": f"{base}/image.png", "k": 1})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["id"] == stored.image_id
    assert "private" in _error(client.post("/api/search/url", json={"url": "http://10.0.0.1/x.png"}), 400)
    assert "address" in _error(client.post("/api/search/url", json={"url": f"{base}/redirect"}), 400)
    _error(client.post("/api/search/url", json={"url": "file:///etc/passwd"}), 400)


def test_admin_routes_need_an_admin_token(client, gallery, seeded, admin_token):
    image = ("new.png", encode(picture(960), "PNG"), "image/png")
    _error(client.post("/api/images", files={"file": image}), 401, "unauthorized")
    _error(client.post("/api/images", files={"file": image}, headers={"Authorization": "Bearer nope"}), 401)
    expired = gallery.api_token(gallery.create_admin("api-expired"), ttl=timedelta(seconds=-1))
    _error(client.post("/api/images", files={"file": image}, headers={"Authorization": f"Bearer {expired}"}), 401)
    _error(client.patch(f"/api/images/{seeded[1]}", json={"name": "x"}), 401)
    _error(client.delete(f"/api/images/{seeded[1]}"), 401)
    from clipgallery import auth, db

    with db.session_scope(gallery.settings) as session:
        viewer = auth.create_user(session, "api-viewer", "a long viewer password", is_admin=False)
        viewer_session = auth.create_session(session, viewer, timedelta(hours=1))
    cookie = {"Cookie": f"clipgallery_session={viewer_session}"}
    _error(client.delete(f"/api/images/{seeded[1]}", headers=cookie), 403, "forbidden")
    assert client.get(f"/api/images/{seeded[1]}").status_code == 200


def test_admin_create_update_delete(client, gallery, admin_token):
    headers = {"Authorization": f"Bearer {admin_token}"}
    data = encode(picture(970), "PNG")
    created = client.post(
        "/api/images",
        files={"file": ("../evil name.png", data, "image/png")},
        data={"name": "Via API", "description": "posted"},
        headers=headers,
    )
    assert created.status_code == 201, created.text
    image = created.json()["image"]
    assert (image["name"], image["description"], image["original_filename"]) == ("Via API", "posted", "evil name.png")
    again = client.post("/api/images", files={"file": ("copy.png", data, "image/png")}, headers=headers)
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert again.json()["image"]["id"] == image["id"]

    rejected = client.post("/api/images", files={"file": ("x.png", b"<svg></svg>", "image/png")}, headers=headers)
    _error(rejected, 415, "image_unsupported")

    patched = client.patch(f"/api/images/{image['id']}", json={"description": "edited"}, headers=headers)
    assert patched.status_code == 200 and patched.json()["description"] == "edited"
    _error(client.patch(f"/api/images/{image['id']}", json={"name": "  "}, headers=headers), 400)
    _error(client.patch("/api/images/987654", json={"name": "x"}, headers=headers), 404)

    files_before = {p for p in gallery.storage.iter_files()}
    assert client.delete(f"/api/images/{image['id']}", headers=headers).status_code == 204
    _error(client.get(f"/api/images/{image['id']}"), 404)
    assert len(files_before - set(gallery.storage.iter_files())) == 2  # original and thumbnail
    _error(client.delete(f"/api/images/{image['id']}", headers=headers), 404)


def test_openapi_schema_and_docs(client):
    schema = client.get("/api/openapi.json").json()
    for path in (
        "/api/search",
        "/api/search/image",
        "/api/search/url",
        "/api/images/{image_id}",
        "/api/images/{image_id}/similar",
        "/api/images",
        "/api/health",
    ):
        assert path in schema["paths"]
    docs = client.get("/api/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_sql_metacharacters_are_just_text(client, seeded):
    for q in ("'; DROP TABLE images; --", "%", "_", "\\", "\x00"[:0] + "a' OR '1'='1"):
        response = client.get("/api/search", params={"q": q, "text": q})
        assert response.status_code == 200, response.text
    assert client.get(f"/api/images/{seeded[0]}").status_code == 200


PAYLOADS = [
    "'; DROP TABLE images; --",
    '" OR "1"="1',
    "1; SELECT pg_sleep(10)",
    "%' UNION SELECT password_hash FROM users --",
    "\\x00\\' \\\\",
    "$$; DELETE FROM images; $$",
    "<script>alert(1)</script>",
    "x" * 10_000,
    "ʕ•ᴥ•ʔ 🦄 ﷽",
]
FIELDS = ["q", "text", "uploader", "format", "added_from", "added_to", "metric", "k", "offset", "min_similarity"]


@pytest.mark.parametrize("field", FIELDS)
def test_hostile_values_in_every_search_parameter(client, gallery, seeded, field):
    images_before = gallery.count("images")
    for payload in PAYLOADS:
        params = {"q": "anything", field: payload}
        response = client.get("/api/search", params=params)
        assert response.status_code in (200, 400, 422), (field, payload[:40], response.status_code, response.text[:200])
        if response.status_code != 200:
            assert response.json()["error"]["message"]
    assert gallery.count("images") == images_before
    assert client.get("/api/health").json()["database"]["ok"]


def test_hostile_values_in_admin_form_fields(client, gallery, admin_token):
    headers = {"Authorization": f"Bearer {admin_token}"}
    for n, payload in enumerate(PAYLOADS):
        data = encode(picture(7000 + n), "PNG")
        response = client.post(
            "/api/images",
            files={"file": (payload[:300] + ".png", data, "image/png")},
            data={"name": payload[:500], "description": payload},
            headers=headers,
        )
        if len(payload) > 10_000 or not payload.strip():
            assert response.status_code in (201, 422)
            continue
        assert response.status_code == 201, response.text[:300]
        image = response.json()["image"]
        assert image["description"] == payload.strip()[:10_000]
        assert "/" not in image["original_filename"]


def test_streamed_oversized_bodies_are_refused(client):
    """No Content-Length (chunked): the body is counted as it arrives and cut off at the limit."""

    def stream():
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        yield b"Content-Type: image/jpeg\r\n\r\n"
        chunk = b"0" * (1024 * 1024)
        for _ in range(40):  # 40 MB, over the 30 MB upload limit
            yield chunk
        yield b"\r\n--x--\r\n"

    streamed = client.post(
        "/api/search/image", content=stream(), headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert streamed.status_code == 413, streamed.text[:300]
    # Refused by the body limit as the bytes arrived, not after the route had the whole upload.
    assert streamed.json()["error"]["code"] == "request_too_large"
