"""`pyasl serve`: llama-cpp-python's OpenAI-compatible server on a :class:`pyasl.Llama`.

The routes, request models, streaming (server-sent events) and error handling are
llama-cpp-python's own (``llama_cpp.server``: /v1/completions, /v1/chat/completions, /v1/models,
/v1/embeddings, tokenize/detokenize); the model behind them is a ``pyasl.Llama`` whose
``kv_policy`` prunes every request's prompt. One middleware of ours (``_RequestGuard``) answers
malformed request bodies with 400 and ends a stream that fails with an error event. Needs the
extras: ``pip install 'pyasl[server]'``.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

from ..policies import Policy


class ServerExtrasMissing(RuntimeError):
    pass


def _imports():
    try:
        import fastapi  # noqa: F401
        import sse_starlette  # noqa: F401
        import starlette_context  # noqa: F401
        import pydantic_settings  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ServerExtrasMissing(f"pyasl serve needs the server extras ({e.name} is missing): "
                                  "pip install 'pyasl[server]'") from None
    from .llama import Llama  # loads our libllama before llama_cpp.server imports llama_cpp
    import llama_cpp.server.app as A
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    return Llama, A, LlamaProxy, ModelSettings, ServerSettings


def _error_body(message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
                code: Optional[str] = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


class _RequestGuard:
    """ASGI middleware for what llama-cpp-python's server gets wrong on bad input: a body that is not
    UTF-8 JSON (a plain-text 500 there) or does not fit the route's request model (a 500 carrying a
    Python source location) is answered 400 with an OpenAI-style error object; an error raised while a
    streamed answer runs (e.g. a prompt longer than n_ctx with "stream": true, which ended the stream
    with no data and no [DONE]) is sent as a last ``data: {"error": ...}`` event."""

    def __init__(self, app, models: dict):
        self.app = app
        self.models = models  # POST path -> pydantic request model

    async def _reply(self, send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        model = self.models.get(scope["path"]) if scope["method"] == "POST" else None
        if model is not None:
            chunks, more = [], True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunks.append(msg.get("body", b""))
                more = msg.get("more_body", False)
            body = b"".join(chunks)
            try:
                data = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                return await self._reply(send, 400, _error_body(f"the request body is not valid UTF-8 JSON ({e})"))
            from pydantic import ValidationError

            try:
                model.model_validate(data)
            except ValidationError as e:
                errs = e.errors()
                where = [".".join(str(x) for x in d["loc"]) or "body" for d in errs]
                msgs = list(dict.fromkeys(f"{w}: {d['msg']}" for w, d in zip(where, errs)))
                msg = "; ".join(msgs[:4]) + (f"; ... ({len(msgs) - 4} more)" if len(msgs) > 4 else "")
                param = str(errs[0]["loc"][0]) if errs[0]["loc"] else None
                return await self._reply(send, 400, _error_body(f"invalid request: {msg}", param=param))
            replayed = False

            async def receive_again():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()
        else:
            receive_again = receive
        state = {"stream": False, "last": None}

        async def watch(msg):
            if msg["type"] == "http.response.start":
                ctype = dict(msg.get("headers", [])).get(b"content-type", b"")
                state["stream"] = ctype.startswith(b"text/event-stream")
            elif state["stream"] and msg["type"] == "http.response.body" and not msg.get("more_body", False):
                state["last"] = msg  # the stream's end: held until the app has returned or raised
                return
            await send(msg)

        try:
            await self.app(scope, receive_again, watch)
        except Exception as e:
            if not state["stream"]:
                raise
            while getattr(e, "exceptions", None):  # anyio task groups wrap it in an ExceptionGroup
                e = e.exceptions[0]
            print(f"pyasl: streamed request failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            too_long = "exceed context window" in str(e)
            err = _error_body(str(e) or type(e).__name__, kind="invalid_request_error" if too_long else
                              "internal_server_error", code="context_length_exceeded" if too_long else None)
            tail = (state["last"] or {}).get("body", b"")
            await send({"type": "http.response.body", "body": tail + b"data: " + err + b"\n\n", "more_body": False})
        else:
            if state["last"] is not None:
                await send(state["last"])


def _request_models(router) -> dict:
    """POST path -> the pydantic model of its JSON body, from llama-cpp-python's routes."""
    out = {}
    for r in router.routes:
        params = getattr(getattr(r, "dependant", None), "body_params", None) or []
        if "POST" in (getattr(r, "methods", None) or ()) and len(params) == 1:
            ann = getattr(params[0].field_info, "annotation", None)
            if hasattr(ann, "model_validate"):
                out[r.path] = ann
    return out


def create_app(model_path: str, policy: Optional[Policy], n_ctx: int = 4096, alias: Optional[str] = None,
               n_threads: Optional[int] = None, flash_attn: bool = False, verbose: bool = False,
               host: str = "127.0.0.1", port: int = 8000,
               on_prune: Optional[Callable[[dict], None]] = None, max_prompt_tokens: Optional[int] = None,
               kv_mode: str = "per-question", type_k="f16", type_v="f16", parked_copies: int = 0,
               reprefill: Union[bool, str] = True):
    """The FastAPI app of llama-cpp-python's server, serving one pyasl.Llama with `policy`
    (type_k, type_v: KV cache types, as llama.cpp's -ctk / -ctv; parked_copies, reprefill: pyasl.Llama's)."""
    Llama, A, LlamaProxy, ModelSettings, ServerSettings = _imports()
    from fastapi import FastAPI
    from fastapi.middleware import Middleware
    from fastapi.middleware.cors import CORSMiddleware
    from starlette_context.middleware import RawContextMiddleware
    from starlette_context.plugins import RequestIdPlugin

    alias = alias or Path(model_path).stem
    from ..engine.context import KV_TYPES, Context, kv_type_name

    Context.check_kv_types(type_v, flash_attn)
    kw = {} if n_threads is None else {"n_threads": n_threads, "n_threads_batch": n_threads}
    kw.update(type_k=KV_TYPES[kv_type_name(type_k)], type_v=KV_TYPES[kv_type_name(type_v)])
    ms = ModelSettings(model=str(model_path), model_alias=alias, n_ctx=n_ctx, flash_attn=flash_attn,
                       verbose=verbose, **kw)
    ss = ServerSettings(host=host, port=port)
    llm = Llama(model_path=str(model_path), n_ctx=n_ctx, flash_attn=flash_attn, verbose=verbose,
                kv_policy=policy, max_prompt_tokens=max_prompt_tokens, kv_mode=kv_mode, parked_copies=parked_copies,
                reprefill=reprefill, n_threads=ms.n_threads,
                n_threads_batch=ms.n_threads_batch, n_batch=ms.n_batch, n_ubatch=ms.n_ubatch, seed=ms.seed,
                type_k=ms.type_k, type_v=ms.type_v)
    llm.on_prune = on_prune

    class _Proxy(LlamaProxy):
        """llama-cpp-python's model proxy holding the one pyasl.Llama (never reloads it)."""

        def __init__(self):
            self._model_settings_dict = {alias: ms}
            self._current_model, self._current_model_alias = llm, alias
            self._default_model_settings, self._default_model_alias = ms, alias

        def __call__(self, model: Optional[str] = None):
            return llm

    # llama_cpp.server.app.create_app without its model loading: same middleware and routes
    A.set_server_settings(ss)
    app = FastAPI(middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),))],
                  title="pyasl (llama-cpp-python server)", version="0.1.0")
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])
    app.include_router(A.router)
    app.add_middleware(_RequestGuard, models=_request_models(A.router))
    A._llama_proxy = _Proxy()
    app.state.llama = llm
    return app


def serve(model_path: str, policy: Optional[Policy], host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    """Run the server until interrupted; one log line per pruned request on stderr."""
    import uvicorn

    def log(info: dict) -> None:
        print(f"pyasl: request prompt {info['n_prompt']} tokens -> kept {info['n_kept']} cells "
              f"({info['policy']['name']}" + (f", selection layer {info['selected_layer']}"
                                              if info['selected_layer'] is not None else "")
              + (f", {info['reused_tokens']} tokens of an earlier prompt reused" if info.get("reused_tokens") else "")
              + (", the kept tokens prefilled again" if info.get("reprefilled") else "")
              + (f", both answers decoded, the {info['answer_from']} one kept" if info.get("answer_from") else "")
              + ")", file=sys.stderr, flush=True)

    with warnings.catch_warnings(record=True) as notes:  # pyasl.Llama's notes (a budget no prompt can exceed)
        warnings.simplefilter("always", UserWarning)
        app = create_app(model_path, policy, host=host, port=port, on_prune=log, **kw)
    for w in notes:
        if str(w.message).startswith("pyasl"):
            print(f"note: {w.message}", file=sys.stderr, flush=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    print(f"pyasl: serving {Path(model_path).name} with policy {policy!r} on http://{host}:{port}/v1",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
