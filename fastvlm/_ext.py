"""The one boundary between Python and the compiled extension fastvlm._C.

Everything else in fastvlm asks this module whether a compiled op exists and
calls it through here, so a missing or broken build degrades to the reference
implementations instead of failing at import.
"""
from __future__ import annotations

import torch

try:
    from fastvlm import _C  # noqa: F401  (registers torch.ops.fastvlm.*)

    load_error: str | None = None
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _C = None
    load_error = f"{type(exc).__name__}: {exc}"


def available() -> bool:
    """Whether fastvlm._C imported."""
    return _C is not None


def cuda_built() -> bool:
    """Whether fastvlm._C carries its CUDA kernels."""
    return _C is not None and bool(_C.built_with_cuda())


def cuda_archs() -> str:
    """The TORCH_CUDA_ARCH_LIST the CUDA kernels were built for ('' if none)."""
    return _C.cuda_archs() if cuda_built() else ""


def supports_device(device: torch.device) -> bool:
    """Whether the compiled ops have a kernel for tensors on `device`."""
    if device.type == "cpu":
        return available()
    if device.type == "cuda":
        return cuda_built()
    return False


def block_map(lo, hi, is_image, kind: int, block_q: int, block_k: int, cut=None) -> list[torch.Tensor]:
    """torch.ops.fastvlm.block_map: the 8 count/index tensors of a BlockMap."""
    if not supports_device(lo.device):
        raise RuntimeError(f"fastvlm._C has no block_map kernel for device {lo.device} "
                           f"(extension: {'built' if available() else load_error})")
    return torch.ops.fastvlm.block_map(lo, hi, is_image, kind, block_q, block_k, cut)


if available():  # the C++ op's shapes, so torch.compile traces a block map built inside a graph
    @torch.library.register_fake("fastvlm::block_map")
    def _(lo, hi, is_image, kind, block_q, block_k, cut=None):
        b, n = lo.shape
        tq, tk = -(-n // block_q), -(-n // block_k)
        shapes = ((b, tq), (b, tq, tk), (b, tq), (b, tq, tk), (b, tk), (b, tk, tq), (b, tk), (b, tk, tq))
        return [lo.new_empty(s, dtype=torch.int32) for s in shapes]


def cublaslt_built() -> bool:
    """Whether fastvlm._C carries the cuBLASLt connector GEMMs."""
    return cuda_built() and bool(getattr(_C, "built_with_cublaslt", lambda: False)())


def _require_cuda_ops(name: str, device: torch.device):
    if device.type != "cuda" or not cublaslt_built():
        raise RuntimeError(f"fastvlm._C has no {name} kernel for device {device} "
                           f"(extension: {'built without CUDA' if available() else load_error})")


def cublaslt_linear_gelu(x, w, b) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu_tanh(x w^T + b), x w^T + b) from one cuBLASLt GEMM (GELU_AUX_BIAS epilogue)."""
    _require_cuda_ops("cublaslt_linear_gelu", x.device)
    return torch.ops.fastvlm.cublaslt_linear_gelu(x, w, b)


def cublaslt_dgelu_bgrad(dy, w2, pre) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz, dbias): dz = (dy @ w2) * gelu_tanh'(pre), dbias = dz.sum(0), one cuBLASLt GEMM."""
    _require_cuda_ops("cublaslt_dgelu_bgrad", dy.device)
    return torch.ops.fastvlm.cublaslt_dgelu_bgrad(dy, w2, pre)
