"""Alembic environment: the URL and settings come from clipgallery's own configuration, so
`alembic upgrade head`, `clipgallery db upgrade` and app start-up all migrate the same database."""

from logging.config import fileConfig

from alembic import context
from sqlmodel import SQLModel

import clipgallery.models  # noqa: F401  (registers every table on SQLModel.metadata)
from clipgallery import db
from clipgallery.config import get_settings

config = context.config
if config.config_file_name is not None and not config.attributes.get("settings"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

settings = config.attributes.get("settings") or get_settings()
config.attributes["settings"] = settings
target_metadata = SQLModel.metadata


def compare_type(context, inspected_column, metadata_column, inspected_type, metadata_type):
    # The vector column's dimension is chosen per gallery (by the model), not by the model classes.
    from pgvector.sqlalchemy import Vector

    if isinstance(metadata_type, Vector):
        return type(inspected_type).__name__.upper() not in ("VECTOR", "HALFVEC")
    return None


def include_object(obj, name, type_, reflected, compare_to):
    # The HNSW index is created by the migration with the configured operator class and
    # parameters; autogenerate must not drop it because the model classes do not declare it.
    return not (type_ == "index" and reflected and name and name.endswith("_hnsw"))


def run_migrations_offline() -> None:
    context.configure(
        url=db.database_url(settings) if not settings.database_url else settings.database_url,
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=compare_type,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = db.get_engine(settings)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            compare_type=compare_type,
            include_object=include_object,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
