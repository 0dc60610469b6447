"""`mlflow-artifacts:` locations of a SQLite tracking store, read and written without a server.

MLflow resolves `mlflow-artifacts:` only through a tracking server; a SQLite store's runs (the
embedded default) keep them in `<folder of mlflow.db>/mlartifacts`, as `mlflow ui` serves them.
A leaf module: the tracker and the pyfunc model both need it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("nearid.tracking")
ARTIFACTS_DIR = "mlartifacts"        # next to mlflow.db; `mlflow ui`'s default --artifacts-destination


def local_artifacts_dir(tracking_uri: str | None) -> Path | None:
    """`<folder of the SQLite file>/mlartifacts` for a SQLite tracking URI, else None."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return None
    db = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(os.path.abspath(db)).parent / ARTIFACTS_DIR


def _proxied_artifacts_repository(artifact_uri: str, tracking_uri: str | None = None,
                                  registry_uri: str | None = None):
    """`mlflow-artifacts:` locations: through the tracking server when there is one (MLflow's
    own repository), straight from `<db folder>/mlartifacts` when tracking is a SQLite file."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    if tracking_uri is None:
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()
    base = local_artifacts_dir(tracking_uri)
    if base is None:
        return MlflowArtifactsRepository(artifact_uri, tracking_uri=tracking_uri, registry_uri=registry_uri)
    rel = urlparse(artifact_uri).path.lstrip("/")
    return LocalArtifactRepository(base.joinpath(rel).as_uri(), tracking_uri=tracking_uri,
                                   registry_uri=registry_uri)


_RESOLVER_ON = False


def use_local_proxied_artifacts() -> bool:
    """Let this process read and write `mlflow-artifacts:` locations of SQLite stores without a
    server (MLflow itself refuses them unless tracking is http). Idempotent; False if MLflow's
    artifact repository registry is not where it used to be (then a server is needed)."""
    global _RESOLVER_ON
    if _RESOLVER_ON:
        return True
    try:
        from mlflow.store.artifact.artifact_repository_registry import _artifact_repository_registry

        _artifact_repository_registry.register("mlflow-artifacts", _proxied_artifacts_repository)
    except Exception as e:  # noqa: BLE001
        log.warning("cannot resolve mlflow-artifacts: locally (%s); serve them with `mlflow ui`", e)
        return False
    _RESOLVER_ON = True
    return True
