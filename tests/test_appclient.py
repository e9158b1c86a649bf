"""`clipgallery search` and `status` answered by the running app: the record `serve` leaves, when it
is trusted, and the same results as a search in the command's own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clipgallery import appclient
from clipgallery.appclient import Query, recorded_app, running_app_url
from clipgallery.config import Settings
from clipgallery.gallery import NotFoundError
from clipgallery.imaging import RejectedImage
from clipgallery.search import InvalidQuery
from tests.appserver import free_port
from tests.conftest import jpeg

# Runs the command line in a fresh interpreter and fails if it imported torch.
WITHOUT_TORCH = (
    "import sys\n"
    "from clipgallery.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "assert 'torch' not in sys.modules, 'torch was imported'\n"
    "sys.exit(code)\n"
)


def _run_cli(settings: Settings, *args: str, script: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CLIPGALLERY_DATABASE_URL")}
    env.update(
        DATABASE_URL=settings.database_url,
        CLIPGALLERY_MODEL=settings.model_name,
        CLIPGALLERY_STATE_DIR=str(settings.state_dir),
        CLIPGALLERY_UPLOAD_DIR=str(settings.upload_dir),
    )
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "clipgallery.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


def _json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _same_results(answered: dict, local: dict) -> None:
    assert [hit["id"] for hit in answered["results"]] == [hit["id"] for hit in local["results"]]
    for mine, theirs in zip(answered["results"], local["results"], strict=True):
        assert mine["distance"] == pytest.approx(theirs["distance"], abs=1e-5)
        assert mine["files"] == theirs["files"] and mine["text_match"] == theirs["text_match"]
    for key in ("metric", "exact", "hybrid", "has_more"):
        assert answered[key] == local[key], key


@pytest.mark.slow
def test_search_is_answered_by_the_running_app_without_loading_a_model(app_server, gallery, tmp_path):
    app, settings = app_server
    ids = [
        gallery.add_image(jpeg(950 + n), f"cli{n}.jpg", f"command line picture {n}", "asked of the app").image_id
        for n in range(4)
    ]
    url = running_app_url(settings)
    assert url == f"http://127.0.0.1:{app.port}"

    words = ("search", "command line picture", "-k", "3", "--format", "json")
    answered = _json(_run_cli(settings, *words, script=WITHOUT_TORCH))
    assert answered["answered_by"] == url
    local = _json(_run_cli(settings, *words, "--local"))
    assert local["answered_by"] == "this process"
    _same_results(answered, local)
    assert answered["hybrid"]

    query_image = tmp_path / "query.jpg"
    query_image.write_bytes(jpeg(951))
    image = ("search", "--image", str(query_image), "--format", "json")
    by_image = _json(_run_cli(settings, *image, script=WITHOUT_TORCH))
    assert by_image["answered_by"] == url and by_image["results"][0]["id"] == ids[1]
    _same_results(by_image, _json(_run_cli(settings, *image, "--local")))

    similar = ("search", "--similar", str(ids[2]), "-k", "5", "--format", "json")
    answered = _json(_run_cli(settings, *similar, script=WITHOUT_TORCH))
    assert answered["answered_by"] == url and ids[2] not in [hit["id"] for hit in answered["results"]]
    # Stored vectors against stored vectors: no model here either.
    _same_results(answered, _json(_run_cli(settings, *similar, "--local", script=WITHOUT_TORCH)))

    # The table says who answered; an exact scan (not in the API) is searched here.
    table = _run_cli(settings, "search", "command line picture", script=WITHOUT_TORCH)
    assert table.returncode == 0 and f"answered by the app at {url}" in table.stdout
    exact = _json(_run_cli(settings, *words, "--exact"))
    assert exact["answered_by"] == "this process" and exact["exact"]

    # `status` reports the app's model rather than loading one.
    status = _run_cli(settings, "status", script=WITHOUT_TORCH)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"model:    ok — {gallery.embedder.identity} loaded (in the app running at {url})" in status.stdout

    # A query at fault is the same one-line error, still without the model.
    missing = _run_cli(settings, "search", "--similar", "987654", script=WITHOUT_TORCH)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and "987654" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_the_record_names_the_app_only_while_it_runs(tmp_path):
    settings = Settings(state_dir=tmp_path / "state", database_url="postgresql+psycopg://u:secret@db/gallery")
    same_db = "postgresql+psycopg://u:changed@db/gallery"  # the key leaves the password out
    with recorded_app(settings, "http://127.0.0.1:3000"):
        assert running_app_url(settings) == "http://127.0.0.1:3000"
        record = (settings.state_dir / appclient.RECORD_FILE).read_text()
        assert "secret" not in record  # the database is named by a digest of its URL
        assert json.loads(record)["database"] == appclient._database_key(replace(settings, database_url=same_db))
        assert running_app_url(replace(settings, database_url="postgresql+psycopg://u:secret@db/other")) is None
        assert running_app_url(replace(settings, database_url=None)) is None
    assert not (settings.state_dir / appclient.RECORD_FILE).exists()
    assert running_app_url(settings) is None


def test_a_record_left_by_a_dead_app_or_damaged_is_ignored(tmp_path):
    settings = Settings(state_dir=tmp_path, database_url=None)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = tmp_path / appclient.RECORD_FILE
    record.write_text(json.dumps({"pid": int(finished.stdout), "url": "http://127.0.0.1:1", "database": None}))
    assert running_app_url(settings) is None
    for damaged in ("", "{", "[]", '{"pid": "x", "url": 1}'):
        record.write_text(damaged)
        assert running_app_url(settings) is None


class _Answers(BaseHTTPRequestHandler):
    """Answers every request with the status and body the test put on the server."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        status, body = self.server.answer
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def answering_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _ask(url: str, query: Query):
    return appclient.search(url, query, k=5, offset=0, min_similarity=None, metric=None)


def _error(status: int, code: str, message: str) -> tuple[int, dict]:
    return status, {"error": {"status": status, "code": code, "message": message}}


@pytest.mark.parametrize(
    "answer",
    [
        _error(401, "unauthorized", "Log in to search this gallery."),  # a private gallery
        _error(503, "model_unavailable", "The model is loading."),
        _error(422, "invalid_request", "k: Input should be less than or equal to 500"),
        (500, {"detail": "Internal Server Error"}),
        (502, "not our app"),
        (200, "<html>another service on that port</html>"),
        (200, {"results": [{"id": 1}]}),
    ],
)
def test_an_app_that_cannot_answer_leaves_the_search_to_the_command(answering_server, answer, tmp_path):
    answering_server.answer = answer
    url = f"http://127.0.0.1:{answering_server.server_port}"
    assert _ask(url, Query(words="a dog", hybrid=True)) is None
    image = tmp_path / "q.jpg"
    image.write_bytes(jpeg(1))
    assert _ask(url, Query(image=image)) is None


def test_nothing_listening_leaves_the_search_to_the_command():
    url = f"http://127.0.0.1:{free_port()}"
    assert _ask(url, Query(similar=3)) is None


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (_error(400, "invalid_query", "The query is empty."), InvalidQuery),
        (_error(404, "not_found", "No image with id 7."), NotFoundError),
        (_error(415, "image_unsupported", "Not an image format clipgallery accepts."), RejectedImage),
    ],
)
def test_a_query_at_fault_is_the_error_a_search_here_would_raise(answering_server, answer, error):
    answering_server.answer = answer
    url = f"http://127.0.0.1:{answering_server.server_port}"
    with pytest.raises(error, match=answer[1]["error"]["message"].rstrip(".")):
        _ask(url, Query(similar=7))
