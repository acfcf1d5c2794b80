"""deploy/kubernetes, validated without a cluster: every built-in resource against the
Kubernetes OpenAPI schemas bundled in kubernetes-validate (strict: unknown fields fail), the
custom resources (KEDA, RabbitMQ operator, CloudNativePG) against the small schemas in
deploy/kubernetes/schemas, the overlays' JSON patches applied to the base as kustomize
applies them (RFC 6902, the jsonpatch package) and the result validated again, and the
wiring between them (names, ports, volumes, secrets, the registry's upgrade).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml
from sqlalchemy.engine import make_url

from services.broker.schemas import Priority, QueueTopology
from services.core.config import load_settings
from services.core.inference.triton_transport import url_host

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = PROJECT_ROOT / "deploy" / "kubernetes"
SCHEMAS = KUBERNETES / "schemas"
KUBERNETES_VERSION = "1.30.0"  # a release every supported cluster is at least
MANIFESTS = sorted(path for path in KUBERNETES.rglob("*.yaml") if path.name != "kustomization.yaml")
BASE = KUBERNETES / "base"
CLOUDNATIVEPG = KUBERNETES / "cloudnativepg"
KUSTOMIZATIONS = sorted(KUBERNETES.rglob("kustomization.yaml"))
# The services that open the study registry (each refuses to start on another schema).
REGISTRY_USERS = ("frontend", "dicom-listener")  # they upgrade it (init containers) and write
REGISTRY_READERS = ("adapter",)  # the earlier SRs of a study, which a new one supersedes
UPGRADE_COMMAND = ["python", "-m", "services.registry", "upgrade"]


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
    cluster = by_kind("Cluster")["cts-registry"]
    misspelt = json.loads(json.dumps(cluster))
    misspelt["spec"]["bootstrap"]["initdb"]["databse"] = "cts"  # would create "app"
    with pytest.raises(jsonschema.ValidationError):
        validate(misspelt)
    no_instances = json.loads(json.dumps(cluster))
    del no_instances["spec"]["instances"]
    with pytest.raises(jsonschema.ValidationError):
        validate(no_instances)
    bare_number = json.loads(json.dumps(cluster))
    bare_number["spec"]["storage"]["size"] = 10  # a quantity is a string ("10Gi")
    with pytest.raises(jsonschema.ValidationError):
        validate(bare_number)


def test_kustomizations_list_exactly_the_manifests() -> None:
    base = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    listed = {BASE / name for name in base["resources"]}
    applied = {path for path in BASE.glob("*.yaml") if path.name != "kustomization.yaml"}
    # Every manifest but the example Secret (real credentials are created by hand).
    assert listed == applied - {BASE / "secret.example.yaml"}
    # `kubectl apply -k deploy/kubernetes` is the base as it is.
    assert yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"] == ["base"]
    images = {image["name"] for image in base["images"]}
    used = {
        container["image"]
        for deployment in by_kind("Deployment").values()
        for kind in ("initContainers", "containers")
        for container in deployment["spec"]["template"]["spec"].get(kind, [])
    }
    assert used <= images  # every image is set by the kustomization's images:
    overlay = yaml.safe_load((KUBERNETES / "rabbitmq-operator" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../base", "rabbitmq-cluster.yaml"]
    overlay = yaml.safe_load((CLOUDNATIVEPG / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../base", "registry-cluster.yaml"]
    for patch in overlay["patches"]:
        assert (CLOUDNATIVEPG / patch["path"]).is_file()


@pytest.mark.parametrize(
    "kustomization", KUSTOMIZATIONS, ids=lambda path: str(path.relative_to(KUBERNETES))
)
def test_kustomize_accepts_every_reference(kustomization: Path) -> None:
    """The two rules by which kustomize refuses a kustomization before it reads a manifest:
    a folder it builds on must not contain it (a cycle: an overlay inside its base's folder
    is refused), and a file it names must lie in its own folder (the load restrictor)."""
    here = kustomization.parent
    spec = yaml.safe_load(kustomization.read_text())
    files = [*spec.get("resources", []), *(p["path"] for p in spec.get("patches", []))]
    for entry in files:
        target = (here / entry).resolve()
        assert target.exists(), f"{kustomization}: {entry} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), entry
            assert not here.resolve().is_relative_to(target), f"{entry} contains {here}"
        else:
            assert target.is_relative_to(here.resolve()), f"{entry} is outside {here}"


def _pod(name: str) -> dict:
    return by_kind("Deployment")[name]["spec"]["template"]


def _variables(container: dict) -> dict[str, dict]:
    return {variable["name"]: variable for variable in container.get("env", [])}


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
    prefix = by_kind("ConfigMap")["cts-config"]["data"]["CTS__RABBITMQ__QUEUE_PREFIX"]
    topology = QueueTopology(prefix=prefix)
    # Each routine lane of work still to do: under a backlog, checked tasks gather in the
    # preparation lane and prepared ones in the model lane, not in the task lane.
    routine = Priority.ROUTINE
    lanes = [topology.task_lane(routine), topology.preparation_lane(routine)]
    lanes.append(topology.model_lane(routine))
    assert [trigger["metadata"]["queueName"] for trigger in scaled["triggers"]] == lanes
    for trigger in scaled["triggers"]:
        assert trigger["type"] == "rabbitmq"
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


def _assert_upgraded_first(deployment: dict) -> None:
    """The pod's one init container upgrades the registry with the service's own image and
    environment (so it upgrades the very database the service opens), and the storage at
    the same place (where a SQLite registry would be)."""
    spec = deployment["spec"]["template"]["spec"]
    (upgrade,) = spec["initContainers"]
    (service,) = spec["containers"]
    assert upgrade["name"] == "registry-upgrade"
    assert upgrade["command"] == UPGRADE_COMMAND
    assert upgrade["image"] == service["image"]
    assert upgrade["envFrom"] == service["envFrom"]
    assert upgrade["env"] == service["env"]
    storage = {m["mountPath"]: m["name"] for m in service["volumeMounts"]}
    for mount in upgrade["volumeMounts"]:
        assert storage[mount["mountPath"]] == mount["name"]
    assert "/app/storage" in {mount["mountPath"] for mount in upgrade["volumeMounts"]}


def test_the_registry_is_upgraded_by_an_init_container_from_the_secret() -> None:
    secret = by_kind("Secret")["cts-rabbitmq"]["stringData"]
    for name in REGISTRY_USERS:
        deployment = by_kind("Deployment")[name]
        _assert_upgraded_first(deployment)
        spec = deployment["spec"]["template"]["spec"]
        for container in (*spec["initContainers"], *spec["containers"]):
            variables = _variables(container)
            reference = variables["CTS__REGISTRY__URL"]["valueFrom"]["secretKeyRef"]
            assert reference == {"name": "cts-rabbitmq", "key": "registry-url"}
            # The cloudnativepg overlay replaces it by position: it must stay first.
            assert container["env"][0]["name"] == "CTS__REGISTRY__URL"
            for variable in container["env"]:
                secret_reference = variable.get("valueFrom", {}).get("secretKeyRef")
                if secret_reference is not None:
                    assert secret_reference["key"] in secret
    # The example is a PostgreSQL URL the registry's own driver takes (psycopg 3).
    assert make_url(secret["registry-url"]).drivername == "postgresql+psycopg"
    # The adapters only read it (no upgrade of theirs); Triton never sees it.
    (adapter,) = _pod("adapter")["spec"]["containers"]
    assert adapter["env"][0]["name"] == "CTS__REGISTRY__URL"
    reference = _variables(adapter)["CTS__REGISTRY__URL"]["valueFrom"]["secretKeyRef"]
    assert reference == {"name": "cts-rabbitmq", "key": "registry-url"}
    assert not _pod("adapter")["spec"].get("initContainers")
    for container in _pod("triton")["spec"]["containers"]:
        assert "CTS__REGISTRY__URL" not in _variables(container)
    assert "CTS__REGISTRY__URL" not in by_kind("ConfigMap")["cts-config"]["data"]


def _overlay_deployments(overlay: Path) -> dict[str, dict]:
    """The base's Deployments after the overlay's JSON patches, applied as kustomize applies
    a patch whose target names a Deployment (the test operations included: a base that no
    longer matches fails here as `kubectl apply -k` would)."""
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    deployments = {name: json.loads(json.dumps(d)) for name, d in by_kind("Deployment").items()}
    for patch in kustomization["patches"]:
        target = patch["target"]
        assert (target["group"], target["version"], target["kind"]) == ("apps", "v1", "Deployment")
        operations = json.loads((overlay / patch["path"]).read_text())
        deployments[target["name"]] = jsonpatch.apply_patch(deployments[target["name"]], operations)
    return deployments


def test_the_cloudnativepg_overlay_points_the_registry_at_its_cluster() -> None:
    (cluster,) = documents(CLOUDNATIVEPG / "registry-cluster.yaml")
    validate(cluster)
    spec = cluster["spec"]
    assert spec["instances"] >= 2  # a standby to fail over to
    assert spec["imageName"].rpartition(":")[2][:1].isdigit()  # a pinned version
    base = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert cluster["metadata"]["namespace"] == base["namespace"]
    initdb = spec["bootstrap"]["initdb"]
    name = cluster["metadata"]["name"]
    deployments = _overlay_deployments(CLOUDNATIVEPG)
    patched = {
        target["name"]
        for target in (
            p["target"]
            for p in yaml.safe_load((CLOUDNATIVEPG / "kustomization.yaml").read_text())["patches"]
        )
    }
    assert patched == {*REGISTRY_USERS, *REGISTRY_READERS}
    for deployment_name in (*REGISTRY_USERS, *REGISTRY_READERS):
        deployment = deployments[deployment_name]
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
        pod = deployment["spec"]["template"]["spec"]
        if deployment_name in REGISTRY_USERS:
            _assert_upgraded_first(deployment)
        for container in (*pod.get("initContainers", []), *pod["containers"]):
            variables = _variables(container)
            url = make_url(variables["CTS__REGISTRY__URL"]["value"])
            assert "valueFrom" not in variables["CTS__REGISTRY__URL"]
            assert url.drivername == "postgresql+psycopg"
            # The operator's read-write Service (the primary), the database and its owner.
            assert (url.host, url.port) == (f"{name}-rw", 5432)
            assert (url.database, url.username) == (initdb["database"], initdb["owner"])
            assert url.password is None  # libpq reads PGPASSWORD
            # The Secret the operator writes for the owner: <cluster>-app, key password.
            reference = variables["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
            assert reference == {"name": f"{name}-app", "key": "password"}
            assert len(container["env"]) == len(variables)  # no variable twice
    # The other Deployments are as in the base.
    for deployment_name in set(deployments) - {*REGISTRY_USERS, *REGISTRY_READERS}:
        assert deployments[deployment_name] == by_kind("Deployment")[deployment_name]


def test_the_broker_account_comes_from_the_secret_and_the_listener_asks_who_may_send() -> None:
    """Every pod that talks to RabbitMQ signs in with the Secret's account (never a literal,
    never guest); the listener, on the pod's every address, refuses to start until the site
    lists who may send (README, Security)."""
    from services.core.errors import ConfigurationError
    from services.dicom_listener.door import check_door

    secret = by_kind("Secret")["cts-rabbitmq"]["stringData"]
    assert secret["username"] != "guest"
    for name in ("adapter", "frontend", "dicom-listener"):
        spec = _pod(name)["spec"]
        for container in (*spec.get("initContainers", []), *spec["containers"]):
            variables = _variables(container)
            for variable, key in (
                ("CTS__RABBITMQ__USERNAME", "username"),
                ("CTS__RABBITMQ__PASSWORD", "password"),
            ):
                reference = variables[variable]["valueFrom"]["secretKeyRef"]
                assert reference == {"name": "cts-rabbitmq", "key": key}, (name, variable)
    (listener,) = _pod("dicom-listener")["spec"]["containers"]
    plain = {
        key: str(value) for key, value in _environment(listener).items() if isinstance(value, str)
    }
    dicom = load_settings(environ=plain).dicom
    assert dicom.host == "0.0.0.0"
    with pytest.raises(ConfigurationError, match="allowed_calling_ae_titles"):
        check_door(dicom)
    listed = load_settings(
        environ={**plain, "CTS__DICOM__ALLOWED_CALLING_AE_TITLES": "[PACS]"}
    ).dicom
    check_door(listed)
