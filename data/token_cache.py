"""Tokenized documents on disk: one flat token file per split, plus document offsets.

Document i of a split is tokens[offsets[i]:offsets[i + 1]] = [BOS, t1..tn, EOS]. The token file is
raw little-endian uint16 (or uint32 for vocabularies over 65,536) read through np.memmap, so
opening a split costs nothing and readers in every process share the page cache.
"""

import pathlib
from collections.abc import Iterable

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def write_split(directory: pathlib.Path, name: str, documents: Iterable[np.ndarray], dtype) -> None:
    lengths = []
    with open(directory / f"{name}.tokens", "wb") as tokens:
        for document in documents:
            tokens.write(np.asarray(document, dtype=dtype).tobytes())
            lengths.append(len(document))
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    np.save(directory / f"{name}.offsets.npy", offsets)


class TokenizedSplit:
    """Read-only view of one split written by write_split."""

    def __init__(self, directory: pathlib.Path, name: str, dtype: np.dtype):
        self.offsets = np.load(pathlib.Path(directory) / f"{name}.offsets.npy")
        path = pathlib.Path(directory) / f"{name}.tokens"
        # np.memmap refuses empty files; an empty split has no tokens to map.
        self.tokens = np.zeros(0, dtype)
        if self.offsets[-1]:
            self.tokens = np.memmap(path, dtype=dtype, mode="r")

    @property
    def num_documents(self) -> int:
        return self.offsets.size - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]
