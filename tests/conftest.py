"""Fixtures shared by the test modules."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodels  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "native: needs pyasl's patched llama.cpp library (skipped without it)")


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked native, with the loader's reason, on a machine without the library."""
    native = [item for item in items if item.get_closest_marker("native")]
    if not native:
        return
    from pyasl import _native
    try:
        _native.load()
    except _native.NativeLibraryError as e:  # pragma: no cover - depends on the machine
        skip = pytest.mark.skip(reason=f"pyasl native library not available: {e}")
        for item in native:
            item.add_marker(skip)


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


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_dense(request):
    """A tiny model of each full-attention architecture users run most (llama, qwen2), DENSE_N_LAYER deep."""
    from pyasl.engine import Model

    return Model(tinymodels.tiny_model_path(request.param, n_layer=tinymodels.DENSE_N_LAYER))
