from losses.contrastive import all_gather_with_grad, clip_loss, siglip_loss

__all__ = ["all_gather_with_grad", "clip_loss", "siglip_loss"]
