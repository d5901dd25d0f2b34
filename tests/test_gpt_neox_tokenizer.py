"""GPTNeoXTokenizer (data/tokenizer.py) gives the ids of transformers' PreTrainedTokenizerFast with OpenFlamingo's
added tokens, on a small byte-level BPE tokenizer.json built offline with the tokenizers library and configured
like GPT-NeoX-20B's (NFC, ByteLevel without prefix space, <|endoftext|> and <|padding|>, the runs of 2-24 spaces
as added tokens): a varied corpus, OpenFlamingo prompts, every code point's pre-tokenisation and NFC, decoding,
the merges' older string layout, the added ids, the rows, serialisation, and refused options."""
import json
import pickle
import unicodedata

import pytest
import torch

import crossmodal.data.tokenizer as tokenizer_module
from crossmodal.data import build_dataset
from crossmodal.data.tokenizer import GPTNeoXTokenizer, _symbols
from tests.test_tokenizer import CORPUS as CLIP_CORPUS

tokenizers = pytest.importorskip("tokenizers")  # test-only reference (installed with transformers)
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CORPUS = {
    **CLIP_CORPUS,
    "open_flamingo_caption": "<image>Output:A dog on a sofa.<|endofchunk|>\n<image>Output:",
    "open_flamingo_vqa": "Question:what colour? Short answer:red<|endofchunk|>\n<image>Question:how many? Short "
                         "answer:",
    "specials_in_words": "x<image>y<|endoftext|>z<PAD>w<|padding|>v<|endofchunk|>",
    "space_runs": "a  b   c" + " " * 30 + "d" + " " * 24 + "e" + " " * 25,
    "tabs_and_newlines": "line one\n\nline two\r\n\tindented\t\ttwice\n",
    "code": "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
    "digits": "0123456789 1,000,000 3.14159 2024-01-31 12:30",
    "unicode_spaces": "a\u00a0b\u2009c\u3000d\u2028e \x85f",
    "separators": "a\x1cb\x1d c\x1e\x1f d",
    "case": "Don'T SHOUT, it's fine; They'RE here",
}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A 500-entry byte-level BPE trained on shapes_icl text and a few scripts, saved as tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    episodes = build_dataset("shapes_icl:train:100")
    texts = [episodes.text_only(i) for i in range(100)] + list(CORPUS.values())[:8]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens([AddedToken(" " * n, normalized=True, special=False) for n in range(24, 1, -1)])
    path = tmp_path_factory.mktemp("neox") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf(tokenizer_json):
    """OpenFlamingo's tokenizer: `open_flamingo/src/factory.py`'s add_special_tokens calls."""
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json))
    reference.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    reference.add_special_tokens({"pad_token": "<PAD>"})
    return reference


@pytest.fixture(scope="module")
def tokenizer(tokenizer_json):
    return GPTNeoXTokenizer(tokenizer_json)


def test_ids_equal_hf(tokenizer, hf):
    differ = {name for name, text in CORPUS.items()
              if tokenizer.encode(text) != hf.encode(text, add_special_tokens=False)}
    assert differ == set()
    assert hf.encode(CORPUS["caption"]) == hf.encode(CORPUS["caption"], add_special_tokens=False)  # HF adds no bos


def test_added_ids_are_open_flamingos(tokenizer, hf):
    assert len(hf) == tokenizer.vocab_size == 526  # 500 + 23 space runs + 3
    assert (tokenizer.eoc_id, tokenizer.media_id, tokenizer.pad_id) == (523, 524, 525)
    assert hf.convert_tokens_to_ids(["<|endofchunk|>", "<image>", "<PAD>"]) == [523, 524, 525]
    assert tokenizer.bos_id == tokenizer.eos_id == hf.convert_tokens_to_ids("<|endoftext|>") == 0
    # a tokenizer.json that already holds them (saved by OpenFlamingo) keeps their ids
    saved = GPTNeoXTokenizer.from_bytes(hf.backend_tokenizer.to_str().encode())
    assert (saved.eoc_id, saved.media_id, saved.pad_id, saved.vocab_size) == (523, 524, 525, 526)


def test_every_code_point_splits_and_normalises_as_tokenizers(tokenizer):
    pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    nfc = tokenizers.normalizers.NFC()
    code_points = [c for c in [*range(0x40000), *range(0xE0000, 0xE1000)] if not 0xD800 <= c <= 0xDFFF]
    def ours(text: str) -> list[str]:
        return [_symbols(word) for word in tokenizer._split.findall(text)]

    def theirs(text: str) -> list[str]:
        return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]

    split_differ, nfc_differ = [], []
    for start in range(0, len(code_points), 4096):
        chunk = code_points[start : start + 4096]
        text = "".join(f"x{chr(c)}y {chr(c)}{chr(c)} 1{chr(c)}" for c in chunk)
        if ours(text) != theirs(text):  # narrow down to the code points
            split_differ += [c for c in chunk if ours(f"x{chr(c)}y {chr(c)}{chr(c)} 1{chr(c)}") !=
                             theirs(f"x{chr(c)}y {chr(c)}{chr(c)} 1{chr(c)}")]
        if tokenizer._normalize(text) != nfc.normalize_str(text):
            nfc_differ += [c for c in chunk if tokenizer._normalize(f"a{chr(c)}") != nfc.normalize_str(f"a{chr(c)}")]
    # only code points that Rust's Unicode tables have and Python 3.11's (Unicode 14) do not yet
    categories = {unicodedata.category(chr(c)) for c in split_differ + nfc_differ}
    assert categories <= {"Cn"}, [hex(c) for c in split_differ[:9]]


def test_stdlib_pattern_gives_the_same_ids(tokenizer_json, tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "regex", None)
    fallback = GPTNeoXTokenizer(tokenizer_json)
    assert fallback._split.__class__.__module__ == "re"
    assert {name for name, text in CORPUS.items() if fallback.encode(text) != tokenizer.encode(text)} == set()


def test_decode_equals_hf_and_round_trips(tokenizer, hf):
    for name, text in CORPUS.items():
        ids = tokenizer.encode(text)
        expected = hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert tokenizer.decode(ids) == expected, name
    plain = [text for name, text in CORPUS.items() if "<" not in text]
    assert all(tokenizer.decode(tokenizer.encode(text)) == tokenizer._normalize(text) for text in plain)
    assert tokenizer.decode(torch.tensor(tokenizer.encode("a red circle"))) == "a red circle"


def test_merges_as_strings_give_the_same_ids(tokenizer_json, tokenizer):
    """GPT-NeoX-20B's file lists merges as "a b" strings; tokenizers >= 0.20 writes ["a", "b"] pairs."""
    spec = json.loads(tokenizer_json.read_text())
    assert isinstance(spec["model"]["merges"][0], list)
    spec["model"]["merges"] = [" ".join(merge) for merge in spec["model"]["merges"]]
    old_layout = GPTNeoXTokenizer.from_bytes(json.dumps(spec).encode())
    assert all(old_layout.encode(text) == tokenizer.encode(text) for text in CORPUS.values())


def test_rows_truncation_and_padding(tokenizer_json):
    tokenizer = GPTNeoXTokenizer(tokenizer_json, context_length=8)
    rows = tokenizer(["a red circle", CORPUS["long"]])
    assert rows.shape == (2, 8) and rows.dtype == torch.long
    short = [tokenizer.bos_id, *tokenizer.encode("a red circle"), tokenizer.eos_id]
    assert rows[0].tolist() == short + [tokenizer.pad_id] * (8 - len(short))
    assert rows[1, -1] == tokenizer.eos_id and rows[1].tolist()[1:-1] == tokenizer.encode(CORPUS["long"])[:6]
    assert tokenizer.encode(CORPUS["long"], limit=5) == tokenizer.encode(CORPUS["long"])[:5]
    assert tokenizer.decode(rows[0]) == "a red circle"
    assert GPTNeoXTokenizer(tokenizer_json).context_length == 2048  # MPT's


def test_bytes_and_pickle_round_trip(tokenizer, tokenizer_json):
    assert tokenizer.model_bytes() == tokenizer_json.read_bytes()
    for copy in (GPTNeoXTokenizer.from_bytes(tokenizer.model_bytes()), pickle.loads(pickle.dumps(tokenizer))):
        assert all(copy.encode(text) == tokenizer.encode(text) for text in CORPUS.values())
    assert len(pickle.dumps(tokenizer)) < 2 * len(tokenizer.model_bytes()) + 1000  # the file, not the tables


def test_errors_name_the_file_and_the_option(tmp_path, tokenizer_json):
    with pytest.raises(FileNotFoundError, match="tokenizer.json .*gpt-neox-20b.* not found"):
        GPTNeoXTokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json is not a HuggingFace tokenizer.json"):
        GPTNeoXTokenizer(tmp_path / "bad.json")
    spec = json.loads(tokenizer_json.read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    spec["normalizer"] = {"type": "NFKC"}
    spec["added_tokens"][0]["lstrip"] = True
    with pytest.raises(ValueError, match=r"normalizer, pre_tokenizer.add_prefix_space, added token '<\|endoftext\|>' "
                                         r"lstrip not implemented"):
        GPTNeoXTokenizer.from_bytes(json.dumps(spec).encode())
