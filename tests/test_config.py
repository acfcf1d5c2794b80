from pathlib import Path

import pytest
from pydantic import ValidationError

from services.core.config import PROJECT_ROOT, load_settings


def test_repository_config_file_validates():
    settings = load_settings(PROJECT_ROOT / "configs" / "config.yaml", environ={})
    assert settings.rabbitmq.port == 5672
    assert settings.frontend.host == "127.0.0.1"
    assert settings.inference.model_repository == PROJECT_ROOT / "model_repository_running"


def test_environment_overrides_are_typed():
    settings = load_settings(
        PROJECT_ROOT / "configs" / "config.yaml",
        environ={
            "CTS__RABBITMQ__HOST": "broker",
            "CTS__INTAKE__MAX_FILES": "12",
            "CTS__INFERENCE__FINDING_THRESHOLDS": "{'Lung nodule': 0.3}",
            "UNRELATED": "x",
        },
    )
    assert settings.rabbitmq.host == "broker"
    assert settings.intake.max_files == 12
    assert settings.inference.finding_thresholds == {"Lung nodule": 0.3}


def test_unknown_keys_are_rejected(tmp_path: Path):
    bad = tmp_path / "config.yaml"
    bad.write_text("rabbitmq:\n  hots: typo\n")
    with pytest.raises(ValidationError, match="hots"):
        load_settings(bad, environ={})


def test_the_config_file_is_generated_from_the_defaults():
    """configs/config.yaml is the defaults of services/core/config.py, written out: one place."""
    from services.core.config import Settings, default_config_yaml

    committed = (PROJECT_ROOT / "configs" / "config.yaml").read_text()
    assert committed == default_config_yaml(), "run: python -m services.core.config --write"
    assert load_settings(PROJECT_ROOT / "configs" / "config.yaml", environ={}) == Settings()
