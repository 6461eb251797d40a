"""multimodal_attention: scaled dot-product attention under an AttentionLayout.

q: [B, Hq, N, D], k/v: [B, Hkv, N, D] (SDPA layout), Hq a multiple of Hkv
(GQA, k/v never repeated in memory by the fast paths). A query row that may
attend to nothing outputs 0 and gets zero gradient, never NaN.

Backends: ``triton`` (fastvlm.kernels.attention: visits only the tiles the
layout's block map lists), ``flash_attn`` (flash-attn 2's varlen kernel, for
plain or packed causal layouts only, where it is installed), ``sdpa_cpu``
(fastvlm.ops.attention_cpu: torch's CPU flash kernel per segment, with
``is_causal`` where a segment is plain causal and a mask of one segment or
query block elsewhere; what ``auto`` serves on CPU) and ``reference``.
On CUDA the Triton kernel's candidate tile configs for the GPU — and, for
``auto``, flash-attn where it can serve the call — are timed (forward and
backward, on detached views) on the first call of each shape key, and the
fastest serves that key from then on. That first call is slower and briefly
needs the memory of one more attention call with gradients. While torch.compile
traces or a CUDA graph captures, and with FASTVLM_AUTOTUNE=0, the static per-GPU
table's config serves instead (every process and rank then runs the same
kernels; flash-attn is then never picked by ``auto``).

The Triton kernels run their work items (row blocks per head; dK/dV: key blocks) in the
order the config's grid names (TileConfig.grid: sm90's table runs them longest-first, by the
block map's tile counts, BlockMap.row_order / column_order, computed on the device and
cached with the map; the forward's order is reused by the deterministic dQ kernel).
kernels.persistent_grid's rule falls back to the plain grid where the work is uniform
(read once per block map, a wait on the device) or fills one round of the GPU.

The reference backend has two paths that compute the same function:
- ``dense``: materialises the [B, N, N] mask (tests, small N);
- ``blockwise``: walks the layout's block map with an online softmax over
  chunks of kv blocks and recomputes tiles in backward from the saved
  log-sum-exp, so memory stays O(N * block). Partial tiles evaluate the same
  interval predicate the kernels use; full tiles evaluate none.
"""
from __future__ import annotations

import functools
import math

import torch

from fastvlm.ops import attention_cpu
from fastvlm.ops import backend as dispatch
from fastvlm.ops.backend import register_op, resolve_backend
from fastvlm.ops.layout import AttentionLayout, BlockMap
from fastvlm.ops.mask_kinds import branches

_kernels, _kernel_import_error = dispatch.import_kernels("attention")


@functools.cache
def _flash_varlen():
    """flash-attn 2's varlen entry point, or None where flash-attn is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _flash_available(device: torch.device):
    if device.type != "cuda":
        return f"flash-attn runs on CUDA tensors only, not {device.type!r}"
    if _flash_varlen() is None:
        return "flash-attn is not installed (pip install fastvlm[flash])"
    if not torch.cuda.is_available():  # flash-attn installed on a machine without a GPU (a login node)
        return "no CUDA device is available"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "flash-attn 2 needs compute capability 8.0 or newer"
    return True


register_op("multimodal_attention", {"triton": dispatch.triton_serves(_kernels, _kernel_import_error),
                                     "flash_attn": _flash_available, "sdpa_cpu": attention_cpu.serves,
                                     "reference": dispatch.always},
            {"cpu": ("sdpa_cpu", "reference"), "cuda": ("triton", "reference")},
            {"triton": ("fastvlm::mm_attention_fwd", "fastvlm::mm_attention_bwd"),
             "sdpa_cpu": ("fastvlm::sdpa_cpu_attention_fwd", "fastvlm::sdpa_cpu_attention_bwd")})

GPU_KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # fp32 runs on GPUs only in the reference
DENSE_MAX_ELEMENTS = 1 << 24  # B*Hq*N*N scores above which the reference goes blockwise
REFERENCE_BLOCK = 128
REFERENCE_KV_CHUNK = 8  # kv blocks per online-softmax step


def check_attention_inputs(q, k, v, layout: AttentionLayout):
    """Shape/dtype/device validation shared by every backend."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected shape [B, H, N, D], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating dtype, got {t.dtype}")
    if not isinstance(layout, AttentionLayout):
        raise ValueError(f"layout: expected an AttentionLayout, got {type(layout).__name__}")
    b, hq, n, d = q.shape
    if b == 0 or n == 0:
        raise ValueError(f"q: empty batch or sequence, shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k, v: shapes differ, {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(f"k: expected [B={b}, Hkv, N={n}, D={d}], got {tuple(k.shape)}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"k: GQA needs q heads ({hq}) to be a multiple of k/v heads ({hkv})")
    if not d or d > 256:
        raise ValueError(f"q: head_dim must be in 1..256, got {d}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: dtype must match q ({q.dtype}), got {k.dtype} and {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"k, v: must be on q's device {q.device}")
    if layout.shape != (b, n):
        raise ValueError(f"layout: expected shape (B={b}, N={n}) to match q, got {layout.shape}")
    if layout.device != q.device:
        raise ValueError(f"layout: on {layout.device}, q on {q.device}; use layout.to(q.device)")


def multimodal_attention(q, k, v, layout: AttentionLayout, *, scale: float | None = None,
                         backend: str = "auto", deterministic: bool | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale, masked by `layout`) v, per head; returns q's shape and dtype.

    backend: ``auto`` (on CUDA the Triton kernel for fp16/bf16, or flash-attn's
    varlen kernel where it is installed, the layout is plain/packed causal and it
    was measured faster; the reference for other dtypes; ``sdpa_cpu`` on CPU), ``triton``
    (fp16/bf16 on CUDA, tile config measured per shape, see the module
    docstring; on CPU only under TRITON_INTERPRET=1, any float dtype),
    ``flash_attn`` (packed-causal layouts only), ``sdpa_cpu`` (CPU tensors, any
    float dtype) or ``reference``.

    deterministic (default: torch.are_deterministic_algorithms_enabled()): the
    Triton backward's fast mode is one dK/dV pass that adds dQ with fp32 atomics
    (5 matrix products per tile; the order of those additions varies run to run);
    deterministic=True runs a dQ kernel and a dK/dV kernel without atomics, bitwise
    reproducible for a given tile config. The reference backward is always
    deterministic; flash-attn's is when this is True.
    """
    check_attention_inputs(q, k, v, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    chosen = resolve_backend("multimodal_attention", backend, q.device)
    deterministic = torch.are_deterministic_algorithms_enabled() if deterministic is None else bool(deterministic)
    if chosen == "flash_attn":
        reason = flash_limitation(q, layout)
        if reason is not None:
            raise ValueError(f"backend='flash_attn' cannot serve this call: {reason}")
        return _flash_attention(q, k, v, layout, scale, deterministic)
    if chosen == "triton" and q.device.type == "cuda" and q.dtype not in GPU_KERNEL_DTYPES:
        if backend == "triton":  # fp32 tiles do not fit shared memory at the tuned sizes
            raise ValueError(f"q: the Triton attention kernel takes float16/bfloat16 on CUDA, got "
                             f"{q.dtype}; use backend='reference' or autocast")
        chosen = "reference"
    if chosen == "triton":
        cfg = _measured_choice(q, k, v, layout, scale, with_flash=backend == "auto", deterministic=deterministic)
        if cfg == "flash_attn":
            return _flash_attention(q, k, v, layout, scale, deterministic)
        return _triton_attention(q, k, v, layout, scale, cfg, deterministic)
    if chosen == "sdpa_cpu":
        return attention_cpu.sdpa_cpu_attention(q, k, v, layout, scale)
    return attention_reference(q, k, v, layout, scale=scale)


def multimodal_attention_varlen(q, k, v, cu_seqlens, *, image_ids=None, prefix_mask=None,
                                kind: str = "causal", split_softmax: bool = False,
                                scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Packed samples without padding, like flash-attn's varlen API.

    q: [T, Hq, D], k/v: [T, Hkv, D]; cu_seqlens: int [num_samples + 1], from 0
    to T; image_ids / prefix_mask: [T] per-token metadata (see AttentionLayout).
    Returns [T, Hq, D]. The kernels run on a [1, H, T, D] view (no copy).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name}: expected a tensor of shape [T, H, D], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    total = q.shape[0]
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise ValueError("cu_seqlens: expected a 1-D integer tensor [num_samples + 1]")
    if cu_seqlens.numel() < 2 or int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens: expected at least one sample and cu_seqlens[-1] == T = {total}, "
                         f"got {cu_seqlens.tolist()}")
    layout = AttentionLayout.from_cu_seqlens(cu_seqlens.to(q.device), total, image_ids=image_ids,
                                             prefix_mask=prefix_mask, kind=kind,
                                             split_softmax=split_softmax)
    out = multimodal_attention(*(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)), layout,
                               scale=scale, backend=backend)
    return out.transpose(1, 2).squeeze(0)


def flash_limitation(q, layout: AttentionLayout) -> str | None:
    """Why flash-attn's varlen kernel cannot compute this call, or None if it can."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"q: flash-attn takes float16/bfloat16, got {q.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"q: flash-attn needs head_dim a multiple of 8 up to 256, got {q.shape[-1]}"
    if not layout.is_packed_causal:
        return (f"layout: flash-attn expresses plain or packed causal masks of at least one token "
                f"only; this one (kind={layout.kind!r}) lets some tokens see later ones, hides "
                f"earlier ones, or is all padding")
    return None


def _flash_attention(q, k, v, layout: AttentionLayout, scale: float, deterministic: bool) -> torch.Tensor:
    """Every segment of every row as one packed causal sequence; padding rows output 0.
    Returns [B, H, N, D] with the strides of [B, N, H, D] (a transposed view, as SDPA's)."""
    cu, index, max_len = layout.varlen_segments()
    b, h, n, d = q.shape

    def pack(t):  # [B, H, N, D] -> [live tokens, H, D]; a view when B == 1 and t came from [N, H, D]
        t = t.transpose(1, 2).reshape(b * n, t.shape[1], d)
        return t if index is None else t[index]

    # its backward accumulates dQ with atomics unless asked not to
    out = _flash_varlen()(pack(q), pack(k), pack(v), cu, cu, max_len, max_len, softmax_scale=scale,
                          causal=True, deterministic=deterministic)
    if index is not None:
        out = out.new_zeros(b * n, h, d).index_copy(0, index, out)
    return out.view(b, n, h, d).transpose(1, 2)


def _measured_choice(q, k, v, layout: AttentionLayout, scale: float, with_flash: bool, deterministic: bool):
    """The (forward, backward) tile configs (or "flash_attn") for this call: on CUDA, each candidate is
    timed on the first call of a shape key (forward + backward when training) and
    the fastest serves that key from then on; elsewhere, and while torch.compile
    traces or a CUDA graph captures, the table's config."""
    first = (_kernels.pick_config(q.device, q.shape[-1]), _kernels.pick_config(q.device, q.shape[-1], backward=True))
    if not dispatch.can_measure(q.device):
        return first
    flash = with_flash and _flash_available(q.device) is True and flash_limitation(q, layout) is None
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = choice_key(q, k, layout, flash, training, deterministic)
    if key in dispatch.FASTEST:
        return dispatch.FASTEST[key]
    candidates = list(_kernels.candidate_configs(torch.cuda.get_device_capability(q.device), q.shape[-1]))
    if flash:
        candidates.append("flash_attn")
    runners = {c: _trial(c, q, k, v, layout, scale, training, deterministic) for c in candidates}
    return dispatch.fastest_backend(key, runners, q.device)


def choice_key(q, k, layout: AttentionLayout, flash: bool, training: bool, deterministic: bool = False) -> tuple:
    """What decides the fastest candidate: shapes (N to the next power of two), dtype,
    the mask kind, whether flash-attn is in the running, whether backward is timed, and
    in which mode (deterministic or not)."""
    b, hq, n, d = q.shape
    return ("multimodal_attention", q.device, q.dtype, b, hq, k.shape[1], d, dispatch.shape_bucket(n),
            layout.kind, layout.split_softmax, flash, training, deterministic)


def _trial(choice, q, k, v, layout: AttentionLayout, scale: float, training: bool, deterministic: bool):
    """One call (and backward) on detached views of the inputs: the caller's graph is untouched."""
    def call(q, k, v):
        return (_flash_attention(q, k, v, layout, scale, deterministic) if choice == "flash_attn"
                else _triton_attention(q, k, v, layout, scale, choice, deterministic))
    return dispatch.trial(call, (q, k, v), training)


def _triton_attention(q, k, v, layout: AttentionLayout, scale: float, cfgs, deterministic: bool) -> torch.Tensor:
    """cfgs: (forward, backward) tile configs. The forward (and the deterministic dQ kernel)
    walk the kv lists of the forward's block map, dK/dV the q lists of the backward's."""
    fwd, bwd = cfgs
    fwd_map, bwd_map = layout.block_map(fwd.block_m, fwd.block_n), layout.block_map(bwd.block_m, bwd.block_n)
    # strides the kernels take, fixed here so the fake impls' empty_like match the real outputs
    q, k, v = _kernels.kernel_inputs(q, k, v)
    b, hq, _, _ = q.shape
    # work-order grids (kernels.persistent_grid's rule): the forward and the deterministic dQ
    # kernel over the forward map's row blocks, dK/dV over the backward map's key blocks
    programs = _kernels.persistent_grid(fwd, q.device, b * hq * fwd_map.num_q_blocks,
                                        lambda: (fwd_map.uniform_work() or (None,))[0])
    dkdv_programs = _kernels.persistent_grid(bwd, q.device, b * k.shape[1] * bwd_map.num_kv_blocks,
                                             lambda: (bwd_map.uniform_work() or (None, None))[1])
    out, _, _ = torch.ops.fastvlm.mm_attention_fwd(
        q, k, v, layout.lo, layout.hi, layout.is_image, *fwd_map.tensors[:4], *bwd_map.tensors[4:],
        layout.kind_code, layout.split_softmax, scale, *_config_ints(fwd), *_config_ints(bwd), bwd.transposed_dq,
        deterministic, layout.cut, fwd.tma, bwd.tma, fwd_map.row_order() if programs else None,
        bwd_map.column_order() if dkdv_programs else None, programs, dkdv_programs)
    return out


def _config_ints(cfg) -> tuple[int, int, int, int]:
    return cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages


def attention_reference(q, k, v, layout: AttentionLayout, *, scale: float | None = None,
                        impl: str = "auto", block: int = REFERENCE_BLOCK) -> torch.Tensor:
    """The reference: ``dense`` or ``blockwise`` (``auto`` picks by size)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if impl == "auto":
        b, h, n, _ = q.shape
        impl = "dense" if b * h * n * n <= DENSE_MAX_ELEMENTS else "blockwise"
    if impl == "dense":
        return _dense_attention(q, k, v, layout, scale)
    if impl == "blockwise":
        return _BlockwiseAttention.apply(q, k, v, layout, scale, layout.block_map(block, block))
    raise ValueError(f"impl: expected 'auto', 'dense' or 'blockwise', got {impl!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_softmax_av(scores, mask, v):
    """softmax over allowed keys, times v; rows with no allowed key give 0 (and 0 grad)."""
    s = scores.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    return (p @ v) / torch.where(denom > 0, denom, torch.ones_like(denom))


def _dense_attention(q, k, v, layout, scale):
    group = q.shape[1] // k.shape[1]
    ct = _compute_dtype(q.dtype)
    qc = q.to(ct)
    kc = k.to(ct).repeat_interleave(group, 1)
    vc = v.to(ct).repeat_interleave(group, 1)
    scores = (qc @ kc.transpose(-1, -2)) * scale
    masks = branches(layout.dense(), layout.is_image[:, None, :], layout.split_softmax)
    out = sum(_masked_softmax_av(scores, m[:, None], vc) for m in masks)
    return out.to(q.dtype)


def tile_predicate(layout: AttentionLayout, b: int, rows: torch.Tensor, cols: torch.Tensor):
    """Allowed pairs for query rows x key cols of batch row b (the kind's rule, as the
    kernels evaluate it in partial tiles)."""
    return layout.tile_predicate(b, rows, cols)


def _tile_masks(layout: AttentionLayout, bm: BlockMap, b: int, qb: int, kv_blocks, n: int):
    """Key positions and per-branch masks [rows, keys] for one q block against a
    chunk of (kv block, is_full) pairs."""
    dev = layout.device
    q0, q1 = qb * bm.block_q, min(n, (qb + 1) * bm.block_q)
    rows = torch.arange(q0, q1, device=dev)
    cols, masks = [], []
    for kb, full in kv_blocks:
        c = torch.arange(kb * bm.block_k, min(n, (kb + 1) * bm.block_k), device=dev)
        cols.append(c)
        masks.append(torch.ones(len(rows), len(c), dtype=torch.bool, device=dev) if full
                     else tile_predicate(layout, b, rows, c))
    cols, allowed = torch.cat(cols), torch.cat(masks, 1)
    return rows, cols, branches(allowed, layout.is_image[b, cols][None, :], layout.split_softmax)


def _kv_schedule(bm: BlockMap, b: int, qb: int):
    """The kv blocks of one q block, ascending, with whether each is full; chunked."""
    part = bm.kv_indices[b, qb, :int(bm.kv_num_blocks[b, qb])].tolist()
    full = bm.full_kv_indices[b, qb, :int(bm.full_kv_num_blocks[b, qb])].tolist()
    blocks = sorted([(kb, False) for kb in part] + [(kb, True) for kb in full])
    return [blocks[i:i + REFERENCE_KV_CHUNK] for i in range(0, len(blocks), REFERENCE_KV_CHUNK)]


class _BlockwiseAttention(torch.autograd.Function):
    """Flash-style reference: online softmax forward, recompute-from-LSE backward."""

    @staticmethod
    def forward(ctx, q, k, v, layout: AttentionLayout, scale: float, bm: BlockMap):
        bsz, hq, n, d = q.shape
        group = hq // k.shape[1]
        ct = _compute_dtype(q.dtype)
        branches = 2 if layout.split_softmax else 1
        outs = torch.zeros(branches, bsz, hq, n, d, dtype=ct, device=q.device)
        lse = torch.full((branches, bsz, hq, n), float("-inf"), dtype=ct, device=q.device)
        for b in range(bsz):
            for qb in range(bm.num_q_blocks):
                chunks = _kv_schedule(bm, b, qb)
                if not chunks:
                    continue
                rows = None
                m = l = acc = None
                for chunk in chunks:
                    rows, cols, masks = _tile_masks(layout, bm, b, qb, chunk, n)
                    qs = q[b, :, rows].to(ct)
                    ks = k[b, :, cols].to(ct).repeat_interleave(group, 0)
                    vs = v[b, :, cols].to(ct).repeat_interleave(group, 0)
                    s = (qs @ ks.transpose(-1, -2)) * scale  # [H, rows, keys]
                    if m is None:
                        m = torch.full((branches, hq, len(rows), 1), float("-inf"), dtype=ct, device=q.device)
                        l = torch.zeros_like(m)
                        acc = torch.zeros(branches, hq, len(rows), d, dtype=ct, device=q.device)
                    for br, mask in enumerate(masks):
                        sm = s.masked_fill(~mask, float("-inf"))
                        m_new = torch.maximum(m[br], sm.amax(-1, keepdim=True))
                        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
                        alpha = torch.exp(m[br] - m_safe)  # exp(-inf) = 0 on the first hit
                        p = torch.exp(sm - m_safe)
                        l[br] = l[br] * alpha + p.sum(-1, keepdim=True)
                        acc[br] = acc[br] * alpha + p @ vs
                        m[br] = m_new
                for br in range(branches):
                    has = l[br] > 0
                    outs[br, b, :, rows] = torch.where(has, acc[br] / torch.where(has, l[br], 1), 0)
                    lse[br, b, :, rows] = torch.where(has, m[br] + torch.log(torch.where(has, l[br], 1)),
                                                      float("-inf"))[..., 0]
        ctx.save_for_backward(q, k, v, outs, lse)
        ctx.layout, ctx.scale, ctx.bm = layout, scale, bm
        return outs.sum(0).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, outs, lse = ctx.saved_tensors
        layout, scale, bm = ctx.layout, ctx.scale, ctx.bm
        bsz, hq, n, d = q.shape
        hkv = k.shape[1]
        group = hq // hkv
        ct = outs.dtype
        do = dout.to(ct)
        delta = (do[None] * outs).sum(-1)  # per branch: rowsum(dO * O_branch)
        dq = torch.zeros(bsz, hq, n, d, dtype=ct, device=q.device)
        dk = torch.zeros(bsz, hkv, n, d, dtype=ct, device=q.device)
        dv = torch.zeros_like(dk)
        for b in range(bsz):
            for qb in range(bm.num_q_blocks):
                for chunk in _kv_schedule(bm, b, qb):
                    rows, cols, masks = _tile_masks(layout, bm, b, qb, chunk, n)
                    qs = q[b, :, rows].to(ct)
                    ks = k[b, :, cols].to(ct).repeat_interleave(group, 0)
                    vs = v[b, :, cols].to(ct).repeat_interleave(group, 0)
                    dos = do[b, :, rows]
                    s = (qs @ ks.transpose(-1, -2)) * scale
                    dp = dos @ vs.transpose(-1, -2)
                    dq_t = torch.zeros_like(qs)
                    dk_t = torch.zeros_like(ks)
                    dv_t = torch.zeros_like(vs)
                    for br, mask in enumerate(masks):
                        row_lse = lse[br, b, :, rows][..., None]
                        live = torch.isfinite(row_lse)
                        p = torch.where(mask & live, torch.exp(s - torch.where(live, row_lse, 0)), 0)
                        ds = p * (dp - delta[br, b, :, rows][..., None])
                        dv_t += p.transpose(-1, -2) @ dos
                        dq_t += ds @ ks
                        dk_t += ds.transpose(-1, -2) @ qs
                    dq[b, :, rows] += dq_t * scale
                    dk[b, :, cols] += (dk_t * scale).view(hkv, group, len(cols), d).sum(1)
                    dv[b, :, cols] += dv_t.view(hkv, group, len(cols), d).sum(1)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


# ---- torch.library custom ops (torch.compile traces them without a graph break) ---------------
# The layout's per-token metadata and the block-map lists are tensor inputs; the tile
# sizes the map was built at travel with them as ints.


if _kernels is not None:
    @torch.library.custom_op("fastvlm::mm_attention_fwd", mutates_args=())
    def _mm_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor,
                          hi: torch.Tensor, is_image: torch.Tensor, kv_num: torch.Tensor,
                          kv_idx: torch.Tensor, full_kv_num: torch.Tensor, full_kv_idx: torch.Tensor,
                          q_num: torch.Tensor, q_idx: torch.Tensor, full_q_num: torch.Tensor,
                          full_q_idx: torch.Tensor, kind: int, split: bool, scale: float,
                          block_m: int, block_n: int, num_warps: int, num_stages: int,
                          bwd_block_m: int, bwd_block_n: int, bwd_num_warps: int, bwd_num_stages: int,
                          bwd_transposed_dq: bool, deterministic: bool, cut: torch.Tensor | None = None,
                          tma: bool = False, bwd_tma: bool = False,
                          row_order: torch.Tensor | None = None, col_order: torch.Tensor | None = None,
                          programs: int = 0, dkdv_programs: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out, branch outputs [2 or 0, B, H, N, D], lse [branches, B, H, N] in log2 units).
        The kv lists are the forward's block map, the q lists the backward's (bwd_* tiles);
        cut: the layout's (shared prompt) or None; tma, bwd_tma: the configs' TMA flags.
        programs, dkdv_programs (kernels.persistent_grid's): 0 the plain grid, -1
        longest-first, P persistent programs (the forward and deterministic dQ over
        row_order, dK/dV over col_order)."""
        cfg = _kernels.TileConfig(block_m, block_n, num_warps, num_stages, tma=tma)
        return _kernels.attention_forward(q, k, v, lo, hi, is_image, kv_num, kv_idx, full_kv_num,
                                          full_kv_idx, kind=kind, split=split, scale=scale, cfg=cfg, cut=cut,
                                          order=row_order, programs=programs)

    @_mm_attention_fwd.register_fake
    def _(q, k, v, lo, hi, is_image, *rest):
        split = rest[9]
        b, h, n, d = q.shape
        return (torch.empty_like(q), q.new_empty((2 if split else 0, b, h, n, d)),
                q.new_empty((2 if split else 1, b, h, n), dtype=torch.float32))

    @torch.library.custom_op("fastvlm::mm_attention_bwd", mutates_args=())
    def _mm_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, obr: torch.Tensor, lse: torch.Tensor, lo: torch.Tensor,
                          hi: torch.Tensor, is_image: torch.Tensor, kv_num: torch.Tensor,
                          kv_idx: torch.Tensor, full_kv_num: torch.Tensor, full_kv_idx: torch.Tensor,
                          q_num: torch.Tensor, q_idx: torch.Tensor, full_q_num: torch.Tensor,
                          full_q_idx: torch.Tensor, kind: int, split: bool, scale: float,
                          block_m: int, block_n: int, num_warps: int, num_stages: int,
                          bwd_block_m: int, bwd_block_n: int, bwd_num_warps: int, bwd_num_stages: int,
                          bwd_transposed_dq: bool, deterministic: bool, cut: torch.Tensor | None = None,
                          tma: bool = False, bwd_tma: bool = False,
                          row_order: torch.Tensor | None = None, col_order: torch.Tensor | None = None,
                          programs: int = 0, dkdv_programs: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = _kernels.TileConfig(block_m, block_n, num_warps, num_stages, tma=tma)
        dkdv_cfg = _kernels.TileConfig(bwd_block_m, bwd_block_n, bwd_num_warps, bwd_num_stages, bwd_transposed_dq,
                                       tma=bwd_tma)
        return _kernels.attention_backward(
            dout, q, k, v, out, obr, lse, lo, hi, is_image, kv_num, kv_idx, full_kv_num, full_kv_idx,
            q_num, q_idx, full_q_num, full_q_idx, kind=kind, split=split, scale=scale, cfg=cfg,
            dkdv_cfg=dkdv_cfg, deterministic=deterministic, cut=cut, row_order=row_order, col_order=col_order,
            programs=programs, dkdv_programs=dkdv_programs)

    @_mm_attention_bwd.register_fake
    def _(dout, q, k, v, *rest):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def _setup_fwd_context(ctx, inputs, output):
        q, k, v, lo, hi, is_image, *block_map = inputs[:14]
        out, obr, lse = output
        ctx.save_for_backward(q, k, v, out, obr, lse, lo, hi, is_image, *block_map)
        ctx.params = inputs[14:]

    def _fwd_backward(ctx, dout, _dobr, _dlse):
        dq, dk, dv = torch.ops.fastvlm.mm_attention_bwd(dout, *ctx.saved_tensors, *ctx.params)
        return (dq, dk, dv) + (None,) * (len(ctx.params) + 11)

    _mm_attention_fwd.register_autograd(_fwd_backward, setup_context=_setup_fwd_context)
