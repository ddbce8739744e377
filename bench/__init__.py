"""Benchmark suite: one script per benchmark (`python bench/<name>.py --quick --json PATH`) and `bench/run.py`
running them all into `bench/results.json`. Shared helpers live in `bench.common`."""
