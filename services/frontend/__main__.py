"""``python -m services.frontend``: the web UI of the stack (Gradio), on 127.0.0.1:7860 unless
configured (frontend.host / frontend.port, or CTS__FRONTEND__HOST / CTS__FRONTEND__PORT).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Any

# No telemetry from a hospital network (and these machines have no internet anyway).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from loguru import logger

from services.broker.storage import RESULTS_DIR
from services.core.config import load_settings
from services.core.errors import ConfigurationError
from services.core.logging_setup import configure_logging
from services.frontend.service import FrontendService
from services.frontend.sessions import DOWNLOADS_DIR, FRONTEND_DIR
from services.monitoring.runner import ServiceRun, run_service


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """``user:password`` -> (user, password); None keeps the page open."""
    if not auth:
        return None
    user, separator, password = auth.partition(":")
    if not separator or not user or not password:
        raise ValueError("frontend.auth must look like 'user:password'")
    return user, password


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.frontend", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="default: configs/config.yaml")
    arguments = parser.parse_args(argv)
    settings = load_settings(arguments.config)
    configure_logging(settings.logging.level)

    root = settings.storage.root
    # Gradio keeps uploads here until the study is queued (then they are moved next to it,
    # on the same file system); refused leftovers are swept after a day (see app.py).
    os.environ.setdefault("GRADIO_TEMP_DIR", str(root / "frontend" / "incoming"))
    from services.frontend.api import build_rest_api
    from services.frontend.app import build_app

    try:
        service = FrontendService(settings)
    except ConfigurationError as error:  # e.g. the registry's schema is not this code's
        logger.error("not started: {}", error)
        return 2
    app = build_app(service)

    def serve(stop: threading.Event) -> None:
        service.start()
        try:
            _launch(app, service, build_rest_api(service))
            stop.wait()
            app.close()
        finally:
            service.stop()

    run = ServiceRun(
        name="frontend", settings=settings, metrics_port=settings.metrics.frontend_port
    )
    return run_service(run, serve)


def _launch(app: Any, service: FrontendService, rest_api: Any) -> None:
    """The page and the REST API on one server, in threads of their own."""
    from starlette.routing import Mount

    from services.frontend.api import API_PREFIX
    from services.frontend.app import PAGE_CSS

    settings = service.settings
    root = settings.storage.root
    app.launch(
        server_name=settings.frontend.host,
        server_port=settings.frontend.port,
        auth=parse_auth(settings.frontend.auth),
        max_file_size=f"{settings.frontend.max_upload_mb}mb",
        # Only results and the viewers' downloads are served; uploads never leave the server.
        allowed_paths=[str(root / RESULTS_DIR), str(root / FRONTEND_DIR / DOWNLOADS_DIR)],
        blocked_paths=[str(root / "uploads"), str(root / "frontend" / "browser_state_secret")],
        prevent_thread_lock=True,
        quiet=True,
        footer_links=[],
        css=PAGE_CSS,
        # The REST API (services/frontend/api/): routes given to the app's constructor come first.
        app_kwargs={"routes": [Mount(API_PREFIX, app=rest_api)]},
    )
    logger.info(
        "frontend {} on http://{}:{} (registry {})",
        service.instance_id,
        settings.frontend.host,
        settings.frontend.port,
        service.registry.describe(),
    )


if __name__ == "__main__":
    sys.exit(main())
