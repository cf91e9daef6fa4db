"""Shared pytest configuration."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# Bounded, reproducible property tests: the suite must finish in minutes on 2 cores.
settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci")
