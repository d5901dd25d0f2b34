"""Autoregressive generation for every decoder of this codebase (BLIP's captioner now, Flamingo's LM next):
greedy, nucleus sampling and beam search, all over a key/value cache.

A decoder is a function `decode(tokens (N, T), context (N, S, D), cache) -> logits (N, T, vocab)` (only the last
position is read, so (N, 1, vocab) will do, as LLaVA's returns: a long prompt's other positions cost a
vocabulary-wide matmul each); with a `KVCache` it receives only the tokens not seen yet and finds their positions from `cache.length`. The context
(image tokens) is fixed: its cross-attention keys/values are computed once, in the first call on the B prompts,
and the beams of a sample read that sample's copy (`layers.CrossAttention`); the self-attention cache is copied.

The decisions follow HuggingFace transformers 5.x `GenerationMixin.generate` so that equal arguments give equal
tokens (tests/test_blip.py): `max_length`/`min_length` count the prompt; logits processors in HF's order
(repetition penalty, min length; then temperature, top-k, top-p when sampling); in beam search they act on
log-probabilities, 2 * num_beams candidates are kept per step, a finished hypothesis scores
`sum log p / generated_length ** length_penalty` (eos included, prompt not), and a sample stops when no running
beam can beat its worst kept hypothesis (`early_stopping=False`, HF's default heuristic). Greedy and sampling fill
finished rows with `pad_id`, as HF does.

Deliberate differences from HF: beam search decodes the prompt once per sample and copies the cache to its
beams (HF decodes every beam's copy); finished beams are padded with `pad_id` (HF pads them with eos when
pad_id is 0); beam search with sampling is not offered.
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from crossmodal.models.layers import KVCache

Decoder = Callable[[torch.Tensor, torch.Tensor, Optional[KVCache]], torch.Tensor]


def apply_repetition_penalty(scores: torch.Tensor, tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al., 2019) on every token already in the row: scores (N, V), tokens (N, T)."""
    if penalty == 1.0:
        return scores
    seen = scores.gather(1, tokens)  # (N, T)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, tokens, seen)


def apply_min_length(scores: torch.Tensor, length: int, min_length: int, eos_id: int) -> torch.Tensor:
    """No end of sequence before `min_length` tokens (prompt included)."""
    if length < min_length:
        scores = scores.clone()
        scores[:, eos_id] = -float("inf")
    return scores


def nucleus_filter(scores: torch.Tensor, top_p: Optional[float], top_k: Optional[int]) -> torch.Tensor:
    """Keep the `top_k` best tokens, then the smallest set whose probability reaches `top_p` (Holtzman et al.,
    2020); the rest get -inf. Ties at the boundary are broken as HF's TopK/TopP warpers do."""
    if top_k:
        kth_best = scores.topk(min(top_k, scores.shape[-1])).values[:, -1:]  # (N, 1)
        scores = scores.masked_fill(scores < kth_best, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1)  # ascending
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # (N, V)
        remove_sorted = cumulative <= 1 - top_p
        remove_sorted[:, -1] = False  # always keep the best token
        scores = scores.masked_fill(remove_sorted.scatter(1, order, remove_sorted), -float("inf"))
    return scores


@torch.no_grad()
def generate(
    decode: Decoder,
    prompt: torch.Tensor,
    context: torch.Tensor,
    num_layers: int,
    eos_id: int,
    pad_id: int,
    max_length: int = 20,
    min_length: int = 0,
    num_beams: int = 1,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Token ids (B, L <= max_length), prompt included, for prompts (B, P) and contexts (B, S, D).

    num_beams > 1: beam search; otherwise greedy, or sampling when `top_p`/`top_k` is set (with `temperature`
    and an optional `generator` for reproducible draws). `num_layers`: decoder depth, for the cache.
    """
    if num_beams > 1 and (top_p is not None or top_k):
        raise ValueError("sampling (top_p/top_k) runs with num_beams=1")
    if prompt.shape[1] >= max_length:
        raise ValueError(f"the prompt has {prompt.shape[1]} tokens, max_length {max_length} leaves none to generate")
    if num_beams > 1:
        return beam_search(
            decode, prompt, context, num_layers, eos_id, pad_id, max_length, min_length, num_beams,
            repetition_penalty, length_penalty, use_cache,
        )  # fmt: skip
    sample = top_p is not None or bool(top_k)
    cache = KVCache(num_layers) if use_cache else None
    tokens = prompt
    unfinished = torch.ones(prompt.shape[0], dtype=torch.bool, device=prompt.device)  # (B,)
    new_tokens = prompt
    while True:
        logits = decode(new_tokens, context, cache)[:, -1].float()  # (B, V)
        scores = apply_repetition_penalty(logits, tokens, repetition_penalty)
        scores = apply_min_length(scores, tokens.shape[1], min_length, eos_id)
        if sample:
            scores = nucleus_filter(scores / temperature, top_p, top_k)
            next_token = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)  # (B,)
        else:
            next_token = scores.argmax(dim=-1)  # (B,)
        next_token = torch.where(unfinished, next_token, pad_id)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)  # (B, T + 1)
        unfinished &= next_token != eos_id
        if not unfinished.any() or tokens.shape[1] >= max_length:
            return tokens
        new_tokens = next_token[:, None] if use_cache else tokens


def beam_search(
    decode: Decoder,
    prompt: torch.Tensor,
    context: torch.Tensor,
    num_layers: int,
    eos_id: int,
    pad_id: int,
    max_length: int,
    min_length: int,
    num_beams: int,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    use_cache: bool = True,
) -> torch.Tensor:
    """Beam search as HF transformers 5.x `_beam_search` does it; returns the best hypothesis per sample (B, L)."""
    batch, prompt_length = prompt.shape
    beams, candidates = num_beams, 2 * num_beams  # HF keeps (1 + number of eos ids) * beams candidates
    device = prompt.device
    cache = KVCache(num_layers) if use_cache else None
    logits = decode(prompt, context, cache)[:, -1]  # (B, V): each prompt once, then copied to its beams
    logits = logits.repeat_interleave(beams, dim=0)  # (B * K, V)
    context = context.repeat_interleave(beams, dim=0)  # (B * K, S, D)
    if cache is not None:
        cache.repeat_interleave(beams)

    running = prompt.repeat_interleave(beams, dim=0).view(batch, beams, prompt_length)  # (B, K, T)
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = -1e9  # only the first copy may start, or every beam would pick the same tokens
    finished = torch.full((batch, beams, max_length), pad_id, dtype=torch.long, device=device)  # (B, K, L)
    finished_scores = torch.full((batch, beams), -1e9, device=device)
    finished_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)  # a running beam may still win
    top_beams = torch.arange(candidates, device=device) < beams  # only these candidates may finish
    length = prompt_length
    while True:
        vocab = logits.shape[-1]
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (B * K, V)
        log_probs = apply_repetition_penalty(log_probs, running.view(batch * beams, length), repetition_penalty)
        log_probs = apply_min_length(log_probs, length, min_length, eos_id)
        log_probs = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, beams * vocab)
        candidate_scores, flat = log_probs.topk(candidates)  # (B, 2K)
        source_beam, token = flat // vocab, flat % vocab  # (B, 2K)
        candidate = torch.cat([running.gather(1, source_beam[:, :, None].expand(-1, -1, length)), token[:, :, None]], 2)
        done = (token == eos_id) | (length + 1 >= max_length)  # (B, 2K)

        # The best K candidates that go on.
        keep_scores = candidate_scores + done.float() * -1e9
        keep = keep_scores.topk(beams).indices  # (B, K)
        running = candidate.gather(1, keep[:, :, None].expand(-1, -1, length + 1))  # (B, K, T + 1)
        running_scores = keep_scores.gather(1, keep)
        rows = (source_beam.gather(1, keep) + torch.arange(batch, device=device)[:, None] * beams).view(-1)

        # Hypotheses that end here join the kept ones if they score better.
        scores = candidate_scores / (length + 1 - prompt_length) ** length_penalty
        scores = scores + (~improvable).float() * -1e9 + (~(done & top_beams)) * -1e9
        padded = F.pad(candidate, (0, max_length - length - 1), value=pad_id)  # (B, 2K, L)
        merged = torch.cat([finished_scores, scores], 1).topk(beams).indices  # (B, K)
        finished = torch.cat([finished, padded], 1).gather(1, merged[:, :, None].expand(-1, -1, max_length))
        finished_scores = torch.cat([finished_scores, scores], 1).gather(1, merged)
        finished_lengths = torch.cat([finished_lengths, torch.full_like(flat, length + 1)], 1).gather(1, merged)
        is_finished = torch.cat([is_finished, done & top_beams], 1).gather(1, merged)

        length += 1
        best_running = running_scores[:, :1] / (length - prompt_length) ** length_penalty  # (B, 1)
        worst_kept = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, -1e9)  # (B, K)
        improvable &= (best_running > worst_kept).any(dim=-1, keepdim=True)
        if not improvable.any() or done.all():
            break
        flat_running = running.view(batch * beams, length)
        if cache is not None:
            cache.select(rows)
            logits = decode(flat_running[:, -1:], context, cache)[:, -1]  # (B * K, V)
        else:
            logits = decode(flat_running, context, None)[:, -1]
    return finished[:, 0, : int(finished_lengths[:, 0].max())]  # (B, L'), the best first
