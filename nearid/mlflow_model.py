"""The trained NearID model as an MLflow model: a pyfunc that scores image pairs.

    import mlflow
    mlflow.set_tracking_uri("sqlite:///runs/demo/mlflow.db")   # or the `mlflow ui` server's URL
    import nearid.mlflow_model                                 # only for sqlite: see nearid/mlflow_artifacts.py
    scorer = mlflow.pyfunc.load_model("models:/nearid/1")      # or "models:/nearid/latest"
    scorer.predict(pd.DataFrame({"reference": ["ref.png"], "generated": ["gen.png"]}))
    # -> DataFrame with one `score` column (cosine similarity, as NearIDModel.score)

The model's artifacts are the HF-style model dir (config.json, model.safetensors, README.md)
under `artifacts/model_dir`. Nothing is pickled: the pyfunc is logged as "model from code" (a
three-line script that instantiates `NearIDPyfunc`, a class without state), and `load_context`
reads the weights from safetensors. Loading needs the nearid package importable (it is not
bundled with the model).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from .mlflow_artifacts import use_local_proxied_artifacts

REGISTERED_MODEL = "nearid"
MODEL_DIR_ARTIFACT = "model_dir"
INPUT_COLUMNS = ("reference", "generated")
MODEL_FILES = ("config.json", "model.safetensors", "README.md", "protocol.json")  # protocol.json if present

use_local_proxied_artifacts()   # `models:/nearid/1` of a SQLite store loads without a server


class NearIDPyfunc(mlflow.pyfunc.PythonModel):
    """input: a DataFrame with `reference` and `generated` image paths (local or fsspec URLs);
    output: a DataFrame with their cosine `score`. Param `batch_size` (default 32). The logged
    model's signature says the same (a DataFrame hint: MLflow infers no schema from it)."""

    def load_context(self, context) -> None:
        from .model import NearIDModel

        self.model = NearIDModel.from_pretrained(context.artifacts[MODEL_DIR_ARTIFACT])
        self.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        from .model import score_pairs

        frame = pd.DataFrame(model_input)
        missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"NearID model input needs columns {list(INPUT_COLUMNS)}; missing {missing}")
        pairs = list(zip(frame["reference"].astype(str), frame["generated"].astype(str)))
        batch_size = int((params or {}).get("batch_size") or 32)
        return pd.DataFrame({"score": score_pairs(self.model, pairs, batch_size=batch_size)})


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", c) for c in INPUT_COLUMNS]),
                          outputs=Schema([ColSpec("double", "score")]),
                          params=ParamSchema([ParamSpec("batch_size", "long", 32)]))


def pip_requirements() -> list[str]:
    """Pinned to this environment; given explicitly so MLflow does not load the model in a
    subprocess to infer them."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("mlflow", "torch", "transformers", "safetensors", "pillow", "pandas", "fsspec"):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            out.append(dist)
    return out


_MODEL_CODE = """# NearID pyfunc (MLflow model from code): no state here, weights load in load_context
import mlflow
from nearid.mlflow_model import NearIDPyfunc

mlflow.models.set_model(NearIDPyfunc())
"""


def _quiet_save(**kwargs) -> None:
    """mlflow.pyfunc.save_model without its advice about type hints and input examples (the
    signature is given) and without a progress bar for a local copy."""
    import logging
    import warnings

    env = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(**kwargs)
    finally:
        logger.setLevel(level)
        if env is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = env


def _model_dir_copy(model_dir: str | os.PathLike, into: Path) -> Path:
    """Only the model files (never pickles, summaries or training state) go into the model."""
    out = into / MODEL_DIR_ARTIFACT
    out.mkdir(parents=True)
    for name in MODEL_FILES:
        src = Path(model_dir, name)
        if src.is_file():
            (out / name).write_bytes(src.read_bytes())
    if not (out / "model.safetensors").is_file() or not (out / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a NearID model dir (config.json + model.safetensors)")
    return out


def log_pyfunc(client, experiment_id: str, run_id: str, model_dir: str | os.PathLike, *,
               registered_name: str | None = REGISTERED_MODEL, version_tags: dict | None = None,
               step: int = 0, name: str = REGISTERED_MODEL) -> dict:
    """Log `model_dir` as an MLflow (3) logged model of `run_id`, the run's output at `step`, and
    register it as a new version of `registered_name` (tagged with `version_tags`). Goes through
    `client` only (no fluent API, no global tracking URI)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    lm = client.create_logged_model(experiment_id, name=name, source_run_id=run_id,
                                    tags={"nearid.model_dir": str(model_dir)}, model_type="nearid")
    try:
        client.log_outputs(run_id, [LoggedModelOutput(lm.model_id, step=step)])
        with tempfile.TemporaryDirectory(prefix="nearid-mlflow-") as tmp:
            files = _model_dir_copy(model_dir, Path(tmp))
            local = Path(tmp, "mlflow_model")
            mlflow_model = Model(artifact_path=lm.artifact_location, run_id=run_id,
                                 model_uuid=lm.model_id, model_id=lm.model_id)
            code = Path(tmp, "nearid_pyfunc.py")
            code.write_text(_MODEL_CODE)
            _quiet_save(
                path=str(local), python_model=str(code), artifacts={MODEL_DIR_ARTIFACT: str(files)},
                signature=signature(), mlflow_model=mlflow_model, pip_requirements=pip_requirements(),
                metadata={"nearid_model_dir": str(model_dir)})
            client.log_model_artifacts(lm.model_id, str(local))
        client.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)
    except BaseException:
        client.finalize_logged_model(lm.model_id, LoggedModelStatus.FAILED)
        raise
    out = {"model_id": lm.model_id, "model_uri": f"models:/{lm.model_id}"}
    if registered_name:
        from mlflow.exceptions import MlflowException

        try:
            client.get_registered_model(registered_name)
        except MlflowException:
            client.create_registered_model(
                registered_name, description="NearID identity scorer: a frozen backbone + a trained "
                "MAP head. Input: `reference`, `generated` image paths; output: cosine `score`.")
        # the logged model's own location as the source: the registry then needs no global URI
        mv = client.create_model_version(registered_name, source=lm.artifact_location, run_id=run_id,
                                         tags={k: str(v) for k, v in (version_tags or {}).items()},
                                         model_id=lm.model_id)
        out.update({"registered_model": registered_name, "version": str(mv.version),
                    "version_uri": f"models:/{registered_name}/{mv.version}"})
    return out


def download_model_dir(uri: str, dst: str | os.PathLike | None = None, tracking_uri: str | None = None) -> Path:
    """The NearID model dir inside the MLflow model at `uri` (`models:/<name>/<version>`,
    `runs:/...`), downloaded into `dst` (a new temporary folder by default)."""
    import mlflow.artifacts

    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="nearid-model-"))
    try:
        with _store(tracking_uri):
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
    except Exception as e:  # noqa: BLE001 - unknown name/version, unreachable store: one clear message
        raise FileNotFoundError(f"{uri}: cannot fetch the MLflow model ({type(e).__name__}: {e})") from None
    model_dir = Path(local) / "artifacts" / MODEL_DIR_ARTIFACT
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{uri}: not a NearID MLflow model (no artifacts/{MODEL_DIR_ARTIFACT}/config.json)")
    return model_dir


@contextlib.contextmanager
def _store(uri: str | None):
    """MLflow's tracking and registry URI set to `uri` for the block: a `models:/` URI resolves its
    version through the process-wide registry URI, whatever is passed to download_artifacts."""
    if uri is None:
        yield
        return
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {k: os.environ.get(k) for k in keys}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
