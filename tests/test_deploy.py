"""Deployment artefacts, checked against the real schemas and a real local cluster.

- k8s/: every kustomization is rendered (cluster/render.py, compared with `kubectl
  kustomize` where kubectl exists); RayCluster/RayJob are validated against the KubeRay
  v1.7.0 CRDs (Draft 7, as published and with unknown fields refused, as the API server
  does with strict field validation) plus the KubeRay operator's own semantic rules;
  ConfigMaps and the example Secret with kubernetes-validate; the PodMonitor and the
  Grafana dashboard by hand; references between objects must resolve; the job
  entrypoints must parse with dmlray's own CLI and config.
- cluster/: launcher configs against the schema inside the ray wheel; the Dockerfile,
  manifests and launcher agree on image and Ray version.
- cluster/local_cluster.py: a real head + worker node + SeaweedFS, up and down (slow).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
CRD_DIR = SHARED / "schemas" / "kuberay"
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ["base", "overlays/cpu-smoke", "overlays/gpu"]
IMAGE = "ghcr.io/dmlray/dmlray:0.1.0"
RAY_VERSION = "2.60.0"
K8S_VERSION = "1.33.0"  # a Kubernetes release kubernetes-validate ships schemas for
SECRET_EXAMPLE = K8S / "base" / "secret.example.yaml"
# The Secrets the manifests need, shipped as examples outside every kustomization.
SECRET_EXAMPLES = [SECRET_EXAMPLE, K8S / "base" / "secret-ray-auth.example.yaml"]
METRICS_PORT = 8080


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


render = _load("dmlray_cluster_render", ROOT / "cluster" / "render.py")
local_cluster = _load("dmlray_local_cluster", ROOT / "cluster" / "local_cluster.py")


@functools.cache
def _rendered(kustomization: str) -> tuple[dict, ...]:
    return tuple(render.render(K8S / kustomization))


def rendered(kustomization: str) -> list[dict]:
    """A fresh copy of the rendered resources (tests may not mutate the cache)."""
    return json.loads(json.dumps(_rendered(kustomization)))


def of_kind(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r["kind"] == kind]


def by_name(resources: list[dict], kind: str) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in of_kind(resources, kind)}


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of a RayCluster or RayJob."""
    if obj["kind"] == "RayCluster":
        spec = obj["spec"]
        return [("head", spec["headGroupSpec"]["template"])] + [
            (f"worker group {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])
        ]
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        return [("submitter", obj["spec"]["submitterPodTemplate"])]
    return []


def ray_templates(resources: list[dict]) -> list[tuple[str, dict]]:
    """Pod templates of the Ray nodes (head and worker groups) of every RayCluster."""
    return [(f"{c['metadata']['name']} {w}", t) for c in of_kind(resources, "RayCluster") for w, t in pod_templates(c)]


def secret_example() -> dict:
    return yaml.safe_load(SECRET_EXAMPLE.read_text())


def secret_examples() -> dict[str, dict]:
    """Every example Secret, by name."""
    docs = [yaml.safe_load(path.read_text()) for path in SECRET_EXAMPLES]
    return {d["metadata"]["name"]: d for d in docs}


def mounted_file(template: dict, path: str, configmaps: dict[str, dict]) -> str | None:
    """Content of `path` in the first container of a pod template, when a ConfigMap volume
    provides it; None otherwise."""
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    for mount in template["spec"]["containers"][0].get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        volume = volumes.get(mount["name"], {})
        if path.startswith(prefix) and "configMap" in volume:
            cm = configmaps.get(volume["configMap"]["name"])
            if cm is not None:
                return cm.get("data", {}).get(path[len(prefix) :])
    return None


# ------------------------------------------------------------------------- the renderer


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renderer_matches_kubectl_kustomize(kustomization):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: cluster/render.py is not compared with kustomize here")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=120, check=True
    ).stdout

    def key(r):
        return r["kind"], r["metadata"].get("namespace", ""), r["metadata"]["name"]

    theirs = {key(r): r for r in yaml.safe_load_all(out) if r}
    mine = {key(r): r for r in rendered(kustomization)}
    assert sorted(mine) == sorted(theirs)
    for k in mine:
        assert mine[k] == theirs[k], f"{k} differs from kubectl kustomize"


def test_renderer_semantics(tmp_path):
    base = tmp_path / "base"
    (base / "cfg").mkdir(parents=True)
    (base / "cfg" / "a.txt").write_text("A")
    (base / "cfg" / "x.env").write_text("# comment\nX=1\n")
    (base / "obj.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "ray.io/v1",
                "kind": "RayJob",
                "metadata": {"name": "job"},
                "spec": {"entrypoint": "e", "list": [{"name": "a"}, {"name": "b"}], "drop": 1},
            }
        )
    )
    (base / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["obj.yaml"],
                "generatorOptions": {"disableNameSuffixHash": True},
                "configMapGenerator": [
                    {"name": "cm", "files": ["cfg/a.txt", "renamed=cfg/a.txt"], "envs": ["cfg/x.env"]}
                ],
            }
        )
    )
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "b.txt").write_text("B")
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["../base"],
                "namespace": "ns",
                "labels": [{"pairs": {"team": "dml"}, "includeSelectors": False}],
                "generatorOptions": {"disableNameSuffixHash": True},
                "configMapGenerator": [{"name": "cm", "behavior": "merge", "files": ["a.txt=b.txt"]}],
                "patches": [
                    {
                        "target": {"kind": "RayJob", "name": "job"},
                        "patch": "- {op: test, path: /spec/list/1/name, value: b}\n"
                        "- {op: remove, path: /spec/list/0}\n"
                        "- {op: add, path: /spec/list/-, value: {name: c}}\n"
                        "- {op: replace, path: /spec/entrypoint, value: f}",
                    },
                    {
                        "patch": "apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: job}\n"
                        "spec: {drop: null, extra: {k: v}}"
                    },
                ],
            }
        )
    )
    out = {r["kind"]: r for r in render.render(overlay)}
    assert out["ConfigMap"]["data"] == {"a.txt": "B", "renamed": "A", "X": "1"}
    assert out["ConfigMap"]["metadata"] == {"name": "cm", "namespace": "ns", "labels": {"team": "dml"}}
    job = out["RayJob"]
    assert job["metadata"]["namespace"] == "ns" and job["metadata"]["labels"] == {"team": "dml"}
    assert job["spec"] == {"entrypoint": "f", "list": [{"name": "b"}, {"name": "c"}], "extra": {"k": "v"}}

    def refused(kustomization: dict, match: str) -> None:
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["../base"], **kustomization}))
        with pytest.raises(render.RenderError, match=match):
            render.render(overlay)

    refused(
        {"patches": [{"target": {"kind": "RayJob"}, "patch": "- {op: test, path: /spec/entrypoint, value: x}"}]},
        "test failed",
    )
    refused(
        {"patches": [{"patch": "apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: job}\nspec: {list: []}"}]},
        "JSON6902",
    )
    refused(
        {
            "configMapGenerator": [{"name": "other", "files": ["../base/cfg/a.txt"]}],
            "generatorOptions": {"disableNameSuffixHash": True},
        },
        "outside",
    )
    refused({"configMapGenerator": [{"name": "other", "literals": ["a=b"]}]}, "disableNameSuffixHash")
    refused({"namePrefix": "x-"}, "not supported")


# ------------------------------------------------------------------- KubeRay CRD schemas


def _strict(schema):
    """The schema with unknown fields refused wherever the CRD lists an object's fields
    (what the API server does with strict field validation, kubectl's default)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        out.get("type") == "object"
        and isinstance(out.get("properties"), dict)
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators():
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found: {CRD_DIR} (the shared/ folder beside the checkout) is absent")
    import jsonschema

    validators = {}
    for kind, file in (("RayCluster", "ray.io_rayclusters.yaml"), ("RayJob", "ray.io_rayjobs.yaml")):
        # the CRDs are megabytes of YAML: use libyaml when it is there
        crd = yaml.load((CRD_DIR / file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = v1["schema"]["openAPIV3Schema"]
        validators[kind] = (jsonschema.Draft7Validator(schema), jsonschema.Draft7Validator(_strict(schema)))
    return validators


def _errors(validator, obj) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ray_resources_match_kuberay_crds(kustomization, crd_validators):
    resources = rendered(kustomization)
    ray_objects = [r for r in resources if r["apiVersion"] == "ray.io/v1"]
    assert {r["kind"] for r in ray_objects} == {"RayCluster", "RayJob"}
    for obj in ray_objects:
        schema, strict = crd_validators[obj["kind"]]
        where = f"{kustomization}: {obj['kind']}/{obj['metadata']['name']}"
        assert not _errors(schema, obj), f"{where}: {_errors(schema, obj)}"
        assert not _errors(strict, obj), f"{where} has fields the CRD does not know: {_errors(strict, obj)}"


def test_strict_schema_catches_typos(crd_validators):
    cluster = rendered("overlays/cpu-smoke")
    (obj,) = of_kind(cluster, "RayCluster")
    obj["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # typo: the API server would refuse it
    schema, strict = crd_validators["RayCluster"]
    assert not _errors(schema, obj) and _errors(strict, obj)


# The KubeRay operator's own checks (ray-operator/controllers/ray/utils/validation.go, v1.7.0)
MAX_RAYCLUSTER_NAME = 53
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _check_kuberay_cluster_spec(spec: dict, where: str) -> None:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        assert group["template"]["spec"]["containers"], f"{where}: {name} group has no container"
        params = group.get("rayStartParams", {})
        if group.get("resources"):
            assert not set(params) & {"num-cpus", "num-gpus", "memory", "resources"}, (
                f"{where}: {name}: resources set both in rayStartParams and resources"
            )
        assert "labels" not in params, f"{where}: {name}: rayStartParams['labels'] is not supported"
        if spec.get("enableInTreeAutoscaling") and spec.get("autoscalerOptions", {}).get("version") == "v2":
            assert group["template"]["spec"].get("restartPolicy", "Never") == "Never", (
                f"{where}: {name}: autoscaler v2 needs restartPolicy Never or unset"
            )
    names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    assert len(names) == len(set(names)), f"{where}: duplicate worker group names"
    for group in spec.get("workerGroupSpecs", []):
        lo, hi, n = group["minReplicas"], group["maxReplicas"], group.get("replicas", group["minReplicas"])
        assert 0 <= lo <= n <= hi and hi >= 1, f"{where}: {group['groupName']}: need 0 <= min <= replicas <= max"
        if spec.get("enableInTreeAutoscaling"):
            assert not group.get("suspend"), f"{where}: a worker group cannot be suspended with the autoscaler"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kuberay_operator_rules(kustomization):
    resources = rendered(kustomization)
    clusters = by_name(resources, "RayCluster")
    for name, cluster in clusters.items():
        assert len(name) <= MAX_RAYCLUSTER_NAME and DNS1035.match(name), name
        spec = cluster["spec"]
        assert spec["rayVersion"] == RAY_VERSION
        assert spec["enableInTreeAutoscaling"] is True
        _check_kuberay_cluster_spec(spec, f"RayCluster/{name}")
    for name, job in by_name(resources, "RayJob").items():
        assert len(name) <= MAX_RAYJOB_NAME and DNS1035.match(name), name
        spec = job["spec"]
        selector = spec.get("clusterSelector", {})
        assert selector or spec.get("rayClusterSpec"), f"RayJob/{name}: needs clusterSelector or rayClusterSpec"
        if selector:
            # the cluster it selects must be in the same render (and so the same namespace)
            assert selector.get("ray.io/cluster") in clusters, f"RayJob/{name} selects no rendered RayCluster"
            assert not spec.get("suspend") and spec.get("submissionMode", "K8sJobMode") != "SidecarMode"
            assert job["metadata"].get("namespace") == clusters[selector["ray.io/cluster"]]["metadata"].get("namespace")
        assert spec.get("activeDeadlineSeconds", 1) > 0 and spec.get("backoffLimit", 0) >= 0
        if spec.get("submissionMode") == "InteractiveMode":
            assert not spec.get("backoffLimit")
        if spec.get("rayClusterSpec"):
            _check_kuberay_cluster_spec(spec["rayClusterSpec"], f"RayJob/{name}")


# ----------------------------------------------------------------------- core resources


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_core_resources_validate_with_kubernetes_validate(kustomization):
    import kubernetes_validate

    resources = rendered(kustomization)
    core = [r for r in resources if r["apiVersion"] == "v1"]
    assert {r["kind"] for r in core} == {"ConfigMap"}, "Secrets must never be rendered from the kustomization"
    policies = of_kind(resources, "NetworkPolicy")
    assert policies and {r["apiVersion"] for r in policies} == {"networking.k8s.io/v1"}
    for obj in core + policies + list(secret_examples().values()):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert len(json.dumps(obj.get("data", {}))) < 1_000_000  # ConfigMap/Secret size limit


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_references_resolve(kustomization):
    resources = rendered(kustomization)
    configmaps = by_name(resources, "ConfigMap")
    secrets = secret_examples()
    for obj in of_kind(resources, "RayCluster") + of_kind(resources, "RayJob"):
        for where, template in pod_templates(obj):
            where = f"{obj['kind']}/{obj['metadata']['name']} {where}"
            spec = template["spec"]
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for volume in volumes.values():
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in configmaps, f"{where}: volume of a missing ConfigMap"
            for container in spec["containers"]:
                assert container["image"] == IMAGE, f"{where}: image {container['image']}"
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes, f"{where}: mount {mount['name']} has no volume"
                for source in container.get("envFrom", []):
                    if "configMapRef" in source:
                        assert source["configMapRef"]["name"] in configmaps, f"{where}: envFrom a missing ConfigMap"
                    assert "secretRef" not in source or source["secretRef"]["name"] in secrets
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] in secrets, f"{where}: {env['name']} from unknown Secret"
                        assert ref["key"] in secrets[ref["name"]]["stringData"], (
                            f"{where}: Secret {ref['name']} has no key {ref['key']}"
                        )
                    ref = env.get("valueFrom", {}).get("configMapKeyRef")
                    if ref:
                        assert ref["key"] in configmaps[ref["name"]]["data"], f"{where}: {env['name']}"


SENSITIVE = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.I)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_credentials_come_from_the_secret_only(kustomization):
    resources = rendered(kustomization)
    for _, template in ray_templates(resources):
        env = {e["name"]: e for e in template["spec"]["containers"][0].get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in env[key]["valueFrom"], f"{key} must come from the Secret"
    for obj in resources:
        for _where, template in pod_templates(obj):
            for container in template["spec"]["containers"]:
                for env in container.get("env", []):
                    assert not (SENSITIVE.search(env["name"]) and "value" in env), f"{env['name']} is inline"
    for cm in of_kind(resources, "ConfigMap"):
        assert not [k for k in cm.get("data", {}) if SENSITIVE.search(k)], f"credentials in ConfigMap {cm}"
        assert "REPLACE_WITH" not in json.dumps(cm)
    # the example Secret is shipped but never part of any kustomization
    for kfile in K8S.rglob("kustomization.yaml"):
        kust = yaml.safe_load(kfile.read_text())
        listed = kust.get("resources", []) + [p.get("path", "") for p in kust.get("patches", [])]
        assert not [e for e in listed if "secret" in e.lower()], f"{kfile} includes a Secret"


# ------------------------------------------------- Ray token auth and network policy

RAY_AUTH_KEY = "auth_token"  # the key KubeRay reads from authOptions.secretName


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ray_token_auth_is_on_with_the_token_from_a_secret(kustomization):
    resources = rendered(kustomization)
    secrets = secret_examples()
    (cluster,) = of_kind(resources, "RayCluster")
    auth = cluster["spec"].get("authOptions", {})
    # KubeRay then sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (secretKeyRef) on every Ray
    # container, the autoscaler's included
    assert auth.get("mode") == "token", "the RayCluster must use token authentication"
    assert RAY_AUTH_KEY in secrets[auth["secretName"]]["stringData"], auth
    for where, template in ray_templates(resources):
        for container in template["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            # set by hand they would override the operator's (and could switch auth off)
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}, where
    for job in of_kind(resources, "RayJob"):
        for container in job["spec"]["submitterPodTemplate"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            where = f"RayJob/{job['metadata']['name']} submitter"
            assert env["RAY_AUTH_MODE"].get("value") == "token", where
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (auth["secretName"], RAY_AUTH_KEY), where


def _selects(selector: dict, labels: dict) -> bool:
    """A label selector of matchLabels only (the manifests use nothing else) applied to labels."""
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _admits(
    policy: dict, namespace: str, peer_namespace: str, peer_labels: dict, port: str | int, pod_ports: dict[str, int]
) -> bool:
    """Whether the policy's ingress rules let a pod (namespace, labels) in on a port of the
    selected pod (a container port name or number; pod_ports maps its names to numbers)."""

    def peer_ok(peer: dict) -> bool:
        assert set(peer) <= {"podSelector", "namespaceSelector"}, f"unsupported peer {peer}"
        if "namespaceSelector" in peer:
            in_namespace = _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": peer_namespace})
        else:  # a podSelector alone means the policy's own namespace
            in_namespace = peer_namespace == namespace
        return in_namespace and _selects(peer.get("podSelector", {}), peer_labels)

    def port_ok(rule_port: dict) -> bool:
        assert rule_port.get("protocol", "TCP") == "TCP" and "endPort" not in rule_port, rule_port
        wanted = rule_port["port"]
        number = pod_ports.get(port, port)
        return wanted == port or pod_ports.get(wanted) == number

    for rule in policy["spec"].get("ingress", []):
        peers, ports = rule.get("from"), rule.get("ports")
        if (peers is None or any(peer_ok(p) for p in peers)) and (ports is None or any(port_ok(p) for p in ports)):
            return True
    return False


def _ray_pod_labels(cluster: dict, node_type: str, template: dict) -> dict:
    """Labels KubeRay gives a Ray pod: the template's plus its own."""
    return {
        **template["metadata"].get("labels", {}),
        "ray.io/cluster": cluster["metadata"]["name"],
        "ray.io/node-type": node_type,
    }


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_network_policy_admits_to_the_head_only_its_cluster_submitters_and_prometheus(kustomization):
    resources = rendered(kustomization)
    (cluster,) = of_kind(resources, "RayCluster")
    namespace = cluster["metadata"].get("namespace", "default")
    head_template = cluster["spec"]["headGroupSpec"]["template"]
    head = _ray_pod_labels(cluster, "head", head_template)
    workers = [_ray_pod_labels(cluster, "worker", g["template"]) for g in cluster["spec"]["workerGroupSpecs"]]
    submitters = [j["spec"]["submitterPodTemplate"]["metadata"]["labels"] for j in of_kind(resources, "RayJob")]
    policies = of_kind(resources, "NetworkPolicy")
    head_policies = [p for p in policies if _selects(p["spec"]["podSelector"], head)]
    assert len(head_policies) == 1, "exactly one NetworkPolicy selects the Ray head pods"
    (policy,) = head_policies
    assert policy["metadata"].get("namespace", "default") == namespace
    assert "Ingress" in policy["spec"]["policyTypes"]
    assert not any(_selects(policy["spec"]["podSelector"], labels) for labels in workers + submitters)
    head_ports = {p["name"]: p["containerPort"] for p in head_template["spec"]["containers"][0]["ports"]}
    for rule in policy["spec"]["ingress"]:
        for port in rule.get("ports", []):
            assert port["port"] in head_ports, f"{port['port']} is not a port of the head container"
    ray_ports = ["gcs-server", "dashboard", "client"]

    def admitted(peer_namespace: str, labels: dict) -> set:
        return {
            p
            for p in [*head_ports, 6380, 40000]  # and raylet/object-manager ports (not named)
            if _admits(policy, namespace, peer_namespace, labels, p, head_ports)
        }

    everything = set(head_ports) | {6380, 40000}
    # the cluster's own pods: every port
    for labels in [head] + workers:
        assert admitted(namespace, labels) == everything, labels
    # the job submitters and the KubeRay operator: the jobs API only
    for labels in submitters:
        assert admitted(namespace, labels) == {"dashboard"}, labels
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    assert admitted("kuberay-system", operator) == {"dashboard"}
    # Prometheus: the metrics ports only
    prometheus = {"app.kubernetes.io/name": "prometheus", "prometheus": "kube-prometheus-stack-prometheus"}
    assert admitted("monitoring", prometheus) == {"metrics", "driver-metrics"}
    assert not admitted("monitoring", {"app.kubernetes.io/name": "grafana"}) & set(ray_ports)
    # anybody else: nothing, a pod of the same name and labels in another namespace included
    assert not admitted(namespace, {"app": "anything-else"})
    assert not admitted(namespace, {"app.kubernetes.io/component": "job-submitter"})  # not dmlray's
    assert not admitted("other-team", head), "ray.io/cluster=dmlray pods of another namespace"
    assert not admitted("other-team", operator) and not admitted("other-team", prometheus)

    # workers: their cluster's pods, and Prometheus on the metrics port
    worker_policies = [p for p in policies if all(_selects(p["spec"]["podSelector"], w) for w in workers)]
    assert len(worker_policies) == 1
    (wpolicy,) = worker_policies
    for group in cluster["spec"]["workerGroupSpecs"]:
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        for labels, peer_namespace, allowed in [
            (head, namespace, {"metrics", 40000}),
            (workers[0], namespace, {"metrics", 40000}),
            (prometheus, "monitoring", {"metrics"}),
            (submitters[0], namespace, set()),
            (head, "other-team", set()),
        ]:
            got = {p for p in [*ports, 40000] if _admits(wpolicy, namespace, peer_namespace, labels, p, ports)}
            assert got == allowed, (group["groupName"], labels, peer_namespace, got)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ray_pods_have_shm_metrics_and_the_right_accelerators(kustomization):
    resources = rendered(kustomization)
    (cluster,) = of_kind(resources, "RayCluster")
    gpu_groups = [
        g
        for g in cluster["spec"]["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    ]
    for where, template in ray_templates(resources):
        spec = template["spec"]
        container = spec["containers"][0]
        shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm, f"{where}: no /dev/shm mount"
        volume = {v["name"]: v for v in spec["volumes"]}[shm[0]["name"]]
        assert volume["emptyDir"]["medium"] == "Memory", f"{where}: /dev/shm must be a memory emptyDir"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports.get("metrics") == METRICS_PORT, f"{where}: metrics port"
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert set(limits) >= {"cpu", "memory"} and set(requests) >= {"cpu", "memory"}, where
    groups = [cluster["spec"]["headGroupSpec"]] + cluster["spec"]["workerGroupSpecs"]
    for group in groups:
        assert group.get("rayStartParams", {}).get("metrics-export-port", str(METRICS_PORT)) == str(METRICS_PORT)
    if kustomization == "overlays/cpu-smoke":
        assert "nvidia.com/gpu" not in json.dumps(cluster), "the smoke cluster must not ask for GPUs"
        assert all(g["maxReplicas"] <= 2 for g in cluster["spec"]["workerGroupSpecs"])
    else:
        assert gpu_groups, "a GPU worker group is expected"
        for group in gpu_groups:
            spec = group["template"]["spec"]
            gpus = spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
            assert spec["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == gpus
            assert any(t["key"] == "nvidia.com/gpu" for t in spec.get("tolerations", []))
            assert group["maxReplicas"] >= 1


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_podmonitor_scrapes_the_ray_pods(kustomization):
    resources = rendered(kustomization)
    (monitor,) = of_kind(resources, "PodMonitor")
    (cluster,) = of_kind(resources, "RayCluster")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert DNS1035.match(monitor["metadata"]["name"])
    assert monitor["metadata"].get("namespace") == cluster["metadata"].get("namespace")  # no namespaceSelector needed
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "podMetricsEndpoints", "jobLabel", "podTargetLabels", "namespaceSelector"}
    # KubeRay labels every pod of a cluster ray.io/cluster=<name>
    assert spec["selector"] == {"matchLabels": {"ray.io/cluster": cluster["metadata"]["name"]}}
    port_names = {p["name"] for _, t in ray_templates(resources) for c in t["spec"]["containers"] for p in c["ports"]}
    assert spec["podMetricsEndpoints"], "no endpoints"
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings", "honorLabels"}
        assert endpoint["port"] in port_names, f"no Ray container port named {endpoint['port']}"
        assert endpoint["path"].startswith("/")
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"]) and re.fullmatch(r"\d+[smh]", endpoint["scrapeTimeout"])
    assert "metrics" in {e["port"] for e in spec["podMetricsEndpoints"]}


# ------------------------------------------------------------------- Grafana dashboard

DASHBOARD = K8S / "grafana" / "dmlray-sweep.json"
REQUIRED_METRICS = [
    "ray_dmlray_step",
    "ray_dmlray_loss",
    "ray_dmlray_samples_per_second",
    "ray_dmlray_memory_fill",
    "ray_dmlray_recall_at_1",
    "dmlray_sweep_trials",
    "dmlray_sweep_best_metric",
]


def _dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def test_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "run", "trial"} <= variables
    exprs = _dashboard_exprs(dashboard)
    text = " ".join(e for _, e in exprs)
    for metric in REQUIRED_METRICS:
        assert re.search(rf"\b{metric}\b", text), f"no panel shows {metric}"
    for title, expr in exprs:
        for used in re.findall(r"\$(\w+)", expr):
            assert used in variables or used.startswith("__"), f"{title}: undefined variable ${used}"
        for open_, close in ("()", "{}", "[]"):
            assert expr.count(open_) == expr.count(close), f"{title}: unbalanced {open_}{close} in {expr}"
        for matchers in re.findall(r"\{([^}]*)\}", expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in {"run", "trial", "rank", "state"}, f"{title}: unexpected label {label}"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for words in ("running", "finished", "recall@1", "loss", "samples/s"):
        assert words in titles, f"no panel about {words}"
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
    # the dashboard ships as a ConfigMap for Grafana's sidecar, in every overlay
    for kustomization in KUSTOMIZATIONS:
        cms = [c for c in of_kind(rendered(kustomization), "ConfigMap") if DASHBOARD.name in c.get("data", {})]
        assert len(cms) == 1 and cms[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cms[0]["data"][DASHBOARD.name]) == dashboard


def test_dashboard_queries_with_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) not installed: PromQL syntax not checked")
    dashboard = json.loads(DASHBOARD.read_text())
    rules = [
        {"record": f"dmlray:panel_{i}", "expr": expr.replace("$run", ".*").replace("$trial", ".*")}
        for i, (_, expr) in enumerate(_dashboard_exprs(dashboard))
    ]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------- entrypoints

CAT = re.compile(r"\$\(cat ([^\s()]+)\)")


def _jobs() -> list[tuple[str, str]]:
    return [(k, r["metadata"]["name"]) for k in KUSTOMIZATIONS for r in of_kind(rendered(k), "RayJob")]


def expand_entrypoint(job: dict, configmaps: dict[str, dict]) -> list[str]:
    """The argv the Ray job runs: `$(cat FILE)` replaced by FILE as mounted from a
    ConfigMap in the submitter pod (where KubeRay's `bash -c` expands it)."""
    template = job["spec"]["submitterPodTemplate"]

    def cat(match: re.Match) -> str:
        content = mounted_file(template, match.group(1), configmaps)
        assert content is not None, f"{match.group(1)} is not mounted from a ConfigMap in the submitter pod"
        assert not [line for line in content.splitlines() if line.strip().startswith("#")], (
            f"{match.group(1)}: comment lines would be spliced into the command"
        )
        return " " + content + " "

    expanded = CAT.sub(cat, job["spec"]["entrypoint"])
    assert not re.search(r"[$`;&|<>\\]", expanded), f"unexpected shell syntax left in {expanded!r}"
    return shlex.split(expanded)


@pytest.mark.parametrize("kustomization,job_name", _jobs())
def test_job_entrypoint_is_a_dmlray_command(kustomization, job_name):
    resources = rendered(kustomization)
    job = by_name(resources, "RayJob")[job_name]
    configmaps = by_name(resources, "ConfigMap")
    argv = expand_entrypoint(job, configmaps)
    if argv[:3] == ["python", "-m", "dmlray"]:
        argv = ["dmlray"] + argv[3:]
    assert argv[0] == "dmlray", f"entrypoint must be `dmlray ...` or `python -m dmlray ...`: {argv}"
    command, preset = argv[1], argv[2]
    assert command in ("train", "tune"), argv
    overrides = []
    for token in argv[3:]:
        if token.startswith("-"):
            break
        overrides.append(token)
    assert all(re.fullmatch(r"[a-z_]+(\.[a-z_]+)+=\S+", o) for o in overrides), overrides
    run_names = [o.split("=", 1)[1] for o in overrides if o.startswith("run.name=")]
    assert run_names, "every job names its run (a stable name is what makes a retry resume)"

    space = None
    if command == "tune":
        assert "--space" in argv, argv
        space_path = argv[argv.index("--space") + 1]
        (cluster,) = of_kind(resources, "RayCluster")
        # the sweep driver runs on the head: the file must be there, not only in the submitter
        text = mounted_file(cluster["spec"]["headGroupSpec"]["template"], space_path, configmaps)
        assert text is not None, f"{space_path} is not mounted in the head pod"
        space = yaml.safe_load(text)
        assert isinstance(space, dict) and space, "the search space must be a non-empty mapping"
        head_ports = {
            p["name"]: p["containerPort"]
            for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
        }

    from dmlray.cli import parse

    try:
        args = parse(argv[1:])
    except SystemExit:
        pytest.fail(f"`dmlray` rejects the entrypoint of {kustomization} RayJob/{job_name}: {argv}")
    assert args.command == command
    if command == "tune":
        # the sweep driver serves its metrics on the head's driver-metrics port, to the pod network
        assert args.metrics_port == head_ports["driver-metrics"], "sweep driver metrics port"
        assert args.metrics_addr == "0.0.0.0", "sweep driver metrics must listen beyond loopback in a pod"

    from dmlray.config import ConfigError, load_config, preset_names

    if preset not in preset_names():
        pytest.skip(f"preset {preset!r} is not shipped yet (dmlray/presets/{preset}.yaml); its overrides are unchecked")
    try:
        load_config(preset)
    except ConfigError as exc:
        pytest.skip(f"preset {preset!r} does not load yet on its own ({exc}); its overrides are unchecked")
    # every override names a real config key with a valid value
    load_config(preset, overrides)
    if space is not None:
        for key, sampler in space.items():
            values = next(iter(sampler.values())) if isinstance(sampler, dict) else sampler
            load_config(preset, overrides + [f"{key}={json.dumps(values[0])}"])


# --------------------------------------------------------------- images and Ray versions


def test_image_and_ray_version_agree_everywhere():
    import ray

    import dmlray

    assert ray.__version__ == RAY_VERSION, "the manifests, Dockerfile and launcher pin this Ray version"
    assert IMAGE.rsplit(":", 1)[1] == dmlray.__version__
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", dockerfile, re.M).group(1)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+-cu\d+", base), base
    assert f"-t {IMAGE} " in dockerfile
    assert f"ray=={RAY_VERSION}" in dockerfile
    launcher = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    assert launcher["docker"]["image"] == IMAGE
    assert any(f"ray=={RAY_VERSION}" in c for c in launcher["setup_commands"])
    for kustomization in KUSTOMIZATIONS:
        for obj in rendered(kustomization):
            for _, template in pod_templates(obj):
                assert {c["image"] for c in template["spec"]["containers"]} == {IMAGE}


def test_cluster_launcher_configs_match_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    configs = [p for p in (ROOT / "cluster").glob("*.yaml") if "provider" in (yaml.safe_load(p.read_text()) or {})]
    assert [p.name for p in configs] == ["aws-gpu.yaml"]
    for path in configs:
        config = yaml.safe_load(path.read_text())
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(config)
        ]
        assert not errors, f"{path.name}: {errors}"
        validate_config(config)  # Ray's own check: the schema plus its consistency rules
        assert config["head_node_type"] in config["available_node_types"]
        workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
        assert sum(t["max_workers"] for t in workers) >= 1 and config["max_workers"] >= 1
        assert any("pip install" in c and "dmlray" in c for c in config["setup_commands"])


# ---------------------------------------------------------------- the local launcher


def submit_ray_job(
    state: dict, entrypoint: str, timeout: float = 600.0, runtime_env: dict | None = None
) -> subprocess.CompletedProcess:
    """`ray job submit` an entrypoint to a cluster from cluster/local_cluster.py and wait for
    it; the result's stdout holds the job's logs, returncode is non-zero if the job failed.
    Jobs run with the cluster's S3 credentials and this venv's `dmlray` on PATH."""
    cmd = [local_cluster._bin("ray"), "job", "submit", "--address", state["ray"]["dashboard_url"]]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_", "AWS_"))}
    env.update(local_cluster.cluster_env(state))
    return subprocess.run(
        cmd + ["--", *shlex.split(entrypoint)], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture
def local_ray_cluster(tmp_path):
    """`cluster/local_cluster.py up --workers 1` (head + 1 worker node + SeaweedFS); yields
    its state (cluster.json) and runs `down` afterwards whatever happened."""
    folder = tmp_path / "cluster"
    script = ROOT / "cluster" / "local_cluster.py"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    up = subprocess.run(
        [sys.executable, str(script), "up", "--workers", "1", "--cpus", "1", "--dir", str(folder), "--timeout", "300"],
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
    )
    try:
        assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}"
        yield local_cluster.load_state(folder)
    finally:
        if (folder / local_cluster.STATE_FILE).exists():
            subprocess.run(
                [sys.executable, str(script), "down", "--dir", str(folder)], capture_output=True, timeout=120, env=env
            )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_cluster_up_and_down(local_ray_cluster, tmp_path):
    state = local_ray_cluster
    folder = Path(state["dir"])
    procs = state["processes"]
    assert [p["name"] for p in procs] == ["seaweedfs", "ray-head", "ray-worker-0"]
    assert len(state["ray"]["temp_dir"]) < 40, "Ray's socket paths must stay short"

    # two alive Ray nodes, asked through ray.init(address=...) in another interpreter
    assert local_cluster.alive_ray_nodes(state["ray"]) == 2

    # SeaweedFS speaks S3 with the generated credentials, and refuses others
    import botocore.exceptions

    client = local_cluster.s3_client(state["s3"])
    assert state["s3"]["bucket"] in {b["Name"] for b in client.list_buckets()["Buckets"]}
    wrong = local_cluster.s3_client({**state["s3"], "secret_key": "not-the-secret"})
    with pytest.raises(botocore.exceptions.ClientError):
        wrong.list_buckets()

    # a job sees the S3 endpoint and credentials, and this venv's dmlray on PATH; what its
    # tasks print reaches the job's log once, whichever node ran them (nodes that shared
    # the head's session folder forwarded every worker's lines once per node)
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "probe.py").write_text(PROBE_JOB)
    runtime_env = {"working_dir": str(probe_dir), "env_vars": {"RAY_DEDUP_LOGS": "0"}}
    job = submit_ray_job(state, "python probe.py", timeout=300, runtime_env=runtime_env)
    assert job.returncode == 0, job.stdout + job.stderr
    assert f"'{state['s3']['bucket']}'" in job.stdout and str(Path(sys.executable).parent / "dmlray") in job.stdout
    printed = [  # (task, node) of each task line in the job's log
        line.split("probe-task ")[1].split()[:2]
        for line in job.stdout.splitlines()
        if "probe-task" in line and "(" in line
    ]
    assert sorted(task for task, _ in printed) == ["0", "1", "2", "3"], job.stdout
    assert len({node for _, node in printed}) == 2, "the tasks ran on both nodes"
    worker_temp = procs[2]["temp_dir"]
    assert worker_temp != state["ray"]["temp_dir"] and len(worker_temp) < 40

    # down stops exactly the recorded processes, their groups included, and cleans up. It
    # does not wait out Ray's SIGTERM drain (up to 30 s on a node still running an actor,
    # as the job left on each), so nothing needs the SIGKILL after the 60 s timeout here.
    script = ROOT / "cluster" / "local_cluster.py"
    started = time.monotonic()
    down = subprocess.run(
        [sys.executable, str(script), "down", "--dir", str(folder), "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 0, down.stdout + down.stderr
    assert time.monotonic() - started < 25, "down waited for Ray's drain"
    for proc in procs:
        assert not local_cluster._alive(proc), f"{proc['name']} (pid {proc['pid']}) survived down"
    assert not (folder / local_cluster.STATE_FILE).exists()
    assert not Path(state["ray"]["temp_dir"]).exists() and not Path(worker_temp).exists()


# the job of test_local_cluster_up_and_down: S3 and PATH as a job sees them, four tasks
# that print a line each (one CPU per node: they take both nodes), and an actor on every
# node left running
PROBE_JOB = """
import shutil, time
import boto3, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

print("buckets", [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]], "dmlray", shutil.which("dmlray"))
ray.init()

@ray.remote(num_cpus=1)
def task(i):
    time.sleep(1.0)
    print("probe-task", i, ray.get_runtime_context().get_node_id(), flush=True)

ray.get([task.remote(i) for i in range(4)])
time.sleep(2.0)  # the log monitors forward the tasks' lines to this driver meanwhile

@ray.remote(num_cpus=0)
class Service:  # outlives the job, as a Serve application would: its nodes are never idle
    def ping(self):
        return "pong"

for node in ray.nodes():
    service = Service.options(
        lifetime="detached", scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
    ).remote()
    assert ray.get(service.ping.remote()) == "pong"
"""


# ------------------------------------------------------------------ elastic runs on spot GPUs


def _job_config(resources: list[dict], job: dict):
    """The Config a RayJob's `dmlray train` entrypoint runs with."""
    from dmlray.config import load_config

    argv = expand_entrypoint(job, by_name(resources, "ConfigMap"))
    if argv[:3] == ["python", "-m", "dmlray"]:
        argv = ["dmlray"] + argv[3:]
    overrides = [t for t in argv[3:] if not t.startswith("-")]
    return load_config(argv[2], overrides)


def test_gpu_overlay_worker_groups_hold_the_elastic_runs_bounds():
    """The overlay's elastic RayJob selects the spot worker group by its Ray node labels, and
    that group scales between exactly the run's bounds; fixed-size runs select the other
    group. The bounds split the global batch (the config validates)."""
    from dmlray.jobs import elastic

    resources = rendered("overlays/gpu")
    (cluster,) = of_kind(resources, "RayCluster")
    groups = cluster["spec"]["workerGroupSpecs"]
    jobs = of_kind(resources, "RayJob")
    elastic_jobs = []
    for job in jobs:
        if job["spec"]["entrypoint"].split()[1] != "train":
            continue
        cfg = _job_config(resources, job)
        selected = [g for g in groups if cfg.run.worker_labels.items() <= g.get("labels", {}).items()]
        name = job["metadata"]["name"]
        assert len(selected) == 1, f"RayJob/{name}: run.worker_labels={cfg.run.worker_labels} select {selected}"
        (group,) = selected
        if cfg.run.elastic:
            elastic_jobs.append(name)
            assert (group["minReplicas"], group["maxReplicas"]) == (cfg.run.min_workers, cfg.run.num_workers), name
            assert cfg.run.max_failures != 0 and cfg.train.checkpoint_every > 0, name
            # the paper's global batch, whatever the world size
            assert elastic.global_classes(cfg) * cfg.data.samples_per_class == 80
            tolerated = {t["key"] for t in group["template"]["spec"].get("tolerations", [])}
            assert "cloud.google.com/gke-spot" in tolerated, group["groupName"]
        else:
            assert group["minReplicas"] == 0, f"RayJob/{name}: a fixed-size run's group scales to zero"
            assert group["maxReplicas"] >= cfg.run.num_workers, name
    assert elastic_jobs == ["dmlray-train-elastic"]
