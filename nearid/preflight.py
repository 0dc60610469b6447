"""Fail-fast checks every job runs before it starts: the Ray address and the MLflow server answer
(`check_endpoints`), and what `ray job submit --working-dir .` never uploads
(`working_dir_excludes`, from cluster/runtime_env.yaml)."""
from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV_FILE = REPO_ROOT / "cluster" / "runtime_env.yaml"


def working_dir_excludes() -> list[str]:
    """What `--working-dir .` never uploads (the venv, run outputs, .git): cluster/runtime_env.yaml."""
    return list(yaml.safe_load(RUNTIME_ENV_FILE.read_text())["excludes"])

class EndpointError(RuntimeError):
    """A configured endpoint (Ray address, MLflow server) does not answer."""

def _host_port(address: str) -> tuple[str, int] | None:
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parts.port
    except ValueError:
        return None
    return (parts.hostname, port) if parts.hostname and port else None


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """Raise EndpointError if a Ray address (`host:port`, `ray://host:port`, or `auto` with
    RAY_ADDRESS set) does not accept connections; `ray.init` would otherwise retry for minutes."""
    if not address or address == "local":
        return
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not address or address == "auto":
            return
    hp = _host_port(address)
    if hp is None:
        raise EndpointError(f"ray.address {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection(hp, timeout=timeout).close()
    except OSError as e:
        raise EndpointError(
            f"cannot reach the Ray cluster at ray.address={address} ({hp[0]}:{hp[1]}): {e}. Check that "
            "the head runs and the GCS port is right (`ray status --address host:port`); inside "
            "`ray job submit` use ray.address=auto.") from None


def check_tracking_uri(uri: str | None, timeout: float = 5.0) -> None:
    """Raise EndpointError if an http(s) MLflow tracking server does not answer at all."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return   # it answered (maybe 401/404 behind a proxy): the server is there
    except (OSError, urllib.error.URLError) as e:
        reason = getattr(e, "reason", e)
        raise EndpointError(
            f"cannot reach the MLflow tracking server at tracking.uri={uri}: {reason}. Start it "
            "(`mlflow server --host ... --port ...`), fix tracking.uri, or set "
            "tracking.enabled=false to run without tracking.") from None


def check_endpoints(cfg, timeout: float = 5.0) -> None:
    """Probe the Ray address and the MLflow server of a job config before any work starts."""
    check_ray_address(cfg.ray.address, timeout)
    if cfg.tracking.enabled:
        check_tracking_uri(cfg.tracking.uri, timeout)

