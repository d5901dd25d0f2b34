"""Caption tokenizers: SentencePiece (Kudo & Richardson, 2018) trained on our own captions, CLIP's byte-level
BPE (Radford et al., 2021, section 2.4; BPE of Sennrich et al., 2016 over UTF-8 bytes as in GPT-2), BERT's
uncased WordPiece with BLIP's [DEC]/[ENC] (Li et al., 2022), and GPT-NeoX's byte-level BPE with OpenFlamingo's
added tokens (the language side of the released OpenFlamingo models), whose differences from HF are in their
docstrings.

Every row is [bos] + pieces + [eos], padded (with 0; GPT-NeoX: with OpenFlamingo's <PAD>), and long texts are cut
so that eos is always kept (the text models pool at the eos position either way). `TOKENIZERS` names them for
configs; `tokenizer_from_bytes` rebuilds one from the vocabulary a checkpoint carries.

SentencePieceTokenizer: text is lowercased before encoding, and the model normalises with NFKC + case folding,
so "A Red Circle" and "a red circle" give the same tokens.
LlamaTokenizer: LLaMA's and Vicuna's released tokenizer.model as it is (no lowercasing; unk 0, bos 1, eos 2, padded
with unk's id), the ids of transformers' LlamaTokenizer.

ClipTokenizer gives the ids of open_clip's `SimpleTokenizer` (itself openai/CLIP `simple_tokenizer.py`), checked
on a varied corpus in tests/test_tokenizer.py. Deliberate differences from open_clip:
- the literal strings "<start_of_text>" and "<end_of_text>" in a caption are ordinary text; open_clip turns
  them into the control ids, so a caption could plant an eos before its real end.
- `decode` drops the trailing space and treats only the zeros after the text as padding, because id 0 is
  also the byte "!" and can occur inside a row ("wow!😀" -> [..., 0, ...]).
- the word -> pieces cache is bounded (open_clip's grows with every new word of a web-scale corpus).
- ftfy and regex are optional; ClipTokenizer's docstring lists what changes without them.
"""
import difflib
import gzip
import html
import io
import json
import os
import re
import sys
import unicodedata
from functools import cache
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
import torch

try:  # optional: repairs mojibake and other broken Unicode before tokenising, as CLIP does
    import ftfy
except ImportError:
    ftfy = None
try:  # optional: Unicode property classes (\p{L}, \p{N}); without it `re` gets them spelled out
    import regex
except ImportError:
    regex = None

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
BLIP_TOKENS = ("[DEC]", "[ENC]")  # BLIP's decoder and image-grounded encoder first tokens, after the vocabulary
# Flamingo's media and end-of-chunk tokens, after the vocabulary; user-defined pieces, so text spells them
FLAMINGO_TOKENS = ("<image>", "<|endofchunk|>")


class _VocabularyFile:
    """What every tokenizer here shares: it is defined by one file's bytes (a sentencepiece model, CLIP's
    .txt.gz, BERT's vocab.txt), which it keeps, so that a checkpoint carries them (`model_bytes`,
    `from_bytes`) and a pickled copy (a DataLoader worker's) rebuilds its tables from them alone; each
    subclass's `_load` builds its tables from `self._blob`."""

    DEFAULT_CONTEXT_LENGTH = 77
    WHAT = "vocabulary"  # named when the file is missing

    def __init__(self, path: str | os.PathLike, context_length: int | None = None):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{self.WHAT} '{path}' not found")
        with open(path, "rb") as f:
            blob = f.read()
        self._setup(path, blob, context_length or self.DEFAULT_CONTEXT_LENGTH)

    @classmethod
    def from_bytes(cls, blob: bytes, context_length: int | None = None):
        """Rebuild from `model_bytes()`, e.g. the copy a train.py checkpoint carries."""
        tokenizer = cls.__new__(cls)
        tokenizer._setup("<bytes>", blob, context_length or cls.DEFAULT_CONTEXT_LENGTH)
        return tokenizer

    def model_bytes(self) -> bytes:
        return self._blob

    def _setup(self, model_path: str, blob: bytes, context_length: int) -> None:
        if context_length < 2:
            raise ValueError(f"context_length={context_length} leaves no room for the start and end tokens")
        self.model_path, self._blob, self.context_length = model_path, blob, context_length
        self._load()

    def _rows(self, texts: str | Sequence[str], start_id: int, encode, end_id: int) -> torch.Tensor:
        """(N, context_length): start, the text's ids cut to fit (encode(text, limit)), end, then padding."""
        if isinstance(texts, str):
            texts = [texts]
        keep = self.context_length - 2
        rows = []
        for text in texts:
            row = [start_id, *encode(text, keep), end_id]
            rows.append(row + [self.pad_id] * (self.context_length - len(row)))
        # via numpy: 6x faster than torch.tensor on a list of lists (0.2 s for 80k rows)
        return torch.from_numpy(np.array(rows, dtype=np.int64).reshape(len(rows), self.context_length))

    def __getstate__(self) -> dict:
        # Only the file's bytes: dumping costs nothing in the main process and each worker rebuilds the tables
        # in parallel (CLIP's: 1.4 MB and 0.18 s, against 3.3 MB and 60 + 70 ms to pickle the tables).
        return {"model_path": self.model_path, "_blob": self._blob, "context_length": self.context_length}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._load()


class SentencePieceTokenizer(_VocabularyFile):
    DEFAULT_CONTEXT_LENGTH = 32
    WHAT = "sentencepiece model"

    def _load(self) -> None:
        self._processor = spm.SentencePieceProcessor(model_proto=self._blob)
        if self._processor.pad_id() != PAD_ID or self._processor.bos_id() < 0 or self._processor.eos_id() < 0:
            raise ValueError(f"{self.model_path} needs pad_id=0 and bos/eos pieces (see train_sentencepiece)")
        self.vocab_size = self._processor.get_piece_size()
        self.pad_id = PAD_ID
        self.bos_id = self._processor.bos_id()
        self.eos_id = self._processor.eos_id()
        self.unk_id = self._processor.unk_id()
        # BLIP's decoder and image-grounded-encoder first tokens, when trained with blip_tokens=True; else None
        last = self.vocab_size - 2
        blip = last >= 0 and [self._processor.id_to_piece(i) for i in (last, last + 1)] == list(BLIP_TOKENS)
        self.dec_id, self.enc_id = (last, last + 1) if blip and self._processor.is_control(last) else (None, None)
        # Flamingo's <image> and <|endofchunk|>, when trained with flamingo_tokens=True; else None
        ids = [self._processor.piece_to_id(piece) for piece in FLAMINGO_TOKENS]
        known = all(self._processor.id_to_piece(i) == piece for i, piece in zip(ids, FLAMINGO_TOKENS))
        self.media_id, self.eoc_id = ids if known else (None, None)

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """texts -> LongTensor (N, context_length); long texts are cut so that eos is always kept."""
        if isinstance(texts, str):
            texts = [texts]
        pieces = self._processor.encode([text.lower() for text in texts], out_type=int)
        keep = self.context_length - 2
        rows = []
        for ids in pieces:
            row = [self.bos_id, *ids[:keep], self.eos_id]
            rows.append(row + [self.pad_id] * (self.context_length - len(row)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.context_length)

    def encode(self, text: str) -> list[int]:
        """One text -> its piece ids, without bos, eos, padding or truncation (Flamingo's interleaved sequences)."""
        return self._processor.encode(text.lower(), out_type=int)

    def decode(self, tokens: Sequence[int] | torch.Tensor) -> str:
        """One row of token ids -> text, stopping at the first eos and skipping bos and padding."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._processor.decode([i for i in ids if i not in (self.pad_id, self.bos_id)])


class LlamaTokenizer(SentencePieceTokenizer):
    """LLaMA's and Vicuna's `tokenizer.model` (sentencepiece BPE with byte fallback; unk 0, bos 1, eos 2, no pad),
    as it is: the text is not lowercased (the model keeps case) and ids are the model's own, those of
    transformers' LlamaTokenizer. Padding uses unk's id, as FastChat and LLaVA set `pad_token = unk_token` (padded
    positions are masked, so the id only needs to be a real one). No BLIP or Flamingo tokens."""

    DEFAULT_CONTEXT_LENGTH = 4096  # LLaMA 2's max_position_embeddings

    def _load(self) -> None:
        self._processor = spm.SentencePieceProcessor(model_proto=self._blob)
        if min(self._processor.bos_id(), self._processor.eos_id(), self._processor.unk_id()) < 0:
            raise ValueError(f"{self.model_path}: a LLaMA tokenizer.model has unk, bos and eos pieces; one is missing")
        self.vocab_size = self._processor.get_piece_size()
        self.bos_id, self.eos_id = self._processor.bos_id(), self._processor.eos_id()
        self.unk_id = self.pad_id = self._processor.unk_id()
        self.dec_id = self.enc_id = self.media_id = self.eoc_id = None

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """texts -> LongTensor (N, context_length): bos, pieces, eos, padding; long texts are cut, eos kept."""
        return self._rows(texts, self.bos_id, lambda text, limit: self.encode(text)[:limit], self.eos_id)

    def encode(self, text: str) -> list[int]:
        """One text -> its piece ids, without bos, eos, padding or truncation."""
        return self._processor.encode(text, out_type=int)


CLIP_MERGES = 49152 - 256 - 2  # the merges of bpe_simple_vocab_16e6.txt.gz that CLIP uses (its line 0 is a header)
_CONTRACTIONS = r"'s|'t|'re|'ve|'m|'ll|'d"
# CLIP's split of lowercased ASCII text, where \p{L} is a-z and \p{N} is 0-9: 4x (regex) to 12x (re) faster
_ASCII_SPLIT = re.compile(rf"{_CONTRACTIONS}|[a-z]+|[0-9]|[^\sa-z0-9]+")
_CACHE_SIZE = 100_000  # pre-tokens; ImageNet's 80k zero-shot prompts have 1,275 distinct ones


def byte_symbols() -> list[tuple[int, str]]:
    """GPT-2's reversible map of the 256 byte values to printable characters, as (byte, symbol) in CLIP's id order.

    Printable bytes stand for themselves and come first; the other 68 (controls, space, ...) are shifted to
    U+0100 onwards, so that no piece contains whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return [(byte, chr(byte)) for byte in printable] + [(byte, chr(256 + n)) for n, byte in enumerate(others)]


# Byte-level BPE (CLIP, GPT-2, GPT-NeoX): UTF-8 bytes read as latin-1 -> symbols, and back (str.translate tables;
# printable bytes map to themselves)
_TO_SYMBOLS = {byte: symbol for byte, symbol in byte_symbols() if chr(byte) != symbol}
_FROM_SYMBOLS = {ord(symbol): byte for byte, symbol in _TO_SYMBOLS.items()}


def _symbols(text: str) -> str:
    """Text -> its UTF-8 bytes as byte-level BPE symbols, one character a byte."""
    return text.encode("utf-8").decode("latin-1").translate(_TO_SYMBOLS)


def _merge_pairs(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one pre-token (Sennrich et al., 2016, as GPT-2 applies it): merge the lowest-ranked
    adjacent pair, every occurrence left to right, until no adjacent pair is in `ranks`."""
    unranked = len(ranks)
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda pair: ranks.get(pair, unranked))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def _char_class(chars: Iterable[str]) -> str:
    """Characters -> the body of a regex character class, runs of consecutive code points as ranges."""
    spans: list[list[int]] = []
    for char in chars:
        code = ord(char)
        if spans and spans[-1][1] == code - 1:
            spans[-1][1] = code
        else:
            spans.append([code, code])
    return "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "") for a, b in spans)


@cache
def _stdlib_classes() -> tuple[str, str]:
    """regex's \\p{L} and \\p{N} for `re`: character-class bodies of code point ranges (built once, ~0.5 s).

    Letters are the str.isalpha characters (by definition Unicode category L*), numbers the str.isnumeric ones
    of category N* (which covers all of N*). tests/test_tokenizer.py checks both against `regex` over every
    code point.
    """
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    letters = _char_class(filter(str.isalpha, every))
    numbers = _char_class(c for c in filter(str.isnumeric, every) if unicodedata.category(c).startswith("N"))
    return letters, numbers


def _split_pattern() -> "re.Pattern | regex.Pattern":
    """CLIP's pre-tokenisation: contractions, letter runs, single digits, runs of anything else but spaces.

    open_clip's pattern less its special tokens (see the module docstring), case-insensitive as there. Under
    `re`, IGNORECASE is scoped to copy what `regex` does with it: it matters for the contractions ("'ſ" is 's)
    and for the negated class, which then leaves out U+0345, a combining mark whose uppercase is a letter (so
    both drop it), while on the letter class `re` would count U+0345 as a letter and `regex` does not.
    """
    if regex is not None:
        return regex.compile(rf"{_CONTRACTIONS}|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE)
    letters, numbers = _stdlib_classes()
    return re.compile(rf"(?i:{_CONTRACTIONS})|[{letters}]+|[{numbers}]|(?i:[^\s{letters}{numbers}])+")


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)  # ftfy's last step; decomposed accents then match the vocabulary


class ClipTokenizer(_VocabularyFile):
    """CLIP's byte-level BPE: text -> LongTensor (N, context_length) of [49406] + pieces + [49407] + zeros.

    Text is cleaned as in CLIP (ftfy.fix_text, html.unescape twice, whitespace collapsed, lowercased), split into
    words, numbers (one digit each), contractions and runs of other symbols, and each part is byte-pair encoded.
    `bpe_path` is CLIP's `bpe_simple_vocab_16e6.txt.gz` (open_clip: `open_clip.tokenizer.default_bpe()`); its
    bytes travel with the tokenizer (`model_bytes`, `from_bytes`, pickling), so workers and checkpoints need no
    access to the file.

    `backends` says which optional packages are in use: {"clean": "ftfy" | "nfc", "split": "regex" | "re"}.
    With both installed the ids equal open_clip's. Without them (measured on tests/test_tokenizer.py's corpus):
    - no ftfy: only Unicode NFC normalisation (ftfy's last step) is applied, so mojibake ("cafÃ©" stays, not
      "café"), curly quotes ("don’t" is not the contraction 't), ligatures ("ﬁ", "ǅ"), full-width forms
      ("ＣＬＩＰ"), control and terminal-escape characters, and the third HTML unescape ftfy adds to CLIP's
      two when the text has no "<" ("&amp;amp;amp;" ends as "&amp;", not "&") tokenise differently. Plain
      text, mixed case, accents (decomposed ones too), CJK, emoji, HTML entities and whitespace do not.
    - no regex: no difference on the corpus. Letters and numbers come from Python's Unicode database instead
      of regex's newer one, so only code points unassigned in Python's version split differently (regex
      2026.5.9 against Python 3.11's Unicode 14: 13,916 letters and 133 numbers, none in common use yet).
      Pure-ASCII text never reaches either pattern (see `_ASCII_SPLIT`).
    """

    DEFAULT_CONTEXT_LENGTH = 77
    WHAT = "CLIP BPE vocabulary (open_clip ships it: open_clip.tokenizer.default_bpe())"

    def _load(self) -> None:
        try:
            lines = gzip.decompress(self._blob).decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{self.model_path} is not a gzipped BPE merges file like bpe_simple_vocab_16e6.txt.gz") from error
        merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGES + 1]]
        if len(merges) != CLIP_MERGES or any(len(merge) != 2 for merge in merges):
            raise ValueError(f"{self.model_path} needs {CLIP_MERGES} merges of two symbols after its header line")
        symbols = [symbol for _, symbol in byte_symbols()]
        self._vocab = [*symbols, *(symbol + "</w>" for symbol in symbols), *("".join(merge) for merge in merges)]
        self._ids = {piece: i for i, piece in enumerate(self._vocab)}
        self._ranks = {merge: rank for rank, merge in enumerate(merges)}
        self._cache: dict[str, tuple[int, ...]] = {}
        self.vocab_size = len(self._vocab) + 2  # 49408
        self.pad_id, self.bos_id, self.eos_id = 0, len(self._vocab), len(self._vocab) + 1
        self._fix_text = ftfy.fix_text if ftfy is not None else _nfc
        self._split = _split_pattern()
        self.backends = {"clean": "ftfy" if ftfy else "nfc", "split": "regex" if regex else "re"}

    def _clean(self, text: str) -> str:
        # ftfy (~50 us a call) and html.unescape leave printable ASCII without "&" as it is: skip them there
        if not (text.isascii() and text.isprintable() and "&" not in text):
            text = html.unescape(html.unescape(self._fix_text(text)))
        return " ".join(text.split()).lower()

    def _bpe(self, word: str) -> tuple[int, ...]:
        """One pre-token -> its piece ids; CLIP marks the end of a word on its last symbol."""
        symbols = _symbols(word)
        return tuple(self._ids[part] for part in _merge_pairs([*symbols[:-1], symbols[-1] + "</w>"], self._ranks))

    def _encode(self, text: str, limit: int) -> list[int]:
        """Piece ids of `text`, at most `limit` (the rest would be truncated anyway)."""
        ids: list[int] = []
        text = self._clean(text)
        for word in (_ASCII_SPLIT if text.isascii() else self._split).findall(text):
            pieces = self._cache.get(word)
            if pieces is None:
                if len(self._cache) >= _CACHE_SIZE:
                    self._cache.clear()
                pieces = self._cache[word] = self._bpe(word)
            ids.extend(pieces)
            if len(ids) >= limit:
                break
        return ids[:limit]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """texts -> LongTensor (N, context_length); long texts are cut so that eos is always kept."""
        return self._rows(texts, self.bos_id, self._encode, self.eos_id)

    def decode(self, tokens: Sequence[int] | torch.Tensor) -> str:
        """One row of token ids -> text, stopping at the first eos and skipping bos and padding."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        else:  # trailing zeros are padding; before eos, 0 is the byte "!"
            while ids and ids[-1] == self.pad_id:
                ids.pop()
        pieces = (self._vocab[i] for i in ids if i != self.bos_id)
        symbols = "".join(piece[:-4] + " " if piece.endswith("</w>") else piece for piece in pieces)
        return symbols.translate(_FROM_SYMBOLS).encode("latin-1").decode("utf-8", errors="replace").strip()


# GPT-2's pre-tokenisation, which GPT-NeoX keeps (tokenizers' ByteLevel with use_regex): contractions, then runs of
# letters, of numbers and of other symbols, each with at most one leading space, then whitespace, where a run
# followed by a word leaves its last space to that word. Case-sensitive, unlike CLIP's. Whitespace is spelled
# out as Unicode's White_Space, what tokenizers' Oniguruma and `regex` mean by \s (`re`'s adds U+001C-U+001F).
_WHITE_SPACE = r"\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _byte_level_pattern() -> "re.Pattern | regex.Pattern":
    if regex is not None:
        letters, numbers, compile_pattern = r"\p{L}", r"\p{N}", regex.compile
    else:
        (letters, numbers), compile_pattern = _stdlib_classes(), re.compile
    space = _WHITE_SPACE
    return compile_pattern(rf"{_CONTRACTIONS}| ?[{letters}]+| ?[{numbers}]+| ?[^{space}{letters}{numbers}]+"
                           rf"|[{space}]+(?![^{space}])|[{space}]+")


_BYTE_SYMBOLS = frozenset(symbol for _, symbol in byte_symbols())


def _token_bytes(token: str) -> bytes:
    """What a vocabulary entry decodes to: the bytes its symbols stand for; an added token with other characters
    (GPT-NeoX's runs of spaces) is its own UTF-8, as tokenizers' ByteLevel decoder does."""
    if all(char in _BYTE_SYMBOLS for char in token):
        return token.translate(_FROM_SYMBOLS).encode("latin-1")
    return token.encode("utf-8")


class GPTNeoXTokenizer(_VocabularyFile):
    """GPT-NeoX-20B's byte-level BPE (Black et al., 2022), the tokenizer of MPT and so of OpenFlamingo-3B and -9B,
    read from a HuggingFace `tokenizer.json` without the tokenizers library, plus OpenFlamingo's added tokens.

    Gives the ids of transformers' `PreTrainedTokenizerFast(tokenizer_file=...)` after OpenFlamingo's
    `add_special_tokens` (tests/test_gpt_neox_tokenizer.py, on a tokenizer.json configured like GPT-NeoX's). The
    steps are tokenizers': added tokens are cut out of the text first (leftmost, the longest at a position; those
    marked `normalized`, GPT-NeoX's runs of 2 to 24 spaces, from the NFC-normalised text), each stretch between
    them is NFC-normalised, split by GPT-2's pattern (`_byte_level_pattern`), and each part is byte-pair encoded
    over its UTF-8 bytes with the file's merges (`_merge_pairs`, shared with ClipTokenizer).

    OpenFlamingo's factory (`open_flamingo/src/factory.py`) adds `<|endofchunk|>` and `<image>` as special tokens,
    then `<PAD>` as the pad token since GPT-NeoX's tokenizer has none: after GPT-NeoX-20B's 50,277 ids they are
    50277 (`eoc_id`), 50278 (`media_id`) and 50279 (`pad_id`), and `vocab_size` is 50280, the rows of
    OpenFlamingo-3B's token embedding. A tokenizer.json that already holds them keeps their ids. `<|endoftext|>`
    is `bos_id` and `eos_id`: rows are [bos] + pieces + [eos] + [PAD]s as the other tokenizers' rows are
    (OpenFlamingo's prompts themselves start without it).

    Unlike the other tokenizers here, an added token written in a text ("<image>", "<|endoftext|>") becomes its
    id, as in HF: that is how an OpenFlamingo prompt places its images. Deliberate differences from HF:
    - `decode` drops every special token (as HF's `skip_special_tokens=True`) and does not stop at eos; HF's
      `clean_up_tokenization_spaces` is not applied (" ." stays " .");
    - letters, numbers and NFC come from Python's Unicode tables (regex's when installed), tokenizers' from its
      own: only code points unassigned in Python 3.11's Unicode 14 split differently (4,657 with regex 2026.5.9
      against tokenizers 0.23.3, checked over every code point; NFC agrees on all).
    Only the tokenizer.json options GPT-NeoX's file uses are implemented; a file that sets another (a normalizer
    other than NFC, add_prefix_space, BPE dropout, an added token's lstrip, ...) is refused, naming it.
    """

    DEFAULT_CONTEXT_LENGTH = 2048  # MPT's max_seq_len
    WHAT = "tokenizer.json (EleutherAI/gpt-neox-20b's; anas-awadalla/mpt-1b-redpajama-200b holds a copy)"
    OPEN_FLAMINGO_TOKENS = ("<|endofchunk|>", "<image>", "<PAD>")  # in the order the factory adds them

    def _load(self) -> None:
        try:
            spec = json.loads(self._blob)
            model = spec["model"]
            vocab, merges = model["vocab"], model["merges"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{self.model_path} is not a HuggingFace tokenizer.json with a BPE model") from error
        self._refuse_unsupported(spec)
        merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in merges]
        self._ranks = {merge: rank for rank, merge in enumerate(merges)}
        missing = [symbol for symbol in sorted(_BYTE_SYMBOLS) if symbol not in vocab]
        missing += ["".join(merge) for merge in merges if "".join(merge) not in vocab]
        if missing:
            raise ValueError(f"{self.model_path}: byte-level BPE needs every byte and every merge's result in the "
                             f"vocabulary; missing {missing[:5]}")
        added = {token["content"]: token for token in spec.get("added_tokens") or []}
        next_id = max([*vocab.values(), *(token["id"] for token in added.values())]) + 1
        for content in self.OPEN_FLAMINGO_TOKENS:
            if content not in added:
                added[content] = {"id": next_id, "content": content, "special": True, "normalized": False}
                next_id += 1
        self._ids = vocab
        self._vocab = [""] * next_id  # id -> entry
        for piece, i in vocab.items():
            self._vocab[i] = piece
        for token in added.values():
            self._vocab[token["id"]] = token["content"]
        self._bytes = [_token_bytes(piece) for piece in self._vocab]
        self._special = {token["id"] for token in added.values() if token.get("special")}
        self._nfc = bool(spec.get("normalizer"))
        # added tokens as they are matched: as written, or NFC-normalised when `normalized` (tokenizers' two tries)
        raw = {token["content"]: token["id"] for token in added.values() if not token.get("normalized")}
        normalized = {self._normalize(token["content"]): token["id"] for token in added.values()
                      if token.get("normalized")}
        self._added = [(self._alternation(tokens), tokens) for tokens in (raw, normalized)]
        if "<|endoftext|>" not in added:
            raise ValueError(f"{self.model_path}: no <|endoftext|> added token (GPT-NeoX's bos and eos)")
        self.bos_id = self.eos_id = added["<|endoftext|>"]["id"]
        self.eoc_id, self.media_id, self.pad_id = (added[content]["id"] for content in self.OPEN_FLAMINGO_TOKENS)
        self.vocab_size = next_id
        self._split = _byte_level_pattern()
        self._cache: dict[str, tuple[int, ...]] = {}

    def _refuse_unsupported(self, spec: dict) -> None:
        model, normalizer, pre_tokenizer = spec["model"], spec.get("normalizer"), spec.get("pre_tokenizer") or {}
        unsupported = {
            "model.type": model.get("type", "BPE") != "BPE",
            "model.dropout": bool(model.get("dropout")),
            "model.continuing_subword_prefix": bool(model.get("continuing_subword_prefix")),
            "model.end_of_word_suffix": bool(model.get("end_of_word_suffix")),
            "model.byte_fallback": bool(model.get("byte_fallback")),
            "model.ignore_merges": bool(model.get("ignore_merges")),
            "normalizer": normalizer is not None and normalizer.get("type") != "NFC",
            "pre_tokenizer": pre_tokenizer.get("type") != "ByteLevel",
            "pre_tokenizer.add_prefix_space": bool(pre_tokenizer.get("add_prefix_space")),
            "pre_tokenizer.use_regex": not pre_tokenizer.get("use_regex", True),
        }
        for token in spec.get("added_tokens") or []:
            for option in ("lstrip", "rstrip", "single_word"):
                unsupported[f"added token {token['content']!r} {option}"] = bool(token.get(option))
        refused = [name for name, is_set in unsupported.items() if is_set]
        if refused:
            raise ValueError(f"{self.model_path}: {', '.join(refused)} not implemented (GPT-NeoX's tokenizer.json "
                             f"does not use them)")

    def _normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self._nfc else text

    @staticmethod
    def _alternation(tokens: dict[str, int]) -> "re.Pattern | None":
        # longest first: at the leftmost position where any matches, the longest (tokenizers' LeftmostLongest)
        ordered = sorted(tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @staticmethod
    def _cut(text: str, pattern: "re.Pattern | None", tokens: dict[str, int]) -> Iterator[tuple[str, int | None]]:
        """Text -> (stretch, None) between added tokens and (token, its id) for each added token, in order."""
        start = 0
        for match in pattern.finditer(text) if pattern is not None else ():
            if match.start() > start:
                yield text[start : match.start()], None
            yield match.group(), tokens[match.group()]
            start = match.end()
        if start < len(text):
            yield text[start:], None

    def _bpe(self, word: str) -> tuple[int, ...]:
        pieces = self._cache.get(word)
        if pieces is None:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            pieces = self._cache[word] = tuple(self._ids[part] for part in _merge_pairs([*_symbols(word)], self._ranks))
        return pieces

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of `text` without bos, eos or padding, at most `limit` of them."""
        (raw_pattern, raw), (normalized_pattern, normalized) = self._added
        ids: list[int] = []
        for stretch, token_id in self._cut(text, raw_pattern, raw):
            if token_id is not None:
                ids.append(token_id)
                continue
            for part, token_id in self._cut(self._normalize(stretch), normalized_pattern, normalized):
                if token_id is not None:
                    ids.append(token_id)
                    continue
                for word in self._split.findall(part):
                    ids.extend(self._bpe(word))
            if limit is not None and len(ids) >= limit:
                break
        return ids[:limit]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """texts -> LongTensor (N, context_length) of [bos] + pieces + [eos] + [PAD]s, eos always kept."""
        return self._rows(texts, self.bos_id, self.encode, self.eos_id)

    def decode(self, tokens: Sequence[int] | torch.Tensor) -> str:
        """Token ids -> text, special tokens (bos, eos, <image>, <|endofchunk|>, <PAD>) left out."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return b"".join(self._bytes[i] for i in ids if i not in self._special).decode("utf-8", errors="replace")


# tokenizers' BertNormalizer and BertPreTokenizer classify characters with the unicode_categories crate, whose
# tables are Unicode 8.0: what they call control (removed), non-spacing mark (removed after NFD) and punctuation
# (split off) is frozen here as ranges of code points, so that the ids do not move with Python's own Unicode
# version. tests/test_bert_tokenizer.py checks all three against tokenizers over every code point.
_BERT_CONTROL = """
0-8 B-C E-1F 7F-9F AD 600-605 61C 6DD 70F 180E 200B-200F 202A-202E 2060-2064 2066-206F E000-F8FF
FEFF FFF9-FFFB FFFD 110BD 1BCA0-1BCA3 1D173-1D17A E0001 E0020-E007F F0000-FFFFD 100000-10FFFD
"""  # Cc, Cf, Co of Unicode 8.0 (not Cn) less tab, newline and return, plus U+FFFD
_BERT_PUNCTUATION = """
21-2F 3A-40 5B-60 7B-7E A1 A7 AB B6-B7 BB BF 37E 387 55A-55F 589-58A 5BE 5C0 5C3 5C6 5F3-5F4 609-60A 60C-60D
61B 61E-61F 66A-66D 6D4 700-70D 7F7-7F9 830-83E 85E 964-965 970 AF0 DF4 E4F E5A-E5B F04-F12 F14 F3A-F3D F85
FD0-FD4 FD9-FDA 104A-104F 10FB 1360-1368 1400 166D-166E 169B-169C 16EB-16ED 1735-1736 17D4-17D6 17D8-17DA
1800-180A 1944-1945 1A1E-1A1F 1AA0-1AA6 1AA8-1AAD 1B5A-1B60 1BFC-1BFF 1C3B-1C3F 1C7E-1C7F 1CC0-1CC7 1CD3
2010-2027 2030-2043 2045-2051 2053-205E 207D-207E 208D-208E 2308-230B 2329-232A 2768-2775 27C5-27C6 27E6-27EF
2983-2998 29D8-29DB 29FC-29FD 2CF9-2CFC 2CFE-2CFF 2D70 2E00-2E2E 2E30-2E42 3001-3003 3008-3011 3014-301F 3030
303D 30A0 30FB A4FE-A4FF A60D-A60F A673 A67E A6F2-A6F7 A874-A877 A8CE-A8CF A8F8-A8FA A8FC A92E-A92F A95F
A9C1-A9CD A9DE-A9DF AA5C-AA5F AADE-AADF AAF0-AAF1 ABEB FD3E-FD3F FE10-FE19 FE30-FE52 FE54-FE61 FE63 FE68
FE6A-FE6B FF01-FF03 FF05-FF0A FF0C-FF0F FF1A-FF1B FF1F-FF20 FF3B-FF3D FF3F FF5B FF5D FF5F-FF65 10100-10102
1039F 103D0 1056F 10857 1091F 1093F 10A50-10A58 10A7F 10AF0-10AF6 10B39-10B3F 10B99-10B9C 11047-1104D
110BB-110BC 110BE-110C1 11140-11143 11174-11175 111C5-111C9 111CD 111DB 111DD-111DF 11238-1123D 112A9 114C6
115C1-115D7 11641-11643 1173C-1173E 12470-12474 16A6E-16A6F 16AF5 16B37-16B3B 16B44 1BC9F 1DA87-1DA8B
"""  # ASCII's symbols (HF counts "$", "+", "^", "`", ... as punctuation) and P* of Unicode 8.0
_BERT_MARKS = """
300-36F 483-487 591-5BD 5BF 5C1-5C2 5C4-5C5 5C7 610-61A 64B-65F 670 6D6-6DC 6DF-6E4 6E7-6E8 6EA-6ED 711 730-74A
7A6-7B0 7EB-7F3 816-819 81B-823 825-827 829-82D 859-85B 8E3-902 93A 93C 941-948 94D 951-957 962-963 981 9BC 9C1-9C4
9CD 9E2-9E3 A01-A02 A3C A41-A42 A47-A48 A4B-A4D A51 A70-A71 A75 A81-A82 ABC AC1-AC5 AC7-AC8 ACD AE2-AE3 B01 B3C B3F
B41-B44 B4D B56 B62-B63 B82 BC0 BCD C00 C3E-C40 C46-C48 C4A-C4D C55-C56 C62-C63 C81 CBC CBF CC6 CCC-CCD CE2-CE3 D01
D41-D44 D4D D62-D63 DCA DD2-DD4 DD6 E31 E34-E3A E47-E4E EB1 EB4-EB9 EBB-EBC EC8-ECD F18-F19 F35 F37 F39 F71-F7E
F80-F84 F86-F87 F8D-F97 F99-FBC FC6 102D-1030 1032-1037 1039-103A 103D-103E 1058-1059 105E-1060 1071-1074 1082
1085-1086 108D 109D 135D-135F 1712-1714 1732-1734 1752-1753 1772-1773 17B4-17B5 17B7-17BD 17C6 17C9-17D3 17DD
180B-180D 18A9 1920-1922 1927-1928 1932 1939-193B 1A17-1A18 1A1B 1A56 1A58-1A5E 1A60 1A62 1A65-1A6C 1A73-1A7C 1A7F
1AB0-1ABD 1B00-1B03 1B34 1B36-1B3A 1B3C 1B42 1B6B-1B73 1B80-1B81 1BA2-1BA5 1BA8-1BA9 1BAB-1BAD 1BE6 1BE8-1BE9 1BED
1BEF-1BF1 1C2C-1C33 1C36-1C37 1CD0-1CD2 1CD4-1CE0 1CE2-1CE8 1CED 1CF4 1CF8-1CF9 1DC0-1DF5 1DFC-1DFF 20D0-20DC 20E1
20E5-20F0 2CEF-2CF1 2D7F 2DE0-2DFF 302A-302D 3099-309A A66F A674-A67D A69E-A69F A6F0-A6F1 A802 A806 A80B A825-A826
A8C4 A8E0-A8F1 A926-A92D A947-A951 A980-A982 A9B3 A9B6-A9B9 A9BC A9E5 AA29-AA2E AA31-AA32 AA35-AA36 AA43 AA4C AA7C
AAB0 AAB2-AAB4 AAB7-AAB8 AABE-AABF AAC1 AAEC-AAED AAF6 ABE5 ABE8 ABED FB1E FE00-FE0F FE20-FE2F 101FD 102E0
10376-1037A 10A01-10A03 10A05-10A06 10A0C-10A0F 10A38-10A3A 10A3F 10AE5-10AE6 11001 11038-11046 1107F-11081
110B3-110B6 110B9-110BA 11100-11102 11127-1112B 1112D-11134 11173 11180-11181 111B6-111BE 111CA-111CC 1122F-11231
11234 11236-11237 112DF 112E3-112EA 11300-11301 1133C 11340 11366-1136C 11370-11374 114B3-114B8 114BA 114BF-114C0
114C2-114C3 115B2-115B5 115BC-115BD 115BF-115C0 115DC-115DD 11633-1163A 1163D 1163F-11640 116AB 116AD 116B0-116B5
116B7 1171D-1171F 11722-11725 11727-1172B 16AF0-16AF4 16B30-16B36 16F8F-16F92 1BC9D-1BC9E 1D167-1D169 1D17B-1D182
1D185-1D18B 1D1AA-1D1AD 1D242-1D244 1DA00-1DA36 1DA3B-1DA6C 1DA75 1DA84 1DA9B-1DA9F 1DAA1-1DAAF 1E8D0-1E8D6
E0100-E01EF
"""  # Mn of Unicode 8.0 (Mc U+1734 was Mn then)
# CJK ideographs get spaces around them; tokenizers' ranges, whose 2B920 is 2B820 in HF's Python BasicTokenizer
_BERT_CJK = "3400-4DBF 4E00-9FFF F900-FAFF 20000-2A6DF 2A700-2B81F 2B920-2CEAF 2F800-2FA1F"


def _ranges_class(ranges: str) -> str:
    """'21-2F 3A' -> the body of a regex character class for those code point ranges (hex)."""
    spans = (span.split("-") for span in ranges.split())
    chars = ([re.escape(chr(int(end, 16))) for end in span] for span in spans)
    return "".join("-".join(ends) for ends in chars)


_BERT_CLEAN = re.compile(f"[{_ranges_class(_BERT_CONTROL)}]")
_BERT_CJK_CHAR = re.compile(f"[{_ranges_class(_BERT_CJK)}]")
_BERT_MARK = re.compile(f"[{_ranges_class(_BERT_MARKS)}]")
_BERT_SPLIT = re.compile(rf"[{_ranges_class(_BERT_PUNCTUATION)}]|[^\s{_ranges_class(_BERT_PUNCTUATION)}]+")
# the same for ASCII text, where the control characters are 0-8, B, C, E-1F and 7F, and every symbol is punctuation
_BERT_ASCII_CLEAN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BERT_ASCII_SPLIT = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")
BERT_MAX_WORD = 100  # longer words are one [UNK] (HF's max_input_chars_per_word)
_BERT_CLEANUP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]  # HF's clean_up_tokenization, in its order


class BertTokenizer(_VocabularyFile):
    """BERT's uncased WordPiece (Devlin et al., 2019; Wu et al., 2016) with BLIP's two added tokens.

    Gives the ids of HuggingFace `transformers.BertTokenizer(vocab_file, do_lower_case=True)` (tokenizers'
    BertNormalizer, BertPreTokenizer and WordPiece), checked in tests/test_bert_tokenizer.py on a varied
    corpus and per code point. Steps: drop control characters, map whitespace to spaces, put spaces around
    CJK ideographs, strip accents (NFD, drop Mn), lowercase one character at a time, split on whitespace and
    punctuation, then greedy longest-match-first WordPiece with "##" continuations; a word over 100
    characters or with no spelling in the vocabulary is one [UNK].

    Rows are [CLS] + pieces + [SEP] + [PAD]s; long texts are cut so that [SEP] is kept last. BLIP's
    `init_tokenizer` adds `[DEC]` (its bos, the decoder's first token) and `[ENC]` (the image-grounded
    encoder's first token) after the vocabulary: `bos_id` = len(vocab), `enc_id` = len(vocab) + 1, so
    bert-base-uncased's 30522 entries become `vocab_size` 30524 with ids 30522 and 30523. The default
    context_length is 35, BLIP's max_length for retrieval texts (its pretraining pads captions to 30).

    Deliberate differences from HF:
    - literal "[CLS]", "[SEP]", "[MASK]", ... in a text are ordinary text (HF turns them into the special ids,
      so a caption could plant a [SEP]); as in ClipTokenizer.
    - `decode` stops at the first [SEP] (as the other tokenizers here stop at eos); HF only drops special ids.
    - characters assigned after Python's Unicode version (14.0 for 3.11) are letters here; tokenizers
      decomposes and lowercases them with Rust's newer tables. And one character Python's NFD decomposes,
      tokenizers' does not (U+11938, Dives Akuru). Nothing else differs, over every code point.
    HF's pure-Python `BertTokenizerLegacy` (transformers 4's slow BertTokenizer, which BLIP used) differs
    from both on a few rare inputs: it lowercases whole words (a final "Σ" becomes "ς", not "σ"), drops
    unassigned code points, reads Python's Unicode tables, and puts its CJK range at 2B820.
    """

    DEFAULT_CONTEXT_LENGTH = 35  # BLIP's text length for retrieval (30 for pretraining captions)
    WHAT = "BERT vocabulary (bert-base-uncased's vocab.txt, one piece a line)"

    def _load(self) -> None:
        try:
            lines = self._blob.decode("utf-8").split("\n")
        except UnicodeDecodeError as error:
            raise ValueError(f"{self.model_path} is not a UTF-8 vocab.txt") from error
        if lines and lines[-1] == "":
            lines.pop()  # the newline that ends the last line
        # as HF's load_vocab: the id is the line number, and a repeated line maps to its last occurrence
        self._vocab = [*lines, *BLIP_TOKENS]
        self._ids = {piece: i for i, piece in enumerate(lines)}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in self._ids]
        if missing or any(token in self._ids for token in BLIP_TOKENS):
            raise ValueError(f"{self.model_path}: a BERT vocabulary needs {', '.join(missing) or 'its special tokens'}"
                             f" and no [DEC] or [ENC] (BLIP appends those)")
        self.pad_id, self.unk_id, self.cls_id = self._ids["[PAD]"], self._ids["[UNK]"], self._ids["[CLS]"]
        self.sep_id, self.mask_id = self._ids["[SEP]"], self._ids["[MASK]"]
        self.bos_id, self.enc_id = len(lines), len(lines) + 1
        self.dec_id = self.bos_id  # the name SentencePieceTokenizer(blip_tokens) uses too
        self.eos_id = self.sep_id  # BLIP's decoder stops at [SEP]
        self.vocab_size = len(lines) + 2
        self._special = {self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id, self.bos_id, self.enc_id}
        # a piece is tried from the longest a vocabulary entry can match, not from the word's full length
        self._longest = max((len(p) - 2 if p.startswith("##") else len(p) for p in lines), default=1)
        self._cache: dict[str, tuple[int, ...]] = {}

    @staticmethod
    def words(text: str) -> list[str]:
        """HF's normalisation and pre-tokenisation: text -> lowercased, accent-free words and punctuation marks."""
        if text.isascii():  # no CJK, accents or non-ASCII whitespace: 10x faster
            return _BERT_ASCII_SPLIT.findall(_BERT_ASCII_CLEAN.sub("", text).lower())
        text = _BERT_CJK_CHAR.sub(r" \g<0> ", _BERT_CLEAN.sub("", text))
        text = _BERT_MARK.sub("", unicodedata.normalize("NFD", text))
        # one character at a time, as tokenizers does: str.lower on a whole word turns a final "Σ" into "ς"
        text = "".join(map(str.lower, text)) if "\u03a3" in text else text.lower()
        return _BERT_SPLIT.findall(text)

    def _wordpiece(self, word: str) -> tuple[int, ...]:
        """One word -> its pieces, greedy longest match first; (unk,) if any part has no piece."""
        if len(word) > BERT_MAX_WORD:
            return (self.unk_id,)
        ids, start = [], 0
        while start < len(word):
            for end in range(min(len(word), start + self._longest), start, -1):
                piece = self._ids.get(word[start:end] if start == 0 else "##" + word[start:end])
                if piece is not None:
                    break
            else:
                return (self.unk_id,)
            ids.append(piece)
            start = end
        return tuple(ids)

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Piece ids of `text` without [CLS]/[SEP], at most `limit` of them."""
        ids: list[int] = []
        for word in self.words(text):
            pieces = self._cache.get(word)
            if pieces is None:
                if len(self._cache) >= _CACHE_SIZE:
                    self._cache.clear()
                pieces = self._cache[word] = self._wordpiece(word)
            ids.extend(pieces)
            if limit is not None and len(ids) >= limit:
                return ids[:limit]
        return ids

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """texts -> LongTensor (N, context_length) of [CLS] + pieces + [SEP] + [PAD]s, [SEP] always kept."""
        return self._rows(texts, self.cls_id, self.encode, self.sep_id)

    def decode(self, tokens: Sequence[int] | torch.Tensor) -> str:
        """One row of ids -> text, up to the first [SEP] and without special ids (as HF's decode with
        skip_special_tokens=True, clean_up_tokenization_spaces=True): "a dog ' s toy ." -> "a dog's toy."."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if self.sep_id in ids:
            ids = ids[: ids.index(self.sep_id)]
        text = " ".join(self._vocab[i] for i in ids if i not in self._special).replace(" ##", "").strip()
        for spaced, joined in _BERT_CLEANUP:
            text = text.replace(spaced, joined)
        return text


TOKENIZERS = {"sentencepiece": SentencePieceTokenizer, "clip": ClipTokenizer, "bert": BertTokenizer}


def tokenizer_from_bytes(
        kind: str, blob: bytes, context_length: int) -> "SentencePieceTokenizer | ClipTokenizer | BertTokenizer":
    """A `TOKENIZERS[kind]` rebuilt from its `model_bytes()`, e.g. from a checkpoint's copy."""
    if kind not in TOKENIZERS:
        close = difflib.get_close_matches(kind, TOKENIZERS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"unknown tokenizer '{kind}'; {hint}known: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind].from_bytes(blob, context_length=context_length)


def train_sentencepiece(texts: Iterable[str], model_prefix_or_path: str, vocab_size: int = 1024,
                        blip_tokens: bool = False, flamingo_tokens: bool = False) -> str:
    """Train a BPE model on `texts` (lowercased) and write it to `<prefix>.model`; returns that path.

    `vocab_size` is an upper bound: a small corpus (the shapes captions have ~60 words) yields fewer
    pieces rather than an error. BPE, not unigram: on such a corpus unigram pruning stops at ~80
    pieces and spells "yellow" in four. One thread and no input sampling keep the result deterministic.

    blip_tokens=True appends BLIP's [DEC] and [ENC] as control pieces after the trained vocabulary, where
    BLIP adds them to BERT's (`dec_id`, `enc_id` of the tokenizer): every other id and every encoding stay
    those of the same training without them, and no text can produce them.
    """
    path = str(model_prefix_or_path)
    if not path.endswith(".model"):
        path += ".model"
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(text.lower() for text in texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc_cf",
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=1,
        minloglevel=2,  # errors only
    )
    blob = model.getvalue()
    if blip_tokens or flamingo_tokens:
        from sentencepiece import sentencepiece_model_pb2  # needs protobuf, only here

        proto = sentencepiece_model_pb2.ModelProto.FromString(blob)
        piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
        for name in BLIP_TOKENS if blip_tokens else ():
            proto.pieces.add(piece=name, score=0.0, type=piece_type.CONTROL)
        for name in FLAMINGO_TOKENS if flamingo_tokens else ():
            proto.pieces.add(piece=name, score=0.0, type=piece_type.USER_DEFINED)
        blob = proto.SerializeToString()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(blob)
    return path


def main(argv: list[str] | None = None) -> str:
    """`python -m crossmodal.data.tokenizer train --data SPEC --vocab-size N --out FILE`: a sentencepiece model trained on
    the captions of any dataset spec (read without decoding images), for `data.tokenizer_path`."""
    import argparse

    from crossmodal.config import load_config
    from crossmodal.data import captions

    parser = argparse.ArgumentParser(prog="python -m crossmodal.data.tokenizer", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a sentencepiece BPE model on a dataset's captions",
                                epilog="Extra --data.KEY=VALUE arguments set data options (e.g. --data.image_root).")
    train.add_argument("--data", required=True, help="dataset spec, e.g. csv:pairs.csv or wds:shards/{0000..0099}.tar")
    train.add_argument("--vocab-size", type=int, default=1024, help="upper bound on the number of pieces")
    train.add_argument("--out", required=True, help="output file (.model is appended if missing)")
    train.add_argument("--limit", type=int, default=None, help="train on at most this many captions")
    train.add_argument("--blip-tokens", action="store_true", help="append BLIP's [DEC] and [ENC] control pieces")
    args, overrides = parser.parse_known_args(argv)
    options = load_config(None, overrides).data

    count = 0

    def counted(texts: Iterable[str]) -> Iterable[str]:
        nonlocal count
        for text in texts:
            count += 1
            yield text

    try:
        path = train_sentencepiece(counted(captions(args.data, args.limit, options)), args.out, args.vocab_size,
                                   args.blip_tokens)
    except (FileNotFoundError, ValueError) as error:  # a spec that points at nothing, named by the dataset
        sys.exit(f"python -m crossmodal.data.tokenizer train: {error}")
    except RuntimeError as error:  # sentencepiece's own message, e.g. an empty corpus
        sys.exit(f"python -m crossmodal.data.tokenizer train: training on {args.data} failed after {count} captions: {error}")
    vocab = SentencePieceTokenizer(path).vocab_size
    print(f"trained a {vocab}-piece sentencepiece model on {count} captions of {args.data}: {path}")
    return path


if __name__ == "__main__":
    main()
