from crossmodal.losses.contrastive import all_gather_with_grad, clip_loss, siglip_loss
from crossmodal.losses.lm import interleaved_labels
from crossmodal.losses.blip import (
    FeatureQueue,
    all_gather_no_grad,
    alpha_ramp,
    copy_params,
    diagonal_positives,
    distillation_targets,
    itc_loss,
    itm_loss,
    lm_labels,
    lm_loss,
    momentum_update,
    positives_from_ids,
    sample_hard_negatives,
    sequence_lm_loss,
)

__all__ = ["all_gather_with_grad", "clip_loss", "siglip_loss", "interleaved_labels"]
__all__ += [
    "FeatureQueue",
    "all_gather_no_grad",
    "alpha_ramp",
    "copy_params",
    "diagonal_positives",
    "distillation_targets",
    "itc_loss",
    "itm_loss",
    "lm_labels",
    "lm_loss",
    "momentum_update",
    "positives_from_ids",
    "sample_hard_negatives",
    "sequence_lm_loss",
]
