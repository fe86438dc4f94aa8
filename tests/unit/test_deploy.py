"""Static checks of the KubeRay manifest deploy/rayservice.yaml (no Kubernetes needed).

Its serveConfigV2 is a valid Ray Serve config and is configs/serve.yaml apart from the cluster
changes (host 0.0.0.0, the artifact at /artifacts/model as in the container config, 2 replicas,
a GPU per replica); its image is the one docker/ builds; every pod mounts the artifact volume.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "rayservice.yaml"
ARTIFACT_PATH = "/artifacts/model"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def serve_config(manifest) -> dict:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def pod_templates(manifest: dict) -> list[dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def test_is_a_kuberay_rayservice(manifest):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replicas on the head
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    version = tuple(int(p) for p in cluster["rayVersion"].split(".")[:2])
    floor = re.search(r'"ray\[[^\]]*\]>=(\d+)\.(\d+)', (REPO / "pyproject.toml").read_text())
    assert floor and version >= (int(floor[1]), int(floor[2]))


def test_serve_config_is_valid_for_ray_serve(serve_config):
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.model_validate(serve_config)


def test_serve_config_mirrors_configs_serve_yaml(serve_config):
    host_config = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    docker_config = yaml.safe_load((REPO / "docker" / "serve.docker.yaml").read_text())
    apps = serve_config["applications"]
    host_apps = host_config["applications"]
    assert [a["import_path"] for a in apps] == [a["import_path"] for a in host_apps]
    assert [sorted(a["args"]) for a in apps] == [sorted(a["args"]) for a in host_apps]
    assert [[d["name"] for d in a["deployments"]] for a in apps] == [
        [d["name"] for d in a["deployments"]] for a in host_apps
    ]
    assert [a["args"]["artifact"] for a in apps] == [ARTIFACT_PATH]
    assert serve_config["http_options"] == docker_config["http_options"]  # 0.0.0.0:8000
    # apart from host, artifact, replicas and GPUs, the manifest's config is configs/serve.yaml
    normalized = copy.deepcopy(serve_config)
    normalized["http_options"]["host"] = host_config["http_options"]["host"]
    for app, host_app in zip(normalized["applications"], host_apps, strict=True):
        app["args"]["artifact"] = host_app["args"]["artifact"]
        for deployment, host_deployment in zip(
            app["deployments"], host_app["deployments"], strict=True
        ):
            assert deployment["num_replicas"] >= 2
            assert deployment["ray_actor_options"]["num_gpus"] == 1
            deployment["num_replicas"] = host_deployment["num_replicas"]
            deployment["ray_actor_options"]["num_gpus"] = host_deployment["ray_actor_options"][
                "num_gpus"
            ]
    assert normalized == host_config


def test_image_is_the_serve_image_from_docker(manifest):
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    image = compose["services"]["serve"]["image"]
    assert f"-t {image} " in (REPO / "docker" / "serve.Dockerfile").read_text()
    for pod in pod_templates(manifest):
        (container,) = pod["containers"]
        name = container["image"].rsplit("/", 1)[-1].split(":", 1)[0]  # REGISTRY/NAME:TAG
        assert name == image, container["image"]


def test_every_pod_mounts_the_artifact_read_only(manifest):
    for pod in pod_templates(manifest):
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts[ARTIFACT_PATH]["readOnly"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        claim = volumes[mounts[ARTIFACT_PATH]["name"]]["persistentVolumeClaim"]
        assert claim["claimName"] and claim["readOnly"] is True
        assert container["ports"][-1] == {"containerPort": 8000, "name": "serve"}
