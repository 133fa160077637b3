import pytest

from data import prepare
from tests.data import corpora


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """(directory, texts) of 120 prose documents."""
    root = tmp_path_factory.mktemp("text_corpus")
    texts = corpora.write_text_corpus(root / "docs")
    return root / "docs", texts


@pytest.fixture(scope="session")
def prepared(text_corpus, tmp_path_factory):
    """The text corpus prepared once for the loader tests."""
    directory, _ = text_corpus
    cfg = corpora.small_config(directory, tmp_path_factory.mktemp("cache"))
    return prepare.run(cfg)
