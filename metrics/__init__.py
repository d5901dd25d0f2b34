"""Evaluation metrics: caption scores (BLEU, CIDEr-D) and VQA accuracy, written here to equal pycocoevalcap and
the official VQA evaluation script without Java or their packages."""
from crossmodal.metrics.caption import bleu, caption_scores, cider_d, ptb_tokenize
from crossmodal.metrics.vqa import normalize_answer, vqa_accuracy, vqa_score

__all__ = ["bleu", "caption_scores", "cider_d", "ptb_tokenize", "normalize_answer", "vqa_accuracy", "vqa_score"]
