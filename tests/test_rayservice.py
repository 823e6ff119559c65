"""k8s/serve: the search RayService, against the KubeRay CRD, Ray Serve's own config
schema and the application it names."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml
from test_deploy import (
    CRD_DIR,
    IMAGE,
    K8S,
    K8S_VERSION,
    RAY_VERSION,
    _admits,
    _errors,
    _selects,
    _strict,
    of_kind,
    render,
)

SERVE = K8S / "serve"


@pytest.fixture(scope="module")
def resources() -> list[dict]:
    return json.loads(json.dumps(render.render(SERVE)))


@pytest.fixture(scope="module")
def service(resources) -> dict:
    (obj,) = of_kind(resources, "RayService")
    assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dmlray"
    assert {r["kind"] for r in resources} == {"RayService", "NetworkPolicy"}
    return obj


@pytest.fixture(scope="module")
def serve_config(service) -> dict:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def test_rayservice_matches_the_kuberay_crd(service):
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found: {CRD_DIR}")
    import jsonschema

    crd = yaml.load(
        (CRD_DIR / "ray.io_rayservices.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    )
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = v1["schema"]["openAPIV3Schema"]
    for validator in (jsonschema.Draft7Validator(schema), jsonschema.Draft7Validator(_strict(schema))):
        assert not _errors(validator, service), _errors(validator, service)
    # and the strict check does catch a misspelt field here too
    bad = {**service, "spec": {**service["spec"], "serveConfig": "x"}}
    assert _errors(jsonschema.Draft7Validator(_strict(schema)), bad)


def test_serve_config_is_valid_for_ray_serve_and_names_the_search_app(serve_config):
    schema = pytest.importorskip("ray.serve.schema", reason="needs ray[serve]")
    schema.ServeDeploySchema.model_validate(serve_config)
    # Serve's schema lets unknown deployment fields through: a misspelt one would be ignored
    for deployment in serve_config["applications"][0]["deployments"]:
        assert set(deployment) <= set(schema.DeploymentSchema.model_fields), deployment
        assert set(deployment["autoscaling_config"]) <= set(schema.AutoscalingConfig.model_fields)
    (app,) = serve_config["applications"]
    module, attr = app["import_path"].split(":")
    assert (module, attr) == ("dmlray.serving.app", "app_builder")
    from dmlray.serving.app import SearchDeployment

    assert {d["name"] for d in app["deployments"]} == {SearchDeployment.name}
    args = app["args"]
    assert args["index"].startswith(args["run"].rstrip("/") + "/"), "the index lives in the run folder"
    assert args["run"].startswith("s3://") and set(args) == {"run", "index"}


def test_replicas_autoscale_within_the_worker_group(service, serve_config):
    (deployment,) = serve_config["applications"][0]["deployments"]
    bounds = deployment["autoscaling_config"]
    assert 1 <= bounds["min_replicas"] <= bounds["max_replicas"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] and cluster["rayVersion"] == RAY_VERSION
    (group,) = cluster["workerGroupSpecs"]
    worker_cpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    per_replica = deployment["ray_actor_options"]["num_cpus"]
    assert group["maxReplicas"] * worker_cpus >= bounds["max_replicas"] * per_replica
    assert group["minReplicas"] * worker_cpus >= bounds["min_replicas"] * per_replica
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas stay off the head


def test_credentials_come_from_the_secret_only(service):
    text = service["spec"]["serveConfigV2"]
    assert "AWS_" not in text and "runtime_env" not in text and "secret" not in text.lower()
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "dmlray-ray-auth"}
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        (container,) = template["spec"]["containers"]
        assert container["image"] == IMAGE
        env = {e["name"]: e for e in container["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "dmlray-s3-credentials", "key": key}
            assert "value" not in env[key]
        assert container["envFrom"] == [{"configMapRef": {"name": "dmlray-storage"}}]


# --------------------------------------------------------------------- network policy


def _search_pods(service: dict) -> dict[str, tuple[dict, dict[str, int]]]:
    """head / worker: (labels KubeRay gives the pod, its container ports by name). The
    cluster name is KubeRay's own for a RayService: any value must do."""
    cluster = service["spec"]["rayClusterConfig"]
    out = {}
    for node_type, template in [("head", cluster["headGroupSpec"]["template"])] + [
        ("worker", g["template"]) for g in cluster["workerGroupSpecs"]
    ]:
        labels = {
            **template["metadata"]["labels"],
            "ray.io/cluster": "dmlray-search-raycluster-x7k2p",
            "ray.io/node-type": node_type,
        }
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        out[node_type] = (labels, ports)
    return out


def test_network_policies_validate(resources):
    import kubernetes_validate

    policies = of_kind(resources, "NetworkPolicy")
    assert len(policies) == 2
    for policy in policies:
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)


def test_network_policy_opens_only_the_page_port_to_the_ingress_and_ray_ports_within(resources, service):
    namespace = "dmlray"  # applied with kubectl -n: policies and pods share it
    pods = _search_pods(service)
    policies = of_kind(resources, "NetworkPolicy")
    ingress_controller = ("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    operator = ("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
    prometheus = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    training_head = {"ray.io/cluster": "dmlray", "ray.io/node-type": "head", "app.kubernetes.io/name": "dmlray"}
    for node_type, (labels, ports) in pods.items():
        selecting = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert len(selecting) == 1, f"exactly one policy selects the search {node_type}"
        (policy,) = selecting
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            for port in rule.get("ports", []):
                assert port["port"] in ports, f"{port['port']} is not a port of the search {node_type}"
        probe = [*ports, 6380, 10001, 52365]  # and unnamed Ray ports (raylet, client, agent)

        def admitted(peer_namespace: str, peer: dict, rules=(policy, probe, ports)) -> set:
            policy, probe, ports = rules
            return {p for p in probe if _admits(policy, namespace, peer_namespace, peer, p, ports)}

        # the search cluster's own pods: every port, the training cluster's head: none
        for peer, _ in pods.values():
            assert admitted(namespace, peer) == set(probe), (node_type, peer)
        assert not admitted(namespace, training_head)
        # the ingress controller: the page / POST /search port only, on head and workers
        assert admitted(*ingress_controller) == {"serve"} and ports["serve"] == 8000
        assert not admitted(namespace, ingress_controller[1])  # same labels, wrong namespace
        assert admitted(*prometheus) == {"metrics"}
        assert admitted(*operator) == ({"dashboard"} if node_type == "head" else set())
        assert not admitted(namespace, {"app": "anything-else"})
        assert not admitted("default", {})


def test_serve_kustomization_matches_kubectl_kustomize(resources):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: cluster/render.py is not compared with kustomize here")
    out = subprocess.run(
        [kubectl, "kustomize", str(SERVE)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    theirs = {(r["kind"], r["metadata"]["name"]): r for r in yaml.safe_load_all(out) if r}
    mine = {(r["kind"], r["metadata"]["name"]): r for r in resources}
    assert mine == theirs
