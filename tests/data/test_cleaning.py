import pytest

from data import cleaning, pipeline, words

PROSE = (
    "The committee met on Tuesday to review the proposal for the new library. Members agreed "
    "that the reading room needs more light, and that the children's section should move "
    "closer to the entrance. A final decision will follow after the budget hearing in spring."
)


@pytest.fixture
def cfg():
    cfg = pipeline.default_config().cleaning
    cfg.min_chars = 100
    cfg.max_chars = 2000
    cfg.min_alpha_fraction = 0.6
    cfg.max_symbol_word_ratio = 0.1
    cfg.max_duplicate_line_fraction = 0.3
    cfg.max_top_ngram_fraction = ((2, 0.20), (3, 0.18), (4, 0.16))
    cfg.max_duplicate_ngram_fraction = ((5, 0.15), (10, 0.10))
    return cfg


def test_clean_prose_passes_unchanged(cfg):
    cleaned = cleaning.clean(PROSE, cfg)
    assert cleaned.text == PROSE and cleaned.removed_by is None


@pytest.mark.parametrize(
    "text, removed_by",
    [
        ("Too short to keep.", "too_short"),
        (PROSE * 8, "too_long"),
        ("Prices: " + " ".join(f"{i}.{i:02d} {i * 7 % 100}" for i in range(40)), "low_alpha_fraction"),
        ("\n".join(f"# note {w} here" for w in PROSE.split()[:30]), "high_symbol_word_ratio"),
        (PROSE + "\n" + "\n".join(["Click here to subscribe!"] * 6), "duplicate_lines"),
        (PROSE + " " + "buy now " * 30, "top_2gram"),
        (PROSE + " " + " ".join(PROSE.split()[10:30]), "duplicate_5grams"),
    ],
)
def test_each_filter_removes_its_document(cfg, text, removed_by):
    cleaned = cleaning.clean(text, cfg)
    assert cleaned.removed_by == removed_by and cleaned.text is None


def test_filters_apply_in_order_and_first_failure_is_named(cfg):
    # Both too short and low in letters: the length filter comes first.
    assert cleaning.clean("1 2 3 4 5", cfg).removed_by == "too_short"


def test_alpha_fraction_counts_letters_over_non_space():
    assert cleaning.alpha_fraction("ab 12") == 0.5
    assert cleaning.alpha_fraction("héllo wörld") == 1.0
    assert cleaning.alpha_fraction("日本 語!") == 0.75


def test_symbol_word_ratio_counts_hashes_and_ellipses_each_on_its_own():
    assert cleaning.symbol_word_ratio("# a b ... c \u2026 d", num_words=8) == 2 / 8  # two ellipses
    assert cleaning.symbol_word_ratio("# # # a ... b", num_words=6) == 3 / 6  # three hashes


def test_duplicate_line_fraction_ignores_blank_lines_and_indentation():
    assert cleaning.duplicate_line_fraction("a\n  b\n\n\na\n a \nc") == 2 / 5


def test_top_ngram_fraction_matches_hand_count():
    hashes, lengths = words.hash_words("a b a b c")
    # "a b" occurs twice, 2 characters each time, out of 5 word characters.
    assert cleaning.top_ngram_fraction(hashes, lengths, 2) == pytest.approx(4 / 5)
    hashes, lengths = words.hash_words("a b c d e")
    assert cleaning.top_ngram_fraction(hashes, lengths, 2) == 0.0
    # Two bigrams occur twice each: the first in the text counts, whatever their hashes.
    for short in ("a b", "c d", "e f", "g h"):
        hashes, lengths = words.hash_words(f"{short} x {short} y longword otherword z longword otherword")
        assert cleaning.top_ngram_fraction(hashes, lengths, 2) == pytest.approx(2 * 2 / 41)
        hashes, lengths = words.hash_words(f"longword otherword z longword otherword {short} x {short} y")
        assert cleaning.top_ngram_fraction(hashes, lengths, 2) == pytest.approx(2 * 17 / 41)


def test_repetition_fractions_count_characters_not_bytes():
    hashes, lengths = words.hash_words("déjà vu déjà vu été")
    # "déjà vu" twice: 2 x 6 of the 15 word characters (16 of 21 UTF-8 bytes would be 0.76).
    assert cleaning.top_ngram_fraction(hashes, lengths, 2) == pytest.approx(12 / 15)
    assert cleaning.duplicate_ngram_fraction(hashes, lengths, 2) == pytest.approx(12 / 15)


def test_duplicate_ngram_fraction_matches_hand_count():
    hashes, lengths = words.hash_words("xx y z xx y z w")
    # "xx y z" repeats: it covers the first six words (8 of 9 word characters).
    assert cleaning.duplicate_ngram_fraction(hashes, lengths, 3) == pytest.approx(8 / 9)
    assert cleaning.duplicate_ngram_fraction(hashes, lengths, 4) == 0.0


def test_hash_words_is_stable_and_splits_on_whitespace():
    hashes, lengths = words.hash_words(" déjà\tvu\n vu ")
    assert lengths.tolist() == [4, 2, 2]  # characters
    assert hashes[1] == hashes[2] != hashes[0]
    assert words.hash_words("vu")[0][0] == hashes[1]


def test_pii_is_replaced_by_placeholders():
    text = (
        "Write to jane.doe+lists@mail.example.org or ops@example.com.\n"
        "Servers: 192.168.1.20, 10.0.0.1 and 2001:db8:85a3::8a2e:370:7334.\n"
        "Call (555) 123-4567, 555-987-6543 or +44 20 7946 0958 today."
    )
    scrubbed, counts = cleaning.scrub_pii(text)
    assert scrubbed == (
        "Write to <EMAIL> or <EMAIL>.\n"
        "Servers: <IP_ADDRESS>, <IP_ADDRESS> and <IP_ADDRESS>.\n"
        "Call <PHONE_NUMBER>, <PHONE_NUMBER> or <PHONE_NUMBER> today."
    )
    assert counts == {"email": 2, "ip_address": 3, "phone_number": 3}
    # CJK text touches an address with no space between; ASCII boundaries still find it.
    assert cleaning.scrub_pii("请发邮件至admin@example.com获取帮助")[0] == "请发邮件至<EMAIL>获取帮助"


@pytest.mark.parametrize("address", [
    "2001:db8:85a3::8a2e:370:7334", "2001:0db8:0000:0000:0000:ff00:0042:8329", "2001:db8:85a3::",
    "64:ff9b::192.0.2.33", "2001:0db8:0000:0000:0000:ff00:192.0.2.1", "::ffff:192.0.2.1",
])
def test_every_ipv6_form_is_scrubbed_whole(address):
    assert cleaning.scrub_pii(f"host {address}/48 and {address}.") == ("host <IP_ADDRESS>/48 and <IP_ADDRESS>.", {"ip_address": 2})


def test_pii_scrubbing_keeps_look_alikes():
    text = (
        "version 3.11.7, on 2024-01-15, x = a[1::2] + 3.14159, id 1234567890, @decorator, 1.2.3.4.5, "
        "at 12:30:45, mac 00:1a:2b:3c:4d:5e, a[1:2:3:4], std::vector"
    )
    assert cleaning.scrub_pii(text) == (text, {})


def test_normalization_composes_characters_and_line_endings(cfg):
    assert cleaning.normalize("Cafe\u0301\r\nbar", "NFC") == "Caf\u00e9\nbar"
    assert cleaning.normalize("Cafe\u0301", "") == "Cafe\u0301"
