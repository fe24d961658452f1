"""Bias + tanh after a convolution (Triton): y = tanh(x + b[c]) for x [B, C, *S], forward and backward.

On CUDA, aten runs a cuDNN convolution with a bias as two kernels (the convolution, then an in-place bias add)
and the tanh after it as a third: two full read + write passes of the activation after the convolution's own
write. Run without its bias, the convolution is followed here by one pass: read x, write y (2 e numel bytes,
e = element size, instead of 4 e numel).

Layout: a dense tensor (contiguous, channels-last, or any other permutation without gaps) is read and written
in its own memory order, seen as a row-major [M, K] matrix with the channel of an element either its row mod C
(NC*S layouts: M = B C, K = prod(S)) or its column (channels-last layouts: M = B prod(S), K = C): no integer
division per element, only one per row. Any other input is made contiguous first. The output has x's strides.

All arithmetic is fp32 (inputs are loaded and converted), outputs are stored in their tensor's dtype. Offsets
are int64. Backward: grad_x = grad_y (1 - y^2) from the saved output (one pass: read grad_y and y, write
grad_x); the bias gradient is the sum of grad_x over batch and spatial dims, left to torch (``sum``), which is
also how aten computes a convolution's bias gradient on CUDA (a reduction after cuDNN's backward kernels).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .gru_gates import INTERPRETED, _on, _tanh, _traceable

# the interpreter pays per program (Python), the GPU per byte: bigger tiles there
_MAX_TILE = 8192 if INTERPRETED else 2048
_MIN_TILE = 256

__all__ = ["INTERPRETED", "bias_tanh_fwd", "bias_tanh_bwd", "out_strides", "check_args"]


def _empty(shape, stride, dtype, device):
    """Allocation of every kernel output (tests replace it to NaN-poison outputs)."""
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ---- kernels -------------------------------------------------------------------------------------------

@triton.jit
def _bias_tanh_fwd_kernel(
    x_ptr, b_ptr, y_ptr,
    M, K, C, n_k_blocks,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BIAS_ON_ROWS: tl.constexpr,
):
    # x, y: dense [M, K], row stride K; grid = (cdiv(M, BLOCK_M) * n_k_blocks,)
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid // n_k_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < M
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if BIAS_ON_ROWS:
        # NC*S: row r is channel r mod C of sample r // C
        b = tl.load(b_ptr + rows % C, mask=rmask, other=0.0).to(tl.float32)[:, None]
    else:
        # channels-last: the columns are the channels
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, _tanh(x + b), mask=mask)


@triton.jit
def _bias_tanh_bwd_kernel(g_ptr, y_ptr, gx_ptr, numel, BLOCK: tl.constexpr):
    # g, y, gx: dense, one memory order: element-wise over the flat storage
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gx_ptr + offs, g * (1.0 - y * y), mask=mask)


# ---- launchers -----------------------------------------------------------------------------------------

def _is_dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill a gap-free block of memory, in any dim order (size-1 dims ignored)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _dense_strides(x: torch.Tensor) -> tuple:
    """Gap-free strides in x's own dim order (its largest stride outermost; ties, as size-1 dims give, in dim
    order): a crop of a channels-last tensor (a transposed convolution's output cut to a multiple of its stride)
    stays channels-last, a slice of an NC* tensor contiguous."""
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
    strides, step = [0] * x.dim(), 1
    for d in reversed(order):
        strides[d] = step
        step *= max(x.shape[d], 1)
    return tuple(strides)


def out_strides(x: torch.Tensor) -> tuple:
    """The strides of ``bias_tanh_fwd``'s output: x's where x is dense, else dense in x's dim order (also the
    fake's)."""
    return tuple(x.stride()) if _is_dense(x) else _dense_strides(x)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself where dense, else a copy with ``out_strides``."""
    if _is_dense(x):
        return x
    return torch.empty_strided(x.shape, _dense_strides(x), dtype=x.dtype, device=x.device).copy_(x)


def check_args(x: torch.Tensor, bias: torch.Tensor) -> None:
    if x.dim() < 2 or bias.dim() != 1 or bias.shape[0] != x.shape[1]:
        raise ValueError(f"bias_tanh: x must be [B, C, *S] and bias [C]; got x {tuple(x.shape)}, "
                         f"bias {tuple(bias.shape)}")


def _matrix(x: torch.Tensor):
    """(M, K, bias_on_rows) of a dense x [B, C, *S] seen as a row-major [M, K] matrix in memory order."""
    numel, C = x.numel(), x.shape[1]
    if C == 1:
        return 1, numel, True
    inner = x.stride(1)
    if inner == 1:
        return numel // C, C, False
    return numel // inner, inner, True


@functools.lru_cache(maxsize=1024)
def _geometry(M: int, K: int, device: torch.device):
    """(BLOCK_M, BLOCK_K, n_k_blocks, grid, num_warps) of an [M, K] problem: memory-bound, so the largest tile
    (up to 2048 elements on the GPU) that still gives >= 2 programs per SM."""
    block_k = min(triton.next_power_of_2(K), _MAX_TILE)
    pow2_m = triton.next_power_of_2(M)
    target = 1 if device.type != "cuda" else 2 * _sm_count(device.index if device.index is not None
                                                            else torch.cuda.current_device())
    tile = _MAX_TILE
    while tile > _MIN_TILE and (triton.cdiv(M, max(1, min(pow2_m, tile // block_k)))
                                * triton.cdiv(K, min(block_k, tile))) < target:
        tile //= 2
    block_k = min(block_k, tile)
    block_m = max(1, min(pow2_m, tile // block_k))
    n_k_blocks = triton.cdiv(K, block_k)
    grid = (triton.cdiv(M, block_m) * n_k_blocks,)
    return block_m, block_k, n_k_blocks, grid, max(1, min(8, block_m * block_k // 512))


def _launch(M, K, device):
    if type(M) is int and type(K) is int:
        return _geometry(M, K, device)
    # symbolic sizes (torch.compile with dynamic shapes): not hashable
    return _geometry.__wrapped__(M, K, device)


def bias_tanh_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y = tanh(x + bias[c]). x: [B, C, *S] fp32/fp16/bf16 in any layout, bias: [C]; fp32 math.

    Returns y in the promoted dtype, with x's strides where x is dense (else dense in x's dim order).
    Bytes moved: 2 e numel (read x, write y) + C bias reads per row."""
    check_args(x, bias)
    y = _empty(x.shape, out_strides(x), torch.promote_types(x.dtype, bias.dtype), x.device)
    if y.numel() == 0:
        return y
    x = _dense(x)
    M, K, on_rows = _matrix(x)
    block_m, block_k, n_k_blocks, grid, num_warps = _launch(M, K, x.device)
    with _on(x.device):
        _traceable(_bias_tanh_fwd_kernel)[grid](
            x, bias.contiguous(), y, M, K, x.shape[1], n_k_blocks,
            BLOCK_M=block_m, BLOCK_K=block_k, BIAS_ON_ROWS=on_rows, num_warps=num_warps)
    return y


def bias_tanh_bwd(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x = grad (1 - y^2) from the forward's output y. Returns grad_x in y's dtype and strides (as
    ``bias_tanh_fwd``'s: y's where y is dense, as the forward's output is).
    A grad in another layout than y's (an expanded or transposed one) is first copied into y's.
    Bytes moved: 3 e numel (read grad, y; write grad_x)."""
    gx = _empty(y.shape, out_strides(y), y.dtype, y.device)
    if y.numel() == 0:
        return gx
    y = _dense(y)
    if tuple(grad.stride()) != tuple(y.stride()):
        grad = torch.empty_strided(y.shape, y.stride(), dtype=grad.dtype, device=grad.device).copy_(grad)
    block_m, block, n_k_blocks, grid, num_warps = _launch(1, y.numel(), y.device)
    with _on(grad.device):
        _traceable(_bias_tanh_bwd_kernel)[grid](grad, y, gx, y.numel(), BLOCK=block, num_warps=num_warps)
    return gx
