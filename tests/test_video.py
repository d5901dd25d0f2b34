"""Video CLIP (models/video.py, recipes/video.py, evaluation/video.py) and Flamingo over frames: mean pooling equals
the mean of CLIP's normalised frame features; the temporal Transformer equals it at initialisation, changes after a
step, sees frame order (mean pooling does not) and passes gradients to every part; the retrieval metrics (several
captions per clip, MSR-VTT's protocol) against a brute-force count on hand-made similarities and a hand-computed
case; train.py end to end on moving_shapes from an image CLIP run, then eval.py --task video_retrieval; retrieval over
mp4 clips listed in a CSV (several captions, a broken file); the Flamingo resampler's time embeddings, and few-shot
prompts over clips (moving_shapes questions, captions of mp4 clips)."""
import contextlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from crossmodal import eval as evaluation
from crossmodal import train
from crossmodal.config import Failure, load_config
from crossmodal.data import build_dataset, train_loader
from crossmodal.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from crossmodal.evaluation import fewshot
from crossmodal.evaluation.contrastive import ranking_recalls
from crossmodal.evaluation.video import match_ranks, video_retrieval_metrics
from crossmodal.models import create_flamingo, create_lm, create_model
from crossmodal.models.flamingo import Flamingo
from crossmodal.models.video import VideoCLIP
from crossmodal.recipes import recipe_for, resolve
from crossmodal.recipes.video import VideoRecipe

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_clip(name: str = "ViT-tiny", seed: int = 0):
    torch.manual_seed(seed)
    return create_model(name, vocab_size=64, context_length=8)


def clips_and_tokens(batch: int = 3, frames: int = 4, size: int = 64, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    clips = torch.randn(batch, frames, 3, size, size, generator=generator)
    tokens = torch.randint(1, 64, (batch, 8), generator=generator)
    return clips, tokens


# ---------------------------------------------------------------- models/video.py


@pytest.mark.parametrize("name", ["ViT-tiny", "RN-tiny"])
def test_mean_pool_is_the_mean_of_normalised_frame_features(name):
    clip = tiny_clip(name).eval()
    model = VideoCLIP(clip, "mean", max_frames=4).eval()
    clips, tokens = clips_and_tokens()
    with torch.no_grad():
        frames = torch.stack([clip.encode_image(clips[:, t], normalize=True) for t in range(4)], 1)  # (B, T, D)
        expected = F.normalize(frames.mean(1), dim=-1)
        out = model(clips, tokens)
    torch.testing.assert_close(out["image_features"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["text_features"], clip.encode_text(tokens, normalize=True))
    assert out["logit_scale"] == clip.logit_scale.exp() and out["logit_bias"] is None
    assert list(dict(model.named_parameters())) == ["clip." + name for name, _ in clip.named_parameters()]


def test_transformer_pool_starts_as_mean_and_differs_after_a_step():
    clip = tiny_clip()
    mean = VideoCLIP(clip, "mean", max_frames=4).eval()
    temporal = VideoCLIP(clip, "transformer", max_frames=4, temporal_layers=2).eval()
    clips, tokens = clips_and_tokens()
    with torch.no_grad():
        start = temporal.encode_video(clips, normalize=True)
        torch.testing.assert_close(start, mean.encode_video(clips, normalize=True), rtol=0, atol=0)

    optimizer = torch.optim.SGD(temporal.temporal.parameters(), lr=0.1)
    out = temporal.train()(clips, tokens)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    F.cross_entropy(logits, torch.arange(len(logits))).backward()
    optimizer.step()
    with torch.no_grad():
        after = temporal.eval().encode_video(clips, normalize=True)
    assert (after - start).abs().max() > 1e-4


def trained_temporal_model() -> VideoCLIP:
    """A temporal model whose output projection is no longer zero and whose frame positions have grown apart (as
    after training; without position embeddings the module would not see order: attention is permutation
    equivariant and the mean invariant)."""
    model = VideoCLIP(tiny_clip(), "transformer", max_frames=4).eval()
    torch.nn.init.normal_(model.temporal.proj.weight, std=0.5)
    torch.nn.init.normal_(model.temporal.pos_embed, std=0.1)
    return model


def test_the_transformer_sees_frame_order_and_the_mean_does_not():
    temporal = trained_temporal_model()
    mean = VideoCLIP(temporal.clip, "mean", max_frames=4).eval()
    clips, _ = clips_and_tokens()
    reversed_clips = clips.flip(1)
    with torch.no_grad():
        torch.testing.assert_close(mean.encode_video(reversed_clips), mean.encode_video(clips), rtol=1e-5, atol=1e-6)
        change = (temporal.encode_video(reversed_clips) - temporal.encode_video(clips)).abs().max()
    assert change > 1e-3


def test_gradients_reach_every_part_of_the_temporal_model():
    model = trained_temporal_model().train()
    clips, tokens = clips_and_tokens(batch=2)
    out = model(clips, tokens)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    F.cross_entropy(logits, torch.arange(len(logits))).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_gradcheck_of_the_temporal_module_in_float64():
    model = trained_temporal_model().temporal.double()
    frames = torch.randn(2, 3, model.pos_embed.shape[1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (frames,), eps=1e-6, atol=1e-5)


def test_more_frames_than_position_embeddings_is_one_line():
    model = VideoCLIP(tiny_clip(), "transformer", max_frames=2)
    with pytest.raises(ValueError, match="clip of 4 frames.*position embeddings for 2"):
        model.encode_video(clips_and_tokens(batch=1)[0])
    with pytest.raises(ValueError, match="pool must be one of mean, transformer"):
        VideoCLIP(tiny_clip(), "max")


# ---------------------------------------------------------------- evaluation/video.py


def brute_force(similarity: torch.Tensor, text_to_video: list[int], unreadable: set[int] = frozenset()) -> dict:
    """Ranks counted one by one: ties go to the lower index; an unreadable clip is no candidate, and its queries
    and its captions' queries rank after every candidate."""
    num_videos, num_texts = similarity.shape
    text_ranks = []
    for t, v in enumerate(text_to_video):
        if v in unreadable:
            text_ranks.append(num_videos + 1)
            continue
        score = similarity[v, t]
        better = [u for u in range(num_videos) if u not in unreadable
                  and (similarity[u, t] > score or (similarity[u, t] == score and u < v))]
        text_ranks.append(1 + len(better))
    video_ranks = []
    for v in range(num_videos):
        if v in unreadable:
            video_ranks.append(num_texts + 1)
            continue
        ranks = []
        for c in (t for t in range(num_texts) if text_to_video[t] == v):
            score = similarity[v, c]
            ranks.append(1 + sum(1 for t in range(num_texts)
                                 if similarity[v, t] > score or (similarity[v, t] == score and t < c)))
        video_ranks.append(min(ranks))
    results = {}
    for direction, ranks in (("text_to_video", text_ranks), ("video_to_text", video_ranks)):
        for k in (1, 5, 10):
            results[f"{direction}_R@{k}"] = 100.0 * sum(rank <= k for rank in ranks) / len(ranks)
        ordered = sorted(ranks)
        middle = len(ordered) // 2
        results[f"{direction}_median_rank"] = (ordered[middle] if len(ordered) % 2
                                               else (ordered[middle - 1] + ordered[middle]) / 2)
        results[f"{direction}_mean_rank"] = sum(ranks) / len(ranks)
    return results


def metrics_of_similarity(similarity: torch.Tensor, text_to_video: list[int], unreadable=None) -> dict:
    """video_retrieval_metrics on a given similarity: identity video features, the similarity's columns as text."""
    num_videos = similarity.shape[0]
    mask = None if unreadable is None else torch.tensor([v in unreadable for v in range(num_videos)])
    return video_retrieval_metrics(torch.eye(num_videos), similarity.T, torch.tensor(text_to_video), mask)


def test_metrics_on_a_hand_made_case():
    # 3 clips; clip 0 has captions 0, 1; clip 1 has caption 2; clip 2 has captions 3, 4, 5
    similarity = torch.tensor([[0.9, 0.1, 0.5, 0.2, 0.0, 0.3],
                               [0.8, 0.7, 0.4, 0.1, 0.6, 0.2],
                               [0.1, 0.2, 0.6, 0.3, 0.9, 0.1]])
    text_to_video = [0, 0, 1, 2, 2, 2]
    results = metrics_of_similarity(similarity, text_to_video)
    # text -> video ranks: t0: clip 0 first (0.9) -> 1; t1: 0.1 behind 0.7, 0.2 -> 3; t2: 0.4 behind 0.6, 0.5 -> 3;
    # t3: 0.3 first -> 1; t4: 0.9 first -> 1; t5: 0.1 behind 0.3, 0.2 -> 3
    assert results["text_to_video_R@1"] == pytest.approx(50.0)
    assert results["text_to_video_median_rank"] == 2.0 and results["text_to_video_mean_rank"] == 2.0
    # video -> text: clip 0's best caption t0 is its first text; clip 1's t2 (0.4) behind 0.8, 0.7, 0.6 -> 4;
    # clip 2's best t4 (0.9) first
    assert results["video_to_text_R@1"] == pytest.approx(200 / 3) and results["video_to_text_R@5"] == 100.0
    assert results["video_to_text_median_rank"] == 1.0 and results["video_to_text_mean_rank"] == 2.0
    assert results == pytest.approx(brute_force(similarity, text_to_video))
    assert list(results)[:5] == ["text_to_video_R@1", "text_to_video_R@5", "text_to_video_R@10",
                                 "text_to_video_median_rank", "text_to_video_mean_rank"]


@pytest.mark.parametrize("seed", range(4))
def test_metrics_equal_a_brute_force_count_with_ties_and_unreadable_clips(seed):
    generator = torch.Generator().manual_seed(seed)
    num_videos = 15
    captions = torch.randint(1, 5, (num_videos,), generator=generator)  # 1 to 4 captions a clip
    text_to_video = [v for v in range(num_videos) for _ in range(int(captions[v]))]
    similarity = torch.randint(0, 6, (num_videos, len(text_to_video)), generator=generator).float()  # many ties
    unreadable = {int(v) for v in torch.randperm(num_videos, generator=generator)[:seed]}
    results = metrics_of_similarity(similarity, text_to_video, unreadable)
    assert results == pytest.approx(brute_force(similarity, text_to_video, unreadable))


def test_ranks_agree_with_the_image_retrieval_recalls():
    generator = torch.Generator().manual_seed(0)
    similarity = torch.randn(20, 50, generator=generator)
    text_to_video = torch.randint(0, 20, (50,), generator=generator)
    text_to_video[:20] = torch.arange(20)  # every clip has a caption
    matches = text_to_video[None, :] == torch.arange(20)[:, None]
    ranks = match_ranks(similarity, matches, torch.zeros(20, dtype=torch.bool))
    recalls = ranking_recalls(similarity, similarity.T, text_to_video)
    for k in (1, 5, 10):
        assert recalls[f"image_to_text_R@{k}"] == pytest.approx(100.0 * (ranks <= k).float().mean().item())


# ---------------------------------------------------------------- recipes/video.py: train.py and eval.py end to end

CONFIG = os.path.join(ROOT, "configs", "clip", "tiny_shapes.yaml")


@pytest.fixture(scope="module")
def video_tokenizer(tmp_path_factory) -> str:
    """A sentencepiece model of shapes' and moving_shapes' captions (the image run's, which the video run adopts)."""
    texts = [dataset[i]["caption"] for spec in ("shapes:train:300", "moving_shapes:train:300")
             for dataset in [build_dataset(spec)] for i in range(len(dataset))]
    path = str(tmp_path_factory.mktemp("tokenizer") / "video.model")
    train_sentencepiece(texts, path, vocab_size=256)
    return path


def common_args(tokenizer: str, *extra) -> list[str]:
    return ["--config", CONFIG, f"--data.tokenizer_path={tokenizer}", "--model.name=ViT-tiny", "--data.workers=0",
            "--data.heldout=", "--train.batch_size=8", "--train.warmup_steps=1", "--train.log_every=1", *extra]


def video_args(tokenizer: str, out_dir, start: str, *extra) -> list[str]:
    return common_args(tokenizer, f"--out_dir={out_dir}", f"--model.pretrained={start}",
                       "--data.train=moving_shapes:train:64", "--data.val=moving_shapes:val:16", "--video.frames=4",
                       *extra)


@pytest.fixture(scope="module")
def image_run(video_tokenizer, tmp_path_factory) -> str:
    """A two-step image CLIP run (ViT-tiny on shapes) that video runs start from."""
    out_dir = tmp_path_factory.mktemp("image_run")
    train.main(common_args(video_tokenizer, f"--out_dir={out_dir}", "--data.val=shapes:val:16", "--train.steps=2"))
    return str(out_dir / "checkpoint.pt")


def test_a_video_run_starts_from_the_image_run_as_its_mean_pooling(video_tokenizer, image_run, tmp_path):
    cfg = resolve(load_config(CONFIG, video_args(video_tokenizer, tmp_path, image_run, "--video.pool=transformer")[2:]))
    recipe = recipe_for(cfg)
    assert isinstance(recipe, VideoRecipe) and "video_retrieval" in recipe.tasks
    assert recipe.loader_options() == {"frames": 4, "reverse": False}
    model = recipe.build_model(recipe.build_tokenizer(str(tmp_path))).eval()
    start = torch.load(image_run, map_location="cpu", weights_only=True)["model"]
    state = model.state_dict()
    assert all(torch.equal(state[f"clip.{key}"], value) for key, value in start.items())
    assert {key.split(".")[0] for key in state} == {"clip", "temporal"}
    clips, _ = clips_and_tokens(batch=2, frames=4)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_video(clips),
                                   VideoCLIP(model.clip, "mean").encode_video(clips), rtol=0, atol=0)


def test_train_py_trains_on_clips_and_eval_py_reports_video_retrieval(video_tokenizer, image_run, tmp_path):
    results = train.main(video_args(video_tokenizer, tmp_path, image_run, "--video.pool=transformer",
                                    "--train.steps=3"))
    for prefix in ("val", "val_order"):
        assert results[f"{prefix}/num_videos"] == 16 and results[f"{prefix}/bad_videos"] == 0
        assert 0 <= results[f"{prefix}/text_to_video_R@1"] <= results[f"{prefix}/text_to_video_R@10"] <= 100
        assert 1 <= results[f"{prefix}/text_to_video_median_rank"] <= 16
    checkpoint = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["config"]["video"] == {"pool": "transformer", "frames": 4, "layers": 2,
                                             "temporal_lr_scale": 1.0, "order_weight": 0.0, "reverse_negatives": False}
    assert checkpoint["model"]["temporal.proj.weight"].abs().max() > 0  # the temporal module trained

    out = tmp_path / "video.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--checkpoint",
                           str(tmp_path / "checkpoint.pt"), "--task", "video_retrieval", "--data",
                           "moving_shapes:val:16", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    for direction in ("text_to_video", "video_to_text"):
        for metric in ("R@1", "R@5", "R@10", "median_rank", "mean_rank"):
            # the checkpoint scores as the run's own last evaluation did: the same model, clips and frames
            assert written[f"{direction}_{metric}"] == pytest.approx(results[f"val/{direction}_{metric}"])
    assert written["num_videos"] == 16 and written["num_texts"] == 16
    # a video run still embeds single images: the image tasks run through its image tower
    assert evaluation.main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--task", "zeroshot", "--data",
                            "shapes:val:16"])["num_images"] == 16


@pytest.mark.parametrize("extra, message", [
    (["--video.pool=max"], "video.pool must be one of mean, transformer; got 'max'"),
    (["--data.val=shapes:val"], "data.val=shapes:val is not a video spec"),
    (["--model.name=BLIP-tiny"], "model.name must be a CLIP preset (e.g. RN-tiny, ViT-B-32); got 'BLIP-tiny'"),
    (["--loss.name=bow"], "loss.name must be one of clip, siglip for a video run"),
    (["--video.reverse_negatives=true", "--data.train=video_csv:clips.csv"],
     "video.reverse_negatives needs clips whose time reversal has a known caption (moving_shapes specs)"),
    (["--video.order_weight=1"], "video.order_weight=1.0 weighs a loss over each clip and its reversal: it needs "
                                 "video.reverse_negatives=true"),
])
def test_bad_video_configs_fail_in_one_line(video_tokenizer, image_run, tmp_path, capsys, extra, message):
    with pytest.raises(Failure):
        train.main(video_args(video_tokenizer, tmp_path / "run", image_run, "--train.steps=1", *extra))
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error and error.startswith("config error:")


def in_float64(model: torch.nn.Module, batch: dict) -> dict:
    """The model in float64 and the batch's float tensors with it: accumulation is then exact to rounding (in fp32 the
    temporal module's input norm magnifies it)."""
    model.double()
    return {key: value.double() if torch.is_tensor(value) and value.is_floating_point() else value
            for key, value in batch.items()}


def test_reverse_negatives_double_the_loss_batch_and_accumulate_exactly(video_tokenizer, image_run, tmp_path):
    cfg = resolve(load_config(CONFIG, video_args(video_tokenizer, tmp_path, image_run, "--video.pool=transformer",
                                                 "--video.reverse_negatives=true", "--train.batch_size=4")[2:]))
    recipe = recipe_for(cfg)
    assert recipe.loader_options() == {"frames": 4, "reverse": True}
    tokenizer = recipe.build_tokenizer(str(tmp_path))
    model = recipe.build_model(tokenizer)
    with torch.no_grad():  # a temporal module that sees order (it starts as mean pooling)
        model.temporal.proj.weight.normal_(std=0.1)
    batch = in_float64(model, next(iter(train_loader(cfg, tokenizer, 0, 1, **recipe.loader_options()))))
    assert batch["reversed_image"].shape == batch["image"].shape == (4, 4, 3, 64, 64)
    seen, loss = [], recipe.loss
    recipe.loss = lambda images, texts, scale, bias: seen.append((images.shape, texts.shape)) or loss(
        images, texts, scale, bias)
    scaler = SimpleNamespace(scale=lambda value: value)

    def gradients(micro_batches):
        model.zero_grad()
        value = recipe.train_step(model, micro_batches, 0, "cpu", contextlib.nullcontext(), scaler)["clip"]
        return value, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    value, grads = gradients([batch])
    assert seen == [((8, model.embed_dim), (8, model.embed_dim))]  # 4 clips and their 4 reversals
    # reference: symmetric InfoNCE over the clips and their reversals, computed here
    out = model(torch.cat([batch["image"], batch["reversed_image"]]),
                torch.cat([batch["tokens"], batch["reversed_tokens"]]))
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    target = torch.arange(8)
    reference = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(value, reference.detach())
    assert out["image_features"][:4].sub(out["image_features"][4:]).abs().max() > 1e-4  # reversal seen as other
    # video.temporal_lr_scale: the temporal module in its own optimizer group, every parameter in exactly one
    assert recipe.trainable_layers(model) is None
    recipe.cfg.video.temporal_lr_scale = 3.0
    (tower_scale, tower), (temporal_scale, temporal) = recipe.trainable_layers(model)
    assert (tower_scale, temporal_scale) == (1.0, 3.0)
    assert {name for name, _ in temporal} == {name for name, _ in model.named_parameters() if "temporal" in name}
    assert len(tower) + len(temporal) == len(list(model.parameters())) and temporal
    # two micro-batches of 2 clips: the same loss and gradients (the loss is invariant to the rows' order)
    halves = [{key: value[i : i + 2] for key, value in batch.items() if torch.is_tensor(value)} for i in (0, 2)]
    accumulated, accumulated_grads = gradients(halves)
    torch.testing.assert_close(accumulated, value)
    assert accumulated_grads.keys() == grads.keys() and "temporal.proj.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(accumulated_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_order_loss_equals_a_pair_by_pair_count_and_accumulates_exactly(video_tokenizer, image_run, tmp_path):
    from crossmodal.recipes.video import order_loss

    images, texts = F.normalize(torch.randn(12, 8), dim=-1), F.normalize(torch.randn(12, 8), dim=-1)
    scale, sizes = torch.tensor(7.0), [8, 4]  # micro-batches of 4 and 2 clips, each followed by its reversals
    terms = []
    for start, size in zip((0, 8), sizes):
        for i in range(size // 2):
            clip, reversal = start + i, start + size // 2 + i
            scores = scale * torch.stack([torch.stack([images[a] @ texts[b] for b in (clip, reversal)])
                                          for a in (clip, reversal)])  # (2 clips, 2 captions)
            terms += [-scores.log_softmax(1)[0, 0], -scores.log_softmax(1)[1, 1],  # a clip picks its caption
                      -scores.log_softmax(0)[0, 0], -scores.log_softmax(0)[1, 1]]  # a caption picks its clip
    torch.testing.assert_close(order_loss(images, texts, scale, sizes), torch.stack(terms).mean())

    cfg = resolve(load_config(CONFIG, video_args(video_tokenizer, tmp_path, image_run, "--video.pool=transformer",
                                                 "--video.reverse_negatives=true", "--video.order_weight=2",
                                                 "--train.batch_size=4")[2:]))
    recipe = recipe_for(cfg)
    tokenizer = recipe.build_tokenizer(str(tmp_path))
    model = recipe.build_model(tokenizer)
    with torch.no_grad():
        model.temporal.proj.weight.normal_(std=0.1)
    batch = in_float64(model, next(iter(train_loader(cfg, tokenizer, 0, 1, **recipe.loader_options()))))
    scaler = SimpleNamespace(scale=lambda value: value)

    def step(micro_batches):
        model.zero_grad()
        losses = recipe.train_step(model, micro_batches, 0, "cpu", contextlib.nullcontext(), scaler)
        return losses, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    losses, grads = step([batch])
    out = model(torch.cat([batch["image"], batch["reversed_image"]]),
                torch.cat([batch["tokens"], batch["reversed_tokens"]]))
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    target = torch.arange(8)
    torch.testing.assert_close(losses["clip"], ((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
                                                / 2).detach())
    pairs = torch.stack([logits[:4, :4].diagonal(), logits[:4, 4:].diagonal(), logits[4:, :4].diagonal(),
                         logits[4:, 4:].diagonal()], 1).view(4, 2, 2)  # (pairs, clip/reversal, caption/reversal's)
    reference = -(pairs.log_softmax(2).diagonal(dim1=1, dim2=2).mean() + pairs.log_softmax(1).diagonal(
        dim1=1, dim2=2).mean()) / 2
    torch.testing.assert_close(losses["order"], reference.detach())
    halves = [{key: value[i : i + 2] for key, value in batch.items() if torch.is_tensor(value)} for i in (0, 2)]
    accumulated, accumulated_grads = step(halves)
    torch.testing.assert_close(accumulated["order"], losses["order"])
    torch.testing.assert_close(accumulated["clip"], losses["clip"])
    assert accumulated_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(accumulated_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_a_video_run_does_not_start_from_another_video_run(video_tokenizer, image_run, tmp_path, capsys):
    train.main(video_args(video_tokenizer, tmp_path / "first", image_run, "--train.steps=1", "--data.val="))
    with pytest.raises(Failure):
        train.main(video_args(video_tokenizer, tmp_path / "second", str(tmp_path / "first" / "checkpoint.pt"),
                              "--train.steps=1"))
    assert "is a video run; a video run starts from an image CLIP run" in capsys.readouterr().err


# ---------------------------------------------------------------- Flamingo over frames (models/flamingo.py)


def tiny_flamingo(max_num_frames: int | None = 4, seed: int = 0):
    torch.manual_seed(seed)
    vision = create_model("ViT-tiny", image_size=32).visual
    lang_model = create_lm("lm-tiny", vocab_size=64, context_length=32)
    return Flamingo(vision, lang_model, media_token_id=1, eoc_token_id=2, perceiver_depth=2, perceiver_heads=4,
                    perceiver_dim_head=32, num_latents=8, heads=4, dim_head=32, ff_mult=2,
                    max_num_frames=max_num_frames).eval()


def test_flamingo_resamples_a_clip_into_one_media_of_latents_with_its_time_embeddings():
    model = tiny_flamingo()
    clips = torch.randn(2, 3, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, T_media, F, 3, H, W)
    with torch.no_grad():
        media = model.encode_media(clips)
        reversed_media = model.encode_media(clips.flip(2))
        assert media.shape == (2, 3, 8, 128)
        assert (reversed_media - media).abs().max() > 1e-3  # the frame embeddings tell the order
        model.perceiver.frame_embs.zero_()  # without them the resampler sees a clip's tokens as one set
        torch.testing.assert_close(model.encode_media(clips.flip(2)), model.encode_media(clips), rtol=1e-4, atol=1e-5)
        # a clip is one media position: the LM sees num_latents tokens per <image>, as for an image
        tokens = torch.tensor([[1, 5, 6, 2, 1, 7, 8, 2, 1, 9, 10, 2]] * 2)
        for block in model.gated_cross_attn_layers:
            block.attn_gate.fill_(0.5)
        assert model.logits(tokens, media).shape == (2, 12, 64)


def test_flamingo_takes_images_as_one_frame_clips():
    model = tiny_flamingo(max_num_frames=None)
    images = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_media(images), model.encode_media(images[:, :, None]))
    assert model.perceiver.frame_embs is None  # released OpenFlamingo models have none


@pytest.fixture(scope="module")
def flamingo_and_tokenizer(tmp_path_factory):
    """Flamingo-tiny (no time embeddings: create_flamingo's presets have none) and a tokenizer of moving_shapes'
    captions, questions and answers."""
    dataset = build_dataset("moving_shapes:train:200")
    texts = [text for i in range(len(dataset)) for item in [dataset.texts(i)]
             for text in (item["caption"], f"question: {item['question']} answer: {item['answer']}")]
    path = train_sentencepiece(texts, tmp_path_factory.mktemp("flamingo") / "tok", 300, flamingo_tokens=True)
    tokenizer = SentencePieceTokenizer(path, context_length=96)
    torch.manual_seed(0)
    return create_flamingo("Flamingo-tiny", tokenizer, image_size=32, context_length=96).eval(), tokenizer


def test_fewshot_vqa_on_moving_shapes_prompts_with_clips(flamingo_and_tokenizer, monkeypatch):
    model, tokenizer = flamingo_and_tokenizer
    media_shapes = []
    generate = model.generate

    def recording_generate(images, prompts, **kwargs):
        media_shapes.append(tuple(images.shape))
        return generate(images, prompts, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    results = fewshot.evaluate(model, tokenizer, "moving_shapes:val:6", "fewshot_vqa", 32, "cpu", shots=(0, 2),
                               seeds=(0,), rices=True, frames=4, log=None)
    assert results["num_queries"] == 6 and results["metric"] == "accuracy"
    assert all(0 <= results["shots"][shots]["mean"] <= 100 for shots in ("0", "2"))
    # 0 shots: the query's clip alone; 2 shots: two demonstration clips and the query's, each 4 frames
    assert media_shapes == [(6, 1, 4, 3, 32, 32), (6, 3, 4, 3, 32, 32)]
    with pytest.raises(ValueError, match="holds clips: few-shot prompts over it need frames > 0"):
        fewshot.evaluate(model, tokenizer, "moving_shapes:val:6", "fewshot_vqa", 32, "cpu", shots=(0,), seeds=(0,))

    # eval.py's path: a Flamingo run's recipe gives a video spec video.frames frames a clip
    cfg = load_config(None, ["--model.name=Flamingo-tiny", "--data.image_size=32", "--video.frames=3"])
    args = SimpleNamespace(seeds=[1], model=None, shots=[0], rices=False, batch_size=32, num_beams=1,
                           num_queries=None, device="cpu")
    media_shapes.clear()
    assert recipe_for(cfg).run_task("fewshot_vqa", model, tokenizer, "moving_shapes:val:6", args)["num_queries"] == 6
    assert media_shapes == [(6, 1, 3, 3, 32, 32)]


# ---------------------------------------------------------------- clips from files (video_csv, several captions)


def numbered_tokens(texts: list[str]) -> torch.Tensor:
    """A stand-in tokenizer: (T, 8) ids that differ per caption."""
    return torch.arange(len(texts) * 8).reshape(len(texts), 8) % 60 + 1


@pytest.fixture
def clip_csv(tmp_path) -> str:
    """Three mp4 clips with two captions each, and a fourth file that is no video (its caption's clip is unreadable)."""
    from tests.test_video_data import write_clip, write_csv

    (tmp_path / "clips").mkdir()
    for name, count in (("a", 12), ("b", 9), ("c", 15)):
        write_clip(tmp_path / "clips" / f"{name}.mp4", count=count)
    (tmp_path / "clips" / "broken.mp4").write_bytes(b"not a video")
    rows = [("clips/a.mp4", "grey fades in"), ("clips/b.mp4", "a short fade"), ("clips/broken.mp4", "nothing"),
            ("clips/c.mp4", "a long fade"), ("clips/a.mp4", "it gets brighter"), ("clips/b.mp4", "brief"),
            ("clips/c.mp4", "slowly lighter")]
    return "video_csv:" + write_csv(tmp_path, rows)


def test_video_retrieval_on_clip_files_with_several_captions_and_an_unreadable_clip(clip_csv):
    from crossmodal.data.transforms import image_transform
    from crossmodal.data.video import read_clip
    from crossmodal.evaluation.video import video_retrieval

    model = VideoCLIP(create_model("ViT-tiny", vocab_size=64, context_length=8, image_size=32), "mean").eval()
    results = video_retrieval(model, numbered_tokens, clip_csv, 32, 2, "cpu", batch_size=3)
    assert (results["num_videos"], results["num_texts"], results["bad_videos"], results["affected_captions"]) == \
        (4, 7, 1, 1)
    # the same metrics computed by hand: each clip's frames through the evaluation transform, the broken one a miss
    folder = os.path.dirname(clip_csv.partition(":")[2])
    transform = image_transform(32, train=False)
    with torch.no_grad():
        clips = torch.stack([torch.stack([transform(frame) for frame in read_clip(
            os.path.join(folder, "clips", f"{name}.mp4"), 2)]) for name in ("a", "b", "a", "c")])  # broken: any
        videos = model.encode_video(clips, normalize=True)
        texts = model.encode_text(numbered_tokens(["x"] * 7), normalize=True)
    expected = video_retrieval_metrics(videos, texts, torch.tensor([0, 1, 2, 3, 0, 1, 3]),
                                       torch.tensor([False, False, True, False]))
    assert {key: results[key] for key in expected} == pytest.approx(expected)
    assert results["text_to_video_R@10"] == pytest.approx(100 * 6 / 7)  # all but the broken clip's caption


def test_fewshot_caption_over_clip_files(flamingo_and_tokenizer, tmp_path):
    from tests.test_video_data import write_clip, write_csv

    model, tokenizer = flamingo_and_tokenizer
    (tmp_path / "clips").mkdir()
    for name in "abc":
        write_clip(tmp_path / "clips" / f"{name}.mp4", count=9)
    spec = "video_csv:" + write_csv(tmp_path, [(f"clips/{name}.mp4", f"a red circle moves {way}")
                                              for name, way in zip("abca", ("left", "right", "up", "down"))])
    results = fewshot.evaluate(model, tokenizer, spec, "fewshot_caption", 32, "cpu", shots=(2,), seeds=(0,),
                               rices=True, num_queries=1, frames=3, num_beams=1, log=None)
    assert results["metric"] == "CIDEr" and results["num_queries"] == 1 and results["pool_size"] == 3  # (query left out)
    assert results["shots"]["2"]["mean"] >= 0 and results["affected_queries"] == 0


def test_clips_listed_in_a_csv_train_and_evaluate_end_to_end_past_a_corrupt_clip(video_tokenizer, image_run, clip_csv,
                                                                                   tmp_path, capsys):
    run = tmp_path / "run"
    results = train.main(video_args(video_tokenizer, run, image_run, f"--data.train={clip_csv}",
                                    f"--data.val={clip_csv}", "--video.pool=transformer", "--train.batch_size=4",
                                    "--train.steps=3", "--data.max_bad_fraction=0.5"))
    printed = capsys.readouterr().out
    assert "bad sample skipped" in printed and "broken.mp4" in printed  # skipped, counted, and the run went on
    assert results["step"] == 3 and results["val/num_videos"] == 4 and results["val/bad_videos"] == 1
    written = evaluation.main(["--checkpoint", str(run / "checkpoint.pt"), "--task", "video_retrieval", "--data",
                               clip_csv, "--out", str(tmp_path / "retrieval.json")])
    saved = json.loads((tmp_path / "retrieval.json").read_text())
    assert {key: saved[key] for key in written} == pytest.approx(written)
    assert written["num_videos"] == 4 and written["num_texts"] == 7 and written["bad_videos"] == 1
    assert written["text_to_video_R@10"] == pytest.approx(100 * 6 / 7)  # the broken clip's caption is a miss
