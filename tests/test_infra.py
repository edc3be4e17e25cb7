"""Infra manifests: parse, required fields, entrypoints that run a valid spec from experiments/."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from ssl_platform.spec import is_secret_key, load_spec

INFRA = ROOT / "infra"


def _load(rel: str) -> dict:
    data = yaml.safe_load((INFRA / rel).read_text())
    assert isinstance(data, dict), rel
    return data


def _containers(pod_template: dict) -> list[dict]:
    containers = pod_template["spec"]["containers"]
    assert containers and all(c.get("image") for c in containers)
    return containers


def _check_env(container: dict) -> None:
    env = {e["name"]: e for e in container.get("env", [])}
    assert "MLFLOW_TRACKING_URI" in env and "AWS_ENDPOINT_URL_S3" in env
    for name, e in env.items():
        if is_secret_key(name):  # secrets only by reference to a k8s Secret, never literal
            assert "value" not in e and e["valueFrom"]["secretKeyRef"]["name"], name


def _check_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_c = _containers(head["template"])
    ports = {p["containerPort"] for p in head_c[0]["ports"]}
    assert {6379, 8265} <= ports
    assert "nvidia.com/gpu" not in head_c[0]["resources"]["limits"]  # a CPU head
    _check_env(head_c[0])
    groups = spec["workerGroupSpecs"]
    gpu = [g for g in groups if any("nvidia.com/gpu" in c["resources"]["limits"] for c in _containers(g["template"]))]
    assert gpu, "a GPU worker group"
    for g in groups:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        _check_env(_containers(g["template"])[0])


def test_raycluster_manifest():
    doc = _load("kuberay/raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])


def test_rayjob_manifest_runs_a_valid_spec(tmp_path):
    doc = _load("kuberay/rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    _check_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True
    yaml.safe_load(spec["runtimeEnvYAML"])
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "ssl_platform", "run"], argv
    spec_path = argv[4]
    # The image holds the repo at /app (infra/docker/Dockerfile WORKDIR).
    local = ROOT / Path(spec_path).relative_to("/app") if spec_path.startswith("/app/") else ROOT / spec_path
    assert local.is_file() and local.parent == ROOT / "experiments", spec_path
    loaded = load_spec(local, argv[5:], base_dir=str(tmp_path))
    assert loaded.scaling.use_gpu is True and loaded.checkpoint.uri.startswith("s3://")
    assert loaded.tracking.uri.startswith("http")


def test_dockerfile_installs_the_project():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S*pytorch\S*cuda", text, re.M) and re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    assert "WORKDIR /app" in text and "pip install -e ." in text
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        sources = line.split()[:-1]
        # a glob may match nothing (README.m[d]) as long as one source of the COPY exists
        assert any(list(ROOT.glob(src)) for src in sources), f"Dockerfile copies missing {sources}"
        for src in sources:
            assert "*" in src or "[" in src or (ROOT / src).exists(), f"Dockerfile copies missing {src}"


def test_aws_cluster_launcher_config_matches_ray_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    doc = _load("aws/cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(doc, schema)
    assert doc["provider"]["type"] == "aws" and doc["head_node_type"] in doc["available_node_types"]
    workers = [t for n, t in doc["available_node_types"].items() if n != doc["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # a GPU instance family
    assert sum(t.get("min_workers", 0) for t in workers) <= doc["max_workers"]
    assert not any(is_secret_key(k) for k in json.dumps(doc).split('"'))
