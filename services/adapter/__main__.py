"""``python -m services.adapter``: one RabbitMQ worker that screens studies with Triton.

Settings come from configs/config.yaml and CTS__ environment overrides (the inference
backend is forced to Triton unless ``--backend`` says otherwise). Stops cleanly on SIGTERM
or Ctrl-C: the study in progress is finished (up to ``--drain-timeout``) or given back.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
from pathlib import Path

from services.core.config import load_settings
from services.core.process_memory import apply_memory_settings
from services.monitoring.runner import ServiceRun, prepare_process, run_service


def _parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.adapter", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="default: configs/config.yaml")
    parser.add_argument("--adapter-id", default=None, help="name in logs and results")
    parser.add_argument(
        "--backend",
        choices=("triton", "onnxruntime"),
        default="triton",
        help="inference backend (default triton; onnxruntime runs the models in-process)",
    )
    parser.add_argument(
        "--health-file",
        type=Path,
        default=Path("/tmp/cts-adapter.alive"),
        help="touched every few seconds while the I/O loop runs (container health check)",
    )
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = _parse_arguments(argv)
    settings = load_settings(arguments.config)
    settings.inference.backend = arguments.backend
    prepare_process(settings)
    apply_memory_settings(settings.memory)
    # Imported only now: numpy's import starts threads, and the memory policy must come
    # before any (services/core/process_memory.py).
    from services.adapter.consumer import Adapter, default_adapter_id
    from services.adapter.housekeeping import use_own_temp_dir

    adapter = Adapter(
        settings,
        adapter_id=arguments.adapter_id or default_adapter_id(),
        health_file=arguments.health_file,
        drain_timeout_s=arguments.drain_timeout,
    )

    def serve(_stop: threading.Event) -> None:
        # Unpacked studies go to a folder of this process: if it is killed mid-study, the
        # other adapters find and remove them (services/adapter/housekeeping.py).
        temp_dir = use_own_temp_dir()
        try:
            adapter.run()  # until request_stop, which the stop signals call
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)

    run = ServiceRun(
        name=f"adapter {adapter.adapter_id}",
        settings=settings,
        metrics_port=settings.metrics.adapter_port,
        on_stop=adapter.request_stop,
    )
    return run_service(run, serve)


if __name__ == "__main__":
    sys.exit(main())
