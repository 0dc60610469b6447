"""Searchers and the scheduler of a sweep: tie-broken scores (`tie_broken`, `TieBreakASHA`), the
fixed ablation grid (`GridSearcher`), the MLflow child-run wrapper (`ChildRunSearcher`) and
`build_searcher`. Module-level classes: Tune pickles searchers with the experiment state."""
from __future__ import annotations

import json
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher

from nearid.config import Config
from tune.space import RUN_KEY, DefineByRun, SearchSpace, SpaceError, effective_params

# Tie-break weight: below one SSR step (100 / rows) for validation sets of up to 10^4 rows.
TIE_EPS = 1e-4


def tie_broken(result: dict | None, metric: str, tie_break: str | None, mode: str = "max") -> dict | None:
    """The result with `metric` moved by TIE_EPS * tie_break towards "better" (the tie-break is a
    higher-is-better metric such as val_pa, whatever the metric's mode).

    SSR is all-or-nothing per row, so early in training every trial ties at 0 and neither ASHA
    nor TPE can rank them; PA moves long before SSR does. The scheduler and the searcher see
    this score; tables, MLflow and the reported metric stay the plain metric."""
    if not result or not tie_break or result.get(metric) is None or result.get(tie_break) is None:
        return result
    sign = 1.0 if mode == "max" else -1.0
    return {**result, metric: float(result[metric]) + sign * TIE_EPS * float(result[tie_break])}


class TieBreakASHA(ASHAScheduler):
    """ASHA ranking trials by `tie_broken` scores."""

    def __init__(self, tie_break: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.tie_break = tie_break

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return super().on_trial_result(tune_controller, trial, self._score(result))

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, self._score(result))

    def _score(self, result: dict) -> dict:
        return tie_broken(result, self._metric, self.tie_break, self._mode)


# ---- searchers -----------------------------------------------------------------------------------
class GridSearcher(Searcher):
    """Hands out a fixed list of configs in order (the ablation grid), then reports FINISHED."""

    def __init__(self, points: list[dict], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.points, self.next_index = points, 0

    def suggest(self, trial_id: str):
        if self.next_index >= len(self.points):
            return Searcher.FINISHED
        self.next_index += 1
        return dict(self.points[self.next_index - 1])

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({"points": self.points, "next": self.next_index}))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.points, self.next_index = state["points"], state["next"]


class ChildRunSearcher(Searcher):
    """Wraps the real searcher: each suggestion gets an MLflow child run (params logged) created
    here on the driver, and its id travels in the trial config; completion closes it. A wrapper
    (it has `.searcher`) so Tune saves its state next to the inner searcher's."""

    def __init__(self, searcher: Searcher, tracking: dict, parent_run_id: str | None, sweep: str,
                 base_cfg_json: str, max_t: int, metric: str, mode: str, tie_break: str | None = None):
        super().__init__(metric=metric, mode=mode)
        self.searcher, self.tracking, self.parent_run_id = searcher, tracking, parent_run_id
        self.sweep, self.base_cfg_json, self.max_t = sweep, base_cfg_json, max_t
        self.tie_break = tie_break
        self.runs: dict[str, str] = {}
        self._base = None   # one Tracker (one MLflow client) for every trial run, not pickled

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_base"] = None
        return state

    def _tracker(self, run_id: str | None = None):
        from nearid.tracking import Tracker

        if getattr(self, "_base", None) is None:
            self._base = Tracker(**self.tracking)
        return self._base.for_run(run_id)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        suggestion = self.searcher.suggest(trial_id)
        if suggestion in (None, Searcher.FINISHED):
            return suggestion
        suggestion = dict(suggestion)
        t = self._tracker()
        cfg = Config.model_validate_json(self.base_cfg_json)
        params = effective_params(cfg, suggestion)
        run_id = t.start(f"{self.sweep}-{trial_id}", parent_run_id=self.parent_run_id,
                         tags={"stage": "tune-trial", "sweep": self.sweep, "tune.trial_id": trial_id,
                               "loss": params["loss"]})
        t.log_params(params)
        if run_id:
            self.runs[trial_id] = run_id
            suggestion[RUN_KEY] = run_id
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, tie_broken(result, self.metric, self.tie_break, self.mode))

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        scored = tie_broken(result, self.metric, self.tie_break, self.mode)
        self.searcher.on_trial_complete(trial_id, result=scored, error=error)
        run_id = self.runs.get(trial_id)
        if not run_id:
            return
        t = self._tracker(run_id)
        reports = int((result or {}).get("training_iteration", 0))
        outcome = "error" if error else ("stopped_early" if reports < self.max_t else "completed")
        t.set_tags({"tune.outcome": outcome, "tune.reports": str(reports)})
        t.end("FAILED" if error else "FINISHED")

    def get_state(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("searcher", "_base")}

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


def build_searcher(space: SearchSpace, kind: str, metric: str, mode: str, seed: int,
                   num_samples: int) -> Searcher:
    if kind == "grid":
        return GridSearcher(space.grid(), metric, mode)
    if space.seeds and len(space.seeds) > 1:
        raise SpaceError(f"{space.path}: several seeds need 'searcher: grid'")
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if kind == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        # TPE's default waits 10 random trials; a 6-trial sweep would never leave the random phase
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, num_samples // 2)))
    return OptunaSearch(space=DefineByRun(space), metric=metric, mode=mode, sampler=sampler)

