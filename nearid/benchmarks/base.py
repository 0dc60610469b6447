"""What a benchmark is: the images it scores, the table it reads, its metric, its report columns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Column:
    """One value a benchmark adds to a scorer's row of Table 1."""

    key: str                     # the row key ("mtg_m_o")
    label: str                   # the report header ("MTG M-O")
    metric: str                  # the MLflow metric name, the same for every scorer ("mtg/m_o")
    short: str | None = None     # the Tune summary's name ("m_o"), for the headline columns
    short_label: str | None = None   # the Tune tables' header ("M-O")


@dataclass(frozen=True)
class Count:
    """A row count a benchmark reports (an MLflow param of the scorer's run, an integer column)."""

    key: str                     # the row key ("mtg_n")
    param: str                   # the MLflow param ("count.mtg_items")


class Benchmark:
    """Subclasses set the class attributes and implement `load` and `score`.

    `source`: the features `source` its images are extracted under (None: the identity images,
    positives and distractor settings; `nearid.sources`); `always`: runs whatever
    `eval.benchmarks` lists.
    """

    name: str = ""
    source: str | None = None
    always: bool = False
    columns: tuple[Column, ...] = ()
    counts: tuple[Count, ...] = ()

    def load(self, cfg, storage) -> Any | None:
        """What `score` needs besides the embeddings (e.g. its table), or None: nothing to score."""
        raise NotImplementedError

    def score(self, emb: pd.DataFrame, data: Any, cfg) -> tuple[dict, dict]:
        """(row values keyed by `columns`/`counts` keys, details for the report) of one scorer.
        `emb`: (id, view, source, split, embedding) of every evaluation image, in key order."""
        raise NotImplementedError


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [N, D] arrays."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.einsum("nd,nd->n", a, b)
