"""Labels for next-token prediction on interleaved image-text sequences (Flamingo)."""
import torch


def interleaved_labels(
    tokens: torch.Tensor, media_id: int, eoc_id: int, pad_id: int, ignore_index: int = -100
) -> torch.Tensor:
    """(B, T) ids -> labels: pad, `<image>`, every token before the first `<image>` and every token after an
    `<|endofchunk|>` until the next `<image>` set to ignore_index (OpenFlamingo's MMC4 labels,
    `open_flamingo/train/train_utils.py`): the model learns the text that follows an image, up to and
    including the end of its chunk."""
    is_media, is_eoc = tokens == media_id, tokens == eoc_id
    # After the latest <image> and no <|endofchunk|> since it: a running count of events, ordered by position.
    position = torch.arange(tokens.shape[1], device=tokens.device)
    last_media = torch.where(is_media, position, -1).cummax(dim=1).values  # (B, T)
    last_eoc = torch.where(is_eoc, position, -1).cummax(dim=1).values  # (B, T), an <eoc> counts after itself
    previous_eoc = torch.cat([torch.full_like(last_eoc[:, :1], -1), last_eoc[:, :-1]], dim=1)  # strictly before
    inside_chunk = (last_media >= 0) & (last_media > previous_eoc)
    keep = inside_chunk & ~is_media & (tokens != pad_id)
    return tokens.masked_fill(~keep, ignore_index)
