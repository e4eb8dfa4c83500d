"""`pyasl chat` and `pyasl serve`: a conversation in the terminal, an OpenAI-compatible server."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ...session.answer import CHOOSE
from ...session.session import MODES
from .common import Progress, cache_type_options, check_text, fail, policy_options, read_utf8, user_errors

_session_policy = policy_options(asl_layers=True, prefill=True, layer_budgets=True, layer_only_fixed=True)


def _reprefill(default, default_is: str):
    """--reprefill for chat and serve: a Session chooses between both ways by default, the server's Llama
    prefills again (choosing, --choose-answer, delays its first token by two answers)."""
    return click.option(
        "--reprefill/--no-reprefill", default=default,
        help="per-question (and reconstruct): answer over the kept tokens prefilled again as a prompt of their own, "
             "a prefill of the budget per question (--no-reprefill: over their cells as the whole document computed "
             f"them; better on dense records such as JSON, tables and identifiers). Default: {default_is}")


def _choose_answer(help_text: str):
    """--choose-answer for chat and serve: reprefill="choose" (pyasl.session.answer)."""
    return click.option("--choose-answer", is_flag=True, help=help_text)


def _answer_rule(reprefill, choose_answer):
    """The reprefill setting of --reprefill/--no-reprefill and --choose-answer (which excludes the other)."""
    if not choose_answer:
        return reprefill
    if reprefill is not None:
        fail("--choose-answer answers both with and without the second prefill; it cannot take "
             f"--{'' if reprefill else 'no-'}reprefill")
    return CHOOSE


def _read_doc(path: str) -> tuple:
    p = Path(path)
    text = read_utf8(path, "document")
    if not text.strip():
        fail(f"{p} is empty")
    return (p.name, text)


@click.command()
@click.argument("model")
@click.option("--doc", "docs", multiple=True, help="a UTF-8 document to prefill (repeatable)")
@_session_policy
@click.option("--system", help="system message")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1), help="longest answer")
@click.option("--ctx", "n_ctx", default=4096, show_default=True, type=click.IntRange(min=16),
              help="context cells (pruned documents + conversation)")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0: greedy")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True))
@click.option("--seed", type=int, help="sampling seed")
@click.option("--repeat-penalty", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="llama.cpp's repetition penalty over the last 64 tokens (1.0: off)")
@click.option("--mode", type=click.Choice(list(MODES)), default=None,
              help="per-question: every question selects from the full KV kept beside the decode context "
                   "(default); once: prune the documents once, before any question; reconstruct: prune them once, "
                   "ranked by a request to repeat them, and prefill the kept tokens again (question-agnostic, "
                   "holds only the decode context; a default span keeps around:8+32; about 4x the documents' "
                   "prefill time)")
@click.option("--full-copy", type=click.Choice(["memory", "disk"]), default="memory", show_default=True,
              help="per-question: where the documents' full KV waits between questions (disk: a temporary file, "
                   "written and read once per question)")
@_reprefill(None, "per-question answers both ways and keeps one (--choose-answer), reconstruct prefills again")
@_choose_answer("per-question (the default there): answer both ways (the kept tokens prefilled again, and their "
                "cells as the whole document computed them) and keep the gathered answer only where the full KV "
                "and its own context both find it likelier; streams only what both answers share, costs a second "
                "answer per question")
@click.option("--load", "load_path", type=click.Path(dir_okay=False), help="open a session saved with /save")
@click.option("--raw", is_flag=True, help="do not apply the chat template")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all cores)")
@click.option("--flash-attn/--no-flash-attn", default=False, show_default=True)
@cache_type_options
@click.option("--verbose", is_flag=True, help="show llama.cpp's log")
@click.option("--progress/--no-progress", default=None, help="prefill progress bar (default: when stderr is a tty)")
def chat(model, docs, policy, system, max_tokens, n_ctx, temperature, top_p, seed, repeat_penalty, mode, full_copy,
         reprefill, choose_answer, load_path, raw, threads, flash_attn, type_k, type_v, verbose, progress):
    """Talk with MODEL about long documents over a pruned KV cache.

    The documents are prefilled and pruned by POLICY; each turn is appended; when the context
    would overflow, the policy prunes again with the newest turn as the observation window.
    Ctrl-C stops an answer, /help lists the commands (/stats, /save, /load, ...).
    """
    from .. import chat as C
    from ...session import Session, SessionFileError
    from .common import load_model

    documents = [_read_doc(d) for d in docs]
    check_text(system, "--system")
    if load_path and documents:
        fail("--load opens a saved session; it cannot take --doc as well")
    reprefill = _answer_rule(reprefill, choose_answer)
    try:
        pol = policy.build()
        m = load_model(model, verbose)
        if load_path:
            sess = Session.load(m, load_path, n_threads=threads)
        else:
            sess = Session(m, policy=pol, n_ctx=n_ctx, system=system, max_tokens=max_tokens, raw=raw,
                           n_threads=threads, flash_attn=flash_attn, mode=mode, type_k=type_k, type_v=type_v,
                           full_copy=full_copy, reprefill=reprefill)
        rc = C.run(sess, documents, Progress(progress), temperature=temperature, top_p=top_p, seed=seed,
                   repeat_penalty=repeat_penalty)
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(130)
    except (SessionFileError,) + user_errors() as e:
        fail(str(e))
    sys.exit(rc)


@click.command()
@click.argument("model")
@_session_policy
@click.option("--ctx", "n_ctx", default=4096, show_default=True, type=click.IntRange(min=16),
              help="decode context: the budget and the answers (with a pruning policy, prompts may be longer)")
@click.option("--max-prompt-tokens", type=click.IntRange(min=1),
              help="longest prompt accepted with a pruning policy (default: the model's training context)")
@click.option("--kv-mode", type=click.Choice(["per-question", "once"]), default="per-question", show_default=True,
              help="per-question: keep the latest long prompt's full KV so that a prompt sharing its prefix decodes only "
                   "the rest and selects again; once: prune every long prompt from scratch, keep nothing else")
@click.option("--parked-copies", default=0, show_default=True, type=click.IntRange(min=0),
              help="per-question: also keep the full KV of up to N earlier long prompts, parked on disk (a temporary "
                   "directory), so questions about several documents in turn do not prefill a document again")
@_reprefill(None, "prefill again")
@_choose_answer("per-question: decode a greedy answer both ways (the kept tokens prefilled again, and their cells "
                "as the whole prompt computed them) before the first token, keep the way a chat keeps (the gathered "
                "one only where the full KV and its own context both find it likelier), then answer over it; costs "
                "two answers' decoding before streaming starts")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(min=0, max=65535))
@click.option("--alias", help="model name in the API (default: the file name)")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads")
@click.option("--flash-attn/--no-flash-attn", default=False, show_default=True)
@cache_type_options
@click.option("--verbose", is_flag=True, help="show llama.cpp's log")
def serve(model, policy, n_ctx, max_prompt_tokens, kv_mode, parked_copies, reprefill, choose_answer, host, port,
          alias, threads, flash_attn, type_k, type_v, verbose):
    """An OpenAI-compatible HTTP server (llama-cpp-python's) whose requests are pruned by POLICY.

    /v1/completions, /v1/chat/completions (stream or not), /v1/models. Needs pip install 'pyasl[server]'.
    """
    from ...engine.model import _check_gguf
    from ...models import resolve_model

    reprefill = _answer_rule(reprefill, choose_answer)
    if reprefill is None:
        reprefill = True
    try:
        from ..server import serve as run_server

        pol = policy.build()
        path = resolve_model(model)
        _check_gguf(path)
        pol = None if pol.name == "full" else pol
        if pol is None and max_prompt_tokens is not None:
            raise ValueError("--max-prompt-tokens needs a pruning policy (with full KV every prompt must fit --ctx)")
        run_server(str(path), pol, host=host, port=port, n_ctx=n_ctx, alias=alias, n_threads=threads,
                   flash_attn=flash_attn, verbose=verbose, max_prompt_tokens=max_prompt_tokens, kv_mode=kv_mode,
                   type_k=type_k, type_v=type_v, parked_copies=parked_copies, reprefill=reprefill)
    except user_errors() as e:
        fail(str(e))
