"""Text -> packed token batches. Entry points: `pipeline.prepare`, `pipeline.train_iterator`.

    sources.py      documents from the built-in corpus (this Python's sources), files, or `datasets`
    cleaning.py     Unicode normalization, PII scrubbing, Gopher-style quality filters
    words.py        vectorized word / n-gram hashes shared by the filters and MinHash
    dedup.py        exact content hashes, MinHash signatures, LSH near-duplicate search
    preprocess.py   the per-document work that runs in worker processes
    parallel.py     order-preserving map over document batches in spawned processes
    tokenizer.py    SentencePiece training, batch encode/decode (lossless on any text)
    token_cache.py  tokenized splits on disk (flat token file + offsets, memory-mapped)
    packing.py      grain pipelines: chunk, shuffle, first-fit pack, batch, shard; eval batches
    pipeline.py     config, `prepare` (cached by a hash of inputs and settings), the report
    benchmark.py    `python -m data.benchmark`: tokenization and batch-reading throughput
"""
