"""Load tests and the benchmark: traffic, generator, floors, peers (see bench.py)."""
