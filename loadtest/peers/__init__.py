"""Servers the benchmark puts beside the service: the naive peer and the HTTP floor."""
