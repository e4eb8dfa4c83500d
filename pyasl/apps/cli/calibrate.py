"""`pyasl calibrate MODEL`: per-model ASL defaults (the run: pyasl.bench.calibrate; where they are kept:
pyasl.calibration)."""
from __future__ import annotations

import click

from ...bench.calibrate import TASKS, TAUS
from .bench import _csv, _propagates
from .common import fail, user_errors


@click.command()
@click.argument("model")
@click.option("--length", default=4096, show_default=True, type=click.IntRange(min=512), help="prompt tokens")
@click.option("--budget", default=1024, show_default=True, type=click.IntRange(min=64), help="KV cells kept")
@click.option("--samples", default=2, show_default=True, type=click.IntRange(min=1), help="samples per task")
@click.option("--taus", default=",".join(f"{t:g}" for t in TAUS), show_default=True, callback=_csv(float))
@click.option("--tasks", default=",".join(TASKS), show_default=True, callback=_csv(str))
@click.option("--tolerance", default=2.0, show_default=True, type=click.FloatRange(min=0),
              help="accuracy points below snapkv's that a tau may lose")
@click.option("--propagate", "propagates", default=None, callback=_csv(str), metavar="N|N:kept,...",
              help="propagations to try with every tau (budget: the default; see generate --propagate)")
@click.option("--threads", type=click.IntRange(min=1))
def calibrate(model, length, budget, samples, taus, tasks, tolerance, propagates, threads):
    """Choose ASL's tau for MODEL: the offline tasks once per sample (one shared prefill, a propagation
    tail per tau), SnapKV at the same budget as the reference; the tau with the least prefill work
    within TOLERANCE points of SnapKV is stored in the model cache (one per --length) and used by
    generate, chat, serve and the Python API whenever no --tau is given, from the calibrated length
    nearest the prompt's. With --propagate a (tau, propagation) pair is one setting, used together
    (the propagation as the same share of the prompt). Resumable."""
    from ...bench.calibrate import MIN_ANSWERED, calibrate as run

    if not taus or any(not 0 < t <= 1 for t in taus):
        fail("--taus must be values in (0, 1]")
    try:
        rec, path = run(model, n_tokens=length, budget=budget, samples=samples, taus=taus, tolerance=tolerance,
                        tasks=tasks, n_threads=threads, log=lambda s: click.echo(s, err=True),
                        propagates=_propagates(propagates))
    except user_errors() as e:
        fail(str(e))
    click.echo(f"snapkv@{budget}: {rec['snapkv_accuracy']:.1f}")
    click.echo("tau   propagate   accuracy  prefill work  selected  mean layer")
    for t in rec["taus"]:
        layer = "-" if t["mean_layer"] is None else f"{t['mean_layer']:.1f}"
        prop = str(t.get("propagate", "-"))
        click.echo(f"{t['tau']:<5g} {prop:<10}  {t['accuracy']:8.1f}  {t['prefill_work']:12.2f}  "
                   f"{t['selected']:8.0%}  {layer:>10}")
    prop = f", propagate {rec['propagate']}" if "propagate" in rec else ""
    if rec.get("never_selects"):
        click.echo(f"tau {rec['tau']:g}, the paper's: no tau selected a layer before the last on any sample, so ASL "
                   f"saves no prefill on this model at {length} tokens whatever tau (a fixed layer, --policy fastkv, "
                   f"does) -> {path}")
        return
    if rec.get("too_few_answered"):
        click.echo(f"tau {rec['tau']:g}, the paper's: snapkv answers {rec['snapkv_answered']:g} of {rec['samples']} "
                   f"samples, fewer than {MIN_ANSWERED:g}, too few to see accuracy lost (run more --samples) "
                   f"-> {path}")
        return
    how = "least prefill work within" if rec["within_tolerance"] else "no setting came within"
    click.echo(f"tau {rec['tau']:g}{prop} ({how} {tolerance:g} points of snapkv) -> {path}")
