"""Benchmarks (not tests): each compares Baton against a baseline measured in the same run.

Each module exposes `run(...) -> dict` (the JSON report) and is wired into `baton bench <name>`.
"""
