"""Load tests and the benchmark: harness, load generator, traffic, scenarios (bench, chaos)."""
