"""Load: a 20,000-image extraction and a 3,000-distractor generation on the embedded default,
on this machine's cores, with peak RSS (driver + every Ray process it started) and throughput.

    .venv/bin/python bench/bench_load.py [--images 20000] [--distractors 3000]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil

from nearid.config import load_config
from nearid.raytools import init_ray
from nearid.stages.extract import run_extract
from nearid.stages.generate import run_generate
from nearid.stages.synth import run_synth
from nearid.storage import Storage


class PeakRSS:
    """Samples the RSS of this process and all its descendants (Ray's raylet, workers, actors)."""

    def __init__(self, every: float = 0.5):
        self.peak, self.every, self._stop = 0, every, threading.Event()

    def _total(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __enter__(self):
        self.peak = 0
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--distractors", type=int, default=3000)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="bench-load-")
    n_ids = args.images // 3
    cfg = load_config("configs/local.yaml", [
        f"run.root={root}", f"synth.n_identities={n_ids}", "synth.n_mtg=0", "synth.n_graded=0",
        "synth.split={train: 1.0}", "extract.sources=[positive]", "generate.splits=[train]",
        "generate.settings={flux: {backend: procedural, batch_size: 32}}"])
    st = Storage.open(root)
    ray = init_ray(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    with PeakRSS() as m:
        t = time.time()
        run_synth(cfg, st, ray)
        rows.append(("synth (render positives)", n_ids * 3, time.time() - t, m.peak))
    with PeakRSS() as m:
        t = time.time()
        run_extract(cfg, st, ray)
        rows.append(("extract (tokens + readouts)", n_ids * 3, time.time() - t, m.peak))
    # generation on the first identities only: 3,000 distractors
    gen_ids = args.distractors // 3
    cfg_g = cfg.model_copy(deep=True)
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = sorted(set(st.read_table("positives", columns=["id"])["id"].to_pylist()))[:gen_ids]
    sub = Storage.open(os.path.join(root, "gen"))
    sub.write_table("positives", st.read_table("positives", filter=pc.field("id").isin(pa.array(keep))), ["split"])
    cfg_g.run.root = sub.root
    with PeakRSS() as m:
        t = time.time()
        res = run_generate(cfg_g, sub, ray)
        rows.append(("generate (procedural)", res["flux"]["ok"], time.time() - t, m.peak))
    print(f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM")
    print("| stage | rows | seconds | rows/s | peak RSS (GiB, driver + Ray) |")
    print("|---|---|---|---|---|")
    for name, n, s, peak in rows:
        print(f"| {name} | {n} | {s:.0f} | {n / s:.0f} | {peak / 2**30:.2f} |")
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
