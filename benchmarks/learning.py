"""Does the CPU recipe learn on small real images? SwAV vs random init, raw pixels and the supervised ceiling.

For each task of ``seer.data.tasks`` (real objects at random position and scale, made from what the dependencies
ship) and each seed, the same trunk is:

- pretrained with the ``tiny_cpu`` recipe, the demo's (``seer.demo.recipe``, one process, streamed from the task's
  train folder);
- trained on the labels with the demo's supervised ceiling (``seer.demo.supervised_overrides``: same data,
  augmentations, steps and batch);
- taken at random initialization (the run's seed).

Each trunk is scored with kNN top-1 (DINO protocol, k=20, T=0.07, avgpool features) on the test split, next to
kNN on raw pixels. ``--set`` / ``--sup-set`` override the SwAV / supervised configs (dotted keys), so a candidate
recipe is measured without editing code; ``--rows swav`` skips the other rows while tuning. Not part of ``make bench``
(one to three minutes per task and seed):

    python -m benchmarks.learning --tasks digits glyphs digits_on_photos --seeds 0 1 2
    python -m benchmarks.learning --tasks glyphs --rows swav --set swav.queue_length=640
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.common import machine_info, write_result
from benchmarks.swav_defaults import IMAGE_SIZE, knn_top1

ROWS = ("swav", "random_init", "raw_pixels", "supervised")


def _task(name: str, root: Path, seed: int, n_train: int, n_test: int) -> dict:
    from seer.data.tasks import write_task

    task = write_task(name, root, n_train=n_train, n_test=n_test, size=IMAGE_SIZE, seed=seed)
    files = {part: task["files"][part][0] for part in ("train", "test")}
    labels = {part: np.asarray(task["files"][part][1]) for part in ("train", "test")}
    return {"train_dir": root / "train", "files": files, "labels": labels, "classes": task["classes"]}


def _train(cfg_dict: dict, overrides: list[str], data: dict) -> tuple[float, float]:
    """Train one config in-process; (kNN top-1 of its trunk, seconds)."""
    from seer.config import load_config
    from seer.train.loop import pretrain
    from seer.weights import load_trunk

    run_dir = Path(cfg_dict["run_dir"])
    cfg_dict["data"].update(source="images", images=str(data["train_dir"]), urls=None)
    cfg_dict["train"]["log_every"] = 50
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    t0 = time.perf_counter()
    pretrain(load_config(str(path), overrides))
    seconds = time.perf_counter() - t0
    return knn_top1(load_trunk(str(run_dir)), data), seconds


def run(task: str, seed: int, steps: int | None, workdir: Path, swav_set: list[str], sup_set: list[str],
        n_train: int, n_test: int, rows: tuple[str, ...] = ROWS) -> dict:  # fmt: skip
    """One task and seed: the kNN figures of ``rows`` and the training times."""
    from seer.config import load_config, trunk_cfg
    from seer.demo import raw_pixels, recipe, supervised_overrides
    from seer.evaluation import eval_knn
    from seer.models.regnet import build_trunk

    root = workdir / f"{task}-{seed}"
    data = _task(task, root / "data", seed, n_train, n_test)
    swav_cfg = recipe(root / "pretrain", data={}, steps=steps, seed=seed)
    out: dict = {}
    if "swav" in rows:
        out["swav"], out["swav_seconds"] = _train(swav_cfg, swav_set, data)
    if "supervised" in rows:
        sup_cfg = supervised_overrides(swav_cfg, len(data["classes"]), root / "supervised")
        out["supervised"], out["supervised_seconds"] = _train(sup_cfg, sup_set, data)
    if "random_init" in rows:
        (root / "pretrain.yaml").write_text(yaml.safe_dump(swav_cfg))
        torch.manual_seed(seed)
        model_cfg = load_config(str(root / "pretrain.yaml"), swav_set).model  # the trunk SwAV trains, with overrides
        out["random_init"] = knn_top1(build_trunk(trunk_cfg(model_cfg)), data)
    if "raw_pixels" in rows:
        f = {part: raw_pixels(data["files"][part]) for part in ("train", "test")}
        knn = eval_knn(f["train"], data["labels"]["train"], f["test"], data["labels"]["test"], ks=(20,))
        out["raw_pixels"] = float(knn["top1"][20])
    return out


def main(argv: list[str] | None = None) -> int:
    from seer.data.tasks import TASKS
    from seer.demo import _stats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--name", default="learning", help="result name: benchmarks/results/NAME.{json,md}")
    ap.add_argument("--train", type=int, default=2000, help="train images per task")
    ap.add_argument("--test", type=int, default=500, help="test images per task")
    ap.add_argument("--set", dest="swav_set", nargs="*", default=[], help="overrides of the SwAV config")
    ap.add_argument("--sup-set", nargs="*", default=[], help="overrides of the supervised config")
    args = ap.parse_args(argv)
    settings = {"recipe": "tiny_cpu (seer.demo.recipe / supervised_overrides), 1 process, data.source=images",
                "steps": args.steps, "seeds": args.seeds, "n_train": args.train, "n_test": args.test,
                "swav_overrides": args.swav_set, "supervised_overrides": args.sup_set, "image_size": IMAGE_SIZE,
                "knn": "k=20, T=0.07, cosine, avgpool"}  # fmt: skip
    results: dict = {"settings": settings, "machine": machine_info(), "tasks": {}}
    rows = tuple(r for r in ROWS if r in args.rows)
    with tempfile.TemporaryDirectory(prefix="seer-learning-") as tmp:
        for task in args.tasks:
            runs = []
            for seed in args.seeds:
                print(f"[learning] {task}, seed {seed}", flush=True)
                runs.append(run(task, seed, args.steps, Path(tmp), args.swav_set, args.sup_set, args.train, args.test,
                                rows))  # fmt: skip
                print(f"[learning] {task}, seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[-1].items()),
                      flush=True)  # fmt: skip
            results["tasks"][task] = {"runs": runs, **{k: _stats([r[k] for r in runs]) for k in rows}}
    steps = args.steps or "the recipe's"
    lines = [
        "# Does the CPU recipe learn on small real images?",
        "",
        f"kNN top-1 (k=20) on each task's test split, mean ± std over seeds {args.seeds} (each seed its own task "
        f"images and training seed); {steps} steps of tiny_cpu (1 process); SwAV overrides "
        f"{args.swav_set or 'none'}; CPU {results['machine']['processor']}.",
        "",
        "| task | " + " | ".join(rows) + " | SwAV - random | SwAV / supervised | s / SwAV run |",
        "|---|" + "---|" * (len(rows) + 3),
    ]
    for task, v in results["tasks"].items():
        cells = [f"{100 * v[k]['mean']:.1f} ± {100 * v[k]['std']:.1f}" for k in rows]
        margin = (
            f"{100 * (v['swav']['mean'] - v['random_init']['mean']):+.1f}" if {"swav", "random_init"} <= set(v) else "-"
        )
        ratio = f"{100 * v['swav']['mean'] / v['supervised']['mean']:.0f}%" if {"swav", "supervised"} <= set(v) else "-"
        secs = f"{np.mean([r['swav_seconds'] for r in v['runs']]):.0f}" if "swav" in v else "-"
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {margin} | {ratio} | {secs} |")
    write_result(args.name, results, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
