"""Benchmarks (`make bench`): print a table of figures and write bench-results.json. Not part of `make test`."""
