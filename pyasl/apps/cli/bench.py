"""`pyasl bench ...`: the command line of the offline benchmarks (the library is pyasl.bench)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ...bench.data import TASKS
from .common import fail as _fail, policy_options, user_errors as _errors


def _csv(kind):
    def conv(ctx, param, value):
        if value is None:
            return None
        try:
            return [kind(x) for x in str(value).split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list of {kind.__name__}") from None
    return conv


@click.group()
def bench() -> None:
    """Offline long-context accuracy benchmarks (RULER- and InfiniteBench-style tasks, NIAH)."""


def _propagates(values):
    """--propagate's values: N, N:kept, or "budget" for the default (None)."""
    from ...policies.propagation import normalize_propagate

    if values is None:
        return None
    try:
        return [None if v.strip() == "budget" else normalize_propagate(v.strip()) for v in values]
    except ValueError as e:
        _fail(f"--propagate: {e} (or 'budget')")


@bench.command("run")
@click.option("--models", default="qwen2.5-0.5b", show_default=True, callback=_csv(str),
              help="comma-separated model names or GGUF paths")
@click.option("--tasks", default=",".join(TASKS), show_default=True, callback=_csv(str))
@click.option("--lengths", default="4096", show_default=True, callback=_csv(int), help="prompt lengths in tokens")
@click.option("--budgets", default="512,1024", show_default=True, callback=_csv(int))
@click.option("--policies", default="full,snapkv,fastkv,gemfilter,asl,asl-2pass", show_default=True, callback=_csv(str))
@click.option("--samples", default=20, show_default=True, type=click.IntRange(min=1),
              help="samples per task (niah: per depth)")
@click.option("--depths", default="0,0.25,0.5,0.75,1", show_default=True, callback=_csv(float),
              help="needle depths of the niah grid")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--window", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--tau", "taus", default="0.3", show_default=True, callback=_csv(float), metavar="TAU,...",
              help="asl's and asl-2pass's tau; several: a row each (a tau sweep from the same prefill)")
@click.option("--fixed-layer", "fixed_fracs", default="0.4", show_default=True, callback=_csv(float),
              metavar="FRAC,...", help="fastkv's and gemfilter's layer as a fraction of the depth; several: a row "
                                       "each (a layer sweep from the same prefill)")
@click.option("--mode", type=click.Choice(["shared", "independent"]), default="shared", show_default=True,
              help="shared: one prefill per sample feeds every policy; independent: each policy prefills itself")
@click.option("--threads", type=click.IntRange(min=1))
@click.option("--spans", default=None, callback=_csv(str), metavar="SPAN,...",
              help="span stages every pruning policy runs with, a row each: token, forward:S, around:B+S, chunk:C "
                   "(default: the library default)")
@click.option("--kv-type", "kv_types", default="f16", show_default=True, callback=_csv(str), metavar="TYPE,...",
              help="KV cache types, a row each: f16, q8_0, q4_0, ... (quantized: each policy prefills on its own, "
                   "flash attention on)")
@click.option("--propagate", "propagates", default=None, callback=_csv(str), metavar="N|N:kept,...",
              help="tokens asl and fastkv send on past the selection layer, a row each: N (each deeper layer "
                   "keeps its own sets), N:kept (the selection layer's set), budget (the default; default: budget)")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="results JSONL (appended; resumable)")
def bench_run(models, tasks, lengths, budgets, policies, samples, depths, seed, window, taus, fixed_fracs, mode,
              threads, spans, kv_types, propagates, out):
    """Run (or resume) a benchmark; every result is appended to --out as one JSON line."""
    from ... import bench as B

    for d in depths:
        if not 0 <= d <= 1:
            _fail(f"depth {d} is outside [0, 1]")
    if not taus:
        _fail("--tau needs a value")
    if not fixed_fracs:
        _fail("--fixed-layer needs a value")
    try:
        n = B.run(models, tasks, lengths, budgets, policies, samples, out, seed=seed, window=window, tau=taus[0],
                  fixed_frac=fixed_fracs[0], depths=depths, mode=mode, n_threads=threads,
                  log=lambda s: click.echo(s, err=True), spans=spans, taus=taus, fixed_fracs=fixed_fracs,
                  kv_types=kv_types, propagates=_propagates(propagates))
    except _errors() as e:
        _fail(str(e))
    click.echo(f"{n} new results in {out}", err=True)


@bench.command("summary")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the aggregates as JSON")
@click.option("--into", "into", type=click.Path(exists=True, dir_okay=False),
              help="instead of printing, rewrite the tables in this markdown file: every block between "
                   "'<!-- accuracy:MODEL:N_TOKENS -->' and '<!-- /accuracy -->'")
@click.option("--samples", type=click.IntRange(min=1),
              help="only the first SAMPLES samples of every task (as `bench run --samples`): compare a "
                   "partial round with the rows of a longer one on the same samples")
def bench_summary(results, as_json, into, samples):
    """Accuracy per task and policy, selected layers, speed and memory, from RESULTS (JSONL)."""
    from ... import bench as B

    rows = [r for r in B.load_rows(results) if samples is None or int(r["index"]) < samples]
    if not rows:
        raise click.ClickException(f"{results} holds no results" + ("" if samples is None else f" for {samples} samples"))
    s = B.summarize(rows)
    if into:
        p = Path(into)
        try:
            text, done, missing = B.update_doc(p.read_text(encoding="utf-8"), s)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        if not done:
            raise click.ClickException(f"{into} has no '<!-- accuracy:MODEL:N_TOKENS -->' blocks")
        p.write_text(text, encoding="utf-8")
        click.echo(f"rewrote {len(done)} tables in {into}: {', '.join(done)}", err=True)
        if missing:
            click.echo(f"no block in {into} for: {', '.join(missing)}", err=True)
        return
    click.echo(json.dumps(s, indent=1) if as_json else B.markdown(s))


@bench.command("plot")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="folder for the PNG files")
def bench_plot(results, out_dir):
    """PNG plots (matplotlib) from RESULTS (JSONL)."""
    from ... import bench as B

    rows = B.load_rows(results)
    if not rows:
        raise click.ClickException(f"{results} holds no results")
    try:
        files = B.plot(rows, out_dir)
    except ImportError:
        raise click.ClickException("plots need matplotlib: pip install 'pyasl[bench]'") from None
    for f in files:
        click.echo(str(f))


@bench.command("pareto")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="folder for one PNG per group (matplotlib)")
@click.option("--json", "as_json", is_flag=True, help="print the points as JSON")
def bench_pareto(results, out_dir, as_json):
    """Accuracy against prefill work for every setting in RESULTS (JSONL files; a τ sweep, a layer sweep):
    one table (and chart) per model, length, budget and span, each over the samples all its settings share."""
    from ... import bench as B
    from ...bench.pareto import pareto_groups, pareto_markdown, plot_pareto

    rows = [r for f in results for r in B.load_rows(f)]
    groups = pareto_groups(rows)
    if not groups:
        raise click.ClickException("no group with two settings on shared samples in " + ", ".join(results))
    click.echo(json.dumps(groups, indent=1) if as_json else pareto_markdown(groups))
    if out_dir:
        try:
            files = plot_pareto(groups, out_dir)
        except ImportError:
            raise click.ClickException("plots need matplotlib: pip install 'pyasl[bench]'") from None
        for f in files:
            click.echo(str(f), err=True)


@bench.command("questions")
@click.option("--model", "model_name", default="qwen2.5-0.5b", show_default=True)
@click.option("--length", default=4096, show_default=True, type=click.IntRange(min=256), help="document tokens")
@click.option("--samples", default=20, show_default=True, type=click.IntRange(min=1), help="documents")
@click.option("--questions", default=4, show_default=True, type=click.IntRange(min=1), help="questions per document")
@click.option("--context", "kind", default="kv", show_default=True, type=click.Choice(["kv", "needles"]),
              help="kv: a JSON object of UUID pairs (every pair can be asked); needles: prose notes with one "
                   "secret code per question")
@click.option("--modes", default="full,once,reconstruct,per-question,one-shot", show_default=True, callback=_csv(str))
@click.option("--max-tokens", default=96, show_default=True, type=click.IntRange(min=1),
              help="answer tokens (the model often repeats the key, 25 tokens, before the value)")
@click.option("--threads", type=click.IntRange(min=1))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="results JSONL (appended; resumable)")
@policy_options(budget_default=1024, asl_layers=True, layer_only_fixed=True)
def bench_questions(model_name, length, samples, questions, kind, modes, max_tokens, threads, out, policy):
    """Several questions asked in turn about one document: per-question accuracy of full KV, prune-once,
    per-question selection and the question-in-prompt (one-shot) path, with time per question and KV held."""
    from ...bench.questions import run as run_questions

    try:
        n = run_questions(model_name, length, samples, policy.build(), out, modes=modes, questions=questions,
                          max_tokens=max_tokens, n_threads=threads, log=lambda s: click.echo(s, err=True),
                          kind=kind)
    except _errors() as e:
        _fail(str(e))
    click.echo(f"{n} new results in {out}", err=True)


@bench.command("questions-summary")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
def bench_questions_summary(results):
    """Accuracy, seconds per question, the document's prefill seconds, KV held and (drop-in modes) time to
    the first token per mode, from RESULTS of `bench questions` (prefill "-" where not recorded: one-shot,
    drop-in, and rows before 2026-12-05)."""
    from ...bench.questions import summary

    rows = [json.loads(line) for line in Path(results).read_text(encoding="utf-8").splitlines() if line.strip()]
    click.echo("model          context tokens  mode                 layout  policy  tau   budget span         n  accuracy  "
               "s/question  prefill s  KV MiB  full copy MiB  first token s")
    for g in summary(rows):
        prefill = "-" if g["prefill_s"] is None else f"{g['prefill_s']:.1f}"
        first = "-" if g["first_token_s"] is None else f"{g['first_token_s']:.2f}"
        click.echo(f"{g['model']:<14} {g['context']:<7} {g['n_tokens']:>6}  {g['mode']:<20} {g['layout']:<7} {g['policy']:<7} "
                   f"{g['tau'] or '-':<5} {g['budget'] or '-':>6} {g['span'] or '-':<12} {g['questions']:>2}  "
                   f"{g['accuracy']:8.1f}  {g['seconds_per_question']:10.2f}  {prefill:>9}  {g['kv_mib']:6.1f}  "
                   f"{g['full_copy_mib'] or 0:13.1f}  {first:>13}")
