"""Memory benchmark: activation checkpointing on/off, FSDP2 sharding at world size 2, and `seer plan` next to both.

    python -m benchmarks.memory [--quick]

1. regnety_800mf and regnety_1_6gf (+ a small SwAV head), one CPU process, SwAV multi-crop (2x128 + 4x64 by
   default: all crops' activations are held until the loss, one resolution group is recomputed at a time): peak
   memory and step time with and without per-block activation checkpointing. Activation memory = peak RSS of the
   training steps above the process's post-warm-up baseline (which already holds parameters, gradients and momentum).
   Target: activation memory >= 2.5x lower with checkpointing, at <= 1.4x the step time.
2. Per-rank parameter + gradient + optimizer-state bytes (the local storage of every tensor, summed exactly) with
   FSDP2 on 2 gloo processes vs one process. Target: world size 2 <= 0.55x world size 1.
3. The `seer plan` prediction next to each measurement.

The machine is shared while this runs: step times are noisy; memory figures are not affected by CPU load.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 2**20
HEAD = ["swav.head_dims=[256, 64]", "swav.n_prototypes=256", "swav.use_bn=true"]


def _overrides(preset: str, res: int, batch: int, ac: str, small: int = 0) -> list[str]:
    """SwAV multi-crop shapes: 2 x ``res`` (+ 4 x ``small`` when given)."""
    crops = f"[[2, {res}], [4, {small}]]" if small else f"[[2, {res}]]"
    return [*HEAD, f"model.preset={preset}", f"data.crops={crops}", f"data.image_size={res}",
            f"data.batch_size_per_gpu={batch}", f"model.activation_checkpointing={ac}"]  # fmt: skip


def step_times(preset: str, res: int, small: int, batch: int, rounds: int) -> dict:
    """Training-step seconds with checkpointing off and per block, alternated in one process (min of ``rounds``
    each), so that load from other processes hits both modes alike."""
    import time

    import torch

    from seer.config import crop_shapes, load_config
    from seer.distributed.parallel import parallelize
    from seer.train.loop import build_model
    from seer.train.optim import build_optimizer

    cfg = load_config(None, _overrides(preset, res, batch, "false", small))
    torch.manual_seed(0)
    model = parallelize(build_model(cfg), fsdp=False)
    opt = build_optimizer(model, cfg.optim)
    crops = [torch.randn(batch, 3, r, r) for c, r in crop_shapes(cfg.data) for _ in range(c)]
    best = {"false": float("inf"), "block": float("inf")}
    for i in range(rounds + 1):
        for ac in ("false", "block"):
            model.trunk.set_grad_checkpointing(ac == "block")
            t0 = time.perf_counter()
            model.head.normalize_prototypes()
            loss = model(crops, 10**6)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i > 0:  # the first round warms up
                best[ac] = min(best[ac], time.perf_counter() - t0)
    return best


def activation_checkpointing(presets: list[str], res: int, small: int, batch: int, steps: int) -> list[dict]:
    """Measured vs planned activation memory and step time, checkpointing off and per block."""
    from seer.config import load_config
    from seer.train.plan import measure_cpu, plan

    rows = []
    for preset in presets:
        row = {"preset": preset, "crops": f"2x{res}" + (f" + 4x{small}" if small else ""), "batch": batch}
        times = step_times(preset, res, small, batch, rounds=max(4, steps))
        for ac in ("false", "block"):
            ov = _overrides(preset, res, batch, ac, small)
            m = measure_cpu(ov, steps=steps, threads=int(os.environ.get("OMP_NUM_THREADS", 2)))
            p = plan(load_config(None, ov), 1, None, device="cpu")["memory_bytes"]
            row[ac] = {
                "activation_mib": m["activation_bytes"] / MiB,
                "peak_mib": m["peak_bytes"] / MiB,
                "static_mib": m["static_bytes"] / MiB,
                "step_time_s": times[ac],
                "plan_activation_mib": p["activations"] / MiB,
                "plan_total_mib": p["total"] / MiB,
            }
            print(f"{preset} ac={ac}: {row[ac]}", flush=True)
        row["activation_ratio"] = row["false"]["activation_mib"] / max(row["block"]["activation_mib"], 1e-9)
        row["time_ratio"] = row["block"]["step_time_s"] / row["false"]["step_time_s"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# World size 2 vs 1: exact local bytes of parameters, gradients and optimizer state
# ----------------------------------------------------------------------------------------------------------------
def _local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _worker(preset: str, out: str) -> None:
    import torch

    from seer.config import load_config
    from seer.distributed.env import destroy_distributed, init_distributed
    from seer.distributed.parallel import parallelize
    from seer.train.loop import build_model
    from seer.train.optim import build_optimizer

    env = init_distributed(device="cpu")
    cfg = load_config(None, _overrides(preset, 32, 2, "false"))
    torch.manual_seed(0)
    model = parallelize(build_model(cfg))
    opt = build_optimizer(model, cfg.optim)
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    model.head.normalize_prototypes()
    model(crops, 10**6)["loss"].backward()  # past the prototype freeze: every parameter gets a gradient
    opt.step()
    params = [p for g in opt.param_groups for p in g["params"]]
    result = {
        "rank": env.rank,
        "world_size": env.world_size,
        "params": sum(_local_bytes(p) for p in params),
        "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
    }
    Path(out).write_text(json.dumps(result))
    if env.distributed:
        torch.distributed.barrier()
    destroy_distributed()


def sharding(preset: str, timeout: float = 600) -> dict:
    """Per-rank static bytes at world size 1 (no process group) and 2 (FSDP2, gloo)."""
    from seer.config import load_config
    from seer.train.plan import plan

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            procs = []
            for rank in range(world):
                env = dict(os.environ, OMP_NUM_THREADS="1")
                for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                    env.pop(k, None)
                if world > 1:
                    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(port))  # fmt: skip
                out = f"{tmp}/w{world}_r{rank}.json"
                cmd = [sys.executable, "-m", "benchmarks.memory", "--worker", preset, out]
                procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), out))
            for p, _ in procs:
                p.communicate(timeout=timeout)
            # judge the files the workers wrote (gloo can abort at interpreter exit after the work is done)
            ranks = [json.loads(Path(out).read_text()) for _, out in procs]
            results[world] = max(r["params"] + r["grads"] + r["optimizer"] for r in ranks)
            results[f"{world}_detail"] = ranks
    cfg = load_config(None, _overrides(preset, 32, 2, "false"))
    planned = {w: sum(plan(cfg, w, None, device="cpu")["memory_bytes"][k] for k in ("params", "grads", "optimizer"))
               for w in (1, 2)}  # fmt: skip
    return {
        "preset": preset,
        "world1_mib": results[1] / MiB,
        "world2_mib": results[2] / MiB,
        "ratio": results[2] / results[1],
        "plan_world1_mib": planned[1] / MiB,
        "plan_world2_mib": planned[2] / MiB,
        "detail": {"world1": results["1_detail"], "world2": results["2_detail"]},
    }


# ----------------------------------------------------------------------------------------------------------------
def _markdown(ac_rows: list[dict], shard: dict) -> str:
    def ok(flag: bool) -> str:
        return "PASS" if flag else "MISS"

    lines = [
        "# Memory: activation checkpointing, FSDP2 sharding, `seer plan`",
        "",
        "CPU, one process, SwAV multi-crop; activation memory = peak RSS above the post-warm-up baseline (a fresh "
        "process per figure). Step times: checkpointing off/on alternated in one process, best of the rounds, on a "
        "shared 2-core machine (noisy).",
        "",
        "| model | crops, batch | activations no AC (plan) | activations AC (plan) | ratio (target >= 2.5) "
        "| step time no AC / AC | time ratio (target <= 1.4) | pass |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ac_rows:
        f, b = r["false"], r["block"]
        lines.append(
            f"| {r['preset']} | {r['crops']}, {r['batch']} "
            f"| {f['activation_mib']:.0f} MiB ({f['plan_activation_mib']:.0f}) "
            f"| {b['activation_mib']:.0f} MiB ({b['plan_activation_mib']:.0f}) | {r['activation_ratio']:.2f}x "
            f"| {f['step_time_s']:.2f} s / {b['step_time_s']:.2f} s | {r['time_ratio']:.2f}x "
            f"| {ok(r['activation_ratio'] >= 2.5)} / {ok(r['time_ratio'] <= 1.4)} |"
        )
    lines += [
        "",
        "| peak total (params + grads + momentum + activations) | measured | plan | plan / measured |",
        "|---|---|---|---|",
    ]
    for r in ac_rows:
        for ac in ("false", "block"):
            m = r[ac]
            lines.append(
                f"| {r['preset']} AC={ac} | {m['peak_mib']:.0f} MiB | {m['plan_total_mib']:.0f} MiB "
                f"| {m['plan_total_mib'] / m['peak_mib']:.2f} |"
            )
    s = shard
    lines += [
        "",
        "| per-rank params + grads + optimizer state | world size 1 | world size 2 (FSDP2, gloo) | ratio "
        "(target <= 0.55) | pass |",
        "|---|---|---|---|---|",
        f"| {s['preset']} measured | {s['world1_mib']:.1f} MiB | {s['world2_mib']:.1f} MiB | {s['ratio']:.3f} "
        f"| {ok(s['ratio'] <= 0.55)} |",
        f"| {s['preset']} `seer plan` | {s['plan_world1_mib']:.1f} MiB | {s['plan_world2_mib']:.1f} MiB "
        f"| {s['plan_world2_mib'] / s['plan_world1_mib']:.3f} | |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="regnety_800mf only, smaller batch")
    ap.add_argument("--resolution", type=int, default=128, help="large crops (2 per image)")
    ap.add_argument("--small", type=int, default=64, help="small crops (4 per image; 0: none)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=1, help="measured steps per memory run (timing: >= 4 rounds)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return {}
    presets = ["regnety_800mf"] if args.quick else ["regnety_800mf", "regnety_1_6gf"]
    batch = args.batch or (4 if args.quick else 8)
    ac_rows = activation_checkpointing(presets, args.resolution, args.small, batch, args.steps)
    shard = sharding("regnety_800mf")
    payload = {
        "activation_checkpointing": ac_rows,
        "sharding": shard,
        "targets": {"activation_ratio_min": 2.5, "time_ratio_max": 1.4, "world2_ratio_max": 0.55},
        "note": "shared 2-core CPU: step times are noisy",
    }
    md = _markdown(ac_rows, shard)
    try:
        from benchmarks.common import write_result

        write_result("memory", payload, md)
    except ImportError:  # pragma: no cover - standalone use
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        (out / "memory.json").write_text(json.dumps(payload, indent=2, default=str))
        (out / "memory.md").write_text(md + "\n")
    print(md)
    return payload


if __name__ == "__main__":
    main()
