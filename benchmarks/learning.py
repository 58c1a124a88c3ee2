"""Does the CPU recipe learn on small real images? SwAV vs random init, raw pixels and the supervised ceiling.

For each task of ``seer.data.tasks`` (real objects at random position and scale, made from what the dependencies
ship) and each seed, the same trunk is:

- pretrained with the demo's SwAV recipe (``seer.demo.pretrain_overrides``, one process, streamed from the task's
  train folder);
- trained on the labels with the demo's supervised ceiling (``seer.demo.supervised_overrides``: same data,
  augmentations, steps and batch);
- taken at random initialization.

Each trunk is scored with kNN top-1 (DINO protocol, k=20, T=0.07, avgpool features) on the test split, next to
kNN on raw pixels. ``--set`` / ``--sup-set`` override the SwAV / supervised configs (dotted keys), so a candidate
recipe is measured without editing code. Not part of ``make bench`` (about two minutes per task and seed):

    python -m benchmarks.learning --tasks digits glyphs --seeds 0 1 2 --steps 300 --set optim.base_lr=0.4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_result
from benchmarks.swav_defaults import IMAGE_SIZE, knn_top1


def _task(name: str, root: Path, seed: int, n_train: int, n_test: int) -> dict:
    from seer.data.tasks import write_task

    task = write_task(name, root, n_train=n_train, n_test=n_test, size=IMAGE_SIZE, seed=seed)
    files = {part: task["files"][part][0] for part in ("train", "test")}
    labels = {part: np.asarray(task["files"][part][1]) for part in ("train", "test")}
    return {"train_dir": root / "train", "files": files, "labels": labels, "classes": task["classes"]}


def _train(cfg_dict: dict, overrides: list[str], data: dict) -> tuple[float, float]:
    """Train one config in-process; (kNN top-1 of its trunk, seconds)."""
    import yaml

    from seer.config import load_config
    from seer.train.loop import pretrain
    from seer.weights import load_trunk

    run_dir = Path(cfg_dict["run_dir"])
    cfg_dict["data"].update(source="images", images=str(data["train_dir"]), urls=None)
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    t0 = time.perf_counter()
    pretrain(load_config(str(path), overrides))
    seconds = time.perf_counter() - t0
    return knn_top1(load_trunk(str(run_dir)), data), seconds


def run(task: str, seed: int, steps: int, workdir: Path, swav_set: list[str], sup_set: list[str],
        n_train: int, n_test: int) -> dict:  # fmt: skip
    """One task and seed: the four kNN figures and the training times."""
    from seer.config import load_config, trunk_cfg
    from seer.demo import _raw_pixel_knn, pretrain_overrides, supervised_overrides
    from seer.models.regnet import build_trunk

    root = workdir / f"{task}-{seed}"
    data = _task(task, root / "data", seed, n_train, n_test)
    swav_cfg = pretrain_overrides(root, "unused", steps, 1, IMAGE_SIZE, seed)
    sup_cfg = supervised_overrides(swav_cfg, len(data["classes"]), root)
    swav, swav_s = _train(swav_cfg, swav_set, data)
    sup, sup_s = _train(sup_cfg, sup_set, data)
    torch.manual_seed(seed)
    model_cfg = load_config(str(root / "pretrain.yaml"), swav_set).model  # the trunk SwAV trained, overrides included
    random = knn_top1(build_trunk(trunk_cfg(model_cfg)), data)
    raw = _raw_pixel_knn(data["files"]["train"], data["labels"]["train"], data["files"]["test"], data["labels"]["test"])
    return {"swav": swav, "random_init": random, "raw_pixels": float(raw), "supervised": sup, "swav_seconds": swav_s,
            "supervised_seconds": sup_s}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from seer.data.tasks import TASKS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--train", type=int, default=2000, help="train images per task")
    ap.add_argument("--test", type=int, default=500, help="test images per task")
    ap.add_argument("--set", dest="swav_set", nargs="*", default=[], help="overrides of the SwAV config")
    ap.add_argument("--sup-set", nargs="*", default=[], help="overrides of the supervised config")
    args = ap.parse_args(argv)
    settings = {"recipe": "seer.demo.pretrain_overrides / supervised_overrides, 1 process, data.source=images",
                "steps": args.steps, "seeds": args.seeds, "n_train": args.train, "n_test": args.test,
                "swav_overrides": args.swav_set, "supervised_overrides": args.sup_set, "image_size": IMAGE_SIZE,
                "knn": "k=20, T=0.07, cosine, avgpool"}  # fmt: skip
    results: dict = {"settings": settings, "tasks": {}}
    rows = ("swav", "random_init", "raw_pixels", "supervised")
    with tempfile.TemporaryDirectory(prefix="seer-learning-") as tmp:
        for task in args.tasks:
            runs = []
            for seed in args.seeds:
                print(f"[learning] {task}, seed {seed}", flush=True)
                runs.append(run(task, seed, args.steps, Path(tmp), args.swav_set, args.sup_set, args.train, args.test))
            results["tasks"][task] = {"runs": runs, **{k: _stats([r[k] for r in runs]) for k in rows}}
    lines = [
        "# Does the CPU recipe learn on small real images?",
        "",
        f"kNN top-1 (k=20) on each task's test split, mean ± std over seeds {args.seeds}; {args.steps} steps of "
        f"the demo recipe (1 process); SwAV overrides {args.swav_set or 'none'}.",
        "",
        "| task | SwAV | random init | raw pixels | supervised | SwAV - random | SwAV / supervised |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, v in results["tasks"].items():
        cells = [f"{100 * v[k]['mean']:.1f} ± {100 * v[k]['std']:.1f}" for k in rows]
        margin = 100 * (v["swav"]["mean"] - v["random_init"]["mean"])
        ratio = v["swav"]["mean"] / max(v["supervised"]["mean"], 1e-9)
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {margin:+.1f} | {100 * ratio:.0f}% |")
    write_result("learning", results, "\n".join(lines) + "\n")
    return 0


def _stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}


if __name__ == "__main__":
    raise SystemExit(main())
