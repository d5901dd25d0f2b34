"""crossmodal: readable, fast vision-language research in pure PyTorch (CLIP, SigLIP, BLIP, Flamingo).

The repository root is this package (setup.py maps it): `crossmodal.models`, `crossmodal.data`, ... are the
top-level folders, and `train.py`, `eval.py` are both scripts and `crossmodal.train`, `crossmodal.eval`.
"""
