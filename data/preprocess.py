"""The per-document work of `pipeline.prepare`, run in worker processes.

`clean_and_fingerprint` cleans each text and computes what deduplication needs, so that only
small fingerprints and the cleaned text travel back; `encode_documents` tokenizes for the cache.
"""

import collections
import dataclasses

import numpy as np

from data import cleaning, dedup, tokenizer


@dataclasses.dataclass
class ProcessedDocument:
    text: str | None  # None when a quality filter removed it
    removed_by: str | None
    pii_replaced: collections.Counter
    exact_key: bytes | None
    signature: np.ndarray | None  # MinHash, when near-duplicate detection is on


def clean_and_fingerprint(texts: list[str], cleaning_cfg, dedup_cfg) -> list[ProcessedDocument]:
    minhasher = None
    if dedup_cfg.near:
        minhasher = dedup.MinHasher(dedup_cfg.num_perm, dedup_cfg.ngram, dedup_cfg.seed)
    processed = []
    for text in texts:
        cleaned = cleaning.clean(text, cleaning_cfg)
        kept = cleaned.text is not None
        processed.append(
            ProcessedDocument(
                text=cleaned.text,
                removed_by=cleaned.removed_by,
                pii_replaced=cleaned.pii_replaced,
                exact_key=dedup.exact_key(cleaned.text) if kept else None,
                signature=minhasher.signature(cleaned.word_hashes) if kept and minhasher else None,
            )
        )
    return processed


def encode_documents(texts: list[str], model_proto: bytes) -> list[np.ndarray]:
    """[BOS, tokens..., EOS] of each text as int32 arrays."""
    return tokenizer.Tokenizer(model_proto).encode_arrays(texts, add_bos=True, add_eos=True)
