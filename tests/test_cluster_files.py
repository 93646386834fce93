"""The shipped cluster definitions: every YAML parses, matches its schema, and names entrypoints and configs that
exist."""

import glob
import os
import re

import pytest
import yaml

from ptray.config import builtin_config_names, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(f"{REPO}/cluster/**/*.yaml", recursive=True) + glob.glob(f"{REPO}/jobs/*.yaml"))
# `python [/app/]jobs/<entry>.py --config NAME [key=value ...]` or `ptray <cmd> --config NAME [...]`, as written in the
# files' commands and header comments (backslash continuations joined first).
COMMAND = re.compile(r"(?:python\s+(?:/app/)?(jobs/\w+\.py)|ptray\s+\w+)\s+--config\s+(\S+)((?:\s+(?:--address\s+\S+|"
                     r"[\w.]+=\S+))*)")


def _commands(text: str) -> list[tuple[str | None, str, list[str]]]:
    text = re.sub(r"\\\s*\n\s*#?\s*", " ", text)
    return [(m.group(1), m.group(2), [a for a in m.group(3).split() if "=" in a]) for m in COMMAND.finditer(text)]


def test_cluster_files_exist_with_a_usage_header():
    names = {os.path.relpath(f, REPO) for f in FILES}
    assert {"cluster/aws-gpu.yaml", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml",
            "jobs/runtime_env.yaml"} <= names
    for path in FILES + [f"{REPO}/cluster/local_cluster.sh", f"{REPO}/cluster/Dockerfile"]:
        lines = open(path).read().splitlines()
        head = lines[1] if lines[0].startswith("#!") else lines[0]
        assert head.startswith("#"), f"{path} must start with a comment saying how to use it"


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_yaml_parses(path):
    assert [d for d in yaml.safe_load_all(open(path)) if d is not None]


SCRIPTS = FILES + glob.glob(f"{REPO}/cluster/*.sh") + glob.glob(f"{REPO}/jobs/*.py")


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_command_a_file_shows_names_a_real_entrypoint_config_and_keys(path):
    text = open(path).read()
    commands = _commands(text)
    if "runtime_env" not in path:
        assert commands, f"{path} shows no command to run"
    for entry, config, overrides in commands:
        if entry:
            assert os.path.isfile(os.path.join(REPO, entry)), f"{path} names missing entrypoint {entry}"
        load_config(config, overrides)  # a built-in config or a file, and every override a valid key and value


def test_cluster_launcher_config_matches_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(open(f"{REPO}/cluster/aws-gpu.yaml"))
    validate_config(prepare_config(config))  # what `ray up` does before launching
    for source in config["file_mounts"].values():
        assert os.path.exists(os.path.join(REPO, source))
    gpu_types = [t for t in config["available_node_types"].values()
                 if t.get("node_config", {}).get("InstanceType", "").startswith(("p4d.24", "p5.48"))]  # 8 GPUs each
    assert gpu_types, "a GPU worker node type"
    for node_type in gpu_types:  # an image with NVIDIA drivers and CUDA, not a bare Ubuntu
        assert "nvidia-driver-gpu" in node_type["node_config"]["ImageId"]
    largest = max(load_config(name).cluster.num_workers for name in builtin_config_names()
                  if load_config(name).cluster.use_gpu)
    capacity = 8 * min(config["max_workers"], max(t["max_workers"] for t in gpu_types))
    assert capacity >= largest, f"the cluster tops out at {capacity} GPUs; a shipped config asks for {largest}"


def test_kuberay_manifests_have_gpu_workers_shared_storage_and_a_valid_job():
    cluster_docs = list(yaml.safe_load_all(open(f"{REPO}/cluster/kuberay/raycluster.yaml")))
    job = yaml.safe_load(open(f"{REPO}/cluster/kuberay/rayjob.yaml"))
    claim = next(d for d in cluster_docs if d["kind"] == "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    raycluster = next(d for d in cluster_docs if d["kind"] == "RayCluster")
    assert raycluster["apiVersion"] == job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    for spec in (raycluster["spec"], job["spec"]["rayClusterSpec"]):
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
        for pod in pods:  # every pod mounts the shared claim
            claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
            assert claims == [claim["metadata"]["name"]]
        gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in spec["workerGroupSpecs"]
                for c in g["template"]["spec"]["containers"]]
        assert all(gpus)
    entry, config, overrides = _commands(job["spec"]["entrypoint"])[0]
    assert entry == "jobs/pipeline.py"
    assert load_config(config, overrides).run.dir.startswith("/mnt/shared/")
    dockerfile = open(f"{REPO}/cluster/Dockerfile").read()
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, flags=re.M):
        for name in source.split():
            assert os.path.exists(os.path.join(REPO, name)), f"Dockerfile copies missing {name}"
