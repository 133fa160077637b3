"""Whitespace-separated words as 64-bit hashes, vectorized with numpy.

Shared by the repetition filters (cleaning.py) and the MinHash shingles (dedup.py);
`WordSplitter` hands the same words to datatrove. The hash is
computed from the UTF-8 bytes, so it is the same in every process and on every machine (Python's
`hash` is salted per process, which would make signatures from worker processes incomparable).
"""

import re

import numpy as np
from datatrove.utils.word_tokenizers import WordTokenizer

_ASCII_WHITESPACE = re.compile(r"[ \t\n\v\f\r]+")
_BYTE_MULTIPLIER = np.uint64(0x100000001B3)
_NGRAM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads every input bit over the whole word."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _powers(base: np.uint64, count: int) -> np.ndarray:
    powers = np.full(max(count, 1), base, dtype=np.uint64)
    powers[0] = 1
    return np.cumprod(powers, dtype=np.uint64)


def hash_words(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (hashes uint64[W], lengths in characters int64[W]) of the words split at ASCII
    whitespace: characters, as Gopher's repetition rules count them."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    # Space, or one of \t \n \v \f \r (bytes 9..13); uint8 arithmetic wraps below 9.
    is_whitespace = (data == 32) | ((data - np.uint8(9)) < 5)
    word_bytes = np.flatnonzero(~is_whitespace)
    if word_bytes.size == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(word_bytes) != 1) + 1])
    lengths = np.diff(np.append(starts, word_bytes.size))
    position_in_word = np.arange(word_bytes.size) - np.repeat(starts, lengths)
    weighted = (data[word_bytes].astype(np.uint64) + np.uint64(1)) * _powers(
        _BYTE_MULTIPLIER, int(lengths.max())
    )[position_in_word]
    # A UTF-8 character is one byte that is not a continuation byte (0b10xxxxxx).
    characters = np.add.reduceat((data[word_bytes] & 0xC0) != 0x80, starts, dtype=np.int64)
    return _mix(np.add.reduceat(weighted, starts)), characters


def hash_ngrams(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hashes of the len(word_hashes) - n + 1 consecutive word n-grams (empty if fewer words)."""
    count = word_hashes.size - n + 1
    if count <= 0:
        return np.zeros(0, np.uint64)
    combined = np.zeros(count, dtype=np.uint64)
    for offset, multiplier in enumerate(_powers(_NGRAM_MULTIPLIER, n)):
        combined += word_hashes[offset : offset + count] * multiplier
    return _mix(combined)


class WordSplitter(WordTokenizer):
    """The words of `hash_words` as datatrove's word tokenizer: datatrove's MinHash step needs
    one, and its default for English is spaCy's, which the project does not install."""

    def word_tokenize(self, text: str) -> list[str]:
        return [word for word in _ASCII_WHITESPACE.split(text) if word]

    def sent_tokenize(self, text: str) -> list[str]:
        raise NotImplementedError("the project splits words only")

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        raise NotImplementedError("the project splits words only")
