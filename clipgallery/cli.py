"""`clipgallery` command line: a thin shell over the same services the web app and API use."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from clipgallery.config import ConfigError, Settings, get_settings

log = logging.getLogger("clipgallery")


def _print_page(page, title: str, answered_by: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from clipgallery.results import format_score

    console = Console()
    how = "exact scan" if page.exact else "HNSW index"
    if page.hybrid:
        how += " + full-text (hybrid; * = words matched)"
    if answered_by:
        how += f" · answered by the app at {answered_by}"
    table = Table(title=f"{title}  ·  {page.metric}, {how}", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("id", justify="right")
    table.add_column("similarity", justify="right")
    table.add_column("distance", justify="right")
    table.add_column("name")
    table.add_column("description", overflow="fold", max_width=60)
    for rank, hit in enumerate(page.hits, start=page.offset + 1):
        similarity = "" if hit.similarity is None else format_score(hit.similarity)
        name = f"* {hit.name}" if hit.text_match else hit.name
        table.add_row(str(rank), str(hit.id), similarity, format_score(hit.distance, 4), name, hit.description)
    console.print(table)
    if not page.hits:
        console.print("no matches" if page.offset == 0 else "no more matches")
    elif page.has_more:
        console.print(f"more results: --offset {page.offset + page.k}")


def _search_query(args: argparse.Namespace, settings: Settings):
    """The search the arguments ask for (an `appclient.Query`), its title, and what the JSON
    output says it was."""
    from clipgallery.appclient import Query

    if args.image:
        image = Path(args.image)
        return Query(image=image), f"images like {args.image}", {"image": str(image.resolve())}
    if args.similar is not None:
        return Query(similar=args.similar), f"more like image {args.similar}", {"similar": args.similar}
    if args.query:
        words = " ".join(args.query)
        hybrid = settings.hybrid_search if args.hybrid is None else args.hybrid
        return Query(words=words, hybrid=hybrid), f"“{words}”", {"text": words}
    raise SystemExit("error: give search words, --image FILE or --similar ID")


def _search_here(query, settings: Settings, options: dict):
    """The page of `query` searched in this process: the model is loaded here for words or an image."""
    from clipgallery import db
    from clipgallery.duplicates import stored_model_id
    from clipgallery.embedding import get_embedder
    from clipgallery.gallery import NotFoundError
    from clipgallery.search import search_image_bytes, search_similar_by_model, search_text

    # One query per process: tracing a tower costs ≈ 2 s and saves ≈ 3 ms per query.
    embedder = get_embedder(settings.with_overrides(trace_text_tower=False, trace_image_tower=False))
    with db.session_scope(settings) as session:
        if query.image is not None:
            return search_image_bytes(session, embedder, query.image.read_bytes(), **options)
        if query.similar is not None:
            # A stored vector against the others of its model: no model to load.
            model_id = stored_model_id(session, settings)
            if model_id is None:
                raise NotFoundError(f"No image with id {query.similar} has a vector: the gallery holds none.")
            return search_similar_by_model(session, settings, model_id, query.similar, **options)
        return search_text(session, embedder, query.words, hybrid=query.hybrid, **options)


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    from clipgallery import appclient

    query, title, described = _search_query(args, settings)
    options = dict(
        k=settings.default_k if args.k is None else args.k,
        offset=args.offset,
        min_similarity=args.min_similarity,
        metric=args.metric,
    )
    # The API has no exact scan; a running app answers everything else without loading a model here.
    app_url = None if args.local or args.exact else appclient.running_app_url(settings)
    page = appclient.search(app_url, query, **options) if app_url else None
    if page is None:
        app_url = None
        page = _search_here(query, settings, {**options, "exact": args.exact})
    if args.format == "table":
        _print_page(page, title, app_url)
        return 0
    from clipgallery import db
    from clipgallery.gallery import image_files
    from clipgallery.storage import Storage

    with db.session_scope(settings) as session:
        files = image_files(session, Storage(settings.upload_dir), [hit.id for hit in page.hits])
    if args.format == "paths":
        for hit in page.hits:
            candidates = files.get(hit.id, [])  # none: deleted since the search
            existing = [path for path in candidates if Path(path).is_file()]
            if existing or candidates:
                print((existing or candidates)[0])
        return 0
    results = [
        {
            "rank": rank,
            "id": hit.id,
            "name": hit.name,
            "description": hit.description,
            "similarity": hit.similarity,
            "distance": hit.distance,
            "score": hit.score,
            "text_match": hit.text_match,
            "files": files.get(hit.id, []),
        }
        for rank, hit in enumerate(page.hits, start=page.offset + 1)
    ]
    report = dict(
        query=described,
        metric=page.metric,
        exact=page.exact,
        hybrid=page.hybrid,
        has_more=page.has_more,
        answered_by=app_url or "this process",
    )
    print(json.dumps({**report, "results": results}, ensure_ascii=False, indent=2))
    return 0


def cmd_index(args: argparse.Namespace, settings: Settings) -> int:
    from clipgallery import db
    from clipgallery.bulk import MetadataMapping, index_folder
    from clipgallery.embedding import get_embedder
    from clipgallery.storage import Storage

    mapping = None
    if args.metadata:
        mapping = MetadataMapping(Path(args.metadata), args.file_column, args.name, args.description)
    elif args.file_column or args.name or args.description:
        raise SystemExit("error: --file-column, --name and --description go with --metadata FILE.csv")
    db.migrate(settings)
    with db.session_scope(settings) as session:
        summary = index_folder(
            session,
            get_embedder(settings),
            Storage(settings.upload_dir),
            Path(args.path),
            recursive=args.recursive,
            metadata=mapping,
            prune=args.prune,
            progress=not args.quiet,
            batch_size=args.batch_size,
        )
    for line in summary.lines():
        print(line)
    return 0


def cmd_reembed(args: argparse.Namespace, settings: Settings) -> int:
    from clipgallery import db
    from clipgallery.embedding import get_embedder
    from clipgallery.ingest import reembed_images
    from clipgallery.storage import Storage

    embedder = get_embedder(settings)
    with db.session_scope(settings) as session:
        count = reembed_images(session, embedder, Storage(settings.upload_dir), args.ids or None, not args.quiet)
    print(f"re-embedded {count} images with {embedder.identity}")
    return 0


def cmd_sweep_files(args: argparse.Namespace, settings: Settings) -> int:
    from clipgallery import db
    from clipgallery.gallery import known_file_paths, sweep_stale_pending
    from clipgallery.storage import Storage

    if args.min_age < 0:
        print("error: --min-age must be 0 or more seconds", file=sys.stderr)
        return 2
    storage = Storage(settings.upload_dir)
    with db.session_scope(settings) as session:
        removed = sweep_stale_pending(session, storage)
        removed += storage.sweep_orphans(known_file_paths(session), min_age_seconds=args.min_age)
    for relpath in removed:
        print(f"removed {relpath}")
    print(f"{len(removed)} stored files without an image removed")
    return 0


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from clipgallery import db

    if args.db_command == "upgrade":
        db.migrate(settings, args.revision)
        print(f"database at revision {db.current_revision(settings)}")
    elif args.db_command == "downgrade":
        db.downgrade(settings, args.revision)
        print(f"database at revision {db.current_revision(settings)}")
    elif args.db_command == "current":
        print(db.current_revision(settings) or "(empty: run `clipgallery db upgrade`)")
    elif args.db_command == "url":
        print(db.libpq_url(db.database_url(settings)))
    elif args.db_command == "psql":
        return db.run_psql(settings, args.psql_args)
    elif args.db_command == "dump":
        print(f"wrote {db.dump(settings, Path(args.output))}")
        print(
            f"also back up the files: tar -C {settings.upload_dir.parent} -czf files.tar.gz {settings.upload_dir.name}"
        )
    elif args.db_command == "restore":
        db.restore(settings, Path(args.input))
        print(f"restored {args.input} (schema revision {db.current_revision(settings)})")
    elif args.db_command == "create-reader":
        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
        db.migrate(settings)
        role = db.create_reader_role(settings, args.name, password)
        print(f"role {role} can now read images, vectors and models and call the SQL helpers (docs/sql.md)")
    return 0


def cmd_model(args: argparse.Namespace, settings: Settings) -> int:
    from clipgallery.embedding import create_random_model_dir, get_embedder, resolve_model_spec

    if args.model_command == "create":
        out = create_random_model_dir(Path(args.output), args.architecture, seed=args.seed)
        print(f"wrote a randomly initialised {args.architecture} model to {out}")
        print(f"use it with: CLIPGALLERY_MODEL={out.resolve()}")
        print("(random weights: every code path works, but search results are meaningless)")
    else:
        spec = resolve_model_spec(settings)
        print(f"configured: {spec.source} ({spec.dimension}-d)")
        ok, detail = get_embedder(settings).status()
        print(detail)
        return 0 if ok else 1
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from clipgallery import appclient
    from clipgallery.gallery import gallery_status

    # The running app's model is the one searches use; loading another copy here takes seconds.
    app_url = None if args.local else appclient.running_app_url(settings)
    app_model = appclient.model_health(app_url) if app_url else None
    status = gallery_status(settings, load_model=app_model is None)
    model_ok, model_detail = app_model or (status.model_ok, status.model_detail)
    if app_model:
        model_detail += f" (in the app running at {app_url})"
    print(f"database: {'ok' if status.database_ok else 'FAILED'} — {status.database_detail}")
    print(f"model:    {'ok' if model_ok else 'unavailable'} — {model_detail}")
    print(f"images:   {status.image_count}")
    if status.vector_index:
        print(f"index:    {status.vector_index}")
    return 0 if status.database_ok and model_ok else 1


def cmd_duplicates(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from clipgallery import db
    from clipgallery.duplicates import find_near_duplicate_groups, similarity_to_distance, stored_model_id

    if args.min_similarity is not None:
        max_distance = similarity_to_distance(args.min_similarity)
    else:
        max_distance = settings.duplicate_distance if args.threshold is None else args.threshold
    started = time.perf_counter()
    with db.session_scope(settings) as session:
        model_id = stored_model_id(session, settings)
        groups = find_near_duplicate_groups(
            session,
            settings,
            model_id,
            max_distance,
            limit_groups=args.limit,
            neighbours=args.neighbours,
            ef_search=args.ef_search,
        )
    seconds = time.perf_counter() - started
    if args.json:
        out = {
            "max_distance": max_distance,
            "min_similarity": 1.0 - max_distance,
            "seconds": round(seconds, 3),
            "groups": [
                {
                    "distance": group.distance,
                    "similarity": group.similarity,
                    "closest_distance": group.closest_distance,
                    "keep": group.keep_id,
                    "images": [
                        {
                            "id": image.id,
                            "name": image.name,
                            "distance": image.distance,
                            "similarity": image.similarity,
                            "width": image.width,
                            "height": image.height,
                            "byte_size": image.byte_size,
                            "mime_type": image.mime_type,
                            "created_at": image.created_at.isoformat() if image.created_at else None,
                            "thumbnail_url": image.thumbnail_url,
                            "original_url": image.original_url,
                            "keep": image.id == group.keep_id,
                        }
                        for image in group.images
                    ],
                }
                for group in groups
            ],
        }
        print(json.dumps(out, indent=2))
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = f"near-duplicates: similarity ≥ {1.0 - max_distance:.3f} (cosine distance ≤ {max_distance:.4f})"
    table = Table(title=title, title_justify="left")
    table.add_column("group", justify="right")
    table.add_column("id", justify="right")
    table.add_column("similarity", justify="right")
    table.add_column("pixels", justify="right")
    table.add_column("added")
    table.add_column("name")
    table.add_column("suggestion")
    for number, group in enumerate(groups, start=1):
        for image in group.images:
            table.add_row(
                str(number) if image.id == group.keep_id else "",
                str(image.id),
                f"{image.similarity:.4f}",
                f"{image.width}×{image.height}",
                f"{image.created_at:%Y-%m-%d %H:%M}" if image.created_at else "",
                image.name,
                "keep" if image.id == group.keep_id else "duplicate",
                end_section=image is group.images[-1],
            )
    console.print(table)
    if not groups:
        console.print(f"no near-duplicates ({seconds:.1f} s)")
        return 0
    images = sum(len(group.images) for group in groups)
    cut = f" (the first {args.limit})" if args.limit is not None and len(groups) == args.limit else ""
    console.print(f"{len(groups)} group{'s' if len(groups) != 1 else ''}{cut}, {images} images, in {seconds:.1f} s")
    return 0


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    width = max(len(name) for name, _ in settings.describe())
    for name, value in settings.describe():
        print(f"{name:<{width}}  {value}")
    return 0


def _read_new_password(args: argparse.Namespace) -> str:
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("New password: ")
    if getpass.getpass("Repeat it: ") != first:
        raise ValueError("The passwords differ.")
    return first


def cmd_admin(args: argparse.Namespace, settings: Settings) -> int:
    from clipgallery import auth, db

    db.migrate(settings)
    with db.session_scope(settings) as session:
        if args.admin_command == "create":
            user = auth.create_user(session, args.username, _read_new_password(args), is_admin=True)
            print(f"created administrator {user.username}")
        elif args.admin_command == "passwd":
            auth.set_password(session, args.username, _read_new_password(args))
            print(f"password of {args.username} changed; their sessions were ended")
        elif args.admin_command == "token":
            user = next((u for u in auth.list_users(session) if u.username == args.username), None)
            if user is None:
                raise ValueError(f"No user named {args.username!r}.")
            ttl = timedelta(days=args.days) if args.days else None
            print(auth.create_api_token(session, user, args.name, ttl))
            print("(shown once; send it as: Authorization: Bearer <token>)", file=sys.stderr)
        else:
            for user in auth.list_users(session):
                print(f"{user.username}{'  (admin)' if user.is_admin else ''}")
    return 0


def cmd_loadtest(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from clipgallery.loadtest import run_load

    report = asyncio.run(
        run_load(args.url, clients=args.clients, seconds=args.seconds, pause=args.pause, mixed=args.mixed)
    )
    for line in report.lines():
        print(line)
    return 0 if report.errors == 0 else 1


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from clipgallery.server import serve

    return serve(settings, port=args.port)


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from clipgallery.evaluation import EvalOptions, run_eval

    options = EvalOptions(
        source=Path(args.source),
        label_column=args.label_column,
        captions=args.captions,
        split=Path(args.split) if args.split else None,
        write_split=Path(args.write_split) if args.write_split else None,
        side=args.side,
        test_fraction=args.test_fraction,
        seed=args.seed,
        prompt_templates=tuple(args.prompt_template or ("a photo of a {}",)),
        queries=Path(args.queries) if args.queries else None,
        query_column=args.query_column,
        query_label_column=args.query_label_column,
        name_template=args.name_template,
        description_template=args.description_template,
        limit=args.limit,
        out_dir=Path(args.out) if args.out else None,
        metrics=tuple(m.strip().lower() for m in args.metrics.split(",") if m.strip()),
        keep_database=args.keep_database,
        progress=not args.quiet,
    )
    report = run_eval(settings, options)
    for line in report.summary_lines():
        print(line)
    print(f"report: {report.markdown_path}\nJSON:   {report.json_path}\nplot:   {report.plot_path}")
    return 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    import shlex

    from clipgallery.bench import BenchOptions, quick_options, run_bench
    from clipgallery.bench_report import write_report

    changes: dict = {"rebuild": args.rebuild, "progress": not args.quiet, "http": not args.no_http}
    changes["command"] = "clipgallery " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a not in ("-v", "--verbose"))
    if args.images:
        changes["images"] = Path(args.images)
    if args.out:
        changes["out"] = Path(args.out)
    if args.sizes:
        changes["sizes"] = tuple(int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip())
    if args.limit:
        changes["image_limit"] = args.limit
    if args.model:
        changes["model_dir"] = Path(args.model)
    if args.recall_queries:
        changes["recall_text_queries"] = Path(args.recall_queries)
    if args.recall_query_column:
        changes["recall_query_column"] = args.recall_query_column
    if args.stages:
        changes["stages"] = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    options = quick_options(**changes) if args.quick else BenchOptions(**changes)
    report = run_bench(options)
    markdown, json_path, plot = write_report(report, options.out)
    print(f"report: {markdown}\nJSON:   {json_path}\nplot:   {plot}")
    return 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from clipgallery.train import TrainOptions, train, training_items

    output = Path(args.out)
    write_split = Path(args.write_split) if args.write_split else output / "split.csv"
    if args.from_gallery:
        from clipgallery.train import gallery_items, hold_out

        items, source = gallery_items(settings)
        items, held = hold_out(items, args.test_fraction, args.seed, write_split if args.test_fraction > 0 else None)
        source = f"{source} ({held})"
    else:
        if not args.source:
            raise ValueError("give a labels or captions CSV (or a folder of class folders), or --from-gallery")
        items, source = training_items(
            Path(args.source),
            label_column=args.label_column,
            captions_csv=args.captions,
            images_dir=Path(args.images_dir) if args.images_dir else None,
            file_column=args.file_column,
            split=Path(args.split) if args.split else None,
            side=args.side,
            test_fraction=args.test_fraction,
            seed=args.seed,
            write_split=None if args.split or args.test_fraction <= 0 else write_split,
        )
    templates = tuple(args.caption or ())
    if not templates and any(item.label for item in items) and not any(item.captions for item in items):
        templates = ("{label}",)
    options = TrainOptions(
        mode=args.mode,
        base=args.base,
        pretrained=args.pretrained,
        image_size=args.image_size,
        width=args.width,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        val_fraction=args.val_fraction,
        max_minutes=args.max_minutes,
        seed=args.seed,
        threads=args.threads if args.threads is not None else settings.torch_threads,
        captions=templates,
        loss=args.loss,
        unlock_text_layers=args.unlock_text_layers,
        text_lr=args.text_lr,
        progress=not args.quiet,
    )
    print(f"training on {source}")
    result = train(items, output, options, source=source)
    print(
        f"wrote {result.architecture} to {output} in {result.seconds:.0f} s "
        f"({result.epochs_run} epochs, best {result.best_epoch}"
        + (f", held-out loss {result.best_val_loss:.3f})" if result.best_val_loss is not None else ")")
    )
    print(f"switch the gallery to it: CLIPGALLERY_MODEL={output.resolve()} clipgallery reembed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipgallery", description="Self-hosted CLIP image search.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start the database, migrate, and serve the web app")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("index", help="add the images of a folder (incremental, resumable)")
    p.add_argument("path")
    p.add_argument("-r", "--recursive", action="store_true", help="include sub-folders")
    p.add_argument("--metadata", metavar="FILE.csv", help="CSV with a file column and name/description columns")
    p.add_argument("--file-column", help="CSV column with the file name or path relative to PATH")
    p.add_argument("--name", metavar="TEMPLATE", help="name from CSV columns, e.g. '{productDisplayName}'")
    p.add_argument("--description", metavar="TEMPLATE", help="description, e.g. '{baseColour} {articleType}'")
    p.add_argument("--prune", action="store_true", help="remove images whose files have vanished")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="search by words, by an image file, or by a stored image")
    p.add_argument("query", nargs="*", help="search words")
    p.add_argument("--image", metavar="FILE", help="search with an image file")
    p.add_argument("--similar", metavar="ID", type=int, help="more like the stored image ID")
    p.add_argument("-k", type=int, default=None, help="number of results")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--min-similarity", type=float, default=None)
    p.add_argument("--metric", choices=["cosine", "l2", "ip", "l1"], default=None)
    p.add_argument("--exact", action="store_true", help="exact sequential scan instead of the HNSW index")
    p.add_argument(
        "--local",
        action="store_true",
        help="search in this process (loading the model) even when `clipgallery serve` is running for this gallery",
    )
    p.add_argument(
        "--hybrid",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fuse words with full-text search over names and descriptions (default: CLIPGALLERY_HYBRID_SEARCH)",
    )
    p.add_argument(
        "--format",
        choices=["table", "json", "paths"],
        default="table",
        help="json: the results with their files, for scripts; paths: one image file per line, best first "
        "(where `index` found it, else the gallery's own copy), e.g. for an image viewer",
    )
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("reembed", help="compute vectors with the configured model (after a model change)")
    p.add_argument("ids", nargs="*", type=int, help="only these image ids (default: all that need it)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_reembed)

    p = sub.add_parser("db", help="database: migrations, psql")
    dbsub = p.add_subparsers(dest="db_command", required=True)
    q = dbsub.add_parser("upgrade", help="apply migrations")
    q.add_argument("revision", nargs="?", default="head")
    q = dbsub.add_parser("downgrade", help="revert migrations")
    q.add_argument("revision", nargs="?", default="-1")
    dbsub.add_parser("current", help="show the schema revision")
    dbsub.add_parser("url", help="print the connection URL (starts the embedded server while it runs)")
    q = dbsub.add_parser("dump", help="back up the database with pg_dump (custom format)")
    q.add_argument("output", help="dump file to write, e.g. backups/gallery.dump")
    q = dbsub.add_parser("restore", help="restore a dump into an empty database")
    q.add_argument("input", help="dump file written by `clipgallery db dump`")
    q = dbsub.add_parser("create-reader", help="create a read-only login role for SQL users")
    q.add_argument("--name", default="clipgallery_reader")
    q.add_argument("--password-stdin", action="store_true", help="read its password from standard input")
    q = dbsub.add_parser("psql", help="open psql on the gallery database (matching client version)")
    q.add_argument("psql_args", nargs="*", help="passed to psql, e.g. -c 'SELECT count(*) FROM images'")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("model", help="model information, or create a random-weight model for trying the app")
    msub = p.add_subparsers(dest="model_command", required=True)
    msub.add_parser("info", help="show the configured model and whether it loads")
    q = msub.add_parser("create", help="write a model directory with random weights")
    q.add_argument("output")
    q.add_argument("--architecture", default="ViT-B-32")
    q.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("admin", help="administrator accounts")
    asub = p.add_subparsers(dest="admin_command", required=True)
    for name, helptext in (("create", "create an administrator"), ("passwd", "set a user's password")):
        q = asub.add_parser(name, help=helptext)
        q.add_argument("username")
        q.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    q = asub.add_parser("token", help="issue an API token to an administrator")
    q.add_argument("username")
    q.add_argument("--name", default="api", help="what the token is for")
    q.add_argument("--days", type=int, default=None, help="expire after this many days (default: never)")
    asub.add_parser("list", help="list users")
    p.set_defaults(func=cmd_admin)

    p = sub.add_parser("eval", help="measure retrieval quality on a labelled image set (separate database)")
    p.add_argument("source", help="labels CSV, captions CSV (--captions) or folder of class folders")
    p.add_argument("--label-column", help="CSV column holding the class, e.g. articleType")
    p.add_argument("--captions", action="store_true", help="SOURCE is a CSV of image,caption rows")
    p.add_argument("--split", metavar="FILE", help="evaluate one side (--side) of this split file")
    p.add_argument("--write-split", metavar="FILE", help="write a seeded stratified split, evaluate --side of it")
    p.add_argument("--side", choices=("train", "test"), default="test", help="split side to evaluate")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prompt-template",
        action="append",
        help="class-name prompt, {} is the class (default 'a photo of a {}'); several: a prompt ensemble",
    )
    p.add_argument("--queries", metavar="FILE", help="CSV of free-text queries and the label each should find")
    p.add_argument("--query-column", help="query column of --queries (default: query or text)")
    p.add_argument("--query-label-column", help="label column of --queries (default: label, class or --label-column)")
    p.add_argument("--name-template", help="stored names from the CSV's columns, e.g. '{productDisplayName}' (hybrid)")
    p.add_argument("--description-template", help="stored descriptions from the CSV's columns (hybrid)")
    p.add_argument("--limit", type=int, help="at most N images, round-robin over classes (quick runs)")
    p.add_argument("--out", metavar="DIR", help="report folder (default reports/<set>-<time>/)")
    p.add_argument("--metrics", default="cosine,l2,ip,l1", help="distance metrics to compare")
    p.add_argument("--keep-database", action="store_true", help="do not drop the evaluation database")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("loadtest", help="concurrent clients against a running app (loopback)")
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--pause", type=float, default=0.5, help="seconds between a client's requests")
    p.add_argument("--mixed", action="store_true", help="also image queries and page loads")
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser("bench", help="measure ingest, query and index speed side by side (writes docs/benchmarks.md)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="256 images, 10k vectors; no 1M, no graph-density study or allocator diagnostic, memory of the "
        "shipped setting only (≈ 4.5 minutes)",
    )
    p.add_argument("--out", metavar="FILE.md", help="report (default docs/benchmarks.md; .json, .png beside it)")
    p.add_argument("--images", metavar="DIR", help="images to ingest (default: the shared imagenette_val1k set)")
    p.add_argument("--limit", type=int, help="use at most N of the images")
    p.add_argument("--sizes", help="stored-vector counts, e.g. 10000,100000,1000000")
    p.add_argument("--model", metavar="DIR", help="model directory (default: a random-weight ViT-B-32)")
    p.add_argument("--stages", help="comma-separated subset of ingest,text,index")
    p.add_argument(
        "--recall-queries",
        metavar="CSV",
        help="text queries for the recall curves (a query column), e.g. docs/queries/fashion_label_free.csv",
    )
    p.add_argument(
        "--recall-query-column", help="the column of --recall-queries with the queries (default: query, text)"
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="rebuild the kept large databases and measure the kept sensitivity study again (.state/bench)",
    )
    p.add_argument("--no-http", action="store_true", help="skip the HTTP measurement")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "sweep-files",
        help="delete stored files no image refers to, walking them all (after restoring an older database dump)",
    )
    p.add_argument(
        "--min-age", type=float, default=600.0, help="spare files younger than this many seconds (default 600)"
    )
    p.set_defaults(func=cmd_sweep_files)

    p = sub.add_parser("status", help="database and model health")
    p.add_argument(
        "--local", action="store_true", help="load the model here even when `clipgallery serve` runs for this gallery"
    )
    p.set_defaults(func=cmd_status)
    sub.add_parser("config", help="print the settings in force").set_defaults(func=cmd_config)

    p = sub.add_parser("duplicates", help="list groups of near-duplicate images (by their vectors)")
    threshold = p.add_mutually_exclusive_group()
    threshold.add_argument(
        "--threshold", type=float, metavar="D", help="largest cosine distance (default CLIPGALLERY_DUPLICATE_DISTANCE)"
    )
    threshold.add_argument("--min-similarity", type=float, metavar="S", help="smallest similarity, i.e. 1 - D")
    p.add_argument("--limit", type=int, metavar="N", help="at most N groups, tightest first")
    p.add_argument("--neighbours", type=int, default=10, help="nearest images compared with each image")
    p.add_argument(
        "--ef-search", type=int, help="HNSW search breadth per image (default: CLIPGALLERY_HNSW_EF_SEARCH_IMAGE, 40)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_duplicates)

    p = sub.add_parser("train", help="train a model on your own images and captions (writes a model directory)")
    p.add_argument("source", nargs="?", help="labels CSV, captions CSV (--captions) or folder of class folders")
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    p.add_argument("--from-gallery", action="store_true", help="train on the gallery's images, names, descriptions")
    p.add_argument("--label-column", help="label column of a labels CSV, e.g. articleType")
    p.add_argument("--captions", action="store_true", help="SOURCE is a captions CSV (image, caption)")
    p.add_argument("--images-dir", help="folder the CSV's file names are relative to (default: <csv dir>/images)")
    p.add_argument("--file-column", help="CSV column with the file name")
    p.add_argument(
        "--caption",
        action="append",
        metavar="TEMPLATE",
        help="caption template over CSV columns, repeatable, e.g. '{baseColour} {articleType}' (default: '{label}')",
    )
    p.add_argument("--split", help="key,split file: train on --side of it (see `clipgallery eval --write-split`)")
    p.add_argument("--side", choices=["train", "test"], default="train")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held out when no --split is given (0: none)")
    p.add_argument("--write-split", help="where to write that split (default: DIR/split.csv)")
    p.add_argument("--mode", choices=["lit", "finetune"], default="lit", help="lit: locked MiniLM text tower")
    p.add_argument("--base", default="ViT-B-32", help="finetune: open_clip architecture or model directory")
    p.add_argument("--pretrained", help="finetune: pretrained tag or checkpoint file")
    p.add_argument("--image-size", type=int, default=64, help="lit: image size in pixels")
    p.add_argument("--width", type=int, default=24, help="lit: image tower (ModifiedResNet) width")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--patience", type=int, default=40, help="epochs without a better held-out loss, in the 2nd half (40: none)"
    )
    p.add_argument(
        "--loss",
        choices=["multi-positive", "clip"],
        default="multi-positive",
        help="multi-positive: a caption is a positive of every image in the batch it is true of; clip: ClipLoss",
    )
    p.add_argument(
        "--unlock-text-layers",
        type=int,
        default=0,
        metavar="N",
        help="lit: also train the top N MiniLM layers, at --text-lr (default 0: the text tower stays locked)",
    )
    p.add_argument("--text-lr", type=float, default=2e-5, help="lit: learning rate of the unlocked text layers")
    p.add_argument("--val-fraction", type=float, default=0.1, help="of the training images, for early stopping")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (on a busy machine 1 can be fastest)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the input's or the environment's fault: one line, no traceback.
    Imported only once one has happened, so that a command starts without loading every module
    (a search answered by the running app needs few of them)."""
    from clipgallery.auth import PermissionDenied
    from clipgallery.bulk import IndexingError
    from clipgallery.db import DatabaseError
    from clipgallery.embedding import ModelUnavailableError
    from clipgallery.gallery import ModelMismatchError, NotFoundError
    from clipgallery.imaging import RejectedImage
    from clipgallery.search import InvalidQuery

    return (
        ConfigError,
        DatabaseError,
        ModelUnavailableError,
        ModelMismatchError,
        NotFoundError,
        InvalidQuery,
        IndexingError,
        RejectedImage,
        FileNotFoundError,
        IsADirectoryError,
        ValueError,
        PermissionDenied,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    psql_args: list[str] = []
    for i in range(len(argv) - 1):
        if argv[i : i + 2] == ["db", "psql"]:
            # Everything after `db psql` belongs to psql itself (-c, -f, -x ...).
            argv, psql_args = argv[: i + 2], argv[i + 2 :]
            break
    args = build_parser().parse_args(argv)
    if psql_args:
        args.psql_args = psql_args
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = get_settings()
        return args.func(args, settings)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
