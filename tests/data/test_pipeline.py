import json
import random
import shutil

import numpy as np
import pytest

from data import pipeline, prepare, sources, token_cache
from tests.data import corpora


def _shingles(text: str, n: int = 5) -> set:
    tokens = text.split()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: str, b: str) -> float:
    """Of the word 5-gram shingles, as `data.dedup.MinHasher` estimates it."""
    a, b = _shingles(a), _shingles(b)
    return len(a & b) / len(a | b)


def _replaced(text: str, positions, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split()
    for i in positions:
        words[i] = "".join(rng.choice("abcdefghij") for _ in range(8))
    return " ".join(words) + "\n"


def decoded(corpus, split: str) -> list[str]:
    """The split's documents, in shard order, as text (the tokenizer is lossless)."""
    cached = corpus.split(split)
    return corpus.tokenizer.decode([cached.document(i) for i in range(cached.num_documents)])


@pytest.fixture
def planted(text_corpus, tmp_path):
    """The text corpus plus, in files of their own: an exact copy (other whitespace), a near
    copy (Jaccard >= 0.9), a variant at Jaccard <= 0.5, a too-short document and an e-mail."""
    directory, texts = text_corpus
    root = tmp_path / "docs"
    shutil.copytree(directory, root)
    long = [i for i, t in enumerate(texts) if len(t.split()) >= 300][:4]
    near = _replaced(texts[long[1]], [5, 40], seed=0)
    far = _replaced(texts[long[2]], range(0, len(texts[long[2]].split()), 6), seed=1)
    assert jaccard(near, texts[long[1]]) >= 0.9 and jaccard(far, texts[long[2]]) <= 0.5
    (root / "x_exact_copy.txt").write_text(texts[long[0]].replace(" ", "  "))
    (root / "x_near_copy.txt").write_text(near)
    (root / "x_far_variant.txt").write_text(far)
    (root / "x_short.txt").write_text("Too short.")
    (root / "x_mail.txt").write_text(texts[long[3]][:300] + " Mail bob@example.com for more.\n")
    keys = {f"docs/doc{i:03d}.txt": t for i, t in enumerate(texts)}
    pairs = {  # (original, copy) of which one is to stay
        "exact": (f"docs/doc{long[0]:03d}.txt", "docs/x_exact_copy.txt"),
        "near": (f"docs/doc{long[1]:03d}.txt", "docs/x_near_copy.txt"),
    }
    keys["docs/x_far_variant.txt"] = far
    keys["docs/x_mail.txt"] = texts[long[3]][:300] + " Mail <EMAIL> for more.\n"
    return root, keys, pairs


def test_prepare_removes_planted_duplicates_keeps_distant_pairs_and_reports_each_stage(planted, tmp_path):
    root, kept, pairs = planted
    cfg = corpora.small_config(root, tmp_path / "cache")
    corpus = prepare.run(cfg)
    report = corpus.report
    assert report["documents_in"] == len(kept) + 3
    assert report["removed_by_filter"] == {"too_short": 1}
    assert report["pii_replaced"] == {"email": 1}
    assert (report["exact_duplicates"], report["near_duplicates"]) == (1, 1)
    assert report["documents_out"] == len(kept)
    assert report["source"]["files_taken"] == report["source"]["files_found"] == len(kept) + 3

    found = decoded(corpus, "train") + decoded(corpus, "val")
    for original, copy in pairs.values():
        copy_text = (root / copy.removeprefix("docs/")).read_text()
        assert (kept[original] in found) != (copy_text in found)  # one of the two stays
        if copy_text in found:
            kept[copy] = copy_text
            del kept[original]
    units, _ = sources.plan(cfg, cfg.tasks)
    shard_order = [unit.key for task in range(cfg.tasks) for unit in units[task::cfg.tasks]]
    for split in ("train", "val"):
        expected = [kept[k] for k in shard_order if k in kept and (split == "val") == (sources.stable_fraction(k) < cfg.val_fraction)]
        assert decoded(corpus, split) == expected and report["splits"][split]["documents"] == len(expected) > 0
        reference = corpus.tokenizer.encode(expected, add_bos=True, add_eos=True)
        cached = corpus.split(split)
        assert [cached.document(i).tolist() for i in range(cached.num_documents)] == reference
    val = [kept[k] for k in shard_order if k in kept and sources.stable_fraction(k) < cfg.val_fraction]
    val_tokens = sum(len(ids) for ids in corpus.tokenizer.encode(val))
    assert corpus.report["bytes_per_token"] == pytest.approx(sum(len(t.encode()) for t in val) / val_tokens)
    assert corpus.val_bytes == sum(len(t.encode()) for t in val)


def test_manifest_lists_every_shard_with_counts_and_digests(prepared):
    manifest = json.loads((prepared.directory / pipeline.MANIFEST).read_text())
    for split, entry in manifest["splits"].items():
        assert [s["name"] for s in entry["shards"]] == [f"{split}-{task:05d}" for task in range(8)]
        cached = prepared.split(split)
        assert entry["documents"] == cached.num_documents == sum(s["documents"] for s in entry["shards"])
        for i, shard in enumerate(entry["shards"]):
            offsets = cached.shard(i).offsets
            assert (shard["documents"], shard["tokens"]) == (offsets.size - 1, offsets[-1])
    assert manifest["digest"] == prepared.digest and len(prepared.digest) == 64


def test_second_prepare_reuses_the_cache(prepared, monkeypatch):
    monkeypatch.setattr(prepare, "stages", lambda *args: pytest.fail("rebuilt a prepared corpus"))
    again = prepare.run(prepared.config)
    assert again.directory == prepared.directory and again.manifest == prepared.manifest


def test_training_needs_a_finished_preparation(text_corpus, tmp_path):
    cfg = corpora.small_config(text_corpus[0], tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"manifest.json: no prepared corpus .* run `python -m data.prepare"):
        pipeline.open_corpus(cfg)


def test_cache_key_follows_settings_and_files(text_corpus, tmp_path):
    directory, _ = text_corpus
    root = tmp_path / "docs"
    shutil.copytree(directory, root)
    cfg = corpora.small_config(root, tmp_path / "cache")
    key = pipeline.cache_key(cfg)
    cfg.workers, cfg.executor = 2, "ray"  # how the work is done does not change the result
    assert pipeline.cache_key(cfg) == key
    cfg.tasks = 4  # which copy of a duplicate is kept depends on it
    assert pipeline.cache_key(cfg) != key
    cfg.tasks = 8
    cfg.cleaning.min_chars = 30
    assert pipeline.cache_key(cfg) != key
    cfg.cleaning.min_chars = 20
    (root / "doc000.txt").write_text("changed")
    assert pipeline.cache_key(cfg) != key


def test_loading_a_tokenizer_instead_of_training(prepared, tmp_path):
    cfg = prepared.config.copy_and_resolve_references()
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.tokenizer.path = str(prepared.directory / "tokenizer.model")
    cfg.tokenizer.vocab_size = 999  # ignored: the loaded model decides
    loaded = prepare.run(cfg)
    assert loaded.report["tokenizer"]["trained_on_bytes"] == 0
    assert loaded.digest == prepared.digest
    assert not (loaded.directory / "work" / "stages" / "tokenizer").exists()


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "docs").mkdir()
    with pytest.raises(ValueError, match=r"empty corpus: no documents were read \(files: 0 of 0 files"):
        prepare.run(corpora.small_config(tmp_path / "docs", tmp_path / "cache"))


def test_corpus_empty_after_filtering_is_an_error(text_corpus, tmp_path):
    cfg = corpora.small_config(text_corpus[0], tmp_path / "cache")
    cfg.cleaning.min_chars = 10**6
    with pytest.raises(ValueError, match=r"nothing left after cleaning .*{'too_short': 120}"):
        prepare.run(cfg)
    assert not list((tmp_path / "cache").glob(f"*/{pipeline.MANIFEST}"))


def test_empty_validation_split_is_an_error(tmp_path):
    corpora.write_text_corpus(tmp_path / "docs", num_documents=3)
    cfg = corpora.small_config(tmp_path / "docs", tmp_path / "cache", val_fraction=0.0001)
    with pytest.raises(ValueError, match=r"the val split is empty: 3 documents, val_fraction=0.0001"):
        prepare.run(cfg)


def test_invalid_settings_are_named(tmp_path):
    for key, value, message in (
        ("source", "web", r"source='web'"),
        ("executor", "spark", r"data.executor='spark' is not one of"),
        ("tasks", 0, r"data.tasks=0 must be at least 1"),
    ):
        cfg = pipeline.default_config()
        cfg[key] = value
        with pytest.raises(ValueError, match=message):
            prepare.run(cfg)
    cfg = pipeline.default_config()
    cfg.tokenizer.model_type = "wordpiece"
    with pytest.raises(ValueError, match=r"tokenizer.model_type='wordpiece'"):
        prepare.run(cfg)
    cfg = pipeline.default_config()
    cfg.tokenizer.sample_bytes = 0
    with pytest.raises(ValueError, match=r"data.tokenizer.sample_bytes=0 must be positive"):
        prepare.run(cfg)
    with pytest.raises(ValueError, match=r"--host_index=2 is not in \[0, --host_count=2\)"):
        prepare.run(pipeline.default_config(), host_index=2, host_count=2)


def test_token_dtype_fits_the_vocabulary():
    assert token_cache.token_dtype(65_536) == np.uint16
    assert token_cache.token_dtype(65_537) == np.uint32


def test_invalid_tokenizer_path_is_refused_before_reading(text_corpus, tmp_path):
    not_a_model = tmp_path / "tokenizer.model"
    not_a_model.write_text("not a SentencePiece model")
    for path, reason in ((not_a_model, "not a SentencePiece model file"), (tmp_path / "none.model", "no such file")):
        cfg = corpora.small_config(text_corpus[0], tmp_path / "cache", tokenizer={"path": str(path)})
        with pytest.raises(ValueError, match=rf"^data.tokenizer.path='{path}': {path}: {reason}"):
            prepare.run(cfg)
    assert not (tmp_path / "cache").exists()


def test_cache_location_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LMX_DATA_CACHE", str(tmp_path / "tokens"))
    assert pipeline.default_config().cache_dir == str(tmp_path / "tokens")
    monkeypatch.delenv("LMX_DATA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pipeline.default_config().cache_dir == str(tmp_path / "xdg" / "lmx" / "data")
