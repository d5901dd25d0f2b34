"""Compile the CUDA op (kernels/csrc/*.cu) on a machine without a GPU, to check that it builds (CI).

    CUDA_HOME=/usr/local/cuda-13.0 TORCH_CUDA_ARCH_LIST="8.0;9.0" python kernels/compile_cuda.py

Runs `setup.py build_ext` with FORCE_CUDA=1 into a temporary directory, so the installed kernels/_C*.so
is left alone; fails if the build fails or did not compile the .cu sources (no nvcc, CPU-only torch).
About 30 s on 2 cores (MAX_JOBS=2 by default).
"""
import glob
import os
import subprocess
import sys
import tempfile


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FORCE_CUDA="1")
    env.setdefault("MAX_JOBS", "2")
    with tempfile.TemporaryDirectory() as build_dir:
        command = [sys.executable, "setup.py", "build_ext", "--build-lib", os.path.join(build_dir, "lib")]
        command += ["--build-temp", os.path.join(build_dir, "temp")]
        if subprocess.run(command, cwd=root, env=env).returncode != 0:
            return 1
        cuda_objects = glob.glob(os.path.join(build_dir, "temp", "**", "*_cuda.o"), recursive=True)
        if not cuda_objects:
            print("compile_cuda: the build did not compile any .cu source (nvcc or a CUDA-enabled torch missing?)")
            return 1
    print(f"compile_cuda: compiled {len(cuda_objects)} CUDA source(s) for TORCH_CUDA_ARCH_LIST="
          f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '8.0;9.0+PTX')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
