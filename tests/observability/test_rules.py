"""Alert rules, their promtool unit tests, the scrape config and the generated artefacts."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from workers.metrics import LATENCY_BUCKETS

from .helpers import prometheus_binaries

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "rules" / "session-broker.rules.yml"
RULE_TESTS = PROM / "tests" / "session-broker.rules.test.yml"
REQUIRED = {"BrokerTargetDown", "BrokerAdmissionErrorRatioHigh", "BrokerTimeToReadySLOFastBurn",
            "BrokerQueueBackingUp", "BrokerTerminationsLate", "BrokerTerminationsFailing",
            "BrokerUpstreamErrorRatioHigh"}


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.parent.name + "_generate", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    _, tool = prometheus_binaries()
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_rules_and_config() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = promtool("check", "config", str(PROM / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "session-broker.rules.yml" in config.stdout  # the rule_files glob finds the rules


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_runbook_and_firing_and_quiet_tests() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert REQUIRED <= names
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert len(rule["annotations"]["runbook"]) > 40 and rule["annotations"]["summary"]
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fires = {t["alert_rule_test"][0]["alertname"] for t in tests if t["alert_rule_test"][0]["exp_alerts"]}
    quiet = {t["alert_rule_test"][0]["alertname"] for t in tests if not t["alert_rule_test"][0]["exp_alerts"]}
    assert fires == names and quiet == names


def test_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The promtool tests can fail: a rule whose threshold is changed behind the tests' back
    (here BrokerQueueBackingUp at 1000 s) makes them fail."""
    gen = load(PROM / "generate.py")
    for path, text in gen.outputs(gen.parse_overrides([]), tmp_path).items():
        path.write_text(text)
    rules = tmp_path / RULES.name
    rules.write_text(rules.read_text().replace("max(broker_queue_oldest_due_age_seconds) > 10",
                                                "max(broker_queue_oldest_due_age_seconds) > 1000"))
    tests = yaml.safe_load((tmp_path / RULE_TESTS.name).read_text())
    tests["tests"] = [t for t in tests["tests"] if t["alert_rule_test"][0]["alertname"] == "BrokerQueueBackingUp"]
    (tmp_path / "queue.test.yml").write_text(yaml.safe_dump(tests))
    result = promtool("test", "rules", "queue.test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "BrokerQueueBackingUp" in result.stdout + result.stderr


def test_overridden_thresholds_regenerate_passing_rules(tmp_path: Path) -> None:
    gen = load(PROM / "generate.py")
    t = gen.parse_overrides(["queue_oldest_due_seconds=45", "ttr_slo_seconds=2.5", "ttr_slo_target=0.995",
                             "termination_lateness_p99_seconds=8"])
    for path, text in gen.outputs(t, tmp_path).items():
        path.write_text(text)
    text = (tmp_path / RULES.name).read_text()
    assert "max(broker_queue_oldest_due_age_seconds) > 45" in text and 'le="2.5"' in text
    tests = yaml.safe_load((tmp_path / RULE_TESTS.name).read_text())
    changed = {"BrokerQueueBackingUp", "BrokerTimeToReadySLOFastBurn", "BrokerTimeToReadySLOSlowBurn",
               "BrokerTerminationsLate"}
    tests["tests"] = [t for t in tests["tests"] if t["alert_rule_test"][0]["alertname"] in changed]
    assert len(tests["tests"]) >= 2 * len(changed)
    (tmp_path / "changed.test.yml").write_text(yaml.safe_dump(tests))
    result = promtool("test", "rules", "changed.test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    with pytest.raises(SystemExit):
        gen.parse_overrides(["ttr_slo_seconds=3"])  # not a bucket bound


def test_generated_files_are_up_to_date() -> None:
    gen = load(PROM / "generate.py")
    for path, text in gen.outputs(gen.parse_overrides([])).items():
        assert path.read_text() == text, f"{path} is stale: run python deploy/prometheus/generate.py"
    dash = load(ROOT / "deploy" / "grafana" / "generate.py")
    assert dash.OUT.read_text() == dash.render(), "run python deploy/grafana/generate.py"
    assert tuple(gen.TTR_BUCKETS) == tuple(LATENCY_BUCKETS)
    assert gen.le(5) == "5.0" and gen.le(2.5) == "2.5"  # prometheus-client's rendering of `le`


def test_dashboard_shape() -> None:
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "session-broker.json").read_text())
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Overview", "Tenants", "Queue and workers", "Upstreams", "Terminations", "Webhooks"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "label_values(broker_admissions_total, tenant)" in variables["tenant"]["definition"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
        for t in p["targets"]:
            # Shared-state gauges are exported by every worker: never summed across workers.
            for gauge in ("broker_queue_jobs", "broker_live_sessions", "broker_due_terminations",
                          "broker_provisioning_backlog", "broker_queue_oldest_due_age_seconds",
                          "broker_webhook_pending_deliveries"):
                assert f"sum({gauge}" not in t["expr"] and f"sum by (state) ({gauge}" not in t["expr"]
    row, tenant_row = "", []
    for p in dash["panels"]:
        row = p["title"] if p["type"] == "row" else row
        if row == "Tenants" and p["type"] != "row":
            tenant_row.append(p)
    assert len(tenant_row) >= 4
    for p in tenant_row:  # the tenant variable filters every panel of the tenants row
        assert all('tenant=~"$tenant"' in t["expr"] for t in p["targets"]), p["title"]
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    ds = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    boards = yaml.safe_load((provisioning / "dashboards" / "dashboards.yaml").read_text())
    assert boards["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
