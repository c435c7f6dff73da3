"""Static checks of the deployment files: Dockerfile, compose, Prometheus and Grafana provisioning.

No Docker engine is needed: compose files are validated with ``docker-compose config`` (or
``docker compose config``), Prometheus configuration with ``promtool``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from containers import COMPOSE_FILE, DOCKER_DIR, DOCKERFILE, compose_command, dockerfile_args, dockerfile_instructions
from dashboard import DASHBOARD
from processes import REPO, SERVICE_COMMAND

PROMETHEUS = DOCKER_DIR / "prometheus.yml"
ALERT_RULES = DOCKER_DIR / "prometheus" / "alerts.yml"
ALERT_TESTS = DOCKER_DIR / "prometheus" / "alerts.test.yml"
DATASOURCES = DOCKER_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DOCKER_DIR / "grafana" / "provisioning" / "dashboards" / "cogalora.yml"


# ---- Dockerfile ------------------------------------------------------------------------------


def exec_form(arguments: str) -> list[str]:
    """A JSON exec-form argument list (``["python", "-m", ...]``); shell form is parsed with shlex."""
    if arguments.startswith("["):
        value = json.loads(arguments)
        assert isinstance(value, list) and all(isinstance(item, str) for item in value)
        return value
    return shlex.split(arguments)


def last(instructions: list[tuple[str, str]], keyword: str) -> str | None:
    values = [rest for kw, rest in instructions if kw == keyword]
    return values[-1] if values else None


def test_dockerfile_cmd_is_the_tested_start_command():
    instructions = dockerfile_instructions()
    cmd = last(instructions, "CMD")
    assert cmd is not None and cmd.startswith("["), "CMD must be in exec form (signals reach the server)"
    assert exec_form(cmd) == SERVICE_COMMAND
    assert last(instructions, "ENTRYPOINT") is None, "an ENTRYPOINT would change what CMD runs"


def test_every_dockerfile_copy_source_is_in_the_build_context():
    """What the build would fail on: a COPY source that is missing or excluded by .dockerignore."""
    instructions = dockerfile_instructions()
    copies = [rest.split() for kw, rest in instructions if kw == "COPY" and not rest.startswith("--from=")]
    assert copies
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for parts in copies:
        for source in [p for p in parts[:-1] if not p.startswith("--")]:
            assert (REPO / source).exists(), f"COPY source {source!r} missing from the build context"
            assert source.rstrip("/") not in ignored, f"COPY source {source!r} is excluded by .dockerignore"


def test_wheelhouse_and_certificates_are_ignored_by_git_but_present():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for folder in ("wheels", "certs"):
        assert (DOCKER_DIR / folder / "README.md").is_file(), "the folder must exist in a fresh clone (COPY needs it)"
        probe = f"docker/{folder}/example.whl" if folder == "wheels" else f"docker/{folder}/proxy.crt"
        ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=REPO, timeout=30)
        assert ignored.returncode == 0, f"{probe} is not ignored by git"
        kept = subprocess.run(["git", "check-ignore", "-q", f"docker/{folder}/README.md"], cwd=REPO, timeout=30)
        assert kept.returncode == 1, f"docker/{folder}/README.md is ignored"


# ---- compose ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_config() -> dict:
    command = compose_command()
    if command is None:
        pytest.skip(
            "neither docker-compose nor the docker compose plugin is installed (apt-get install docker-compose)"
        )
    done = subprocess.run([*command, "-f", str(COMPOSE_FILE), "config"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(command)} config failed:\n{done.stderr}"
    return yaml.safe_load(done.stdout)


def test_compose_config_is_valid_and_complete(compose_config: dict):
    services = compose_config["services"]
    assert {"cogalora", "prometheus", "grafana"} <= set(services)
    build = services["cogalora"]["build"]
    assert Path(build["context"]).resolve() == REPO
    assert (Path(build["context"]) / build["dockerfile"]).resolve() == DOCKERFILE
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
    assert services["prometheus"]["depends_on"]["cogalora"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    environment = services["grafana"]["environment"]
    assert str(environment["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "true"
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_compose_takes_images_and_build_args_from_variables():
    raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]
    # compose repeats the Dockerfile's defaults (1.29 passes an unset variable as ""): they must agree.
    defaults = dockerfile_args()
    for name, value in raw["cogalora"]["build"]["args"].items():
        assert value == f"${{{name}:-{defaults[name]}}}", name

    command = compose_command()
    if command is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    variables = {
        "COGALORA_IMAGE": "registry.example/cogalora:1",
        "PROMETHEUS_IMAGE": "registry.example/prometheus:1",
        "GRAFANA_IMAGE": "registry.example/grafana:1",
        "BASE_IMAGE": "mirror.example/python:3.11-slim",
    }
    done = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **variables},
    )
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    for name in ("cogalora", "prometheus", "grafana"):
        assert services[name]["image"] == variables[f"{name.upper()}_IMAGE"], name
    assert services["cogalora"]["build"]["args"]["BASE_IMAGE"] == variables["BASE_IMAGE"]


def test_compose_runs_the_tested_start_command(compose_config: dict):
    service = compose_config["services"]["cogalora"]
    command = service.get("command")
    command = shlex.split(command) if isinstance(command, str) else command
    assert command == SERVICE_COMMAND
    assert not service.get("entrypoint"), "an entrypoint would change what the command runs"
    ports = service["ports"]
    assert any(str(port.get("target")) == "8000" for port in ports if isinstance(port, dict)) or any(
        str(port).endswith(":8000") for port in ports
    )


def _mounts(service: dict) -> dict[str, Path]:
    """container path -> host path of a compose service's bind mounts (after ``config``)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts[volume["target"]] = Path(volume["source"])
        else:
            source, target = volume.split(":")[:2]
            mounts[target] = Path(source)
    return mounts


def test_compose_mounts_the_files_in_this_repository(compose_config: dict):
    services = compose_config["services"]
    prometheus_mounts = _mounts(services["prometheus"])
    config_flag = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    assert prometheus_mounts[config_flag.split("=", 1)[1]].resolve() == PROMETHEUS
    grafana_mounts = _mounts(services["grafana"])
    assert grafana_mounts["/etc/grafana/provisioning"].resolve() == DOCKER_DIR / "grafana" / "provisioning"
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text(encoding="utf-8"))["providers"]
    dashboards_path = providers[0]["options"]["path"]
    assert grafana_mounts[dashboards_path].resolve() == DASHBOARD.parent
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_path}/{DASHBOARD.name}"


# ---- Prometheus and Grafana ------------------------------------------------------------------


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration.strip())
    assert match, f"unsupported duration {duration!r}"
    return float(match.group(1)) * units[match.group(2)]


def _datasource() -> dict:
    datasources = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    assert len(datasources) == 1
    return datasources[0]


def test_scrape_interval_equals_grafana_time_interval():
    prometheus = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    global_interval = prometheus["global"]["scrape_interval"]
    job = next(job for job in prometheus["scrape_configs"] if job["job_name"] == "cogalora")
    interval = job.get("scrape_interval", global_interval)
    assert _seconds(interval) == _seconds(_datasource()["jsonData"]["timeInterval"])


def test_prometheus_and_grafana_point_at_the_compose_services():
    prometheus = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    job = next(job for job in prometheus["scrape_configs"] if job["job_name"] == "cogalora")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["cogalora:8000"]
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert "cogalora" in compose["services"]
    datasource = _datasource()
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]


def test_promtool_accepts_prometheus_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    done = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return promtool


def test_alert_rules_fire_on_synthetic_series():
    """Every alert fires where it should and stays quiet elsewhere (docker/prometheus/alerts.test.yml)."""
    promtool = _promtool()
    for command in (["check", "rules", str(ALERT_RULES)], ["test", "rules", str(ALERT_TESTS)]):
        done = subprocess.run([promtool, *command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text(encoding="utf-8")))
    defined = set(re.findall(r"- alert: (\w+)", ALERT_RULES.read_text(encoding="utf-8")))
    assert defined and defined == tested, (defined, tested)


def exported_series_names() -> set[str]:
    """Every series name the service's registry can expose (counters' _total, histograms' _bucket ...)."""
    from service.metrics import ServiceMetrics

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
    names = set()
    for family in ServiceMetrics().registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
    return names


def test_alert_rules_use_metrics_the_service_exports():
    rules = yaml.safe_load(ALERT_RULES.read_text(encoding="utf-8"))
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = {name for expr in exprs for name in re.findall(r"\bcogalora_\w+", expr)}
    assert used and used <= exported_series_names(), used - exported_series_names()


def test_compose_prometheus_loads_the_alert_rules(compose_config: dict):
    """Each rule file of prometheus.yml resolves, in the container, to a mounted file of this repository."""
    prometheus = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    rule_files = prometheus["rule_files"]
    assert rule_files and all(not Path(path).is_absolute() for path in rule_files)
    assert {(PROMETHEUS.parent / path).resolve() for path in rule_files} == {ALERT_RULES}
    service = compose_config["services"]["prometheus"]
    config_flag = next(a for a in service["command"] if a.startswith("--config.file="))
    container_dir = Path(config_flag.split("=", 1)[1]).parent
    mounts = {Path(target): source for target, source in _mounts(service).items()}
    for path in rule_files:
        target = container_dir / path
        mount = next((m for m in mounts if target.is_relative_to(m)), None)
        assert mount is not None, f"{target} is not mounted into the Prometheus container"
        assert (mounts[mount] / target.relative_to(mount)).resolve() == ALERT_RULES


def dashboard_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in (collapsed) rows."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def test_every_dashboard_panel_uses_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    uid = _datasource()["uid"]
    panels = [panel for panel in dashboard_panels(dashboard) if panel["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == uid, panel["title"]
            assert target["expr"].strip(), panel["title"]
    variables = dashboard["templating"]["list"]
    adapter = next(v for v in variables if v["name"] == "adapter")
    assert adapter["datasource"]["uid"] == uid
    ids = [panel["id"] for panel in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_queries_only_metrics_the_service_exports():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = [variable["definition"] for variable in dashboard["templating"]["list"]]
    exprs = [target["expr"] for panel in dashboard_panels(dashboard) for target in panel.get("targets", [])]
    used = {name for expr in exprs + variables for name in re.findall(r"\bcogalora_\w+", expr)}
    assert used and used <= exported_series_names(), used - exported_series_names()


def test_dashboard_json_is_generated_from_its_script():
    done = subprocess.run(
        [sys.executable, str(DOCKER_DIR / "grafana" / "make_dashboard.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
