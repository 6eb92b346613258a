"""Build mamba-ssm's selective-scan CUDA extension for one GPU architecture, from its sdist, offline.

    python -m nnunetv2_dsm.benchmark.mamba_build mamba_ssm-2.3.2.post1.tar.gz --target DIR [--arch 9.0]

mamba-ssm ships no wheels for recent torch releases, and its setup.py compiles nine GPU architectures plus
causal-conv1d (about 70 CPU-minutes) whatever ``TORCH_CUDA_ARCH_LIST`` says: it passes its own ``-gencode``
flags, and torch's build then ignores the variable. DSM uses only ``selective_scan_cuda``. This builds that one
extension with mamba-ssm's own sources and compiler flags, for ``--arch`` only (default: the local GPU's compute
capability), with ninja in parallel (``MAX_JOBS``, default: all cores), against the torch that runs this script
(no build isolation), and puts the extension and mamba-ssm's Python package into ``--target`` (add it to
PYTHONPATH). nvcc: ``$CUDA_HOME/bin/nvcc``, else ``nvcc`` on PATH, else the ``nvidia-cuda-nvcc`` wheels
(``nvidia/cu13``, see README "Building the mamba-ssm kernels"). ``--dry-run`` unpacks and prints the plan only.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import List, Optional, Sequence

# mamba-ssm 2.3.x setup.py: the nvcc flags of its CUDA build, minus its hard-coded -gencode list and -std (below)
NVCC_FLAGS = ["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
              "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo",
              "--threads", "4"]

SETUP = '''from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension
setup(name="selective_scan_cuda", packages=[], py_modules=[], ext_modules=[CUDAExtension(
    "selective_scan_cuda", sources={sources!r}, include_dirs={include!r},
    extra_compile_args={{"cxx": ["-O3", "-std={std}"], "nvcc": {nvcc!r}}})],
    cmdclass={{"build_ext": BuildExtension}})
'''


def cxx_standard() -> str:
    """c++20 when the torch headers demand it (torch >= 2.10: "C++20 or later compatible compiler is required";
    mamba-ssm's setup.py still says c++17), else c++17."""
    import torch
    aten = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    try:
        with open(aten) as f:
            return "c++20" if "C++20" in f.read() else "c++17"
    except OSError:
        return "c++17"


def local_arch() -> str:
    """The compute capability of CUDA device 0, as "9.0"."""
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: give --arch (e.g. 9.0 for H100/H200, 8.0 for A100, 8.6 for RTX 30xx)")
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def gencode(arch: str) -> List[str]:
    """-gencode flags for one architecture "9.0" → sm_90 machine code (+ nothing else: no PTX of other GPUs)."""
    cc = arch.replace(".", "")
    if not cc.isdigit():
        raise SystemExit(f"--arch {arch!r}: expected a compute capability such as 9.0")
    return ["-gencode", f"arch=compute_{cc},code=sm_{cc}"]


def find_cuda_home() -> Optional[str]:
    """The first toolkit with bin/nvcc and include/cuda_runtime.h among: $CUDA_HOME, $CUDA_PATH, the folder above
    the real ``nvcc`` on PATH, /usr/local/cuda, and the nvidia-cuda-nvcc wheels' nvidia/cu13 (or cu12) folder in
    this Python's site-packages. None when there is none."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    candidates += [os.path.join(path, "nvidia", cu) for path in sys.path for cu in ("cu13", "cu12")]
    for home in filter(None, candidates):
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.abspath(home)
    return None


def complete_wheel_toolkit(home: str) -> None:
    """torch's build links ``-L$CUDA_HOME/lib64 -lcudart``; the nvidia wheels ship lib/ and libcudart.so.13 only.
    Adds the two links when they are missing (a no-op on a regular toolkit)."""
    lib, lib64 = os.path.join(home, "lib"), os.path.join(home, "lib64")
    if os.path.isdir(lib) and not os.path.exists(lib64):
        os.symlink("lib", lib64)
    cudart = sorted(glob.glob(os.path.join(lib, "libcudart.so.*")))
    if cudart and not os.path.exists(os.path.join(lib, "libcudart.so")):
        os.symlink(os.path.basename(cudart[0]), os.path.join(lib, "libcudart.so"))


def unpack(sdist: str, into: str) -> str:
    """The sdist's top folder (holding setup.py, csrc/ and mamba_ssm/) unpacked under ``into``."""
    with tarfile.open(sdist) as tar:
        tar.extractall(into, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(into)
    tops = [d for d in glob.glob(os.path.join(into, "*")) if os.path.isfile(os.path.join(d, "setup.py"))]
    if len(tops) != 1 or not os.path.isdir(os.path.join(tops[0], "csrc", "selective_scan")):
        raise SystemExit(f"{sdist}: not a mamba-ssm sdist (no setup.py with csrc/selective_scan)")
    return tops[0]


def build(sdist: str, target: str, arch: Optional[str] = None, jobs: Optional[int] = None,
          dry_run: bool = False, workdir: Optional[str] = None, trim_if_broken: bool = False) -> dict:
    """Unpack ``sdist``, build selective_scan_cuda for ``arch`` into ``target`` and copy mamba_ssm/ there.
    Returns what was done (arch, nvcc, seconds, the extension's path; ``dry_run``: the plan only)."""
    workdir = workdir or tempfile.mkdtemp(prefix="mamba_build_")
    src = unpack(sdist, workdir)
    sources = sorted(p for p in glob.glob(os.path.join(src, "csrc", "selective_scan", "*.c*"))
                     if p.endswith((".cpp", ".cu")))
    arch = arch or (None if dry_run else local_arch())
    std = cxx_standard()
    nvcc = NVCC_FLAGS + [f"-std={std}"] + (gencode(arch) if arch else ["-gencode", "arch=compute_XX,code=sm_XX"])
    build_dir = os.path.join(workdir, "build_selective_scan")  # away from the sdist's pyproject.toml
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "setup.py"), "w") as f:
        f.write(SETUP.format(sources=sources, include=[os.path.join(src, "csrc", "selective_scan")], nvcc=nvcc,
                             std=std))
    home = find_cuda_home()
    plan = {"sdist": os.path.abspath(sdist), "sources": [os.path.relpath(p, src) for p in sources], "arch": arch, "nvcc_flags": nvcc,
            "cuda_home": home, "target": os.path.abspath(target), "jobs": jobs or os.cpu_count()}
    if dry_run:
        return plan
    if home is None:
        raise SystemExit("nvcc not found: set CUDA_HOME, put nvcc on PATH, or pip install the nvidia-cuda-nvcc, "
                         "-crt, -nvvm, -cccl and -runtime wheels matching torch.version.cuda")
    complete_wheel_toolkit(home)
    env = dict(os.environ, CUDA_HOME=home, MAX_JOBS=str(plan["jobs"]), TORCH_CUDA_ARCH_LIST=arch,
               PATH=os.path.join(home, "bin") + os.pathsep + os.environ.get("PATH", ""))
    os.makedirs(target, exist_ok=True)
    started = time.time()
    subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", os.path.abspath(target)],
                   cwd=build_dir, env=env, check=True)
    plan["seconds"] = round(time.time() - started, 1)
    shutil.copytree(os.path.join(src, "mamba_ssm"), os.path.join(target, "mamba_ssm"), dirs_exist_ok=True)
    plan["extension"] = (glob.glob(os.path.join(target, "selective_scan_cuda*.so")) or [None])[0]
    plan.update(check_package_import(target, trim_if_broken))
    return plan


def check_package_import(target: str, trim_if_broken: bool) -> dict:
    """Does ``import mamba_ssm`` work from ``target``? mamba-ssm 2.x's __init__ imports Mamba2/3 and the LM head
    (transformers, triton); DSM needs none of it. With ``trim_if_broken``, a failing __init__ of this private copy
    is cut down to the version line, so the kernels (ops.selective_scan_interface) import; the result says so."""
    code = "import mamba_ssm, mamba_ssm.ops.selective_scan_interface"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [target, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode == 0:
        return {"package_import": "ok"}
    error = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    out = {"package_import": f"failed: {error}", "init_trimmed": False}
    if trim_if_broken:
        init = os.path.join(target, "mamba_ssm", "__init__.py")
        with open(init) as f:
            version = [line for line in f if line.startswith("__version__")]
        with open(init, "w") as f:
            f.write("".join(version) + "# cut down by nnunetv2_dsm.benchmark.mamba_build: the full __init__ failed\n")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        out["init_trimmed"] = True
        out["kernels_import_after_trim"] = "ok" if proc.returncode == 0 else \
            f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:300]}"
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m nnunetv2_dsm.benchmark.mamba_build", description=__doc__.split("\n\n")[0])
    p.add_argument("sdist", help="mamba_ssm-<version>.tar.gz (pip download --no-deps --no-binary :all: mamba-ssm)")
    p.add_argument("--target", required=True, help="folder for selective_scan_cuda*.so and mamba_ssm/ (PYTHONPATH)")
    p.add_argument("--arch", help="compute capability to build for (default: the local GPU's, e.g. 9.0)")
    p.add_argument("--jobs", type=int, help="parallel compiler jobs (default: all cores)")
    p.add_argument("--dry-run", action="store_true", help="unpack and print the plan; compile nothing")
    p.add_argument("--trim-init-if-broken", action="store_true",
                   help="if `import mamba_ssm` fails afterwards, cut the copied package's __init__ down (see "
                        "check_package_import)")
    p.add_argument("--json", help="also write the result to this JSON file")
    args = p.parse_args(argv)
    try:
        plan = build(args.sdist, args.target, args.arch, args.jobs, args.dry_run, trim_if_broken=args.trim_init_if_broken)
    except (subprocess.CalledProcessError, SystemExit) as e:
        plan = {"error": f"build failed: {e}"}
    for k, v in plan.items():
        print(f"{k}: {v}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan, f, indent=1)
    if "error" in plan:
        raise SystemExit(1)
    return plan


if __name__ == "__main__":
    main()
