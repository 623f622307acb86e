"""Fixtures shared by test modules (pytest's own mechanism; helpers live in helpers.py and
spark_tasks.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def sessions() -> Iterator[Any]:
    """One Spark session at a time for a test module (tests/spark_tasks.py `Sessions`),
    stopped with its local-cluster work folders when the module is done."""
    from tests.spark_tasks import Sessions

    made = Sessions()
    try:
        yield made
    finally:
        made.close()
