"""The Flamingo model, its interleaved data and few-shot evaluation (models/flamingo.py `Flamingo`,
losses/lm.py, data/interleaved.py, fewshot.py): closed gates give the frozen LM's logits, only the intended
parameters train (and only two embedding rows change), cached generation equals uncached, the labels, the
shapes_icl episodes and documents, and a few-shot run's JSON."""
import json

import pytest
import torch

from crossmodal.evaluation import fewshot
from crossmodal.data import build_dataset
from crossmodal.data.interleaved import END_OF_CHUNK, MEDIA, InterleavedCollate, document_text
from crossmodal.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from crossmodal.losses import interleaved_labels
from crossmodal.models import create_flamingo
from crossmodal.models.flamingo import freeze_for_training


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = list(build_dataset("shapes_icl:train:300").text_only(i) for i in range(300))
    path = train_sentencepiece(texts, tmp_path_factory.mktemp("tok") / "tok", 400, flamingo_tokens=True)
    return SentencePieceTokenizer(path, context_length=96)


def tiny_flamingo(tokenizer, seed=0, open_gates=False):
    torch.manual_seed(seed)
    model = create_flamingo("Flamingo-tiny", tokenizer, image_size=32, context_length=96)
    if open_gates:
        with torch.no_grad():
            for block in model.gated_cross_attn_layers:
                block.attn_gate.fill_(0.7)
                block.ff_gate.fill_(-0.5)
    return model.eval()


def batch(tokenizer, count=2, image_size=32):
    items = [build_dataset("shapes_icl:train:20", image_size)[i] for i in range(count)]
    return InterleavedCollate(tokenizer, image_size, 96)(items)


def test_closed_gates_give_the_frozen_lm(tokenizer):
    model = tiny_flamingo(tokenizer)
    data = batch(tokenizer)
    with torch.no_grad():
        logits = model.logits(data["tokens"], model.encode_media(data["images"]))
        expected = model.lang_model(data["tokens"])
    torch.testing.assert_close(logits, expected)
    opened = tiny_flamingo(tokenizer, open_gates=True)
    with torch.no_grad():
        assert not torch.allclose(opened.logits(data["tokens"], opened.encode_media(data["images"])), expected)


def test_only_resampler_cross_attention_and_two_rows_train(tokenizer):
    model = tiny_flamingo(tokenizer, open_gates=True).train()
    freeze_for_training(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    data = batch(tokenizer)
    model(data["images"], data["tokens"])["lm"].backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all(n.startswith(("perceiver.", "gated_cross_attn_layers.", "lang_model.token_embedding")) for n in with_grad)
    assert any(n.startswith("perceiver.") for n in with_grad) and any(n.startswith("gated_") for n in with_grad)
    optimizer.step()
    for name, param in model.named_parameters():
        changed = (param.detach() != before[name]).reshape(param.shape[0], -1).any(dim=1) if param.ndim else None
        if name == "lang_model.token_embedding.weight":
            assert changed.nonzero().flatten().tolist() == sorted([tokenizer.media_id, tokenizer.eoc_id])
        elif name.startswith(("vision_encoder.", "lang_model.")):
            assert not changed.any(), name


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generation_equals_uncached(tokenizer, num_beams):
    model = tiny_flamingo(tokenizer, open_gates=True)
    texts = [f"{MEDIA} Question: what colour? Short answer: dax{END_OF_CHUNK}{MEDIA} Question: what colour? Short answer:",
             f"{MEDIA} Output: a red circle.{END_OF_CHUNK}{MEDIA} Output:"]
    rows = [[tokenizer.bos_id, *tokenizer.encode(text)] for text in texts]
    length = max(map(len, rows))
    prompts = torch.tensor([[tokenizer.pad_id] * (length - len(r)) + r for r in rows])  # left padding
    images = torch.randn(2, 2, 3, 32, 32)
    cached = model.generate(images, prompts, max_new_tokens=6, num_beams=num_beams)
    uncached = model.generate(images, prompts, max_new_tokens=6, num_beams=num_beams, use_cache=False)
    assert torch.equal(cached, uncached)
    # a left-padded row generates what it generates alone
    alone = model.generate(images[1:], prompts[1:, length - len(rows[1]):], max_new_tokens=6, num_beams=num_beams)
    assert torch.equal(alone[0, : alone.shape[1]], cached[1, : alone.shape[1]])


def test_labels_mask_pad_media_and_text_outside_chunks():
    media, eoc, pad = 9, 10, 0
    tokens = torch.tensor([[2, 5, 6, media, 7, 8, eoc, 4, media, 6, 3, pad]])
    expected = [-100, -100, -100, -100, 7, 8, eoc, -100, -100, 6, 3, -100]
    assert interleaved_labels(tokens, media, eoc, pad).tolist() == [expected]


def test_shapes_icl_episodes_and_batches(tokenizer):
    dataset = build_dataset("shapes_icl:train:50", 32)
    item = dataset[3]
    assert item["text"].count(MEDIA) == len(item["images"]) == item["text"].count(END_OF_CHUNK)
    assert MEDIA not in item["text_only"]
    words = dataset.words(7)
    assert len(set(words.values())) == 6 and dataset.words(7) == words and dataset.words(8) != words
    example = dataset.example(5, episode=7)
    assert example["answers"] == [words[dataset._describe(5)[0].objects[0].color]]
    data = batch(tokenizer, 4)
    counts = (data["tokens"] == tokenizer.media_id).sum(1)
    assert data["images"].shape[:2] == (4, int(counts.max())) and data["images"].shape[2:] == (3, 32, 32)


def test_induction_rows_repeat_a_string_and_train_on_the_repeat(tokenizer):
    from crossmodal.data import InterleavedItems
    from crossmodal.losses import lm_labels

    base = build_dataset("shapes_icl:train:200")
    items = InterleavedItems(base, text_only=True, induction_fraction=0.3, seed=5)
    keys = [(1, i) for i in range(200)]
    chosen = [key for key in keys if "induction_seed" in items[key]]
    assert 40 <= len(chosen) <= 80  # ~30 %, by (seed, epoch, index) alone
    assert [items[key] for key in chosen] == [InterleavedItems(base, True, 0.3, seed=5)[key] for key in chosen]
    assert chosen != [key for key in keys if "induction_seed" in InterleavedItems(base, True, 0.3, seed=6)[key]]
    text_row = next(key for key in keys if key not in chosen)
    data = InterleavedCollate(tokenizer, 32, 96, text_only=True)([items[chosen[0]], items[text_row]])
    row, length = data["tokens"][0].tolist(), int(data["prompt_lengths"][0])
    n = length - 2
    assert 10 <= n <= 40 and row[0] == tokenizer.bos_id and row[1 : n + 1] == row[n + 1 : 2 * n + 1]
    assert set(row[2 * n + 1 :]) == {tokenizer.pad_id}
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.media_id, tokenizer.eoc_id}
    assert not specials & set(row[1 : 2 * n + 1])
    assert data["prompt_lengths"][1] == 0 and data["tokens"][1, 0] == tokenizer.bos_id
    labels = lm_labels(data["tokens"], tokenizer.pad_id, data["prompt_lengths"])
    assert (labels[0, :length] == -100).all() and labels[0, length : 2 * n + 1].tolist() == row[length : 2 * n + 1]
    assert (labels[1] != -100).sum() == (data["tokens"][1] != tokenizer.pad_id).sum()


def test_interleaved_documents(tmp_path, tokenizer):
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "a.png")
    document = {"texts": ["a page", None, "a red square", None, "the end"], "images": [None, "a.png", None, "a.png", None]}
    (tmp_path / "docs.jsonl").write_text(json.dumps(document) + "\n")
    assert document_text(document["texts"], [bool(i) for i in document["images"]]) == (
        f"a page{MEDIA}a red square{END_OF_CHUNK}{MEDIA}the end{END_OF_CHUNK}")
    item = build_dataset(f"interleaved:{tmp_path / 'docs.jsonl'}")[0]
    assert len(item["images"]) == 2
    data = InterleavedCollate(tokenizer, 32, 96)([item])
    assert data["images"].shape == (1, 2, 3, 32, 32)


def test_fewshot_evaluation_json(tokenizer):
    model = tiny_flamingo(tokenizer, open_gates=True)
    results = fewshot.evaluate(model, tokenizer, "shapes_icl:val:4", "fewshot_vqa", 32, "cpu", shots=(0, 2),
                               seeds=(0, 1), log=None)
    assert set(results["shots"]) == {"0", "2"} and results["num_queries"] == 4
    assert all(0 <= value["mean"] <= 100 and len(value["runs"]) == 2 for value in results["shots"].values())
    rices = fewshot.evaluate(model, tokenizer, "shapes:val:6", "fewshot_caption", 32, "cpu", shots=(2,), seeds=(0,),
                             rices=True, num_queries=3, log=None)
    assert rices["demonstrations"] == "rices" and rices["shots"]["2"]["mean"] >= 0


def test_text_only_writes_every_colour_as_one_piece(tokenizer):
    dataset = build_dataset("shapes_icl:train:50", 32)
    for index in [i for i in range(30) if dataset.kind(i) == "words"]:  # (captions name colours too)
        pieces = tokenizer._processor.encode_as_pieces(dataset.text_only(index))
        colors = dataset.colors(index)
        assert [piece for piece in pieces if piece.lstrip("▁") in set(colors)] == [f"▁{c}" for c in colors]


class Oracle(torch.nn.Module):
    """Predicts each next token right, reading it from the input (teacher forcing)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        following = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
        return torch.nn.functional.one_hot(following, self.vocab_size).float()


def test_words_rule_accuracy_counts_seen_and_unseen_answers(tokenizer):
    whole = SentencePieceTokenizer(tokenizer.model_path, context_length=160)  # no episode cut: every answer counts
    oracle = fewshot.words_rule_accuracy(Oracle(tokenizer.vocab_size), whole, "shapes_icl:val:60", "cpu",
                                         batch_size=7)
    # copying one of the earlier distinct answers at random: 1 / (distinct colours before) per seen-colour answer
    data, chances = build_dataset("shapes_icl:val:60"), []
    for index in (i for i in range(60) if data.kind(i) == "words"):
        colors = data.colors(index)
        chances += [1 / len(set(colors[:k])) for k in range(len(colors)) if colors[k] in colors[:k]]
    assert oracle.pop("words_copy_chance") == pytest.approx(100 * sum(chances) / len(chances))
    assert oracle == {"words_seen_accuracy": 100.0, "words_unseen_accuracy": 100.0, "words_copy_rate": 100.0}

    class Constant(Oracle):  # always the first colour word of WORDS: right only where that is the answer
        def forward(self, tokens):
            return torch.nn.functional.one_hot(torch.full_like(tokens, tokenizer.encode("dax")[-1]),
                                               self.vocab_size).float()

    constant = fewshot.words_rule_accuracy(Constant(tokenizer.vocab_size), tokenizer, "shapes_icl:val:60", "cpu")
    assert 0 <= constant["words_seen_accuracy"] < 40 and 0 <= constant["words_unseen_accuracy"] < 40
    assert constant["words_copy_rate"] < 60  # "dax" is an earlier answer only in episodes that drew it
    with pytest.raises(ValueError, match="needs a shapes_icl spec"):
        fewshot.words_rule_accuracy(Oracle(4), tokenizer, "shapes:val:4", "cpu")


def test_words_rule_accuracy_of_a_flamingo_compares_true_and_shuffled_images(tokenizer):
    class Reader(torch.nn.Module):  # a stub Flamingo: every next token right with its own images, 0 with others
        perceiver = None

        def __init__(self):
            super().__init__()
            self.data = build_dataset("shapes_icl:val:60")  # as words_rule_accuracy builds it

        def encode_media(self, images):
            return images

        def logits(self, tokens, media):  # right wherever the images are the tokens' own (an identity check)
            own = torch.stack([m.flatten(1).sum(1) for m in media])
            following = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
            right = torch.nn.functional.one_hot(following, tokenizer.vocab_size).float()
            wrong = torch.nn.functional.one_hot(torch.zeros_like(tokens), tokenizer.vocab_size).float()
            matches = torch.tensor([bool(torch.equal(a, b)) for a, b in zip(own, self.own)])[:, None, None]
            return torch.where(matches, right, wrong)

    reader = Reader()
    items = [reader.data[i] for i in range(60) if reader.data.kind(i) == "words"]
    reader.own = torch.stack([m.flatten(1).sum(1) for m in InterleavedCollate(tokenizer, 32, 96)(items)["images"]])
    scores = fewshot.words_rule_accuracy(reader, tokenizer, "shapes_icl:val:60", "cpu", batch_size=64, image_size=32)
    assert scores["words_seen_accuracy"] == 100.0 and scores["words_unseen_accuracy"] == 100.0
    assert scores["words_seen_accuracy_shuffled"] == 0.0 and scores["words_copy_rate_shuffled"] == 0.0


def test_language_model_and_flamingo_runs_start_from_an_earlier_run(tmp_path, tokenizer):
    from crossmodal.config import load_config
    from crossmodal.recipes import model_from_config

    for name in ("lm-tiny", "Flamingo-tiny"):
        cfg = load_config(None, [f"--model.name={name}", "--data.image_size=32"])
        source = model_from_config(cfg, tokenizer)
        path = tmp_path / f"{name}.pt"
        torch.save({"model": source.state_dict(), "config": {}, "tokenizer": b"spm"}, path)
        cfg.model.pretrained = str(path)
        torch.manual_seed(1)
        model = model_from_config(cfg, tokenizer)
        assert all(torch.equal(mine, theirs) for mine, theirs in zip(model.state_dict().values(),
                                                                     source.state_dict().values()))
    cfg.model.pretrained = str(tmp_path)  # not a run's checkpoint
    with pytest.raises(ValueError, match="a Flamingo run starts from another run's checkpoint.pt"):
        model_from_config(cfg, tokenizer)


def test_a_resnet_tower_gives_its_attention_pool_tokens_and_keeps_its_statistics(tokenizer):
    """Flamingo-RN-tiny: the resampler reads the CLIP ResNet's 5 attention-pool tokens (the pooled one and the 2x2
    grid at 64x64), and training mode leaves the frozen tower's BatchNorm statistics as they were."""
    torch.manual_seed(0)
    model = create_flamingo("Flamingo-RN-tiny", tokenizer, image_size=64, context_length=96)
    tower = model.vision_encoder
    images = torch.randn(2, 3, 3, 64, 64)  # (B, T_media, 3, H, W)
    statistics = {name: buffer.clone() for name, buffer in tower.named_buffers()}
    model.train()
    assert not tower.training and model.perceiver.training
    media = model.encode_media(images)
    assert media.shape == (2, 3, 8, tower.output_dim)  # (B, T_media, latents, vis_dim)
    assert all(torch.equal(buffer, statistics[name]) for name, buffer in tower.named_buffers())
    expected = model.perceiver(tower.forward_tokens(images.flatten(0, 1)).view(2, 3, 1, 5, tower.output_dim))
    torch.testing.assert_close(media, expected)
