"""Load: a 20,000-image extraction and a 3,000-distractor generation on the embedded default,
on this machine's cores, with peak RSS (driver + every Ray process it started) and throughput.

    .venv/bin/python -m bench.bench_load [--images 20000] [--distractors 3000]
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
from nearid.io.storage import Storage


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
    unique = args.distractors // 3           # identities actually rendered (3 views each)
    cfg = load_config("configs/tiny.yaml", [
        f"run.root={root}", f"synth.n_identities={unique}", "synth.n_mtg=0", "synth.n_graded=0",
        "synth.split={train: 1.0}", "extract.sources=[positive]", "generate.splits=[train]",
        "generate.settings={flux: {backend: procedural, batch_size: 32}}"])
    st = Storage.open(root)
    ray = init_ray(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    with PeakRSS() as m:
        t = time.time()
        run_synth(cfg, st, ray)
        rows.append(("synth (render positives)", unique * 3, time.time() - t, m.peak))
    with PeakRSS() as m:
        t = time.time()
        res = run_generate(cfg, st, ray)
        rows.append(("generate (procedural)", res["flux"]["ok"], time.time() - t, m.peak))
    # extraction load: the rendered views repeated under new ids up to --images rows
    import pyarrow as pa
    import pyarrow.compute as pc

    base = st.read_table("positives")
    copies = -(-args.images // base.num_rows)
    big = Storage.open(os.path.join(root, "extract"))
    for c in range(copies):
        t_c = base.set_column(0, "id", pc.binary_join_element_wise(base["id"], pa.scalar(f"-c{c}"), ""))
        big.write_table("positives", t_c.slice(0, max(0, min(base.num_rows, args.images - c * base.num_rows))))
    cfg_e = cfg.model_copy(deep=True)
    cfg_e.run.root = big.root
    with PeakRSS() as m:
        t = time.time()
        ex = run_extract(cfg_e, big, ray)
        rows.append(("extract (tokens + readouts)", ex["sources"]["positive"]["ok"], time.time() - t, m.peak))
    print(f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM")
    print("| stage | rows | seconds | rows/s | peak RSS (GiB, driver + Ray) |")
    print("|---|---|---|---|---|")
    for name, n, s, peak in rows:
        print(f"| {name} | {n} | {s:.0f} | {n / s:.0f} | {peak / 2**30:.2f} |")
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
