"""Shared pytest setup: hypothesis profiles and the ``repo`` fixture (helpers live in ``tests/helpers.py``).

Profiles: ``ci`` (derandomized, no deadline: CI machines are slow and shared) is loaded when ``CI`` is set or
``HYPOTHESIS_PROFILE=ci``; ``dev`` (the default) runs more examples with a random seed.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

from helpers import REPO  # noqa: E402


@pytest.fixture
def repo():
    return REPO
