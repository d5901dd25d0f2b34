"""Video-text retrieval the way video-retrieval papers report it (CLIP4Clip, Luo et al., 2022, on MSR-VTT): text-to-
video and video-to-text recall at 1, 5 and 10, and the median and mean rank of the true match, for any model with
`encode_video` and `encode_text` (models/video.py).

Several captions per clip (MSR-VTT's 20; video_csv rows that share a file): in text-to-video every caption is a
query and its own clip the one target; in video-to-text a clip is found at the best rank any of its captions gets.
Ranks count from 1 (median rank 1: half the queries have their match first). The recalls are
evaluation/contrastive.py's `ranking_recalls` (COCO retrieval's; the same rule with images as clips).

Unreadable clips (data/bad_samples.py) are handled as unreadable images are in image retrieval: no candidate,
their own query and their captions' queries are misses (ranked after every candidate), the denominators stay the
dataset's, and the evaluation stops with one line once they pass data.max_bad_fraction.
"""
import torch

from crossmodal.data import video_retrieval_loader
from crossmodal.data.bad_samples import BadSampleCount
from crossmodal.evaluation.contrastive import check_unreadable, encode_texts, ranking_recalls

KS = (1, 5, 10)


@torch.no_grad()
def encode_videos(model, loader, device) -> tuple[torch.Tensor, torch.Tensor, BadSampleCount]:
    """Normalised video features (N, D) in fp32 on the CPU, which clips were unreadable (N,) (the loader put a
    neighbour's clip in their place), and their count with examples."""
    features, unreadable, count = [], [], BadSampleCount()
    for batch in loader:
        features.append(model.encode_video(batch["image"].to(device), normalize=True).float().cpu())
        unreadable.append(batch["bad"] > 0)
        count.add_batch(batch)
    return torch.cat(features), torch.cat(unreadable), count


def match_ranks(scores: torch.Tensor, truth: torch.Tensor, missed: torch.Tensor) -> torch.Tensor:
    """(queries,) the 1-based rank of each query's best-placed true match among the candidates (scores and truth
    (queries, candidates); ties keep index order, as ranking_recalls does); a missed query ranks after them all."""
    ranked = scores.argsort(dim=-1, descending=True, stable=True)
    found = truth.gather(1, ranked)  # (queries, candidates) True where a true match sits
    first = found.float().argmax(-1).masked_fill(missed, scores.shape[-1])
    return first + 1


def video_retrieval_metrics(video_features: torch.Tensor, text_features: torch.Tensor, text_to_video: torch.Tensor,
                            unreadable: torch.Tensor | None = None, ks=KS) -> dict:
    """Recall@K, median and mean rank both ways (module docstring); text_to_video[t] is the clip caption t
    describes; unreadable (num_videos,) bool: clips that are no candidate and whose queries are misses."""
    num_videos = len(video_features)
    if unreadable is None:
        unreadable = torch.zeros(num_videos, dtype=torch.bool)
    similarity = video_features @ text_features.T  # (num_videos, num_texts)
    recalls = ranking_recalls(similarity, similarity.T, text_to_video, ks, unreadable)
    results = {key.replace("image", "video"): value for key, value in recalls.items()}
    matches = text_to_video[None, :] == torch.arange(num_videos)[:, None]  # (num_videos, num_texts)
    for direction, scores, truth, missed in (
            ("video_to_text", similarity, matches, unreadable),
            ("text_to_video", similarity.T.masked_fill(unreadable[None, :], float("-inf")), matches.T,
             unreadable[text_to_video])):
        ranks = match_ranks(scores, truth, missed).float()
        results[f"{direction}_median_rank"] = ranks.quantile(0.5).item()  # numpy's median (CLIP4Clip's)
        results[f"{direction}_mean_rank"] = ranks.mean().item()
    return dict(sorted(results.items(), key=lambda item: not item[0].startswith("text_to_video")))


def video_retrieval(model, tokenizer, spec: str, image_size: int, frames: int, device, batch_size: int = 256,
                    workers: int = 0, options=None, seed: int = 0) -> dict:
    """Text-to-video and video-to-text retrieval on a video spec (moving_shapes, video_csv, msrvtt), `frames`
    frames a clip at fixed positions."""
    loader, text_tokens, text_to_video = video_retrieval_loader(spec, image_size, frames, tokenizer, batch_size,
                                                                workers, seed, options)
    video_features, unreadable, count = encode_videos(model, loader, device)
    affected = int(unreadable[text_to_video].sum())
    check_unreadable(count, affected, len(text_to_video), "captions", spec, options)
    text_features = encode_texts(model, text_tokens, device, batch_size)
    results = video_retrieval_metrics(video_features, text_features, text_to_video, unreadable)
    results.update(num_videos=len(video_features), num_texts=len(text_features), bad_videos=int(unreadable.sum()),
                   affected_captions=affected)
    return results


def evaluate_run(cfg, model, tokenizer, device) -> dict:
    """What train.py reports for a video run: retrieval on data.val (and on moving_shapes:val_order, the val clips
    whose captions depend on order alone, when data.val is moving_shapes:val) and on data.heldout."""
    specs = {"val": cfg.data.val}
    parts = cfg.data.val.split(":")
    if parts[:2] == ["moving_shapes", "val"]:  # with its count, if any
        specs["val_order"] = ":".join(("moving_shapes", "val_order", *parts[2:]))
    if cfg.data.heldout:
        specs["heldout"] = cfg.data.heldout
    results = {}
    for prefix, spec in specs.items():
        if not spec:
            continue
        for name, value in video_retrieval(model, tokenizer, spec, cfg.data.image_size, cfg.video.frames, device,
                                           cfg.eval.batch_size, options=cfg.data, seed=cfg.seed).items():
            results[f"{prefix}/{name}"] = value
    return results
