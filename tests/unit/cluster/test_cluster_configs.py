"""The cluster launch files under cluster/ (docs/cluster.md), checked offline in a few seconds.

`ray up` configs (the YAML files with a `provider:`) go through Ray's own code: `prepare_config` (the
provider's defaults.yaml merged in, setup commands merged, per-type worker bounds filled) and then
`validate_config` (the JSON schema shipped in the wheel, `ray/autoscaler/ray-schema.json`, plus its
head-type and min-workers checks), exactly as `ray up` runs them before it touches a cloud. A typo'd
copy of each file must fail there. What `ray up` does after that needs the cloud and could not run here:
the provider bootstrap (`_bootstrap_config` -> GCP `bootstrap_gcp`: service account, SSH keys, subnets
through googleapiclient, which is not installed and needs credentials; AWS: IAM instance profile, key
pair, security group, AMI, and `fillout_available_node_types_resources`, which asks EC2 for each
instance type's CPUs and GPUs). GCP's TPU node checks (`_validate_tpu_config`, `get_node_type`) live in
`ray/autoscaler/_private/gcp/config.py`, which imports googleapiclient at import time, so the TPU checks
here use the helpers they are built on (`ray._private.accelerators.tpu`).

KubeRay's CRDs are not on the package index, so the RayJob manifests are validated against a schema
written here from the RayJob v1 field list of KubeRay's CRD (ray-operator/config/crd/bases/
ray.io_rayjobs.yaml, the RayJobSpec / RayClusterSpec / HeadGroupSpec / WorkerGroupSpec types), closed
(additionalProperties: false) at the spec and group levels so a misspelt field fails as `kubectl apply`
with strict field validation would fail it.

The rest are the checks neither schema makes: the head is a CPU node that takes no work, the worker
bounds fit, TPU node types are not the head and describe a real slice, the GPUs declared are the GPUs
of the machine, every node installs raygen with constraints.txt at the client's Ray version, token
auth is on, and each RayJob's entrypoint is a job, preset and overrides that raygen's own config
loader accepts.
"""
from __future__ import annotations

import copy
import importlib.metadata
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
CLUSTER = ROOT / "cluster"
DOCKERFILE = CLUSTER / "Dockerfile"


def _load_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _is_launcher(path: Path) -> bool:
    docs = _load_all(path)
    return len(docs) == 1 and isinstance(docs[0], dict) and "provider" in docs[0]


YAMLS = sorted(CLUSTER.glob("*.yaml"))
LAUNCHERS = [p for p in YAMLS if _is_launcher(p)]
MANIFESTS = [p for p in YAMLS if not _is_launcher(p)]
RAY_VERSION = importlib.metadata.version("ray")
JAX_VERSION = importlib.metadata.version("jax")


def _ids(paths):
    return [p.name for p in paths]


def _launcher(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(config))


def _ray_validate(config: dict) -> dict:
    """What `ray up` does to a config before the provider bootstrap: prepare, then validate."""
    from ray.autoscaler._private.util import validate_config

    prepared = _prepared(config)
    validate_config(prepared)
    return prepared


def _ray_schema() -> dict:
    import json

    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_the_launch_files_are_there():
    """The files docs/cluster.md offers (so the parametrized tests below are not vacuous), and every
    `cluster/...` file the docs name exists."""
    assert {p.name for p in LAUNCHERS} == {"tpu.yaml", "gpu-aws.yaml", "gpu-gcp.yaml"}
    assert {p.name for p in MANIFESTS} == {"kuberay-rayjob.yaml", "kuberay-rayjob-tpu.yaml"}
    named = set(re.findall(r"cluster/([A-Za-z0-9_.-]+\.yaml)", (ROOT / "docs" / "cluster.md").read_text()))
    assert named >= {p.name for p in YAMLS}, f"docs/cluster.md does not mention {({p.name for p in YAMLS}) - named}"
    assert all((CLUSTER / n).is_file() for n in named), named


# ---- `ray up` configs: Ray's own preparation and validation ------------------------------------------

@pytest.mark.parametrize("path", LAUNCHERS, ids=_ids(LAUNCHERS))
def test_launcher_passes_rays_validation(path):
    raw = _launcher(path)
    jsonschema.validate(raw, _ray_schema())  # the file as written
    prepared = _ray_validate(raw)  # after the provider defaults are merged in, as `ray up` validates it
    # the preparation did its work: defaults merged, the head capped at 0 workers, every type bounded
    assert prepared["cluster_synced_files"] == [] and "auth" in prepared
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["max_workers"] == 0
    assert all("min_workers" in t and "max_workers" in t for t in types.values())
    assert prepared["head_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]
    assert prepared["worker_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


def _first_worker(c: dict) -> dict:
    return next(t for n, t in c["available_node_types"].items() if n != c["head_node_type"])


MUTATIONS = {
    "max_worker": lambda c: _rename(c, "max_workers", "max_worker"),
    "avaliable_node_types": lambda c: _rename(c, "available_node_types", "avaliable_node_types"),
    "min_worker": lambda c: _rename(_first_worker(c), "min_workers", "min_worker"),
    "max_workers as a string": lambda c: c.update(max_workers=str(c["max_workers"])),
    "fractional resource": lambda c: _first_worker(c)["resources"].update(CPU=0.5),
    "start commands as a string": lambda c: c.update(head_start_ray_commands="; ".join(c["head_start_ray_commands"])),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("path", LAUNCHERS, ids=_ids(LAUNCHERS))
def test_a_typo_in_a_launcher_is_rejected(path, mutation):
    """The validation bites: a copy with one misspelt field or wrong type fails Ray's validation."""
    config = _launcher(path)
    MUTATIONS[mutation](config)
    with pytest.raises(jsonschema.ValidationError):
        _ray_validate(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _ray_schema())


def _is_tpu(node_config: dict) -> bool:
    return "acceleratorType" in node_config or "acceleratorConfig" in node_config


def _install_commands(prepared: dict, name: str) -> list[str]:
    """The setup commands `ray up` runs on a node of this type (a node type's own worker_setup_commands
    replace the global setup + worker commands)."""
    if name == prepared["head_node_type"]:
        return prepared["head_setup_commands"]
    return prepared["available_node_types"][name].get("worker_setup_commands", prepared["worker_setup_commands"])


def _pins(commands: list[str], package: str) -> set[str]:
    """Every version `package[...]==X` is pinned to in the commands."""
    return set(re.findall(rf"(?<![\w.-]){re.escape(package)}(?:\[[^\]]*\])?==([\w.]+)", " ".join(commands)))


@pytest.mark.parametrize("path", LAUNCHERS, ids=_ids(LAUNCHERS))
def test_launcher_semantics(path):
    """What the schema does not check: placement, bounds, the install, the files and token auth."""
    from ray._private.label_utils import validate_node_labels

    prepared = _ray_validate(_launcher(path))
    types, head = prepared["available_node_types"], prepared["head_node_type"]
    assert head in types
    # the head is a CPU machine that advertises no CPUs: the driver, GCS and the autoscaler keep it
    head_type = types[head]
    assert not _is_tpu(head_type["node_config"]), "a TPU cannot be the head node"
    assert head_type["resources"] == {"CPU": 0}, "the head must take no tasks and have no accelerators"
    assert "guestAccelerators" not in head_type["node_config"]
    workers = {n: t for n, t in types.items() if n != head}
    assert workers
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"], name
        assert t["resources"].get("CPU", 0) > 0, f"{name}: CPU tasks (data, evaluation) run on the workers"
        assert t["resources"].get("GPU", 0) > 0 or t["resources"].get("TPU", 0) > 0, f"{name} has no accelerator"
        validate_node_labels(t.get("labels"))
    assert sum(t["min_workers"] for t in workers.values()) <= prepared["max_workers"]

    # every node installs raygen from the synced working copy with the project's pins, at the client's Ray
    assert prepared["file_mounts"].get("~/raygen") == ".", "the working copy goes to ~/raygen"
    for name in types:
        cmds = prepared["setup_commands"] + _install_commands(prepared, name)
        installs = [c for c in cmds if "pip install" in c and " -e ." in c]
        assert installs, f"{name}: no `pip install -e .` of raygen"
        for c in installs:
            assert "cd ~/raygen" in c and "-c constraints.txt" in c, f"{name}: {c!r}"
        assert _pins(cmds, "ray") == {RAY_VERSION}, f"{name}: the cluster's Ray must be the client's ({RAY_VERSION})"
        for c in cmds:
            if "pip install" in c and "jax" in c:
                assert _pins([c], "jax") == {JAX_VERSION}, f"{name}: jax pinned to the tested {JAX_VERSION}: {c!r}"

    # token authentication: the token file on every node, the mode set where Ray starts
    assert prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert any("--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in prepared["head_start_ray_commands"])
    assert ".gitignore" in prepared["rsync_filter"], "the synced copy must leave out .venv and runs/"


# ---- TPU node types -----------------------------------------------------------------------------------

# Cloud TPU VM software versions by generation (Google's TPU runtime versions)
TPU_RUNTIMES = {"v4": ("tpu-ubuntu2204-base", "tpu-vm-v4-base"), "v5litepod": ("v2-alpha-tpuv5-lite",),
                "v5p": ("v2-alpha-tpuv5",), "v6e": ("v2-alpha-tpuv6e",)}


def _tpu_pod_type(node_config: dict) -> str:
    """The slice's accelerator type (e.g. v4-16), checked as GCP's `_validate_tpu_config` checks it."""
    from ray._private.accelerators.tpu import TPUAcceleratorManager, infer_tpu_pod_type_from_topology

    assert not ("acceleratorType" in node_config and "acceleratorConfig" in node_config)
    assert "machineType" not in node_config
    if "acceleratorType" in node_config:
        pod_type = node_config["acceleratorType"]
    else:
        cfg = node_config["acceleratorConfig"]
        assert set(cfg) == {"type", "topology"}, cfg
        assert re.fullmatch(r"V\d+[a-zA-Z]*|V5LITE_POD", cfg["type"]) and cfg["type"] not in ("V2", "V3")
        generation = cfg["type"].replace("V5LITE_POD", "V5LITEPOD")
        assert TPUAcceleratorManager.is_valid_tpu_accelerator_topology(generation, cfg["topology"]), cfg
        pod_type = infer_tpu_pod_type_from_topology(cfg["topology"], f"TPU-{generation}")
    assert TPUAcceleratorManager.is_valid_tpu_accelerator_type(pod_type), pod_type
    return pod_type


def test_tpu_launcher_describes_real_slices():
    from ray._private.accelerators import tpu

    prepared = _ray_validate(_launcher(CLUSTER / "tpu.yaml"))
    assert prepared["provider"]["type"] == "gcp"
    assert prepared["provider"].get("project_id") and prepared["provider"].get("availability_zone")
    slices = {}
    for name, t in prepared["available_node_types"].items():
        node = t["node_config"]
        if not _is_tpu(node):
            continue
        assert name != prepared["head_node_type"]
        pod_type = _tpu_pod_type(node)
        generation = pod_type.split("-")[0]
        assert node.get("runtimeVersion") in TPU_RUNTIMES[generation], f"{name}: {node.get('runtimeVersion')}"
        per_host = tpu.get_num_tpu_visible_chips_per_host(pod_type)
        assert t["resources"]["TPU"] == per_host, f"{name}: a {pod_type} host has {per_host} chips"
        slices[name] = (generation, tpu.get_total_chips_from_accelerator_type(pod_type) // per_host, node)
    assert {g for g, _, _ in slices.values()} >= {"v4", "v5litepod", "v6e"}
    assert any(hosts > 1 for _, hosts, _ in slices.values()), "one multi-host slice"
    assert any(n.get("schedulingConfig", {}).get("preemptible") or n.get("schedulingConfig", {}).get("spot")
               for _, _, n in slices.values()), "a preemptible (or spot) type"
    # the TPU hosts get jax with libtpu
    tpu_installs = [c for n in slices for c in _install_commands(prepared, n) if "jax[tpu]" in c]
    assert tpu_installs and _pins(tpu_installs, "jax") == {JAX_VERSION}


# the GPUs each machine type comes with (AWS EC2 instance types used in gpu-aws.yaml)
EC2_GPUS = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8, "g6.xlarge": 1,
            "g6.12xlarge": 4, "p4d.24xlarge": 8, "p5.48xlarge": 8}


def _gcp_gpus(node_config: dict) -> int:
    m = re.fullmatch(r"a[23]-(?:high|ultra|mega)gpu-(\d+)g", node_config["machineType"])
    if m:  # accelerator-optimized machine types come with their GPUs
        return int(m.group(1))
    return sum(a["acceleratorCount"] for a in node_config.get("guestAccelerators", []))


@pytest.mark.parametrize("name", ["gpu-aws.yaml", "gpu-gcp.yaml"])
def test_gpu_launchers_declare_the_machines_gpus(name):
    prepared = _ray_validate(_launcher(CLUSTER / name))
    provider = prepared["provider"]["type"]
    gpu_types = {n: t for n, t in prepared["available_node_types"].items() if t["resources"].get("GPU")}
    assert len(gpu_types) >= 2
    spot = []
    for n, t in gpu_types.items():
        node = t["node_config"]
        if provider == "aws":
            assert node["InstanceType"] in EC2_GPUS, f"{n}: add {node['InstanceType']} to EC2_GPUS"
            hw = EC2_GPUS[node["InstanceType"]]
            spot.append(node.get("InstanceMarketOptions", {}).get("MarketType") == "spot")
        else:
            hw = _gcp_gpus(node)
            assert node.get("scheduling", {}).get("onHostMaintenance") == "TERMINATE", f"{n}: GPU VMs cannot migrate"
            spot.append(bool(node["scheduling"].get("preemptible")))
        assert t["resources"]["GPU"] == hw, f"{n}: declares {t['resources']['GPU']} GPUs, the machine has {hw}"
    assert any(spot), "a spot / preemptible GPU type"
    if provider == "gcp":
        assert any("guestAccelerators" in t["node_config"] for t in gpu_types.values())
    # one OS image on every node: Ray needs the same Python everywhere
    images = {t["node_config"].get("ImageId") or t["node_config"]["disks"][0]["initializeParams"]["sourceImage"]
              for t in prepared["available_node_types"].values()}
    assert len(images) == 1, images


# ---- KubeRay RayJob manifests ------------------------------------------------------------------------

STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
INT = {"type": "integer"}
POD_TEMPLATE = {  # a pod template as the groups need it; the full PodSpec is Kubernetes' to validate
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["name", "image"],
                        "properties": {
                            "name": {"type": "string"}, "image": {"type": "string"},
                            "resources": {
                                "type": "object", "additionalProperties": False,
                                "properties": {"requests": {"type": "object", "additionalProperties": QUANTITY},
                                               "limits": {"type": "object", "additionalProperties": QUANTITY},
                                               "claims": {"type": "array"}},
                            },
                        },
                    },
                },
                "nodeSelector": STR_MAP,
            },
        },
    },
}
HEAD_GROUP = {
    "type": "object", "additionalProperties": False, "required": ["template"],
    "properties": {"template": POD_TEMPLATE, "headService": {"type": "object"}, "enableIngress": {"type": "boolean"},
                   "ingressOptions": {"type": "object"}, "resources": STR_MAP, "labels": STR_MAP,
                   "rayStartParams": STR_MAP, "serviceType": {"type": "string"}},
}
WORKER_GROUP = {
    "type": "object", "additionalProperties": False,
    "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "template"],
    "properties": {"suspend": {"type": "boolean"}, "groupName": {"type": "string", "minLength": 1},
                   "replicas": {**INT, "minimum": 0}, "minReplicas": {**INT, "minimum": 0},
                   "maxReplicas": {**INT, "minimum": 0}, "idleTimeoutSeconds": INT, "priority": INT,
                   "resources": STR_MAP, "labels": STR_MAP, "rayStartParams": STR_MAP, "template": POD_TEMPLATE,
                   "scaleStrategy": {"type": "object"}, "numOfHosts": {**INT, "minimum": 1}},
}
RAY_CLUSTER_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["headGroupSpec", "workerGroupSpecs"],
    "properties": {
        "upgradeStrategy": {"type": "object"},
        "authOptions": {"type": "object", "additionalProperties": False,
                        "properties": {"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"},
                                       "enableK8sTokenAuth": {"type": "boolean"}}},
        "suspend": {"type": "boolean"}, "managedBy": {"type": "string"}, "autoscalerOptions": {"type": "object"},
        "headServiceAnnotations": STR_MAP, "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": {"type": "object"}, "historyServerOptions": {"type": "object"},
        "networkPolicy": {"type": "object"}, "tlsOptions": {"type": "object"},
        "headGroupSpec": HEAD_GROUP, "rayVersion": {"type": "string"},
        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": WORKER_GROUP},
    },
}
SUBMISSION_MODES = ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]
RAYJOB_SPEC = {
    "type": "object", "additionalProperties": False,
    "required": ["entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes", "submissionMode"],
    "properties": {
        "activeDeadlineSeconds": {**INT, "minimum": 1}, "backoffLimit": {**INT, "minimum": 0},
        "rayClusterSpec": RAY_CLUSTER_SPEC, "submitterPodTemplate": {"type": "object"}, "metadata": STR_MAP,
        "clusterSelector": STR_MAP, "submitterConfig": {"type": "object"}, "managedBy": {"type": "string"},
        "deletionStrategy": {"type": "object"}, "submitterFinishedTimeoutSeconds": INT,
        "entrypoint": {"type": "string", "minLength": 1}, "runtimeEnvYAML": {"type": "string"},
        "jobId": {"type": "string"}, "submissionMode": {"enum": SUBMISSION_MODES},
        "entrypointResources": {"type": "string"}, "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"}, "ttlSecondsAfterFinished": {**INT, "minimum": 0},
        "shutdownAfterJobFinishes": {"type": "boolean"}, "suspend": {"type": "boolean"},
    },
}
RAYJOB = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"},
                   "metadata": {"type": "object", "required": ["name"]}, "spec": RAYJOB_SPEC},
}


def _rayjob(path: Path) -> dict:
    docs = _load_all(path)
    assert len(docs) == 1, f"{path.name}: one RayJob per file"
    return docs[0]


@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_rayjob_manifest_is_a_valid_rayjob(path):
    job = _rayjob(path)
    jsonschema.Draft7Validator.check_schema(RAYJOB)
    jsonschema.validate(job, RAYJOB)
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] in SUBMISSION_MODES
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION, "the image's Ray must be the one the project runs"
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "no work on the head"
    assert cluster.get("authOptions", {}).get("mode") == "token"
    for g in cluster["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    # every Ray container runs the same image (one Ray, one raygen)
    images = {c["image"] for grp in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in grp["template"]["spec"]["containers"]}
    assert len(images) == 1, images


RAYJOB_MUTATIONS = {
    "shutdownAfterJobFinish": lambda s: _rename(s, "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
    "ttlSecondAfterFinished": lambda s: _rename(s, "ttlSecondsAfterFinished", "ttlSecondAfterFinished"),
    "submissionMode K8sJob": lambda s: s.update(submissionMode="K8sJob"),
    "workerGroupSpec": lambda s: _rename(s["rayClusterSpec"], "workerGroupSpecs", "workerGroupSpec"),
    "minReplica": lambda s: _rename(s["rayClusterSpec"]["workerGroupSpecs"][0], "minReplicas", "minReplica"),
    "numOfHost": lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].update(numOfHost=1),
    "rayStartParam": lambda s: _rename(s["rayClusterSpec"]["headGroupSpec"], "rayStartParams", "rayStartParam"),
    "num-cpus as a number": lambda s: s["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
    "replicas as a string": lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="2"),
}


@pytest.mark.parametrize("mutation", list(RAYJOB_MUTATIONS))
@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_a_typo_in_a_rayjob_is_rejected(path, mutation):
    job = _rayjob(path)
    RAYJOB_MUTATIONS[mutation](job["spec"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, RAYJOB)


def _entrypoint(spec: dict) -> tuple[str, str | None, list[str]]:
    """(job name, preset, overrides) of `python jobs/<job>.py [--preset P] [k=v ...]`."""
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] in ("python", "python3"), argv
    m = re.fullmatch(r"jobs/(\w+)\.py", argv[1])
    assert m, f"the entrypoint runs a raygen job (jobs/<job>.py), got {argv[1]!r}"
    preset, overrides, rest = None, [], argv[2:]
    while rest:
        arg = rest.pop(0)
        if arg == "--preset":
            preset = rest.pop(0)
        else:
            assert re.fullmatch(r"[\w.]+=.*", arg), f"unexpected argument {arg!r}"
            overrides.append(arg)
    return m.group(1), preset, overrides


@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_rayjob_entrypoint_is_a_raygen_job_its_config_loader_accepts(path):
    from raygen import recipes
    from raygen.config import load_config
    from raygen.core.job import preset_dir

    spec = _rayjob(path)["spec"]
    job, preset, overrides = _entrypoint(spec)
    job_file = ROOT / "jobs" / f"{job}.py"
    assert job_file.is_file(), job_file
    recipe_name = re.search(r"run_job\(\"(\w+)\"\)", job_file.read_text()).group(1)
    assert preset and (ROOT / "raygen" / "configs" / recipe_name / f"{preset}.yaml").is_file(), preset
    # the preset and every key=value: raygen's own loader checks the keys, types and each section's rules
    recipe = recipes.get(recipe_name)
    cfg, _ = load_config(recipe.config, preset=preset, preset_dir=preset_dir(recipe_name), config_file=None,
                         overrides=overrides)
    assert re.fullmatch(r"(s3|gs)://[a-z0-9][a-z0-9.-]+/\S+", cfg.run.storage or ""), \
        "the run goes to a bucket (pods are deleted with the cluster)"
    assert cfg.run.name, "a named run: a retry on a fresh cluster resumes from run.storage"
    # the runtime env: fields Ray knows, valid as Ray validates them, working_dir = the image's copy
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    workdir = re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert env["working_dir"] == workdir
    RuntimeEnv(**{**env, "working_dir": str(ROOT)})  # the repository stands in for the image's copy


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_gpu_rayjob_requests_the_gpus_its_workers_need():
    spec = _rayjob(CLUSTER / "kuberay-rayjob.yaml")["spec"]
    cluster = spec["rayClusterSpec"]
    assert not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                   for c in _containers(cluster["headGroupSpec"]))
    gpus = 0
    for g in cluster["workerGroupSpecs"]:
        for c in _containers(g):
            limit = int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            gpus += limit * g["replicas"] * g.get("numOfHosts", 1)
    assert gpus > 0, "a worker group requests nvidia.com/gpu"
    _, _, overrides = _entrypoint(spec)
    kv = dict(o.split("=", 1) for o in overrides)
    assert kv.get("train.use_gpu") == "true"
    assert 0 < int(kv["train.num_workers"]) <= gpus, "one GPU per training worker"


# GKE's TPU node label for each Ray accelerator type
GKE_TPU_ACCELERATOR = {"TPU-V4": "tpu-v4-podslice", "TPU-V5LITEPOD": "tpu-v5-lite-podslice",
                       "TPU-V5P": "tpu-v5p-slice", "TPU-V6E": "tpu-v6e-slice"}


def test_tpu_rayjob_slice_matches_its_topology():
    from ray._private.accelerators import tpu

    spec = _rayjob(CLUSTER / "kuberay-rayjob-tpu.yaml")["spec"]
    _, _, overrides = _entrypoint(spec)
    kv = dict(o.split("=", 1) for o in overrides)
    assert kv.get("train.use_tpu") == "true"
    topology, accelerator = kv["train.topology"], kv["train.accelerator_type"]
    # Ray must be able to name the slice from these (it reserves the slice head by this name)
    pod_type = tpu.infer_tpu_pod_type_from_topology(topology, accelerator)
    generation = pod_type.split("-")[0]
    assert tpu.TPUAcceleratorManager.is_valid_tpu_accelerator_topology(generation, topology)
    chips_per_host = tpu.get_chips_per_host(topology, generation)
    hosts = tpu.get_num_chips_from_topology(topology) // chips_per_host

    cluster = spec["rayClusterSpec"]
    assert not any("google.com/tpu" in c.get("resources", {}).get("limits", {})
                   for c in _containers(cluster["headGroupSpec"]))
    tpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any("google.com/tpu" in c.get("resources", {}).get("limits", {}) for c in _containers(g))]
    assert len(tpu_groups) == 1
    g = tpu_groups[0]
    selector = g["template"]["spec"]["nodeSelector"]
    assert selector["cloud.google.com/gke-tpu-accelerator"] == GKE_TPU_ACCELERATOR[accelerator]
    assert selector["cloud.google.com/gke-tpu-topology"] == topology
    assert g["numOfHosts"] == hosts, f"a {topology} {pod_type} slice has {hosts} hosts"
    for c in _containers(g):
        assert int(c["resources"]["limits"]["google.com/tpu"]) == chips_per_host
        assert c["resources"]["requests"]["google.com/tpu"] == c["resources"]["limits"]["google.com/tpu"]
    assert int(kv["train.num_workers"]) == g["replicas"] * hosts, "one JAX process per host of each slice"


def test_dockerfile_installs_raygen_with_the_pins_at_the_projects_ray():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE=(\S+)", text, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{RAY_VERSION}-"), base
    install = re.search(r"^RUN (.*pip install.*)$", text, re.M).group(1)
    assert "-c constraints.txt" in install and " -e ." in install
    assert _pins(re.findall(r"EXTRA='([^']+)'", text), "jax") == {JAX_VERSION}
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)
