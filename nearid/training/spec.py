"""What one training run is given: the typed spec of `training.loop.train_loop`.

Ray Train hands its `train_loop_config` to the workers as a dict, so the spec travels as
`to_dict()` and the loop rebuilds it with `from_dict()` (an unknown key is an error, not ignored).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

CONTEXTS = ("train", "tune", "local")


@dataclass(frozen=True)
class LoopSpec:
    """cfg: the run's `Config` as JSON; settings: the training settings; items / val_items: the
    item tables; n_items: rows of `items` (steps per epoch come from it); run_id: the MLflow run
    rank 0 appends to (None: no tracking); context: "train" (Ray Train worker), "tune" (Tune
    trial) or "local" (in-process, `out_dir` receives the checkpoints); driver_pid: the job
    driver (for the driver-kill hook).

    The fault hooks of the crash tests (`nearid.faults`): `fault_kill_step` + `fault_marker` kill
    the last worker once at that step; `fault_pause_steps` + `fault_pause_dir` pause rank 0 there."""

    cfg: str
    settings: tuple[str, ...]
    items: str
    val_items: str
    n_items: int
    run_id: str | None = None
    context: str = "local"
    out_dir: str | None = None
    tracking_uri: str | None = None
    driver_pid: int | None = None
    fault_kill_step: int | None = None
    fault_marker: str | None = None
    fault_pause_steps: tuple[int, ...] = field(default=())
    fault_pause_dir: str | None = None

    def __post_init__(self):
        if self.context not in CONTEXTS:
            raise ValueError(f"loop context {self.context!r}: one of {', '.join(CONTEXTS)}")
        object.__setattr__(self, "settings", tuple(self.settings))
        object.__setattr__(self, "fault_pause_steps", tuple(int(s) for s in self.fault_pause_steps or ()))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["settings"], d["fault_pause_steps"] = list(self.settings), list(self.fault_pause_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoopSpec":
        _check_keys(d)
        return cls(**d)

    def with_(self, **changes) -> "LoopSpec":
        """A copy with some fields replaced (an unknown field is an error)."""
        _check_keys(changes)
        return replace(self, **changes)

    def config(self):
        from ..config import Config

        return Config.model_validate_json(self.cfg)


def _check_keys(d: dict) -> None:
    known = {f.name for f in fields(LoopSpec)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown training loop key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
