"""The capacity planner: a calibrated simulator of a P/D cluster and a search over pool layouts."""
