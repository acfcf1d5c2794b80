"""The FiftyOne App on 127.0.0.1: the samples grid beside the Embeddings panel, until Ctrl+C
or SIGTERM, after which the App's server is stopped before the process exits (otherwise
FiftyOne's server process outlives it for minutes).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import fiftyone as fo
from loguru import logger

APP_ADDRESS = "127.0.0.1"  # never another interface: the App has no login
DEFAULT_PORT = 5151  # FiftyOne's own default


def app_spaces() -> fo.Space:
    """The grid of samples on the left, the Embeddings panel on the right."""
    return fo.Space(
        children=[
            fo.Panel(type="Samples", pinned=True),
            fo.Panel(type="Embeddings"),
        ],
        orientation="horizontal",
    )


def app_url(port: int, dataset_name: str) -> str:
    return f"http://{APP_ADDRESS}:{port}/datasets/{dataset_name}"


def serve_app(dataset: fo.Dataset, port: int, *, stop: threading.Event | None = None) -> None:
    """Serves the App until ``stop`` is set, SIGTERM arrives or Ctrl+C is pressed."""
    stop = stop or threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {
        number: signal.signal(number, _on_signal) for number in (signal.SIGTERM, signal.SIGINT)
    }
    session = fo.launch_app(
        dataset, port=port, address=APP_ADDRESS, remote=True, auto=False, spaces=app_spaces()
    )
    try:
        print(f"FiftyOne App: {app_url(port, dataset.name)}  (Ctrl+C stops it)", flush=True)
        while not stop.wait(timeout=1.0):
            pass
    finally:
        logger.info("stopping the FiftyOne App")
        session.close()
        for number, handler in previous.items():
            signal.signal(number, handler)
