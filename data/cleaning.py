"""Document cleaning: Unicode normalization, PII scrubbing and heuristic quality filters.

The filters follow the Gopher rules (Rae et al. 2021, appendix A): length bounds, symbol-to-word
ratio, duplicate lines, and the share of text covered by the most frequent n-gram and by
repeated n-grams; and a floor on the fraction of alphabetic characters among the non-whitespace
ones (Gopher's rule counts the words that hold a letter instead). Every threshold is a config value
(`pipeline.default_config().cleaning`); a document is removed by the first filter it fails, and
that filter's name is what the report counts.
"""

import collections
import dataclasses
import ipaddress
import re
import unicodedata

import numpy as np

from data import words

# ASCII word boundaries, as for the addresses below: an address touching CJK text (no space
# between, as is usual there) is still found.
EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b", re.ASCII
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\w)", re.ASCII)
# A run of hex digits, colons and dots holding at least three colons (fewer would match slices
# such as `a[1::2]` in code); `ipaddress` then decides whether it is an IPv6 address, in any of
# its forms: full, "::" at either end or inside, an IPv4 tail.
IPV6 = re.compile(r"(?<![\w:.])(?=(?:[0-9A-Fa-f.]*:){3})[0-9A-Fa-f:.]*[0-9A-Fa-f:](?![\w:])", re.ASCII)
# North-American style with separators or a parenthesized area code, and international numbers
# written with a leading "+"; bare digit runs are left alone (they are mostly not phone numbers).
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[.-])\d{3}[.-]\d{4}(?![\w-])"
    r"|(?<![\w+])\+\d{1,3}(?:[ .-]\d{1,4}){2,5}(?![\w-])",
    re.ASCII,  # ASCII digits only: _candidate_lines looks for ASCII digits
)
PLACEHOLDERS = {"email": "<EMAIL>", "ip_address": "<IP_ADDRESS>", "phone_number": "<PHONE_NUMBER>"}
_ASCII_ALPHABETIC = np.array([chr(c).isalpha() for c in range(128)])
_ASCII_WHITESPACE = np.array([chr(c).isspace() for c in range(128)])


@dataclasses.dataclass
class CleanedDocument:
    text: str | None  # None when removed
    removed_by: str | None
    pii_replaced: collections.Counter
    word_hashes: np.ndarray  # of the cleaned text, for the dedup shingles


def normalize(text: str, form: str) -> str:
    """Unicode normal form `form` ('' keeps the text) and Unix line endings."""
    text = text.replace("\r\n", "\n")
    return unicodedata.normalize(form, text) if form else text


def _is_digit(data: np.ndarray) -> np.ndarray:
    return (data - np.uint8(48)) < 10  # uint8 arithmetic wraps, so bytes below "0" fail too


def _is_hex_digit(data: np.ndarray) -> np.ndarray:
    return _is_digit(data) | (((data | np.uint8(0x20)) - np.uint8(97)) < 6)


def _candidate_lines(text: str) -> dict[re.Pattern, np.ndarray]:
    """For each PII pattern, the indices of the lines holding a byte sequence its matches contain.

    numpy finds these sequences about a hundred times faster than Python's `re` scans a whole
    document, so each pattern runs only on the few lines where it can match.
    """
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    newlines = np.flatnonzero(data == ord("\n"))
    digit = _is_digit(data)
    dot_or_dash = (data == ord(".")) | (data == ord("-"))

    def lines_with(mask):
        return np.unique(np.searchsorted(newlines, np.flatnonzero(mask)))

    def followed_by_digits(mask, count):
        for offset in range(1, count + 1):
            mask = mask[:-1] & digit[offset + 1 :]
        return mask

    digit_dot_digit = np.flatnonzero(digit[:-2] & (data[1:-1] == ord(".")) & digit[2:])
    # An IPv4 address holds three "d.d" within 8 bytes.
    ipv4 = digit_dot_digit[2:][digit_dot_digit[2:] - digit_dot_digit[:-2] <= 8]
    hex_colon = _is_hex_digit(data[:-2]) & (data[1:-1] == ord(":"))
    return {
        EMAIL: lines_with(data == ord("@")),
        IPV6: lines_with(hex_colon & (_is_hex_digit(data[2:]) | (data[2:] == ord(":")))),
        IPV4: np.unique(np.searchsorted(newlines, ipv4)),
        # "+d" starts an international number; the other forms end in "d-dddd" or "d.dddd".
        PHONE: np.union1d(
            lines_with((data[:-1] == ord("+")) & digit[1:]),
            lines_with(followed_by_digits(digit[:-1] & dot_or_dash[1:], 4)),
        ),
    }


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def scrub_pii(text: str) -> tuple[str, collections.Counter]:
    """Replaces e-mail addresses, IP addresses and phone numbers by placeholders."""
    counts = collections.Counter()
    kinds = {EMAIL: "email", IPV6: "ip_address", IPV4: "ip_address", PHONE: "phone_number"}

    def replace(kind):
        def substitute(match):
            if kind == "phone_number" and not 7 <= sum(c.isdigit() for c in match[0]) <= 15:
                return match[0]
            if match.re is IPV6 and not _is_ipv6(match[0]):
                return match[0]
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        return substitute

    lines = None
    # Dict order: IPv6 runs before IPv4, so an IPv4 tail of an IPv6 address is not matched alone.
    for pattern, indices in _candidate_lines(text).items():
        if indices.size == 0:
            continue
        lines = text.split("\n") if lines is None else lines
        # The patterns never match across a newline, so the candidate lines are scrubbed together.
        scrubbed = pattern.sub(replace(kinds[pattern]), "\n".join(lines[i] for i in indices))
        for index, line in zip(indices.tolist(), scrubbed.split("\n")):
            lines[index] = line
    return (text if lines is None else "\n".join(lines)), counts


def _character_counts(text: str) -> tuple[int, int]:
    """(alphabetic, non-whitespace) character counts, by code point histogram."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ascii_counts = np.bincount(code_points[code_points < 128], minlength=128)
    alphabetic = int(ascii_counts[_ASCII_ALPHABETIC].sum())
    whitespace = int(ascii_counts[_ASCII_WHITESPACE].sum())
    others, other_counts = np.unique(code_points[code_points >= 128], return_counts=True)
    for code_point, count in zip(others.tolist(), other_counts.tolist()):
        character = chr(code_point)
        alphabetic += count * character.isalpha()
        whitespace += count * character.isspace()
    return alphabetic, code_points.size - whitespace


def alpha_fraction(text: str) -> float:
    """Alphabetic characters over non-whitespace characters."""
    alphabetic, non_whitespace = _character_counts(text)
    return alphabetic / max(non_whitespace, 1)


def symbol_word_ratio(text: str, num_words: int) -> float:
    """Hash signs per word or ellipses per word, whichever is larger (Gopher: each <= 0.1)."""
    ellipses = text.count("...") + text.count("\u2026")
    return max(text.count("#"), ellipses) / max(num_words, 1)


def duplicate_line_fraction(text: str) -> float:
    """Share of non-blank lines that repeat an earlier line (compared without surrounding space)."""
    lines = [line for line in map(str.strip, text.split("\n")) if line]
    return (len(lines) - len(set(lines))) / max(len(lines), 1)


def top_ngram_fraction(hashes: np.ndarray, lengths: np.ndarray, n: int) -> float:
    """Share of word characters covered by the most frequent word n-gram, counting each occurrence."""
    ngrams = words.hash_ngrams(hashes, n)
    if ngrams.size == 0:
        return 0.0
    _, first, counts = np.unique(ngrams, return_index=True, return_counts=True)
    if counts.max() < 2:
        return 0.0
    # Of the n-grams tied for most frequent, the first in the text (as datatrove's Gopher filter
    # picks it), not the one whose hash sorts first.
    start = first[counts == counts.max()].min()
    return float(counts.max() * lengths[start : start + n].sum() / lengths.sum())


def duplicate_ngram_fraction(hashes: np.ndarray, lengths: np.ndarray, n: int) -> float:
    """Share of word characters inside some n-gram that occurs more than once, its first occurrence
    included: stricter than Gopher's rule as datatrove implements it, which counts only the
    repeats after the first (a passage said twice scores about twice as high here)."""
    ngrams = words.hash_ngrams(hashes, n)
    if ngrams.size == 0:
        return 0.0
    _, inverse, counts = np.unique(ngrams, return_inverse=True, return_counts=True)
    repeated_start = (counts[inverse] > 1).astype(np.int64)
    # Word i is covered when one of the n-grams starting at i-n+1..i repeats.
    covering = np.convolve(repeated_start, np.ones(n, dtype=np.int64))[: hashes.size]
    return float(lengths[covering > 0].sum() / lengths.sum())


def quality_filter(text: str, hashes: np.ndarray, lengths: np.ndarray, cfg) -> str | None:
    """Name of the first filter that `text` fails, or None when it passes all of them.

    `hashes` and `lengths` are words.hash_words(text).
    """
    if len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars and len(text) > cfg.max_chars:
        return "too_long"
    if alpha_fraction(text) < cfg.min_alpha_fraction:
        return "low_alpha_fraction"
    if symbol_word_ratio(text, hashes.size) > cfg.max_symbol_word_ratio:
        return "high_symbol_word_ratio"
    if duplicate_line_fraction(text) > cfg.max_duplicate_line_fraction:
        return "duplicate_lines"
    for n, limit in cfg.max_top_ngram_fraction:
        if top_ngram_fraction(hashes, lengths, n) > limit:
            return f"top_{n}gram"
    for n, limit in cfg.max_duplicate_ngram_fraction:
        if duplicate_ngram_fraction(hashes, lengths, n) > limit:
            return f"duplicate_{n}grams"
    return None


def clean(text: str, cfg) -> CleanedDocument:
    """Normalizes and scrubs `text`, then applies the quality filters to the result."""
    text = normalize(text, cfg.normalization)
    pii = collections.Counter()
    if cfg.scrub_pii:
        text, pii = scrub_pii(text)
    hashes, lengths = words.hash_words(text)
    removed_by = quality_filter(text, hashes, lengths, cfg)
    return CleanedDocument(None if removed_by else text, removed_by, pii, hashes)
