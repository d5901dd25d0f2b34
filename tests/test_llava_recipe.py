"""LLaVA as a trained family (recipes/llava.py, data/conversation.py, evaluation/llava.py, the ResNet-tower and
MPT-decoder paths of models/llava.py): the conversation rows and their labels, a LLaVA on the CLIP demo's tower
and the LM demo's decoder against an independent splice, rank mode against a per-pair forward, batched
left-padded generation against one prompt at a time, and the two stages end to end through train.py and eval.py
(what trains, what stays frozen, the JSON keys, one-line errors)."""
import json

import pytest
import torch

from crossmodal import eval as evaluate, train
from crossmodal.data import build_dataset
from crossmodal.data.conversation import conversation_rows, prompt_ids, reply_ids
from crossmodal.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from crossmodal.evaluation.llava import answer_log_likelihoods, left_padded, rank_answers, reply
from crossmodal.losses import lm_labels
from crossmodal.models import create_llava_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    data = build_dataset("shapes:train:400")
    texts = [text for i in range(400) for text in (data[i]["caption"], data[i]["question"], data[i]["answer"])]
    path = train_sentencepiece(texts + ["user: assistant: describe the image briefly."],
                               tmp_path_factory.mktemp("tok") / "tok", 300, flamingo_tokens=True)
    return SentencePieceTokenizer(path, context_length=64)


def tiny_llava(tokenizer, name="LLaVA-RN-tiny", seed=0):
    torch.manual_seed(seed)
    return create_llava_run(name, tokenizer, context_length=128).eval()


def test_conversation_rows_learn_the_reply_and_end_token_only(tokenizer):
    instructions, replies = ["what colour is the circle?", "describe the image briefly."], ["red", "a big blue square"]
    tokens, prompt_lengths = conversation_rows(tokenizer, instructions, replies, 5, tokenizer.media_id, 64)
    labels = lm_labels(tokens, tokenizer.pad_id, prompt_lengths)
    for row, label, instruction, text in zip(tokens.tolist(), labels.tolist(), instructions, replies):
        prompt = prompt_ids(tokenizer, instruction, 5, tokenizer.media_id)
        assert row[: len(prompt)] == prompt and row.count(tokenizer.media_id) == 5
        learned = [token for token in label if token != -100]
        assert learned == reply_ids(tokenizer, text) and learned[-1] == tokenizer.eos_id
        assert tokenizer.decode(learned) == text
    # a reply cut to fit keeps its end token; a prompt that leaves no room fails naming the setting
    short, _ = conversation_rows(tokenizer, instructions[:1], ["red " * 40], 5, tokenizer.media_id, 24)
    assert short.shape[1] == 24 and short[0, -1] == tokenizer.eos_id
    with pytest.raises(ValueError, match="data.context_length=8"):
        conversation_rows(tokenizer, instructions[:1], ["red"], 5, tokenizer.media_id, 8)


@pytest.mark.parametrize("name", ["LLaVA-RN-tiny", "LLaVA-ViT-tiny", "LLaVA-RN-llama-tiny"])
@torch.no_grad()
def test_image_tokens_take_the_projected_tower_tokens(tokenizer, name):
    """The logits equal the language model's on embeddings spliced by hand: the ResNet's attention-pool tokens
    (the pooled one first, "full") or the ViT's second-to-last block without CLS, through the projector."""
    model = tiny_llava(tokenizer, name)
    images = torch.randn(2, 3, 64, 64)
    if name.startswith("LLaVA-RN"):
        tokens = model.vision_tower.forward_tokens(images)  # (2, 5, 128)
        assert model.features_per_image == 5
    else:
        tokens = model.vision_tower.hidden_states(images, [-2])[0][:, 1:]  # (2, 64, 128)
        assert model.features_per_image == 64
    features = model.multi_modal_projector(tokens)
    rows, _ = conversation_rows(tokenizer, ["what colour is the circle?", "how many shapes are there?"],
                                ["red", "two"], model.features_per_image, tokenizer.media_id, 128)
    embeddings = []
    for row, feature in zip(rows, features):
        where = (row == tokenizer.media_id).nonzero()[:, 0]
        first, last = int(where[0]), int(where[-1]) + 1
        assert last - first == model.features_per_image  # contiguous, as the template writes them
        embed = model.language_model.token_embedding
        embeddings.append(torch.cat([embed(row[:first]), feature, embed(row[last:])]))
    expected = model.language_model.forward_embeddings(torch.stack(embeddings))
    torch.testing.assert_close(model(images, rows), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="image tokens"):
        model(images[:1], rows)


@torch.no_grad()
def test_rank_mode_picks_the_most_likely_reply_of_a_per_pair_forward(tokenizer):
    model = tiny_llava(tokenizer)
    images = torch.randn(3, 3, 64, 64)
    questions = ["what colour is the circle?", "is there a red square?", "where is the blue triangle?"]
    candidates = [reply_ids(tokenizer, text) for text in ("red", "yes", "no", "on the left", "two")]
    prompts = [prompt_ids(tokenizer, q, 5, tokenizer.media_id) for q in questions]
    features = model.image_features(images)
    pairs = [(q, ids) for q in range(3) for ids in candidates]
    scores = answer_log_likelihoods(model, features, prompts, pairs, batch_size=4).view(3, 5)
    for q in range(3):
        for c, ids in enumerate(candidates):
            row = torch.tensor([prompts[q] + ids])
            log_probs = model(images[q : q + 1], row)[0, :-1].log_softmax(-1)
            expected = sum(log_probs[len(prompts[q]) - 1 + i, token] for i, token in enumerate(ids))
            assert abs(scores[q, c].item() - expected.item()) < 1e-4
    best = rank_answers(model, features, prompts, candidates)
    assert best == scores.argmax(1).tolist()
    assert rank_answers(model, features, prompts, candidates, answer_k=2) == [  # shortlisted by first token
        best_q if best_q in shortlist else shortlist[int(scores[q, shortlist].argmax())]
        for q, (best_q, shortlist) in enumerate(zip(best, first_token_shortlists(model, features, prompts,
                                                                                  candidates, 2)))]


def first_token_shortlists(model, features, prompts, candidates, k):
    lists = []
    for q, prompt in enumerate(prompts):
        logits = model(None, torch.tensor([prompt]), features=features[q : q + 1])[0, -1].log_softmax(-1)
        lists.append(logits[[ids[0] for ids in candidates]].topk(k).indices.tolist())
    return lists


@pytest.mark.parametrize("name", ["LLaVA-RN-tiny", "LLaVA-RN-llama-tiny"])
@torch.no_grad()
def test_left_padded_replies_equal_one_prompt_at_a_time(tokenizer, name):
    """ALiBi (lm-tiny) and rotary (llama-tiny) decoders under left padding: each reply is the one its prompt gets
    alone."""
    model = tiny_llava(tokenizer, name, seed=3)
    images = torch.randn(3, 3, 64, 64)
    questions = ["what colour is the background?", "is there a big orange circle on the left?", "describe it."]
    together = reply(model, tokenizer, images, questions, max_new_tokens=6)
    alone = [reply(model, tokenizer, images[i : i + 1], [q], max_new_tokens=6)[0] for i, q in enumerate(questions)]
    assert together == alone
    tokens, mask = left_padded([[5, 6], [7, 8, 9]], 0)
    assert tokens.tolist() == [[0, 5, 6], [7, 8, 9]] and mask.tolist() == [[False, True, True], [True, True, True]]


def small_runs(tmp_path):
    """A CLIP run (RN-tiny) and a language-model run (lm-tiny), two steps each: the starts of a LLaVA run."""
    clip, lm = tmp_path / "clip", tmp_path / "lm"
    train.main(["--config", "configs/clip/tiny_shapes.yaml", f"--out_dir={clip}", "--train.steps=2",
                "--train.batch_size=8", "--data.val=shapes:val:16", "--data.heldout=", "--data.workers=0",
                "--data.tokenizer_captions=300", "--train.warmup_steps=1"])
    train.main(["--config", "configs/lm/tiny_shapes.yaml", f"--out_dir={lm}", "--train.steps=2",
                "--train.batch_size=8", "--data.val=shapes_icl:val:8", "--data.tokenizer_captions=300",
                "--data.vocab_size=300", "--train.warmup_steps=1"])
    return clip / "checkpoint.pt", lm / "checkpoint.pt"


def llava_args(out_dir, *extra):
    return ["--model.name=LLaVA-RN-tiny", f"--out_dir={out_dir}", "--data.train=shapes:train",
            "--data.val=shapes:val:16", "--data.heldout=", "--data.workers=0", "--train.steps=3",
            "--train.batch_size=8", "--train.warmup_steps=1", "--train.lr=1e-2", *extra]


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_two_stages_train_what_llava_trains_and_evaluate(tmp_path):
    clip, lm = small_runs(tmp_path)
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    results = train.main(llava_args(stage1, f"--model.vision_checkpoint={clip}", f"--llava.lm_checkpoint={lm}"))
    assert {"val/vqa_accuracy", "val/CIDEr"} <= set(results)
    start_clip, start_lm, one = weights(clip), weights(lm), weights(stage1 / "checkpoint.pt")
    for key, value in start_clip.items():  # the tower, BatchNorm statistics included, is the CLIP run's
        if key.startswith("visual.") and key != "visual.proj":
            assert torch.equal(one["vision_tower." + key[len("visual."):]], value), key
    assert all(torch.equal(one["language_model." + key], value) for key, value in start_lm.items())  # LM frozen
    train.main(llava_args(stage2, f"--model.pretrained={stage1 / 'checkpoint.pt'}", "--llava.train=projector,lm",
                          "--llava.qa_fraction=0.75"))
    two = weights(stage2 / "checkpoint.pt")
    assert all(torch.equal(two[key], one[key]) for key in one if key.startswith("vision_tower."))
    assert any(not torch.equal(two[key], one[key]) for key in one if key.startswith("language_model."))
    assert any(not torch.equal(two[key], one[key]) for key in one if key.startswith("multi_modal_projector."))
    out = tmp_path / "vqa.json"
    evaluate.main(["--checkpoint", str(stage2 / "checkpoint.pt"), "--task", "vqa", "--data", "shapes:val:12",
                   "--out", str(out)])
    saved = json.loads(out.read_text())
    assert 0 <= saved["accuracy"] <= 100 and saved["num_questions"] == 12 and saved["mode"] == "rank"
    out = tmp_path / "caption.json"
    evaluate.main(["--checkpoint", str(stage2 / "checkpoint.pt"), "--task", "caption", "--data", "shapes:val:6",
                   "--out", str(out)])
    saved = json.loads(out.read_text())
    assert {"BLEU-4", "CIDEr", "num_images", "captions"} <= set(saved) and saved["num_images"] == 6


def test_bad_llava_configs_fail_in_one_line_before_training(tmp_path, capsys):
    def fails(*args, match):
        with pytest.raises(SystemExit, match=match):
            train.main(llava_args(tmp_path / "run", *args))

    fails(match=r"model.vision_checkpoint is empty")
    fails(f"--model.vision_checkpoint={tmp_path}", f"--llava.lm_checkpoint={tmp_path}",
          match=r"model.vision_checkpoint: no train.py checkpoint")
    fails("--llava.train=lm", match=r"llava.train must be one of projector, projector,lm; got 'lm'")
    fails("--llava.select=cls", match=r"llava.select must be one of default, full")
    with pytest.raises(SystemExit, match=r"llava.lm_checkpoint, llava.qa_fraction and llava.train are LLaVA settings"):
        train.main(["--config", "configs/clip/tiny_shapes.yaml", f"--out_dir={tmp_path / 'clip'}",
                    "--llava.qa_fraction=0.5"])
    assert not (tmp_path / "run").exists()
