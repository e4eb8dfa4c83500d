"""Fixtures shared by the test modules."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def smollm2():
    """The SmolLM2-135M model (fetched once and cached); skipped on a machine that cannot get it."""
    from pyasl.engine import Model
    from pyasl.models import ModelError, fetch_model

    try:
        path = fetch_model("smollm2")
    except ModelError as e:  # pragma: no cover - offline machine without the cached model
        pytest.skip(f"SmolLM2 not available: {e}")
    m = Model(path)
    yield m
    m.close()
