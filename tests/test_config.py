from pathlib import Path

import pytest
from pydantic import ValidationError

from services.core.config import PROJECT_ROOT, Backoff, load_settings


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


def test_environment_values_are_yaml_where_the_setting_is_a_list_or_mapping():
    settings = load_settings(
        environ={
            "cts__dicom__allowed_calling_ae_titles": "[ORTHANC, CT1]",  # any case
            "CTS__DICOM__DESTINATIONS": "[{ae_title: PACS, host: 10.0.0.5, port: 104}]",
            "CTS__FRONTEND__TLS_KEY": "null",
            "CTS__RABBITMQ__PASSWORD": "12345",  # a text setting stays text
            "CTS__RABBITMQ__RECONNECT_BACKOFF__MAXIMUM_S": "5",  # a leaf of a leaf
        },
    )
    assert settings.dicom.allowed_calling_ae_titles == ["ORTHANC", "CT1"]
    assert [d.host for d in settings.dicom.destinations] == ["10.0.0.5"]
    assert settings.frontend.tls_key is None
    assert settings.rabbitmq.password == "12345"
    assert settings.rabbitmq.reconnect_backoff == Backoff(initial_s=0.5, maximum_s=5.0)


def test_the_environment_is_laid_over_the_file(tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_text("rabbitmq:\n  host: from-file\n  port: 5673\n")
    settings = load_settings(config, environ={"CTS__RABBITMQ__HOST": "from-environment"})
    assert settings.rabbitmq.host == "from-environment"
    assert settings.rabbitmq.port == 5673  # the file's other keys of the section stay
    other = tmp_path / "other.yaml"
    other.write_text("rabbitmq:\n  port: 5674\n")
    assert load_settings(environ={"CTS_CONFIG": str(other)}).rabbitmq.port == 5674


def test_unknown_sections_and_keys_in_the_environment_are_rejected():
    with pytest.raises(ValueError, match="CTS__RABIT__HOST: no such section"):
        load_settings(environ={"CTS__RABIT__HOST": "broker"})
    with pytest.raises(ValidationError, match="hots"):
        load_settings(environ={"CTS__RABBITMQ__HOTS": "broker"})


def test_a_backoff_never_waits_less_at_most_than_at_first():
    with pytest.raises(ValidationError, match="must not be below initial_s"):
        Backoff(initial_s=5.0, maximum_s=1.0)
    with pytest.raises(ValidationError, match="greater than 0"):
        Backoff(initial_s=0.0, maximum_s=1.0)


def test_unknown_keys_are_rejected(tmp_path: Path):
    bad = tmp_path / "config.yaml"
    bad.write_text("rabbitmq:\n  hots: typo\n")
    with pytest.raises(ValidationError, match="hots"):
        load_settings(bad, environ={})


def test_the_config_file_is_generated_from_the_defaults():
    """configs/config.yaml is the defaults of services/core/config.py, written out: one place."""
    from services.core.config import Settings
    from services.core.config.document import default_config_yaml

    committed = (PROJECT_ROOT / "configs" / "config.yaml").read_text()
    assert committed == default_config_yaml(), "run: python -m services.core.config --write"
    assert load_settings(PROJECT_ROOT / "configs" / "config.yaml", environ={}) == Settings()


def test_a_retired_shared_password_is_refused_with_the_way_forward():
    with pytest.raises(ValidationError, match=r"python -m services\.registry users"):
        load_settings(environ={"CTS__FRONTEND__AUTH": "radiologist:secret"})
    with pytest.raises(ValidationError, match="tls_key go together"):
        load_settings(environ={"CTS__FRONTEND__TLS_CERTIFICATE": "cert.pem"})
