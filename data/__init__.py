"""Text -> token shards -> packed batches. Entry points: `python -m data.prepare`,
`pipeline.open_corpus`, `pipeline.train_iterator`.

    prepare.py      `python -m data.prepare`: the stages as datatrove pipelines, run locally, on
                    Ray or Slurm, or split over a pod's hosts; resumes unfinished tasks
    steps.py        the project's datatrove steps: read, clean, MinHash signatures and verified
                    clusters, tokenizer sample and training, tokenize into shards, manifest
    sources.py      documents from the built-in corpus (this Python's sources), files, or `datasets`
    cleaning.py     Unicode normalization, PII scrubbing, Gopher-style quality filters
    words.py        vectorized word / n-gram hashes shared by the filters and MinHash
    dedup.py        what dedup compares: whitespace-normalized text, MinHash signatures, LSH bands
    tokenizer.py    SentencePiece training, batch encode/decode (lossless on any text)
    token_cache.py  token shards on disk (flat token file + offsets, memory-mapped)
    packing.py      grain pipelines: shuffle documents, chunk, first-fit pack, batch, shard by host
    pipeline.py     the data config, the cache key, opening a prepared corpus, the report
    benchmark.py    `python -m data.benchmark`: tokenization and batch-reading throughput
"""
