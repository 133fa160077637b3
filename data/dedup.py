"""Exact and near-duplicate detection: content hashes, MinHash signatures, LSH (datasketch).

Signatures are computed here with numpy rather than with `datasketch.MinHash`: datasketch hashes
every shingle with SHA-1 in a Python loop, which `python -m data.benchmark` measures at about
half the speed on source code (4.0 against 8.7 MB/s on one core of the 2-core CPU). The banding index and its
(bands, rows) choice for a Jaccard threshold come from `datasketch.MinHashLSH`.
"""

import hashlib

import numpy as np

from data import words

_EMPTY_SLOT = np.uint64(2**32 - 1)


def exact_key(text: str) -> bytes:
    """Content hash that ignores how whitespace is laid out."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()


class MinHasher:
    """MinHash over word n-gram shingles with multiply-shift hash functions (32-bit values)."""

    def __init__(self, num_perm: int, ngram: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.ngram = ngram
        self.multipliers = rng.integers(0, 2**64, num_perm, dtype=np.uint64) | np.uint64(1)  # odd
        self.offsets = rng.integers(0, 2**64, num_perm, dtype=np.uint64)

    @property
    def num_perm(self) -> int:
        return self.multipliers.size

    def signature(self, word_hashes: np.ndarray, block_rows: int = 8192) -> np.ndarray:
        """uint64[num_perm] signature; a text shorter than one n-gram is a single shingle."""
        ngrams = words.hash_ngrams(word_hashes, min(self.ngram, max(word_hashes.size, 1)))
        # The top 32 bits make the keys of the 32-bit multiply-add-shift family.
        shingles = np.unique(ngrams >> np.uint64(32))
        signature = np.full(self.num_perm, _EMPTY_SLOT, dtype=np.uint64)
        hashed = np.empty((min(block_rows, shingles.size), self.num_perm), dtype=np.uint64)
        for start in range(0, shingles.size, block_rows):
            block = shingles[start : start + block_rows, None]
            out = hashed[: block.shape[0]]
            np.multiply(block, self.multipliers, out=out)
            out += self.offsets
            out >>= np.uint64(32)
            np.minimum(signature, out.min(axis=0), out=signature)
        return signature


def near_duplicates(signatures: list[np.ndarray], threshold: float) -> list[int | None]:
    """For each signature, the index of an earlier kept document it near-duplicates, else None.

    Documents are visited in order; a document is kept when no kept document is a candidate from
    the LSH buckets with estimated Jaccard similarity >= threshold, so the first copy survives.
    """
    # Imported here: datasketch loads scipy (about a second), which the worker processes that
    # compute signatures do not need.
    import datasketch

    if not signatures:
        return []
    # Candidates are verified against the threshold below, so a false positive costs only one
    # comparison: weighting false negatives 9:1 picks more, shorter bands (at threshold 0.8 and
    # 128 permutations a pair with Jaccard 0.9 is missed 0.1% of the time instead of 7%).
    index = datasketch.MinHashLSH(threshold, num_perm=signatures[0].size, weights=(0.1, 0.9))
    duplicate_of = []
    for i, signature in enumerate(signatures):
        minhash = datasketch.LeanMinHash(seed=0, hashvalues=signature)
        candidates = sorted(index.query(minhash))
        similar = (j for j in candidates if np.mean(signatures[j] == signature) >= threshold)
        match = next(similar, None)
        if match is None:
            index.insert(i, minhash, check_duplication=False)
        duplicate_of.append(match)
    return duplicate_of
