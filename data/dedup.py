"""What deduplication compares: whitespace-normalized text (exact) and MinHash signatures (near).

The datatrove stages of `data/steps.py` find the duplicates; this module gives them their
inputs. Signatures are computed here with numpy rather than by datatrove's MinHash step or
`datasketch.MinHash`: both hash every shingle in a Python loop (datatrove after lower-casing
and dropping punctuation, which changes what "similar" means); `python -m data.benchmark`
measures datasketch at about half the speed on source code (4.0 against 8.7 MB/s on one core
of the 2-core CPU). The LSH bands for a Jaccard threshold are chosen as `datasketch.MinHashLSH`
chooses them.
"""

import numpy as np

from data import words

_EMPTY_SLOT = np.uint64(2**32 - 1)


def exact_text(text: str) -> str:
    """What exact deduplication hashes: the text without its whitespace layout."""
    return " ".join(text.split())


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


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) for candidate pairs at Jaccard >= threshold: the split of at most
    num_perm slots that minimizes 0.1 x the chance of candidates below the threshold plus 0.9 x
    the chance of missing pairs above it, integrated over the similarity (datasketch.MinHashLSH's
    rule, whose scipy import costs the preparation about a second).

    Candidates are verified against the threshold afterwards, so a false positive costs only
    one comparison: weighting false negatives 9:1 picks more, shorter bands (at threshold 0.8
    and 128 permutations, 14 bands of 9 rows: a pair at Jaccard 0.9 is missed 0.1% of the time,
    one at 0.5 becomes a candidate 2.7% of the time).
    """
    below, above = np.linspace(0.0, threshold, 2001), np.linspace(threshold, 1.0, 2001)
    best, best_error = (1, 1), np.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_positive = np.trapezoid(1 - (1 - below**rows) ** bands, below)
            false_negative = np.trapezoid((1 - above**rows) ** bands, above)
            error = 0.1 * false_positive + 0.9 * false_negative
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Share of equal slots of two signatures: an unbiased estimate of the Jaccard similarity."""
    return float(np.mean(a == b))
