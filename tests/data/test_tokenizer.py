import pytest

from data import pipeline, tokenizer
from tests.data import corpora

TRICKY = [
    "",
    " ",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows line ends\n\n\n",
    "def f(x):\n    return x ** 2  # comment\n",
    "\u2581 SentencePiece's own space symbol \u2581\u2581",
    "never seen: 日本語のテキスト, Ελληνικά, עברית, हिन्दी, 😀🚀, \U0001d11e",
    "control \x00\x07\x1b characters and \ufeff BOM, zero\u200bwidth",
    "decomposed e\u0301 stays decomposed",
    "<s></s><pad><unk> look like special tokens",
]


@pytest.fixture(scope="module")
def trained():
    import random

    rng = random.Random(0)
    vocabulary = corpora.vocabulary(rng)
    texts = [corpora.prose(rng, 200, vocabulary) for _ in range(100)]
    cfg = pipeline.default_config().tokenizer
    cfg.vocab_size = 400
    return tokenizer.train(tokenizer.training_pieces(texts), cfg)


def test_round_trip_is_lossless_on_arbitrary_unicode(trained):
    ids = trained.encode(TRICKY)
    assert trained.decode(ids) == TRICKY
    assert all(0 <= i < trained.vocab_size for row in ids for i in row)


def test_special_ids_and_bos_eos(trained):
    assert (trained.pad_id, trained.bos_id, trained.eos_id) == (0, 2, 3)
    assert trained.vocab_size == 400
    plain = trained.encode(["hello"])[0]
    assert trained.encode(["hello"], add_bos=True, add_eos=True)[0] == [2, *plain, 3]
    assert trained.decode([[2, *plain, 3, 0, 0]]) == ["hello"]


def test_encode_arrays_matches_encode(trained):
    arrays = trained.encode_arrays(TRICKY, add_bos=True, add_eos=True)
    assert [a.tolist() for a in arrays] == trained.encode(TRICKY, add_bos=True, add_eos=True)


def test_save_and_load_give_the_same_tokenizer(trained, tmp_path):
    trained.save(tmp_path / "t.model")
    loaded = tokenizer.Tokenizer.load(tmp_path / "t.model")
    assert loaded.encode(TRICKY) == trained.encode(TRICKY)


def test_vocabulary_larger_than_the_corpus_supports_is_a_clear_error():
    cfg = pipeline.default_config().tokenizer
    cfg.vocab_size = 5000
    with pytest.raises(ValueError, match=r"tokenizer.vocab_size=5000 .*lower tokenizer.vocab_size"):
        tokenizer.train(["a tiny corpus with few distinct pieces"] * 10, cfg)


def test_training_pieces_cut_documents_without_losing_text():
    texts = ["x" * 5000, "short"]
    pieces = tokenizer.training_pieces(texts)
    assert [len(p) for p in pieces] == [4096, 904, 5] and "".join(pieces) == "".join(texts)


def test_tokenizer_sample_takes_training_documents_in_hash_order_until_the_budget(tmp_path):
    from datatrove.data import Document

    from data import sources, steps

    layout = steps.Layout(tmp_path)
    documents = [Document(text="y" * (100 + 37 * i), id=f"k{i}") for i in range(60)]
    steps.SampleForTokenizer(layout, val_fraction=0.2, sample_bytes=2000).run(iter(documents), rank=3)
    sample = [row["key"] for row in steps._rows(layout.data("tokenizer_sample") / "00003.jsonl")]
    # Independently: training documents sorted by their hash, whole, until 2000 bytes are reached.
    train = [d for d in documents if sources.stable_fraction(d.id) >= 0.2]
    expected, taken = [], 0
    for d in sorted(train, key=lambda d: sources.stable_fraction(d.id, purpose="tokenizer")):
        if taken >= 2000:
            break
        expected.append(d.id)
        taken += len(d.text)
    assert sample == expected
