"""ClipTokenizer gives open_clip's ids on a varied corpus; its stdlib fallbacks differ only where documented;
the layout, decoding, serialisation and the tokenizer registry behave as train.py expects."""
import os
import pickle
import re
import string
import subprocess
import sys
import unicodedata

import pytest
import torch

import crossmodal.data.tokenizer as tokenizer_module
from crossmodal.data.templates import load_classnames, load_templates
from crossmodal.data.tokenizer import BertTokenizer, ClipTokenizer, SentencePieceTokenizer, tokenizer_from_bytes, train_sentencepiece

CORPUS = {
    "plain": "a photo of a dog.",
    "caption": "Two cats sleeping on a red sofa, next to a window; the sun is shining!",
    "mixed_case": "A Photo Of A DOG, MiXeD CaSe İstanbul ΣΊΣΥΦΟΣ straße",
    "punctuation": "what? (really) [yes] {no} <maybe> #tag @user $100 50% a*b=c ~x `y` ^z |p| a/b \\ ... -- _",
    "numbers": "3.14159 and 2,500,000 and 1e-3 and -42 and 007 and 1/2 in 2024",
    "contractions": "they're here, we've got it, i'm sure, you'll see, he'd go, don't, can't, it's, IT'S, Don'T",
    "bare_contractions": "'s 't 're 've 'm 'll 'd ''s x's 'ſ 'sa",
    "accents": "café naïve Ångström façade jalapeño Zürich crème brûlée ÉCOLE",
    "decomposed_accent": "cafe\u0301 decomposed",
    "cjk": "中文 日本語 한국어 汉字测试 ひらがな カタカナ",
    "scripts": "αβγ привет مرحبا שלום नमस्ते สวัสดี",
    "emoji": "emoji 😀 👍🏽 ❤️ 👨‍👩‍👧‍👦 🏳️‍🌈 🇺🇸 🇯🇵 flags",
    "html_entities": "&amp; &quot;quoted&quot; it&#39;s &lt;b&gt; &amp;amp; &nbsp;x &eacute;",
    "triple_escaped": "fish &amp;amp;amp; chips",
    "mojibake": "cafÃ© â€œquotedâ€\x9d doesnÃ¢â‚¬â„¢t",
    "curly_quotes": "don’t ‘single’ “double”",
    "ligatures": "ﬁne ﬂower ǅ",
    "full_width": "ＣＬＩＰ １２３",
    "control_chars": "control\x00chars\x07 and \x1b[31mred\x1b[0m",
    "whitespace": "tabs\tand\nnewlines\r\n  multiple   spaces \u00a0nbsp\u3000ideographic  ",
    "empty": "",
    "only_spaces": "   ",
    "numeric_symbols": "x² ½ Ⅻ ① ٣ ३ 三",
    "bang_before_symbol": "wow!😀 great!( yes!!",
    "case_folding_mark": "\u0345 ypogegrammeni",
    "long": " ".join(["a very long caption with many words"] * 20),
}
# What ftfy fixes and unicodedata.normalize("NFC") alone does not (documented in ClipTokenizer's docstring)
DIFFERS_WITHOUT_FTFY = {"triple_escaped", "mojibake", "curly_quotes", "ligatures", "full_width", "control_chars"}


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    return pytest.importorskip("open_clip").tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def bpe_path():
    return pytest.importorskip("open_clip").tokenizer.default_bpe()


@pytest.fixture(scope="module")
def tokenizer(bpe_path):
    return ClipTokenizer(bpe_path)


def differing_entries(tokenizer, reference, context_length=77) -> set[str]:
    ours, theirs = tokenizer(list(CORPUS.values())), reference(list(CORPUS.values()), context_length=context_length)
    return {name for name, a, b in zip(CORPUS, ours, theirs) if not torch.equal(a, b)}


# ---------------------------------------------------------------- parity with open_clip


def test_ids_equal_open_clip(tokenizer, open_clip_tokenizer):
    assert tokenizer.backends == {"clean": "ftfy", "split": "regex"}
    assert differing_entries(tokenizer, open_clip_tokenizer) == set()
    for text in CORPUS.values():  # one at a time too: a str gives one row
        assert torch.equal(tokenizer(text), open_clip_tokenizer(text))


def test_ids_equal_open_clip_at_other_context_length(bpe_path, open_clip_tokenizer):
    short = ClipTokenizer(bpe_path, context_length=32)
    assert differing_entries(short, open_clip_tokenizer, context_length=32) == set()


def test_imagenet_prompts_equal_open_clip(tokenizer, open_clip_tokenizer):
    classnames, templates = load_classnames("imagenet"), load_templates("imagenet")
    prompts = [template.format(name) for name in classnames[::25] for template in templates]  # 3,200 of 80,000
    assert torch.equal(tokenizer(prompts), open_clip_tokenizer(prompts))


@pytest.mark.parametrize("missing", [("ftfy",), ("regex",), ("ftfy", "regex")])
def test_fallbacks_differ_only_where_documented(bpe_path, open_clip_tokenizer, monkeypatch, missing):
    for name in missing:
        monkeypatch.setattr(tokenizer_module, name, None)
    fallback = ClipTokenizer(bpe_path)
    assert fallback.backends == {"clean": "nfc" if "ftfy" in missing else "ftfy",
                                 "split": "re" if "regex" in missing else "regex"}
    expected = DIFFERS_WITHOUT_FTFY if "ftfy" in missing else set()
    assert differing_entries(fallback, open_clip_tokenizer) == expected


def test_stdlib_classes_equal_regex_on_every_assigned_code_point():
    regex = pytest.importorskip("regex")
    letters, numbers = tokenizer_module._stdlib_classes()
    # planes 0-3 and 14 hold every assigned code point (4-13 are unassigned, 15-16 private use); whitespace
    # is left out because cleaning leaves only " " (re's \\s also has U+001C-U+001F, regex's does not)
    code_points = [*range(0x40000), *range(0xE0000, 0xE1000)]
    every = "".join(char for char in map(chr, code_points) if not char.isspace())
    pairs = [  # (regex's class, its stdlib spelling), with the case-sensitivity each has in the split pattern
        (r"(?i)[\p{L}]", f"[{letters}]"),
        (r"(?i)[\p{N}]", f"[{numbers}]"),
        (r"(?i)[^\s\p{L}\p{N}]", rf"(?i:[^\s{letters}{numbers}])"),
    ]
    for reference, fallback in pairs:
        differ = set(regex.findall(reference, every)) ^ set(re.findall(fallback, every))
        # only characters that regex's Unicode version has and Python's does not yet
        assert {unicodedata.category(char) for char in differ} <= {"Cn"}, reference


def test_stdlib_contractions_fold_case_like_regex(monkeypatch):
    regex = pytest.importorskip("regex")
    full = tokenizer_module._split_pattern()
    monkeypatch.setattr(tokenizer_module, "regex", None)
    fallback = tokenizer_module._split_pattern()
    # every character whose case mappings touch a contraction letter, e.g. "ſ" (long s), "ß", "ﬅ"; all in the BMP
    folding = [chr(c) for c in range(0x10000)
               if set(chr(c).lower() + chr(c).upper() + chr(c).casefold()) & set("stremvld")]
    texts = [f"'{a}{b}x" for a in folding for b in folding + [""]]
    assert isinstance(fallback, re.Pattern) and isinstance(full, regex.Pattern)
    assert [fallback.findall(text) for text in texts] == [full.findall(text) for text in texts]


def test_ascii_shortcuts_change_nothing(tokenizer):
    # the split of ASCII text with a-z/0-9 classes, and skipping ftfy for printable ASCII without "&"
    ftfy = pytest.importorskip("ftfy")
    printable = string.printable[:95].lower()
    texts = [a + b + c for a in printable for b in printable for c in "'a1. "]
    assert [tokenizer_module._ASCII_SPLIT.findall(t) for t in texts] == [tokenizer._split.findall(t) for t in texts]
    no_ampersand = string.printable[:95].replace("&", "")
    for text in [no_ampersand, *(a + b for a in no_ampersand for b in no_ampersand)]:
        assert ftfy.fix_text(text) == text


def test_literal_special_token_text_stays_text(tokenizer, open_clip_tokenizer):
    # a deliberate difference: open_clip turns the literal strings into control ids
    text = "<start_of_text> a caption <end_of_text> with more"
    row = tokenizer(text)[0].tolist()
    assert row.count(tokenizer.bos_id) == 1 and row.count(tokenizer.eos_id) == 1
    assert tokenizer.decode(row) == "< start _ of _ text > a caption < end _ of _ text > with more"
    assert open_clip_tokenizer(text)[0].tolist().count(tokenizer.eos_id) == 2


# ---------------------------------------------------------------- layout


def test_layout_and_truncation(bpe_path):
    for context_length in (77, 32):
        tokenizer = ClipTokenizer(bpe_path, context_length=context_length)
        assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (49408, 0, 49406, 49407)
        assert tokenizer.context_length == context_length
        tokens = tokenizer(list(CORPUS.values()))
        assert tokens.dtype == torch.long and tokens.shape == (len(CORPUS), context_length)
        assert (tokens[:, 0] == tokenizer.bos_id).all() and tokens.max() < tokenizer.vocab_size
        for row in tokens.tolist():
            end = row.index(tokenizer.eos_id)
            assert all(t not in (tokenizer.bos_id, tokenizer.eos_id) for t in row[1:end])
            assert all(t == tokenizer.pad_id for t in row[end + 1 :])
        long = tokens[list(CORPUS).index("long")]
        assert long[-1] == tokenizer.eos_id and (long != tokenizer.pad_id).all()  # truncated, eos kept last
        assert tokenizer("")[0, :3].tolist() == [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]
        assert tokenizer([]).shape == (0, context_length)
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(bpe_path, context_length=1)


def test_word_cache_is_bounded(bpe_path, monkeypatch):
    tokenizer = ClipTokenizer(bpe_path)
    expected = tokenizer(CORPUS["caption"])
    monkeypatch.setattr(tokenizer_module, "_CACHE_SIZE", 3)
    fresh = ClipTokenizer(bpe_path)
    assert torch.equal(fresh(CORPUS["caption"]), expected) and len(fresh._cache) <= 3


# ---------------------------------------------------------------- decoding and serialisation


def test_decode_round_trip(tokenizer):
    for text in ("a photo of a dog", "two cats sleeping on a red sofa next to 3 windows", "café 中文 😀"):
        assert tokenizer.decode(tokenizer(text)[0]) == text
        assert tokenizer.decode(tokenizer(text)[0].tolist()) == text
    without_eos = [t for t in tokenizer(text)[0].tolist() if t != tokenizer.eos_id]
    assert tokenizer.decode(without_eos) == text  # then the trailing zeros are taken as padding
    assert tokenizer.decode(tokenizer("A Photo, of a DOG!")[0]) == "a photo , of a dog !"


def test_zero_inside_a_row_is_the_byte_bang(tokenizer):
    # id 0 is both the padding and the piece "!" (not word-final), so padding is only what follows the text
    row = tokenizer("wow!😀")[0].tolist()
    end = row.index(tokenizer.eos_id)
    assert tokenizer.pad_id in row[1:end]
    assert tokenizer.decode(row) == "wow !😀"


def test_bytes_and_pickle_round_trip(tokenizer, bpe_path):
    with open(bpe_path, "rb") as f:
        assert tokenizer.model_bytes() == f.read()
    texts = list(CORPUS.values())
    rebuilt = ClipTokenizer.from_bytes(tokenizer.model_bytes(), context_length=32)
    assert rebuilt.context_length == 32 and rebuilt.model_path == "<bytes>"
    assert torch.equal(rebuilt(texts), ClipTokenizer(bpe_path, context_length=32)(texts))
    blob = pickle.dumps(tokenizer)
    assert len(blob) < 1.1 * len(tokenizer.model_bytes())  # the .gz bytes, not the tables
    assert torch.equal(pickle.loads(blob)(texts), tokenizer(texts))


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ClipTokenizer(missing)
    with pytest.raises(ValueError, match="gzip"):
        ClipTokenizer.from_bytes(b"not a gzip file")


# ---------------------------------------------------------------- registry


def test_registry_rebuilds_either_kind(tokenizer, tmp_path):
    assert tokenizer_module.TOKENIZERS == {"sentencepiece": SentencePieceTokenizer, "clip": ClipTokenizer,
                                           "bert": BertTokenizer}
    clip = tokenizer_from_bytes("clip", tokenizer.model_bytes(), context_length=16)
    assert isinstance(clip, ClipTokenizer) and clip("a dog").shape == (1, 16)
    path = train_sentencepiece(["a red circle", "a blue square", "a small green star"] * 20, tmp_path / "tiny")
    with open(path, "rb") as f:
        sentencepiece = tokenizer_from_bytes("sentencepiece", f.read(), context_length=8)
    assert isinstance(sentencepiece, SentencePieceTokenizer)
    assert sentencepiece.decode(sentencepiece("a red circle")[0]) == "a red circle"


def test_unknown_kind_suggests_the_closest():
    with pytest.raises(ValueError, match="unknown tokenizer 'clipp'; did you mean 'clip'"):
        tokenizer_from_bytes("clipp", b"", context_length=77)
    with pytest.raises(ValueError, match="known: sentencepiece, clip"):
        tokenizer_from_bytes("wordpiece", b"", context_length=77)


def test_train_command_on_a_dataset_spec(tmp_path):
    from crossmodal.data.tokenizer import main

    path = main(["train", "--data", "shapes:train:300", "--vocab-size", "64", "--out", str(tmp_path / "shapes")])
    tokenizer = SentencePieceTokenizer(path)
    assert path.endswith("shapes.model") and tokenizer.vocab_size <= 64
    assert tokenizer.decode(tokenizer("a large red circle")[0]) == "a large red circle"
    with pytest.raises(SystemExit, match="csv: no file at"):
        main(["train", "--data", f"csv:{tmp_path / 'missing.csv'}", "--out", str(tmp_path / "x")])
    result = subprocess.run([sys.executable, "-m", "crossmodal.data.tokenizer", "train", "--data", "shapes:val:50",
                             "--out", str(tmp_path / "cli"), "--vocab-size", "48"], capture_output=True, text=True,
                            cwd=tmp_path)  # the installed package, from anywhere
    assert result.returncode == 0 and "on 50 captions of shapes:val:50" in result.stdout, result.stderr
