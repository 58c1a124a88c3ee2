"""The references' defaults, measured on the CPU recipe: zero-init of the last BN on vs off, and SwAV's prototype
scores in fp32 vs bf16 under bf16 training.

Each variant pretrains the demo's CPU recipe (``tiny_cpu`` via ``seer.demo.recipe``, one process, streamed from an image
folder of the demo's shapes dataset: the class is geometry only) for ``--steps`` steps with each seed, then scores
the frozen trunk with kNN (DINO protocol, k=20, T=0.07) on held-out images, next to the trunk at random
initialization. Figures: the final loss (mean of the last 3 logged values), kNN top-1, and the mean |gamma| of the
blocks' last BN (``conv3.bn``). Not part of ``make bench`` (a minute or two per run):

    python -m benchmarks.swav_defaults --steps 600 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, write_result

IMAGE_SIZE = 32
VARIANTS = {
    "fp32, zero-init off (default)": ["train.precision=fp32", "model.zero_init=false"],
    "fp32, zero-init on": ["train.precision=fp32", "model.zero_init=true"],
    "bf16, fp32 prototypes (default)": ["train.precision=bf16", "swav.fp32_prototypes=true"],
    "bf16, bf16 prototypes": ["train.precision=bf16", "swav.fp32_prototypes=false"],
}


def _dataset(root: Path, seed: int) -> dict:
    """The demo's shapes images (class = geometry only; colour and position random): train and test folders."""
    from seer.data.synthetic import CLASSES, write_image_folder

    train = write_image_folder(root / "train", 200, IMAGE_SIZE, seed=seed)
    test = write_image_folder(root / "test", 50, IMAGE_SIZE, seed=seed + 1)
    files = {k: sorted(d.rglob("*.jpg")) for k, d in (("train", train), ("test", test))}
    labels = {k: np.array([CLASSES.index(p.parent.name) for p in v]) for k, v in files.items()}
    return {"train_dir": train, "files": files, "labels": labels}


def knn_top1(trunk: torch.nn.Module, data: dict) -> float:
    import seer
    from seer.evaluation import eval_knn

    prep = {"resolution": IMAGE_SIZE, "crop_pct": 1.0}
    f = {k: seer.extract_features(v, trunk, progress=False, **prep) for k, v in data["files"].items()}
    return float(eval_knn(f["train"], data["labels"]["train"], f["test"], data["labels"]["test"], ks=(20,))["top1"][20])


def last_bn_gamma(trunk: torch.nn.Module) -> float:
    gammas = [m.weight.abs().mean().item() for n, m in trunk.named_modules() if n.endswith("conv3.bn")]
    return float(statistics.mean(gammas)) if gammas else float("nan")


def _config(workdir: Path, data: dict, seed: int, steps: int, overrides: list[str]):
    import yaml

    from seer.config import load_config
    from seer.demo import recipe

    base = recipe(workdir / "run", data={"source": "images", "images": str(data["train_dir"]), "urls": None},
                  steps=steps, seed=seed)  # fmt: skip
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return load_config(str(path), overrides)


def run_variant(overrides: list[str], seed: int, steps: int, workdir: Path, data: dict) -> dict:
    from seer.train.loop import pretrain
    from seer.weights import load_trunk

    run_dir = workdir / f"run-{len(list(workdir.glob('run-*')))}"
    cfg = _config(workdir, data, seed, steps, [*overrides, f"run_dir={run_dir}"])
    t0 = time.perf_counter()
    summary = pretrain(cfg)
    seconds = time.perf_counter() - t0
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trunk = load_trunk(str(run_dir))
    return {
        "final_loss": float(np.mean(losses[-3:])),
        "knn_top1": knn_top1(trunk, data),
        "last_bn_gamma": last_bn_gamma(trunk),
        "seconds": seconds,
        "steps": float(summary["step"]),
    }


def random_init(seed: int, workdir: Path, data: dict) -> dict:
    from seer.config import trunk_cfg
    from seer.models.regnet import build_trunk

    cfg = _config(workdir, data, seed, 100, [])
    torch.manual_seed(seed)
    trunk = build_trunk(trunk_cfg(cfg.model))
    return {"knn_top1": knn_top1(trunk, data), "last_bn_gamma": last_bn_gamma(trunk)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = ap.parse_args(argv)
    settings = {"recipe": "tiny_cpu (seer.demo.recipe), 1 process, data.source=images",
                "data": "shapes, 16 classes x 200 train / 50 test, 32 px", "steps": args.steps, "seeds": args.seeds,
                "knn": "k=20, T=0.07, cosine, avgpool"}  # fmt: skip
    results: dict = {"settings": settings, "machine": machine_info(), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="seer-swav-defaults-") as tmp:
        data = _dataset(Path(tmp) / "data", seed=0)
        for name in args.variants:
            runs = []
            for seed in args.seeds:
                print(f"[swav_defaults] {name}, seed {seed}", flush=True)
                runs.append(run_variant(VARIANTS[name], seed, args.steps, Path(tmp), data))
            results["variants"][name] = {"runs": runs, **_mean(runs)}
        r = [random_init(s, Path(tmp), data) for s in args.seeds]
        results["variants"]["random init"] = {"runs": r, **_mean(r)}
    lines = [
        "# SwAV defaults on the CPU recipe",
        "",
        f"The demo recipe on the shapes images (1 process, streamed from the image folder), {args.steps} steps, "
        f"seeds {args.seeds}; kNN k=20 on held-out images; CPU: {results['machine'].get('processor')}",
        "",
        "| variant | final loss | kNN top-1 (k=20) | mean abs gamma of conv3.bn | s / run |",
        "|---|---|---|---|---|",
    ]
    for name, v in results["variants"].items():
        loss = f"{v['final_loss']:.3f}" if "final_loss" in v else "-"
        secs = f"{v['seconds']:.0f}" if "seconds" in v else "-"
        lines.append(f"| {name} | {loss} | {v['knn_top1']:.3f} ({_spread(v, 'knn_top1')}) | {v['last_bn_gamma']:.3f} "
                     f"| {secs} |")  # fmt: skip
    write_result("swav_defaults", results, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _mean(runs: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if isinstance(runs[0][k], float)}


def _spread(v: dict, key: str) -> str:
    vals = [r[key] for r in v["runs"]]
    return f"{min(vals):.3f}-{max(vals):.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
