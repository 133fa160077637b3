"""Small hand-made corpora for the data tests (also imported by their subprocesses)."""

import pathlib
import random

from data import pipeline


def prose(rng: random.Random, num_words: int, vocabulary: list[str]) -> str:
    """Sentences of random words: passes every quality filter, never near-duplicates another."""
    sentences, words = [], [rng.choice(vocabulary) for _ in range(num_words)]
    for start in range(0, num_words, 12):
        sentence = " ".join(words[start : start + 12])
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
    return " ".join(sentences) + "\n"


def vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(size)]


def write_text_corpus(root: pathlib.Path, num_documents: int = 120, seed: int = 0) -> list[str]:
    """Writes doc000.txt, doc001.txt, ... of 20 to 700 words; returns their texts in that order."""
    rng = random.Random(seed)
    words = vocabulary(rng)
    root.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(num_documents):
        text = prose(rng, rng.randint(20, 700), words)
        (root / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


def small_config(corpus: pathlib.Path, cache_dir: pathlib.Path, **overrides):
    cfg = pipeline.default_config()
    cfg.source = "files"
    cfg.paths = [str(corpus)]
    cfg.cache_dir = str(cache_dir)
    cfg.max_bytes = 0
    cfg.val_fraction = 0.2
    cfg.workers = 1
    cfg.cleaning.min_chars = 20
    cfg.tokenizer.vocab_size = 400
    cfg.tokenizer.sample_bytes = 200_000
    cfg.update(overrides)
    return cfg
