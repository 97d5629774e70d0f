"""deploy/kubernetes: schema-valid manifests (kubernetes-validate, offline) that agree with the server.

The essentials are checked against the server's own code: the probes hit the gRPC port the
config map binds, the grace period covers server.grace_period_s, the HPA's metric is one the
server exports, and the config map is a config `bitserve check-config` accepts.
"""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError

from bitserve.metrics import Metrics
from bitserve.settings import build_settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # oldest we support: native gRPC probes are GA from 1.27, preStop sleep from 1.30


def _docs() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for f in sorted(K8S.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(f.read_text()):
            out[doc["kind"]] = doc
    return out


DOCS = _docs()


def _validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("kind", sorted(DOCS))
def test_manifest_is_schema_valid(kind):
    _validate(DOCS[kind])


def test_the_validator_rejects_a_misspelt_field():
    broken = copy.deepcopy(DOCS["Deployment"])
    c = broken["spec"]["template"]["spec"]["containers"][0]
    c["readinessProbe"]["grpcc"] = c["readinessProbe"].pop("grpc")
    with pytest.raises(ValidationError, match="grpcc"):
        _validate(broken)


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")


def _settings():
    raw = DOCS["ConfigMap"]["data"]["bitserve.yaml"]
    return build_settings(config_data=yaml.safe_load(raw), environ={}, check_paths=False), yaml.safe_load(raw)


def _pod() -> dict:
    return DOCS["Deployment"]["spec"]["template"]


def _container() -> dict:
    (c,) = _pod()["spec"]["containers"]
    return c


def test_config_map_is_a_valid_config_that_sets_the_grace_period_explicitly():
    settings, raw = _settings()
    assert raw["server"]["grace_period_s"] == 30  # explicit: does not follow the default
    assert settings.server.host == "0.0.0.0"
    assert all(m.path.startswith("/models/") for m in settings.models)
    mounts = {m["mountPath"]: m for m in _container()["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    args = _container()["args"]
    config_path = Path(args[args.index("--config") + 1])
    assert args[0] == "serve" and str(config_path.parent) in mounts
    volumes = {v["name"]: v for v in _pod()["spec"]["volumes"]}
    assert (
        volumes[mounts[str(config_path.parent)]["name"]]["configMap"]["name"]
        == DOCS["ConfigMap"]["metadata"]["name"]
    )


def test_probes_are_native_grpc_health_checks_on_the_served_port():
    settings, _ = _settings()
    c = _container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == settings.server.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": settings.server.port, "service": ""}, probe


def test_termination_grace_covers_the_server_grace_and_liveness_never_kills_a_draining_pod():
    settings, _ = _settings()
    spec = _pod()["spec"]
    c = _container()
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    total = spec["terminationGracePeriodSeconds"]
    assert total >= pre_stop + settings.server.grace_period_s + 5  # a margin for the engines to stop
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > total


def test_gpu_is_requested_and_the_pod_runs_as_the_image_user():
    c = _container()
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    sc = _pod()["spec"]["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001  # the Dockerfile's user


def test_headless_service_selects_the_pods_and_exposes_grpc():
    svc = DOCS["Service"]["spec"]
    assert svc["clusterIP"] == "None"  # DNS lists every pod: client-side round_robin
    labels = _pod()["metadata"]["labels"]
    assert svc["selector"].items() <= labels.items()
    grpc_port = next(p for p in svc["ports"] if p["name"] == "grpc")
    assert grpc_port["targetPort"] == "grpc" and grpc_port["appProtocol"] == "grpc"


def test_scrape_annotations_point_at_the_metrics_port():
    settings, _ = _settings()
    ann = _pod()["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == settings.server.metrics_port
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    assert ports["metrics"] == settings.server.metrics_port


def test_pdb_selects_the_pods_and_keeps_all_but_one():
    pdb = DOCS["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= _pod()["metadata"]["labels"].items()
    assert pdb["maxUnavailable"] == 1 and DOCS["Deployment"]["spec"]["replicas"] >= 2


def test_hpa_scales_the_deployment_on_an_exported_queue_metric():
    hpa = DOCS["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "bitserve"}
    assert DOCS["Deployment"]["metadata"]["name"] == "bitserve"
    (metric,) = hpa["metrics"]
    name = metric["pods"]["metric"]["name"]
    exported = {m.name for m in Metrics().registry.collect()}
    assert name == "bitserve_queue_depth" and name in exported
    assert hpa["minReplicas"] >= DOCS["PodDisruptionBudget"]["spec"]["maxUnavailable"] + 1
