"""Truncated tokenisation that reads only the part of a text it keeps: a 5 MB prompt cut to its
last 320 tokens costs what a short one does, with the same ids as tokenising it whole.

A window of the text is cut where a word ends and whitespace starts: tokenizers split text into
words before merging (pre-tokenisation), and no word crosses such a cut, so the window's tokens
are the whole text's tokens there, but for the first (or last) one when a tokenizer marks the
text's start. A window that holds ``MARGIN`` more tokens than kept is therefore exact.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

CHARS_PER_TOKEN = 16
"""Characters tried per kept token; the window grows fourfold until it holds enough tokens."""
MARGIN = 16
"""Extra tokens a window must hold beyond those kept."""
_WORD_END = re.compile(r"(?<=\S)\s")


def last_tokens(tokenizer: PreTrainedTokenizerBase, text: str, n: int) -> list[int]:
    """``tokenizer(text)["input_ids"][-n:]`` (no special tokens), tokenising only the text's end."""
    window = n * CHARS_PER_TOKEN
    while len(text) > window:
        cut = _WORD_END.search(text, len(text) - window)
        if cut is None:
            break
        ids = tokenizer(text[cut.start() :], add_special_tokens=False)["input_ids"]
        if len(ids) >= n + MARGIN:
            return ids[-n:]
        window *= 4
    return tokenizer(text, add_special_tokens=False)["input_ids"][-n:]


def first_tokens(tokenizer: PreTrainedTokenizerBase, text: str, n: int) -> list[int]:
    """``tokenizer(text)["input_ids"][:n]`` (no special tokens), tokenising only the text's start."""
    window = n * CHARS_PER_TOKEN
    while len(text) > window:
        cut = _WORD_END.search(text, window)
        if cut is None:
            break
        ids = tokenizer(text[: cut.start()], add_special_tokens=False)["input_ids"]
        if len(ids) >= n + MARGIN:
            return ids[:n]
        window *= 4
    return tokenizer(text, add_special_tokens=False)["input_ids"][:n]
