"""Measure what a bulk load costs PostgreSQL with the HNSW index grown row by row against the
index dropped, the rows inserted and the index built once (what `db.deferred_vector_index` does
for runs that at least double the gallery).

Uses the bench's embedded server (`.state/bench`, started if needed) and a scratch database that
is dropped afterwards. Vectors: the bench's Gaussian mixture around the cached real embeddings
(`clipgallery bench` writes them under `.state/bench`), in the app's shape (vector(512), STORAGE
PLAIN, the configured m / ef_construction). Rows are inserted as the bulk indexer does: batches
of 32 per transaction, one executemany.

    .venv/bin/python scripts/measure_bulk_index.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = [(0, 256), (256, 256), (512, 256), (768, 256), (0, 1000), (1000, 1000), (5000, 1000), (0, 10000)]
BATCH = 32
SCRATCH = "bench_scratch_bulk_index"


def main() -> None:
    import psycopg
    from pgvector.psycopg import register_vector

    from clipgallery import bench

    options = bench.BenchOptions()
    settings = bench.bench_server_settings(options, bench.bench_model_dir(options))
    centres = sorted(options.state_dir.glob("base-*.npy"))
    if not centres:
        raise SystemExit("no cached embeddings under .state/bench: run `clipgallery bench --quick` once first")
    base = np.load(centres[0]).astype(np.float32)
    needed = max(existing + new for existing, new in CASES)
    data, _sigma = bench.dataset(base, needed)
    server = bench.Server(settings)
    if server.exists(SCRATCH):
        server.drop(SCRATCH)
    server.create(SCRATCH)
    index_sql = (
        "CREATE INDEX ix ON t USING hnsw (embedding vector_cosine_ops) "
        f"WITH (m = {settings.hnsw_m}, ef_construction = {settings.hnsw_ef_construction})"
    )
    print(f"m = {settings.hnsw_m}, ef_construction = {settings.hnsw_ef_construction}, batches of {BATCH}\n")
    print("| stored | written | index grown row by row | dropped, then built once | ratio |")
    print("|---:|---:|---:|---:|---:|")
    try:
        with psycopg.connect(server.libpq(SCRATCH), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            register_vector(conn)
            for existing, new in CASES:
                per_row = {}
                for mode in ("grown", "built"):
                    conn.execute("DROP TABLE IF EXISTS t")
                    conn.execute("CREATE TABLE t (id serial PRIMARY KEY, embedding vector(512) STORAGE PLAIN)")
                    if existing:
                        with conn.cursor().copy("COPY t (embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
                            copy.set_types(["vector"])
                            for vector in data[:existing]:
                                copy.write_row((vector,))
                    conn.execute(index_sql)
                    conn.execute("VACUUM ANALYZE t")
                    rows = data[existing : existing + new]
                    started = time.perf_counter()
                    if mode == "built":
                        conn.execute("DROP INDEX ix")
                    for start in range(0, len(rows), BATCH):
                        with conn.transaction(), conn.cursor() as cursor:
                            cursor.executemany(
                                "INSERT INTO t (embedding) VALUES (%s)", [(v,) for v in rows[start : start + BATCH]]
                            )
                    if mode == "built":
                        conn.execute(index_sql)
                    per_row[mode] = (time.perf_counter() - started) * 1000 / new
                print(
                    f"| {existing:,} | {new:,} | {per_row['grown']:.2f} ms/row | {per_row['built']:.2f} ms/row "
                    f"| {per_row['grown'] / per_row['built']:.1f}× |",
                    flush=True,
                )
    finally:
        server.drop(SCRATCH)


if __name__ == "__main__":
    main()
