"""Builds fastvlm._C from csrc/ (the source list lives in csrc/sources.txt).

Environment:
  FASTVLM_CUDA=auto|1|0   compile the CUDA kernels: auto = when a CUDA toolkit and a
                          CUDA build of torch are both present; 1 = required; 0 = never.
  TORCH_CUDA_ARCH_LIST    GPU architectures (default: cuda_archs in csrc/build.cfg, A100 and H100).
  MAX_JOBS                parallel compile jobs (torch's ninja build honours it).
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def read_build_config() -> dict[str, list[str]]:
    """csrc/build.cfg: the flags CMakeLists.txt reads too."""
    cfg = {}
    for raw in (ROOT / "csrc" / "build.cfg").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            cfg[key.strip()] = value.split()
    return cfg


BUILD = read_build_config()


def read_sources():
    sections, current = {}, None
    for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        else:
            current.append(line)
    return sections


def locate_cuda_home():
    """Point CUDA_HOME at the real toolkit before torch guesses it.

    torch derives CUDA_HOME from `which nvcc`, which is wrong when nvcc is a
    wrapper script (as /usr/local/bin/nvcc is on our machines); nvcc itself
    knows its install root.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return
    m = re.search(r"^#\$ TOP=(.+)$", out, re.M)
    if m and (Path(m.group(1).strip()) / "include" / "cuda_runtime.h").exists():
        os.environ["CUDA_HOME"] = str(Path(m.group(1).strip()).resolve())


def want_cuda():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    mode = os.environ.get("FASTVLM_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"FASTVLM_CUDA must be auto, 1 or 0, got {mode!r}")
    have = CUDA_HOME is not None and torch.version.cuda is not None
    if mode == "1" and not have:
        raise SystemExit(
            "FASTVLM_CUDA=1 but no CUDA toolkit (nvcc / CUDA_HOME) or no CUDA build of torch "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
        )
    return have and mode != "0"


def cublaslt_location():
    """(include dir, library path) of cuBLASLt: the CUDA toolkit's, else the one in the
    nvidia-cublas wheel that a pip-installed torch itself loads (toolkits may lack it)."""
    import importlib.util

    from torch.utils.cpp_extension import CUDA_HOME

    roots = [Path(CUDA_HOME)] if CUDA_HOME else []
    for package in ("nvidia.cu13", "nvidia.cublas"):  # CUDA 13 wheels; CUDA 12 wheels
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            spec = None
        if spec is not None and spec.submodule_search_locations:
            roots += [Path(p) for p in spec.submodule_search_locations]
    for root in roots:
        libs = sorted(lib for d in ("lib64", "lib") for lib in (root / d).glob("libcublasLt.so*"))
        if (root / "include" / "cublasLt.h").exists() and libs:
            return root / "include", libs[0]
    print(f"fastvlm: cuBLASLt (cublasLt.h + libcublasLt.so) not found under {', '.join(map(str, roots))}; "
          "building the CUDA kernels without the cuBLASLt connector path")
    return None


def extensions():
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    src = read_sources()
    std = f"-std=c++{BUILD['cxx_standard'][0]}"
    cxx = [std, *BUILD["cxx_flags"]]
    include_dirs = [str(ROOT / "csrc")]
    if want_cuda():
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(BUILD["cuda_archs"]))
        sources, macros, link = src["cpu"] + src["cuda"], [], []
        cublaslt = cublaslt_location()
        if cublaslt is not None:
            lt_include, lt_lib = cublaslt
            sources += src.get("cuda_cublaslt", [])
            include_dirs.append(str(lt_include))
            macros.append(("FASTVLM_WITH_CUBLASLT", None))
            # the exact file (wheels ship only libcublasLt.so.N); rpath for use without torch's copy loaded
            link = [str(lt_lib), f"-Wl,-rpath,{lt_lib.parent}"]
        ext = CUDAExtension(
            "fastvlm._C",
            sources + src["bindings"],
            include_dirs=include_dirs,
            extra_link_args=link,
            define_macros=[("FASTVLM_WITH_CUDA", None), ("FASTVLM_CUDA_ARCHS", f'"{archs}"'), *macros],
            extra_compile_args={"cxx": cxx, "nvcc": [std, *BUILD["cuda_flags"], "-DFASTVLM_WITH_CUDA"]},
        )
    else:
        ext = CppExtension(
            "fastvlm._C", src["cpu"] + src["bindings"], include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


locate_cuda_home()
ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
