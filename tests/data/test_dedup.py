import random

import numpy as np

from data import dedup, words
from tests.data import corpora


def _shingles(text: str, n: int) -> set:
    tokens = text.split()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def _edit(rng: random.Random, text: str, replacements: int, vocabulary: list[str]) -> str:
    tokens = text.split()
    for i in rng.sample(range(len(tokens)), replacements):
        tokens[i] = rng.choice(vocabulary)
    return " ".join(tokens)


def test_exact_key_ignores_whitespace_layout_only():
    assert dedup.exact_key("a  b\n\tc ") == dedup.exact_key("a b c")
    assert dedup.exact_key("a b c") != dedup.exact_key("a b d")


def test_minhash_estimates_jaccard_similarity():
    rng = random.Random(0)
    vocabulary = corpora.vocabulary(rng)
    minhasher = dedup.MinHasher(num_perm=256, ngram=5, seed=0)
    base = corpora.prose(rng, 400, vocabulary)
    for replacements in (0, 4, 15, 60, 400):
        variant = _edit(rng, base, replacements, vocabulary)
        a, b = _shingles(base, 5), _shingles(variant, 5)
        true_jaccard = len(a & b) / len(a | b)
        estimate = np.mean(
            minhasher.signature(words.hash_words(base)[0]) == minhasher.signature(words.hash_words(variant)[0])
        )
        assert abs(estimate - true_jaccard) < 0.08, (replacements, true_jaccard, estimate)


def test_near_duplicates_finds_planted_copies_and_keeps_the_first():
    rng = random.Random(1)
    vocabulary = corpora.vocabulary(rng)
    originals = [corpora.prose(rng, 300, vocabulary) for _ in range(20)]
    texts = originals + [_edit(rng, originals[3], 3, vocabulary), _edit(rng, originals[11], 2, vocabulary)]
    minhasher = dedup.MinHasher(num_perm=128, ngram=5)
    signatures = [minhasher.signature(words.hash_words(t)[0]) for t in texts]
    duplicate_of = dedup.near_duplicates(signatures, threshold=0.8)
    assert duplicate_of == [None] * 20 + [3, 11]


def test_short_texts_get_one_shingle():
    minhasher = dedup.MinHasher(num_perm=64, ngram=5)
    one = minhasher.signature(words.hash_words("two words")[0])
    assert (one == minhasher.signature(words.hash_words("two  words")[0])).all()
    assert (one != minhasher.signature(words.hash_words("other words")[0])).any()
