"""Throughput of the data pipeline, per core: `python -m data.benchmark [--seq_len 1024 ...]`.

Prints tokens/s of (a) tokenization, (b) reading packed batches from the token cache, and MinHash
signatures per MB with this package's numpy code against `datasketch.MinHash`. Prepares the
default corpus first (reusing the cache when it exists).
"""

import argparse
import time

import datasketch

from data import dedup, pipeline, prepare, words


def _documents_text(corpus, max_bytes: int) -> list[str]:
    """Training documents decoded back to text (the tokenizer is lossless), up to max_bytes."""
    split = corpus.split("train")
    texts, size = [], 0
    for i in range(split.num_documents):
        if size >= max_bytes:
            break
        texts.append(corpus.tokenizer.decode([split.document(i)])[0])
        size += len(texts[-1].encode("utf-8"))
    return texts


def tokenization(corpus, texts: list[str]) -> float:
    start = time.perf_counter()
    tokens = sum(len(ids) for ids in corpus.tokenizer.encode_arrays(texts))
    return tokens / (time.perf_counter() - start)


def packed_reading(corpus, seq_len: int, batch_size: int, seconds: float) -> tuple[float, float]:
    """(tokens/s counting every row slot, fraction of slots holding a token)."""
    iterator = pipeline.train_iterator(
        corpus, seq_len=seq_len, batch_size=batch_size, worker_count=0
    )
    next(iterator)  # maps the token shards and fills the shuffle window
    batches, used, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        used += int((next(iterator)["segment_ids"] > 0).sum())
        batches += 1
    elapsed = time.perf_counter() - start
    return batches * batch_size * seq_len / elapsed, used / (batches * batch_size * seq_len)


def minhash_mb_per_second(texts: list[str], num_perm: int, ngram: int) -> tuple[float, float]:
    """(numpy MinHasher, datasketch.MinHash) MB/s of text, shingling the same word n-grams."""
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    minhasher = dedup.MinHasher(num_perm, ngram)
    start = time.perf_counter()
    for text in texts:
        minhasher.signature(words.hash_words(text)[0])
    numpy_rate = megabytes / (time.perf_counter() - start)
    start = time.perf_counter()
    for text in texts:
        tokens = text.split()
        starts = range(max(len(tokens) - ngram + 1, 1))
        minhash = datasketch.MinHash(num_perm=num_perm)
        minhash.update_batch([" ".join(tokens[i : i + ngram]).encode() for i in starts])
    return numpy_rate, megabytes / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0, help="time spent reading batches")
    parser.add_argument("--sample_bytes", type=int, default=4_000_000, help="text to tokenize")
    parser.add_argument("--cache_dir", default=pipeline.default_config().cache_dir)
    args = parser.parse_args()

    cfg = pipeline.default_config()
    cfg.cache_dir = args.cache_dir
    corpus = prepare.run(cfg)
    texts = _documents_text(corpus, args.sample_bytes)
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    rate = tokenization(corpus, texts)
    print(f"tokenization ({megabytes:.1f} MB, 1 core): {rate / 1e6:.2f}M tokens/s")
    rate, used = packed_reading(corpus, args.seq_len, args.batch_size, args.seconds)
    shape = f"[{args.batch_size}, {args.seq_len}]"
    print(f"packed batches {shape} from the cache (1 core): {rate / 1e6:.2f}M tokens/s, "
          f"{used:.1%} of row slots hold tokens")
    sample = texts[: max(1, len(texts) // 8)]
    numpy_rate, datasketch_rate = minhash_mb_per_second(sample, cfg.dedup.num_perm, cfg.dedup.ngram)
    print(f"MinHash ({cfg.dedup.num_perm} permutations, {cfg.dedup.ngram}-gram shingles, 1 core): "
          f"numpy {numpy_rate:.1f} MB/s, datasketch {datasketch_rate:.1f} MB/s")


if __name__ == "__main__":
    main()
