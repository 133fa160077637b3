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
    return tokenizer.train(tokenizer.training_sample(texts, 10**6, seed=0), cfg)


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


def test_training_sample_respects_the_byte_budget():
    texts = ["x" * 1000] * 50
    sample = tokenizer.training_sample(texts, sample_bytes=4500, seed=0)
    assert sum(map(len, sample)) == 5000  # whole documents until the budget is reached
