"""The monitoring wiring of the compose files (profile "monitoring": Prometheus and Grafana)
and of the dashboard, checked with the real Docker Compose binary and the settings' defaults.
A real Prometheus runs the scrape configs and the dashboard's queries in
tests/test_metrics_prometheus.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_compose_and_dockerfiles import (
    COMPOSE_FILES,
    EVERYTHING,
    PROJECT_ROOT,
    compose_model,
)

from services.core.config import load_settings

MONITORING = PROJECT_ROOT / "deploy" / "monitoring"


def monitoring_model(compose_file: str, home: Path) -> dict:
    return compose_model(compose_file, {**EVERYTHING, "COMPOSE_PROFILES": "monitoring"}, home)


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_monitoring_profile_scrapes_what_the_services_serve(
    compose_file: str, tmp_path: Path
) -> None:
    model = monitoring_model(compose_file, tmp_path)
    services = model["services"]
    assert {"prometheus", "grafana"} <= set(services)
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        assert services[name]["healthcheck"]["test"]
        assert all(port["host_ip"] == "127.0.0.1" for port in services[name]["ports"])
    # The services serve /metrics on the project network, on the ports the config defaults to.
    metrics = load_settings(environ={}).metrics
    for name in ("adapter", "frontend"):
        assert services[name]["environment"]["CTS__METRICS__HOST"] == "0.0.0.0"
        assert "CTS__METRICS__ADAPTER_PORT" not in services[name]["environment"]
    # RabbitMQ starts with its Prometheus plugin.
    plugins = model["configs"]["rabbitmq_plugins"]["content"]
    assert "rabbitmq_prometheus" in plugins
    assert "rabbitmq_management" in plugins
    mounted = {config["target"]: config["source"] for config in services["rabbitmq"]["configs"]}
    assert mounted["/etc/rabbitmq/enabled_plugins"] == "rabbitmq_plugins"

    # Prometheus reads deploy/monitoring/prometheus.compose.yml; its targets are the services.
    config_file = Path(model["configs"]["prometheus_config"]["file"])
    assert config_file == MONITORING / "prometheus.compose.yml"
    scrape = {
        job["job_name"]: job for job in yaml.safe_load(config_file.read_text())["scrape_configs"]
    }
    assert scrape["cts-frontend"]["static_configs"][0]["targets"] == [
        f"frontend:{metrics.frontend_port}"
    ]
    adapters = scrape["cts-adapter"]["dns_sd_configs"][0]
    assert (adapters["names"], adapters["port"]) == (["adapter"], metrics.adapter_port)
    assert scrape["cts-dicom-listener"]["static_configs"][0]["targets"] == [
        f"dicom-listener:{metrics.dicom_listener_port}"
    ]
    assert services["dicom-listener"]["environment"]["CTS__METRICS__HOST"] == "0.0.0.0"
    assert scrape["triton"]["static_configs"][0]["targets"] == ["triton:8002"]
    assert scrape["rabbitmq"]["static_configs"][0]["targets"] == ["rabbitmq:15692"]
    assert scrape["rabbitmq-queues"]["metrics_path"] == "/metrics/detailed"


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_grafana_gets_the_dashboard_and_no_default_password(
    compose_file: str, tmp_path: Path
) -> None:
    model = monitoring_model(compose_file, tmp_path)
    grafana = model["services"]["grafana"]
    targets = {config["target"]: config["source"] for config in grafana["configs"]}
    dashboard = Path(
        model["configs"][targets["/var/lib/grafana/dashboards/chest-ct-screening.json"]]["file"]
    )
    assert json.loads(dashboard.read_text())["uid"] == "cts-screening"
    provider = yaml.safe_load(
        Path(
            model["configs"][
                targets["/etc/grafana/provisioning/dashboards/chest-ct-screening.yaml"]
            ]["file"]
        ).read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load(
        Path(
            model["configs"][targets["/etc/grafana/provisioning/datasources/prometheus.yaml"]][
                "file"
            ]
        ).read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    # Without CTS_GRAFANA_PASSWORD the password is empty and the entrypoint refuses to start.
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == ""
    assert "GF_SECURITY_ADMIN_PASSWORD" in grafana["entrypoint"][-1]
    assert grafana["entrypoint"][-1].rstrip().endswith("exec /run.sh")


def test_the_stack_without_the_profile_has_no_monitoring_services(tmp_path: Path) -> None:
    services = compose_model("compose.local.yaml", dict(EVERYTHING), tmp_path)["services"]
    assert not {"prometheus", "grafana"} & set(services)


def test_dashboard_panels_cover_the_issue_and_use_the_provisioned_datasource() -> None:
    dashboard = json.loads(
        (MONITORING / "grafana" / "dashboards" / "chest-ct-screening.json").read_text()
    )
    expressions = " ".join(
        target["expr"] for panel in dashboard["panels"] for target in panel["targets"]
    )
    for needed in (
        "rabbitmq_detailed_queue_messages_ready",  # queue depth
        "cts_adapter_studies_total",  # studies per minute by outcome
        "histogram_quantile(0.5, sum by (le, stage) (rate(cts_adapter_stage_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, stage) (rate(cts_adapter_stage_seconds_bucket",
        "nv_gpu_utilization",
        "nv_cpu_utilization",
    ):
        assert needed in expressions, needed
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    datasource = yaml.safe_load(
        (MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"][0]
    assert uids == {datasource["uid"]}
    positions = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dashboard["panels"]]
    assert len(set(positions)) == len(positions)  # no panel hides another
