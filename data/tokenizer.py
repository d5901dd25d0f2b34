"""Caption tokenizers: SentencePiece (Kudo & Richardson, 2018) trained on our own captions, and CLIP's byte-level
BPE (Radford et al., 2021, section 2.4; BPE of Sennrich et al., 2016 over UTF-8 bytes as in GPT-2).

Every row is [bos] + pieces + [eos], padded with 0, and long texts are cut so that eos is always kept (the text
models pool at the eos position either way). `TOKENIZERS` names both for configs; `tokenizer_from_bytes`
rebuilds one from the vocabulary a checkpoint carries.

SentencePieceTokenizer: text is lowercased before encoding, and the model normalises with NFKC + case folding,
so "A Red Circle" and "a red circle" give the same tokens.

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
import os
import re
import sys
import unicodedata
from functools import cache
from typing import Iterable, Sequence

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


class SentencePieceTokenizer:
    def __init__(self, model_path: str, context_length: int = 32):
        if context_length < 2:
            raise ValueError(f"context_length={context_length} leaves no room for bos and eos")
        self.model_path = str(model_path)
        self.context_length = context_length
        with open(model_path, "rb") as f:
            self._model_proto = f.read()  # kept so a pickled copy needs no access to the file
        self._load()

    @classmethod
    def from_bytes(cls, model_proto: bytes, context_length: int = 32) -> "SentencePieceTokenizer":
        """Rebuild from `model_bytes()`, e.g. the copy a train.py checkpoint carries."""
        tokenizer = cls.__new__(cls)
        tokenizer.model_path, tokenizer.context_length, tokenizer._model_proto = "<bytes>", context_length, model_proto
        tokenizer._load()
        return tokenizer

    def model_bytes(self) -> bytes:
        return self._model_proto

    def _load(self) -> None:
        self._processor = spm.SentencePieceProcessor(model_proto=self._model_proto)
        if self._processor.pad_id() != PAD_ID or self._processor.bos_id() < 0 or self._processor.eos_id() < 0:
            raise ValueError(f"{self.model_path} needs pad_id=0 and bos/eos pieces (see train_sentencepiece)")
        self.vocab_size = self._processor.get_piece_size()
        self.pad_id = PAD_ID
        self.bos_id = self._processor.bos_id()
        self.eos_id = self._processor.eos_id()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_processor"]  # a SWIG object; rebuilt from the model bytes
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._load()

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

    def decode(self, tokens: Sequence[int] | torch.Tensor) -> str:
        """One row of token ids -> text, stopping at the first eos and skipping bos and padding."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._processor.decode([i for i in ids if i not in (self.pad_id, self.bos_id)])


CLIP_MERGES = 49152 - 256 - 2  # the merges of bpe_simple_vocab_16e6.txt.gz that CLIP uses (its line 0 is a header)
_CONTRACTIONS = r"'s|'t|'re|'ve|'m|'ll|'d"
# CLIP's split of lowercased ASCII text, where \p{L} is a-z and \p{N} is 0-9: 4x (regex) to 12x (re) faster
_ASCII_SPLIT = re.compile(rf"{_CONTRACTIONS}|[a-z]+|[0-9]|[^\sa-z0-9]+")
_CACHE_SIZE = 100_000  # pre-tokens; ImageNet's 80k zero-shot prompts have 1,275 distinct ones


def _byte_symbols() -> list[tuple[int, str]]:
    """GPT-2's reversible map of the 256 byte values to printable characters, as (byte, symbol) in CLIP's id order.

    Printable bytes stand for themselves and come first; the other 68 (controls, space, ...) are shifted to
    U+0100 onwards, so that no piece contains whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return [(byte, chr(byte)) for byte in printable] + [(byte, chr(256 + n)) for n, byte in enumerate(others)]


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


class ClipTokenizer:
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

    def __init__(self, bpe_path: str | os.PathLike, context_length: int = 77):
        path = os.fspath(bpe_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"CLIP BPE vocabulary '{path}' not found; open_clip ships it: open_clip.tokenizer.default_bpe()")
        with open(path, "rb") as f:
            bpe_gz = f.read()
        self._setup(path, bpe_gz, context_length)

    @classmethod
    def from_bytes(cls, bpe_gz: bytes, context_length: int = 77) -> "ClipTokenizer":
        """Rebuild from `model_bytes()`, e.g. the copy a train.py checkpoint carries."""
        tokenizer = cls.__new__(cls)
        tokenizer._setup("<bytes>", bpe_gz, context_length)
        return tokenizer

    def model_bytes(self) -> bytes:
        return self._bpe_gz

    def _setup(self, model_path: str, bpe_gz: bytes, context_length: int) -> None:
        if context_length < 2:
            raise ValueError(f"context_length={context_length} leaves no room for bos and eos")
        self.model_path, self._bpe_gz, self.context_length = model_path, bpe_gz, context_length
        self._load()

    def _load(self) -> None:
        try:
            lines = gzip.decompress(self._bpe_gz).decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{self.model_path} is not a gzipped BPE merges file like bpe_simple_vocab_16e6.txt.gz") from error
        merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGES + 1]]
        if len(merges) != CLIP_MERGES or any(len(merge) != 2 for merge in merges):
            raise ValueError(f"{self.model_path} needs {CLIP_MERGES} merges of two symbols after its header line")
        byte_symbols = _byte_symbols()
        symbols = [symbol for _, symbol in byte_symbols]
        self._vocab = [*symbols, *(symbol + "</w>" for symbol in symbols), *("".join(merge) for merge in merges)]
        self._ids = {piece: i for i, piece in enumerate(self._vocab)}
        self._ranks = {merge: rank for rank, merge in enumerate(merges)}
        # UTF-8 bytes read as latin-1 -> symbols, and back; printable bytes map to themselves
        self._to_symbols = {byte: symbol for byte, symbol in byte_symbols if chr(byte) != symbol}
        self._from_symbols = {ord(symbol): byte for byte, symbol in self._to_symbols.items()}
        self._cache: dict[str, tuple[int, ...]] = {}
        self.vocab_size = len(self._vocab) + 2  # 49408
        self.pad_id, self.bos_id, self.eos_id = 0, len(self._vocab), len(self._vocab) + 1
        self._fix_text = ftfy.fix_text if ftfy is not None else _nfc
        self._split = _split_pattern()
        self.backends = {"clean": "ftfy" if ftfy else "nfc", "split": "regex" if regex else "re"}

    def __getstate__(self) -> dict:
        # Only the 1.4 MB .gz: dumping costs nothing in the main process and each worker rebuilds the tables in
        # 0.18 s, in parallel. Pickling the tables instead is 3.3 MB, 60 ms per worker to dump, 70 ms to load.
        return {"model_path": self.model_path, "_bpe_gz": self._bpe_gz, "context_length": self.context_length}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._load()

    def _clean(self, text: str) -> str:
        # ftfy (~50 us a call) and html.unescape leave printable ASCII without "&" as it is: skip them there
        if not (text.isascii() and text.isprintable() and "&" not in text):
            text = html.unescape(html.unescape(self._fix_text(text)))
        return " ".join(text.split()).lower()

    def _bpe(self, word: str) -> tuple[int, ...]:
        """One pre-token -> its piece ids, merging the lowest-ranked adjacent pair until none is in the table."""
        symbols = word.encode("utf-8").decode("latin-1").translate(self._to_symbols)
        parts = [*symbols[:-1], symbols[-1] + "</w>"]
        ranks = self._ranks
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda pair: ranks.get(pair, CLIP_MERGES))
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(parts):  # every occurrence, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self._ids[part] for part in parts)

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
        if isinstance(texts, str):
            texts = [texts]
        keep = self.context_length - 2
        rows = []
        for text in texts:
            row = [self.bos_id, *self._encode(text, keep), self.eos_id]
            rows.append(row + [self.pad_id] * (self.context_length - len(row)))
        # via numpy: 6x faster than torch.tensor on a list of lists (0.2 s for 80k rows)
        return torch.from_numpy(np.array(rows, dtype=np.int64).reshape(len(rows), self.context_length))

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
        return symbols.translate(self._from_symbols).encode("latin-1").decode("utf-8", errors="replace").strip()


TOKENIZERS = {"sentencepiece": SentencePieceTokenizer, "clip": ClipTokenizer}


def tokenizer_from_bytes(kind: str, blob: bytes, context_length: int) -> SentencePieceTokenizer | ClipTokenizer:
    """A `TOKENIZERS[kind]` rebuilt from its `model_bytes()`, e.g. from a checkpoint's copy."""
    if kind not in TOKENIZERS:
        close = difflib.get_close_matches(kind, TOKENIZERS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"unknown tokenizer '{kind}'; {hint}known: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind].from_bytes(blob, context_length=context_length)


def train_sentencepiece(texts: Iterable[str], model_prefix_or_path: str, vocab_size: int = 1024) -> str:
    """Train a BPE model on `texts` (lowercased) and write it to `<prefix>.model`; returns that path.

    `vocab_size` is an upper bound: a small corpus (the shapes captions have ~60 words) yields fewer
    pieces rather than an error. BPE, not unigram: on such a corpus unigram pruning stops at ~80
    pieces and spells "yellow" in four. One thread and no input sampling keep the result deterministic.
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def main(argv: list[str] | None = None) -> str:
    """`python -m data.tokenizer train --data SPEC --vocab-size N --out FILE`: a sentencepiece model trained on
    the captions of any dataset spec (read without decoding images), for `data.tokenizer_path`."""
    import argparse

    from config import load_config
    from data import captions

    parser = argparse.ArgumentParser(prog="python -m data.tokenizer", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a sentencepiece BPE model on a dataset's captions",
                                epilog="Extra --data.KEY=VALUE arguments set data options (e.g. --data.image_root).")
    train.add_argument("--data", required=True, help="dataset spec, e.g. csv:pairs.csv or wds:shards/{0000..0099}.tar")
    train.add_argument("--vocab-size", type=int, default=1024, help="upper bound on the number of pieces")
    train.add_argument("--out", required=True, help="output file (.model is appended if missing)")
    train.add_argument("--limit", type=int, default=None, help="train on at most this many captions")
    args, overrides = parser.parse_known_args(argv)
    options = load_config(None, overrides).data

    count = 0

    def counted(texts: Iterable[str]) -> Iterable[str]:
        nonlocal count
        for text in texts:
            count += 1
            yield text

    try:
        path = train_sentencepiece(counted(captions(args.data, args.limit, options)), args.out, args.vocab_size)
    except (FileNotFoundError, ValueError) as error:  # a spec that points at nothing, named by the dataset
        sys.exit(f"python -m data.tokenizer train: {error}")
    except RuntimeError as error:  # sentencepiece's own message, e.g. an empty corpus
        sys.exit(f"python -m data.tokenizer train: training on {args.data} failed after {count} captions: {error}")
    vocab = SentencePieceTokenizer(path).vocab_size
    print(f"trained a {vocab}-piece sentencepiece model on {count} captions of {args.data}: {path}")
    return path


if __name__ == "__main__":
    main()
