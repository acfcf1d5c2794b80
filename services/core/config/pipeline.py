"""Settings of the screening itself: intake limits, series choice, data quality, the chest
check, the model and memory."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from services.core.config.base import Backoff, Section, resolve_path


class IntakeSettings(Section):
    """Limits that protect a worker from hostile or broken archives."""

    max_uncompressed_bytes: int = Field(8 * 1024**3, description="unpacked bytes per input")
    max_files: int = Field(20_000, description="files per input, archives included")
    max_compression_ratio: float = Field(200.0, description="zip-bomb guard, per archive member")
    max_nesting_depth: int = Field(3, description="archives inside archives")
    # 450 M is about 1700 slices of 512x512, within a 3 GB worker budget (about 1.6 bytes
    # of memory per byte of the float32 volume).
    max_series_voxels: int = Field(
        450_000_000,
        description="rows x columns x slices of one series, checked before pixels are read",
    )
    ct_rate_metadata: Path | None = Field(
        None,
        description="CT-RATE metadata CSV: NIfTI files named in it are read as CT-CLIP reads them",
    )


class SeriesSelectionSettings(Section):
    min_slices: int = Field(20, description="fewer images: not a usable volume")
    min_slice_thickness_mm: float = Field(0.5, description="preferred range of slice thickness")
    max_slice_thickness_mm: float = 5.0
    min_axial_cosine: float = Field(0.9, description="|slice normal . z| of an axial series")


class QualitySettings(Section):
    """Thresholds above which a data-quality finding becomes a warning or a failure."""

    spacing_tolerance_fraction: float = Field(
        0.1, description="a gap off the nominal spacing by more than this is uneven"
    )
    max_missing_slices_percent: float = Field(20.0, description="more missing: Failure")
    # Kept below acos(min_axial_cosine) = 25.8 degrees so that a steeper tilt is refused by
    # one rule (not axial), not by two that disagree.
    max_gantry_tilt_degrees: float = Field(25.0, description="more tilt: Failure")


class ChestCheckSettings(Section):
    min_coverage_mm: float = Field(80.0, description="a chest needs this much along the body")
    detector: str = Field("lung_air", description="image detector (services/core/body_part)")
    lung_min_extent_fraction: float = Field(0.3, description="slices that must show lungs")
    lung_min_area_fraction: float = Field(0.02, description="lung area / body area on a slice")
    body_part_regression: bool = Field(
        True, description="also ask the repository's body-part regression model, if it has one"
    )
    # The network costs ~10 GFLOP per slice: a few slices (the ends included) find the landmarks.
    bpr_slice_spacing_mm: float = Field(
        80.0, gt=0, description="body-part regression scores slices at most this far apart"
    )
    bpr_max_slices: int = Field(4, ge=2, description="...and at most this many per series")


class InferenceSettings(Section):
    backend: Literal["onnxruntime", "triton"] = Field(
        "onnxruntime", description="onnxruntime (embedded) | triton (stack)"
    )
    model_repository: Path = Field(Path("model_repository_running"), validate_default=True)
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "chest_screening"
    triton_timeout_s: float = Field(120.0, description="one request; a timeout is retried...")
    # Below RabbitMQ's consumer_timeout (30 min), after which the broker takes the task back.
    model_server_wait_limit_s: float = Field(
        1200.0, description="...until the study has waited this long: Failure row"
    )
    model_server_backoff: Backoff = Field(
        Backoff(initial_s=1.0, maximum_s=30.0),
        description="waits while the model server is down (an adapter starting, a study)",
    )
    triton_ready_backoff: Backoff = Field(
        Backoff(initial_s=0.2, maximum_s=5.0),
        description="polls while Triton loads its models",
    )
    # Triton may hold a region for a moment after answering ("currently in use").
    shared_memory_release_backoff: Backoff = Field(
        Backoff(initial_s=0.01, maximum_s=1.0, give_up_after_s=1.5),
        description="retries of unregistering a shared-memory region",
    )
    triton_transport: Literal["grpc", "shared_memory", "auto"] = Field(
        "auto", description="auto: shared memory when Triton is on this host"
    )
    onnx_intra_op_threads: int = Field(
        0, description="0: onnxruntime uses every core (start.sh sets cores / adapters)"
    )
    onnx_thread_spinning: bool = Field(
        False, description="idle onnxruntime threads spin (a dedicated host) or sleep"
    )
    onnx_graph_cache: bool = Field(
        True, description="save the optimised graph beside the model; later starts load it"
    )
    pathology_threshold: float | None = Field(None, description="null: the repository's default")
    finding_thresholds: dict[str, float] = Field(
        default_factory=dict, description='e.g. {"Lung nodule": 0.4}'
    )

    @field_validator("model_repository")
    @classmethod
    def _absolute_repository(cls, value: Path) -> Path:
        return resolve_path(value)


class MemorySettings(Section):
    """How the batch and adapter processes treat memory they free (glibc only)."""

    # Every study allocates the same few hundred MB again, and on virtual machines the first
    # touch of fresh pages costs about a second per GB (see benchmarks/README.md).
    keep_freed_memory: bool = Field(
        True, description="reuse freed memory for the next study (resident size stays at peak)"
    )
    # numpy asks the kernel for 2 MB pages for every array of 4 MB or more. Where those pages
    # are costly to find (virtual machines that hand freed memory back to their host), a new
    # process's first volume and model input took 1.4-1.9 s instead of 0.55 s; later studies
    # reuse kept memory and gain at most 6% from huge pages (benchmarks/README.md, "Cold
    # start, 2026-12-06 09:30-10:05 UTC").
    numpy_huge_pages: bool = Field(
        False, description="let numpy ask for transparent huge pages for large arrays"
    )
