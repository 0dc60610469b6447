"""Write the KubeRay manifests in cluster/kuberay/ from one template.

    python cluster/make_rayjobs.py           # (re)write cluster/kuberay/*.yaml
    python cluster/make_rayjobs.py --check   # exit 1 if a committed file differs (tests run this)

One RayJob per stage (synth, generate, extract, train, evaluate, tune) and one for the whole
pipeline, each bringing up its own autoscaling RayCluster with only the worker groups that stage
needs and tearing it down when the job ends; plus a long-lived RayCluster for sweeps. Every Ray
container runs with token auth (RAY_AUTH_MODE=token, the token from the Secret `nearid-ray-auth`)
and gets the S3 credentials from the Secret `nearid-s3` (see secrets.example.yaml). The Ray
version comes from pyproject.toml, so manifests and the project cannot drift apart.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "cluster" / "kuberay"


def ray_version() -> str:
    """The Ray version pinned in pyproject.toml (`ray[...]==X.Y.Z`)."""
    m = re.search(r'"ray(?:\[[^\]]*\])?==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    if not m:
        raise SystemExit("pyproject.toml: no pinned ray==X.Y.Z dependency found")
    return m.group(1)


RAY = ray_version()
# Built by cluster/Dockerfile: rayproject/ray:<RAY>-py311-gpu + this project (pip install -e .)
# at /home/ray/nearid. Push it to your registry and change the prefix.
IMAGE = f"registry.example.com/nearid:ray{RAY}-py311-gpu"
CONFIG = "configs/paper.yaml"
AUTH_SECRET, S3_SECRET, HF_SECRET = "nearid-ray-auth", "nearid-s3", "nearid-hf"

# Where a job's data and runs go: edit these two, then rerun this script.
RUN_ROOT = "s3://my-bucket/nearid/paper"
MLFLOW_URI = "http://mlflow.mlflow.svc.cluster.local:5000"
# Non-secret env of every job (secrets come from Kubernetes Secrets, see ray_env()).
JOB_ENV = {
    "MLFLOW_TRACKING_URI": MLFLOW_URI,
    "HF_HOME": "/home/ray/.cache/huggingface",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "900",
}
EXCLUDES = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())["excludes"]

# EKS instance types; requests leave room for the kubelet and daemonsets.
GROUPS = {
    "cpu": {"instance": "m7i.4xlarge", "cpu": "14", "memory": "56Gi", "gpu": 0},          # synth, Data tasks
    "gpu-gen": {"instance": "g6e.4xlarge", "cpu": "14", "memory": "112Gi", "gpu": 1},     # 1x L40S 48 GB: FLUX/SDXL/Qwen edits
    "gpu-train": {"instance": "g6.4xlarge", "cpu": "14", "memory": "56Gi", "gpu": 1},     # 1x L4 24 GB: SigLIP2 extract, head training
}
# stage -> {worker group: max replicas}; every group scales from 0 on demand.
STAGES = {
    "synth": {"cpu": 8},
    "generate": {"gpu-gen": 8, "cpu": 2},       # generate.num_actors=8 x 1 GPU in configs/paper.yaml
    "extract": {"gpu-train": 8, "cpu": 2},      # extract.num_actors=8 x 1 GPU
    "train": {"gpu-train": 4},                  # train.num_workers=4 x 1 GPU
    "evaluate": {"gpu-train": 1, "cpu": 2},
    "tune": {"gpu-train": 8},                   # tune.max_concurrent_trials=8 x 1 GPU
    "pipeline": {"cpu": 8, "gpu-gen": 8, "gpu-train": 8},
}
DEADLINE_H = {"synth": 6, "generate": 48, "extract": 24, "train": 24, "evaluate": 6, "tune": 48, "pipeline": 120}


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict:
    ref = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def ray_env() -> list[dict]:
    """Env of every Ray container: token auth on, S3 credentials (and an optional non-AWS
    endpoint such as MinIO) and the Hugging Face token from Secrets, never from the manifest."""
    return [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        _secret_env("RAY_AUTH_TOKEN", AUTH_SECRET, "auth_token"),
        _secret_env("AWS_ACCESS_KEY_ID", S3_SECRET, "access_key_id", optional=True),
        _secret_env("AWS_SECRET_ACCESS_KEY", S3_SECRET, "secret_access_key", optional=True),
        _secret_env("AWS_ENDPOINT_URL_S3", S3_SECRET, "endpoint_url", optional=True),
        {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"},
        _secret_env("HF_TOKEN", HF_SECRET, "token", optional=True),
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
    ]


def container(name: str, cpu: str, memory: str, gpu: int = 0, ports: list | None = None) -> dict:
    res = {"cpu": cpu, "memory": memory}
    limits = {**res, **({"nvidia.com/gpu": gpu} if gpu else {})}
    c = {"name": name, "image": IMAGE, "env": ray_env(), "resources": {"requests": res, "limits": limits}}
    if ports:
        c["ports"] = ports
    return c


def head_group() -> dict:
    ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}]
    return {
        # num-cpus 0: job drivers run here, tasks and actors go to the worker groups
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {"spec": {"nodeSelector": {"node.kubernetes.io/instance-type": "m7i.2xlarge"},
                              "containers": [container("ray-head", "6", "24Gi", ports=ports)]}},
    }


def worker_group(name: str, max_replicas: int) -> dict:
    g = GROUPS[name]
    spec: dict = {"nodeSelector": {"node.kubernetes.io/instance-type": g["instance"]},
                  "containers": [container("ray-worker", g["cpu"], g["memory"], g["gpu"])]}
    if g["gpu"]:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"groupName": name, "replicas": 0, "minReplicas": 0, "maxReplicas": max_replicas,
            "rayStartParams": {}, "template": {"spec": spec}}


def cluster_spec(groups: dict[str, int]) -> dict:
    return {
        "rayVersion": RAY,
        # KubeRay >= 1.5.1 also wires the token into its own job submission and status calls.
        "authOptions": {"mode": "token", "secretName": AUTH_SECRET},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"idleTimeoutSeconds": 300, "env": ray_env()[:2]},
        "headGroupSpec": head_group(),
        "workerGroupSpecs": [worker_group(n, m) for n, m in groups.items()],
    }


def runtime_env_yaml() -> str:
    # working_dir is a path inside the image of the submitter pod: `ray job submit` uploads it,
    # so `configs/paper.yaml` and `python -m jobs.*` resolve in the job's working directory.
    env = {"working_dir": "/home/ray/nearid", "excludes": EXCLUDES, "env_vars": JOB_ENV}
    return yaml.safe_dump(env, sort_keys=False)


def entrypoint(stage: str) -> str:
    # Literal values, no $VARS: KubeRay's submitter pod runs the entrypoint through bash, which
    # would expand a variable there, where the job's runtime env does not exist.
    return f"python -m jobs.{stage} --config {CONFIG} --set run.root={RUN_ROOT} --set tracking.uri={MLFLOW_URI}"


def rayjob(stage: str) -> dict:
    submitter = container("ray-job-submitter", "1", "2Gi")
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": f"nearid-{stage}", "labels": {"app.kubernetes.io/name": "nearid",
                                                          "nearid/stage": stage}},
        "spec": {
            "entrypoint": entrypoint(stage),
            "runtimeEnvYAML": runtime_env_yaml(),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "activeDeadlineSeconds": DEADLINE_H[stage] * 3600,
            # a stage skips work whose outputs exist, so a retry resumes instead of starting over
            "backoffLimit": 2,
            "submitterPodTemplate": {"spec": {"restartPolicy": "Never", "containers": [submitter]}},
            "rayClusterSpec": cluster_spec(STAGES[stage]),
        },
    }


def raycluster() -> dict:
    return {
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": "nearid-sweeps", "labels": {"app.kubernetes.io/name": "nearid"}},
        "spec": cluster_spec({"gpu-train": 8, "cpu": 4}),
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, s: str):
    style = "|" if "\n" in s else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


_Dumper.add_representer(str, _str)


def render() -> dict[str, str]:
    """File name -> text of every generated manifest."""
    head = "# GENERATED by cluster/make_rayjobs.py from one template: edit the generator, not this file.\n"
    files = {f"rayjob-{s}.yaml": rayjob(s) for s in STAGES}
    files["raycluster-sweeps.yaml"] = raycluster()
    return {name: head + yaml.dump(copy.deepcopy(doc), Dumper=_Dumper, sort_keys=False, width=4096)
            for name, doc in files.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="fail if committed manifests are out of date")
    args = p.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date: {stale}; run `python cluster/make_rayjobs.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
