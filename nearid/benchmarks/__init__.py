"""The benchmarks a scorer is measured on, one module each, and their registry.

- `nearid`: SSR / PA over the near-identity distractor settings (the paper's Table 1, left).
- `mtg`: MTG M-O (part-edited pairs, oracle-ranked).
- `dreambench`: DreamBench++-style M-H on the graded pairs (`dreambench_mh` is the same metric
  over real DreamBench++ ratings folders, `nearid mh` / `nearid mh-score`; `dreambench_ratings`
  reads those folders).
- `base`: what a benchmark is (`Benchmark`, `Column`); `registry`: the list, in report order.

Adding a benchmark: one module here with a `Benchmark` subclass (its source of images in the
features table, the table it reads, its metric and its report columns), its entry in
`registry.BENCHMARKS`, and its test. The evaluation, Table 1, the MLflow metric names and the
Tune summary read their columns from the registry.
"""
