"""Discrete-event simulator of a cluster, driving the real scheduler policy with a cost model."""
