"""``python -m services.registry``: the study registry's commands.

    upgrade                   apply the migrations (every deployment, before the services start)
    import-storage            bring results already in the storage root into the registry
    purge [--dry-run]         apply registry.retention_days: images and identity of old studies
    record                    record what the adapters report (as the frontend does, for a
                              deployment whose frontends set registry.record_results: false)
    export-reviews OUT_DIR    the reviews as training labels and embeddings (review_export.py)
    users ... | keys ... | audit ...
                              accounts, API keys and the audit trail (admin_commands.py)

Settings from configs/config.yaml and CTS__ overrides (``registry.url``, ``storage.root``).
Exit status 0, or 2 with a one-line reason.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from loguru import logger
from sqlalchemy.exc import SQLAlchemyError

from services.core.config import load_settings
from services.core.errors import ConfigurationError
from services.core.logging_setup import configure_logging
from services.registry import admin_commands
from services.registry.accounts import AccountError
from services.registry.database import database_url, describe
from services.registry.database import upgrade as upgrade_database

USAGE_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.registry", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", type=Path, default=None, help="default: configs/config.yaml")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("upgrade", help="apply the migrations")
    commands.add_parser("import-storage", help="results in the storage root -> the registry")
    purge = commands.add_parser("purge", help="apply registry.retention_days")
    purge.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    commands.add_parser("record", help="record the adapters' reports until stopped")
    export = commands.add_parser(
        "export-reviews", help="labels.csv and embeddings.parquet for training train"
    )
    export.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    admin_commands.add_parsers(commands)
    return parser


def record(settings_path: Path | None) -> int:
    """The recorder as a service of its own, until SIGTERM or Ctrl-C."""
    from services.monitoring.runner import ServiceRun, run_service
    from services.registry.recorder import RegistryRecorder
    from services.registry.registry import Registry

    settings = load_settings(settings_path)
    configure_logging(settings.logging.level)
    registry = Registry.open(settings)
    recorder = RegistryRecorder(settings, registry)

    def serve(stop: threading.Event) -> None:
        recorder.start()
        try:
            stop.wait()
        finally:
            recorder.stop()
            registry.close()

    # No metrics port of its own: the frontend's /metrics counts recorded results.
    run = ServiceRun(name="registry recorder", settings=settings, metrics_port=0)
    settings.metrics.enabled = False
    return run_service(run, serve)


def upgrade(settings_path: Path | None) -> int:
    url = database_url(load_settings(settings_path))
    upgrade_database(url)
    logger.info("registry {} is at the newest schema", describe(url))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    configure_logging("INFO")
    try:
        if arguments.command == "upgrade":
            return upgrade(arguments.config)
        if arguments.command == "record":
            return record(arguments.config)
        settings = load_settings(arguments.config)
        if arguments.command in ("users", "keys", "audit"):
            from services.registry.registry import Registry

            registry = Registry.open(settings)
            try:
                return admin_commands.run(arguments, registry)
            finally:
                registry.close()
        if arguments.command == "export-reviews":
            from services.registry.registry import Registry
            from services.registry.review_export import export_reviews

            registry = Registry.open(settings)
            try:
                exported = export_reviews(registry, settings.storage.root, arguments.out_dir)
            finally:
                registry.close()
            print(exported.summary())
            return 0
        if arguments.command == "import-storage":
            from services.registry.import_storage import import_storage

            report = import_storage(settings)
            print(report.summary())
            return 0
        from services.registry.retention import purge

        outcome = purge(settings, dry_run=arguments.dry_run)
        print(outcome.summary())
        return 0
    except (ConfigurationError, AccountError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except SQLAlchemyError as error:  # the database is away: say so on one line
        print(
            f"error: the registry cannot be asked ({type(error).__name__}): is its database up?",
            file=sys.stderr,
        )
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
