"""Pure-PyTorch references of every rim_fast op.

They are the specification (tests compare kernels against them), the CPU fallback, and the benchmark
baseline. Each reproduces torch_rim 0.2.9 / score_models 0.5.11 operation for operation, so that the
reference path is bit-identical to torch_rim where the computation is the same.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _bias(b: Tensor, ndim: int) -> Tensor:
    # [H] -> [1, H, 1, ...] to broadcast over [B, H, *spatial]
    return b.view(1, -1, *[1] * (ndim - 2))


# ---- convolutions -------------------------------------------------------------------------------------

def conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int = 1, padding="same",
         dilation: int = 1, groups: int = 1) -> Tensor:
    """N-d convolution (N = x.dim() - 2; N = 0 is a linear layer on [B, C]). x: [B, C_in, *S]."""
    n = x.dim() - 2
    if n == 0:
        return F.linear(x, weight, bias)
    return _CONV[n](x, weight, bias, stride, padding, dilation, groups)


def tanh(x: Tensor) -> Tensor:
    """The activation, as torch computes it."""
    return torch.tanh(x)


def bias_tanh(x: Tensor, bias: Tensor) -> Tensor:
    """tanh(x + bias) with the bias per channel: the epilogue of a convolution run without its bias.

    x: [B, C, *S] (S of 0 to 3 dims, any memory layout), bias: [C]. Returns [B, C, *S] in the promoted dtype,
    in x's layout where x is dense (element-wise ops keep it)."""
    return torch.tanh(x + _bias(bias, x.dim()))


def conv_tanh(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding, dilation: int, groups: int) -> Tensor:
    """tanh(conv(x)), stride 1: a convolution followed by the tanh activation, fused where a backend can."""
    return torch.tanh(conv(x, weight, bias, 1, padding, dilation, groups))


def conv_same_pads(spatial: tuple, kernel_size: int, stride: int, dilation: int, axis_swap: bool) -> list:
    """F.pad argument of score_models' Conv*dSame for stride > 1.

    p_i = ((n_i // s - 1) * s + 1 + d (k - 1) - n_i) // 2 for each spatial size n_i (H, W, D order), applied
    as F.pad(x, (p_0, p_0 + 1, p_1, p_1 + 1, ...)). F.pad pairs start at the *last* dim, so score_models pads
    the last axis with p_0 (the "axis swap"); ``axis_swap=False`` pads every axis with its own p."""
    ps = [((n // stride - 1) * stride + 1 + dilation * (kernel_size - 1) - n) // 2 for n in spatial]
    if not axis_swap:
        ps = ps[::-1]
    pads = []
    for p in ps:
        pads += [p, p + 1]
    return pads


def conv_same(x: Tensor, weight: Tensor, bias: Optional[Tensor], kernel_size: int, stride: int,
              dilation: int, groups: int, axis_swap: bool = True) -> Tensor:
    """score_models Conv*dSame with stride > 1: asymmetric zero pad (can crop), then a valid conv."""
    x = F.pad(x, conv_same_pads(tuple(x.shape[2:]), kernel_size, stride, dilation, axis_swap))
    return _CONV[x.dim() - 2](x, weight, bias, stride, 0, dilation, groups)


def conv_transpose(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                   output_padding: int, groups: int, dilation: int) -> Tensor:
    """N-d transposed convolution, x: [B, C_in, *S], weight: [C_in, C_out / groups, k, ...]."""
    return _CONV_T[x.dim() - 2](x, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose_tanh(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                        output_padding: int, groups: int, dilation: int, crop: Optional[tuple] = None) -> Tensor:
    """tanh(conv_transpose(x)) on the first ``crop`` samples of each spatial axis (None: all of them): an upsampling
    layer followed by the tanh activation."""
    y = conv_transpose(x, weight, bias, stride, padding, output_padding, groups, dilation)
    return torch.tanh(crop_spatial(y, crop))


def crop_spatial(y: Tensor, crop: Optional[tuple]) -> Tensor:
    """y[:, :, :crop[0], :crop[1], ...] (a view; None keeps y)."""
    if crop is None:
        return y
    return y[(slice(None), slice(None)) + tuple(slice(0, n) for n in crop)]


def conv_same_symmetric(x: Tensor, weight: Tensor, bias: Optional[Tensor], kernel_size: int, stride: int,
                        dilation: int, groups: int, axis_swap: bool = True, taps=None) -> Tensor:
    """``conv_same`` without its pad: a convolution with the larger pad of each axis on both sides, whose kernel
    has zero taps where that pad was the smaller (on the near side: (p, p + 1) becomes (p + 1, p + 1) and
    [0, w_0, .., w_k-1]). The same sums, plus products with zero; one kernel instead of a pad and a convolution,
    for (16/9 in 2D) more multiply-adds in that convolution. Dilation 1 only. ``taps(weight, pads)``, optional,
    returns the kernel with its zero taps (a cache of it)."""
    if dilation != 1:
        raise ValueError(f"conv_same_symmetric needs dilation 1, got {dilation}")
    n = x.dim() - 2
    pads = conv_same_pads(tuple(x.shape[2:]), kernel_size, stride, dilation, axis_swap)
    padding, weight_pads = symmetric_padding(pads, n)
    w = taps(weight, weight_pads) if taps is not None else F.pad(weight, weight_pads)
    return _CONV[n](x, w, bias, stride, padding, 1, groups)


def symmetric_padding(pads: list, n: int) -> tuple:
    """F.pad pairs of an n-d input -> (symmetric padding per spatial axis, F.pad pairs for the kernel's zero taps)."""
    padding, weight_pads = [], []
    for j in range(n):
        lo, hi = pads[2 * (n - 1 - j)], pads[2 * (n - 1 - j) + 1]
        padding.append(max(lo, hi))
    for j in reversed(range(n)):
        lo, hi = pads[2 * (n - 1 - j)], pads[2 * (n - 1 - j) + 1]
        weight_pads += [padding[j] - lo, padding[j] - hi]
    return tuple(padding), weight_pads


# ---- shifted sums (the thin convolutions' last step on the CPU: ``_cpu._ThinOutConv``) -------------------

def _window(shift: int, size: int) -> tuple:
    # out[q] += src[q + shift] for the q where q + shift lies inside: (destination slice, source slice)
    return slice(max(0, -shift), size - max(0, shift)), slice(max(0, shift), size + min(0, shift))


def shift_sum(planes: Tensor, kernel: tuple, sign: int) -> Tensor:
    """planes [C, K, N, *S] -> [C, N, *S]: out[c, n, q] = sum_k planes[c, k, n, q + sign * off_k], zero outside
    (K = prod(kernel) taps in row-major order, off_k a tap's index per axis minus (size - 1) / 2; odd sizes). A
    "same" convolution's last step once a matrix product has contracted the channels (sign -1: its adjoint). The
    taps are summed one kernel axis at a time (3 x 2 adds for a 3x3x3 kernel, not 26)."""
    spatial = planes.shape[3:]
    out = planes.reshape(planes.shape[0], *kernel, *planes.shape[2:])  # [C, *kernel, N, *S]
    for axis in reversed(range(len(kernel))):  # sum over the last kernel axis, shifting along its spatial axis
        k, n = kernel[axis], spatial[axis]
        moved = out.movedim(axis + 1, 0)  # [k, C, *kernel[:axis], N, *S]
        total = moved[(k - 1) // 2].clone()
        at = total.dim() - len(spatial) + axis  # the spatial axis in ``total``
        for j in range(k):
            if j != (k - 1) // 2:
                dst, src = _window(sign * (j - (k - 1) // 2), n)
                total[(slice(None),) * at + (dst,)] += moved[(j,) + (slice(None),) * at + (src,)]
        out = total
    return out


def shift_stack(x: Tensor, kernel: tuple, sign: int) -> Tensor:
    """x [C, N, *S] -> [C, K, N, *S]: out[c, k, n, q] = x[c, n, q - sign * off_k], zero outside: the adjoint of
    ``shift_sum(., kernel, sign)``, as a tensor that matrix products then contract. Built one kernel axis at a time
    (9 shifted copies for a 3x3x3 kernel, not 27)."""
    spatial = x.shape[2:]
    out = x.unsqueeze(1)  # [C, taps so far, N, *S]
    for axis in range(len(kernel)):
        k, n = kernel[axis], spatial[axis]
        grown = out.new_zeros((out.shape[0], out.shape[1], k, *out.shape[2:]))  # [C, taps, k, N, *S]
        before = (slice(None),) * (axis + 1)  # N and the spatial axes before this one
        for j in range(k):
            dst, src = _window(-sign * (j - (k - 1) // 2), n)
            grown[(slice(None), slice(None), j) + before + (dst,)] = out[(slice(None), slice(None)) + before + (src,)]
        out = grown.flatten(1, 2)
    return out


# Winograd's F(2, 3) (csrc/winograd.h): y = A^T [(G w) * (B^T d)] per axis, over 4-sample input tiles at stride 2
_WINOGRAD_B_T = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_WINOGRAD_A_T = ((1, 1, 1, 0), (0, 1, -1, -1))


def winograd_weight(weight: Tensor) -> Tensor:
    """A 3x3x3 convolution weight [C_out, C_in, 3, 3, 3] transformed for ``winograd_conv3d``: U = G w G^T along
    each axis, as [64, C_in, C_out] (row 16 i + 4 j + k for the transformed position i, j, k along D, H, W)."""
    g = weight.new_tensor(_WINOGRAD_G)
    u = torch.einsum("ai,bj,ck,oxijk->abcxo", g, g, g, weight)
    return u.reshape(64, weight.shape[1], weight.shape[0]).contiguous()


def _winograd_tiles(x: Tensor) -> Tensor:
    # the transformed input tiles of ``winograd_conv3d``: [64, N * tD * tH * tW, C_in]
    size = x.shape[2:]
    tiles = [(s + 1) // 2 for s in size]
    xp = F.pad(x, [p for s, t in zip(reversed(size), reversed(tiles)) for p in (1, 2 * t + 1 - s)])
    d = xp.unfold(2, 4, 2).unfold(3, 4, 2).unfold(4, 4, 2)  # [N, C_in, tD, tH, tW, 4, 4, 4]
    b_t = x.new_tensor(_WINOGRAD_B_T)
    return torch.einsum("ai,bj,ck,nxdhwijk->abcndhwx", b_t, b_t, b_t, d).reshape(64, -1, x.shape[1])


def winograd_conv3d(x: Tensor, u: Tensor, bias: Optional[Tensor]) -> Tensor:
    """conv3d(x, w, bias, padding=1) for a 3x3x3 weight w through Winograd's F(2x2x2, 3x3x3), with
    u = ``winograd_weight(w)``: x [N, C_in, D, H, W] -> [N, C_out, D, H, W]. Every 2x2x2 output tile reads a 4x4x4
    input tile of the zero-padded input (the volume padded up to whole tiles, the extra outputs cut)."""
    n, _, *size = x.shape
    tiles = [(s + 1) // 2 for s in size]
    a_t = x.new_tensor(_WINOGRAD_A_T)
    m = torch.bmm(_winograd_tiles(x), u).reshape(4, 4, 4, n, *tiles, u.shape[2])
    y = torch.einsum("ia,jb,kc,abcndhwo->nodihjwk", a_t, a_t, a_t, m)
    y = y.reshape(n, u.shape[2], *(2 * t for t in tiles))[:, :, :size[0], :size[1], :size[2]]
    return y if bias is None else y + _bias(bias, 5)


def winograd_conv3d_weight(x: Tensor, grad: Tensor) -> Tensor:
    """The gradient of ``winograd_conv3d``'s transformed weight u [64, C_in, C_out] for the output gradient
    ``grad`` [N, C_out, D, H, W]: per transformed position, the transformed input tiles' outer products with the
    output gradient's tiles transformed by A (the adjoint of the output transform A^T)."""
    n, c_out, *size = grad.shape
    tiles = [(s + 1) // 2 for s in size]
    gp = F.pad(grad, [p for s, t in zip(reversed(size), reversed(tiles)) for p in (0, 2 * t - s)])
    gp = gp.reshape(n, c_out, tiles[0], 2, tiles[1], 2, tiles[2], 2)
    a_t = grad.new_tensor(_WINOGRAD_A_T)
    dm = torch.einsum("ia,jb,kc,nodihjwk->abcndhwo", a_t, a_t, a_t, gp).reshape(64, -1, c_out)
    return torch.bmm(_winograd_tiles(x).transpose(1, 2), dm)


def winograd_weight_grad(du: Tensor) -> Tensor:
    """``winograd_weight``'s adjoint: the gradient of a 3x3x3 weight [C_out, C_in, 3, 3, 3] from that of its
    transform ``du`` [64, C_in, C_out] (G^T du G per axis)."""
    g = du.new_tensor(_WINOGRAD_G)
    return torch.einsum("ai,bj,ck,abcxo->oxijk", g, g, g, du.reshape(4, 4, 4, *du.shape[1:]))


def upfirdn(x: Tensor, kernel: Tensor, up: int, down: int, pad0: int, pad1: int) -> Tensor:
    """score_models' native upfirdn, per channel, same pads on every axis, x: [B, C, *S], kernel: [k]*N.

    (1) zero insertion (each sample followed by up-1 zeros), (2) zero pad pad0/pad1 (negative crops),
    (3) true convolution (kernel flipped; in 3D only axes 0 and 1, as score_models does), valid,
    (4) every down-th sample from index 0."""
    n = x.dim() - 2
    B, C = x.shape[:2]
    spatial = x.shape[2:]
    out = x.reshape(B * C, 1, *spatial)
    if up > 1:
        # zero insertion: every sample followed by up - 1 zeros along each axis
        stuffed = out.new_zeros(B * C, 1, *[s * up for s in spatial])
        stuffed[(slice(None), slice(None)) + (slice(None, None, up),) * n] = out
        out = stuffed
    out = F.pad(out, [max(pad0, 0), max(pad1, 0)] * n)
    slices = [slice(None), slice(None)]
    for size in out.shape[2:]:
        slices.append(slice(max(-pad0, 0), size - max(-pad1, 0)))
    out = out[tuple(slices)]
    w = torch.flip(kernel, [0] if n == 1 else [0, 1]).to(out.dtype).view(1, 1, *kernel.shape)
    out = _CONV[n](out, w)
    out = out[(slice(None), slice(None)) + (slice(None, None, down),) * n]
    return out.reshape(B, C, *out.shape[2:])


# ---- ConvGRU gates ------------------------------------------------------------------------------------

def gru_gates_zr(wx: Tensor, uzr: Tensor, h: Tensor, bias_z: Tensor, bias_r: Tensor):
    """First gate stage of a ConvGRU cell.

    wx: [B, 3H, *S] = [W_z*x; W_r*x; W_h*x], uzr: [B, 2H, *S] = [U_z*h; U_r*h], h: [B, H, *S],
    bias_z, bias_r: [H]. Returns z = sigmoid(W_z x + U_z h + b_z) and rh = sigmoid(W_r x + U_r h + b_r) * h,
    both [B, H, *S]."""
    H = h.shape[1]
    z = torch.sigmoid(wx[:, :H] + uzr[:, :H] + _bias(bias_z, h.dim()))
    r = torch.sigmoid(wx[:, H:2 * H] + uzr[:, H:] + _bias(bias_r, h.dim()))
    return z, r * h


def gru_gates_h(wx: Tensor, uh: Tensor, z: Tensor, h: Tensor, bias_h: Tensor) -> Tensor:
    """Second gate stage: h' = (1 - z) h + z tanh(W_h x + U_h (r h) + b_h).

    wx: [B, 3H, *S] (only the last H channels are read), uh: [B, H, *S] = U_h*(r h), z, h: [B, H, *S]."""
    H = h.shape[1]
    h_tilde = torch.tanh(wx[:, 2 * H:] + uh + _bias(bias_h, h.dim()))
    return (1 - z) * h + z * h_tilde


def gru_gates_zero_state(wzh: Tensor, bias_z: Tensor, bias_h: Tensor) -> Tensor:
    """A ConvGRU cell whose incoming state is exactly zero: h' = z tanh(W_h x + b_h), z = sigmoid(W_z x + b_z).

    wzh: [B, 2H, *S] = [W_z*x; W_h*x]. Equal, bit for bit, to the full cell with h = 0 (U*0 = 0 exactly)."""
    H = wzh.shape[1] // 2
    z = torch.sigmoid(wzh[:, :H] + _bias(bias_z, wzh.dim()))
    return z * torch.tanh(wzh[:, H:] + _bias(bias_h, wzh.dim()))


# ---- RIM update step ---------------------------------------------------------------------------------

PREPROCESSING = ("identity", "arcsinh", "adam", "rmsprop", "rmsprop_fixed")


def preprocess_score(score: Tensor, m: Optional[Tensor], v: Optional[Tensor], t: int, method: str,
                     beta_1: float, beta_2: float, epsilon: float):
    """Score preprocessing at step t (0-based) as torch_rim does it; returns (out, m', v').

    adam: m' = b1 m + (1 - b1) s, v' = b2 v + (1 - b2) s^2, out = (m'/(1-b1^(t+1))) / (sqrt(v'/(1-b2^(t+1))) + eps).
    rmsprop (torch_rim compat): m' as adam, v' = v (never updated), out = s / (sqrt(v'/(1-b2^(t+1))) + eps),
    i.e. s / eps from a zero start. rmsprop_fixed: v' = b2 v + (1 - b2) s^2, out as rmsprop.
    arcsinh / identity: stateless (m, v returned unchanged)."""
    if method == "identity":
        return score, m, v
    if method == "arcsinh":
        return torch.arcsinh(score), m, v
    if method == "adam":
        m = beta_1 * m + (1 - beta_1) * score
        v = beta_2 * v + (1 - beta_2) * score ** 2
        m_hat = m / (1 - beta_1 ** (t + 1))
        v_hat = v / (1 - beta_2 ** (t + 1))
        return m_hat / (torch.sqrt(v_hat) + epsilon), m, v
    if method in ("rmsprop", "rmsprop_fixed"):
        m = beta_1 * m + (1 - beta_1) * score
        if method == "rmsprop_fixed":
            v = beta_2 * v + (1 - beta_2) * score ** 2
        v_hat = v / (1 - beta_2 ** (t + 1))
        return score / (torch.sqrt(v_hat) + epsilon), m, v
    raise ValueError(f"unknown preprocessing method {method!r}; expected one of {PREPROCESSING}")


def update_state(x: Tensor, g: Tensor, x_true: Optional[Tensor] = None, w: Optional[Tensor] = None):
    """x' = x + g; with x_true, also this step's loss term sum(w (x' - x_true)^2) (w = 1 when None).

    Returns (x', loss term or None). All tensors [B, C, *S]; the loss term is a 0-dim tensor."""
    x = x + g
    if x_true is None:
        return x, None
    err = (x - x_true) ** 2
    return x, (err if w is None else w * err).sum()
