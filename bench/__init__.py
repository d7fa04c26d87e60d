"""Benchmarks: each module runs alone (``python -m bench.NAME``) and prints one JSON object."""
