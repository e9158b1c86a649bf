"""docker-compose.yml, Dockerfile and .dockerignore say what docs/deployment.md promises.

No Docker engine runs here, so these read the files: the compose file with PyYAML (with
`${VAR:-default}` replaced by its default, as compose does when VAR is unset) and the Dockerfile
as text. `docker-compose -f docker-compose.yml config` (PyPI's docker-compose 1.29.2) validated
the same file against the compose schema; see docs/deployment.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _with_defaults(value):
    """Compose interpolation with an empty environment: ${VAR:-default} -> default, $$ -> $."""
    if isinstance(value, str):
        return DEFAULT.sub(lambda m: m.group(2), value).replace("$$", "$")
    if isinstance(value, list):
        return [_with_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: _with_defaults(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def compose(raw) -> dict:
    return _with_defaults(raw)


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the "KEY=value" list form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _volume_targets(service: dict) -> dict[str, str]:
    """Container path -> named volume, for the short "name:/path" form."""
    targets = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        targets[target] = source
    return targets


def test_services(compose):
    assert set(compose["services"]) == {"app", "db", "redis"}
    assert "version" not in compose, "the compose specification needs no version key"


def test_db_is_pgvector_with_a_data_volume(compose):
    db = compose["services"]["db"]
    assert db["image"].startswith("pgvector/pgvector:pg")
    assert _volume_targets(db)["/var/lib/postgresql/data"] in compose["volumes"]
    env = _env(db)
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= set(env)


def test_redis_image(compose):
    assert compose["services"]["redis"]["image"].startswith("redis:")


def test_app_environment_points_at_db_and_redis(compose):
    env = _env(compose["services"]["app"])
    assert re.fullmatch(r"postgres(ql)?(\+psycopg)?://[^:]+:[^@]+@db:5432/\w+", env["DATABASE_URL"])
    assert env["REFLEX_REDIS_URL"] == "redis://redis:6379"
    assert int(env["GRANIAN_WORKERS"]) >= 2  # more than one worker is why Redis is there
    assert env["CLIPGALLERY_UPLOAD_DIR"].startswith("/")
    assert env["HF_HOME"].startswith("/")


def test_app_volumes_for_uploads_and_model_cache(compose):
    app = compose["services"]["app"]
    env = _env(app)
    targets = _volume_targets(app)
    assert targets[env["CLIPGALLERY_UPLOAD_DIR"]] in compose["volumes"]
    cache = [source for target, source in targets.items() if env["HF_HOME"].startswith(target)]
    assert cache and cache[0] in compose["volumes"], "HF_HOME must be inside a named volume"
    assert {"pgdata", "uploads", "model-cache"} <= set(compose["volumes"])


def test_every_service_has_a_health_check(compose):
    for name, service in compose["services"].items():
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no health check"
        assert not check.get("disable"), name


def test_app_health_check_calls_the_health_route_on_the_served_port(compose):
    app = compose["services"]["app"]
    test = " ".join(app["healthcheck"]["test"])
    port = app["command"][app["command"].index("--port") + 1]
    assert f"localhost:{port}/api/health" in test
    assert app["ports"] == [f"{port}:{port}"], "the websocket URL carries the container's port"


def test_app_waits_for_healthy_db_and_redis(compose):
    depends = compose["services"]["app"]["depends_on"]
    assert depends == {
        "db": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }


def test_app_serves_with_clipgallery_serve(compose):
    command = compose["services"]["app"]["command"]
    assert command[:2] == ["clipgallery", "serve"]


def test_configuration_has_defaults(raw):
    """Every ${VAR} has a default, so `docker compose up` works with no .env file."""
    text = (ROOT / "docker-compose.yml").read_text()
    bare = re.findall(r"(?<!\$)\$\{(\w+)\}", text)
    assert not bare, f"variables without a default: {bare}"
    assert "${POSTGRES_PASSWORD:-" in text


def test_dockerfile(dockerfile):
    assert re.search(r"^FROM python:3\.11-slim-bookworm\b", dockerfile, re.M)
    assert re.search(r"REFLEX_USE_NPM=1", dockerfile)
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0", "0:0"), "the app must not run as root"
    assert "make node" in dockerfile
    assert re.search(r"^CMD \[\"clipgallery\", \"serve\"", dockerfile, re.M)


def test_make_node_installs_where_serve_looks(dockerfile):
    """The Makefile's node target and clipgallery.server.node_bin_dir() agree on the place."""
    from clipgallery import server

    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^node: \$\(NODE\)", makefile, re.M)
    assert re.search(r"^NODE_PREFIX := \.tools/node22$", makefile, re.M)
    assert re.search(rf"^NODE_VERSION := {re.escape(server.NODE_VERSION)}$", makefile, re.M)
    assert server.node_bin_dir().relative_to(server.PROJECT_ROOT).parts[:3] == (".tools", "node22", "node_modules")


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".venv", ".tools", ".web", ".state", "uploaded_files/*", "models", ".env"):
        assert entry in ignored, entry
    assert "reflex.lock" not in ignored  # the pinned frontend packages belong in the image
