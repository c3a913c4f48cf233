"""How long a restore takes with the weights written as the converter writes them (no compression) and with
Orbax's default zstd (checkpoints of earlier versions): random weights of `--shape`, both written to --dir, each
restored onto the default device `--reps` times (page cache warm after the first), median and first reported.

    python -m bench.probes.restore_speed --shape llama2-7b --dir /tmp/rs

Writes restore_speed.json and prints a table.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time

from bench.probes.harness import parse, parser, random_params, run_record, shape_config, write_json


def main(argv=None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--dir", default="/tmp/restore_speed", help="where the two checkpoints are written")
    ap.add_argument("--reps", type=int, default=3)
    args = parse(ap, argv)

    import jax
    import orbax.checkpoint as ocp

    from hybrid_jax import checkpoint
    from hybrid_jax import weights as W

    cfg = shape_config(args.shape)
    params = jax.device_get(W.to_dict(random_params(cfg)))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = W.to_dict(W.abstract(cfg, lambda name, shape: one))
    rec = {"run": run_record(), "shape": args.shape, "params": cfg.n_params, "results": {}}
    writers = {"uncompressed (now)": checkpoint._writer(),
               "zstd (Orbax's default)": ocp.Checkpointer(ocp.PyTreeCheckpointHandler())}
    for name, writer in writers.items():
        d = os.path.join(args.dir, name.split()[0])
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        writer.save(d, params)
        save_s = time.perf_counter() - t0
        size = int(subprocess.run(["du", "-sb", d], capture_output=True, text=True).stdout.split()[0])
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            r = checkpoint._checkpointer().restore(d, target)
            jax.block_until_ready(r)
            times.append(time.perf_counter() - t0)
            del r
        rec["results"][name] = {"bytes": size, "save_s": round(save_s, 2), "restore_first_s": round(times[0], 2),
                                "restore_median_s": round(statistics.median(times), 2)}
        shutil.rmtree(d, ignore_errors=True)
    write_json(os.path.join(args.out, "restore_speed.json"), rec)
    print(f"\n{rec['run']['device']}, {args.shape} ({cfg.n_params / 1e9:.2f} B params, {cfg.dtype})")
    print(f"{'written':24s} {'GB':>7s} {'save s':>7s} {'restore 1st s':>14s} {'median s':>9s}")
    for name, r in rec["results"].items():
        print(f"{name:24s} {r['bytes'] / 1e9:7.2f} {r['save_s']:7.1f} {r['restore_first_s']:14.2f} "
              f"{r['restore_median_s']:9.2f}")


if __name__ == "__main__":
    main()
