"""Hyper-parameter sweeps with Ray Tune: search spaces, the sweep runner, its pictures."""
