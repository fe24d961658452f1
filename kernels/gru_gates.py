"""Fused ConvGRU gate kernels (Triton): forward and backward of the three gate ops of
``rim_fast.ops.reference`` (``gru_gates_zr``, ``gru_gates_h``, ``gru_gates_zero_state``).

Every tensor is seen as [B, C, N] with N = prod(spatial) (N = 1 for a GRU on linear layers, [B, C]). One
program handles a [BLOCK_C, BLOCK_N] tile of one batch sample; a tensor whose spatial dims cannot be merged
into one stride is made contiguous first (``_bcn``), everything else (slices, transposes, channels-last,
expanded grads) is read in place through its strides. When N = 1 the batch plays the role of N (batch
stride as the "N" stride) so that [B, H] tensors still fill whole tiles. Outputs are allocated contiguous, or
channels-last where the W-convolution's output (wx, wzh) is (``_out``): a network kept channels-last stays so.

All arithmetic is fp32 (inputs are loaded and converted), outputs are stored in their tensor's dtype.
Offsets are int64. Launchers call the kernels through ``torch.library.wrap_triton`` so that
``torch.library.triton_op`` bodies built on them are visible to torch.compile.

Save vs recompute (backward): the saved tensors are the op *inputs* and the z output, and the gate
activations the backward needs (r, tanh) are recomputed from the pre-activations. Saving r / tanh instead
moves the same number of bytes (one more write in the forward, one fewer read in the backward) but costs
an extra write in inference, where no backward follows; the recompute is free in a memory-bound kernel.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

#: True when the kernels run through the Triton interpreter (TRITON_INTERPRET=1 at import): CPU tensors only.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# the interpreter pays per program (Python), the GPU per byte: bigger tiles there
_MAX_TILE = 8192 if INTERPRETED else 2048
_MIN_TILE = 256
#: the longest run along N of a tile over NC* tensors (the rest of the tile spans channels)
_MAX_BLOCK_N = _MAX_TILE if INTERPRETED else 512


def _traceable(kernel):
    """``wrap_triton(kernel)``, through which torch.compile sees the launch. Under the interpreter the kernel
    is an InterpretedFunction, which wrap_triton rejects before torch 2.14 and which cannot run inside a
    compiled graph anyway (CPU tensors under compile take the reference path): it is launched as it is."""
    if INTERPRETED:
        return kernel
    return torch.library.wrap_triton(kernel)


def _on(device: torch.device):
    """The tensors' GPU made current for a launch: Triton launches on the current device (and its current
    stream), whatever device the pointers are on. Nothing to do when it is current already."""
    if INTERPRETED or device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _empty(shape, dtype, device):
    """Allocation of every kernel output (tests replace it to NaN-poison outputs)."""
    return torch.empty(shape, dtype=dtype, device=device)


def channels_last(t: torch.Tensor) -> bool:
    """Whether t [B, C, *S] (C > 1, S of 1-3 dims, not all 1) is dense with its channels innermost: the layout
    of [B, *S, C] moved to [B, C, *S] (channels-last, and 1D or 3D tensors laid out alike). Size-1 dims are
    ignored."""
    if t.dim() < 3 or t.shape[1] == 1 or all(s == 1 for s in t.shape[2:]):
        return False
    expected = t.shape[1]
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return t.stride(1) == 1 and (t.shape[0] == 1 or t.stride(0) == expected)


def out_shape_order(inner: bool, shape) -> tuple:
    """(the shape to allocate, whether to move its last dim to dim 1) of an output [B, C', *S]: channels-last where
    the W-convolution's output is (``inner = channels_last(wx)``, or wzh's), else contiguous. The fakes of
    ``rim_fast.ops._triton`` follow the same rule."""
    if inner:
        return (shape[0], *shape[2:], shape[1]), True
    return tuple(shape), False


def _out(inner: bool, shape, dtype, device):
    """An output [B, C', *S], channels-last where ``inner`` (``out_shape_order``)."""
    alloc, move = out_shape_order(inner, shape)
    out = _empty(alloc, dtype, device)
    return out.movedim(-1, 1) if move else out


# ---- device helpers ---------------------------------------------------------------------------------------

@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # no libdevice in the interpreter. |x| < 1/8: the odd Taylor series (truncation error < 2e-9 relative there);
    # else sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) <= 0.78: a few ulp (2 sigmoid(2x) - 1 cancels to ~25 ulp
    # near 1/8); 1 exactly from |x| ~ 9 on
    x2 = x * x
    series = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(tl.abs(x) < 0.125, series, tl.where(x < 0.0, -t, t))


@triton.jit
def _tanh_and_slope(x):
    # (tanh(x), 1 - tanh(x)^2) with the slope free of 1 - t*t's cancellation near |t| = 1: from e = exp(-2|x|),
    # 1 - t^2 = 4e / (1 + e)^2 (relative error a few ulp wherever it is representable); |x| < 1/8: the series
    # (1 - t^2 > 0.98 there, no cancellation)
    x2 = x * x
    series = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    e = tl.exp(-2.0 * tl.abs(x))
    d = 1.0 + e
    t = (1.0 - e) / d
    small = tl.abs(x) < 0.125
    t = tl.where(small, series, tl.where(x < 0.0, -t, t))
    slope = tl.where(small, 1.0 - series * series, 4.0 * e / (d * d))
    return t, slope


@triton.jit
def _tile(H, N, n_blocks, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid = (B * n_blocks, cdiv(H, BLOCK_C)): batch and N blocks share axis 0 (no 65535 limit on B)
    pid = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = pid // n_blocks
    mask = (c < H)[:, None] & (n < N)[None, :]
    return pid, b, c, c.to(tl.int64)[:, None], n[None, :], mask


# ---- forward kernels -----------------------------------------------------------------------------------

@triton.jit
def _gru_zr_fwd_kernel(
    wx_ptr, uzr_ptr, h_ptr, bz_ptr, br_ptr, z_ptr, rh_ptr,
    H, N, n_blocks,
    stride_wxb, stride_wxc, stride_wxn,
    stride_ub, stride_uc, stride_un,
    stride_hb, stride_hc, stride_hn,
    stride_ob, stride_oc, stride_on,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid, b, c, c2, n2, mask = _tile(H, N, n_blocks, BLOCK_C, BLOCK_N)
    # wx: [B, 3H, N] (channels [0, 2H) read), uzr: [B, 2H, N], h: [B, H, N]
    wx_off = b * stride_wxb + n2 * stride_wxn
    u_off = b * stride_ub + n2 * stride_un
    wz = tl.load(wx_ptr + wx_off + c2 * stride_wxc, mask=mask, other=0.0).to(tl.float32)
    wr = tl.load(wx_ptr + wx_off + (c2 + H) * stride_wxc, mask=mask, other=0.0).to(tl.float32)
    uz = tl.load(uzr_ptr + u_off + c2 * stride_uc, mask=mask, other=0.0).to(tl.float32)
    ur = tl.load(uzr_ptr + u_off + (c2 + H) * stride_uc, mask=mask, other=0.0).to(tl.float32)
    hv = tl.load(h_ptr + b * stride_hb + c2 * stride_hc + n2 * stride_hn, mask=mask, other=0.0).to(tl.float32)
    bz = tl.load(bz_ptr + c, mask=c < H, other=0.0).to(tl.float32)[:, None]
    br = tl.load(br_ptr + c, mask=c < H, other=0.0).to(tl.float32)[:, None]
    z = _sigmoid(wz + uz + bz)
    r = _sigmoid(wr + ur + br)
    o_off = b * stride_ob + c2 * stride_oc + n2 * stride_on
    tl.store(z_ptr + o_off, z, mask=mask)
    tl.store(rh_ptr + o_off, r * hv, mask=mask)


@triton.jit
def _gru_h_fwd_kernel(
    wx_ptr, uh_ptr, z_ptr, h_ptr, bh_ptr, out_ptr,
    H, N, n_blocks,
    stride_wxb, stride_wxc, stride_wxn,
    stride_ub, stride_uc, stride_un,
    stride_zb, stride_zc, stride_zn,
    stride_hb, stride_hc, stride_hn,
    stride_ob, stride_oc, stride_on,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid, b, c, c2, n2, mask = _tile(H, N, n_blocks, BLOCK_C, BLOCK_N)
    # wx: [B, 3H, N] (channels [2H, 3H) read), uh, z, h: [B, H, N]
    wh = tl.load(wx_ptr + b * stride_wxb + (c2 + 2 * H) * stride_wxc + n2 * stride_wxn, mask=mask,
                 other=0.0).to(tl.float32)
    uh = tl.load(uh_ptr + b * stride_ub + c2 * stride_uc + n2 * stride_un, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * stride_zb + c2 * stride_zc + n2 * stride_zn, mask=mask, other=0.0).to(tl.float32)
    hv = tl.load(h_ptr + b * stride_hb + c2 * stride_hc + n2 * stride_hn, mask=mask, other=0.0).to(tl.float32)
    bh = tl.load(bh_ptr + c, mask=c < H, other=0.0).to(tl.float32)[:, None]
    t = _tanh(wh + uh + bh)
    out = (1.0 - z) * hv + z * t
    tl.store(out_ptr + b * stride_ob + c2 * stride_oc + n2 * stride_on, out, mask=mask)


@triton.jit
def _gru_zero_state_fwd_kernel(
    wzh_ptr, bz_ptr, bh_ptr, out_ptr,
    H, N, n_blocks,
    stride_wb, stride_wc, stride_wn,
    stride_ob, stride_oc, stride_on,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid, b, c, c2, n2, mask = _tile(H, N, n_blocks, BLOCK_C, BLOCK_N)
    # wzh: [B, 2H, N] = [W_z x; W_h x]
    w_off = b * stride_wb + n2 * stride_wn
    wz = tl.load(wzh_ptr + w_off + c2 * stride_wc, mask=mask, other=0.0).to(tl.float32)
    wh = tl.load(wzh_ptr + w_off + (c2 + H) * stride_wc, mask=mask, other=0.0).to(tl.float32)
    bz = tl.load(bz_ptr + c, mask=c < H, other=0.0).to(tl.float32)[:, None]
    bh = tl.load(bh_ptr + c, mask=c < H, other=0.0).to(tl.float32)[:, None]
    out = _sigmoid(wz + bz) * _tanh(wh + bh)
    tl.store(out_ptr + b * stride_ob + c2 * stride_oc + n2 * stride_on, out, mask=mask)


# ---- backward kernels ----------------------------------------------------------------------------------
# Bias gradients: each program writes the sum over its tile's N axis to its own row of a fp32 partial
# buffer [B * n_blocks, n_bias * H] (no atomics: deterministic); the launcher sums the rows.

@triton.jit
def _gru_zr_bwd_kernel(
    gz_ptr, grh_ptr, wx_ptr, uzr_ptr, h_ptr, z_ptr, br_ptr,
    gzr_ptr, gh_ptr, partial_ptr,
    H, N, n_blocks,
    stride_gzb, stride_gzc, stride_gzn,
    stride_grb, stride_grc, stride_grn,
    stride_wxb, stride_wxc, stride_wxn,
    stride_ub, stride_uc, stride_un,
    stride_hb, stride_hc, stride_hn,
    stride_zb, stride_zc, stride_zn,
    stride_ob, stride_oc, stride_on,
    stride_ghb, stride_ghc, stride_ghn,
    stride_pb, stride_pc,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid, b, c, c2, n2, mask = _tile(H, N, n_blocks, BLOCK_C, BLOCK_N)
    gz = tl.load(gz_ptr + b * stride_gzb + c2 * stride_gzc + n2 * stride_gzn, mask=mask, other=0.0).to(tl.float32)
    grh = tl.load(grh_ptr + b * stride_grb + c2 * stride_grc + n2 * stride_grn, mask=mask,
                  other=0.0).to(tl.float32)
    wr = tl.load(wx_ptr + b * stride_wxb + (c2 + H) * stride_wxc + n2 * stride_wxn, mask=mask,
                 other=0.0).to(tl.float32)
    ur = tl.load(uzr_ptr + b * stride_ub + (c2 + H) * stride_uc + n2 * stride_un, mask=mask,
                 other=0.0).to(tl.float32)
    hv = tl.load(h_ptr + b * stride_hb + c2 * stride_hc + n2 * stride_hn, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * stride_zb + c2 * stride_zc + n2 * stride_zn, mask=mask, other=0.0).to(tl.float32)
    br = tl.load(br_ptr + c, mask=c < H, other=0.0).to(tl.float32)[:, None]
    # r recomputed from its pre-activation; z is the saved output
    r = _sigmoid(wr + ur + br)
    ga_z = tl.where(mask, gz * z * (1.0 - z), 0.0)
    ga_r = tl.where(mask, grh * hv * r * (1.0 - r), 0.0)
    # g_zr: [B, 2H, N] = grad of the z and r pre-activations (= grad of uzr, and of wx[:, :2H])
    o_off = b * stride_ob + n2 * stride_on
    tl.store(gzr_ptr + o_off + c2 * stride_oc, ga_z, mask=mask)
    tl.store(gzr_ptr + o_off + (c2 + H) * stride_oc, ga_r, mask=mask)
    tl.store(gh_ptr + b * stride_ghb + c2 * stride_ghc + n2 * stride_ghn, grh * r, mask=mask)
    cmask = c < H
    p_off = pid * stride_pb + c.to(tl.int64) * stride_pc
    tl.store(partial_ptr + p_off, tl.sum(ga_z, axis=1), mask=cmask)
    tl.store(partial_ptr + p_off + H * stride_pc, tl.sum(ga_r, axis=1), mask=cmask)


@triton.jit
def _gru_h_bwd_kernel(
    g_ptr, wx_ptr, uh_ptr, z_ptr, h_ptr, bh_ptr,
    gah_ptr, gz_ptr, gh_ptr, partial_ptr,
    H, N, n_blocks,
    stride_gb, stride_gc, stride_gn,
    stride_wxb, stride_wxc, stride_wxn,
    stride_ub, stride_uc, stride_un,
    stride_zb, stride_zc, stride_zn,
    stride_hb, stride_hc, stride_hn,
    stride_ob, stride_oc, stride_on,
    stride_pb, stride_pc,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid, b, c, c2, n2, mask = _tile(H, N, n_blocks, BLOCK_C, BLOCK_N)
    g = tl.load(g_ptr + b * stride_gb + c2 * stride_gc + n2 * stride_gn, mask=mask, other=0.0).to(tl.float32)
    wh = tl.load(wx_ptr + b * stride_wxb + (c2 + 2 * H) * stride_wxc + n2 * stride_wxn, mask=mask,
                 other=0.0).to(tl.float32)
    uh = tl.load(uh_ptr + b * stride_ub + c2 * stride_uc + n2 * stride_un, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * stride_zb + c2 * stride_zc + n2 * stride_zn, mask=mask, other=0.0).to(tl.float32)
    hv = tl.load(h_ptr + b * stride_hb + c2 * stride_hc + n2 * stride_hn, mask=mask, other=0.0).to(tl.float32)
    bh = tl.load(bh_ptr + c, mask=c < H, other=0.0).to(tl.float32)[:, None]
    # tanh recomputed from its pre-activation
    t, slope = _tanh_and_slope(wh + uh + bh)
    ga = tl.where(mask, g * z * slope, 0.0)
    o_off = b * stride_ob + c2 * stride_oc + n2 * stride_on
    tl.store(gah_ptr + o_off, ga, mask=mask)
    tl.store(gz_ptr + o_off, g * (t - hv), mask=mask)
    tl.store(gh_ptr + o_off, g * (1.0 - z), mask=mask)
    tl.store(partial_ptr + pid * stride_pb + c.to(tl.int64) * stride_pc, tl.sum(ga, axis=1), mask=c < H)


@triton.jit
def _gru_zero_state_bwd_kernel(
    g_ptr, wzh_ptr, bz_ptr, bh_ptr, gw_ptr, partial_ptr,
    H, N, n_blocks,
    stride_gb, stride_gc, stride_gn,
    stride_wb, stride_wc, stride_wn,
    stride_ob, stride_oc, stride_on,
    stride_pb, stride_pc,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid, b, c, c2, n2, mask = _tile(H, N, n_blocks, BLOCK_C, BLOCK_N)
    g = tl.load(g_ptr + b * stride_gb + c2 * stride_gc + n2 * stride_gn, mask=mask, other=0.0).to(tl.float32)
    w_off = b * stride_wb + n2 * stride_wn
    wz = tl.load(wzh_ptr + w_off + c2 * stride_wc, mask=mask, other=0.0).to(tl.float32)
    wh = tl.load(wzh_ptr + w_off + (c2 + H) * stride_wc, mask=mask, other=0.0).to(tl.float32)
    bz = tl.load(bz_ptr + c, mask=c < H, other=0.0).to(tl.float32)[:, None]
    bh = tl.load(bh_ptr + c, mask=c < H, other=0.0).to(tl.float32)[:, None]
    z = _sigmoid(wz + bz)
    t, slope = _tanh_and_slope(wh + bh)
    ga_z = tl.where(mask, g * t * z * (1.0 - z), 0.0)
    ga_h = tl.where(mask, g * z * slope, 0.0)
    # gw: [B, 2H, N] = grad of wzh
    o_off = b * stride_ob + n2 * stride_on
    tl.store(gw_ptr + o_off + c2 * stride_oc, ga_z, mask=mask)
    tl.store(gw_ptr + o_off + (c2 + H) * stride_oc, ga_h, mask=mask)
    p_off = pid * stride_pb + c.to(tl.int64) * stride_pc
    tl.store(partial_ptr + p_off, tl.sum(ga_z, axis=1), mask=c < H)
    tl.store(partial_ptr + p_off + H * stride_pc, tl.sum(ga_h, axis=1), mask=c < H)


# ---- launchers -----------------------------------------------------------------------------------------

def _bcn_strides(t: torch.Tensor):
    """(stride_b, stride_c, stride_n) of t [B, C, *S] seen as [B, C, N]; None when the spatial dims do not
    merge into one stride (size-1 dims are ignored)."""
    stride_n, expected = 1, None
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size == 1:
            continue
        if expected is None:
            stride_n = stride
        elif stride != expected:
            return None
        expected = stride * size
    return t.stride(0), t.stride(1), stride_n


def _bcn(t: torch.Tensor):
    """t and its [B, C, N] strides; made contiguous only when its spatial dims cannot be merged."""
    strides = _bcn_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _bcn_strides(t)
    return t, strides


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch(B, H, N, device: torch.device, channels_inner: bool = False) -> "_Launch":
    """The launch geometry of a problem, cached: the launchers' host time is what small cells pay for."""
    if type(B) is int and type(H) is int and type(N) is int:
        return _launch_cached(B, H, N, device, channels_inner)
    # symbolic sizes (torch.compile with dynamic shapes): not hashable, computed each trace
    return _Launch(B, H, N, device, channels_inner)


@functools.lru_cache(maxsize=1024)
def _launch_cached(B, H, N, device, channels_inner=False):
    return _Launch(B, H, N, device, channels_inner)


class _Launch:
    """Tile sizes and grid for a [Bk, H, Nk] problem (Nk = N, or B with Bk = 1 when N = 1). ``channels_inner``
    (channels-last tensors: the channels are the contiguous axis): the tile spans the channels first (up to 64),
    so that a warp's loads and stores run along memory; otherwise it spans N first (up to 512)."""

    def __init__(self, B: int, H: int, N: int, device: torch.device, channels_inner: bool = False):
        # N = 1 (GRU on linear layers): the batch runs along the tile's N axis
        self.swap = N == 1
        self.Bk, self.N = (1, B) if self.swap else (B, N)
        pow2_h, pow2_n = triton.next_power_of_2(H), triton.next_power_of_2(self.N)
        # memory-bound: the largest tile that still gives >= 2 programs per SM (H100: 132 SMs)
        target = 1 if device.type != "cuda" else 2 * _sm_count(device.index if device.index is not None
                                                                else torch.cuda.current_device())
        tile = _MAX_TILE
        if channels_inner and not self.swap:
            block_c = min(pow2_h, 64)
            block_n = min(pow2_n, max(1, tile // block_c))
            while tile > _MIN_TILE and self.Bk * triton.cdiv(self.N, block_n) * triton.cdiv(H, block_c) < target:
                tile //= 2
                block_n = min(pow2_n, max(1, tile // block_c))
        else:
            block_n = min(pow2_n, _MAX_BLOCK_N)
            while tile > _MIN_TILE and (self.Bk * triton.cdiv(self.N, block_n)
                                        * triton.cdiv(H, max(1, min(pow2_h, tile // block_n)))) < target:
                tile //= 2
            block_n = min(block_n, tile)
            block_c = max(1, min(pow2_h, tile // block_n))
        self.block_n, self.block_c = block_n, block_c
        self.n_blocks = triton.cdiv(self.N, block_n)
        self.grid = (self.Bk * self.n_blocks, triton.cdiv(H, self.block_c))
        self.rows = self.Bk * self.n_blocks
        # 16 elements a thread; 8 where the arguments are int64 (the batch stride of a contiguous wx, 3 H N, from
        # 2^31 on): at 4 warps Triton 3.6 spilled the zero-state backward on sm_80 there (tests/test_triton_cubins.py)
        self.num_warps = max(1, min(8, self.block_c * self.block_n // (512 if 3 * H * N < 2 ** 31 else 256)))

    def strides(self, strides):
        """[B, C, N] strides as the kernel sees them (the batch stride becomes the N stride when swapped)."""
        sb, sc, sn = strides
        return (0, sc, sb) if self.swap else (sb, sc, sn)

    def meta(self):
        return {"BLOCK_C": self.block_c, "BLOCK_N": self.block_n, "num_warps": self.num_warps}


def _dtype(*tensors) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _numel_n(t: torch.Tensor) -> int:
    n = 1
    for size in t.shape[2:]:
        n *= size
    return n


def gru_gates_zr_fwd(wx, uzr, h, bias_z, bias_r):
    """z = sigmoid(wx[:, :H] + uzr[:, :H] + b_z), rh = sigmoid(wx[:, H:2H] + uzr[:, H:] + b_r) * h.

    wx: [B, 3H, *S], uzr: [B, 2H, *S], h: [B, H, *S], bias_z, bias_r: [H]; fp32/fp16/bf16 (fp32 math).
    Returns (z, rh), [B, H, *S] in wx's layout (``out_shape_order``), dtypes promoted as the reference's.
    Bytes moved: 7 e B H N (reads wx[:, :2H], uzr, h; writes z, rh; e = element size, N = prod(S))."""
    B, H = h.shape[0], h.shape[1]
    inner = channels_last(wx)
    z = _out(inner, h.shape, _dtype(wx, uzr, bias_z), h.device)
    rh = _out(inner, h.shape, _dtype(wx, uzr, bias_r, h), h.device)
    if h.numel() == 0:
        return z, rh
    (wx, s_wx), (uzr, s_u), (h, s_h) = _bcn(wx), _bcn(uzr), _bcn(h)
    L = _launch(B, H, _numel_n(h), h.device, inner and H > 1)
    with _on(wx.device):
        _traceable(_gru_zr_fwd_kernel)[L.grid](
            wx, uzr, h, bias_z.contiguous(), bias_r.contiguous(), z, rh, H, L.N, L.n_blocks,
            *L.strides(s_wx), *L.strides(s_u), *L.strides(s_h), *L.strides(_bcn_strides(z)), **L.meta())
    return z, rh


def gru_gates_h_fwd(wx, uh, z, h, bias_h):
    """h' = (1 - z) h + z tanh(wx[:, 2H:] + uh + b_h).

    wx: [B, 3H, *S], uh, z, h: [B, H, *S], bias_h: [H]. Returns h' [B, H, *S] in wx's layout.
    Bytes moved: 5 e B H N (reads wx[:, 2H:], uh, z, h; writes h')."""
    B, H = h.shape[0], h.shape[1]
    inner = channels_last(wx)
    out = _out(inner, h.shape, _dtype(z, h, wx, uh, bias_h), h.device)
    if h.numel() == 0:
        return out
    (wx, s_wx), (uh, s_u), (z, s_z), (h, s_h) = _bcn(wx), _bcn(uh), _bcn(z), _bcn(h)
    L = _launch(B, H, _numel_n(h), h.device, inner and H > 1)
    with _on(wx.device):
        _traceable(_gru_h_fwd_kernel)[L.grid](
            wx, uh, z, h, bias_h.contiguous(), out, H, L.N, L.n_blocks,
            *L.strides(s_wx), *L.strides(s_u), *L.strides(s_z), *L.strides(s_h), *L.strides(_bcn_strides(out)),
            **L.meta())
    return out


def gru_gates_zero_state_fwd(wzh, bias_z, bias_h):
    """h' = sigmoid(wzh[:, :H] + b_z) tanh(wzh[:, H:] + b_h).

    wzh: [B, 2H, *S], bias_z, bias_h: [H]. Returns h' [B, H, *S] in wzh's layout.
    Bytes moved: 3 e B H N (reads wzh; writes h')."""
    B, H = wzh.shape[0], wzh.shape[1] // 2
    inner = channels_last(wzh)
    out = _out(inner, (B, H, *wzh.shape[2:]), _dtype(wzh, bias_z, bias_h), wzh.device)
    if out.numel() == 0:
        return out
    wzh, s_w = _bcn(wzh)
    L = _launch(B, H, _numel_n(wzh), wzh.device, inner and H > 1)
    with _on(wzh.device):
        _traceable(_gru_zero_state_fwd_kernel)[L.grid](
            wzh, bias_z.contiguous(), bias_h.contiguous(), out, H, L.N, L.n_blocks,
            *L.strides(s_w), *L.strides(_bcn_strides(out)), **L.meta())
    return out


def _bias_grad(partial, n_bias, H, device):
    """Sum of the per-program partial rows: [n_bias * H] fp32."""
    if partial is None:
        return torch.zeros(n_bias * H, dtype=torch.float32, device=device)
    return partial.sum(0)


def gru_gates_zr_bwd(gz, grh, wx, uzr, h, z, bias_r):
    """Backward of ``gru_gates_zr`` from the grads of (z, rh), the inputs and the z output (r is recomputed).

    Returns (g_zr [B, 2H, *S] = grad of the z and r pre-activations, i.e. of uzr and of wx[:, :2H];
    g_h [B, H, *S] (the r h term only); g_bias [2H] fp32 = (grad b_z, grad b_r)).
    Bytes moved: 9 e B H N + 8 (2H) rows (reads gz, grh, wx[:, H:2H], uzr[:, H:], h, z; writes g_zr, g_h;
    rows = B cdiv(N, BLOCK_N) fp32 partial sums)."""
    B, H = h.shape[0], h.shape[1]
    inner = channels_last(wx)
    g_zr = _out(inner, (B, 2 * H, *h.shape[2:]), _dtype(wx, uzr), h.device)
    g_h = _out(inner, h.shape, h.dtype, h.device)
    if h.numel() == 0:
        return g_zr, g_h, _bias_grad(None, 2, H, h.device)
    (gz, s_gz), (grh, s_gr), (wx, s_wx), (uzr, s_u), (h, s_h), (z, s_z) = (
        _bcn(gz), _bcn(grh), _bcn(wx), _bcn(uzr), _bcn(h), _bcn(z))
    L = _launch(B, H, _numel_n(h), h.device, inner and H > 1)
    partial = _empty((L.rows, 2 * H), torch.float32, h.device)
    with _on(gz.device):
        _traceable(_gru_zr_bwd_kernel)[L.grid](
            gz, grh, wx, uzr, h, z, bias_r.contiguous(), g_zr, g_h, partial, H, L.N, L.n_blocks,
            *L.strides(s_gz), *L.strides(s_gr), *L.strides(s_wx), *L.strides(s_u), *L.strides(s_h),
            *L.strides(s_z), *L.strides(_bcn_strides(g_zr)), *L.strides(_bcn_strides(g_h)),
            partial.stride(0), partial.stride(1), **L.meta())
    return g_zr, g_h, _bias_grad(partial, 2, H, h.device)


def gru_gates_h_bwd(g, wx, uh, z, h, bias_h):
    """Backward of ``gru_gates_h`` from the grad of h' and the inputs (tanh is recomputed).

    Returns (g_a [B, H, *S] = grad of the tanh pre-activation, i.e. of uh and of wx[:, 2H:]; g_z; g_h (the
    (1 - z) term only); g_bias_h [H] fp32).
    Bytes moved: 8 e B H N + 4 H rows (reads g, wx[:, 2H:], uh, z, h; writes g_a, g_z, g_h)."""
    B, H = h.shape[0], h.shape[1]
    inner = channels_last(wx)
    g_a = _out(inner, h.shape, _dtype(wx, uh), h.device)
    g_z = _out(inner, h.shape, z.dtype, h.device)
    g_h = _out(inner, h.shape, h.dtype, h.device)
    if h.numel() == 0:
        return g_a, g_z, g_h, _bias_grad(None, 1, H, h.device)
    (g, s_g), (wx, s_wx), (uh, s_u), (z, s_z), (h, s_h) = _bcn(g), _bcn(wx), _bcn(uh), _bcn(z), _bcn(h)
    L = _launch(B, H, _numel_n(h), h.device, inner and H > 1)
    partial = _empty((L.rows, H), torch.float32, h.device)
    # the three outputs are allocated alike: one set of strides
    assert g_a.stride() == g_z.stride() == g_h.stride()
    with _on(g.device):
        _traceable(_gru_h_bwd_kernel)[L.grid](
            g, wx, uh, z, h, bias_h.contiguous(), g_a, g_z, g_h, partial, H, L.N, L.n_blocks,
            *L.strides(s_g), *L.strides(s_wx), *L.strides(s_u), *L.strides(s_z), *L.strides(s_h),
            *L.strides(_bcn_strides(g_a)), partial.stride(0), partial.stride(1), **L.meta())
    return g_a, g_z, g_h, _bias_grad(partial, 1, H, h.device)


def gru_gates_zero_state_bwd(g, wzh, bias_z, bias_h):
    """Backward of ``gru_gates_zero_state`` from the grad of h' and the inputs.

    Returns (g_wzh [B, 2H, *S], g_bias [2H] fp32 = (grad b_z, grad b_h)).
    Bytes moved: 5 e B H N + 8 (2H) rows (reads g, wzh; writes g_wzh)."""
    B, H = wzh.shape[0], wzh.shape[1] // 2
    inner = channels_last(wzh)
    g_w = _out(inner, wzh.shape, wzh.dtype, wzh.device)
    if g_w.numel() == 0:
        return g_w, _bias_grad(None, 2, H, wzh.device)
    (g, s_g), (wzh, s_w) = _bcn(g), _bcn(wzh)
    L = _launch(B, H, _numel_n(wzh), wzh.device, inner)
    partial = _empty((L.rows, 2 * H), torch.float32, wzh.device)
    with _on(g.device):
        _traceable(_gru_zero_state_bwd_kernel)[L.grid](
            g, wzh, bias_z.contiguous(), bias_h.contiguous(), g_w, partial, H, L.N, L.n_blocks,
            *L.strides(s_g), *L.strides(s_w), *L.strides(_bcn_strides(g_w)), partial.stride(0), partial.stride(1),
            **L.meta())
    return g_w, _bias_grad(partial, 2, H, wzh.device)
