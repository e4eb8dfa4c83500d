"""Incremental chat formatting for a Session: the text a new turn appends is the template's rendering
of the conversation with that turn minus the rendering of what the cache already holds."""
from __future__ import annotations

from typing import Optional, Sequence

ANSWER = "\u2063pyasl-answer\u2063"  # stands for an answer's text while rendering the template
_ACK = "I have read the documents. What would you like to know?"


class ChatFormat:
    """Incremental chat formatting: the text to append for a new turn is the template rendering
    of the conversation with that turn minus the rendering of what is already cached (answers
    stand in as a placeholder, so a template that trims or rewrites them still renders a prefix)."""

    def __init__(self, model, raw: bool = False):
        self.model = model
        self.raw = raw or not model.chat_template
        if not self.raw:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
            import llama_cpp

            def piece(fn) -> str:
                t = fn(model.vocab)
                return model.token_bytes(t, special=True).decode("utf-8", errors="replace") if t >= 0 else ""

            eos, bos = piece(llama_cpp.llama_vocab_eos), piece(llama_cpp.llama_vocab_bos)
            self._fmt = {g: Jinja2ChatFormatter(model.chat_template, eos_token=eos, bos_token=bos,
                                                add_generation_prompt=g) for g in (False, True)}

    def render(self, msgs: list[dict], gen: bool) -> str:
        if self.raw:
            parts = []
            for m in msgs:
                c = m["content"]
                parts.append(c + "\n\n" if m["role"] == "system" else
                             f"User: {c}\n" if m["role"] == "user" else f"Assistant:{c}\n")
            return "".join(parts) + ("Assistant:" if gen else "")
        return self._fmt[gen](messages=msgs).prompt

    def tokens(self, text: str, first: bool) -> list[int]:
        if self.raw:
            return self.model.tokenize(text, add_special=first, parse_special=False)
        return self.model.tokenize(text, add_special=False, parse_special=True)

    def preamble(self, system: Optional[str], documents: Sequence[tuple[str, str]]) -> list[dict]:
        """The messages that hold the system text and the documents, prefilled before any turn."""
        if not documents:
            return [{"role": "system", "content": system}] if system else []
        block = "\n\n".join(f"Document {i + 1}" + (f" ({name})" if name else "") + f":\n{text}"
                            for i, (name, text) in enumerate(documents))
        intro = "Answer questions about the following documents.\n\n"
        sys_msg = {"role": "system", "content": (system + "\n\n" if system else "") + intro + block}
        try:
            if block in self.render([sys_msg], False):
                return [sys_msg]
        except Exception:  # a template that refuses a lone system message
            pass
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": intro + block}, {"role": "assistant", "content": _ACK}]
        if block not in self.render(msgs, False):
            raise ValueError("this model's chat template does not render the documents; use raw mode")
        return msgs
