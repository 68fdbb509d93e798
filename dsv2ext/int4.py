"""4-bit weights (``dtype="int4"``): the format, the quantizer and NumPy models of the kernels.

Format (``quant_method = "dsv2ext-int4"``, csrc/int4.h)
--------------------------------------------------------
A row of ``cols`` weights is cut into groups of 32 columns and super-blocks of
8 groups (256 columns); the row is padded to a multiple of 64 columns.  Each
super-block is 20 header bytes (``d``, ``dmin`` as bfloat16, then 8 uint8
sub-scales ``sc`` and 8 uint8 sub-mins ``m``) followed by the 4-bit codes,
32 bytes per pair of groups (byte ``i`` of a pair: column ``i`` in the low
nibble, column ``32 + i`` in the high nibble).  The weight is::

    W[r, c] = (d * sc[g]) * q[r, c] - dmin * m[g]      q in [0, 15], g = group of c

(``d * sc``, its product with ``q`` and ``dmin * m`` are exact in float32; the
difference is rounded once).  A row takes ``20 * ceil(cols / 256) + ceil(cols / 64) * 32``
bytes: 4.625 bits per weight when ``cols`` is a multiple of 256, 4.68 for
V2-Lite's 1408-wide experts.  The quantizer fits every group by a least-squares
search over 22 candidate scales (see :func:`quantize_int4_reference` and
csrc/int4.h), then puts the 8 groups of a super-block on 8-bit grids.

Kernels
-------
Decode (few activation rows): each activation row is quantized once per call
to int8 with one scale per 256 columns (:func:`quantize_act8_reference`); the
products are exact integer sums (AVX-512 VNNI ``vpdpwssd``, AVX2
``vpmaddwd``, portable C) of ``q * x_q`` weighted by the integer sub-scales,
then scaled by ``d * s_x``; the sub-min term uses the activation's per-group
sums (:func:`linear_int4_reference` is the float64 model).  Prefill (many
rows): float32 panels of the dequantized weight and OpenBLAS sgemm, exactly
the products with the dequantized weights.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from ._native import _C
from .dtypes import BF16, TaggedArray

__all__ = ["Int4Weight", "GROUP", "SUPER", "HEADER_BYTES", "int4_row_bytes", "quantize_int4",
           "quantize_int4_reference", "dequantize_int4_reference", "unpack_int4", "quantize_act8",
           "quantize_act8_reference", "linear_int4_reference", "get_int4_activations", "set_int4_activations",
           "ACT_BLOCK"]

GROUP = 32          # columns per sub-scale / sub-min
SUPER = 256         # columns per super-block
HEADER_BYTES = 20   # d, dmin (bf16), sc[8], m[8] (uint8)
UNIT = 64           # columns per 32 bytes of codes
ACT_BLOCK = 256     # activation columns per int8 scale (one super-block)


def int4_row_bytes(cols: int) -> int:
    """Bytes of one packed row of ``cols`` columns."""
    return HEADER_BYTES * (-(-cols // SUPER)) + (-(-cols // UNIT)) * (UNIT // 2)


class Int4Weight(TaggedArray):
    """A packed 4-bit weight: ``data`` uint8 [..., rows, int4_row_bytes(cols)] holding codes and scales.

    Parameters
    ----------
    data : np.ndarray uint8 [..., rows, int4_row_bytes(cols)]
        Packed rows (not copied).
    cols : int
        Columns of the weight (its logical shape is ``data.shape[:-1] + (cols,)``).

    Notes
    -----
    ``nbytes`` counts everything stored (codes and scales), like
    ``total_nbytes``; ``scales_nbytes`` is the headers' share.
    """

    __slots__ = ("cols",)
    __dsv2_dtype__ = "int4"

    def __init__(self, data: np.ndarray, cols: int) -> None:
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
            raise TypeError(f"Int4Weight: data: expected a numpy uint8 array, got "
                            f"{getattr(data, 'dtype', type(data).__name__)}")
        if isinstance(cols, bool) or not isinstance(cols, (int, np.integer)) or cols < 1:
            raise ValueError(f"Int4Weight: cols: expected a positive int, got {cols!r}")
        if data.ndim < 2:
            raise ValueError(f"Int4Weight: data: expected at least 2 dimensions [..., rows, row_bytes], "
                             f"got shape {data.shape}")
        if data.shape[-1] != int4_row_bytes(int(cols)):
            raise ValueError(f"Int4Weight: data: a row of {cols} columns takes {int4_row_bytes(int(cols))} bytes, "
                             f"got rows of {data.shape[-1]}")
        self.data = data
        self.cols = int(cols)

    @property
    def shape(self) -> tuple:
        return self.data.shape[:-1] + (self.cols,)

    @property
    def group(self) -> int:
        """Columns per sub-scale."""
        return GROUP

    @property
    def total_nbytes(self) -> int:
        return self.data.nbytes

    @property
    def scales_nbytes(self) -> int:
        return int(np.prod(self.data.shape[:-1])) * HEADER_BYTES * (-(-self.cols // SUPER))

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.data.nbytes / float(np.prod(self.shape))

    def to_float32(self) -> np.ndarray:
        """The dequantized weight (float32, a new array; the values every kernel uses)."""
        out = np.empty(self.shape, np.float32)
        _C.dequantize(out.reshape(-1, self.cols), Int4Weight(np.ascontiguousarray(self.data).reshape(
            -1, self.data.shape[-1]), self.cols))
        return out

    def __getitem__(self, idx: Any) -> "Int4Weight":
        """Index the leading (stacking) dimensions only, e.g. ``w[e]`` of a stacked ``[E, rows, cols]``."""
        if self.ndim < 3:
            raise IndexError("Int4Weight: only stacked weights [..., rows, cols] can be indexed (by their leading dims)")
        if not isinstance(idx, (int, np.integer, slice)):
            raise IndexError("Int4Weight: index the first dimension with an int or a slice")
        return Int4Weight(self.data[idx], self.cols)

    def __repr__(self) -> str:
        return f"Int4Weight(shape={self.shape}, {self.bits_per_weight:.3f} bits per weight)"


def _float_rows(w: Any, name: str) -> Tuple[Any, tuple]:
    """(a 2-D float32 array or BF16 of the rows, the original shape)."""
    if isinstance(w, BF16):
        return BF16(np.ascontiguousarray(w.data).reshape(-1, w.shape[-1])), tuple(w.shape)
    if isinstance(w, np.ndarray):
        if w.dtype == np.uint16:
            raise TypeError(f"{name}: a bare uint16 array is not taken as bfloat16; wrap it as dsv2ext.BF16(array)")
        if not np.issubdtype(w.dtype, np.floating):
            raise TypeError(f"{name}: expected a floating-point array or a dsv2ext.BF16, got dtype {w.dtype}")
        if w.ndim < 2:
            raise ValueError(f"{name}: expected a weight of at least 2 dimensions [..., rows, cols], got shape {w.shape}")
        return np.ascontiguousarray(w, dtype=np.float32).reshape(-1, w.shape[-1]), tuple(w.shape)
    raise TypeError(f"{name}: expected a float32 numpy array or a dsv2ext.BF16, got {type(w).__name__}")


def quantize_int4(w: Any, *, out: Optional[np.ndarray] = None) -> Int4Weight:
    """Quantize a weight to the int4 format (C kernel, threaded; bit-identical to
    :func:`quantize_int4_reference`).

    Parameters
    ----------
    w : np.ndarray (floating) or BF16, shape [..., rows, cols]
    out : np.ndarray uint8 [..., rows, int4_row_bytes(cols)], optional
        Where to write the packed rows (e.g. a slice of a stacked buffer).

    Returns
    -------
    Int4Weight

    Raises
    ------
    ValueError
        ``w`` holds NaN / Inf.
    """
    if isinstance(w, Int4Weight) or getattr(w, "__dsv2_dtype__", None) in ("int8", "int4"):
        raise TypeError("w: already quantized")
    src, shape = _float_rows(w, "w")
    cols = shape[-1]
    qshape = shape[:-1] + (int4_row_bytes(cols),)
    if out is None:
        out = np.empty(qshape, np.uint8)
    elif not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != qshape:
        raise ValueError(f"out: expected a uint8 array of shape {qshape}")
    _C.quantize_int4(out.reshape(-1, qshape[-1]), src)
    return Int4Weight(out, cols)


# ---------------------------------------------------------------------------- NumPy model

_F = np.float32


def _rint_clamp(v: np.ndarray, hi: float) -> np.ndarray:
    return np.clip(np.rint(v), _F(0), _F(hi)).astype(_F)


def _fit_groups(x: np.ndarray, p: np.ndarray, n: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Step 1 of the format (csrc/int4.h) for groups x [G, 32] float32, p [G, 32] present (bool),
    n [G] present counts (float32) -> (s, mn) [G].  Sums run in column order over present columns."""
    G = x.shape[0]
    lo = np.minimum(np.where(p, x, np.inf).min(1), _F(0)).astype(_F)
    hi = np.where(p, x, -np.inf).max(1)
    hi = np.where(n > 0, hi, x[:, 0]).astype(_F)
    rng = (hi - lo).astype(_F)
    pos = rng > 0
    safe = np.where(pos, rng, _F(1))
    sx = np.zeros(G, _F)
    for i in range(GROUP):
        sx = np.where(p[:, i], sx + x[:, i], sx).astype(_F)
    xl = (x - lo[:, None]).astype(_F)
    bs = np.zeros(G, _F)
    bm = lo.copy()
    be = np.zeros(G, _F)
    for j in range(22):
        c = _F(15) if j == 0 else _F(14) + _F(0.1) * _F(j - 1)
        isc = np.where(pos, c / safe, _F(0)).astype(_F)
        sl = np.zeros(G, _F)
        sll = np.zeros(G, _F)
        sxl = np.zeros(G, _F)
        for i in range(GROUP):
            L = np.minimum(np.rint(isc * xl[:, i]), _F(15)).astype(_F)
            sl = np.where(p[:, i], sl + L, sl).astype(_F)
            sll = np.where(p[:, i], sll + L * L, sll).astype(_F)
            sxl = np.where(p[:, i], sxl + x[:, i] * L, sxl).astype(_F)
        if j == 0:
            s = (rng / _F(15)).astype(_F)
            mn = lo
            ok = pos
        else:
            D = (n * sll - sl * sl).astype(_F)
            ok = pos & (D > 0)
            Dd = np.where(ok, D, _F(1))
            s = ((n * sxl - sx * sl) / Dd).astype(_F)
            mn = ((sll * sx - sl * sxl) / Dd).astype(_F)
            up = mn > 0
            s = np.where(up, sxl / np.where(sll > 0, sll, _F(1)), s).astype(_F)
            mn = np.where(up, _F(0), mn).astype(_F)
        e1 = (s * sll + _F(2) * (mn * sl - sxl)).astype(_F)
        e2 = (n * mn - _F(2) * sx).astype(_F)
        err = (s * e1 + mn * e2).astype(_F)
        take = ok if j == 0 else ok & (err < be)
        bs = np.where(take, s, bs)
        bm = np.where(take, mn, bm)
        be = np.where(take, err, be)
    return np.where(pos, bs, _F(0)).astype(_F), np.where(pos, bm, lo).astype(_F)


def _bf16_up(x: np.ndarray) -> np.ndarray:
    """float32 (>= 0, finite) -> bfloat16 bits rounded toward +inf."""
    u = np.ascontiguousarray(x, _F).view(np.uint32)
    u = np.where(u & 0xFFFF, (u & 0xFFFF0000) + 0x10000, u).astype(np.uint32)
    return (u >> 16).astype(np.uint16)


def quantize_int4_reference(w: Any) -> Int4Weight:
    """NumPy model of :func:`quantize_int4`: the same float32 operations in the same order, the same bytes.

    Parameters
    ----------
    w : np.ndarray (floating) or BF16, shape [rows, cols] (or [..., rows, cols])

    Returns
    -------
    Int4Weight
    """
    src, shape = _float_rows(w, "w")
    x = src.to_float32() if isinstance(src, BF16) else src
    if not np.isfinite(x).all():
        raise ValueError("w: holds NaN or Inf values; they cannot be quantized")
    R, K = x.shape
    Kp = -(-K // UNIT) * UNIT
    nb, nsb = Kp // GROUP, -(-K // SUPER)
    xp = np.zeros((R, Kp), _F)
    xp[:, :K] = x
    pres = np.zeros((R, Kp), _F)
    pres[:, :K] = 1
    g = xp.reshape(R * nb, GROUP)
    pg = pres.reshape(R * nb, GROUP) > 0
    n = pg.sum(1).astype(_F)
    s, mn = _fit_groups(g, pg, n)
    S = np.maximum(s, _F(0)).reshape(R, nb)
    M = np.maximum(-mn, _F(0)).reshape(R, nb)
    out = np.zeros((R, int4_row_bytes(K)), np.uint8)
    sbb = HEADER_BYTES + SUPER // 2
    for sb in range(nsb):
        g0, g1 = sb * 8, min(sb * 8 + 8, nb)
        Ss, Ms = S[:, g0:g1], M[:, g0:g1]
        db = _bf16_up((Ss.max(1) / _F(255)).astype(_F))
        mb = _bf16_up((Ms.max(1) / _F(255)).astype(_F))
        d = (db.astype(np.uint32) << 16).view(_F)
        dmin = (mb.astype(np.uint32) << 16).view(_F)
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.where(d[:, None] > 0, _rint_clamp(Ss / d[:, None], 255), _F(0)).astype(_F)
            mm = np.where(dmin[:, None] > 0, _rint_clamp(Ms / dmin[:, None], 255), _F(0)).astype(_F)
            a = (d[:, None] * sc).astype(_F)
            b = (dmin[:, None] * mm).astype(_F)
            cols = xp[:, g0 * GROUP:g1 * GROUP].reshape(R, g1 - g0, GROUP)
            q = np.where(a[..., None] > 0, _rint_clamp((cols + b[..., None]) / a[..., None], 15), _F(0))
        q = np.where(pres[:, g0 * GROUP:g1 * GROUP].reshape(R, g1 - g0, GROUP) > 0, q, 0).astype(np.uint8)
        base = sb * sbb
        out[:, base:base + 2] = db.view(np.uint8).reshape(R, 2)
        out[:, base + 2:base + 4] = mb.view(np.uint8).reshape(R, 2)
        out[:, base + 4:base + 4 + (g1 - g0)] = sc.astype(np.uint8)
        out[:, base + 12:base + 12 + (g1 - g0)] = mm.astype(np.uint8)
        pairs = q.reshape(R, (g1 - g0) // 2, 2, GROUP)
        codes = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(R, -1)
        out[:, base + HEADER_BYTES:base + HEADER_BYTES + codes.shape[1]] = codes
    return Int4Weight(out.reshape(shape[:-1] + (out.shape[-1],)), K)


def unpack_int4(w: Int4Weight) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fields of a 2-D int4 weight.

    Returns
    -------
    q : uint8 [rows, Kp] codes (Kp = cols padded to a multiple of 64);
    d, dmin : float32 [rows, nsb]; sc, m : uint8 [rows, nsb * 8] (one per group, padded).
    """
    if not isinstance(w, Int4Weight) or w.ndim != 2:
        raise TypeError("w: expected a 2-D Int4Weight")
    R, K = w.shape
    Kp = -(-K // UNIT) * UNIT
    nsb = -(-K // SUPER)
    sbb = HEADER_BYTES + SUPER // 2
    q = np.zeros((R, Kp), np.uint8)
    d = np.zeros((R, nsb), _F)
    dmin = np.zeros((R, nsb), _F)
    sc = np.zeros((R, nsb * 8), np.uint8)
    m = np.zeros((R, nsb * 8), np.uint8)
    data = w.data
    for sb in range(nsb):
        base = sb * sbb
        h = data[:, base:base + HEADER_BYTES]
        d[:, sb] = (np.ascontiguousarray(h[:, 0:2]).view(np.uint16)[:, 0].astype(np.uint32) << 16).view(_F)
        dmin[:, sb] = (np.ascontiguousarray(h[:, 2:4]).view(np.uint16)[:, 0].astype(np.uint32) << 16).view(_F)
        sc[:, sb * 8:sb * 8 + 8] = h[:, 4:12]
        m[:, sb * 8:sb * 8 + 8] = h[:, 12:20]
        c0, c1 = sb * SUPER, min(sb * SUPER + SUPER, Kp)
        codes = data[:, base + HEADER_BYTES:base + HEADER_BYTES + (c1 - c0) // 2].reshape(R, -1, 32)
        q[:, c0:c1] = np.stack([codes & 15, codes >> 4], axis=2).reshape(R, c1 - c0)
    return q, d, dmin, sc, m


def dequantize_int4_reference(w: Int4Weight) -> np.ndarray:
    """NumPy model of the dequantization: ``(d * sc) * q - dmin * m`` in float32, [rows, cols]."""
    q, d, dmin, sc, m = unpack_int4(w)
    R, K = w.shape
    Kp = q.shape[1]
    nb = Kp // GROUP
    dg = np.repeat(d, 8, axis=1)[:, :nb]
    dmg = np.repeat(dmin, 8, axis=1)[:, :nb]
    a = (dg * sc[:, :nb].astype(_F)).astype(_F)
    b = (dmg * m[:, :nb].astype(_F)).astype(_F)
    v = (np.repeat(a, GROUP, axis=1) * q.astype(_F) - np.repeat(b, GROUP, axis=1)).astype(_F)
    return v[:, :K]


def get_int4_activations() -> str:
    """How int4 row-dot kernels (few activation rows, e.g. decode) treat activations:
    ``"int8"`` or ``"fp32"`` (see :func:`set_int4_activations`)."""
    return _C.get_int4_activations()


def set_int4_activations(mode: str) -> str:
    """Choose the activations of the int4 row-dot kernels; returns the previous mode.

    ``"int8"`` (default; the environment variable ``DSV2EXT_INT4_ACT=fp32`` changes
    the default): each activation row is quantized once per call to int8 with one
    float32 scale per 256 columns (:func:`quantize_act8_reference`) and the products
    are exact integer sums (:func:`linear_int4_reference`).  ``"fp32"``: the weights
    dequantized exactly times float32 activations (about 4x the compute; for
    measuring what the activation rounding costs).  Products with more rows than
    ``dsv2ext.quant.row_dot_limits()`` allows use dequantized panels and sgemm in
    both modes.  Process-wide; set it between calls.
    """
    if mode not in ("int8", "fp32"):
        raise ValueError(f"mode: expected 'int8' or 'fp32', got {mode!r}")
    prev = _C.get_int4_activations()
    _C.set_int4_activations(mode)
    return prev


def _act8_order(K: int) -> np.ndarray:
    """Column of the natural order held at each position of the kernels' activation layout."""
    Kp = -(-K // UNIT) * UNIT
    full = Kp // 128 * 128
    pos = np.arange(Kp)
    g = (pos % 128) // 32
    src = pos // 128 * 128 + np.array([0, 2, 1, 3])[g] * 32 + pos % 32  # [g0, g2, g1, g3] <- groups 0, 2, 1, 3
    return np.where(pos < full, src, pos)


def quantize_act8(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernels' int8 activation quantization (C), in natural column order:
    the same (q, s, gsum) as :func:`quantize_act8_reference`, bit for bit.

    Parameters
    ----------
    x : np.ndarray float32 [T, K]
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise TypeError("x: expected a 2-D float32 numpy array")
    T, K = x.shape
    Kp, nsb = -(-K // UNIT) * UNIT, -(-K // SUPER)
    q = np.empty((T, Kp), np.int8)
    s = np.empty((T, nsb), _F)
    g = np.empty((T, 8 * nsb), np.int16)
    _C.quantize_act8(q, s, g, np.ascontiguousarray(x))
    out = np.empty_like(q)
    out[:, _act8_order(K)] = q
    return out, s, g[:, :Kp // GROUP].astype(np.int32)


def quantize_act8_reference(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy model of the kernels' int8 activation quantization for int4 weights.

    Parameters
    ----------
    x : np.ndarray float32 [T, K]

    Returns
    -------
    q : int8 [T, Kp] (Kp = K padded to a multiple of 64, zeros there);
    s : float32 [T, ceil(K / 256)] with ``s = max|x_block| / 127`` over blocks of 256 columns and
    ``q = rint(x / s)`` (float32 division, half to even; 0 where s = 0; a block holding
    NaN / Inf gets s = NaN and q = 0, so that the non-finite value reaches the output);
    gsum : int32 [T, Kp / 32], the sum of q over each group of 32 columns.
    """
    x = np.asarray(x, dtype=_F)
    T, K = x.shape
    Kp = -(-K // UNIT) * UNIT
    nsb = -(-K // SUPER)
    xp = np.zeros((T, nsb * SUPER), _F)
    xp[:, :K] = x
    blk = xp.reshape(T, nsb, SUPER)
    s = (np.abs(blk).max(-1) / _F(127)).astype(_F)
    s = np.where(np.isfinite(blk).all(-1), s, _F(np.nan)).astype(_F)   # a block with NaN / Inf: scale NaN
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s[..., None] > 0, np.clip(np.rint(blk / s[..., None]), -127, 127), 0)
    q = q.reshape(T, -1)[:, :Kp].astype(np.int8)
    return q, s, q.reshape(T, Kp // GROUP, GROUP).astype(np.int32).sum(-1)


def linear_int4_reference(x: np.ndarray, w: Int4Weight, *, act8: bool = True) -> np.ndarray:
    """float64 model of ``dsv2ext.ops.linear(x, w)`` for an int4 weight.

    With ``act8`` (the row-dot path: few rows of ``x``, see
    ``dsv2ext.quant.row_dot_limits``): per super-block ``s_x * (d * sum_g sc_g * sum_{c in g} q_w q_x
    - sum_g (dmin m_g) * sum_{c in g} q_x)`` from :func:`quantize_act8_reference`;
    otherwise ``x @ dequantize(w).T``.

    Parameters
    ----------
    x : np.ndarray float32 [T, K]
    w : Int4Weight [N, K]

    Returns
    -------
    np.ndarray float64 [T, N]
    """
    if not act8:
        return x.astype(np.float64) @ dequantize_int4_reference(w).astype(np.float64).T
    qw, d, dmin, sc, m = unpack_int4(w)
    qx, sx, gsum = quantize_act8_reference(x)
    N, Kp = qw.shape
    T = x.shape[0]
    nb = Kp // GROUP
    isum = np.einsum("ngc,tgc->tng", qw.reshape(N, nb, GROUP).astype(np.int64),
                     qx.reshape(T, nb, GROUP).astype(np.int64))                       # [T, N, nb]
    nsb = d.shape[1]
    main = np.zeros((T, N, nsb), np.int64)
    mins = np.zeros((T, N, nsb), np.int64)
    for g in range(nb):
        main[:, :, g // 8] += isum[:, :, g] * sc[None, :, g].astype(np.int64)
        mins[:, :, g // 8] += gsum[:, None, g].astype(np.int64) * m[None, :, g].astype(np.int64)
    y = (sx.astype(np.float64)[:, None, :] * (d.astype(np.float64)[None] * main
                                               - dmin.astype(np.float64)[None] * mins)).sum(-1)
    return y
