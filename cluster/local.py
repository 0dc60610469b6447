"""The local dev stack from the command line, and jobs submitted to it.

    python -m cluster.local up            # start all three, wait until each answers
    python -m cluster.local submit-demo   # `ray job submit` the pipeline: data on s3://, MLflow server
    python -m cluster.local down          # stop exactly the processes `up` started

`up` writes `<state_dir>/stack.json` (pids, ports, URLs). `down` never runs `ray stop` (that kills
every Ray runtime on the machine): it stops the process trees it started, plus any process that
inherited this stack's id (`NEARID_STACK_ID`), and checks that they are gone. The stack itself:
`cluster/stack.py`; the checks every job runs first: `nearid/preflight.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from typing import Any

from cluster.stack import (STACK_FILE, StackConfig, StackError, client_env, load_stack_config,
                           read_state, stack_processes, start_stack, stop_stack, venv_bin)
from nearid.preflight import working_dir_excludes


# ---- jobs against the stack -------------------------------------------------------------------------
def job_runtime_env(cfg: StackConfig, working_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The runtime env of a job on this stack: moto credentials and the demo env vars; with
    `working_dir`, the repo upload (minus the venv, run outputs and .git)."""
    env = {"AWS_ACCESS_KEY_ID": cfg.s3.access_key_id, "AWS_SECRET_ACCESS_KEY": cfg.s3.secret_access_key,
           "AWS_DEFAULT_REGION": cfg.s3.region, **cfg.demo.env_vars}
    rt: dict[str, Any] = {"env_vars": env, "excludes": working_dir_excludes()}
    if working_dir is not None:
        rt["working_dir"] = str(working_dir)
    return rt


def pipeline_args(cfg: StackConfig, state: dict[str, Any], prefix: str | None = None,
                  overrides: list[str] | None = None) -> list[str]:
    """`python -m jobs.pipeline ...` pointed at the stack: run.root on its S3, tracking on its MLflow."""
    root = f"s3://{state['s3']['bucket']}/{prefix or cfg.demo.prefix}"
    sets = [f"run.root={root}", f"storage.endpoint_url={state['urls']['s3']}",
            f"storage.region={state['s3']['region']}", f"tracking.uri={state['urls']['mlflow']}",
            "ray.address=auto", *cfg.demo.overrides, *(overrides or [])]
    argv = ["python", "-m", "jobs.pipeline", "--config", cfg.demo.config]
    for s in sets:
        argv += ["--set", s]
    return argv


def submit_demo(cfg: StackConfig, state: dict[str, Any], cwd: str | os.PathLike = ".") -> int:
    """`ray job submit` the demo pipeline through the CLI, follow its logs; returns the exit code."""
    rt = job_runtime_env(cfg)
    masked = {**rt, "env_vars": {k: "***" if "SECRET" in k else v for k, v in rt["env_vars"].items()}}

    def command(runtime_env: dict) -> list[str]:
        return [venv_bin("ray"), "job", "submit", "--address", state["urls"]["dashboard"],
                "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--",
                *pipeline_args(cfg, state)]

    print("$ RAY_AUTH_MODE=token", shlex.join(command(masked)), flush=True)
    cmd = command(rt)
    return subprocess.call(cmd, cwd=cwd, env={**os.environ, **client_env(state)})


# ---- CLI ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "status", "submit-demo"])
    parser.add_argument("--config", default="cluster/local-stack.yaml", help="stack config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="override a stack config value (repeatable)")
    args = parser.parse_args(argv)
    try:
        cfg = load_stack_config(args.config, args.overrides)
        if args.action == "up":
            state = start_stack(cfg)
            u = state["urls"]
            print(f"stack up in {state['startup_s']}s (state: {state['state_dir']}/{STACK_FILE})\n"
                  f"  Ray dashboard / job API: {u['dashboard']}  (RAY_AUTH_MODE=token "
                  f"RAY_AUTH_TOKEN_PATH={state['ray_auth_token_path']})\n"
                  f"  MLflow: {u['mlflow']}\n  S3 (moto): {u['s3']}  bucket s3://{cfg.s3.bucket}")
        elif args.action == "down":
            pids = stop_stack(cfg.state_dir)
            print(f"stopped {len(pids)} processes: {pids}")
        elif args.action == "status":
            state = read_state(cfg.state_dir)
            alive = [p.pid for p in stack_processes(state)]
            print(json.dumps({**state, "alive_pids": alive}, indent=2))
        else:
            return submit_demo(cfg, read_state(cfg.state_dir))
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
