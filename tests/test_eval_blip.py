"""eval.py's BLIP tasks (caption, vqa, retrieval with ITM re-ranking, zero-shot through ITC) on a BLIP-tiny
checkpoint written as train.py writes one, against hand computations; and the message for a task a family
cannot do."""
import dataclasses
import json
import os

import pytest
import torch

from crossmodal import eval as evaluation
from crossmodal.config import Config
from crossmodal.data import build_dataset, question_loader, retrieval_loader, train_loader
from crossmodal.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from crossmodal.metrics import caption_scores, vqa_score
from crossmodal.models import create_model
from crossmodal.recipes import model_from_config
from crossmodal import recipes
from crossmodal.evaluation import contrastive
from crossmodal.evaluation import blip as blip_evaluation
from crossmodal.data import eval_loader


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_checkpoint(path, cfg, model, tokenizer) -> str:
    """The keys train.py's save() writes that eval.py reads."""
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg), "tokenizer": tokenizer.model_bytes(),
                "step": 0}, path)
    return str(path)


@pytest.fixture(scope="module")
def blip_run(tmp_path_factory):
    """A BLIP-tiny run's checkpoint with a sentencepiece tokenizer that has [DEC] and [ENC] (random weights)."""
    folder = tmp_path_factory.mktemp("blip_run")
    dataset = build_dataset("shapes:train:300")
    texts = [text for i in range(len(dataset)) for text in (dataset[i]["caption"], dataset[i]["question"])]
    tokenizer = SentencePieceTokenizer(train_sentencepiece(texts + ["question: answer:"], folder / "spm", 256,
                                                           blip_tokens=True), context_length=32)
    cfg = Config()
    cfg.model.name, cfg.data.image_size, cfg.data.context_length = "BLIP-tiny", 64, 32
    cfg.data.val, cfg.data.heldout = "shapes:val:6", "shapes:heldout:6"
    torch.manual_seed(0)
    model = model_from_config(cfg, tokenizer)
    path = write_checkpoint(folder / "checkpoint.pt", cfg, model, tokenizer)
    return path, *recipes.load_run(path)


def test_rerank_scores_by_hand():
    similarity = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.3], [0.4, 0.6, 0.7]])  # (images, texts)
    itm = torch.tensor([[1.0, 5.0, -2.0], [0.0, 2.0, 3.0], [4.0, -1.0, 1.5]])  # match logit of (image, text)
    calls = []

    def itm_positive(image_index, text_index):
        calls.append(len(image_index))
        return itm[image_index, text_index]

    i2t, t2i = blip_evaluation.rerank_scores(similarity, itm_positive, k_test=2, batch_size=4)
    # image 0's top-2 texts by ITC: 0 (0.9) and 2 (0.5); image 1: 1, 2; image 2: 2, 1
    expected_i2t = torch.tensor([[1.0 + 0.9, -100, -2.0 + 0.5], [-100, 2.0 + 0.8, 3.0 + 0.3],
                                 [-100, -1.0 + 0.6, 1.5 + 0.7]])
    # text 0's top-2 images: 0 (0.9), 2 (0.4); text 1: 1 (0.8), 2 (0.6); text 2: 2 (0.7), 0 (0.5)
    expected_t2i = torch.tensor([[1.0 + 0.9, -100, 4.0 + 0.4], [-100, 2.0 + 0.8, -1.0 + 0.6],
                                 [-2.0 + 0.5, -100, 1.5 + 0.7]])
    torch.testing.assert_close(i2t, expected_i2t)
    torch.testing.assert_close(t2i, expected_t2i)
    assert calls == [4, 2, 4, 2]  # 6 pairs each way in batches of 4
    recalls = contrastive.ranking_recalls(i2t, t2i, torch.arange(3), ks=(1, 2))
    # image 1 ranks text 2 first (3.3 > 2.8), image 2 text 2 (true); text 0 ranks image 2 first (4.4 > 1.9)
    assert recalls["image_to_text_R@1"] == pytest.approx(200 / 3) and recalls["image_to_text_R@2"] == 100.0
    assert recalls["text_to_image_R@1"] == pytest.approx(200 / 3)


@torch.no_grad()
def test_retrieval_itm_by_hand_and_k_test_one(blip_run, tmp_path):
    path, cfg, model, tokenizer = blip_run
    spec = "shapes:val:5"
    out = tmp_path / "retrieval.json"
    results = evaluation.main(["--checkpoint", path, "--task", "retrieval", "--data", spec, "--out", str(out)])
    written = json.loads(out.read_text())
    for prefix in ("itc", "itm"):
        for direction in ("image_to_text", "text_to_image"):
            assert written[f"{prefix}_{direction}_R@1"] == results[f"{prefix}_{direction}_R@1"]
            assert written[f"{prefix}_{direction}_R@1"] <= written[f"{prefix}_{direction}_R@5"]
    assert written["k_test"] == 5 and written["num_images"] == 5 and "image_to_text_R@1" not in written
    # by hand: every pair re-ranked (k_test >= 5), score = itm_logits(image, text)[1] + cosine similarity
    loader, tokens, text_to_image = retrieval_loader(spec, 64, tokenizer, batch_size=5)
    images = next(iter(loader))["image"]
    similarity = model.encode_image(images) @ model.encode_text(tokens).T
    itm = torch.stack([model.itm_logits(images[i].expand(5, -1, -1, -1), tokens)[:, 1] for i in range(5)])
    scores = itm + similarity  # (images, texts)
    expected = contrastive.ranking_recalls(scores, scores.T, text_to_image)
    for name, value in expected.items():
        assert results[f"itm_{name}"] == pytest.approx(value), name
    results = evaluation.main(["--checkpoint", path, "--task", "retrieval", "--data", spec, "--k-test", "1"])
    for direction in ("image_to_text", "text_to_image"):  # the ITC first stays first
        assert results[f"itm_{direction}_R@1"] == results[f"itc_{direction}_R@1"]


def test_caption_scores_are_those_of_the_listed_captions(blip_run, tmp_path):
    path, cfg, model, tokenizer = blip_run
    out = tmp_path / "caption.json"
    evaluation.main(["--checkpoint", path, "--task", "caption", "--data", "shapes:val:4", "--num-beams", "2",
                     "--max-length", "12", "--min-length", "6", "--out", str(out), "--batch-size", "3"])
    written = json.loads(out.read_text())
    dataset = build_dataset("shapes:val:4")
    assert [c["references"] for c in written["captions"]] == [[dataset[i]["caption"]] for i in range(4)]
    assert [c["image"] for c in written["captions"]] == [dataset[i]["key"] for i in range(4)]
    images = torch.stack([eval_loader("shapes:val:4", 64, tokenizer, 4)[1].dataset[i]["image"]
                          for i in range(4)])
    assert [c["caption"] for c in written["captions"]] == model.generate(images, num_beams=2, max_length=12,
                                                                         min_length=6)
    expected = caption_scores({i: c["caption"] for i, c in enumerate(written["captions"])},
                              {i: c["references"] for i, c in enumerate(written["captions"])})
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"):
        assert written[name] == pytest.approx(expected[name])


@torch.no_grad()
def test_vqa_rank_picks_the_most_likely_answer(blip_run, tmp_path):
    path, cfg, model, tokenizer = blip_run
    spec = "shapes:val:4"
    results = evaluation.main(["--checkpoint", path, "--task", "vqa", "--data", spec, "--vqa-mode", "rank",
                               "--batch-size", "3"])
    candidates = blip_evaluation.dataset_answers(build_dataset(spec))
    assert results["num_candidates"] == len(candidates) == len(set(candidates))
    _, loader = question_loader(spec, 64, batch_size=4)
    batch = next(iter(loader))
    image_tokens = model.forward_image(batch["image"])
    for i, question in enumerate(batch["question"]):
        prompt = tokenizer(f"question: {question} answer:")[0].tolist()
        prompt = prompt[: prompt.index(tokenizer.eos_id)]  # [bos] pieces; [bos] becomes [DEC]
        likelihoods = []
        for answer in candidates:
            row = tokenizer(answer)[0].tolist()
            sequence = torch.tensor([prompt + row[1 : row.index(tokenizer.eos_id) + 1]])  # answer pieces and eos
            log_probs = model.decoder_logits(sequence, image_tokens[i : i + 1])[0].log_softmax(-1)
            likelihoods.append(sum(float(log_probs[t - 1, sequence[0, t]]) for t in range(len(prompt),
                                                                                           sequence.shape[1])))
        assert results["predictions"][i]["answer"] == candidates[max(range(len(candidates)),
                                                                     key=likelihoods.__getitem__)]
    predictions = {row["question_id"]: row["answer"] for row in results["predictions"]}
    truth = {row["question_id"]: [row["answers"][0]] * 10 for row in results["predictions"]}
    assert results["accuracy"] == pytest.approx(vqa_score(predictions, truth))
    # more candidates than --answer-k: BLIP's first-token shortlist; with k=1 only the first token decides
    short = evaluation.main(["--checkpoint", path, "--task", "vqa", "--data", spec, "--answer-k", "1"])
    assert len(short["predictions"]) == 4


def test_vqa_answers_by_hand_count_as_ten():
    assert blip_evaluation.reference_answers(["two"]) == ["2"] * 10
    assert vqa_score({0: "two"}, {0: blip_evaluation.reference_answers(["two"])}) == 100.0


def test_vqa_generate_on_a_vqa_spec(blip_run, tmp_path):
    from tests.test_vqa_data import write_vqa

    path, cfg, model, tokenizer = blip_run
    spec = "vqa:" + write_vqa(tmp_path / "vqa")
    out = tmp_path / "vqa.json"
    results = evaluation.main(["--checkpoint", path, "--task", "vqa", "--data", spec, "--vqa-mode", "generate",
                               "--num-beams", "2", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["num_questions"] == 4 and 0 <= written["accuracy"] <= 100 and written["mode"] == "generate"
    predictions = {row["question_id"]: row["answer"] for row in results["predictions"]}
    answers = {row["question_id"]: row["answers"] for row in results["predictions"]}
    assert written["accuracy"] == pytest.approx(vqa_score(predictions, answers))
    assert all(isinstance(answer, str) for answer in predictions.values())
    (tmp_path / "answers.txt").write_text("red\nblue\nyes\n")
    ranked = evaluation.main(["--checkpoint", path, "--task", "vqa", "--data", spec, "--answers",
                              str(tmp_path / "answers.txt")])
    assert ranked["num_candidates"] == 3 and {row["answer"] for row in ranked["predictions"]} <= {"red", "blue", "yes"}


def test_finetuning_starts_from_a_run_and_trains_what_it_is_told(blip_run, tmp_path):
    """model.pretrained (a run's checkpoint, positions resized to a new image size), blip.losses and
    blip.prompt (caption finetuning), and VQA finetuning on a vqa spec (questions only: blip_qa_fraction=1)."""
    import copy

    from crossmodal import train
    from tests.test_vqa_data import write_vqa

    path, cfg, run_model, tokenizer = blip_run
    vqa = copy.deepcopy(cfg)
    vqa.data.train, vqa.data.val, vqa.data.heldout = "vqa:" + write_vqa(tmp_path / "vqa"), "shapes:val:4", ""
    vqa.data.image_size, vqa.data.workers, vqa.train.batch_size, vqa.train.steps = 96, 0, 4, 1
    vqa.model.pretrained, vqa.blip.losses = path, "lm"
    assert "blip.qa_fraction=1" in recipes.check_config(vqa)
    vqa.blip.qa_fraction = 1.0
    assert recipes.check_config(vqa) is None
    vqa.data.tokenizer_path = ""  # no tokenizer named: the run it starts from gives its own, not a new one
    assert recipes.recipe_for(vqa).build_tokenizer(str(tmp_path)).model_bytes() == tokenizer.model_bytes()
    assert not os.path.exists(tmp_path / "tokenizer.model")
    vqa.data.tokenizer = "bert"  # checked before anything runs: the run's tokenizer is a sentencepiece model
    assert "was trained with data.tokenizer=sentencepiece; this run has data.tokenizer=bert" in recipes.check_config(vqa)
    vqa.data.tokenizer = "sentencepiece"
    model = model_from_config(vqa, tokenizer)
    assert model.queue is None and model.visual_encoder_m is None  # no ITC: no momentum encoders
    assert model.visual_encoder.pos_embed.shape[1] == 1 + (96 // 8) ** 2
    torch.testing.assert_close(model.text_decoder.state_dict(), run_model.text_decoder.state_dict())
    (batch,) = list(train_loader(vqa, tokenizer, 0, 1, **recipes.recipe_for(vqa).loader_options()))
    assert "tokens" not in batch and (batch["prompt_lengths"] > 0).all()
    losses = model(batch["image"], None, decoder_tokens=batch["decoder_tokens"], prompt_length=batch["prompt_lengths"])
    assert list(losses) == ["lm"] and losses["lm"].isfinite()

    captioning = copy.deepcopy(cfg)
    captioning.data.train, captioning.data.workers = "shapes:train:8", 0
    captioning.train.batch_size, captioning.train.steps = 4, 1
    captioning.blip.losses, captioning.blip.prompt = "lm", "a picture of "
    (batch,) = list(train_loader(captioning, tokenizer, 0, 1, **recipes.recipe_for(captioning).loader_options()))
    prompt = tokenizer("a picture of")[0]
    length = int((prompt != tokenizer.pad_id).sum()) - 1  # the start token and the prompt, no eos
    assert (batch["prompt_lengths"] == length).all()
    assert (batch["decoder_tokens"][:, :length] == prompt[:length]).all()
    assert not torch.equal(batch["decoder_tokens"], batch["tokens"])

    for losses, message in (("itm,lm", "add itc"), ("itc,foo", "must list some of itc,itm,lm")):
        captioning.blip.losses = losses
        assert message in recipes.check_config(captioning)


def test_evaluate_all_and_zeroshot_for_blip(blip_run):
    path, cfg, model, tokenizer = blip_run
    results = blip_evaluation.evaluate_run(cfg, model, tokenizer, "cpu")
    for key in ("val/top1", "val/itc_image_to_text_R@1", "val/itm_text_to_image_R@10", "val/BLEU-4", "val/CIDEr",
                "val/vqa_accuracy", "heldout/top1"):
        assert key in results, key
    assert all(isinstance(value, (int, float)) for value in results.values())
    zeroshot = evaluation.main(["--checkpoint", path, "--task", "zeroshot", "--data", "shapes:val:6"])
    assert zeroshot["top1"] == results["val/top1"] and zeroshot["num_classes"] == 36


def test_a_clip_checkpoint_cannot_caption(tmp_path, blip_run):
    _, _, _, blip_tokenizer = blip_run
    cfg = Config()
    cfg.data.image_size, cfg.data.context_length = 64, 32
    model = model_from_config(cfg, blip_tokenizer)
    path = write_checkpoint(tmp_path / "clip.pt", cfg, model, blip_tokenizer)
    for task in ("caption", "vqa"):
        with pytest.raises(SystemExit, match=f"a ViT-tiny model \\(ClipRecipe\\) cannot do --task {task}; its tasks: "
                                             f"zeroshot, retrieval, linear_probe, binding \\(--task {task} is "
                                             f"BlipRecipe and LlavaRecipe's\\)"):
            evaluation.main(["--checkpoint", path, "--task", task, "--data", "shapes:val:2"])


def test_a_blip_without_decoder_says_so(blip_run):
    _, _, model, _ = blip_run
    retriever = create_model("BLIP-tiny", tokenizer=model.tokenizer)
    retriever.text_decoder = retriever.lm_head = None
    recipe = recipes.PRESETS["BLIP-tiny"](Config())
    assert "cannot do --task caption: it has no text_decoder" in recipe.check_task("caption", retriever)
    assert recipe.check_task("retrieval", retriever) is None


def test_pretrained_blip_with_bert_vocab(tmp_path):
    from crossmodal.data.tokenizer import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "red", "circle", "question", ":",
             "answer", "yes", "no", "?"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    model = create_model("BLIP-tiny", tokenizer=BertTokenizer(tmp_path / "vocab.txt")).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "model.pth")  # our keys pass the key map unchanged
    arguments = ["--model", "BLIP-tiny", "--pretrained", str(tmp_path / "model.pth"), "--task", "caption", "--data",
                 "shapes:val:2", "--num-beams", "2", "--max-length", "10"]
    results = evaluation.main([*arguments, "--vocab", str(tmp_path / "vocab.txt")])
    assert results["num_images"] == 2
    assert evaluation.main(arguments)["captions"] == results["captions"]  # the vocab.txt next to the weights
    _, loaded, tokenizer = recipes.load_released("BLIP-tiny", str(tmp_path / "model.pth"))
    assert isinstance(tokenizer, BertTokenizer) and tokenizer.context_length == 35 and loaded.dec_id == 16
    (tmp_path / "vocab.txt").unlink()
    with pytest.raises(SystemExit, match="pass --vocab"):
        evaluation.main(arguments)
