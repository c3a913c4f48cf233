"""Weight-only quantization of the layer matrices: int8 and int4, per output channel or in groups along the input.

A scheme is named by a string that config.json records (`LlamaConfig.quant`):

    int8            symmetric, one scale per output channel (row):      w = q * s,        q in [-127, 127]
    int8-g32        symmetric, one scale per 32 inputs of a row:        w = q * s         (GGUF's Q8_0)
    int4-g64-sym    symmetric, one scale per 64 inputs:                 w = (u - 8) * s,  u in [0, 15]  (Q4_0 at g32)
    int4-g32-asym   one scale and one offset per 32 inputs:             w = u * s + m,    u in [0, 15]  (Q4_1)
    ("int4" alone is int4-g32-asym)

A quantized matrix W [N, Kd] (the model's output-major layout, weights.py) is stored as
    q      int8 [N, Kd] (8 bits), or uint8 [N, Kd / 2] (4 bits: two to a byte, GGUF's order: in each run of 32
           inputs, byte j holds input j in its low nibble and input j + 16 in its high one)
    scale  float16 [N, Kd / g]  (g = Kd for one per row)
    zero   float16 [N, Kd / g]  (asymmetric schemes only: the offset m)
and a stacked one with a leading layer axis. float16 holds GGUF's block scales exactly, so its Q8_0 / Q4_0 / Q4_1
blocks are repacked without loss: `dequantize_np` of the repacked arrays is, bit for bit, what gguf's own
dequantization gives (both compute u * s + m, or (u - 8) * s, in float32).

Only the four layer matrices are quantized: the embedding is a row lookup (one row a token, no bandwidth to
save) and the norms are vectors; the untied LM head stays 16-bit too (its logits pick every token; 2% of a 7B's
bytes).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

# GGUF's block sizes (ggml.h): 32 weights a block for Q8_0, Q4_0 and Q4_1.
GGUF_BLOCK = 32
_NAME = re.compile(r"int(8|4)(?:-g(\d+))?(-asym|-sym)?")
SCHEMES_HELP = ("int8 | int4, optionally -gN (N inputs a scale; default one per row for int8, 32 for int4) and, "
                "for int4, -sym (no offset; default -asym)")


@dataclasses.dataclass(frozen=True)
class Scheme:
    bits: int  # 8 or 4
    group: int | None  # inputs per scale; None: one scale per row
    asym: bool = False  # with a per-group offset

    @property
    def name(self) -> str:
        kind = "" if self.bits == 8 else ("-asym" if self.asym else "-sym")
        return f"int{self.bits}" + (f"-g{self.group}" if self.group else "") + kind

    def groups(self, kd: int) -> int:
        return 1 if self.group is None else kd // self.group

    def check(self, kd: int, what: str = "a matrix") -> None:
        """Raise ValueError unless the scheme tiles an input dimension of kd."""
        g = self.group or kd
        if kd % g:
            raise ValueError(f"quantization {self.name}: {what}'s input dimension {kd} is not a multiple of the "
                             f"group size {g}")
        if self.bits == 4 and (kd % GGUF_BLOCK or g % GGUF_BLOCK):
            raise ValueError(f"quantization {self.name}: 4-bit weights are packed in runs of {GGUF_BLOCK} inputs; "
                             f"{what} has {kd} inputs and groups of {g}")

    def stored(self, n: int, kd: int, lead: tuple = ()) -> dict[str, tuple[tuple, str]]:
        """name -> (shape, dtype) of the stored arrays of an [N, Kd] matrix (with leading dims `lead`)."""
        q = (lead + (n, kd), "int8") if self.bits == 8 else (lead + (n, kd // 2), "uint8")
        out = {"q": q, "scale": (lead + (n, self.groups(kd)), "float16")}
        if self.asym:
            out["zero"] = (lead + (n, self.groups(kd)), "float16")
        return out


def parse(name: str | None) -> Scheme | None:
    """A scheme from its name (None stays None); ValueError naming the problem."""
    if name is None:
        return None
    m = _NAME.fullmatch(str(name).strip().lower())
    if not m:
        raise ValueError(f"unknown quantization {name!r}: {SCHEMES_HELP}, and -asym for an offset a group")
    bits, group, kind = int(m.group(1)), m.group(2), m.group(3)
    group = int(group) if group else (GGUF_BLOCK if bits == 4 else None)
    if group is not None and group < 1:
        raise ValueError(f"quantization {name!r}: the group size must be positive")
    if kind == "-asym" and bits == 8:
        raise ValueError(f"quantization {name!r}: int8 is symmetric only")
    # 4-bit: with an offset unless -sym (SmolLM2's perplexity: +0.0% with it, +27% without; docs/performance.md)
    return Scheme(bits, group, bits == 4 and kind != "-sym")


# ---- numpy: quantize, pack, dequantize (the converter and the tests) ---------------------------------

def pack4(u: np.ndarray) -> np.ndarray:
    """uint8 [..., Kd] of values 0..15 -> [..., Kd / 2] bytes in GGUF's order (see the module docstring)."""
    r = u.reshape(u.shape[:-1] + (-1, 2, GGUF_BLOCK // 2)).astype(np.uint8)
    return (r[..., 0, :] | (r[..., 1, :] << 4)).reshape(u.shape[:-1] + (-1,))


def unpack4_np(b: np.ndarray) -> np.ndarray:
    """The inverse of `pack4`: [..., Kd / 2] bytes -> uint8 [..., Kd]."""
    r = b.reshape(b.shape[:-1] + (-1, 1, GGUF_BLOCK // 2))
    return np.concatenate([r & 0x0F, r >> 4], axis=-2).reshape(b.shape[:-1] + (-1,))


def quantize_np(w: np.ndarray, scheme: Scheme) -> dict[str, np.ndarray]:
    """Round-to-nearest quantization of a float matrix [..., N, Kd] -> the stored arrays (module docstring)."""
    kd = w.shape[-1]
    scheme.check(kd)
    g = scheme.group or kd
    x = np.asarray(w, np.float32).reshape(w.shape[:-1] + (kd // g, g))
    if scheme.asym:
        lo, hi = x.min(axis=-1), x.max(axis=-1)
        s = ((hi - lo) / 15).astype(np.float16)
        m = lo.astype(np.float16)
        sf = s.astype(np.float32)
        inv = np.divide(1.0, sf, out=np.zeros_like(sf), where=sf > 0)
        u = np.clip(np.rint((x - m.astype(np.float32)[..., None]) * inv[..., None]), 0, 15).astype(np.uint8)
        return {"q": pack4(u.reshape(w.shape)), "scale": s, "zero": m}
    amax = np.abs(x).max(axis=-1)
    qmax = 127 if scheme.bits == 8 else 7
    s = (amax / qmax).astype(np.float16)
    sf = s.astype(np.float32)
    inv = np.divide(1.0, sf, out=np.zeros_like(sf), where=sf > 0)
    q = np.rint(x * inv[..., None])
    if scheme.bits == 8:
        return {"q": np.clip(q, -127, 127).astype(np.int8).reshape(w.shape), "scale": s}
    u = (np.clip(q, -8, 7) + 8).astype(np.uint8)
    return {"q": pack4(u.reshape(w.shape)), "scale": s}


def dequantize_np(a: dict[str, np.ndarray], scheme: Scheme) -> np.ndarray:
    """float32 [..., N, Kd] of the stored arrays, computed as gguf's dequantization does."""
    q = a["q"]
    v = q.astype(np.float32) if scheme.bits == 8 else unpack4_np(q).astype(np.float32)
    kd = v.shape[-1]
    g = scheme.group or kd
    v = v.reshape(v.shape[:-1] + (kd // g, g))
    if scheme.bits == 4 and not scheme.asym:
        v = v - np.float32(8)
    out = a["scale"].astype(np.float32)[..., None] * v
    if scheme.asym:
        out = out + a["zero"].astype(np.float32)[..., None]
    return out.reshape(v.shape[:-2] + (kd,))


# ---- GGUF blocks -> the stored arrays ----------------------------------------------------------------

# GGUF tensor type name -> (scheme name, bytes a block)
GGUF_TYPES = {"Q8_0": ("int8-g32", 34), "Q4_0": ("int4-g32-sym", 18), "Q4_1": ("int4-g32-asym", 20)}


def from_gguf_blocks(data: np.ndarray, type_name: str, n: int, kd: int) -> dict[str, np.ndarray]:
    """A GGUF tensor's raw blocks (uint8, n rows of kd / 32 blocks) -> the stored arrays of its scheme."""
    name, size = GGUF_TYPES[type_name]
    b = np.ascontiguousarray(data).view(np.uint8).reshape(n, kd // GGUF_BLOCK, size)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0]
    if type_name == "Q8_0":
        return {"q": np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(n, kd), "scale": d}
    if type_name == "Q4_0":
        return {"q": np.ascontiguousarray(b[..., 2:]).reshape(n, kd // 2), "scale": d}
    m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0]
    return {"q": np.ascontiguousarray(b[..., 4:]).reshape(n, kd // 2), "scale": d, "zero": m}


def scheme_of(qm: dict, kd: int) -> Scheme:
    """The scheme of a stacked quantized matrix's arrays (q int8: 8 bits, uint8: 4), for an input dimension kd."""
    groups = qm["scale"].shape[-1]
    return Scheme(8 if qm["q"].dtype == np.int8 else 4, None if groups == 1 else kd // groups, "zero" in qm)


# ---- jax: dequantize inside the traced step ----------------------------------------------------------

def dequantize(qm: dict, layer: int, scheme: Scheme, dtype):
    """Layer `layer` of a stacked quantized matrix as [N, Kd] in `dtype` (XLA fuses this into the product that
    consumes it: the bytes read are the stored ones). Each value is computed in float32 as `dequantize_np`
    does, then rounded to `dtype`, so the product equals one over a checkpoint dequantized at conversion."""
    import jax.numpy as jnp

    f32 = jnp.float32
    q = qm["q"][layer]
    if scheme.bits == 8:
        v = q.astype(f32)
    else:
        r = q.reshape(q.shape[:-1] + (-1, 1, GGUF_BLOCK // 2))
        v = jnp.concatenate([r & 0x0F, r >> 4], axis=-2).reshape(q.shape[:-1] + (-1,)).astype(f32)
    n, kd = v.shape
    g = scheme.group or kd
    v = v.reshape(n, kd // g, g)
    if scheme.bits == 4 and not scheme.asym:
        v = v - 8.0
    w = qm["scale"][layer].astype(f32)[..., None] * v
    if scheme.asym:
        w = w + qm["zero"][layer].astype(f32)[..., None]
    return w.reshape(n, kd).astype(dtype)


def _matvec_operands(qm: dict, layer: int, scheme: Scheme, h):
    """(codes of layer `layer`, h in float32, N, Kd, the group size) for `matvec` and `matvec_grouped`."""
    import jax.numpy as jnp

    q = qm["q"][layer]
    h = h.astype(jnp.float32)
    return q, h, q.shape[0], h.shape[0], scheme.group or h.shape[0]


def matvec(qm: dict, layer: int, scheme: Scheme, h) -> "jax.Array":
    """float32 [N] = W h for one row h [Kd] (the decode step), W layer `layer` of a stacked quantized matrix: one
    reduction over each row's codes, each term dequantized as it is read. The 4-bit codes are read in their
    packed order (the low nibbles against h's first 16 of each run of 32, the high ones against the next 16),
    never unpacked into an array."""
    import jax.numpy as jnp

    f32 = jnp.float32
    q, h, n, kd, g = _matvec_operands(qm, layer, scheme, h)
    if scheme.bits == 8:  # [N, groups, g]: the scale broadcast over its group
        v = q.reshape(n, kd // g, g).astype(f32) * qm["scale"][layer].astype(f32)[..., None]
        return jnp.sum(v * h.reshape(kd // g, g), axis=(1, 2))
    per = g // GGUF_BLOCK  # runs of 32 a group
    b = q.reshape(n, kd // g, per, GGUF_BLOCK // 2)
    hb = h.reshape(kd // g, per, 2, GGUF_BLOCK // 2)
    s = qm["scale"][layer].astype(f32)[..., None, None]
    lo, hi = (b & 0x0F).astype(f32), (b >> 4).astype(f32)
    if scheme.asym:
        m = qm["zero"][layer].astype(f32)[..., None, None]
        t = (lo * s + m) * hb[:, :, 0] + (hi * s + m) * hb[:, :, 1]
    else:
        t = (lo - 8.0) * s * hb[:, :, 0] + (hi - 8.0) * s * hb[:, :, 1]
    return jnp.sum(t, axis=(1, 2, 3))


def matvec_grouped(qm: dict, layer: int, scheme: Scheme, h) -> "jax.Array":
    """`matvec` summed per group on the codes and scaled once a group: sum_g s_g (sum_k u_k h_k), less
    8 s_g sum_k h_k for 4-bit symmetric codes, plus m_g sum_k h_k with an offset (options.QUANT_MATVEC)."""
    import jax.numpy as jnp

    f32 = jnp.float32
    q, h, n, kd, g = _matvec_operands(qm, layer, scheme, h)
    groups = kd // g
    if scheme.bits == 8:
        # sums of 32 terms, then scaled and summed: the shapes XLA's CPU backend runs fastest
        r = GGUF_BLOCK if g % GGUF_BLOCK == 0 else g
        blk = jnp.sum(q.reshape(n, kd // r, r).astype(f32) * h.reshape(kd // r, r), axis=-1)  # [N, Kd / r]
        if groups == 1:  # one scale a row: after the row's sum (scaling the partial sums first ran ~5x slower)
            return blk.sum(axis=-1) * qm["scale"][layer][:, 0].astype(f32)
        return jnp.sum(blk.reshape(n, groups, g // r) * qm["scale"][layer].astype(f32)[..., None], axis=(1, 2))
    else:
        b = q.reshape(n, kd // GGUF_BLOCK, GGUF_BLOCK // 2)
        hb = h.reshape(kd // GGUF_BLOCK, 2, GGUF_BLOCK // 2)
        blk = jnp.sum((b & 0x0F).astype(f32) * hb[:, 0] + (b >> 4).astype(f32) * hb[:, 1], axis=-1)
        part = blk.reshape(n, groups, g // GGUF_BLOCK).sum(axis=-1)
    y = part * qm["scale"][layer].astype(f32)
    if scheme.bits == 4:
        hsum = h.reshape(groups, g).sum(axis=-1)  # [groups]
        if scheme.asym:
            y = y + qm["zero"][layer].astype(f32) * hsum
        else:
            y = y - 8.0 * qm["scale"][layer].astype(f32) * hsum
    return y.sum(axis=-1)
