import pytest

from data import cleaning, pipeline, sources

STDLIB_JSON_FRACTION = 0.7113556837456754


def _files_config(*paths, **overrides):
    cfg = pipeline.default_config()
    cfg.source = "files"
    cfg.paths = [str(p) for p in paths]
    cfg.max_bytes = 0
    cfg.update(overrides)
    return cfg


def test_text_files_one_document_per_file_or_per_paragraph(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\n  \nsecond\n\n\nthird")
    (tmp_path / "b.md").write_text("whole file")
    documents, report = sources.read_documents(_files_config(tmp_path))
    # Keys are relative to the directory holding the entry, so they are the same on every machine.
    assert [(d.key, d.text) for d in documents] == [
        (f"{tmp_path.name}/a.txt", "first paragraph\nstill first\n\n  \nsecond\n\n\nthird"),
        (f"{tmp_path.name}/b.md", "whole file"),
    ]
    assert (report.files_found, report.files_taken) == (2, 2)
    documents, _ = sources.read_documents(_files_config(tmp_path / "a.txt", text_unit="paragraph"))
    assert [d.text for d in documents] == ["first paragraph\nstill first", "second", "third"]
    assert [d.key for d in documents] == ["a.txt#0", "a.txt#1", "a.txt#2"]
    (tmp_path / "crlf.txt").write_bytes(b"first\r\nline two\r\n\r\nsecond\r\n")  # no "\r" left at a break
    documents, _ = sources.read_documents(_files_config(tmp_path / "crlf.txt", text_unit="paragraph"))
    assert [cleaning.normalize(d.text, "") for d in documents] == ["first\nline two", "second"]


def test_jsonl_reads_the_configured_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "one", "id": 1}\n\n{"body": "two"}\n')
    documents, _ = sources.read_documents(_files_config(path, text_field="body"))
    assert [(d.key, d.text) for d in documents] == [("d.jsonl:1", "one"), ("d.jsonl:3", "two")]


def test_a_lone_surrogate_in_jsonl_becomes_a_replacement_character(tmp_path):
    """JSON may escape half an emoji; the text must still encode as UTF-8 for cleaning."""
    from data import cleaning

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "cut here \\ud83d and on"}\n')
    (document,), _ = sources.read_documents(_files_config(path))
    assert document.text == "cut here \ufffd and on"
    assert cleaning.clean(document.text, pipeline.default_config().cleaning).text is None  # too short, not an error


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', '{"text": "broken"'], r"d.jsonl:2: invalid JSON"),
        (['{"text": "ok"}', "", '{"body": "x"}'], r"d.jsonl:3: no field 'text' \(found: body\); set text_field"),
        (['{"text": 5}'], r"d.jsonl:1: field 'text' is int, not a string"),
        (["[1, 2]"], r"d.jsonl:1: no field 'text' \(found: list\)"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, lines, message):
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=message):
        sources.read_documents(_files_config(tmp_path / "d.jsonl"))


def test_parquet_column_and_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha", "beta"], "n": [1, 2]}), tmp_path / "t.parquet")
    documents, _ = sources.read_documents(_files_config(tmp_path / "t.parquet", text_field="content"))
    assert [(d.key, d.text) for d in documents] == [("t.parquet[0]", "alpha"), ("t.parquet[1]", "beta")]
    with pytest.raises(ValueError, match=r"t.parquet: no column 'text' \(found: content, n\)"):
        sources.read_documents(_files_config(tmp_path / "t.parquet"))


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 and \xff\xfe end, a real \xef\xbf\xbd stays")
    (tmp_path / "good.txt").write_text("fine")
    documents, report = sources.read_documents(_files_config(tmp_path))
    assert documents[0].text == "caf\ufffd and \ufffd\ufffd end, a real \ufffd stays"
    assert report.undecodable_files == [str(tmp_path / "bad.txt")]
    assert report.replaced_byte_sequences == 3


def test_globs_limits_and_missing_paths(tmp_path):
    for name in ("a.txt", "b.txt", "c.log"):
        (tmp_path / name).write_text("x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("y")
    documents, report = sources.read_documents(_files_config(tmp_path / "**" / "*.txt"))
    assert [d.key for d in documents] == ["a.txt", "b.txt", "sub/d.txt"]
    documents, report = sources.read_documents(_files_config(tmp_path, max_bytes=250))
    assert (report.files_taken, report.bytes_taken, report.files_found, report.bytes_found) == (2, 200, 4, 301)
    assert "2 of 4 files, 200 of 301 bytes (limit max_bytes=250)" in report.summary()
    with pytest.raises(ValueError, match=r"paths entry '.*nothing\*' matched no file"):
        sources.read_documents(_files_config(tmp_path / "nothing*"))


def test_a_file_two_entries_match_has_one_key_whatever_their_order(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "sub" / "a.txt").write_text("a")
    (tmp_path / "corpus" / "b.txt").write_text("b")
    outer, inner = tmp_path / "corpus", f"{tmp_path}/corpus/sub/*.txt"
    keyed = lambda *paths: sorted(d.key for d in sources.read_documents(_files_config(*paths))[0])
    # Keyed from the higher directory, as the outer entry alone keys it.
    assert keyed(outer, inner) == keyed(inner, outer) == keyed(outer) == ["corpus/b.txt", "corpus/sub/a.txt"]


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["first", "second"], "label": [0, 1]}).save_to_disk(tmp_path / "ds")
    cfg = _files_config(source="hf", paths=[str(tmp_path / "ds")])
    documents, report = sources.read_documents(cfg)
    assert [d.text for d in documents] == ["first", "second"]
    assert report.bytes_taken == len("firstsecond")
    cfg.text_field = "body"
    with pytest.raises(ValueError, match=r"ds: no column 'body' \(found: text, label\)"):
        sources.read_documents(cfg)


def test_builtin_corpus_lists_python_sources_with_stable_keys_and_states_its_limit():
    cfg = pipeline.default_config()
    files = sources.list_files(cfg)
    keys = [f.key for f in files]
    assert any(k.startswith("stdlib/json/") for k in keys)
    assert any(k.startswith("site-packages/numpy/") for k in keys)
    assert all(k.endswith(".py") and not k.startswith("/") for k in keys)
    assert len(set(keys)) == len(keys)
    fractions = [sources.stable_fraction(k, purpose="order") for k in keys]
    assert fractions == sorted(fractions)

    cfg.max_bytes = 300_000
    documents, report = sources.read_documents(cfg)
    assert 0 < report.bytes_taken <= 300_000 < report.bytes_found
    assert report.files_taken == len(documents) < report.files_found == len(files)
    assert [d.key for d in documents] == keys[: len(documents)]
    assert "(limit max_bytes=300,000)" in report.summary()


def test_stable_fraction_is_a_fixed_function_of_the_key():
    # Regression values: the split must not change between machines or Python processes.
    assert sources.stable_fraction("stdlib/json/__init__.py") == pytest.approx(STDLIB_JSON_FRACTION)
    assert 0 <= sources.stable_fraction("") < 1
    assert sources.stable_fraction("a", purpose="order") != sources.stable_fraction("a")


def test_a_directory_that_holds_no_saved_dataset_is_named(tmp_path):
    with pytest.raises(ValueError, match=rf"^{tmp_path}: .*neither a `Dataset` directory"):
        sources.load_hf_dataset(str(tmp_path), "train")
