"""Every kernel and path choice of the decode and prefill steps, in one frozen object.

`KernelOptions()` (every field "auto") is what the library runs by default; `resolve` turns its "auto"
fields into concrete choices once, from the devices, the mesh and the model config, and the resolved object
is what the traced steps read (one static argument) and what the executables' disk key hashes.

Why each default is what it is: see docs/performance.md, 'Defaults and why'.

The environment is read by `KernelOptions.from_env` only, which the benchmark entry points use for their
ablations (bench/README.md lists the variables); the library's own path never reads it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

# The decode step's Pallas kernels: "xla" (XLA's fusions), "pallas", or "interpret" (Pallas' interpreter, for
# tests off the GPU).
KERNEL_MODES = ("xla", "pallas", "interpret")
# The attention of a prompt's own bucket: "off" (model.attention), or jax.nn.dot_product_attention with this
# implementation ("cudnn": cuDNN's fused flash attention; "xla": the same function through XLA, for tests).
PREFILL_ATTENTION = ("off", "cudnn", "xla")
# How XLA compiles the prefill's matmuls: "split" (cuBLAS's heuristics for large buckets, autotuned below),
# "autotune" (XLA's autotuning everywhere), "cublas" (cuBLAS's heuristics everywhere): runtime.PREFILL_MATMULS.
PREFILL_MATMULS = ("split", "autotune", "cublas")
TOKEN_MEMORY = ("device", "pinned_host")
# How the decode step sums a quantized matrix's product (quant.py): "rowsum" (one reduction over each row, every
# term dequantized as read: faster on an H100) or "grouped" (sums per group on the codes, scaled once a group:
# ~2x faster on XLA's CPU backend). docs/performance.md has the runs.
QUANT_MATVEC = ("rowsum", "grouped")
# The layer projections of the decode step by name (model.PROJECTIONS), and those written as XLA row
# reductions where the Pallas GEMVs run.
PROJECTION_NAMES = ("wqkv", "wo", "w13", "w2")
ROW_REDUCE_AUTO = frozenset({"wqkv", "wo", "w13"})
# The smallest bucket whose prompt attention "auto" runs through the fused kernel (below: model.attention).
FUSED_MIN_ROWS = 128

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Kernel choices of the compiled steps. Each field takes "auto" (resolved by `resolve`) or a value:

    gemv               the decode step's matrix-vector products (and the LM head of every step): KERNEL_MODES.
                       auto: "pallas" on one GPU, "xla" elsewhere (CPU; a mesh: the
                       kernels run there per shard inside shard_map when named, with `decode_attention`).
    decode_attention   the decode step's rope + cache write + attention as one kernel (decode_attention.py):
                       KERNEL_MODES. auto: as `gemv`.
    chunk_attention    the attention of a chunk (T > 1) that does not take `prefill_attention` (a prompt's rest
                       after reused rows, a verify step, a bucket below `prefill_attention_min_rows`) as one kernel
                       over the rows its tokens see (decode_attention.attend_chunk): KERNEL_MODES. auto: "pallas"
                       where `decode_attention` resolves to "pallas" on one device, "xla" elsewhere.
    row_reduce         names (PROJECTION_NAMES) of the one token's projections computed as float32 XLA row
                       reductions instead of the GEMV kernel, where `gemv` is not "xla". auto: ROW_REDUCE_AUTO
                       in mode "pallas" (none for a quantized model: qgemv.py's kernels), none in "interpret".
    matmul_2d          XLA's CPU forms (True): the projections as one 2-D matmul [T, Kd] x [N, Kd]^T instead of
                       the einsum over the weight's dims, and the decode step's XLA attention over the filled cache
                       rows only (model.attend_filled, a loop) instead of scores over every row. auto: True on the
                       CPU only (its matmul library takes the 2-D form; measured there only).
    prefill_wo         the prefill's output projection (chunks up to gemv.ROWS_MAX rows) through `gemv.gemm`:
                       KERNEL_MODES. auto: as `gemv`.
    prefill_attention  the attention of a prompt's own bucket: PREFILL_ATTENTION (None means "off"). auto:
                       "cudnn" on one GPU where cuDNN supports the model (16-bit, head dim a multiple of 8 up
                       to 128), "off" elsewhere.
    prefill_attention_min_rows  the smallest bucket that takes `prefill_attention`. auto: FUSED_MIN_ROWS when
                       `prefill_attention` is auto, 0 (every bucket) when it is named.
    prefill_matmuls    PREFILL_MATMULS. auto: "split".
    quant_matvec       the decode step's products of quantized matrices: QUANT_MATVEC. auto: "rowsum" on a GPU,
                       "grouped" elsewhere.
    quant_prefill      the prefill's products of quantized matrices, in chunks of up to qgemv.gemm_rows_max
                       rows (32 for int8, 64 for 4 bits; longer ones always take XLA's path): KERNEL_MODES ("pallas": qgemv.gemm, each
                       tile of codes dequantized inside the matmul; "xla": a matmul over the matrix XLA
                       dequantizes first). auto: as `gemv` on one device, "xla" with a mesh.
    token_memory       where the steps write the next token: TOKEN_MEMORY (None means "device"). auto:
                       "pinned_host" on one device that has it, "device" elsewhere.
    """
    gemv: str = AUTO
    decode_attention: str = AUTO
    chunk_attention: str = AUTO
    row_reduce: Any = AUTO  # "auto" or a frozenset of names (any iterable of names is converted)
    matmul_2d: Any = AUTO  # "auto" or a bool
    prefill_wo: str = AUTO
    prefill_attention: Any = AUTO
    prefill_attention_min_rows: Any = AUTO  # "auto" or an int >= 0
    prefill_matmuls: str = AUTO
    token_memory: Any = AUTO
    quant_matvec: str = AUTO
    quant_prefill: str = AUTO

    def __post_init__(self):
        def setf(name, v):
            object.__setattr__(self, name, v)

        for name in ("gemv", "decode_attention", "chunk_attention", "prefill_wo", "quant_prefill"):
            v = getattr(self, name)
            if v is None:  # the old API's spelling of XLA's path
                setf(name, v := "xla")
            _check(name, v, KERNEL_MODES)
        if self.prefill_attention is None:
            setf("prefill_attention", "off")
        _check("prefill_attention", self.prefill_attention, PREFILL_ATTENTION)
        _check("prefill_matmuls", self.prefill_matmuls, PREFILL_MATMULS)
        if self.token_memory is None:
            setf("token_memory", "device")
        _check("token_memory", self.token_memory, TOKEN_MEMORY)
        _check("quant_matvec", self.quant_matvec, QUANT_MATVEC)
        rr = self.row_reduce
        if rr != AUTO:
            if isinstance(rr, str):
                raise ValueError(f"row_reduce must be 'auto' or a set of names from {list(PROJECTION_NAMES)}, "
                                 f"got {rr!r}")
            rr = frozenset(rr)
            if not rr <= set(PROJECTION_NAMES):
                raise ValueError(f"row_reduce names must be from {list(PROJECTION_NAMES)}, got {sorted(rr)}")
            setf("row_reduce", rr)
        if self.matmul_2d != AUTO and not isinstance(self.matmul_2d, bool):
            raise ValueError(f"matmul_2d must be 'auto', True or False, got {self.matmul_2d!r}")
        m = self.prefill_attention_min_rows
        if m != AUTO and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"prefill_attention_min_rows must be 'auto' or an integer >= 0, got {m!r}")

    def replace(self, **kw) -> "KernelOptions":
        return dataclasses.replace(self, **kw)

    @property
    def resolved(self) -> bool:
        """No field left "auto"."""
        return all(getattr(self, f.name) != AUTO for f in dataclasses.fields(self))

    def to_dict(self) -> dict:
        """JSON-ready fields (row_reduce as a sorted list): for the executables' key and the stats."""
        d = dataclasses.asdict(self)
        if isinstance(d["row_reduce"], frozenset):
            d["row_reduce"] = sorted(d["row_reduce"])
        return d

    @classmethod
    def xla(cls, matmul_2d: bool) -> "KernelOptions":
        """Resolved options with XLA's path everywhere (no Pallas kernel, no fused attention)."""
        return cls(gemv="xla", decode_attention="xla", chunk_attention="xla", row_reduce=frozenset(),
                   matmul_2d=matmul_2d, prefill_wo="xla", prefill_attention="off", prefill_attention_min_rows=0,
                   prefill_matmuls="autotune", token_memory="device",
                   quant_matvec="grouped" if matmul_2d else "rowsum", quant_prefill="xla")

    @classmethod
    def from_env(cls, environ=None) -> "KernelOptions":
        """The benchmarks' ablations: options from the HYBRID_JAX_* variables (bench/README.md); unset ones
        stay "auto". The only place the library reads them."""
        env = os.environ if environ is None else environ

        def get(var, allowed):
            v = env.get(var, "").strip().lower()
            if v not in ("",) + allowed:
                raise ValueError(f"{var} must be one of {', '.join(allowed)}, got {v!r}")
            return v

        kw: dict[str, Any] = {}
        v = get("HYBRID_JAX_GEMV", ("auto", "xla", "pallas"))
        if v in ("xla", "pallas"):
            kw["gemv"] = v
        # "pallas" for the two below is their default: where the GEMVs run
        if get("HYBRID_JAX_DECODE_ATTN", ("auto", "xla", "pallas")) == "xla":
            kw["decode_attention"] = "xla"
        v = get("HYBRID_JAX_CHUNK_ATTN", ("auto", "xla", "pallas"))
        if v in ("xla", "pallas"):
            kw["chunk_attention"] = v
        if get("HYBRID_JAX_PREFILL_WO", ("auto", "xla", "pallas")) == "xla":
            kw["prefill_wo"] = "xla"
        v = env.get("HYBRID_JAX_ROW_REDUCE", "").strip().lower()
        if v in ("none", "off"):
            kw["row_reduce"] = frozenset()
        elif v not in ("", "auto"):
            names = frozenset(n.strip() for n in v.split(",") if n.strip())
            if not names <= set(PROJECTION_NAMES):
                raise ValueError(f"HYBRID_JAX_ROW_REDUCE must be none, auto or names from {list(PROJECTION_NAMES)} "
                                 f"joined by commas, got {v!r}")
            kw["row_reduce"] = names
        v = get("HYBRID_JAX_PREFILL_ATTN", ("auto", "off", "all"))
        if v == "off":
            kw["prefill_attention"] = "off"
        elif v == "all":
            kw["prefill_attention_min_rows"] = 0
        v = get("HYBRID_JAX_PREFILL_MATMULS", (AUTO,) + PREFILL_MATMULS)
        if v not in ("", AUTO):
            kw["prefill_matmuls"] = v
        v = get("HYBRID_JAX_TOKEN_MEMORY", ("auto",) + TOKEN_MEMORY)
        if v not in ("", AUTO):
            kw["token_memory"] = v
        v = get("HYBRID_JAX_QUANT_MATVEC", ("auto",) + QUANT_MATVEC)
        if v not in ("", AUTO):
            kw["quant_matvec"] = v
        v = get("HYBRID_JAX_QUANT_PREFILL", ("auto",) + KERNEL_MODES)
        if v not in ("", AUTO):
            kw["quant_prefill"] = v
        if env.get("HYBRID_JAX_PREFILL_GEMM", "").strip().lower() not in ("", "auto", "xla"):
            raise ValueError("HYBRID_JAX_PREFILL_GEMM was removed (the Pallas kernel for every prefill projection "
                             "lost its A/B; see docs/performance.md); unset it")
        if env.get("HYBRID_JAX_VERIFY_ROWS", "").strip():
            raise ValueError("HYBRID_JAX_VERIFY_ROWS was removed (the exact verify step lost its A/B: "
                             "see docs/performance.md); unset it")
        return cls(**kw)


def _check(name: str, value, allowed: tuple) -> None:
    if value != AUTO and value not in allowed:
        raise ValueError(f"{name} must be 'auto' or one of {', '.join(map(repr, allowed))}, got {value!r}")


def _on_gpu(devices) -> bool:
    return all(d.platform in ("gpu", "cuda") for d in devices)


def _one_device(name: str, value: str, mesh) -> None:
    if mesh is not None and value not in ("xla", "off", "device"):
        raise ValueError(f"{name}={value!r} runs on one device; use the XLA path with tensor_parallel > 1")


def resolve(options: KernelOptions | None, cfg, devices, mesh) -> KernelOptions:
    """`options` (None: every field "auto") with its "auto" fields made concrete for a model of config `cfg`
    on `devices` (in mesh order; `mesh` None for one device); a choice that cannot run there is a ValueError
    naming the field."""
    o = KernelOptions() if options is None else options
    if not isinstance(o, KernelOptions):
        raise TypeError(f"options must be a KernelOptions or None, got {type(o).__name__}")
    gpu = _on_gpu(devices)
    gemv = ("pallas" if gpu and mesh is None else "xla") if o.gemv == AUTO else o.gemv
    attn = gemv if o.decode_attention == AUTO else o.decode_attention
    # the kernel where the decode step's kernels run on one GPU (bench.probes.chunk_check, docs/performance.md)
    chunk = ("pallas" if attn == "pallas" and mesh is None else "xla") if o.chunk_attention == AUTO \
        else o.chunk_attention
    wo = gemv if o.prefill_wo == AUTO else o.prefill_wo
    if gemv == "xla":
        rr = frozenset()  # XLA's path has no kernels to replace
    elif o.row_reduce == AUTO:
        # a quantized model's products: every one through the kernel over the codes (qgemv.py), the fastest
        # decode step measured (docs/performance.md)
        rr = (frozenset() if cfg.quant else ROW_REDUCE_AUTO) if gemv == "pallas" else frozenset()
    else:
        rr = o.row_reduce
    m2d = all(d.platform == "cpu" for d in devices) if o.matmul_2d == AUTO else o.matmul_2d
    if o.prefill_attention == AUTO:
        ok = cfg.dtype in ("bfloat16", "float16") and cfg.hd % 8 == 0 and cfg.hd <= 128
        fused = "cudnn" if gpu and mesh is None and ok else "off"
        min_rows = FUSED_MIN_ROWS if o.prefill_attention_min_rows == AUTO else o.prefill_attention_min_rows
    else:
        fused = o.prefill_attention
        min_rows = 0 if o.prefill_attention_min_rows == AUTO else o.prefill_attention_min_rows
    matmuls = "split" if o.prefill_matmuls == AUTO else o.prefill_matmuls
    if o.token_memory == AUTO:
        kinds = {m.kind for m in devices[0].addressable_memories()} if mesh is None and len(devices) == 1 else ()
        token = "pinned_host" if "pinned_host" in kinds else "device"
    else:
        token = o.token_memory
    qmv = ("rowsum" if gpu else "grouped") if o.quant_matvec == AUTO else o.quant_matvec
    qpre = (gemv if mesh is None else "xla") if o.quant_prefill == AUTO else o.quant_prefill
    # With a mesh the kernels run per shard inside shard_map (model._layers_on_shards), when named: "auto" keeps
    # XLA's partitioned fusions there until the shard_map path is timed on several GPUs.
    for name, v in (("quant_prefill", qpre), ("prefill_attention", "off" if fused == "xla" else fused),
                    ("token_memory", token)):
        _one_device(name, v, mesh)
    if mesh is not None and gemv == "xla":
        for name, v in (("decode_attention", attn), ("chunk_attention", chunk), ("prefill_wo", wo)):
            if v != "xla":
                raise ValueError(f"{name}={v!r} with tensor_parallel > 1 runs inside shard_map with gemv's kernels: "
                                 f"name gemv too (gemv='pallas'), or use the XLA path")
    return KernelOptions(gemv=gemv, decode_attention=attn, chunk_attention=chunk, row_reduce=rr, matmul_2d=m2d,
                         prefill_wo=wo, prefill_attention=fused, prefill_attention_min_rows=min_rows,
                         prefill_matmuls=matmuls, token_memory=token, quant_matvec=qmv, quant_prefill=qpre)
