"""Fixtures shared by the node tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from .site import Site


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """A loopback test site: CA, certificates and configs under ``tmp_path``."""
    return Site(tmp_path)
