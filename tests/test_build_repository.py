"""The Triton model repository builder: every flavour that can be built here, from the tiny
CTViT config with the real encoder, heads and ONNX export; configs parsed with Triton's
own ModelConfig protobuf (from tritonclient); metadata checked against the files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from convertation.build_repository import build_repository, main, target_spacing_for
from convertation.model_sources import ModelSet, demo_models, sha256_of
from convertation.python_backend import TEMPLATE_MODEL_PY
from convertation.triton_config import Flavour, config_text, flavour_header, model_configs
from convertation.vit.ctvit_config import FULL_CTVIT_CONFIG, FULL_DIM_LATENT
from services.core.labels import FINDING_LABELS, SEVERITY_ORDER
from services.core.model_metadata import (
    BINARY_HEAD_NAME,
    ENCODER_NAME,
    ENSEMBLE_NAME,
    MULTILABEL_HEAD_NAME,
    read_metadata,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = PROJECT_ROOT / "tests" / "data" / "ctvit_tiny.json"
COMMITTED_REPOSITORY = PROJECT_ROOT / "model_repository_running"
TINY_DOCUMENT = json.loads(TINY_CONFIG.read_text())
TINY_SHAPE = tuple(TINY_DOCUMENT["input_shape"][2:])  # (D, H, W)
TINY_EMBEDDING = TINY_DOCUMENT["dim_latent"]
SEED = 3
MODELS = (ENCODER_NAME, BINARY_HEAD_NAME, MULTILABEL_HEAD_NAME, ENSEMBLE_NAME)
FP32 = model_config_pb2.DataType.Value("TYPE_FP32")


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def run_chain(repository: Path, volume: np.ndarray) -> dict[str, np.ndarray]:
    """The three ONNX files run directly with onnxruntime: encoder, then both heads."""

    def session(model: str) -> ort.InferenceSession:
        path = repository / model / "1" / "model.onnx"
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    (embedding,) = session(ENCODER_NAME).run(None, {"volume": volume})
    (pathology,) = session(BINARY_HEAD_NAME).run(None, {"embedding": embedding})
    (findings,) = session(MULTILABEL_HEAD_NAME).run(None, {"embedding": embedding})
    return {
        "embedding": embedding,
        "pathology_probability": pathology,
        "finding_probabilities": findings,
    }


@pytest.fixture(scope="module")
def tiny_models() -> ModelSet:
    return demo_models(SEED, TINY_CONFIG)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_models: ModelSet):
    """One tiny repository per flavour, with the build results."""
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        # The builder looks trtexec up through $TRTEXEC: name one that exists nowhere, so the
        # "no TensorRT here" path is what runs, on a machine with TensorRT too.
        patch.setenv("TRTEXEC", "trtexec-not-installed")
        for flavour in Flavour:
            repository = tmp_path_factory.mktemp(f"repo_{flavour.value}")
            results[flavour] = build_repository(repository, flavour, tiny_models)
    return results


# --------------------------------------------------------------------------- pure helpers


def test_spacing_keeps_the_contract_field_of_view() -> None:
    assert target_spacing_for((240, 480, 480)) == (1.5, 0.75, 0.75)
    assert target_spacing_for((12, 40, 40)) == (30.0, 9.0, 9.0)
    with pytest.raises(ValueError, match="expected a positive"):
        target_spacing_for((0, 40, 40))


def test_rendered_config_round_trips_through_the_protobuf() -> None:
    configs = model_configs(Flavour.ONNXRUNTIME, (240, 480, 480), 512)
    text = config_text(configs[ENCODER_NAME], header="a header\nover two lines")
    parsed = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert parsed.name == ENCODER_NAME
    assert list(parsed.input[0].dims) == [1, 240, 480, 480]
    assert list(parsed.output[0].dims) == [512]
    assert text.startswith("# a header\n# over two lines\n")
    assert parsed == configs[ENCODER_NAME]


@pytest.mark.parametrize("name", MODELS)
def test_committed_configs_are_what_the_builder_writes(name: str) -> None:
    """model_repository_running/*/config.pbtxt are tracked: they must not drift from the code.

    Regenerate them with `python -m convertation.build_repository --output
    model_repository_running --flavour python --demo` (the full CT-CLIP shape).
    """
    configs = model_configs(Flavour.PYTHON, FULL_CTVIT_CONFIG.volume_shape, FULL_DIM_LATENT)
    expected = config_text(configs[name], header=flavour_header(Flavour.PYTHON))
    assert (COMMITTED_REPOSITORY / name / "config.pbtxt").read_text() == expected


# --------------------------------------------------------------------------- every flavour


@pytest.mark.slow
@pytest.mark.parametrize("flavour", list(Flavour), ids=lambda f: f.value)
def test_every_config_parses_with_expected_names_and_shapes(built, flavour: Flavour) -> None:
    repository = built[flavour].repository
    volume_dims = [1, *TINY_SHAPE]
    configs = {name: parse_config(repository / name / "config.pbtxt") for name in MODELS}
    for name, config in configs.items():
        assert config.name == name
        assert (repository / name / "1").is_dir()  # Triton needs a version folder, ensembles too

    encoder = configs[ENCODER_NAME]
    assert [(t.name, t.data_type, list(t.dims)) for t in encoder.input] == [
        ("volume", FP32, volume_dims)
    ]
    assert [(t.name, list(t.dims)) for t in encoder.output] == [("embedding", [TINY_EMBEDDING])]
    assert encoder.max_batch_size == 4
    assert list(encoder.dynamic_batching.preferred_batch_size) == [2, 4]
    (warmup,) = encoder.model_warmup
    assert warmup.batch_size == 1
    assert list(warmup.inputs["volume"].dims) == volume_dims
    assert warmup.inputs["volume"].zero_data

    for name, output, width in (
        (BINARY_HEAD_NAME, "pathology_probability", 1),
        (MULTILABEL_HEAD_NAME, "finding_probabilities", len(FINDING_LABELS)),
    ):
        head = configs[name]
        assert [(t.name, list(t.dims)) for t in head.input] == [("embedding", [TINY_EMBEDDING])]
        assert [(t.name, t.data_type, list(t.dims)) for t in head.output] == [
            (output, FP32, [width])
        ]
        assert head.max_batch_size == 8
        assert head.HasField("dynamic_batching")

    kind = "KIND_CPU" if flavour is Flavour.PYTHON else "KIND_GPU"
    for name in (ENCODER_NAME, BINARY_HEAD_NAME, MULTILABEL_HEAD_NAME):
        config = configs[name]
        assert [
            model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group
        ] == [kind]
        if flavour is Flavour.PYTHON:
            assert (config.backend, config.platform) == ("python", "")
        else:
            expected = "onnxruntime_onnx" if flavour is Flavour.ONNXRUNTIME else "tensorrt_plan"
            assert (config.platform, config.backend) == (expected, "")


@pytest.mark.parametrize("flavour", list(Flavour), ids=lambda f: f.value)
def test_ensemble_wires_encoder_into_both_heads(built, flavour: Flavour) -> None:
    ensemble = parse_config(built[flavour].repository / ENSEMBLE_NAME / "config.pbtxt")
    assert ensemble.platform == "ensemble"
    assert ensemble.max_batch_size == 4
    assert [(t.name, list(t.dims)) for t in ensemble.input] == [("volume", [1, *TINY_SHAPE])]
    assert [(t.name, list(t.dims)) for t in ensemble.output] == [
        ("embedding", [TINY_EMBEDDING]),
        ("pathology_probability", [1]),
        ("finding_probabilities", [len(FINDING_LABELS)]),
    ]
    steps = [
        (step.model_name, dict(step.input_map), dict(step.output_map))
        for step in ensemble.ensemble_scheduling.step
    ]
    assert steps == [
        (ENCODER_NAME, {"volume": "volume"}, {"embedding": "embedding"}),
        (
            BINARY_HEAD_NAME,
            {"embedding": "embedding"},
            {"pathology_probability": "pathology_probability"},
        ),
        (
            MULTILABEL_HEAD_NAME,
            {"embedding": "embedding"},
            {"finding_probabilities": "finding_probabilities"},
        ),
    ]


def test_ensemble_config_is_the_same_in_every_flavour(built) -> None:
    texts = {
        flavour: parse_config(result.repository / ENSEMBLE_NAME / "config.pbtxt")
        for flavour, result in built.items()
    }
    assert texts[Flavour.PYTHON] == texts[Flavour.ONNXRUNTIME] == texts[Flavour.TENSORRT]


@pytest.mark.parametrize("flavour", list(Flavour), ids=lambda f: f.value)
def test_onnx_files_sit_in_every_flavour_and_match_the_configs(built, flavour: Flavour) -> None:
    repository = built[flavour].repository
    volume = np.random.default_rng(0).uniform(-1, 1, (3, 1, *TINY_SHAPE)).astype(np.float32)
    outputs = run_chain(repository, volume)
    assert outputs["embedding"].shape == (3, TINY_EMBEDDING)
    np.testing.assert_allclose(np.linalg.norm(outputs["embedding"], axis=1), 1.0, atol=1e-5)
    assert outputs["pathology_probability"].shape == (3, 1)
    assert outputs["finding_probabilities"].shape == (3, len(FINDING_LABELS))
    for value in (outputs["pathology_probability"], outputs["finding_probabilities"]):
        assert np.all((value >= 0) & (value <= 1))


def test_same_seed_gives_the_same_onnx_in_every_flavour(built) -> None:
    """The flavours that run onnxruntime share one encoder graph (fused attention); the
    TensorRT flavour's is the portable one (standard operators only) and computes the same."""
    encoders = {
        flavour: result.repository / ENCODER_NAME / "1" / "model.onnx"
        for flavour, result in built.items()
    }
    assert sha256_of(encoders[Flavour.PYTHON]) == sha256_of(encoders[Flavour.ONNXRUNTIME])
    domains = {
        flavour: {node.domain for node in onnx.load(str(path)).graph.node}
        for flavour, path in encoders.items()
    }
    assert "com.microsoft" in domains[Flavour.PYTHON]
    assert domains[Flavour.TENSORRT] <= {"", "ai.onnx"}
    volume = np.random.default_rng(1).uniform(-1, 1, (2, 1, *TINY_SHAPE)).astype(np.float32)
    embeddings = [
        run_chain(built[flavour].repository, volume)["embedding"]
        for flavour in (Flavour.PYTHON, Flavour.TENSORRT)
    ]
    np.testing.assert_allclose(*embeddings, atol=1e-6)


def test_python_flavour_has_the_template_beside_each_onnx(built) -> None:
    repository = built[Flavour.PYTHON].repository
    template = TEMPLATE_MODEL_PY.read_text()
    for name in (ENCODER_NAME, BINARY_HEAD_NAME, MULTILABEL_HEAD_NAME):
        assert (repository / name / "1" / "model.py").read_text() == template
        parameters = parse_config(repository / name / "config.pbtxt").parameters
        assert parameters["onnx_filename"].string_value == "model.onnx"
    assert not (repository / ENSEMBLE_NAME / "1" / "model.py").exists()


def test_native_flavours_name_their_model_files(built) -> None:
    for flavour, filename in (
        (Flavour.ONNXRUNTIME, "model.onnx"),
        (Flavour.TENSORRT, "model.plan"),
    ):
        repository = built[flavour].repository
        for name in (ENCODER_NAME, BINARY_HEAD_NAME, MULTILABEL_HEAD_NAME):
            config = parse_config(repository / name / "config.pbtxt")
            assert config.default_model_filename == filename
            assert not (repository / name / "1" / "model.py").exists()


def test_tensorrt_plans_are_skipped_with_the_commands_to_run(built) -> None:
    result = built[Flavour.TENSORRT]
    assert result.tensorrt is not None
    assert not result.tensorrt.built
    assert "trtexec-not-installed is not on PATH" in result.tensorrt.message
    encoder_command, *head_commands = result.tensorrt.commands
    assert "vit/convert2trt.sh" in encoder_command
    assert encoder_command.endswith(" ".join(str(n) for n in TINY_SHAPE))
    assert all("head/convert2trt.sh" in command for command in head_commands)
    for command in result.tensorrt.commands:
        assert command in result.tensorrt.message
    assert not list(result.repository.rglob("*.plan"))
    assert built[Flavour.PYTHON].tensorrt is None


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("flavour", list(Flavour), ids=lambda f: f.value)
def test_metadata_validates_and_its_hashes_match_the_files(built, flavour: Flavour) -> None:
    repository = built[flavour].repository
    metadata = read_metadata(repository)  # pydantic validation of the file
    assert metadata == built[flavour].metadata
    assert metadata.demo is True
    assert metadata.flavour == flavour.value
    assert metadata.target_shape == TINY_SHAPE
    spacing = np.array(metadata.target_spacing_mm)
    np.testing.assert_allclose(spacing * np.array(TINY_SHAPE), [360.0, 360.0, 360.0])
    assert metadata.embedding_dim == TINY_EMBEDDING
    assert metadata.ctvit_config["ctvit"]["dim"] == TINY_DOCUMENT["ctvit"]["dim"]
    assert metadata.ctvit_config["dim_latent"] == TINY_EMBEDDING
    assert metadata.labels == list(FINDING_LABELS)
    assert metadata.severity_order == list(SEVERITY_ORDER)
    assert set(metadata.finding_thresholds) == set(FINDING_LABELS)

    listed = {weight.path: weight for weight in metadata.weights}
    on_disk = {
        path.relative_to(repository).as_posix()
        for path in repository.rglob("*")
        if path.suffix in (".onnx", ".data", ".plan")
    }
    assert set(listed) == on_disk == {f"{name}/1/model.onnx" for name in MODELS[:3]}
    for path, weight in listed.items():
        assert weight.sha256 == sha256_of(repository / path)
        assert weight.model == path.split("/")[0]
        assert weight.source == f"demo: seeded (seed={SEED})"
        assert weight.source_sha256 is None
    assert metadata.model_version.startswith("demo-")


@pytest.mark.slow
def test_rebuilding_with_another_flavour_removes_stale_files(
    tmp_path: Path, tiny_models: ModelSet
) -> None:
    build_repository(tmp_path, Flavour.PYTHON, tiny_models)
    assert (tmp_path / ENCODER_NAME / "1" / "model.py").exists()
    build_repository(tmp_path, Flavour.ONNXRUNTIME, tiny_models)
    assert not list(tmp_path.rglob("model.py"))
    assert read_metadata(tmp_path).flavour == "onnxruntime"


# --------------------------------------------------------------------------- TensorRT scripts


def _fake_trtexec(directory: Path) -> Path:
    """A stand-in for TensorRT's trtexec that records its arguments and writes the engine file.

    Only the scripts' command lines are under test here; real plans need a GPU.
    """
    script = directory / "trtexec"
    script.write_text(
        "#!/usr/bin/env bash\n"
        'printf "%s\\n" "$@" > "$TRTEXEC_ARGS_DIR/$(basename "$(dirname "$(dirname "${2#--saveEngine=}")")").args"\n'
        'for arg in "$@"; do case "$arg" in --saveEngine=*) echo plan > "${arg#--saveEngine=}";; esac; done\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@pytest.mark.slow
def test_tensorrt_scripts_pass_the_shape_profiles(
    tmp_path: Path, tiny_models: ModelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_trtexec(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("TRTEXEC_ARGS_DIR", str(tmp_path))
    monkeypatch.delenv("TRTEXEC", raising=False)
    repository = tmp_path / "repo"
    result = build_repository(repository, Flavour.TENSORRT, tiny_models)

    assert result.tensorrt is not None
    assert result.tensorrt.built
    d, h, w = TINY_SHAPE
    encoder_args = (tmp_path / f"{ENCODER_NAME}.args").read_text().split()
    assert encoder_args == [
        f"--onnx={repository / ENCODER_NAME / '1' / 'model.onnx'}",
        f"--saveEngine={repository / ENCODER_NAME / '1' / 'model.plan'}",
        f"--minShapes=volume:1x1x{d}x{h}x{w}",
        f"--optShapes=volume:2x1x{d}x{h}x{w}",
        f"--maxShapes=volume:4x1x{d}x{h}x{w}",
        "--fp16",
    ]
    for name in (BINARY_HEAD_NAME, MULTILABEL_HEAD_NAME):
        args = (tmp_path / f"{name}.args").read_text().split()
        assert args[2:] == [
            f"--minShapes=embedding:1x{TINY_EMBEDDING}",
            f"--optShapes=embedding:4x{TINY_EMBEDDING}",
            f"--maxShapes=embedding:8x{TINY_EMBEDDING}",
            "--fp16",
        ]
    plans = {w.path for w in result.metadata.weights if w.path.endswith(".plan")}
    assert plans == {f"{name}/1/model.plan" for name in MODELS[:3]}


# --------------------------------------------------------------------------- checkpoints and CLI


@pytest.mark.slow
def test_checkpoints_convert_with_provenance(tmp_path: Path, tiny_models: ModelSet) -> None:
    """Checkpoints holding the demo weights build the same graphs, recorded by path and sha256."""
    checkpoints = {
        ENCODER_NAME: tmp_path / "ct_clip.pt",
        BINARY_HEAD_NAME: tmp_path / "binary.pt",
        MULTILABEL_HEAD_NAME: tmp_path / "multilabel.pt",
    }
    # CT-CLIP checkpoints nest the image tower among other weights; the loader skips the rest.
    encoder_state = {f"module.{k}": v for k, v in tiny_models.encoder.state_dict().items()}
    encoder_state["module.text_transformer.embeddings.weight"] = torch.zeros(4, 4)
    torch.save(encoder_state, checkpoints[ENCODER_NAME])
    torch.save(tiny_models.binary_head.state_dict(), checkpoints[BINARY_HEAD_NAME])
    torch.save(tiny_models.multilabel_head.state_dict(), checkpoints[MULTILABEL_HEAD_NAME])

    repository = tmp_path / "repo"
    code = main(
        [
            "--output", str(repository),
            "--flavour", "onnxruntime",
            "--encoder-checkpoint", str(checkpoints[ENCODER_NAME]),
            "--binary-head", str(checkpoints[BINARY_HEAD_NAME]),
            "--multilabel-head", str(checkpoints[MULTILABEL_HEAD_NAME]),
            "--ctvit-config", str(TINY_CONFIG),
        ]
    )  # fmt: skip
    assert code == 0
    metadata = read_metadata(repository)
    assert metadata.demo is False
    assert not metadata.model_version.startswith("demo")
    for weight in metadata.weights:
        checkpoint = checkpoints[weight.model]
        assert weight.source == str(checkpoint.resolve())
        assert weight.source_sha256 == sha256_of(checkpoint)
        assert weight.sha256 == sha256_of(repository / weight.path)

    demo_repository = tmp_path / "demo"
    build_repository(demo_repository, Flavour.ONNXRUNTIME, tiny_models)
    volume = np.random.default_rng(1).uniform(-1, 1, (2, 1, *TINY_SHAPE)).astype(np.float32)
    converted, demo = run_chain(repository, volume), run_chain(demo_repository, volume)
    for name, value in converted.items():
        np.testing.assert_allclose(value, demo[name], atol=1e-6)


def test_wrong_checkpoint_fails_with_a_clear_error(tmp_path: Path, tiny_models: ModelSet) -> None:
    encoder = tmp_path / "ct_clip.pt"
    torch.save(tiny_models.encoder.state_dict(), encoder)
    wrong_head = tmp_path / "head.pt"  # a multilabel head where the binary head belongs
    torch.save(tiny_models.multilabel_head.state_dict(), wrong_head)
    arguments = [
        "--output", str(tmp_path / "repo"),
        "--encoder-checkpoint", str(encoder),
        "--binary-head", str(wrong_head),
        "--multilabel-head", str(wrong_head),
        "--ctvit-config", str(TINY_CONFIG),
    ]  # fmt: skip
    assert main(arguments) == 1
    missing = tmp_path / "missing.pt"
    assert main([*arguments[:3], str(missing), *arguments[4:]]) == 1
    assert not (tmp_path / "repo" / ENSEMBLE_NAME / "metadata.json").exists()


def test_cli_failure_is_one_line_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.pt"
    checkpoints = ["--encoder-checkpoint", str(missing), "--binary-head", str(missing)]
    checkpoints += ["--multilabel-head", str(missing)]
    assert main(["--output", str(tmp_path / "repo"), *checkpoints]) == 1
    assert capsys.readouterr().err == f"error: checkpoint for {ENCODER_NAME} not found: {missing}\n"

    impossible = tmp_path / "impossible.json"
    document = json.loads(TINY_CONFIG.read_text())
    document["ctvit"]["image_size"] = 41  # not a multiple of the patch size
    del document["input_shape"]
    impossible.write_text(json.dumps(document))
    demo = ["--output", str(tmp_path / "repo"), "--demo", "--ctvit-config", str(impossible)]
    assert main(demo) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: cannot read the CTViT config {impossible}: ")
    assert "image_size 41 is not a multiple of patch_size 10" in line
    assert not (tmp_path / "repo" / ENSEMBLE_NAME / "metadata.json").exists()


@pytest.mark.parametrize(
    "arguments",
    [
        ["--output", "x"],  # neither --demo nor an encoder checkpoint
        ["--output", "x", "--demo", "--encoder-checkpoint", "e.pt"],  # both encoders
        ["--output", "x", "--demo", "--binary-head", "b.pt"],  # one head without the other
        ["--output", "x", "--encoder-checkpoint", "e.pt", "--multilabel-head", "m"],  # same
        ["--output", "x", "--demo", "--flavour", "openvino"],  # unknown flavour
    ],
)
def test_cli_rejects_inconsistent_arguments(arguments: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
