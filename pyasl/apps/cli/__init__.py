"""pyasl command line: `pyasl models ...`, `pyasl generate ...`, `pyasl inspect ...`, `pyasl chat ...`,
`pyasl serve ...`, `pyasl bench ...`, `pyasl calibrate ...`.

Each command builds one policy object from its options (common.policy_options) and hands it to the
library. The --json outputs are a stable contract for scripts: keys are only ever added.
"""
from __future__ import annotations

import click

from .bench import bench
from .calibrate import calibrate
from .generate import generate
from .inspect import inspect
from .models import models
from .talk import chat, serve


@click.group()
@click.version_option(package_name="pyasl")
def main() -> None:
    """pyasl: prune the KV cache of GGUF models in llama.cpp (ASL, SnapKV, FastKV, ZigZagKV, ...)."""


for _cmd in (models, generate, chat, serve, inspect, bench, calibrate):
    main.add_command(_cmd)

__all__ = ["main"]
