"""MLflow tracking that never blocks or crashes the job it observes.

Every call is retried a few times and then downgraded to a warning (counted in `lost`), so a
tracking server that is briefly down costs metrics, not a training run. Parameters are flattened
and scrubbed: anything that looks like a credential is replaced before it leaves the process.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("nearid.tracking")

# Narrow on purpose: a word anywhere (secret_access_key, db_password) or a credential noun at the
# end of the key's last part (hf_token, api_key); `token_mixing` or `write_tokens` are settings.
_SECRET_WORD = re.compile(r"(^|_)(secret|password|passwd|credentials?)(_|$)")
_SECRET_END = re.compile(r"(^|_)(token|api_?key|access_?key|auth|bearer)$")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "HF_TOKEN")


def scrub(params: dict[str, Any]) -> dict[str, Any]:
    """Drop credential-looking keys and any value equal to a secret in the environment."""
    secrets = {os.environ[k] for k in _SECRET_ENV if os.environ.get(k)}
    out = {}
    for k, v in params.items():
        text = str(v)
        last = str(k).rsplit(".", 1)[-1].lower().replace("-", "_")
        if _SECRET_WORD.search(last) or _SECRET_END.search(last) or any(s and s in text for s in secrets):
            out[k] = "***"
        else:
            out[k] = text[:500]
    return out


def default_tracking_uri(cfg, storage=None) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    base = storage.base if storage is not None and not storage.is_s3 else os.path.abspath("runs")
    os.makedirs(base, exist_ok=True)
    return f"sqlite:///{base}/mlflow.db"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


class Tracker:
    """A thin, failure-tolerant wrapper around one MLflow run."""

    def __init__(self, uri: str | None, experiment: str, enabled: bool = True, retries: int = 3,
                 artifact_root: str | None = None):
        # MLflow's own HTTP client retries for minutes with backoff; our retries are short and
        # bounded, so a dead server costs seconds, not the run.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self.experiment, self.enabled, self.retries = uri, experiment, enabled, retries
        self.artifact_root = artifact_root
        self.run_id: str | None = None
        self.lost = 0
        self._client = None

    @classmethod
    def from_config(cls, cfg, storage=None) -> "Tracker":
        uri = default_tracking_uri(cfg, storage)
        art = None
        if uri.startswith("sqlite:"):
            art = Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
        return cls(uri, cfg.tracking.experiment, cfg.tracking.enabled, cfg.tracking.retries, art)

    def _call(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - tracking must never take the job down
                if attempt == self.retries:
                    self.lost += 1
                    log.warning("MLflow %s lost after %d tries (%s: %s)", what, attempt + 1,
                                type(e).__name__, str(e)[:200])
                    return None
                time.sleep(delay)
                delay *= 2

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def experiment_id(self) -> str | None:
        def get():
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is not None:
                return exp.experiment_id
            return self.client.create_experiment(self.experiment, artifact_location=self.artifact_root)
        return self._call("experiment", get)

    def start(self, run_name: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> str | None:
        exp = self.experiment_id()
        if exp is None:
            return None
        tags = dict(scrub(tags or {}))
        tags["mlflow.runName"] = run_name
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self._call("start run", self.client.create_run, exp, tags=tags, run_name=run_name)
        self.run_id = run.info.run_id if run is not None else None
        return self.run_id

    def attach(self, run_id: str) -> None:
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in scrub(params).items()]
        for i in range(0, len(items), 100):
            self._call("params", self.client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if v is not None and v == v]
        if items:
            self._call("metrics", self.client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id is None:
            return
        for k, v in scrub(tags).items():
            self._call("tag", self.client.set_tag, self.run_id, k, v)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.run_id is None:
            return
        p = Path(path)
        fn = self.client.log_artifacts if p.is_dir() else self.client.log_artifact
        self._call(f"artifact {p.name}", fn, self.run_id, str(p), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if self.run_id is not None:
            self._call(f"text {name}", self.client.log_text, self.run_id, text, name)

    def log_figure(self, fig, name: str) -> None:
        if self.run_id is not None:
            self._call(f"figure {name}", self.client.log_figure, self.run_id, fig, name)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self._call("end run", self.client.set_terminated, self.run_id, status)

    @contextmanager
    def run(self, run_name: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None):
        self.start(run_name, tags, parent_run_id)
        try:
            yield self
        except BaseException:
            self.end("FAILED")
            raise
        self.end("FINISHED")
        if self.lost:
            log.warning("MLflow: %d tracking calls were lost (see warnings above)", self.lost)

    def ui_hint(self) -> str:
        if self.uri and self.uri.startswith("sqlite:"):
            return f"mlflow ui --backend-store-uri {self.uri}"
        return f"open {self.uri}"
