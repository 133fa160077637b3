"""Tokenized documents on disk: shards of flat tokens plus document offsets.

Shard NAME is `NAME.tokens`, raw little-endian uint16 (uint32 for vocabularies over 65,536), and
`NAME.offsets.npy`, int64[documents + 1]: its document i is tokens[offsets[i]:offsets[i + 1]] =
[BOS, t1..tn, EOS]. Both are memory-mapped, so opening a split costs nothing whatever its size,
and readers in every process share the page cache. A split is a list of shards (the manifest's
entries); its document index is the shards' document counts, so it grows with shards, not
documents.
"""

import hashlib
import os
import pathlib
from collections.abc import Iterable

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Writes one shard, streaming; the files get their names only in `close`, so a shard whose
    writer was killed is never mistaken for a finished one."""

    def __init__(self, directory: pathlib.Path, name: str, dtype: np.dtype):
        self.directory, self.name, self.dtype = pathlib.Path(directory), name, dtype
        self.directory.mkdir(parents=True, exist_ok=True)
        self._partial = self.directory / f"{name}.tokens.partial"
        self._tokens = open(self._partial, "wb")
        self._tokens_sha256 = hashlib.sha256()  # as written, so the shard is not read back
        self._lengths = []

    def write(self, document: np.ndarray) -> None:
        data = np.asarray(document, dtype=self.dtype).tobytes()
        self._tokens.write(data)
        self._tokens_sha256.update(data)
        self._lengths.append(len(document))

    def close(self) -> dict:
        """Finishes the files; returns the shard's manifest entry."""
        self._tokens.close()
        offsets = np.concatenate([[0], np.cumsum(self._lengths, dtype=np.int64)])
        partial_offsets = self.directory / f"{self.name}.offsets.partial.npy"
        np.save(partial_offsets, offsets)
        os.replace(self._partial, self.directory / f"{self.name}.tokens")
        os.replace(partial_offsets, self.directory / f"{self.name}.offsets.npy")
        digest = hashlib.sha256(self._tokens_sha256.hexdigest().encode())
        digest.update(_sha256(self.directory / f"{self.name}.offsets.npy").encode())
        return {
            "name": self.name,
            "documents": len(self._lengths),
            "tokens": int(offsets[-1]),
            "sha256": digest.hexdigest(),
        }


def write_shard(directory: pathlib.Path, name: str, documents: Iterable[np.ndarray], dtype) -> dict:
    writer = ShardWriter(directory, name, dtype)
    for document in documents:
        writer.write(document)
    return writer.close()


class Shard:
    """Read-only view of one shard."""

    def __init__(self, directory: pathlib.Path, name: str, dtype: np.dtype):
        directory = pathlib.Path(directory)
        self.offsets = np.load(directory / f"{name}.offsets.npy", mmap_mode="r")
        # np.memmap refuses empty files; an empty shard has no tokens to map. A plain ndarray
        # view of the map: slicing np.memmap itself is several times slower.
        self.tokens = np.zeros(0, dtype)
        if self.offsets[-1]:
            self.tokens = np.asarray(np.memmap(directory / f"{name}.tokens", dtype=dtype, mode="r"))

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]


class TokenizedSplit:
    """Read-only view of a split: its shards (manifest entries) in order."""

    def __init__(self, directory: pathlib.Path, shards: list[dict], dtype: np.dtype):
        self.directory, self.dtype = pathlib.Path(directory), np.dtype(dtype)
        self.names = [shard["name"] for shard in shards]
        self.document_counts = np.array([shard["documents"] for shard in shards], np.int64)
        self.first_document = np.concatenate([[0], np.cumsum(self.document_counts)])
        self.num_tokens = sum(shard["tokens"] for shard in shards)
        self._open = {}

    @property
    def num_documents(self) -> int:
        return int(self.first_document[-1])

    def shard(self, index: int) -> Shard:
        if index not in self._open:
            self._open[index] = Shard(self.directory, self.names[index], self.dtype)
        return self._open[index]

    def document(self, index: int) -> np.ndarray:
        """Document `index` counted over all shards in order."""
        shard = int(np.searchsorted(self.first_document, index, side="right")) - 1
        return self.shard(shard).document(index - int(self.first_document[shard]))

    def __getstate__(self):
        """Pickles as paths and counts (into grain's worker processes); maps are reopened there."""
        return {**self.__dict__, "_open": {}}
