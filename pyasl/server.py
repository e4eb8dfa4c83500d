"""`pyasl serve`: llama-cpp-python's OpenAI-compatible server on a :class:`pyasl.Llama`.

The routes, request models, streaming (server-sent events) and error handling are
llama-cpp-python's own (``llama_cpp.server``: /v1/completions, /v1/chat/completions, /v1/models,
/v1/embeddings, tokenize/detokenize); the model behind them is a ``pyasl.Llama`` whose
``kv_policy`` prunes every request's prompt. Needs the extras: ``pip install 'pyasl[server]'``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from . import session as S


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


def create_app(model_path: str, policy: Optional[S.Policy], n_ctx: int = 4096, alias: Optional[str] = None,
               n_threads: Optional[int] = None, flash_attn: bool = False, verbose: bool = False,
               host: str = "127.0.0.1", port: int = 8000,
               on_prune: Optional[Callable[[dict], None]] = None):
    """The FastAPI app of llama-cpp-python's server, serving one pyasl.Llama with `policy`."""
    Llama, A, LlamaProxy, ModelSettings, ServerSettings = _imports()
    from fastapi import FastAPI
    from fastapi.middleware import Middleware
    from fastapi.middleware.cors import CORSMiddleware
    from starlette_context.middleware import RawContextMiddleware
    from starlette_context.plugins import RequestIdPlugin

    alias = alias or Path(model_path).stem
    kw = {} if n_threads is None else {"n_threads": n_threads, "n_threads_batch": n_threads}
    ms = ModelSettings(model=str(model_path), model_alias=alias, n_ctx=n_ctx, flash_attn=flash_attn,
                       verbose=verbose, **kw)
    ss = ServerSettings(host=host, port=port)
    llm = Llama(model_path=str(model_path), n_ctx=n_ctx, flash_attn=flash_attn, verbose=verbose,
                kv_policy=policy, n_threads=ms.n_threads, n_threads_batch=ms.n_threads_batch,
                n_batch=ms.n_batch, n_ubatch=ms.n_ubatch, seed=ms.seed)
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
    A._llama_proxy = _Proxy()
    app.state.llama = llm
    return app


def serve(model_path: str, policy: Optional[S.Policy], host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    """Run the server until interrupted; one log line per pruned request on stderr."""
    import uvicorn

    def log(info: dict) -> None:
        print(f"pyasl: request prompt {info['n_prompt']} tokens -> kept {info['n_kept']} cells "
              f"({info['policy']['name']}" + (f", selection layer {info['selected_layer']}"
                                              if info['selected_layer'] is not None else "") + ")",
              file=sys.stderr, flush=True)

    app = create_app(model_path, policy, host=host, port=port, on_prune=log, **kw)
    print(f"pyasl: serving {Path(model_path).name} with policy {policy!r} on http://{host}:{port}/v1",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
