"""SentencePiece tokenizer: trained on a sample of the corpus, lossless on any Unicode text.

Ids 0-3 are PAD, UNK, BOS, EOS (PAD differs from EOS so that padding can be masked without
hiding the end of a document). Byte fallback, the identity normalization and no dummy prefix make
decode(encode(text)) == text for every string, including characters never seen in training; the
one character SentencePiece cannot represent as itself, its space symbol U+2581, is encoded as
its three UTF-8 byte pieces.
"""

import io

import numpy as np
import sentencepiece as spm
from etils import epath

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_SPACE_SYMBOL = "\u2581"
# SentencePiece trains on "sentences" of at most max_sentence_length bytes; documents are cut
# into pieces of this many characters (at most 4 bytes each) so none is skipped.
_TRAINING_PIECE_CHARS = 4096


class Tokenizer:
    """Batch encode/decode around a SentencePiece model proto."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._processor = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def load(cls, path: epath.PathLike) -> "Tokenizer":
        path = epath.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (a SentencePiece model was expected)")
        try:
            return cls(path.read_bytes())
        except RuntimeError:  # sentencepiece's parse error names neither the file nor the cause
            raise ValueError(f"{path}: not a SentencePiece model file") from None

    def save(self, path: epath.PathLike) -> None:
        epath.Path(path).write_bytes(self.model_proto)

    @property
    def vocab_size(self) -> int:
        return self._processor.vocab_size()

    @property
    def pad_id(self) -> int:
        return self._processor.pad_id()

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    def encode(self, texts: list[str], add_bos=False, add_eos=False) -> list[list[int]]:
        return [ids.tolist() for ids in self.encode_arrays(texts, add_bos, add_eos)]

    def encode_arrays(self, texts: list[str], add_bos=False, add_eos=False) -> list[np.ndarray]:
        """Like encode, as int32 arrays: no Python int per token, the fast path.

        One thread: SentencePiece's batch threads gave no speedup here; use processes instead.
        """
        arrays = self._processor.encode(
            texts, add_bos=add_bos, add_eos=add_eos, out_type="numpy", num_threads=1
        )
        for i, text in enumerate(texts):
            if _SPACE_SYMBOL in text:
                arrays[i] = self._encode_with_space_symbol(text, add_bos, add_eos)
        return arrays

    def _encode_with_space_symbol(self, text: str, add_bos: bool, add_eos: bool) -> np.ndarray:
        symbol = [self._processor.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_SYMBOL.encode("utf-8")]
        parts = self._processor.encode(text.split(_SPACE_SYMBOL), out_type="numpy")
        pieces = [[self.bos_id]] * add_bos + [parts[0]]
        for part in parts[1:]:
            pieces += [symbol, part]
        pieces += [[self.eos_id]] * add_eos
        return np.concatenate(pieces).astype(np.int32)

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Texts of the id lists; PAD, BOS and EOS decode to nothing."""
        return self._processor.decode([[int(i) for i in row] for row in ids])


def training_pieces(texts: list[str]) -> list[str]:
    """The documents cut into pieces SentencePiece trains on whole."""
    return [text[start : start + _TRAINING_PIECE_CHARS] for text in texts
            for start in range(0, len(text), _TRAINING_PIECE_CHARS)]


def train(pieces: list[str], cfg, num_threads: int = 1) -> Tokenizer:
    """Trains on `pieces` (see training_pieces) as cfg (pipeline.default_config().tokenizer) says."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(pieces),
            model_writer=model,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=cfg.split_digits,
            max_sentence_length=4 * _TRAINING_PIECE_CHARS,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as error:
        sample_bytes = sum(len(p.encode("utf-8")) for p in pieces)
        raise ValueError(
            f"training a {cfg.model_type} tokenizer with tokenizer.vocab_size={cfg.vocab_size} on "
            f"{sample_bytes:,} bytes failed: {error}. If the vocabulary is too large for the "
            "corpus, lower tokenizer.vocab_size or raise tokenizer.sample_bytes."
        ) from error
    return Tokenizer(model.getvalue())
