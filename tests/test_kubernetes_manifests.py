"""deploy/kubernetes, validated without a cluster: every built-in resource against the
Kubernetes OpenAPI schemas bundled in kubernetes-validate (strict: unknown fields fail), the
custom resources (KEDA, RabbitMQ operator) against the small schemas in
deploy/kubernetes/schemas, and the wiring between them (names, ports, volumes, secrets).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.core.config import load_settings
from services.core.inference.triton_transport import url_host

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = PROJECT_ROOT / "deploy" / "kubernetes"
SCHEMAS = KUBERNETES / "schemas"
KUBERNETES_VERSION = "1.30.0"  # a release every supported cluster is at least
MANIFESTS = sorted(path for path in KUBERNETES.rglob("*.yaml") if path.name != "kustomization.yaml")


def documents(path: Path) -> Iterator[dict]:
    yield from (document for document in yaml.safe_load_all(path.read_text()) if document)


def everything() -> list[dict]:
    return [document for path in MANIFESTS for document in documents(path)]


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in everything() if d["kind"] == kind}


def custom_schema(resource: dict) -> dict | None:
    group_version = resource["apiVersion"].replace("/", "_")
    path = SCHEMAS / f"{group_version}_{resource['kind']}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def validate(resource: dict) -> None:
    schema = custom_schema(resource)
    if schema is not None:
        jsonschema.validate(resource, schema)
    else:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: str(path.relative_to(KUBERNETES)))
def test_every_manifest_is_valid(path: Path) -> None:
    resources = list(documents(path))
    assert resources
    for resource in resources:
        validate(resource)


def test_the_validation_refuses_broken_manifests() -> None:
    """The checks above mean something only if they fail where they should."""
    deployment = by_kind("Deployment")["adapter"]
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy "] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(typo)
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong_type)
    scaled = json.loads(json.dumps(by_kind("ScaledObject")["adapter"]))
    scaled["spec"]["minReplicas"] = 1  # the HPA's name, not KEDA's: would be ignored
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    del scaled["spec"]["minReplicas"]
    scaled["spec"]["triggers"][0]["authenticationRef"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


def test_kustomizations_list_exactly_the_manifests() -> None:
    base = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = {KUBERNETES / name for name in base["resources"]}
    applied = {path for path in KUBERNETES.glob("*.yaml") if path.name != "kustomization.yaml"}
    # Every manifest but the example Secret (real credentials are created by hand).
    assert listed == applied - {KUBERNETES / "secret.example.yaml"}
    images = {image["name"] for image in base["images"]}
    used = {
        container["image"]
        for deployment in by_kind("Deployment").values()
        for container in deployment["spec"]["template"]["spec"]["containers"]
    }
    assert used <= images  # every image is set by the kustomization's images:
    overlay = yaml.safe_load((KUBERNETES / "rabbitmq-operator" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["..", "rabbitmq-cluster.yaml"]


def _pod(name: str) -> dict:
    return by_kind("Deployment")[name]["spec"]["template"]


def _environment(container: dict) -> dict[str, object]:
    config = by_kind("ConfigMap")["cts-config"]["data"]
    environment: dict[str, object] = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == "cts-config"
        environment.update(config)
    for variable in container.get("env", []):
        environment[variable["name"]] = variable.get("value", variable.get("valueFrom"))
    return environment


def test_the_pods_are_wired_to_each_other() -> None:
    settings = load_settings(environ={})
    secret = by_kind("Secret")["cts-rabbitmq"]
    services = by_kind("Service")
    claims = by_kind("PersistentVolumeClaim")
    assert claims["cts-storage"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("adapter", "frontend", "dicom-listener", "triton"):
        pod = _pod(name)
        spec = pod["spec"]
        (container,) = spec["containers"]
        environment = _environment(container)
        # Metrics: annotated for Prometheus on a port the container declares.
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        ports = {port["containerPort"] for port in container["ports"]}
        assert int(annotations["prometheus.io/port"]) in ports
        # Every secret reference names a key of the Secret; no credential in plain text.
        for variable in container.get("env", []):
            reference = variable.get("valueFrom", {}).get("secretKeyRef")
            if reference is not None:
                assert reference["name"] == "cts-rabbitmq"
                assert reference["key"] in secret["stringData"]
            assert "PASSWORD" not in variable["name"] or reference is not None
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        if name == "triton":
            continue
        # The shared storage where the config says it is, and the right metrics port.
        storage = volumes[mounts[environment["CTS__STORAGE__ROOT"]]]
        assert storage["persistentVolumeClaim"]["claimName"] == "cts-storage"
        expected_port = {
            "adapter": settings.metrics.adapter_port,
            "frontend": settings.metrics.frontend_port,
            "dicom-listener": settings.metrics.dicom_listener_port,
        }[name]
        assert int(annotations["prometheus.io/port"]) == expected_port
        assert environment["CTS__METRICS__HOST"] == "0.0.0.0"
        for variable in (
            "CTS__RABBITMQ__HOST",
            "CTS__RABBITMQ__USERNAME",
            "CTS__RABBITMQ__PASSWORD",
        ):
            assert variable in environment
    # Triton: a GPU, ready on /v2/health/ready, the repository from its volume, its Service.
    triton = _pod("triton")["spec"]
    (server,) = triton["containers"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "--model-repository=/models" in server["args"]
    models = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}["/models"]
    claim = {v["name"]: v for v in triton["volumes"]}[models]["persistentVolumeClaim"]
    assert claim["claimName"] == "cts-model-repository"
    assert claim["readOnly"] is True
    config = by_kind("ConfigMap")["cts-config"]["data"]
    triton_service = url_host(config["CTS__INFERENCE__TRITON_URL"])
    assert {port["port"] for port in services[triton_service]["spec"]["ports"]} >= {8001, 8002}
    assert config["CTS__INFERENCE__TRITON_TRANSPORT"] == "grpc"  # not the same host
    for service in services.values():  # every Service selects pods that exist
        selector = service["spec"]["selector"]
        assert any(
            selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
            for deployment in by_kind("Deployment").values()
        ), service["metadata"]["name"]


def test_keda_scales_the_adapters_on_the_task_queue() -> None:
    scaled = by_kind("ScaledObject")["adapter"]["spec"]
    assert scaled["scaleTargetRef"]["name"] in by_kind("Deployment")
    (trigger,) = scaled["triggers"]
    prefix = by_kind("ConfigMap")["cts-config"]["data"]["CTS__RABBITMQ__QUEUE_PREFIX"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == f"{prefix}.tasks"
    assert trigger["metadata"]["mode"] == "QueueLength"
    authentication = by_kind("TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    (reference,) = authentication["spec"]["secretTargetRef"]
    assert reference["parameter"] == "host"  # KEDA's name for the AMQP URL
    assert reference["key"] in by_kind("Secret")[reference["name"]]["stringData"]
    assert 1 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    # A scale-down must let the study in progress finish (SIGTERM, drain, give back).
    grace = _pod("adapter")["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 60


def test_the_operator_overlay_runs_a_broker_with_prometheus() -> None:
    (cluster,) = documents(KUBERNETES / "rabbitmq-operator" / "rabbitmq-cluster.yaml")
    assert cluster["spec"]["replicas"] >= 3  # the quorum task queue survives one node
    assert "rabbitmq_prometheus" in cluster["spec"]["rabbitmq"]["additionalPlugins"]
