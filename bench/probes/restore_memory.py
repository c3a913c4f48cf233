"""Host memory of a checkpoint restore (hybrid_jax.checkpoint.restore, the path generate.load takes), on the CPU.

  # 1. a ~2.5 GB bf16 checkpoint of random weights, written with checkpoint.save
  JAX_PLATFORMS=cpu python3 -m bench.probes.restore_memory --make /tmp/rm_ckpt --params-gb 2.5
  # 2. one fresh process per tensor-parallel degree; markdown table on stdout, JSON to --out
  JAX_PLATFORMS=cpu python3 -m bench.probes.restore_memory --all /tmp/rm_ckpt --tp 1,2,4 --out /tmp/restore_mem.json
      [--variants default,dcc=16,gb=2,blocks=128]  (extra rows, set in the child only: 'default' is the
                                     project's restore as is; blocks=M: layer tensors filled block by block (M MB)
                                     as on an accelerator; gb=G: Orbax StandardCheckpointer(restore_concurrent_gb=G) instead
                                     of its 96 GB default; dcc=K: TensorStore's data_copy_concurrency limit K
                                     instead of the CPU count, i.e. what a K-core host would run at once)
      [--delete]                    (remove the checkpoint folder at the end)
  # (worker) JAX_PLATFORMS=cpu python3 -m bench.probes.restore_memory --restore /tmp/rm_ckpt --tp 2 [--out f.json]

Every --restore runs in its own process (the parent never imports jax) with
XLA_FLAGS=--xla_force_host_platform_device_count=8. It imports jax, orbax and hybrid_jax, creates the
devices and (tp > 1) the mesh and sharding_fn exactly as generate.load does, then records:
- before: VmRSS once all of that is done;
- peak: the highest of a 5 ms VmRSS sampler thread, VmHWM (reset through /proc/self/clear_refs just before
  the restore where the kernel allows it) and ru_maxrss;
- after: VmRSS once the restore returned and every array is ready (the arrays are still alive);
- the arrays: logical bytes (the whole model), bytes held on devices (shards, replicas counted per device),
  the largest tensor, the largest shard, and whether every device holds exactly its shard's shape.
On the CPU backend the devices' buffers are host memory, so `after - before` contains the restored arrays
and `transient = peak - after` is what the restore used beyond what it returned.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.probes import harness as H  # imports no jax: the parent never does

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def rss() -> int:
    return _status_kb("VmRSS") * 1024


def rss_parts() -> tuple[int, int, int]:
    """(VmRSS, RssAnon, RssFile + RssShmem) in bytes, from one read of /proc/self/status."""
    v = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, rest = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                v[k] = int(rest.split()[0]) * 1024
    return v.get("VmRSS", -1), v.get("RssAnon", -1), v.get("RssFile", 0) + v.get("RssShmem", 0)


def hwm() -> int:
    return _status_kb("VmHWM") * 1024


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    def __init__(self, period: float = 0.005):
        super().__init__(daemon=True)
        self.period = period
        self.stop_ev = threading.Event()
        self.peak = 0
        self.peak_anon = 0
        self.peak_file = 0
        self.at_peak = (0, 0, 0)
        self.samples: list[tuple[float, int]] = []
        self.t0 = time.perf_counter()

    def run(self):
        while not self.stop_ev.is_set():
            r, anon, fil = rss_parts()
            if r > self.peak:
                self.peak, self.at_peak = r, (r, anon, fil)
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_file = max(self.peak_file, fil)
            self.samples.append((time.perf_counter() - self.t0, r))
            time.sleep(self.period)

    def stop(self):
        self.stop_ev.set()
        self.join()


def io_counters() -> dict:
    out = {}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                k, v = line.split(":")
                out[k.strip()] = int(v)
    except OSError:
        pass
    return out


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ---- --make ------------------------------------------------------------------------------------------

def make(args) -> None:
    from hybrid_jax import checkpoint
    from hybrid_jax import weights as W
    from hybrid_jax.config import LlamaConfig

    base = dict(vocab_size=args.vocab, dim=args.dim, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                ffn_dim=args.ffn, dtype=args.dtype)
    one = LlamaConfig(n_layers=1, **base)
    two = LlamaConfig(n_layers=2, **base)
    per_layer = two.weight_bytes - one.weight_bytes
    fixed = one.weight_bytes - per_layer
    n_layers = max(1, round((args.params_gb * 1e9 - fixed) / per_layer))
    cfg = LlamaConfig(n_layers=n_layers, **base)
    print(f"config: {cfg.to_dict()}\nweights: {cfg.weight_bytes / 1e9:.3f} GB ({cfg.n_params / 1e6:.0f} M params)",
          flush=True)
    t = time.perf_counter()
    params = H.random_params(cfg)
    print(f"init_random {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    out = checkpoint.save(args.make, cfg, W.to_dict(params), force=args.force)
    print(f"saved {out} in {time.perf_counter() - t:.1f} s; {_dir_bytes(out) / 1e9:.3f} GB on disk", flush=True)


# ---- --restore (worker) ------------------------------------------------------------------------------

def restore_one(args) -> dict:
    import gc
    import resource

    import jax
    import numpy as np
    import orbax.checkpoint as ocp  # noqa: F401  (imported before `before`)
    import importlib.metadata as md

    from hybrid_jax import checkpoint, sharding
    from hybrid_jax import weights as W

    devs = jax.devices()
    path = Path(args.restore).absolute()
    cfg = checkpoint.load_config(path)
    fn = None
    if args.tp != 1:  # as generate.load does
        sharding.check(cfg, args.tp)
        fn = sharding.sharding_fn(sharding.mesh(args.tp))
    if args.concurrent_gb not in (None, "default"):
        gb = float(args.concurrent_gb)
        checkpoint._checkpointer = lambda: ocp.StandardCheckpointer(restore_concurrent_gb=gb)  # noqa: E731
    if args.blocks_mb:  # the accelerator's block-by-block fill of layer tensors, on the CPU devices
        checkpoint._BLOCKS_ON_CPU = True
        checkpoint.READ_AHEAD_BYTES = int(float(args.blocks_mb) * 2**20)
    if args.data_copy_concurrency:  # TensorStore's decode/copy thread pool (default: the CPU count)
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
        for ctx in (ts_utils._BASE_TS_CONTEXT, ts_utils._DEFAULT_OCDBT_TS_CONTEXT):
            ctx["data_copy_concurrency"] = {"limit": int(args.data_copy_concurrency)}

    gc.collect()
    time.sleep(0.2)
    before, before_anon, before_file = rss_parts()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hwm_reset = reset_hwm()
    io0, cpu0 = io_counters(), os.times()
    sampler = Sampler(0.005)
    sampler.start()
    t0 = time.perf_counter()
    cfg, params = checkpoint.restore(path, sharding_fn=fn)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    io1, cpu1 = io_counters(), os.times()
    time.sleep(0.05)
    sampler.stop()
    peak_hwm = hwm()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gc.collect()
    time.sleep(0.2)
    after, after_anon, after_file = rss_parts()
    peak_candidates = {"sampler": sampler.peak, "VmHWM": peak_hwm if hwm_reset else None,
                       "ru_maxrss": maxrss if maxrss > maxrss_before else None}
    peak = max(v for v in peak_candidates.values() if v is not None)
    peak = max(peak, after)

    leaves = jax.tree_util.tree_leaves_with_path(W.to_dict(params))
    tensors = []
    device_bytes: dict[str, int] = {}
    only_own_shard = True
    for kp, a in leaves:
        name = jax.tree_util.keystr(kp)
        want = a.sharding.shard_shape(a.shape)
        shard_bytes = []
        for s in a.addressable_shards:
            if tuple(s.data.shape) != tuple(want):
                only_own_shard = False
            nb = s.data.nbytes
            shard_bytes.append(nb)
            device_bytes[str(s.device)] = device_bytes.get(str(s.device), 0) + nb
        tensors.append({"name": name, "shape": list(a.shape), "bytes": int(a.nbytes),
                        "shard_shape": list(want), "n_shards": len(shard_bytes),
                        "device_bytes": int(sum(shard_bytes)), "spec": str(getattr(a.sharding, "spec", "single"))})
    logical = sum(t["bytes"] for t in tensors)
    on_devices = sum(t["device_bytes"] for t in tensors)
    largest = max(tensors, key=lambda t: t["bytes"])
    largest_shard = max(t["bytes"] // max(1, np.prod(t["shape"]) // max(1, np.prod(t["shard_shape"])))
                        for t in tensors)
    ckpt_disk = _dir_bytes(path / checkpoint.WEIGHTS_DIR)

    # Does device_put of a numpy array alias it on this backend (then Orbax's read buffer *is* the array)?
    a = np.ones(1 << 22, np.uint8)
    x = jax.device_put(a, devs[0])
    x.block_until_ready()
    zero_copy = int(x.unsafe_buffer_pointer()) == int(a.ctypes.data)
    del x, a

    transient = peak - after
    # timeline, thinned to <= 400 points (always keeping the peak)
    s = sampler.samples
    step = max(1, len(s) // 400)
    thin = s[::step]
    ip = max(range(len(s)), key=lambda i: s[i][1]) if s else None
    if ip is not None and s[ip] not in thin:
        thin = sorted(thin + [s[ip]])
    rec = {
        "tp": args.tp,
        "concurrent_gb": args.concurrent_gb or "default",
        "versions": {p: md.version(p) for p in ("jax", "jaxlib", "orbax-checkpoint", "tensorstore", "numpy")},
        "backend": jax.default_backend(), "n_devices": len(devs),
        "checkpoint": str(path), "checkpoint_disk_bytes": ckpt_disk,
        "config": cfg.to_dict(),
        "seconds": seconds,
        "cpu_seconds": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        "io_rchar": io1.get("rchar", 0) - io0.get("rchar", 0),
        "io_read_bytes": io1.get("read_bytes", 0) - io0.get("read_bytes", 0),
        "data_copy_concurrency": args.data_copy_concurrency or "default (CPU count: %d)" % os.cpu_count(),
        "rss_before": before, "rss_peak": peak, "rss_after": after,
        "peak_sources": peak_candidates,
        "anon_before": before_anon, "anon_peak_sampled": sampler.peak_anon, "anon_after": after_anon,
        "file_before": before_file, "file_peak_sampled": sampler.peak_file, "file_after": after_file,
        "sampled_peak_rss_anon_file": list(sampler.at_peak),
        "transient_anon_sampled": sampler.peak_anon - after_anon, "hwm_reset": hwm_reset, "sampler_n": len(s),
        "peak_minus_before": peak - before, "after_minus_before": after - before, "transient": transient,
        "arrays_logical_bytes": logical, "arrays_device_bytes": on_devices, "per_device_bytes": device_bytes,
        "largest_tensor": {"name": largest["name"], "bytes": largest["bytes"]},
        "largest_shard_bytes": int(largest_shard),
        "every_device_holds_only_its_shard": only_own_shard,
        "transient_x_checkpoint": transient / logical,
        "transient_x_largest_tensor": transient / largest["bytes"],
        "peak_minus_before_x_checkpoint": (peak - before) / logical,
        "cpu_device_put_aliases_numpy": zero_copy,
        "tensors": tensors,
        "timeline_s_rss": [(round(t, 4), r) for t, r in thin],
    }
    return rec


# ---- --all (parent) ----------------------------------------------------------------------------------

def _fmt_gb(b) -> str:
    return f"{b / 1e9:.2f}"


def _ckpt_label(r: dict) -> str:
    return Path(r["checkpoint"]).name


def table(recs: list[dict]) -> str:
    """One row per run."""
    hdr = ("| checkpoint | variant | tp | run | time s | RSS before GB | peak GB | after GB | peak-before GB | "
           "after-before GB | arrays on devices GB | transient (peak-after) GB | transient / checkpoint | "
           "transient / largest tensor | each device only its shard | bytes read (rchar) GB |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in recs:
        if "error" in r:
            lines.append(f"| {r['ckpt']} | {r['variant']} | {r['tp']} | {r['run']} | failed: "
                         f"{r['error'][-80:].replace(chr(10), ' ')} |")
            continue
        lines.append(
            f"| {_ckpt_label(r)} | {r['variant']} | {r['tp']} | {r['run']} | {r['seconds']:.1f} | "
            f"{_fmt_gb(r['rss_before'])} | "
            f"{_fmt_gb(r['rss_peak'])} | {_fmt_gb(r['rss_after'])} | {_fmt_gb(r['peak_minus_before'])} | "
            f"{_fmt_gb(r['after_minus_before'])} | {_fmt_gb(r['arrays_device_bytes'])} | {_fmt_gb(r['transient'])} | "
            f"{r['transient_x_checkpoint']:.2f}x | {r['transient_x_largest_tensor']:.2f}x | "
            f"{'yes' if r['every_device_holds_only_its_shard'] else 'NO'} | {_fmt_gb(r['io_rchar'])} |")
    return "\n".join(lines)


def summary_table(recs: list[dict]) -> str:
    """Median (min-max) of the transient over the repeats of each (checkpoint, variant, tp)."""
    import statistics
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        if "error" not in r:
            groups.setdefault((_ckpt_label(r), r["variant"], r["tp"]), []).append(r)
    hdr = ("| checkpoint (arrays GB, largest tensor GB) | variant | tp | runs | peak-before GB | after-before GB | "
           "transient GB median (min-max) | transient / checkpoint | transient / largest tensor | time s |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for (ck, v, tp), rs in groups.items():
        r0 = rs[0]
        tr = [r["transient"] for r in rs]
        med = statistics.median(tr)
        lines.append(
            f"| {ck} ({_fmt_gb(r0['arrays_logical_bytes'])}, {r0['largest_tensor']['name']} "
            f"{_fmt_gb(r0['largest_tensor']['bytes'])}) | {v} | {tp} | {len(rs)} | "
            f"{_fmt_gb(statistics.median(r['peak_minus_before'] for r in rs))} | "
            f"{_fmt_gb(statistics.median(r['after_minus_before'] for r in rs))} | "
            f"{_fmt_gb(med)} ({_fmt_gb(min(tr))}-{_fmt_gb(max(tr))}) | "
            f"{med / r0['arrays_logical_bytes']:.2f}x | {med / r0['largest_tensor']['bytes']:.2f}x | "
            f"{statistics.median(r['seconds'] for r in rs):.1f} |")
    return "\n".join(lines)


def run_all(args) -> None:
    dirs = [d for d in args.all.split(",") if d]
    tps = [int(x) for x in args.tp_list.split(",")]
    variants = [v.strip() for v in args.variants.split(",")]
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    recs = []
    tmp = Path(args.out).with_suffix(".part")
    for run in range(args.repeat):  # repeats outermost: drift over time hits every row alike
        for d in dirs:
            for v in variants:
                for tp in tps:
                    cmd = [sys.executable, "-m", "bench.probes.restore_memory", "--restore", d, "--tp", str(tp),
                           "--out", str(tmp)]
                    for kv in ([] if v == "default" else v.split("+")):
                        k, val = kv.split("=")
                        cmd += {"gb": ["--concurrent-gb", val], "dcc": ["--data-copy-concurrency", val],
                                "blocks": ["--blocks-mb", val]}[k]
                    print("$", " ".join(cmd), flush=True)
                    t = time.perf_counter()
                    tmp.unlink(missing_ok=True)
                    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                    if p.returncode != 0 or not tmp.exists():
                        recs.append({"ckpt": Path(d).name, "tp": tp, "variant": v, "run": run,
                                     "error": (p.stderr or p.stdout)[-2000:]})
                        print(p.stderr[-3000:], file=sys.stderr)
                        continue
                    r = json.loads(tmp.read_text())
                    tmp.unlink()
                    r["process_seconds"] = time.perf_counter() - t
                    r["variant"], r["run"] = v, run
                    recs.append(r)
                    print(f"  {Path(d).name} tp={tp} variant={v} run={run}: before {r['rss_before'] / 1e9:.2f} GB, "
                          f"peak {r['rss_peak'] / 1e9:.2f}, after {r['rss_after'] / 1e9:.2f}, "
                          f"transient {r['transient'] / 1e9:.2f} GB, {r['seconds']:.1f} s", flush=True)
    ok = [r for r in recs if "error" not in r]
    summary = {"command": " ".join([sys.executable] + sys.argv), "xla_flags": env["XLA_FLAGS"],
               "jax_platforms": env.get("JAX_PLATFORMS"), "cpu_count": os.cpu_count(),
               "versions": ok[0]["versions"] if ok else None, "checkpoints": {}, "runs": recs}
    for r in ok:
        summary["checkpoints"].setdefault(r["checkpoint"], {
            "config": r["config"], "logical_bytes": r["arrays_logical_bytes"], "disk_bytes": r["checkpoint_disk_bytes"],
            "largest_tensor": r["largest_tensor"],
            "tensors": {t["name"]: {"shape": t["shape"], "bytes": t["bytes"]} for t in r["tensors"]}})
    md, smd = table(recs), summary_table(recs)
    summary["table_md"], summary["summary_md"] = md, smd
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print()
    for k, c in summary["checkpoints"].items():
        print(f"checkpoint {k}: {c['logical_bytes'] / 1e9:.3f} GB of arrays ({c['disk_bytes'] / 1e9:.3f} GB on disk), "
              f"largest tensor {c['largest_tensor']['name']} {c['largest_tensor']['bytes'] / 1e9:.3f} GB")
    print(f"versions {summary['versions']}\n")
    print(md)
    print()
    print(smd)
    print(f"\nwrote {args.out}")
    if args.delete:
        import shutil
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
            print(f"deleted {d}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--make", metavar="DIR")
    mode.add_argument("--restore", metavar="DIR")
    mode.add_argument("--all", metavar="DIR[,DIR...]")
    ap.add_argument("--params-gb", type=float, default=2.5)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--n-heads", type=int, default=16)
    ap.add_argument("--n-kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--tp", default=None, help="--restore: one degree; --all: comma list (default 1,2,4)")
    ap.add_argument("--concurrent-gb", default=None,
                    help="--restore: Orbax restore_concurrent_gb (default: the project's checkpointer, Orbax's 96)")
    ap.add_argument("--blocks-mb", default=None, help="--restore: fill layer tensors block by block (blocks of "
                    "this many MB) as on an accelerator (checkpoint._restore_by_layer)")
    ap.add_argument("--data-copy-concurrency", type=int, default=None,
                    help="--restore: TensorStore data_copy_concurrency limit (default: CPU count); "
                         "e.g. 16 to act like a 16-core host")
    ap.add_argument("--variants", default="default",
                    help="--all: comma list; 'default' = the project's restore as is; otherwise "
                         "'gb=G' (restore_concurrent_gb), 'dcc=K' (data_copy_concurrency), joined by '+'")
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--delete", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="--all: runs per (checkpoint, variant, tp)")
    args = ap.parse_args(argv)
    if args.make:
        make(args)
    elif args.restore:
        args.tp = int(args.tp or 1)
        rec = restore_one(args)
        text = json.dumps(rec)
        if args.out:
            Path(args.out).write_text(text)
        else:
            print(text)
    else:
        args.tp_list = args.tp or "1,2,4"
        args.out = args.out or "/tmp/restore_mem.json"
        run_all(args)


if __name__ == "__main__":
    main()
