"""The evaluation library: what eval.py's tasks and train.py's evaluations compute, family by family.

    contrastive.py  zero-shot classification and image-text retrieval (CLIP paper, sections 3.1 and 3.2)
    blip.py         BLIP's ITM-re-ranked retrieval, captioning and VQA (BLIP paper, section 5)
    fewshot.py      Flamingo's few-shot VQA and captioning, and the language model's rule accuracy
    probe.py        the CLIP paper's linear probe (appendix A.3)
    video.py        video-text retrieval: R@1/5/10, median and mean rank, several captions a clip (CLIP4Clip, MSR-VTT)

Each recipe (recipes/) picks the functions its family's tasks need; nothing here imports a script or a recipe.
"""
