"""BertTokenizer gives HuggingFace BertTokenizer's ids (tokenizers' WordPiece) on a varied corpus and per code
point, decodes as HF's decode does, adds BLIP's [DEC]/[ENC] where BLIP's init_tokenizer puts them, and
serialises like the other tokenizers. The vocabulary is trained here (no network)."""
import pickle
import unicodedata

import pytest
import torch

from crossmodal.data import captions
from crossmodal.data.tokenizer import BertTokenizer, tokenizer_from_bytes

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = {
    "plain": "a photo of a dog.",
    "caption": "Two cats sleeping on a red sofa, next to a window; the sun is shining!",
    "mixed_case": "A Photo Of A DOG, MiXeD CaSe İstanbul straße ǅemal",
    "final_sigma": "ΣΊΣΥΦΟΣ ΟΔΟΣ",
    "punctuation": "what? (really) [yes] {no} <maybe> #tag @user $100 50% a*b=c ~x `y` ^z |p| a/b \\ ... -- _",
    "unicode_punctuation": "¿¡ «» „“ — … ‘x’ 「y」 ·",
    "numbers": "3.14159 and 2,500,000 and 1e-3 and -42 and 007 and 1/2 in 2024, ½ x² ①",
    "contractions": "they're here, we've got it, i'm sure, don't, can't, it's, IT'S, dog's toy",
    "accents": "café naïve Ångström façade jalapeño Zürich crème brûlée ÉCOLE",
    "decomposed_accent": "cafe\u0301 decomposed",
    "cjk": "中文 日本語 한국어 汉字测试 ひらがな カタカナ 豈 𠀀x",
    "scripts": "αβγ привет مرحبا שלום नमस्ते สวัสดี",
    "emoji": "emoji 😀 👍🏽 ❤️ 👨‍👩‍👧‍👦 🥰 flags 🇺🇸",
    "html_entities": "&amp; &quot;quoted&quot; it&#39;s &lt;b&gt; &nbsp;x &eacute;",
    "control_chars": "control\x00chars\x07 and \x1b[31mred\x1b[0m soft\u00adhyphen zero\u200bwidth \ufffdx \x0bvt",
    "whitespace": "tabs\tand\nnewlines\r\n  multiple   spaces \u00a0nbsp\u3000ideographic \u2028line\u2029para  ",
    "unassigned": "a\u0378b new\u2e52punct",
    "long_word": "pneumonoultramicroscopicsilicovolcanoconiosis " + "x" * 100 + " " + "y" * 101 + " ok",
    "unknown_subword": "unaffable qqqqzzzz",
    "unseen": "characters the vocabulary was not trained on: 🦄 ឃ ∑ ⅷ 𝔄",
    "empty": "",
    "only_spaces": " \t ",
    "long": " ".join(["a very long caption with many words"] * 20),
}
# where HF's pure-Python BertTokenizerLegacy differs (see BertTokenizer's docstring)
DIFFERS_FROM_LEGACY = {"final_sigma", "unassigned"}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    """A WordPiece vocabulary trained by tokenizers on shapes captions and the corpus but its "unseen" entry."""
    texts = list(captions("shapes:train:400")) + [text for name, text in CORPUS.items() if name != "unseen"] * 3
    texts += ["unaffable affable un able", "running runner runs ran", "the quick brown fox jumps over the lazy dog"]
    # limit_alphabet keeps the 150 most frequent characters, ties in no fixed order: "!" (asserted on below) is made
    # frequent enough to be kept on every run
    texts += ["wow! yes! a dog! a cat!"] * 5
    trainer = tokenizers.BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(texts, vocab_size=700, min_frequency=1, limit_alphabet=150, special_tokens=SPECIAL)
    vocab = sorted(trainer.get_vocab().items(), key=lambda item: item[1])
    assert [piece for piece, _ in vocab[:5]] == SPECIAL and [i for _, i in vocab] == list(range(len(vocab)))
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("".join(piece + "\n" for piece, _ in vocab), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def hf(vocab_file):
    return transformers.BertTokenizer(vocab_file, do_lower_case=True)


@pytest.fixture(scope="module")
def tokenizer(vocab_file):
    return BertTokenizer(vocab_file)


def hf_rows(hf, texts, context_length):
    return hf(texts, padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")["input_ids"]


# ---------------------------------------------------------------- parity with HF


def test_ids_equal_hf(tokenizer, hf):
    texts = list(CORPUS.values())
    assert torch.equal(tokenizer(texts), hf_rows(hf, texts, 35))
    for text in texts:
        assert tokenizer.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
    unk = tokenizer.unk_id
    assert tokenizer.encode(CORPUS["unseen"])[-5:] == [unk] * 5
    assert tokenizer.encode("y" * 101) == [unk] and unk not in tokenizer.encode("y" * 100)  # 100 characters at most


@pytest.mark.parametrize("context_length", [8, 16, 77])
def test_ids_equal_hf_at_other_context_lengths(vocab_file, hf, context_length):
    tokenizer, texts = BertTokenizer(vocab_file, context_length=context_length), list(CORPUS.values())
    assert torch.equal(tokenizer(texts), hf_rows(hf, texts, context_length))


def test_shapes_captions_equal_hf(tokenizer, hf):
    texts = list(captions("shapes:val:300"))
    assert torch.equal(tokenizer(texts), hf_rows(hf, texts, 35))


def test_every_code_point_normalises_and_splits_as_tokenizers():
    # tokenizers' normaliser and pre-tokeniser on "x{c}y" for every assigned code point's plane, in chunks
    normalizer = tokenizers.normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    code_points = [c for c in [*range(0x40000), *range(0xE0000, 0x110000)] if not 0xD800 <= c <= 0xDFFF]
    differ = []
    for start in range(0, len(code_points), 4096):
        chunk = code_points[start : start + 4096]
        text = " ".join(f"x{chr(c)}y" for c in chunk)
        theirs = [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]
        if BertTokenizer.words(text) != theirs:  # narrow down to the code points
            words = (f"x{chr(c)}y" for c in chunk)
            differ += [c for c, word in zip(chunk, words) if BertTokenizer.words(word) !=
                       [w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(word))]]
    # the ASCII shortcut, one string per character (the chunks above are not ASCII)
    ascii_texts = [f"x{chr(c)}Y {chr(c)}{chr(c)}" for c in range(128)]
    assert [BertTokenizer.words(t) for t in ascii_texts] == [
        [w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))] for t in ascii_texts]
    # characters Python's Unicode (14.0 on 3.11) does not have yet, which Rust lowercases or decomposes, and
    # U+11938, which Python's NFD decomposes and tokenizers' does not
    assert {c for c in differ if unicodedata.category(chr(c)) != "Cn"} == {0x11938}, [hex(c) for c in differ[:20]]


def test_differences_from_hf_legacy_are_the_documented_ones(tokenizer, vocab_file):
    legacy = transformers.models.bert.tokenization_bert_legacy.BertTokenizerLegacy(vocab_file, do_lower_case=True)
    texts = list(CORPUS.values())
    ours, theirs = tokenizer(texts), hf_rows(legacy, texts, 35)
    assert {name for name, a, b in zip(CORPUS, ours, theirs) if not torch.equal(a, b)} == DIFFERS_FROM_LEGACY


def test_literal_special_tokens_stay_text(tokenizer, hf):
    # a deliberate difference: HF turns "[SEP]" in a text into the special id
    text = "a caption [SEP] with more [CLS]"
    row = tokenizer(text)[0].tolist()
    assert row.count(tokenizer.sep_id) == 1 and row.count(tokenizer.cls_id) == 1
    assert hf(text)["input_ids"].count(tokenizer.sep_id) == 2
    assert tokenizer.encode(text) == hf("a caption [ sep ] with more [ cls ]", add_special_tokens=False)["input_ids"]


def test_bert_base_uncased_when_cached():
    # the real vocabulary, if a previous download left it in the Hugging Face cache (never fetched here)
    path = pytest.importorskip("huggingface_hub").try_to_load_from_cache("bert-base-uncased", "vocab.txt")
    if not isinstance(path, str):
        pytest.skip("bert-base-uncased's vocab.txt is not in the Hugging Face cache")
    tokenizer, hf = BertTokenizer(path), transformers.BertTokenizer(path, do_lower_case=True)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.enc_id) == (30524, 30522, 30523)
    texts = list(CORPUS.values()) + list(captions("shapes:val:200"))
    assert torch.equal(tokenizer(texts), hf_rows(hf, texts, 35))
    # transformers' convert_blip_original_pytorch_to_hf.py: "[DEC] a picture of" starts [30522, 1037, 3861, 1997]
    assert [tokenizer.bos_id, *tokenizer.encode("a picture of")] == [30522, 1037, 3861, 1997]


# ---------------------------------------------------------------- layout, BLIP's added tokens


def test_layout_and_truncation(tokenizer, vocab_file):
    assert tokenizer.context_length == 35
    n = sum(1 for _ in open(vocab_file, encoding="utf-8"))
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (0, 1, 2, 3, 4)
    assert (tokenizer.bos_id, tokenizer.enc_id, tokenizer.vocab_size) == (n, n + 1, n + 2)
    tokens = tokenizer(list(CORPUS.values()))
    assert tokens.dtype == torch.long and tokens.shape == (len(CORPUS), 35)
    assert (tokens[:, 0] == tokenizer.cls_id).all() and tokens.max() < tokenizer.bos_id
    long = tokens[list(CORPUS).index("long")].tolist()
    assert long[-1] == tokenizer.sep_id and tokenizer.pad_id not in long
    assert long[1:-1] == tokenizer.encode(CORPUS["long"])[:33]
    assert tokenizer("")[0, :3].tolist() == [tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id]
    assert tokenizer([]).shape == (0, 35)
    with pytest.raises(ValueError, match="context_length"):
        BertTokenizer(vocab_file, context_length=1)


def test_added_tokens_where_blip_puts_them(tokenizer, vocab_file):
    # BLIP's models/blip.py::init_tokenizer
    blip = transformers.BertTokenizer(vocab_file, do_lower_case=True)
    blip.add_special_tokens({"bos_token": "[DEC]"})
    blip.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert blip.bos_token_id == tokenizer.bos_id and blip.convert_tokens_to_ids("[ENC]") == tokenizer.enc_id
    assert len(blip) == tokenizer.vocab_size
    row = tokenizer("a dog's toy, isn't it?")[0]
    row[0] = tokenizer.bos_id  # the decoder's input, as BLIP's captioner builds it
    assert tokenizer.decode(row) == blip.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=True)


# ---------------------------------------------------------------- decoding and serialisation


def test_decode_equals_hf(tokenizer, hf):
    for text, row in zip(CORPUS.values(), tokenizer(list(CORPUS.values()))):
        expected = hf.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        assert tokenizer.decode(row) == expected == tokenizer.decode(row.tolist()), text
    assert tokenizer.decode(tokenizer("A Photo, of a DOG!")[0]) == "a photo, of a dog!"
    assert tokenizer.decode(tokenizer("it ' s the dog ' s")[0]) == "it's the dog's"


def test_decode_round_trip(tokenizer):
    for text in ("a photo of a dog", "a large red circle above a small blue square", "unaffable running"):
        assert tokenizer.decode(tokenizer(text)[0]) == text
    row = tokenizer("a red circle")[0].tolist()
    end = row.index(tokenizer.sep_id)
    assert tokenizer.decode(row[: end + 1] + tokenizer.encode("junk after sep")) == "a red circle"


def test_bytes_pickle_and_registry(tokenizer, vocab_file):
    with open(vocab_file, "rb") as f:
        assert tokenizer.model_bytes() == f.read()
    texts = list(CORPUS.values())
    rebuilt = BertTokenizer.from_bytes(tokenizer.model_bytes(), context_length=16)
    assert rebuilt.context_length == 16 and rebuilt.model_path == "<bytes>"
    assert torch.equal(rebuilt(texts), BertTokenizer(vocab_file, context_length=16)(texts))
    blob = pickle.dumps(tokenizer)
    assert len(blob) < 1.1 * len(tokenizer.model_bytes())  # the vocab.txt bytes, not the tables
    assert torch.equal(pickle.loads(blob)(texts), tokenizer(texts))
    registered = tokenizer_from_bytes("bert", tokenizer.model_bytes(), context_length=20)
    assert isinstance(registered, BertTokenizer) and registered("a dog").shape == (1, 20)


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "vocab.txt"
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        BertTokenizer(missing)
    with pytest.raises(ValueError, match=r"needs \[PAD\]"):
        BertTokenizer.from_bytes("[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n".encode())
    with pytest.raises(ValueError, match="UTF-8"):
        BertTokenizer.from_bytes(b"\xff\xfe")


# ---------------------------------------------------------------- BLIP's tokens for sentencepiece models


def test_sentencepiece_blip_tokens_leave_every_other_id_unchanged(tmp_path):
    from crossmodal.data.tokenizer import SentencePieceTokenizer, main, train_sentencepiece

    texts = list(captions("shapes:train:300"))
    plain = SentencePieceTokenizer(train_sentencepiece(texts, tmp_path / "plain", 96))
    blip = SentencePieceTokenizer(train_sentencepiece(texts, tmp_path / "blip", 96, blip_tokens=True))
    assert (plain.dec_id, plain.enc_id) == (None, None)
    n = plain.vocab_size
    assert (blip.vocab_size, blip.dec_id, blip.enc_id) == (n + 2, n, n + 1)
    probe = texts[:50] + list(CORPUS.values()) + ["[dec] [DEC] [enc] [ENC]"]  # no text reaches the new ids
    assert torch.equal(blip(probe), plain(probe)) and blip(probe).max() < n
    row = blip("a red circle")[0]
    row[0] = blip.dec_id
    assert blip.decode(row) == "a red circle"
    assert (pickle.loads(pickle.dumps(blip)).dec_id, tokenizer_from_bytes(
        "sentencepiece", blip.model_bytes(), context_length=8).enc_id) == (n, n + 1)
    path = main(["train", "--data", "shapes:train:300", "--vocab-size", "96", "--out", str(tmp_path / "cli"),
                 "--blip-tokens"])
    assert SentencePieceTokenizer(path).dec_id == n
