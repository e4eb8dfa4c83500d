"""Offline long-context accuracy benchmarks: tasks generated locally (:mod:`.data`), one shared
prefill per sample from which every policy is derived (:mod:`.shared`), resumable JSONL runs
(:mod:`.runner`), tables (:mod:`.report`), plots (:mod:`.plots`), several questions asked in
turn about one document (:mod:`.questions`), and the calibration run behind ``pyasl calibrate``
(:mod:`.calibrate`). The ``pyasl bench`` command line is :mod:`pyasl.apps.cli.bench`."""
from __future__ import annotations

from .report import markdown, summarize, update_doc
from .runner import (DEFAULT_POLICIES, FIXED_LAYER_POLICIES, NIAH_DEPTHS, fixed_layer, load_rows, row_key, row_label,
                     row_span, run)


def plot(rows, out_dir):
    """PNG plots (matplotlib, imported only here): see :func:`pyasl.bench.plots.plot`."""
    from .plots import plot as _plot

    return _plot(rows, out_dir)


__all__ = ["DEFAULT_POLICIES", "FIXED_LAYER_POLICIES", "NIAH_DEPTHS", "fixed_layer", "load_rows", "markdown", "plot",
           "row_key", "row_label", "row_span", "run", "summarize", "update_doc"]
