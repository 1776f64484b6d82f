import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import template_checks  # noqa: E402


@pytest.fixture(scope="session")
def loaded():
    return template_checks.load_template()


@pytest.fixture
def template(loaded):
    """A fresh copy per test, so a test that weakens it cannot leak into another."""
    return copy.deepcopy(loaded)
