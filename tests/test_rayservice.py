"""k8s/serve: the search RayService, against the KubeRay CRD, Ray Serve's own config
schema and the application it names."""

from __future__ import annotations

import pytest
import yaml
from test_deploy import CRD_DIR, IMAGE, K8S, RAY_VERSION, _errors, _strict, render

SERVE = K8S / "serve"


@pytest.fixture(scope="module")
def service() -> dict:
    (obj,) = render.render(SERVE)
    assert obj["kind"] == "RayService" and obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dmlray"
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
