"""Install the `crossmodal` research codebase and build its C++ (and, where possible, CUDA) loss op.

    pip install torch==2.14.1 torchvision==0.29.1
    pip install --no-build-isolation -e ".[dev]"

`--no-build-isolation` makes the extension compile against the torch already installed; an isolated
build environment could pick another torch wheel and the op would then fail to load.

The CUDA op is built when nvcc and a CUDA-enabled torch are present and a GPU is visible, or always
with FORCE_CUDA=1 (set TORCH_CUDA_ARCH_LIST to choose the architectures; default Ampere + Hopper).
CROSSMODAL_NO_EXTENSION=1 skips the extension entirely (the pure-PyTorch loss is then used).
"""
import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py

RUNTIME = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "numpy",
    "sentencepiece",
    "einops",
    "pyyaml",
    "tensorboard",
]
# Export-time only, never imported at run time (`python -m crossmodal.export`, the `export` extra): torch.onnx's dynamo
# exporter needs onnx and onnxscript for --to onnx; safetensors' package is the test peer of models/convert.py's own
# writer, which --to hf uses, so that it needs nothing beyond torch.
EXPORT = ["onnx==1.23.2", "onnxscript==0.7.2", "safetensors==0.8.0"]
VIDEO = ["av==18.1.0"]  # clip decoding (data/video.py, search.py); its wheel carries its own FFmpeg libraries
# Test-only peers, never imported at run time (transformers 5.25 brings a package named `kernels`; tests/conftest.py keeps
# the repository root, whose kernels/ would shadow it, off sys.path): open_clip (with its BPE vocabulary file, ftfy and regex) for the
# CLIP checkpoint conversion, tokenizer and training benchmark; transformers for BLIP (and its WordPiece
# tokenizer) and MPT parity on random weights; pycocoevalcap's BLEU and CIDEr-D scorers; scikit-learn's
# logistic regression for the linear probe.
# OpenFlamingo's modules are the Flamingo parity peer, but its package pins torch==2.0.1, which no resolver can
# join with this torch: install it apart with `pip install --no-deps open-flamingo==2.0.1` (its tests skip without).
# DEV also holds the export extra, so that CI runs tests/test_export.py, and onnxruntime, the peer that runs the
# exported ONNX encoders (as open_clip and transformers load the other formats).
DEV = [
    "pytest", "open-clip-torch==3.3.0", "transformers==5.25.0", "pycocoevalcap==1.2", "scikit-learn==1.9.1",
    "einops-exts==0.0.4", *EXPORT, *VIDEO, "onnxruntime==1.32.0",
]  # fmt: skip
PLOTS = ["matplotlib"]  # optional: ablation and probe figures


def extension_modules() -> list:
    if os.environ.get("CROSSMODAL_NO_EXTENSION") == "1":
        return []
    import torch
    from torch.utils import cpp_extension

    here = os.path.dirname(os.path.abspath(__file__))
    cpu_sources = sorted(glob.glob(os.path.join("kernels", "csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("kernels", "csrc", "*.cu")))
    force_cuda = os.environ.get("FORCE_CUDA") == "1"
    use_cuda = (
        cuda_sources
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and (force_cuda or torch.cuda.is_available())
    )
    include_dirs = [os.path.join(here, "kernels", "csrc")]
    # torch picks the C++ standard (C++20 for torch 2.14); without trapping math, gcc vectorises the exp loops
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        return [
            cpp_extension.CUDAExtension(
                "crossmodal.kernels._C",
                cpu_sources + cuda_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
                extra_link_args=["-fopenmp"],
                define_macros=[("WITH_CUDA", None)],
            )
        ]
    return [
        cpp_extension.CppExtension(
            "crossmodal.kernels._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


def build_ext_class():
    if os.environ.get("CROSSMODAL_NO_EXTENSION") == "1":
        return {}
    from torch.utils import cpp_extension

    return {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


class BuildPy(build_py):
    """The repository root is the package `crossmodal`: every module in it but this file is installed."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [module for module in modules if (module[0], module[1]) != ("crossmodal", "setup")]


# One import name: the repository root is the package `crossmodal` (its top-level folders are its subpackages), so
# the installed distribution adds no top-level name but `crossmodal` (no `config`, `data`, `distributed`, `kernels`).
LIBRARY = ["models", "losses", "data", "kernels", "metrics", "evaluation", "recipes"]

setup(
    name="crossmodal",
    version="0.1.0",
    description="Readable, fast vision-language research in pure PyTorch: CLIP, BLIP, Flamingo",
    python_requires=">=3.11",
    packages=["crossmodal", *(f"crossmodal.{package}" for package in LIBRARY)],
    package_dir={"crossmodal": "."},
    package_data={"crossmodal.data": ["prompts/*.txt"]},
    install_requires=RUNTIME,
    extras_require={"dev": DEV, "export": EXPORT, "video": VIDEO, "plots": PLOTS},
    ext_modules=extension_modules(),
    cmdclass={"build_py": BuildPy, **build_ext_class()},
)
