import random

import numpy as np
import pytest

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


def test_exact_text_ignores_whitespace_layout_only():
    assert dedup.exact_text("a  b\n\tc ") == dedup.exact_text("a b c") == "a b c"
    assert dedup.exact_text("a b c") != dedup.exact_text("a b d")


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


@pytest.mark.parametrize("threshold, num_perm", [(0.5, 64), (0.8, 128), (0.9, 256)])
def test_lsh_bands_are_datasketch_choice(threshold, num_perm):
    import datasketch

    lsh = datasketch.MinHashLSH(threshold, num_perm=num_perm, weights=(0.1, 0.9))
    assert dedup.lsh_bands(threshold, num_perm) == (lsh.b, lsh.r)


def test_lsh_bands_make_likely_pairs_candidates_and_unlikely_ones_rare():
    bands, rows = dedup.lsh_bands(threshold=0.8, num_perm=128)
    assert (bands, rows) == (14, 9)
    candidate = lambda jaccard: 1 - (1 - jaccard**rows) ** bands
    assert candidate(0.9) > 0.99 and candidate(0.5) < 0.05


def test_word_splitter_gives_the_words_hash_words_hashes():
    text = " déjà\tvu\n vu\u00a0x \x0bend "
    split = words.WordSplitter().word_tokenize(text)
    assert split == ["déjà", "vu", "vu\u00a0x", "end"]  # ASCII whitespace only, like hash_words
    assert [words.hash_words(w)[0][0] for w in split] == words.hash_words(text)[0].tolist()


def test_short_texts_get_one_shingle():
    minhasher = dedup.MinHasher(num_perm=64, ngram=5)
    one = minhasher.signature(words.hash_words("two words")[0])
    assert (one == minhasher.signature(words.hash_words("two  words")[0])).all()
    assert (one != minhasher.signature(words.hash_words("other words")[0])).any()


def test_near_duplicates_in_a_chain_are_joined_across_a_dissimilar_document(tmp_path):
    """datatrove's bucket stage writes the documents sharing a band's value as a chain of
    neighbours, (A, B), (B, C): with B far from both, A and C (90% of slots equal) must still
    be compared and C removed; D, on the same chain but like no other, is kept."""
    from types import SimpleNamespace

    from data import steps

    num_perm = 20
    layout = steps.Layout(tmp_path)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32)
    b, c, d = a.copy(), a.copy(), rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32)
    b[5:] += 1  # 25% of slots equal to A's
    c[-2:] += 7  # 90%
    d[:5] = a[:5]  # shares the band (slots 0-4) and nothing else
    full = np.zeros(4, steps.full_signature_dtype(num_perm))
    full["document"], full["signature"] = np.arange(4), [a, b, c, d]
    layout.data("minhash_full").mkdir(parents=True)
    full.tofile(steps.task_file(layout.data("minhash_full"), 0, ".sig"))
    layout.data("minhash_pairs").mkdir(parents=True)
    chain = np.array([[0, 0, 0, 1], [0, 1, 0, 2], [0, 2, 0, 3]], "<u4")  # A-B-C-D, one band
    chain.tofile(layout.data("minhash_pairs") / "00000_00.dups")
    (layout.data("minhash_pairs") / "00001_00.dups").touch()  # a band without candidates
    assert steps.band_chains(chain.tolist()) == [[(0, 0), (0, 1), (0, 2), (0, 3)]]

    steps.VerifiedClusters(layout, SimpleNamespace(num_perm=num_perm, threshold=0.8)).run()
    assert np.fromfile(layout.data("minhash_removed") / "000000.remove", "<u4").tolist() == [2]
    (report,) = steps.read_reports(layout.reports("clusters"))
    assert report == {"candidate_pairs": 3, "verified_pairs": 1, "near_duplicates": 1}
