"""Trunk speed on CPU at 224 px, batch 16: seer vs timm and torchvision (default and channels_last), one run.

Training step = forward + backward of the pooled features (no optimizer); inference = eval + inference_mode.
Calls of the compared models are interleaved round by round so machine load affects them alike; the median of
the rounds is reported. Targets (issue 2): training >= 1.2x their default and >= 1.0x their channels_last;
inference >= 1.8x their default and >= 1.0x their channels_last.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from benchmarks.common import measure_mm_peak, status, write_result
from seer import hardware
from seer.models.regnet import build_trunk, complexity

PRESETS = {  # ours -> (timm name, torchvision name)
    "regnety_400mf": ("regnety_004", "regnet_y_400mf"),
    "regnety_800mf": ("regnety_008", "regnet_y_800mf"),
    "regnety_1_6gf": ("regnety_016", "regnet_y_1_6gf"),
}
BF16_SKIPPED = "skipped: this CPU has no oneDNN bf16 kernels (amp='bf16' runs fp32 here)"
TARGETS = {"train": {"default": 1.2, "channels_last": 1.0}, "infer": {"default": 1.8, "channels_last": 1.0}}


def _reference_models(timm_name: str, tv_name: str) -> dict[str, torch.nn.Module]:
    import timm
    import torchvision

    models = {}
    for lib, make in (
        ("timm", lambda: timm.create_model(timm_name, pretrained=False, num_classes=0)),
        ("torchvision", lambda: _tv_trunk(getattr(torchvision.models, tv_name)(weights=None))),
    ):
        models[f"{lib}"] = make()
        models[f"{lib} channels_last"] = make().to(memory_format=torch.channels_last)
    return models


def _tv_trunk(model: torch.nn.Module) -> torch.nn.Module:
    model.fc = torch.nn.Identity()  # pooled features, like the others
    return model


def _rounds(fns: dict[str, callable], rounds: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up (oneDNN primitive creation, allocator)
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no model always runs first (or right after the same neighbour)
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_preset(name: str, batch: int, resolution: int, rounds: int) -> dict:
    torch.manual_seed(0)
    timm_name, tv_name = PRESETS[name]
    models = {"seer": build_trunk(name), **_reference_models(timm_name, tv_name)}
    x = torch.randn(batch, 3, resolution, resolution)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    inputs = {n: (x_cl if n.endswith("channels_last") else x) for n in models}
    out: dict = {"train": {}, "infer": {}}

    def train_step(model, inp):
        def fn():
            model.zero_grad(set_to_none=True)
            model(inp).float().mean().backward()

        return fn

    def infer_step(model, inp):
        def fn():
            with torch.inference_mode():
                model(inp)

        return fn

    for m in models.values():
        m.train()
    secs = _rounds({n: train_step(m, inputs[n]) for n, m in models.items()}, rounds)
    out["train"] = {n: batch / s for n, s in secs.items()}
    for m in models.values():
        m.eval()

    def infer_bf16():  # opt-in amp="bf16" (not the default, not counted toward the fp32 targets)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            models["seer"](x)

    fns = {n: infer_step(m, inputs[n]) for n, m in models.items()}
    if hardware.cpu_bf16_kernels():  # elsewhere amp="bf16" runs fp32 (oneDNN has no bf16 kernels): no row to time
        fns["seer amp=bf16"] = infer_bf16
    secs = _rounds(fns, rounds)
    out["infer"] = {n: batch / s for n, s in secs.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)  # the references' NCHW speeds swing ~30% between runs
    parser.add_argument("--quick", action="store_true", help="regnety_800mf only, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.rounds = ["regnety_800mf"], 2

    peak = measure_mm_peak()
    results, rows = {}, []
    rows.append("| preset | mode | seer img/s | vs | their img/s | ratio | target | |")
    rows.append("|---|---|---|---|---|---|---|---|")
    for name in args.presets:
        r = bench_preset(name, args.batch, args.resolution, args.rounds)
        macs = complexity(name, args.resolution)["macs"]
        r["infer_fraction_of_mm_peak"] = 2 * macs * r["infer"]["seer"] / 1e9 / peak
        r["ratios"] = {}
        for mode in ("train", "infer"):
            ours = r[mode]["seer"]
            for ref in ("timm", "torchvision", "timm channels_last", "torchvision channels_last"):
                kind = "channels_last" if ref.endswith("channels_last") else "default"
                ratio = ours / r[mode][ref]
                target = TARGETS[mode][kind]
                r["ratios"][f"{mode} vs {ref}"] = ratio
                rows.append(
                    f"| {name} | {mode} | {ours:.1f} | {ref} | {r[mode][ref]:.1f} | {ratio:.2f}x | >= {target}x "
                    f"| {status(ratio, target)} |"
                )
        results[name] = r
    md = [
        f"# Trunk speed (CPU, batch {args.batch}, {args.resolution} px, fp32)",
        "",
        *rows,
        "",
        f"fp32 torch.mm peak measured in this run: {peak:.0f} GFLOP/s.",
        "",
        "| preset | seer inference GFLOP/s | fraction of mm peak |",
        "|---|---|---|",
    ]
    for name, r in results.items():
        frac = r["infer_fraction_of_mm_peak"]
        md.append(f"| {name} | {frac * peak:.0f} | {frac:.0%} |")
    md += [
        "",
        "Opt-in bf16 inference (`torch.autocast('cpu', torch.bfloat16)`, what `extract_features(amp='bf16')` uses;",
        "fast only on CPUs with AMX, slower than fp32 without). Not the default, not counted toward the targets.",
        "",
        "| preset | seer fp32 img/s | seer amp=bf16 img/s | speed-up |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        fp32, bf16 = r["infer"]["seer"], r["infer"].get("seer amp=bf16")
        if bf16 is None:
            md.append(f"| {name} | {fp32:.1f} | skipped | {BF16_SKIPPED} |")
        else:
            md.append(f"| {name} | {fp32:.1f} | {bf16:.1f} | {bf16 / fp32:.2f}x |")
    payload = {"args": vars(args), "mm_peak_gflops": peak, "results": results}
    if not hardware.cpu_bf16_kernels():
        payload["bf16_skipped"] = BF16_SKIPPED
    write_result("trunk", payload, "\n".join(md))
    return payload


if __name__ == "__main__":
    main()
