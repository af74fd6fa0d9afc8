"""The bytes a token stands for, which its decoded text does not always hold.

A token may hold part of a multi-byte UTF-8 character (byte-level BPE splits them, SentencePiece's byte
fallback emits `<0xE2>` pieces): decoding it alone gives U+FFFD, whose bytes are not the token's. The OpenAI
chat logprobs `bytes` field exists so clients can join such tokens back into text, so it must carry the
token's own bytes, read from its vocabulary entry.
"""
from __future__ import annotations

import re
from functools import lru_cache

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's alphabet: each byte is written as one printable character."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer, token: int, text: str) -> bytes:
    """The bytes of `token`, whose text alone (tokenizer.decode([token])) is `text`."""
    if "\ufffd" not in text:
        return text.encode("utf-8")
    piece = tokenizer.convert_ids_to_tokens(token)
    if isinstance(piece, str):
        if m := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        decoder = _byte_level_decoder()
        if piece and all(c in decoder for c in piece):
            return bytes(decoder[c] for c in piece)
    return text.encode("utf-8")  # a vocabulary we cannot read bytes from: the text is all we have
