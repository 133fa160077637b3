import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from data import pipeline, sources, token_cache
from tests.data import corpora


@pytest.fixture
def planted(text_corpus, tmp_path):
    """The text corpus plus an exact copy, a near copy, a too-short document and an e-mail."""
    directory, texts = text_corpus
    root = tmp_path / "docs"
    shutil.copytree(directory, root)
    words = texts[1].split()
    words[5], words[40] = "replaced", "words"
    (root / "x_exact_copy.txt").write_text(texts[0].replace(" ", "  "))
    (root / "x_near_copy.txt").write_text(" ".join(words) + "\n")
    (root / "x_short.txt").write_text("Too short.")
    (root / "x_mail.txt").write_text(texts[2][:300] + " Mail bob@example.com for more.\n")
    return root, texts


def _expected_documents(cfg, texts_by_key: dict[str, str], split: str) -> list[str]:
    in_val = lambda key: sources.stable_fraction(key) < cfg.val_fraction
    return [t for k, t in texts_by_key.items() if in_val(k) == (split == "val")]


def test_prepare_reports_every_step_and_caches_exact_tokens(planted, tmp_path):
    root, texts = planted
    cfg = corpora.small_config(root, tmp_path / "cache")
    corpus = pipeline.prepare(cfg, verbose=False)
    report = corpus.report
    assert report["documents_in"] == len(texts) + 4
    assert report["removed_by_filter"] == {"too_short": 1}
    assert report["pii_replaced"] == {"email": 1}
    assert (report["exact_duplicates"], report["near_duplicates"]) == (1, 1)
    assert report["documents_out"] == len(texts) + 1
    assert report["source"]["files_taken"] == report["source"]["files_found"] == len(texts) + 4

    kept = {f"docs/doc{i:03d}.txt": t for i, t in enumerate(texts)}
    kept["docs/x_mail.txt"] = texts[2][:300] + " Mail <EMAIL> for more.\n"
    for split in ("train", "val"):
        expected = _expected_documents(cfg, kept, split)
        cached = corpus.split(split)
        assert cached.num_documents == len(expected) == report["splits"][split]["documents"] > 0
        reference = corpus.tokenizer.encode(expected, add_bos=True, add_eos=True)
        assert [cached.document(i).tolist() for i in range(cached.num_documents)] == reference
    val = _expected_documents(cfg, kept, "val")
    val_tokens = sum(len(ids) for ids in corpus.tokenizer.encode(val))
    assert corpus.bytes_per_token == pytest.approx(sum(len(t.encode()) for t in val) / val_tokens)


def test_second_prepare_reuses_the_cache(prepared, monkeypatch):
    monkeypatch.setattr(pipeline, "_build", lambda *args: pytest.fail("rebuilt a cached corpus"))
    start = time.perf_counter()
    again = pipeline.prepare(prepared.config, verbose=False)
    assert time.perf_counter() - start < 1.0
    assert again.directory == prepared.directory and again.report == prepared.report


def test_cache_key_follows_settings_and_files(text_corpus, tmp_path):
    directory, _ = text_corpus
    root = tmp_path / "docs"
    shutil.copytree(directory, root)
    cfg = corpora.small_config(root, tmp_path / "cache")
    key = pipeline.cache_key(cfg)
    cfg.processes = 2  # how the work is done does not change the result
    assert pipeline.cache_key(cfg) == key
    cfg.cleaning.min_chars = 30
    assert pipeline.cache_key(cfg) != key
    cfg.cleaning.min_chars = 20
    (root / "doc000.txt").write_text("changed")
    assert pipeline.cache_key(cfg) != key


def test_worker_processes_produce_the_same_cache(prepared, tmp_path):
    cfg = prepared.config.copy_and_resolve_references()
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.processes = 2
    parallel = pipeline.prepare(cfg, verbose=False)
    assert parallel.directory.name == prepared.directory.name
    for split in ("train", "val"):
        assert np.array_equal(parallel.split(split).tokens, prepared.split(split).tokens)
        assert np.array_equal(parallel.split(split).offsets, prepared.split(split).offsets)


def test_loading_a_tokenizer_instead_of_training(prepared, tmp_path):
    cfg = prepared.config.copy_and_resolve_references()
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.tokenizer.path = str(prepared.directory / "tokenizer.model")
    cfg.tokenizer.vocab_size = 999  # ignored: the loaded model decides
    loaded = pipeline.prepare(cfg, verbose=False)
    assert loaded.report["tokenizer"]["trained_on_bytes"] == 0
    assert np.array_equal(loaded.split("train").tokens, prepared.split("train").tokens)


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "docs").mkdir()
    with pytest.raises(ValueError, match=r"empty corpus: no documents were read \(files: 0 of 0 files"):
        pipeline.prepare(corpora.small_config(tmp_path / "docs", tmp_path / "cache"), verbose=False)


def test_corpus_empty_after_filtering_is_an_error(text_corpus, tmp_path):
    cfg = corpora.small_config(text_corpus[0], tmp_path / "cache")
    cfg.cleaning.min_chars = 10**6
    with pytest.raises(ValueError, match=r"nothing left after cleaning .*{'too_short': 120}"):
        pipeline.prepare(cfg, verbose=False)
    assert not list((tmp_path / "cache").iterdir())  # no half-written cache is left behind


def test_empty_validation_split_is_an_error(tmp_path):
    corpora.write_text_corpus(tmp_path / "docs", num_documents=3)
    cfg = corpora.small_config(tmp_path / "docs", tmp_path / "cache", val_fraction=0.0001)
    with pytest.raises(ValueError, match=r"the val split is empty: 3 documents, val_fraction=0.0001"):
        pipeline.prepare(cfg, verbose=False)


def test_invalid_settings_are_named(tmp_path):
    cfg = pipeline.default_config()
    cfg.source = "web"
    with pytest.raises(ValueError, match=r"source='web'"):
        pipeline.prepare(cfg, verbose=False)
    cfg = pipeline.default_config()
    cfg.tokenizer.model_type = "wordpiece"
    with pytest.raises(ValueError, match=r"tokenizer.model_type='wordpiece'"):
        pipeline.prepare(cfg, verbose=False)


def test_token_dtype_fits_the_vocabulary():
    assert token_cache.token_dtype(65_536) == np.uint16
    assert token_cache.token_dtype(65_537) == np.uint32


def test_invalid_tokenizer_path_is_refused_before_reading(text_corpus, tmp_path):
    not_a_model = tmp_path / "tokenizer.model"
    not_a_model.write_text("not a SentencePiece model")
    for path, reason in ((not_a_model, "not a SentencePiece model file"), (tmp_path / "none.model", "no such file")):
        cfg = corpora.small_config(text_corpus[0], tmp_path / "cache", tokenizer={"path": str(path)})
        with pytest.raises(ValueError, match=rf"^data.tokenizer.path='{path}': {path}: {reason}"):
            pipeline.prepare(cfg, verbose=False)
    assert not (tmp_path / "cache").exists()


def test_sigterm_during_preparation_removes_the_staging_directory(text_corpus, tmp_path, monkeypatch):
    def terminated(cfg, staging):
        assert staging.is_dir()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this

    monkeypatch.setattr(pipeline, "_build_into", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        pipeline.prepare(corpora.small_config(text_corpus[0], tmp_path / "cache"), verbose=False)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert list((tmp_path / "cache").iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is handler


def test_staging_of_a_killed_preparation_is_removed(text_corpus, tmp_path):
    cfg = corpora.small_config(text_corpus[0], tmp_path / "cache")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    abandoned = tmp_path / "cache" / f"{pipeline.cache_key(cfg)}.tmp-{socket.gethostname()}-{ended.pid}"
    (abandoned / "train").mkdir(parents=True)
    other_host = tmp_path / "cache" / f"{pipeline.cache_key(cfg)}.tmp-elsewhere-{ended.pid}"
    other_host.mkdir()
    corpus = pipeline.prepare(cfg, verbose=False)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([corpus.directory.name, other_host.name])


def test_cache_location_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LMX_DATA_CACHE", str(tmp_path / "tokens"))
    assert pipeline.default_config().cache_dir == str(tmp_path / "tokens")
    monkeypatch.delenv("LMX_DATA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pipeline.default_config().cache_dir == str(tmp_path / "xdg" / "lmx" / "data")
