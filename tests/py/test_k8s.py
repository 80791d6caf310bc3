"""docker/k8s/: the manifests are valid Kubernetes objects (kubernetes-validate,
strict, against its bundled schemas) and say what the fleet deployment needs:
one pod per GPU node that sees the GPUs without claiming them, the data dir
and HF cache on a hostPath, the token and S3 credentials from Secrets, probes
on /healthz and /readyz, Prometheus annotations, and server flags that
modelprepd really accepts. No cluster runs here."""
import glob
import os
import subprocess

import pytest
import yaml

from conftest import SAN, REPO

kv = pytest.importorskip("kubernetes_validate")
K8S = os.path.join(REPO, "docker", "k8s")


def docs():
    out = []
    for f in sorted(glob.glob(os.path.join(K8S, "*.yaml"))):
        with open(f) as fh:
            out += [(f, d) for d in yaml.safe_load_all(fh) if d]
    return out


def test_manifests_validate():
    ds = docs()
    assert {d["kind"] for _, d in ds} >= {"DaemonSet", "Service", "Secret", "ConfigMap"}
    for f, d in ds:
        kv.validate(d, kv.latest_version(), strict=True)


def test_daemonset_shape():
    ds = [d for _, d in docs() if d["kind"] == "DaemonSet"]
    assert len(ds) == 1
    spec = ds[0]["spec"]["template"]["spec"]
    ann = ds[0]["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    (c,) = spec["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # GPUs visible, not claimed from the inference pods
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in c.get("resources", {}).get(section, {})
    env = {e["name"]: e for e in c["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert vols["data"]["hostPath"]["path"] and mounts["data"] == "/data"
    assert env["HF_HOME"]["value"].startswith(mounts["data"])
    secrets = {v["secret"]["secretName"] for v in vols.values() if "secret" in v}
    assert secrets == {"modelprep-token", "modelprep-s3"}
    # every flag is one modelprepd accepts
    usage = subprocess.run([os.path.join(SAN, "modelprepd"), "--help"], capture_output=True,
                           text=True, check=True).stdout
    for a in c["args"]:
        flag = a.split("=", 1)[0]
        assert flag + " " in usage, flag
    names = [p["name"] for p in c["ports"]]
    svc = [d for _, d in docs() if d["kind"] == "Service"]
    for s in svc:
        assert s["spec"]["selector"] == ds[0]["spec"]["selector"]["matchLabels"]
        assert all(p["targetPort"] in names for p in s["spec"]["ports"])
