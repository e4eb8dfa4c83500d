"""Incremental chat formatting for a Session: the text a new turn appends is the template's rendering
of the conversation with that turn minus the rendering of what the cache already holds."""
from __future__ import annotations

from typing import Optional, Sequence

ANSWER = "\u2063pyasl-answer\u2063"  # stands for an answer's text while rendering the template
OPEN = "open"  # a user message the next turn completes (the documents): its value goes before the turn's text
_QUESTION = "\u2063pyasl-question\u2063"  # where the next turn's text goes in an open message


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
        """The template's text for `msgs`; an open last message renders up to where its question goes."""
        if msgs and OPEN in msgs[-1]:
            last = {"role": "user", "content": msgs[-1]["content"] + _QUESTION}
            text = self._render(msgs[:-1] + [last], True)
            return text[:text.index(_QUESTION)]
        return self._render(msgs, gen)

    def _render(self, msgs: list[dict], gen: bool) -> str:
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
        """The messages prefilled before any turn: the system text, then the documents in a user message
        left open (:data:`OPEN`), so the first question completes it. The first question is then asked
        exactly as in one prompt (documents and question in one user message, the layout of
        ``pyasl generate`` and of the accuracy suite); with the documents in a system message and the
        question in a later turn, a 0.5B model answered fewer questions at 8K with nothing pruned
        (docs/BENCHMARKS.md, "At 8K: per-question selection answers what a full-KV session
        answers"). One unnamed document goes in as it is; several, or named ones, under
        "Document i (name):" headers."""
        msgs = [{"role": "system", "content": system}] if system else []
        if not documents:
            return msgs
        if len(documents) == 1 and not documents[0][0]:
            block = documents[0][1]
        else:
            block = "\n\n".join(f"Document {i + 1}" + (f" ({name})" if name else "") + f":\n{text}"
                                for i, (name, text) in enumerate(documents))
        # the blank line between documents and question goes on the side where tokenizing the two apart
        # gives the tokens of the two together (Qwen2.5 merges ".\n\n", SmolLM2 splits "\n" + "\nWhat")
        for content, sep in ((block + "\n\n", ""), (block, "\n\n")):
            opened = msgs + [{"role": "user", "content": content, OPEN: sep}]
            if self._splits_cleanly(msgs + [{"role": "user", "content": content[-256:], OPEN: sep}]):
                break
        if block not in self.render(opened, False):
            raise ValueError("this model's chat template does not render the documents; use raw mode")
        return opened

    def _splits_cleanly(self, msgs: list[dict]) -> bool:
        """Whether the tokens of an open message and of a question after it, tokenized apart (as a
        session does), are those of the two tokenized together (as one prompt is)."""
        head = self.render(msgs, False)
        whole = self.render(self.turn(msgs, "What is the answer?"), True)
        return self.tokens(head, True) + self.tokens(whole[len(head):], False) == self.tokens(whole, True)

    @staticmethod
    def turn(msgs: list[dict], prompt: str) -> list[dict]:
        """`msgs` with a user turn `prompt`: it completes an open documents message, or follows."""
        if msgs and OPEN in msgs[-1]:
            return msgs[:-1] + [{"role": "user", "content": msgs[-1]["content"] + msgs[-1][OPEN] + prompt}]
        return msgs + [{"role": "user", "content": prompt}]
