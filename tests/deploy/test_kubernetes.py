"""deploy/kubernetes: the base and every overlay, rendered by kustomize, are valid Kubernetes
objects (kubernetes-validate, strict, oldest and newest supported versions); the CRDs (KEDA
ScaledObject, ServiceMonitor) are checked against the hand-written schemas in schemas/; and the
pieces fit together: selectors, named ports, probes on the right paths, termination long enough
for in-flight jobs, secrets only from Secrets, KEDA queries on metrics the worker exports."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from broker.cli import _parser
from broker.core.settings import Settings
from tenants.crypto import generate_secret_key
from workers.main import Health, build_worker
from workers.metrics import WorkerMetrics

from .tooling import DEPLOY, kustomize, load_all, schema

KUBE = DEPLOY / "kubernetes"
TARGETS = sorted([KUBE / "base", *(p for p in (KUBE / "overlays").iterdir() if p.is_dir())])
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-v1.json",
}
SECRET_VARS = {"BROKER_SECRET_KEY", "BROKER_ADMIN_TOKEN", "BROKER_OPENAI_API_KEY", "BROKER_AVATURN_API_KEY",
               "BROKER_REDIS_URL"}
Docs = list[dict[str, Any]]


@pytest.fixture(scope="module", params=TARGETS, ids=lambda p: str(p.relative_to(KUBE)))
def rendered(request: pytest.FixtureRequest) -> Docs:
    return load_all(kustomize(request.param))


def _validate(doc: dict[str, Any]) -> list[str]:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        validator = jsonschema.Draft202012Validator(schema(CRD_SCHEMAS[key]))
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{version} {'/'.join(map(str, exc.path))}: {exc.message}")
    return errors


def _of(docs: Docs, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _container(deploy: dict[str, Any]) -> dict[str, Any]:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def _port(container: dict[str, Any], ref: int | str) -> int:
    if isinstance(ref, int):
        return ref
    return next(p["containerPort"] for p in container["ports"] if p["name"] == ref)


def test_every_object_is_valid(rendered: Docs) -> None:
    assert rendered
    problems = {f"{d['kind']}/{d['metadata']['name']}": _validate(d) for d in rendered}
    assert {k: v for k, v in problems.items() if v} == {}


def test_validators_are_live(rendered: Docs) -> None:
    """A misspelt field fails both the Kubernetes schemas and the CRD schemas."""
    deploy = copy.deepcopy(_of(rendered, "Deployment")["session-broker-api"])
    _container(deploy)["livenessProb"] = _container(deploy).pop("livenessProbe")
    assert _validate(deploy)
    scaled = copy.deepcopy(next(iter(_of(rendered, "ScaledObject").values())))
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")
    assert _validate(scaled)
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(unknown, K8S_VERSIONS[-1], strict=True)


def test_kinds_present(rendered: Docs) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    for expected in [("Deployment", "session-broker-api"), ("Deployment", "session-broker-worker"),
                     ("Service", "session-broker-api"), ("HorizontalPodAutoscaler", "session-broker-api"),
                     ("ScaledObject", "session-broker-worker"), ("PodDisruptionBudget", "session-broker-api"),
                     ("PodDisruptionBudget", "session-broker-worker"), ("ConfigMap", "session-broker-config")]:
        assert expected in kinds


def test_api_probes_resources_and_args(rendered: Docs) -> None:
    api = _of(rendered, "Deployment")["session-broker-api"]
    c = _container(api)
    args = _parser().parse_args(c["args"])
    assert args.command == "api" and args.host == "0.0.0.0"
    assert _port(c, c["livenessProbe"]["httpGet"]["port"]) == args.port == 8000
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert _port(c, c["readinessProbe"]["httpGet"]["port"]) == 8000
    # /metrics on the metrics port only (the tenant port answers 404 for it)
    assert _port(c, "metrics") == args.metrics_port == 9100 and args.metrics_port != args.port
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9100"


async def test_worker_probes_and_graceful_termination(rendered: Docs) -> None:
    """terminationGracePeriodSeconds exceeds what a SIGTERMed worker may need: arq's
    job_completion_wait plus the longest job timeout (read from the real worker)."""
    worker_deploy = _of(rendered, "Deployment")["session-broker-worker"]
    c = _container(worker_deploy)
    args = _parser().parse_args(c["args"])
    assert args.command == "worker" and args.metrics_host == "0.0.0.0"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] == "/healthz"
        assert _port(c, c[probe]["httpGet"]["port"]) == args.metrics_port == 9100
    assert worker_deploy["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9100"
    settings = Settings.from_env({"BROKER_SECRET_KEY": generate_secret_key()})
    worker = build_worker(settings, WorkerMetrics(), Health(), handle_signals=False)  # on this test's loop
    await worker.pool.aclose()
    needed = worker.shutdown_grace_s  # the SIGTERM wait for work in flight + the longest attempt
    assert needed >= 50
    assert worker_deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > needed


def test_resources_and_hardening(rendered: Docs) -> None:
    for deploy in _of(rendered, "Deployment").values():
        pod = deploy["spec"]["template"]["spec"]
        c = _container(deploy)
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"/tmp"} <= {m["mountPath"] for m in c["volumeMounts"]}


def test_secrets_only_from_secret_objects(rendered: Docs) -> None:
    """Secret settings reach the pods only through a Secret (envFrom secretRef or
    secretKeyRef), never as a literal env value or ConfigMap key; and the ConfigMap holds valid
    settings (parsed by the real Settings, with stand-ins for the secrets)."""
    config = _of(rendered, "ConfigMap")["session-broker-config"]["data"]
    assert not SECRET_VARS & set(config)
    for deploy in _of(rendered, "Deployment").values():
        c = _container(deploy)
        for env in c.get("env", []):
            assert env["name"] not in SECRET_VARS or "secretKeyRef" in env.get("valueFrom", {}), env
        refs = [e for e in c["envFrom"] if "secretRef" in e]
        assert [r["secretRef"]["name"] for r in refs] == ["session-broker-secrets"]
    assert not _of(rendered, "Secret"), "no Secret with values in git"
    env = {**config, "BROKER_SECRET_KEY": generate_secret_key(), "BROKER_ADMIN_TOKEN": "x" * 24,
           "BROKER_REDIS_URL": "rediss://:password@unused:6379/0"}
    settings = Settings.from_env(env)
    assert settings.worker_max_jobs >= 1
    if "BROKER_REDIS_SENTINELS" in config:
        assert len(settings.redis_sentinels) >= 3 and settings.redis_sentinel_service


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_and_ports_fit(rendered: Docs) -> None:
    deploys = _of(rendered, "Deployment")
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deploys.items()}
    for name, d in deploys.items():
        assert _matches(d["spec"]["selector"]["matchLabels"], pods[name])
    for pdb in _of(rendered, "PodDisruptionBudget").values():
        assert sum(_matches(pdb["spec"]["selector"]["matchLabels"], p) for p in pods.values()) == 1
    for svc in _of(rendered, "Service").values():
        selected = [n for n, p in pods.items() if _matches(svc["spec"]["selector"], p)]
        assert len(selected) == 1, svc["metadata"]["name"]
        c = _container(deploys[selected[0]])
        for port in svc["spec"]["ports"]:
            _port(c, port["targetPort"])  # raises StopIteration for an unknown named port
    hpa = _of(rendered, "HorizontalPodAutoscaler")["session-broker-api"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "session-broker-api"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= 2


def _exported_metric_names() -> set[str]:
    names = set()
    for family in WorkerMetrics().registry.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def test_keda_scales_workers_on_backlog_and_due_work(rendered: Docs) -> None:
    """The ScaledObject targets the worker Deployment, never scales to zero (workers run the
    sweeper and the expiry terminations), and its queries use gauges the worker exports,
    aggregated with max() (every worker exports the same Redis-wide values)."""
    scaled = _of(rendered, "ScaledObject")["session-broker-worker"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "session-broker-worker"
    assert scaled["minReplicaCount"] >= 2 and scaled["maxReplicaCount"] > scaled["minReplicaCount"]
    queries = [t["metadata"]["query"] for t in scaled["triggers"] if t["type"] == "prometheus"]
    used = {m for q in queries for m in re.findall(r"\b(broker_[a-z_]+)", q)}
    assert {"broker_queue_jobs", "broker_due_terminations"} <= used
    assert used <= _exported_metric_names(), used - _exported_metric_names()
    assert all("sum(" not in q for q in queries)
    assert 'state="due"' in " ".join(queries), "due jobs, not the whole queue (deferred expiries are not work)"
    for t in scaled["triggers"]:
        assert t["metadata"]["serverAddress"].startswith("http") and float(t["metadata"]["threshold"]) > 0


def test_service_monitors_match_the_prometheus_job_names(rendered: Docs) -> None:
    """Where ServiceMonitors are rendered, each selects exactly one Service whose name is a
    job name of deploy/prometheus/prometheus.yml (the dashboards and rules use those names),
    on a port that Service has."""
    monitors = _of(rendered, "ServiceMonitor")
    if not monitors:
        assert all(d["kind"] != "ServiceMonitor" for d in rendered)
        return
    import yaml

    jobs = {j["job_name"] for j in yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())["scrape_configs"]}
    services = _of(rendered, "Service")
    for monitor in monitors.values():
        selected = [s for s in services.values() if _matches(monitor["spec"]["selector"]["matchLabels"],
                                                                s["metadata"].get("labels", {}))]
        assert len(selected) == 1, monitor["metadata"]["name"]
        assert selected[0]["metadata"]["name"] in jobs
        port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
        assert all(e["port"] == "metrics" for e in monitor["spec"]["endpoints"]), "never the tenant port"


def test_production_pins_its_image() -> None:
    docs = load_all(kustomize(KUBE / "overlays" / "production"))
    for deploy in _of(docs, "Deployment").values():
        image = _container(deploy)["image"]
        assert ":" in image and not image.endswith(":latest"), image
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"session-broker"}


def test_kustomize_targets_found() -> None:
    assert KUBE / "base" in TARGETS and KUBE / "overlays" / "production" in TARGETS
    assert all((Path(t) / "kustomization.yaml").exists() for t in TARGETS)
