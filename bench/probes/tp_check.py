"""Tensor-parallel evidence on several GPUs: per TP degree, engine build time, TTFT per prompt length,
streaming TPOT and the pipelined decode step, against the weight-read floor of one GPU. Random weights.

  python3 -m bench.probes.tp_check --shape llama2-13b --tp 1,2 --out $OUT
      [--reps 20] [--lengths 10,100,500] [--new-tokens 64] [--per-tp-timeout 280] [--deadline 570]
      [--xla-flags-extra "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,COLLECTIVES"]
      [--cache-dir .cache/tp_check]   (reuse compiled executables: a second run measures warm builds)
  HYBRID_JAX_GEMV=pallas python3 -m bench.probes.tp_check ...   (each shard runs one GPU's kernels inside
      shard_map instead of XLA's partitioned fusions; the other HYBRID_JAX_* ablations apply too)
  On the CPU (tiny GQA float32 model; the children get --xla_force_host_platform_device_count=max(tp)):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python3 -m bench.probes.tp_check \
      --shape tiny --tp 1,2 --out /tmp/tpout --reps 3 --lengths 10,20

The parent never imports jax (JAX would take most of every GPU's memory for the whole run); it starts:
1. a floors worker: jax version, device kinds and memory, and bench/floors.copy_bandwidth (JAX elementwise
   copies plus PyTorch's copy_ where torch has CUDA) on each GPU the largest TP uses -> $OUT/floors.json;
2. one worker per TP degree, in its own process (GPU memory is freed between degrees, a crash or a kill
   loses only that degree). It makes random weights already in their shards: a jit whose out_shardings
   are sharding.py's, drawing each matrix in blocks of 16M elements in a loop (jit(init_random)
   with the same out_shardings may keep whole tensors' random bits: for 70B at TP=2 the CPU backend plans
   389 GB of temporaries per device, the blocks 3.3 GB), so no device ever holds more than its share plus
   about a block (70B bf16 is 138 GB). The values are init_random's distributions. Then
   Engine(tensor_parallel=N, compile_sampling=False, prefill_buckets small), compiles the buckets the
   prompt lengths use, and times `generate(ignore_eos=True)`: TTFT and inter-token intervals per length
   (after warm-up runs and wait_background; compiles inside timed runs are counted and should be 0), then
   `pipelined_step_seconds`. The first greedy tokens are kept: the weights are the same at every TP
   (partitionable threefry), so the table's "same tokens" should say yes (float32 exactly; bf16 random
   weights may flip a near-tie). The record, rewritten to $OUT/tp{N}.json after every stage (a kill keeps
   what was measured), holds the raw samples; one compact JSON line is printed at the end;
3. a summary: $OUT/summary.json, $OUT/summary.md and a markdown table printed last.

Floors (per TP degree, from the slowest GPU it uses): `floor` = bytes of every weight shard on GPU 0 /
copy bandwidth (bench's decode floor, per GPU); `read_floor` = what one decode step must read on GPU 0:
weights less the embedding table (one row is gathered; counted when tied) plus the whole KV cache (the
decode step attends over every cache row, masked). Ratio = TPOT p50 / floor. Collectives are not in
either floor.

Environment: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are set unless
already set (children inherit them); TP workers get XLA_PYTHON_CLIENT_MEM_FRACTION=--mem-fraction unless
set (70B at TP=2 holds 69 GB per GPU: more than JAX's default 75% of an 80 GB card) and XLA_FLAGS plus
--xla-flags-extra (the final value is recorded). A TP degree whose weights do not fit one GPU's memory
is recorded as skipped without building anything. Each TP worker is killed after --per-tp-timeout s, and
sooner where --deadline (the whole run, default 570 s: under a 10-minute limit) would pass.
(worker modes: --worker floors | --worker tp --tp-one N, each writing its JSON to --out)
"""
from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench.probes import harness as H  # noqa: E402  (imports no jax)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FORCE = "--xla_force_host_platform_device_count"
ENV_KEYS = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE", "NCCL_NVLS_ENABLE",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")


# ---- shared helpers ---------------------------------------------------------------------------------

def pct(xs, q):
    """q-th percentile in milliseconds of a list of seconds (NaN when empty)."""
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if len(xs) else float("nan")


def config_for(shape):
    """The model of --shape; "tiny" in float32 (a GQA model the CPU dry run checks tokens on)."""
    return H.shape_config(shape, dtype="float32")


write_json = H.write_json


def env_record():
    return {k: os.environ[k] for k in ENV_KEYS if k in os.environ}


def device_info():
    import jax
    import jaxlib
    devs = jax.devices()
    mem = []
    for d in devs:
        try:
            mem.append((d.memory_stats() or {}).get("bytes_limit"))
        except Exception:  # noqa: BLE001 - backends without memory stats
            mem.append(None)
    return {"jax": jax.__version__, "jaxlib": getattr(jaxlib, "__version__", "?"), "platform": devs[0].platform,
            "device_count": len(devs), "device_kinds": [d.device_kind for d in devs], "bytes_limit": mem}


def memory(devs):
    out = []
    for d in devs:
        try:
            s = d.memory_stats() or {}
        except Exception:  # noqa: BLE001
            s = {}
        out.append({k: s.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")})
    return out


# ---- floors worker ----------------------------------------------------------------------------------

def floors_worker(args):
    import jax
    from bench import floors
    info = device_info()
    print(f"devices: {info['device_count']} x {info['device_kinds'][0]} ({info['platform']}), jax {info['jax']}",
          flush=True)
    on_acc = info["platform"] != "cpu"
    size = args.floor_bytes or (2 * 2**30 if on_acc else 64 * 2**20)
    reps = 30 if on_acc else 10
    res = dict(info, per_device={})
    for i in range(min(args.floor_devices, info["device_count"])):
        t0 = time.perf_counter()
        with jax.default_device(jax.devices()[i]), _torch_device(i if on_acc else None):
            fl = floors.copy_bandwidth(size, "bfloat16", reps)
        fl = {k: v for k, v in fl.items() if k != "copy_s"}
        fl["seconds"] = time.perf_counter() - t0
        res["per_device"][str(i)] = fl
        variants = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in fl["copy_variants_Bps"].items())
        print(f"device {i}: copy {fl['bw_Bps'] / 1e9:.0f} GB/s ({fl['copy_variant']}; {variants}) "
              f"in {fl['seconds']:.1f}s", flush=True)
        write_json(os.path.join(args.out, "floors.json"), res)
    write_json(os.path.join(args.out, "floors.json"), res)


@contextlib.contextmanager
def _torch_device(i):
    """PyTorch's current CUDA device (bench.floors' torch copy uses device="cuda") set to i, if torch has CUDA."""
    try:
        import torch
        ok = i is not None and torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch: the JAX variants only
        ok = False
    if not ok:
        yield
        return
    with torch.cuda.device(i):
        yield


# ---- TP worker --------------------------------------------------------------------------------------

def sharded_random(cfg, n, key, scale=0.02, chunk_elems=2**24):
    """Random weights (init_random's distributions) made in place in their TP=n shards (n=1: one device).

    One jit with sharding.py's out_shardings; every matrix is drawn in blocks of at most about `chunk_elems`
    elements (whole rows of axis 0, or, within one layer, rows of the first later axis that is not split
    over the devices, whole along the split axes before it) written into the output in a loop, each block
    constrained to the output's sharding, so a device's peak is its weights plus about one block.
    """
    import jax
    import jax.numpy as jnp

    from hybrid_jax import sharding
    from hybrid_jax import weights as W

    absw = W.abstract(cfg, sharding.sharding_fn(sharding.mesh(n)) if n > 1 else None)
    dtype = jnp.dtype(cfg.dtype)

    def draw(k, shape, norm):
        x = jax.random.normal(k, shape, dtype)
        return (1.0 + 0.1 * x).astype(dtype) if norm else (scale * x).astype(dtype)

    def constrain(x, sh):
        return jax.lax.with_sharding_constraint(x, sh) if sh is not None else x

    def fit(size, per):  # the largest divisor of size whose blocks of `per` elements stay within chunk_elems
        return max([d for d in range(1, size + 1) if size % d == 0 and d * per <= chunk_elems] or [1])

    def leaf(k, a, name):
        norm = name.endswith("norm")
        if a.ndim < 2:
            return draw(k, a.shape, norm)
        sh = getattr(a, "sharding", None)
        spec = tuple(sharding.PARAM_SPECS.get(name.split(".")[-1], ()))  # the blocks do not depend on n
        spec += (None,) * (a.ndim - len(spec))
        b = 0  # the axis whose rows make the blocks
        if math.prod(a.shape[1:]) > chunk_elems and a.ndim >= 3:
            b = next((i for i in range(1, a.ndim) if spec[i] is None), 0)
        if b == 0:  # blocks of whole rows of axis 0
            block = (fit(a.shape[0], math.prod(a.shape[1:])),) + a.shape[1:]
        else:  # one index of axis 0 (a layer), the split axes before b whole, rows of axis b
            block = (1,) + a.shape[1:b] + (fit(a.shape[b], math.prod(a.shape[1:b]) * math.prod(a.shape[b + 1:])),) \
                + a.shape[b + 1:]
        per0 = a.shape[b] // block[b] if b else 1

        def body(j, buf):
            x = constrain(draw(jax.random.fold_in(k, j), block, norm), sh)
            start = [0] * a.ndim
            start[0] = j // per0 * block[0]
            if b:
                start[b] = j % per0 * block[b]
            return jax.lax.dynamic_update_slice(buf, x, tuple(start))
        n_blocks = a.shape[0] // block[0] * per0
        return jax.lax.fori_loop(0, n_blocks, body, constrain(jnp.zeros(a.shape, dtype), sh))

    def init(key):
        d = W.to_dict(absw)
        flat = [(k, v) for k, v in d.items() if k != "layers"] + [("layers." + k, v) for k, v in d["layers"].items()]
        out = {"layers": {}}
        for (name, a), k in zip(flat, jax.random.split(key, len(flat))):
            arr = leaf(k, a, name)
            if name.startswith("layers."):
                out["layers"][name[7:]] = arr
            else:
                out[name] = arr
        return W.from_dict(out)

    kw = {"out_shardings": jax.tree.map(lambda a: a.sharding, absw)} if n > 1 else {}
    return jax.jit(init, **kw)(key)


def shard_bytes(tree, device):
    """Bytes of the shards of every leaf that live on `device`."""
    import jax
    total = 0
    for a in jax.tree.leaves(tree):
        if device in a.sharding.device_set:
            total += math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
    return total


def first_buffer(a):
    try:
        return a.addressable_shards[0].data.unsafe_buffer_pointer()
    except Exception:  # noqa: BLE001
        return None


def estimate_bytes_per_gpu(cfg, n):
    """Weight bytes on GPU 0 at TP=n, from the abstract shapes (nothing allocated)."""
    import jax
    from hybrid_jax import sharding
    from hybrid_jax import weights as W
    if n == 1:
        return cfg.weight_bytes
    return shard_bytes(W.abstract(cfg, sharding.sharding_fn(sharding.mesh(n))), jax.devices()[0])


def tp_worker(args):
    n = args.tp_one
    path = os.path.join(args.out, f"tp{n}.json")
    rec = {"tp": n, "shape": args.shape, "status": "running", "stage": "start", "env": env_record(),
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "lengths": args.lengths, "reps": args.reps,
           "new_tokens": args.new_tokens, "max_seq_len": args.max_seq_len, "buckets": args.buckets,
           "copy_bw_Bps": args.copy_bw}
    t_start = time.perf_counter()

    def save(stage):
        rec["stage"] = stage
        rec["worker_s"] = time.perf_counter() - t_start
        write_json(path, rec)

    save("start")
    try:
        _tp_worker(args, n, rec, save)
    except BaseException as e:  # noqa: BLE001 - recorded, then raised (the parent reads the file and the rc)
        rec["status"], rec["error"] = "error", f"{type(e).__name__}: {e}"[:2000]
        save(rec["stage"])
        raise


def _tp_worker(args, n, rec, save):
    import jax
    from hybrid_jax import sharding
    from hybrid_jax.engine import Engine, generate
    from hybrid_jax.options import KernelOptions

    events = {"n": 0}
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, dur, **kw: events.__setitem__("n", events["n"] + 1)
        if name == "/jax/core/compile/backend_compile_duration" else None)
    rec.update(device_info())
    cfg = config_for(args.shape)
    rec["cfg"] = cfg.to_dict()
    sharding.check(cfg, n)
    devs = list(sharding.mesh(n).devices.flat)  # raises unless n devices are visible
    est = estimate_bytes_per_gpu(cfg, n)
    limit = rec["bytes_limit"][0]
    rec["est_weight_bytes_per_gpu"] = est
    if limit and est > limit:
        rec["status"] = "skipped"
        rec["reason"] = f"weights per GPU {est / 1e9:.1f} GB > memory limit {limit / 1e9:.1f} GB"
        save("skipped")
        print(f"tp={n}: skipped: {rec['reason']}", flush=True)
        return

    t0 = time.perf_counter()
    params = sharded_random(cfg, n, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    rec["init_s"] = time.perf_counter() - t0
    rec["weight_bytes_per_gpu"] = shard_bytes(params, devs[0])
    rec["weight_bytes_total"] = cfg.weight_bytes
    rec["memory_after_init"] = memory(devs)
    save("init")
    print(f"tp={n}: weights {rec['weight_bytes_per_gpu'] / 1e9:.2f} GB/GPU in {rec['init_s']:.1f}s", flush=True)

    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix=f"tp{n}_exec_")
    ptr = first_buffer(params.layers.wqkv)
    t0 = time.perf_counter()
    opts = KernelOptions.from_env()  # HYBRID_JAX_GEMV=pallas: the kernels on each shard (model._layers_on_shards)
    eng = Engine(cfg, params, max_seq_len=args.max_seq_len, tensor_parallel=n, prefill_buckets=args.buckets,
                 compile_sampling=False, cache_dir=cache_dir, kv_reuse=False, options=opts)
    rec["options"] = eng.runtime.options.to_dict()
    rec["build_s"] = time.perf_counter() - t0
    rt = eng.runtime
    rec["engine_kept_weight_buffers"] = ptr is not None and first_buffer(rt.params.layers.wqkv) == ptr
    del params
    rec["stats_after_build"] = eng.stats()
    save("build")
    print(f"tp={n}: engine built in {rec['build_s']:.1f}s ({rec['stats_after_build']['compiles']} compiles)",
          flush=True)

    t0 = time.perf_counter()
    for b in sorted({rt.bucket_for(L) for L in args.lengths} - {None}):
        rt.compile_async(("prefill", b, b))  # the prompts' own buckets, concurrently (warmup() would add sampling)
    eng.wait_background()
    rec["buckets_s"] = time.perf_counter() - t0
    rec["stats_after_buckets"] = eng.stats()
    save("buckets")
    print(f"tp={n}: prompt buckets compiled in {rec['buckets_s']:.1f}s", flush=True)

    rng = np.random.RandomState(0)
    rec["points"], rec["compiles_in_timed"] = {}, 0
    for L in args.lengths:
        ids = [int(t) for t in rng.randint(3, cfg.vocab_size, size=L)]
        for _ in range(2):
            generate(eng, ids, max_new_tokens=args.new_tokens, ignore_eos=True)
        eng.wait_background()
        c0 = events["n"]
        ttft, itl, chunks = [], [], set()
        for _ in range(args.reps):
            r = generate(eng, ids, max_new_tokens=args.new_tokens, ignore_eos=True)
            ttft.append(r.timings.ttft_s)
            itl += r.timings.itl_s
            chunks.add(r.timings.prefill_chunks)
        rec["compiles_in_timed"] += events["n"] - c0
        rec.setdefault("first_tokens", {})[str(L)] = r.token_ids[:16]  # the parent compares them across TP
        rec["points"][str(L)] = {"ttft_s": ttft, "itl_s": itl, "prefill_chunks": sorted(chunks),
                                 "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
                                 "tpot_p50_ms": pct(itl, 50), "tpot_p99_ms": pct(itl, 99)}
        save(f"ttft_{L}")
        print(f"tp={n}: prompt {L}: TTFT p50 {pct(ttft, 50):.2f} p99 {pct(ttft, 99):.2f} ms; "
              f"TPOT p50 {pct(itl, 50):.3f} p99 {pct(itl, 99):.3f} ms", flush=True)
    itl = sum((p["itl_s"] for p in rec["points"].values()), [])
    rec["tpot_p50_ms"], rec["tpot_p99_ms"], rec["tpot_n"] = pct(itl, 50), pct(itl, 99), len(itl)

    rec["pipelined_step_s"] = [eng.pipelined_step_seconds(args.pipelined_steps) for _ in range(3)]
    rec["pipelined_ms"] = float(np.median(rec["pipelined_step_s"]) * 1e3)

    # floors: GPU 0's bytes over the slowest used GPU's bandwidth (the parent passes that bandwidth)
    wb = rec["weight_bytes_per_gpu"]
    embed = 0 if cfg.tie_embeddings else shard_bytes(rt.params.embed, devs[0])
    kv = shard_bytes(rt.state.cache, devs[0])
    rec.update(kv_bytes_per_gpu=kv, read_bytes_per_step_per_gpu=wb - embed + kv)
    if args.copy_bw and args.copy_bw > 0:
        rec["floor_ms"] = wb / args.copy_bw * 1e3
        rec["read_floor_ms"] = rec["read_bytes_per_step_per_gpu"] / args.copy_bw * 1e3
        rec["tpot_over_floor"] = rec["tpot_p50_ms"] / rec["floor_ms"]
        rec["pipelined_over_floor"] = rec["pipelined_ms"] / rec["floor_ms"]
    rec["stats"] = eng.stats()
    rec["runtime_compiles_in_timed"] = rec["stats"]["compiles"] - rec["stats_after_buckets"]["compiles"]
    rec["memory_end"] = memory(devs)
    rec["status"] = "ok"
    save("done")
    eng.close()
    keep = ("tp", "shape", "status", "platform", "device_count", "xla_flags", "init_s", "build_s", "buckets_s",
            "weight_bytes_per_gpu", "kv_bytes_per_gpu", "engine_kept_weight_buffers", "compiles_in_timed",
            "runtime_compiles_in_timed", "tpot_p50_ms", "tpot_p99_ms", "pipelined_ms", "floor_ms", "read_floor_ms",
            "tpot_over_floor", "pipelined_over_floor", "worker_s")
    compact = {k: rec[k] for k in keep if k in rec}
    compact["device_kind"] = rec["device_kinds"][0]
    compact["compiles"] = rec["stats"]["compiles"]
    compact["ttft_p50_ms"] = {L: round(p["ttft_p50_ms"], 3) for L, p in rec["points"].items()}
    compact["ttft_p99_ms"] = {L: round(p["ttft_p99_ms"], 3) for L, p in rec["points"].items()}
    compact["peak_bytes"] = [m.get("peak_bytes_in_use") for m in rec["memory_end"]]
    print(json.dumps(compact), flush=True)


# ---- parent -----------------------------------------------------------------------------------------

def with_flag(flags: str, flag: str) -> str:
    return (flags + " " + flag).strip() if flag else flags


def run_child(cmd, env, timeout, log_path):
    """Run a worker (stdout through, stderr to log_path); (rc or 'timeout', seconds, stderr tail)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, env=env, stderr=log, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    with open(log_path, errors="replace") as f:
        tail = f.read()[-3000:]
    return rc, time.perf_counter() - t0, tail


def fmt(x, spec=".2f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(results, lengths):
    head = (["tp", "status"] + [f"TTFT {L} p50 ms" for L in lengths]
            + ["TPOT p50 ms", "TPOT p99 ms", "pipelined ms", "floor ms", "TPOT/floor", "read floor ms", "build s",
               "buckets s", "GB/GPU", "same tokens"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        pts = r.get("points", {})
        cells = [str(r["tp"]), r.get("status", "?") + ("" if r.get("status") == "ok" else f" ({r.get('stage')})")]
        cells += [fmt(pts.get(str(L), {}).get("ttft_p50_ms")) for L in lengths]
        cells += [fmt(r.get("tpot_p50_ms"), ".3f"), fmt(r.get("tpot_p99_ms"), ".3f"),
                  fmt(r.get("pipelined_ms"), ".3f"), fmt(r.get("floor_ms"), ".3f"), fmt(r.get("tpot_over_floor")),
                  fmt(r.get("read_floor_ms"), ".3f"),
                  fmt(r.get("build_s"), ".1f"), fmt(r.get("buckets_s"), ".1f"),
                  fmt(r["weight_bytes_per_gpu"] / 1e9 if r.get("weight_bytes_per_gpu") else None),
                  {True: "yes", False: "NO"}.get(r.get("tokens_match_first"), "-")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_args(argv=None):
    ap = H.parser(__doc__, shape="llama2-13b")
    ap.add_argument("--tp", default="1,2", help="TP degrees, comma-separated (one process each, in order)")
    ap.add_argument("--reps", type=int, default=20, help="timed generations per prompt length")
    ap.add_argument("--lengths", default="10,100,500", help="prompt lengths")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--buckets", default="16,128,512,1024", help="prefill buckets of the engine")
    ap.add_argument("--pipelined-steps", type=int, default=200)
    ap.add_argument("--per-tp-timeout", type=float, default=280.0, help="seconds for each TP worker")
    ap.add_argument("--deadline", type=float, default=570.0,
                    help="seconds for the whole run: a worker's timeout is cut so the summary is written in time")
    ap.add_argument("--xla-flags-extra", default="", help="appended to XLA_FLAGS for the TP workers")
    ap.add_argument("--mem-fraction", default="0.92", help="XLA_PYTHON_CLIENT_MEM_FRACTION for TP workers, unless set")
    ap.add_argument("--cache-dir", default=None, help="executable cache (default: a fresh one per worker: cold builds)")
    ap.add_argument("--floor-bytes", type=int, default=None, help="copy size (default 2 GiB on GPU, 64 MiB on CPU)")
    ap.add_argument("--worker", choices=("floors", "tp"), default=None)
    ap.add_argument("--tp-one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--copy-bw", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--floor-devices", type=int, default=1, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv[:-1]):  # its value starts with "--": argparse would take it for an option
        if a == "--xla-flags-extra":
            argv[i:i + 2] = [f"{a}={argv[i + 1]}"]
            break
    args = ap.parse_args(argv)
    args.tps = [int(x) for x in args.tp.split(",") if x]
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.buckets = [int(x) for x in args.buckets.split(",") if x]
    if not args.tps or min(args.tps) < 1:
        ap.error("--tp needs positive integers")
    if not args.lengths or max(args.lengths) + args.new_tokens > args.max_seq_len or min(args.lengths) < 1:
        ap.error(f"--lengths plus --new-tokens must fit --max-seq-len {args.max_seq_len}")
    return args


def common_argv(args):
    return ["--shape", args.shape, "--out", args.out, "--reps", str(args.reps),
            "--lengths", ",".join(map(str, args.lengths)), "--new-tokens", str(args.new_tokens),
            "--max-seq-len", str(args.max_seq_len), "--buckets", ",".join(map(str, args.buckets)),
            "--pipelined-steps", str(args.pipelined_steps),
            *(["--cache-dir", args.cache_dir] if args.cache_dir else [])]


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.worker == "floors":
        return floors_worker(args)
    if args.worker == "tp":
        return tp_worker(args)

    t_run = time.perf_counter()
    me = [sys.executable, "-m", "bench.probes.tp_check"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)

    # 1. device info and copy bandwidth on every GPU the largest TP uses (JAX not preallocating: torch copies too)
    fenv = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if FORCE not in fenv.get("XLA_FLAGS", ""):  # on the CPU: as many devices as the largest TP (harmless on GPU)
        fenv["XLA_FLAGS"] = with_flag(fenv.get("XLA_FLAGS", ""), f"{FORCE}={max(args.tps)}")
    rc, secs, tail = run_child(me + ["--worker", "floors", "--floor-devices", str(max(args.tps))] + common_argv(args),
                               fenv, 120, os.path.join(args.out, "floors.log"))
    try:
        with open(os.path.join(args.out, "floors.json")) as f:
            fl = json.load(f)
    except (OSError, ValueError):
        fl = {}
    if rc != 0:
        print(f"floors worker failed (rc={rc}); stderr tail:\n{tail}", flush=True)
    print(f"floors: {secs:.1f}s", flush=True)
    platform = fl.get("platform")
    bws = {int(i): d["bw_Bps"] for i, d in fl.get("per_device", {}).items()}

    # 2. one worker per TP degree
    cenv = dict(env)
    cenv.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", args.mem_fraction)
    flags = with_flag(cenv.get("XLA_FLAGS", ""), args.xla_flags_extra)
    if platform in (None, "cpu") and FORCE not in flags:
        flags = with_flag(flags, f"{FORCE}={max(args.tps)}")
    cenv["XLA_FLAGS"] = flags
    print(f"TP workers: XLA_FLAGS={flags!r}", flush=True)
    results = []
    for n in args.tps:
        path = os.path.join(args.out, f"tp{n}.json")
        if os.path.exists(path):
            os.remove(path)
        left = args.deadline - (time.perf_counter() - t_run) - 15  # keep time for the summary
        timeout = min(args.per_tp_timeout, left)
        used = [bws[i] for i in range(n) if i in bws]
        bw = min(used) if len(used) == n else None
        if left < 20:
            r = {"tp": n, "status": "skipped", "stage": "deadline", "reason": f"{left:.0f}s left of --deadline"}
        else:
            cmd = me + ["--worker", "tp", "--tp-one", str(n), *(["--copy-bw", repr(bw)] if bw else [])]
            cmd += common_argv(args)
            print(f"--- tp={n} (timeout {timeout:.0f}s)", flush=True)
            rc, secs, tail = run_child(cmd, cenv, timeout, os.path.join(args.out, f"tp{n}.log"))
            try:
                with open(path) as f:
                    r = json.load(f)
            except (OSError, ValueError):
                r = {"tp": n, "stage": "not started"}
            r["process_s"] = secs
            itl = sum((p.get("itl_s", []) for p in r.get("points", {}).values()), [])
            if "tpot_p50_ms" not in r and itl:  # cut short: TPOT of the lengths it finished
                r["tpot_p50_ms"], r["tpot_p99_ms"], r["tpot_n"] = pct(itl, 50), pct(itl, 99), len(itl)
            if rc == "timeout":
                r["status"] = "timeout"
            elif rc != 0:
                r["status"] = "error"
                r["rc"] = rc
                r["stderr_tail"] = tail
                print(f"tp={n} FAILED rc={rc} at stage {r.get('stage')}; stderr tail:\n{tail}", flush=True)
            print(f"tp={n}: {r.get('status')} in {secs:.0f}s", flush=True)
        write_json(path, r)
        results.append(r)

    # 3. summary. The weights are the same at every TP (threefry is partitionable: a value depends on its index,
    # not on the sharding), so greedy tokens should agree (float32 exactly; bf16 may drift on near-ties).
    ref = next((r["first_tokens"] for r in results if r.get("first_tokens")), None)
    for r in results:
        if r.get("first_tokens") and ref:
            r["tokens_match_first"] = r["first_tokens"] == ref
    first = results[0] if results else {}
    dev = {k: fl.get(k, first.get(k))
           for k in ("jax", "jaxlib", "platform", "device_count", "device_kinds", "bytes_limit")}
    summary = {"shape": args.shape,
               "args": {k: v for k, v in vars(args).items() if k not in ("worker", "tp_one", "copy_bw")},
               "devices": dev, "copy_bw_Bps": {str(i): b for i, b in bws.items()},
               "floors": fl.get("per_device"), "xla_flags": flags, "env": {k: cenv[k] for k in ENV_KEYS if k in cenv},
               "wall_s": time.perf_counter() - t_run,
               "results": [{k: v for k, v in r.items() if k != "points"}
                           | {"ttft_p50_ms": {L: p.get("ttft_p50_ms") for L, p in r.get("points", {}).items()},
                              "ttft_p99_ms": {L: p.get("ttft_p99_ms") for L, p in r.get("points", {}).items()}}
                           for r in results]}
    kinds = sorted(set(dev.get("device_kinds") or [])) or ["?"]
    md = (f"## {args.shape} tensor parallel on {dev.get('device_count')} x {', '.join(kinds)} "
          f"(jax {dev.get('jax')})\n\n"
          + "copy bandwidth: " + (", ".join(f"device {i} {b / 1e9:.0f} GB/s" for i, b in sorted(bws.items())) or "-")
          + f"; XLA_FLAGS: `{flags}`; {args.reps} reps, {args.new_tokens} new tokens, random weights\n\n"
          + table(results, args.lengths) + "\n")
    notes = [f"- tp={r['tp']}: {r.get('status')} at stage {r.get('stage')}: "
             + (r.get("error") or r.get("reason") or f"{r.get('process_s', 0):.0f}s")
             for r in results if r.get("status") != "ok"]
    if notes:
        md += "\n" + "\n".join(notes) + "\n"
    write_json(os.path.join(args.out, "summary.json"), summary)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(md)
    print("\n" + md, flush=True)


if __name__ == "__main__":
    main()
