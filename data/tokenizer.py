"""SentencePiece tokenizer (Kudo & Richardson, 2018) for captions, and a trainer for small vocabularies.

Every row is [bos] + pieces + [eos], padded with 0 (CLIP instead uses a byte-level BPE with its own
start/end tokens; the text models here pool at the eos position either way). Text is lowercased
before encoding, and the model normalises with NFKC + case folding, so "A Red Circle" and
"a red circle" give the same tokens.
"""
import io
import os
from typing import Iterable, Sequence

import sentencepiece as spm
import torch

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
