"""``make airflow`` (``scripts/airflow_local.py``) without starting anything: the environment variables of
the README's table, and the ``env.sh`` a terminal sources so that the README's ``airflow ...`` commands
reach the local Airflow. Starting the services is the browser tests' part (``tests/browser``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.airflow_local import PROJECT, LocalAirflow, cli_env_script, parse_arguments

#: Each variable of the README's table -> a value, and how to read it back from what the script makes of it.
VARIABLES = {
    "USAGE_BILLING_DATABASE_URL": ("postgresql://someone@db.example:5433/wh", lambda o: o.database_url),
    "USAGE_BILLING_AIRFLOW_DATABASE_URL": ("postgresql://someone@db.example:5433/meta", lambda o: o.metadata_url),
    "USAGE_BILLING_AIRFLOW_HOST": ("0.0.0.0", lambda o: o.host),
    "USAGE_BILLING_AIRFLOW_PORT": ("8181", lambda o: str(o.port)),
    "USAGE_BILLING_ORB_PORT": ("0", lambda o: str(o.orb_port)),
    "USAGE_BILLING_KABLE_PORT": ("8202", lambda o: str(o.kable_port)),
    "USAGE_BILLING_LOG_SERVER_PORT": ("8894", lambda o: str(o.log_server_port)),
    "USAGE_BILLING_AIRFLOW_HOME": ("/tmp/some-airflow-home", lambda o: str(o.home)),
    "USAGE_BILLING_AIRFLOW_USER": ("operator", lambda o: o.username),
    "USAGE_BILLING_AIRFLOW_PASSWORD": ("not-generated", lambda o: o.password),
    "USAGE_BILLING_CONFIG": ("/tmp/elsewhere/usage_billing.yaml",
                             lambda o: str(LocalAirflow(o)._config_file())),
}


def _readme_variables() -> list[str]:
    """The variables named in the first column of the README's `| variable | default | what |` table."""
    text = (PROJECT / "README.md").read_text(encoding="utf-8")
    table = re.search(r"^\| variable \| default \| what \|\n((?:\|.*\n)+)", text, re.MULTILINE)
    assert table, "README.md: no `| variable | default | what |` table"
    rows = table.group(1).splitlines()[1:]  # without the | --- | line
    return [name for row in rows for name in re.findall(r"`([A-Z_]+)`", row.split("|")[1])]


def test_the_readme_table_lists_exactly_the_variables_checked_here():
    assert sorted(_readme_variables()) == sorted(VARIABLES)


@pytest.mark.parametrize("name", sorted(VARIABLES))
def test_each_variable_of_the_readme_table_sets_its_option(name, monkeypatch):
    for other in VARIABLES:
        monkeypatch.delenv(other, raising=False)
    value, read = VARIABLES[name]
    assert read(parse_arguments([])) != value, "the default differs, so the variable is what changes it"
    monkeypatch.setenv(name, value)
    assert read(parse_arguments([])) == value


def test_a_flag_wins_over_its_variable(monkeypatch):
    monkeypatch.setenv("USAGE_BILLING_AIRFLOW_PORT", "8181")
    assert parse_arguments(["--port", "8282"]).port == 8282


def test_env_sh_gives_a_shell_the_services_environment_and_their_airflow(tmp_path: Path):
    services = {
        "AIRFLOW_HOME": str(tmp_path / "home with space"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://postgres@127.0.0.1:5432/usage_billing_airflow",
        "AIRFLOW_CONN_ORB_DEFAULT": json.dumps({"conn_type": "http", "host": "http://127.0.0.1:8101",
                                                "password": "it's $secret `x`"}),
        "USAGE_BILLING_CONFIG": "/work/include/usage_billing.yaml",
        "PYTHONPATH": "/work/include:/work/plugins",
        "HOME": "/home/of-the-services",  # inherited by the services, not theirs to impose on a terminal
    }
    script = tmp_path / "env.sh"
    script.write_text(cli_env_script(services))
    shown = subprocess.run(
        ["bash", "-c", '. "$1" && command -v airflow && python -c "import json, os; print(json.dumps(dict(os.environ)))"',
         "-", str(script)],
        env={"PATH": "/usr/bin:/bin", "HOME": "/home/user"}, capture_output=True, text=True, check=True, timeout=20)
    airflow, environment = shown.stdout.splitlines()[0], json.loads(shown.stdout.splitlines()[1])
    assert airflow == str(Path(sys.executable).parent / "airflow"), "this environment's airflow comes first"
    assert {k: environment.get(k) for k in services if k != "HOME"} == {k: v for k, v in services.items()
                                                                        if k != "HOME"}
    assert environment["HOME"] == "/home/user"
    assert environment["PATH"].endswith(":/usr/bin:/bin"), "the terminal's own PATH is kept after it"

