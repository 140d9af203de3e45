"""Bringing a cluster up: Ray connection, pools and placement, controller, Redis state, planner."""
