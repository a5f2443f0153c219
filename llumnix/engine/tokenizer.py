"""A real model's tokenizer (built from its GGUF metadata by ``gguf_model``): text to token ids and back, its chat
template, its end-of-sequence tokens, and incremental detokenisation with stop strings for streaming.

Random-weight presets have no tokenizer (``TextTokenizer.for_model`` gives None): the frontend keeps its byte encoding
for them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any


class ChatTemplateError(ValueError):
    """The messages cannot be rendered by the model's chat template."""


class TextTokenizer:
    def __init__(self, root: Path) -> None:
        from tokenizers import Tokenizer

        meta = json.loads((root / "config.json").read_text())
        self._tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        self.vocab_size: int = meta["model_config"]["vocab_size"]
        self.bos_token: str | None = meta["bos_token"]
        self.eos_token: str = meta["eos_token"]
        self.add_bos_token: bool = meta["add_bos_token"]
        self.stop_token_ids: frozenset[int] = frozenset(meta["stop_token_ids"])
        self.chat_template: str | None = meta["chat_template"]
        self._template: Any = None
        self._max_token_chars: int | None = None

    @staticmethod
    @cache
    def for_model(name: str) -> TextTokenizer | None:
        """The tokenizer of model ``name``, or None for a random-weight preset."""
        from llumnix.engine import gguf_model

        return TextTokenizer(gguf_model.prepare(name)) if gguf_model.is_real_model(name) else None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_start|>``) become their single ids."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos_token and self.bos_token is not None:
            ids.insert(0, self._tok.token_to_id(self.bos_token))
        return ids

    @property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for (its longest vocabulary entry: a byte-level entry's
        characters are bytes, at least as many as the text's characters): a text of n characters has at least
        ``n / max_token_chars`` tokens, known before it is tokenised."""
        if self._max_token_chars is None:
            self._max_token_chars = max(len(t) for t in self._tok.get_vocab(with_added_tokens=True))
        return self._max_token_chars

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens (end of sequence, chat markers) left out."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text of a conversation, ending with the assistant's turn opening (``add_generation_prompt``)."""
        if self.chat_template is None:
            raise ChatTemplateError("the model has no chat template: use /v1/completions with a text prompt")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(self.chat_template)
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, bos_token=self.bos_token or "", eos_token=self.eos_token
            )
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template rejected the messages: {e}") from None


def _raise(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


class TextStream:
    """Turns generated token ids into text as they arrive, the way a streaming client must see it.

    A token may end in the middle of a UTF-8 character (decoded as U+FFFD): its text is held until the character is
    complete. With ``stop`` strings, text that could be the beginning of one is held too, and once one appears the
    text ends before it and ``stopped`` is set (the OpenAI API leaves the stop string out). Decoding re-reads only the
    last few tokens (vLLM's prefix / read offsets), so a long stream costs O(tokens)."""

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # every complete character decoded so far (up to a stop string, if one matched)
        self.sent = 0  # characters of ``text`` handed out by ``feed``
        self.stopped = False
        self._prefix, self._read = 0, 0

    def feed(self, ids: Sequence[int], final: bool = False) -> str:
        """Add tokens; return the new text a client may be sent now (all of it once ``final`` or stopped)."""
        for t in ids:
            if self.stopped:
                break
            self.ids.append(t)
            self._decode(force=False)
        if final and not self.stopped:
            self._decode(force=True)  # an incomplete character at the very end is sent as U+FFFD
        end = len(self.text) if (final or self.stopped) else max(self.sent, len(self.text) - self._hold)
        out, self.sent = self.text[self.sent : end], end
        return out

    def _decode(self, force: bool) -> None:
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not force):
            return  # no new complete character yet
        start = max(0, len(self.text) - self._hold)  # a stop string may begin in the held-back tail
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True


__all__ = ["ChatTemplateError", "TextStream", "TextTokenizer"]
