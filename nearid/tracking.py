"""MLflow tracking that never blocks or crashes the job it observes.

Every call is retried a few times and then downgraded to a warning (counted in `lost`), so a
tracking server that is briefly down costs metrics, not a training run. Parameters are flattened
and scrubbed: anything that looks like a credential is replaced before it leaves the process.

Local runs (the SQLite default) keep their artifacts under the run root in `mlartifacts/`, and the
experiment records them as proxied `mlflow-artifacts:/<experiment>/...` locations, not absolute
`file://` paths: the run folder can move. Serve them with the command `Tracker.ui_hint()` prints
(`mlflow ui --backend-store-uri sqlite:///<root>/mlflow.db --artifacts-destination <root>/mlartifacts`);
in this process (and any that imports nearid.tracking) a SQLite tracking URI resolves
`mlflow-artifacts:` locations to `<folder of mlflow.db>/mlartifacts`, which is where MLflow's own
server puts them by default.

Metric names are `/`-grouped (`train/loss`, `val/ssr`, `eval/ssr`, `generate/<setting>/...`), so
MLflow's chart view keeps stages apart. The training loop reports Ray-style flat names (`loss`,
`val_ssr`); `metric_key` maps them. Counts (`rows`, `n`, `items`, `chunks`, `checked`) are never
metrics: `log_metrics` turns them into tags.
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

from .mlflow_artifacts import ARTIFACTS_DIR, local_artifacts_dir, use_local_proxied_artifacts  # noqa: F401 (re-exported)

log = logging.getLogger("nearid.tracking")

UI_PORT = 5000
ML_WORKFLOW = "workflowType=machine_learning"
# the experiment tag MLflow's UI reads to open an experiment in machine-learning (not GenAI) mode
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}

# Narrow on purpose: a word anywhere (secret_access_key, db_password) or a credential noun at the
# end of the key's last part (hf_token, api_key); `token_mixing` or `write_tokens` are settings.
_SECRET_WORD = re.compile(r"(^|_)(secret|password|passwd|credentials?)(_|$)")
_SECRET_END = re.compile(r"(^|_)(token|api_?key|access_?key|auth|bearer)$")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "HF_TOKEN")

# the flat names the training loop reports (Ray Train / Tune metrics) -> MLflow groups
_TRAIN_KEYS = {"loss", "lr", "grad_norm", "epoch", "train_seconds"}
_COUNT = re.compile(r"(^|[/._])(rows|n|items|chunks|checked)$")


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


def metric_key(key: str) -> str:
    """`val_ssr` -> `val/ssr`, `loss`/`loss_ranking`/`lr` -> `train/...`; grouped names pass."""
    if "/" in key:
        return key
    if key.startswith("val_"):
        return "val/" + key[4:]
    if key in _TRAIN_KEYS or key.startswith("loss_"):
        return "train/" + key.removeprefix("train_")
    return key


def is_count(key: str) -> bool:
    return bool(_COUNT.search(key))


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


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "experiment"


class Tracker:
    """A thin, failure-tolerant wrapper around one MLflow run.

    `child()` gives a Tracker whose runs nest under this one's current run (the pipeline's
    stages, an evaluation's scorers); `for_run(run_id)` one that writes to an existing run.
    Both share this Tracker's client (one SQLite connection pool per process)."""

    def __init__(self, uri: str | None, experiment: str, enabled: bool = True, retries: int = 3,
                 artifact_root: str | None = None, parent_run_id: str | None = None):
        # MLflow's own HTTP client retries for minutes with backoff; our retries are short and
        # bounded, so a dead server costs seconds, not the run.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self.experiment, self.enabled, self.retries = uri, experiment, enabled, retries
        self.artifact_root = artifact_root
        self.parent_run_id = parent_run_id
        self.run_id: str | None = None
        self.lost = 0
        # metric points whose send failed wait here and go out with the next batch or at flush(),
        # so a tracking server restarted mid-run ends up with every point; what never goes out is
        # counted in lost_points (and reported) instead of vanishing
        self._outbox: list = []
        self.lost_points = 0
        self._client = None
        self._experiment_id: str | None = None

    @classmethod
    def from_config(cls, cfg, storage=None) -> "Tracker":
        uri = default_tracking_uri(cfg, storage)
        art = None
        if uri.startswith("sqlite:"):
            # proxied, not file://<absolute path>: survives moving the run folder
            art = f"mlflow-artifacts:/{_slug(cfg.tracking.experiment)}"
        return cls(uri, cfg.tracking.experiment, cfg.tracking.enabled, cfg.tracking.retries, art)

    def settings(self) -> dict:
        """What it takes to rebuild this Tracker elsewhere (a Ray actor, a Tune searcher)."""
        return {"uri": self.uri, "experiment": self.experiment, "enabled": self.enabled,
                "retries": self.retries, "artifact_root": self.artifact_root}

    def _sibling(self, parent_run_id: str | None) -> "Tracker":
        t = Tracker(self.uri, self.experiment, self.enabled, self.retries, self.artifact_root,
                    parent_run_id)
        t._client = self.client if self.enabled else None
        t._experiment_id = self._experiment_id
        return t

    def child(self) -> "Tracker":
        """A Tracker whose `start`/`run` create runs nested under this Tracker's current run."""
        return self._sibling(self.run_id)

    def for_run(self, run_id: str | None) -> "Tracker":
        """A Tracker attached to an existing run (e.g. a Tune trial's child run)."""
        t = self._sibling(self.parent_run_id)
        t.run_id = run_id
        return t

    def _call(self, what: str, fn, *args, **kwargs):
        return self._tries(what, self.retries, fn, *args, **kwargs)

    def _tries(self, what: str, retries: int, fn, *args, **kwargs):
        ok, out = self._attempt(what, retries, fn, *args, **kwargs)
        if not ok:
            self.lost += 1
            log.warning("MLflow %s lost after %d tries (%s)", what, retries + 1, out)
        return out if ok else None

    def _attempt(self, what: str, retries: int, fn, *args, **kwargs) -> tuple[bool, Any]:
        """(True, result) or (False, the last error as text); never raises."""
        if not self.enabled:
            return True, None
        delay = 0.5
        for attempt in range(retries + 1):
            try:
                return True, fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - tracking must never take the job down
                if attempt == retries:
                    return False, f"{type(e).__name__}: {str(e)[:200]}"
                time.sleep(delay)
                delay *= 2
        return False, "no attempt"

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            use_local_proxied_artifacts()
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @property
    def artifacts_dir(self) -> Path | None:
        """Where a SQLite store keeps its artifacts (None for a tracking server)."""
        return local_artifacts_dir(self.uri)

    def experiment_id(self) -> str | None:
        if self._experiment_id is not None:
            return self._experiment_id

        def get():
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is not None:
                if self.artifact_root and exp.artifact_location.startswith("file:"):
                    log.warning("MLflow experiment '%s' keeps artifacts at %s (made by an older nearid): "
                                "they will not be found once the run folder moves; a new experiment "
                                "name (tracking.experiment) gets relocatable ones", self.experiment,
                                exp.artifact_location)
                return exp.experiment_id
            return self.client.create_experiment(self.experiment, artifact_location=self.artifact_root,
                                                 tags=EXPERIMENT_KIND)
        self._experiment_id = self._call("experiment", get)
        return self._experiment_id

    def start(self, run_name: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> str | None:
        exp = self.experiment_id()
        if exp is None:
            return None
        tags = dict(scrub(tags or {}))
        tags["mlflow.runName"] = run_name
        parent_run_id = parent_run_id or self.parent_run_id
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

    def log_metrics(self, metrics: dict[str, float], step: int | None = None,
                    model_id: str | None = None) -> None:
        """Results as metrics under `/`-grouped names (see `metric_key`); counts become tags."""
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items, counts = [], {}
        for k, v in metrics.items():
            if v is None or v != v:
                continue
            key = metric_key(k)
            if is_count(key):
                counts[key] = str(int(v)) if float(v).is_integer() else str(v)
            else:
                items.append(Metric(key, float(v), ts, step or 0, model_id=model_id))
        if items or self._outbox:
            self._send_metrics(items)
        if counts:
            self.set_tags(counts)

    # MLflow's log_batch takes at most 1000 metrics per request
    _BATCH = 1000
    OUTBOX_MAX = 200_000

    def _send_metrics(self, items: list) -> None:
        # while points wait (the server was down a moment ago) one quick try per call, so a dead
        # server costs the training loop one refused connection per log, not a retry ladder
        retries = 0 if self._outbox else self.retries
        pending = self._outbox + items
        self._outbox = []
        for i in range(0, len(pending), self._BATCH):
            chunk = pending[i:i + self._BATCH]
            ok, err = self._attempt("metrics", retries, self.client.log_batch, self.run_id, metrics=chunk)
            if not ok:
                self._outbox = pending[i:]
                if len(self._outbox) > self.OUTBOX_MAX:
                    dropped = len(self._outbox) - self.OUTBOX_MAX
                    self.lost_points += dropped
                    self._outbox = self._outbox[dropped:]
                log.warning("MLflow metrics not sent (%s): %d points kept for retry", err,
                            len(self._outbox))
                return
            retries = 0

    @property
    def pending_points(self) -> int:
        return len(self._outbox)

    def flush(self) -> int:
        """Send the metric points still waiting (with the usual retries); those that cannot be
        sent are dropped and counted in `lost_points`. Returns lost_points."""
        if self._outbox and self.run_id is not None:
            waiting, self._outbox = self._outbox, []
            for i in range(0, len(waiting), self._BATCH):
                ok, err = self._attempt("metrics", self.retries, self.client.log_batch, self.run_id,
                                        metrics=waiting[i:i + self._BATCH])
                if not ok:
                    lost = len(waiting) - i
                    self.lost_points += lost
                    log.warning("MLflow: %d metric points lost (%s)", lost, err)
                    break
        return self.lost_points

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in scrub(tags).items()]
        if items:
            self._call("tags", self.client.log_batch, self.run_id, tags=items)

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

    def log_model(self, model_dir: str | os.PathLike, registered_name: str | None = None,
                  version_tags: dict[str, Any] | None = None, step: int = 0) -> dict | None:
        """Log a NearID model dir as an MLflow pyfunc model of this run (nearid.mlflow_model) and,
        with `registered_name`, as a new version of that registered model. Returns
        {"model_id", "model_uri"[, "registered_model", "version", "version_uri"]} or None."""
        if self.run_id is None or self.experiment_id() is None:
            return None
        from .mlflow_model import log_pyfunc

        # one try: a retry after a partial failure would log a second model and version
        return self._tries("model", 0, log_pyfunc, self.client, self.experiment_id(), self.run_id,
                           model_dir, registered_name=registered_name,
                           version_tags=scrub(version_tags or {}), step=step)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.flush()
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

    @contextmanager
    def child_run(self, run_name: str, tags: dict[str, str] | None = None):
        """A run nested under this Tracker's current run: `with t.child_run("x") as c: c.log_...`."""
        child = self.child()
        with child.run(run_name, tags):
            yield child
        self.lost += child.lost
        self.lost_points += child.lost_points

    def ui_url(self, base: str | None = None) -> str:
        """The experiment's runs table in machine-learning mode (MLflow 3.17 UI route)."""
        base = (base or (self.uri if self.uri and self.uri.startswith("http") else
                         f"http://127.0.0.1:{UI_PORT}")).rstrip("/")
        exp = self.experiment_id() if self.enabled else None
        return f"{base}/#/experiments/{exp}/runs?{ML_WORKFLOW}" if exp else f"{base}/#/experiments?{ML_WORKFLOW}"

    def ui_hint(self) -> str:
        """For a SQLite store: the command that serves it (artifacts included, wherever the run
        folder now is) and the link; for a tracking server: the link."""
        art = self.artifacts_dir
        if art is not None:
            return (f"mlflow ui --backend-store-uri {self.uri} --artifacts-destination {art} "
                    f"--port {UI_PORT}  then open {self.ui_url()}")
        return f"open {self.ui_url()}"
