"""Scaling out: expert parallelism (ep) and expert placement (eplb)."""
