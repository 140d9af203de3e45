"""Operator tooling: the `baton` CLI, benchmarks, Ray job entry points."""
