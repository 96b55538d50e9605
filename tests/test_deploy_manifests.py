"""The deployment files: etc/kubernetes/*.yaml against the Kubernetes API schemas
(kubernetes-validate, which bundles them: no cluster, no network), the promises
README.rst makes about them, the cluster mta.toml they carry, and
etc/haproxy/haproxy.cfg checked by HAProxy itself (`haproxy -c`)."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import pytest

from mta.config import ConfigError, build_config
from tests.conftest import REPO_ROOT, require_tool

K8S = REPO_ROOT / "etc" / "kubernetes"
HAPROXY_CFG = REPO_ROOT / "etc" / "haproxy" / "haproxy.cfg"
# The oldest Kubernetes release the manifests are written for, and the newest schema
# kubernetes-validate has.
OLDEST = "1.28.0"

# Keys of the cluster config whose features other work adds ([queue] backend =
# "postgresql", [database], the S3 store): until they land, build_config may refuse
# these and only these.  Any other error in the ConfigMap's mta.toml fails.
# Mounted from a Secret in the pod, absent here: the only error the config may give.
SECRET_FILES = ("storage.s3.secret_access_key_file",)


def _validator():
    try:
        import kubernetes_validate
    except ImportError:
        reason = "kubernetes-validate is not installed (pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(f"CI: {reason}", pytrace=False)
        pytest.skip(reason)
    return kubernetes_validate


def manifests() -> list[tuple[str, dict]]:
    yaml = pytest.importorskip("yaml")
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append((f"{path.name}#{i}", doc))
    return out


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def test_every_manifest_is_valid_kubernetes():
    kv = _validator()
    found = manifests()
    assert {doc["kind"] for _, doc in found} >= {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }
    for version in (OLDEST, kv.latest_version()):
        for name, doc in found:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{name} is not valid for Kubernetes {version}: {e}")


def test_an_invalid_manifest_is_caught():
    """The validator really checks: a typo in a field name fails."""
    kv = _validator()
    [deployment] = by_kind("Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 3}}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)


def _container() -> dict:
    [deployment] = by_kind("Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_probes_ports_and_resources():
    container = _container()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports) == {"smtp", "submission", "smtps", "http"}
    assert container["readinessProbe"]["httpGet"]["port"] == "http"
    assert container["resources"]["requests"]["cpu"]  # the HPA's 70% is of this

    cfg = tomllib.loads(by_kind("ConfigMap")[0]["data"]["mta.toml"])
    listening = {item["name"]: int(item["address"].rpartition(":")[2]) for item in cfg["listener"]}
    assert listening == {k: v for k, v in ports.items() if k != "http"}
    assert int(cfg["http"]["address"].rpartition(":")[2]) == ports["http"]


def test_services_pdb_and_hpa_select_the_pods():
    [deployment] = by_kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    names = {p["name"] for p in _container()["ports"]}
    services = by_kind("Service")
    smtp = [s for s in services if s["spec"].get("type") == "LoadBalancer"]
    assert smtp, "no LoadBalancer Service for SMTP"
    assert {p["port"] for p in smtp[0]["spec"]["ports"]} == {25, 587, 465}
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names
    [pdb] = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [hpa] = by_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}


def test_secrets_are_referenced_never_written():
    container = _container()
    volumes = deployment_volumes()
    assert {"mta-tls", "mta-s3"} <= {v["secret"]["secretName"] for v in volumes if "secret" in v}
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert "mta-database" in refs
    assert not by_kind("Secret")
    text = by_kind("ConfigMap")[0]["data"]["mta.toml"]
    cfg = tomllib.loads(text)
    assert ":" not in cfg["database"]["dsn"].partition("//")[2].partition("@")[0]  # no password
    s3_key = cfg["storage"]["s3"]["secret_access_key_file"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert s3_key.startswith(mounts["s3"] + "/")


def deployment_volumes() -> list[dict]:
    [deployment] = by_kind("Deployment")
    return deployment["spec"]["template"]["spec"]["volumes"]


def test_the_cluster_config_is_valid():
    text = by_kind("ConfigMap")[0]["data"]["mta.toml"]
    data = tomllib.loads(text)
    assert data["queue"]["backend"] == "postgresql"
    assert data["database"]["dsn"].startswith("postgresql://")
    assert {"endpoint", "bucket", "secret_access_key_file"} <= set(data["storage"]["s3"])
    try:
        build_config(data, source="etc/kubernetes/configmap.yaml")
    except ConfigError as e:
        other = [str(err) for err in e.errors if err.key not in SECRET_FILES]
        assert not other, "\n".join(other)


def test_haproxy_accepts_the_shipped_configuration(tmp_path):
    haproxy = require_tool("haproxy")
    text = HAPROXY_CFG.read_text()
    assert "send-proxy-v2" in text and "option httpchk" in text and "uri /readyz" in text
    checked = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CFG)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_haproxy_check_fails_on_a_broken_configuration(tmp_path):
    haproxy = require_tool("haproxy")
    broken = tmp_path / "haproxy.cfg"
    broken.write_text(HAPROXY_CFG.read_text().replace("send-proxy-v2", "send-proxy-v3"))
    checked = subprocess.run(
        [haproxy, "-c", "-f", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode != 0


def test_readme_names_the_files():
    readme = (REPO_ROOT / "README.rst").read_text()
    for path in [HAPROXY_CFG, *sorted(K8S.glob("*.yaml"))]:
        assert str(Path(path).relative_to(REPO_ROOT)) in readme, path
