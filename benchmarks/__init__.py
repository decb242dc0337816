"""Benchmark scripts (run them as ``python benchmarks/<name>.py``); a package so that the tests can import them."""
