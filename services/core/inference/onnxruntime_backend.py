"""Embedded inference: the encoder and both heads as ONNX Runtime sessions in this process.

Reads the same model repository Triton serves (``<model>/1/model.onnx`` of
ct_clip_encoder, binary_head and multilabel_head, plus the metadata), so both
backends run identical graphs. When the metadata lists a body-part regression model, its
graph runs in a fourth session (``body_part_model``).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

# onnxruntime >= 1.30 ships telemetry on Linux too: on import it writes a session file to
# the temporary folder and a device id and event store under ~/.cache, and tries to upload
# to Microsoft. A screening service must not phone home; the switch only works when set
# before onnxruntime initialises, hence before the import.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np
import onnxruntime as ort
from loguru import logger

from services.core.arrays import AnyArray, BprSlices, Float32Array, ModelInput
from services.core.body_part.bpr_detector import BodyPartRegressionModel
from services.core.config import InferenceSettings
from services.core.errors import ModelRepositoryError
from services.core.inference.base import ModelOutputs, checked_model_input, model_outputs
from services.core.inference.body_part import (
    SCORES_OUTPUT,
    SLICES_INPUT,
    body_part_model,
    body_part_onnx_path,
)
from services.core.inference.optimised_graphs import create_session
from services.core.model_metadata import (
    BINARY_HEAD_NAME,
    ENCODER_NAME,
    MULTILABEL_HEAD_NAME,
    ModelMetadata,
    metadata_path,
    read_metadata,
)

ONNX_RELATIVE_PATH = Path("1") / "model.onnx"
BUILD_HINT = (
    "build it with `python -m convertation.build_repository --output {repository} --demo` "
    "(demo weights) or convert real weights as the README describes"
)
# Preferred output names; when a graph has none of them its first output is used.
EMBEDDING_OUTPUTS = ("embedding",)
PATHOLOGY_OUTPUTS = ("pathology_probability", "probabilities", "probability")
FINDING_OUTPUTS = ("finding_probabilities", "probabilities", "probability")


def onnx_paths(repository: Path) -> dict[str, Path]:
    return {
        name: Path(repository) / name / ONNX_RELATIVE_PATH
        for name in (ENCODER_NAME, BINARY_HEAD_NAME, MULTILABEL_HEAD_NAME)
    }


def check_repository(repository: Path) -> None:
    """Raise ModelRepositoryError naming every missing file and how to build them."""
    repository = Path(repository)
    hint = BUILD_HINT.format(repository=repository)
    if not repository.is_dir():
        raise ModelRepositoryError(f"model repository {repository} does not exist: {hint}")
    required = [metadata_path(repository), *onnx_paths(repository).values()]
    missing = [str(path.relative_to(repository)) for path in required if not path.is_file()]
    if missing:
        raise ModelRepositoryError(
            f"model repository {repository} is incomplete (missing {', '.join(missing)}): {hint}"
        )


def session_options(intra_op_threads: int, *, spinning: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = max(int(intra_op_threads), 0)
    options.inter_op_num_threads = 1
    # Idle pool threads sleep instead of spinning: on a host shared with other processes a
    # spinning thread holds a core while the thread it waits for cannot run, and every
    # spin counts as CPU time (benchmarks/README.md: the encoder 21 -> 13 s median on a
    # loaded 2-core host, fewer core-seconds per study).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # The encoder runs the same shapes every time: reuse the planned memory layout.
    options.enable_mem_pattern = True
    options.enable_cpu_mem_arena = True
    options.log_severity_level = 3
    return options


def _providers() -> list[str]:
    available = ort.get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider",) if p in available]
    return [*preferred, "CPUExecutionProvider"]


def _output_name(session: ort.InferenceSession, preferred: tuple[str, ...]) -> str:
    names = [output.name for output in session.get_outputs()]
    for name in preferred:
        if name in names:
            return name
    return names[0]


def _fixed_batch(session: ort.InferenceSession) -> int | None:
    batch = session.get_inputs()[0].shape[0]
    return batch if isinstance(batch, int) else None


class OnnxRuntimeBackend:
    """The InferenceBackend that runs the three ONNX graphs with onnxruntime.

    The repository and its metadata are checked here; the sessions are created on a
    background thread (the body-part regression model first: the chest check needs it
    before the encoder), so that a process's first study is read, checked and
    preprocessed while the models load. A session is awaited when it is first used; a
    model that cannot be loaded raises ModelRepositoryError there.
    """

    name = "onnxruntime"

    def __init__(self, repository: Path, settings: InferenceSettings) -> None:
        self.repository = Path(repository)
        check_repository(self.repository)
        self.metadata: ModelMetadata = read_metadata(self.repository)
        self._settings = settings
        self._providers = _providers()
        # From the providers this onnxruntime offers: one whose CUDA provider cannot start
        # (no GPU, no CUDA libraries) falls back to the CPU and is still counted as off it;
        # only where the batch makes its SR skeletons depends on it (services/batch/sr_files.py).
        self.computes_on_this_cpu = self._providers == ["CPUExecutionProvider"]
        self.session_starts: dict[str, str] = {}  # model -> cached / saved / uncached
        self._outputs: dict[str, str] = {}
        paths = dict(onnx_paths(self.repository))
        info = self.metadata.body_part_regression
        if info is not None:
            path = body_part_onnx_path(self.repository, info)
            if not path.is_file():
                raise ModelRepositoryError(
                    f"model repository {self.repository} lists a body-part regression model "
                    f"but {path.relative_to(self.repository)} is missing: "
                    + BUILD_HINT.format(repository=self.repository)
                )
            paths = {info.model: path, **paths}
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-load")
        self._sessions: dict[str, Future[ort.InferenceSession]] = {
            name: self._loader.submit(self._load, name, path) for name, path in paths.items()
        }
        self._loader.shutdown(wait=False)  # the thread ends when the last model is loaded
        self.body_part_model = self._body_part_model()
        logger.info(
            "onnxruntime backend: repository {}, flavour {}, demo {}, providers {}, "
            "body-part regression {}; models loading in the background",
            self.repository,
            self.metadata.flavour,
            self.metadata.demo,
            self._providers,
            _body_part_state(self.body_part_model),
        )

    def _load(self, name: str, path: Path) -> ort.InferenceSession:
        started = time.perf_counter()
        settings = self._settings

        def options() -> ort.SessionOptions:
            return session_options(
                settings.onnx_intra_op_threads, spinning=settings.onnx_thread_spinning
            )

        session, how = create_session(
            path, options, self._providers, use_cache=settings.onnx_graph_cache
        )
        self.session_starts[name] = how
        logger.debug("{} loaded in {:.2f} s ({})", name, time.perf_counter() - started, how)
        return session

    def session(self, name: str) -> ort.InferenceSession:
        """The model's session, waiting for the background load if it is still running."""
        try:
            return self._sessions[name].result()
        except Exception as error:
            raise ModelRepositoryError(
                f"model repository {self.repository}: {name} cannot be loaded by onnxruntime: "
                f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            ) from error

    def wait_until_loaded(self) -> None:
        """Wait for every session (raises ModelRepositoryError like `session`)."""
        for name in self._sessions:
            self.session(name)

    def _body_part_model(self) -> BodyPartRegressionModel | None:
        info = self.metadata.body_part_regression
        if info is None:
            return None
        path = body_part_onnx_path(self.repository, info)

        def score_batch(slices: BprSlices) -> AnyArray:
            return self.session(info.model).run([SCORES_OUTPUT], {SLICES_INPUT: slices})[0]

        return body_part_model(
            score_batch, self.repository, info, source=f"onnxruntime {path.name} of {info.model}"
        )

    def _output(self, model: str, preferred: tuple[str, ...]) -> str:
        if model not in self._outputs:
            self._outputs[model] = _output_name(self.session(model), preferred)
        return self._outputs[model]

    def _run(self, model: str, preferred: tuple[str, ...], array: Float32Array) -> AnyArray:
        session = self.session(model)
        output = self._output(model, preferred)
        input_name = session.get_inputs()[0].name
        fixed = _fixed_batch(session)
        if fixed is None or fixed == array.shape[0]:
            return session.run([output], {input_name: array})[0]
        if fixed != 1:
            raise ValueError(f"{model} takes batches of {fixed}, got {array.shape[0]}")
        # A graph exported with batch 1 runs the batch one study at a time.
        parts = [
            session.run([output], {input_name: array[i : i + 1]})[0] for i in range(len(array))
        ]
        return np.concatenate(parts)

    def infer(self, volume: ModelInput) -> ModelOutputs:
        volume = checked_model_input(volume, self.metadata)
        embedding = self._run(ENCODER_NAME, EMBEDDING_OUTPUTS, volume).astype(np.float32)
        pathology = self._run(BINARY_HEAD_NAME, PATHOLOGY_OUTPUTS, embedding)
        findings = self._run(MULTILABEL_HEAD_NAME, FINDING_OUTPUTS, embedding)
        return model_outputs(
            embedding, pathology, findings, batch=len(volume), metadata=self.metadata
        )

    def close(self) -> None:
        for future in self._sessions.values():
            future.cancel()
        for future in self._sessions.values():
            if not future.cancelled():
                future.exception()  # wait for a load in progress; its error does not matter
        self._sessions.clear()


def _body_part_state(model: BodyPartRegressionModel | None) -> str:
    if model is None:
        return "none (the chest check uses lung_air)"
    return "DEMO (shown, never decides)" if model.demo else "on"
