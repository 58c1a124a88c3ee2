"""`seer demo` / `make demo`: the main job end to end on a CPU machine in a few minutes.

1. data      a synthetic shapes-and-textures dataset (seer.data.synthetic): the class is geometry only, colour and
             position are random, so raw-pixel kNN is weak; train and test images are JPEG image folders;
2. shards    the train folder written as webdataset tar shards (seer.data.shards.write_shards);
3. pretrain  a tiny RegNetY trained with SwAV on the shards, FSDP2 over 2 processes (torchrun, gloo), and the
             supervised ceiling: the same trunk, shards, augmentations and steps trained on the labels
             (``method: supervised``);
4. export    the trunk exported from the run directory (seer export) to a safetensors file;
5. features  seer.extract_features of train and test images, for the pretrained trunk and for the same trunk at
             random initialization;
6. evaluate  kNN (DINO protocol) and a linear probe (hyper-parameters selected on a split of train) for both;
7. report    DIR/report.md (settings, accuracy table, timings), loss.png, accuracy.png, results.json.

Fixed seeds throughout; `--out DIR` (default runs/demo) is wiped and rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from seer.extras import optional

# The demo trunk: 4 stages, widths 16-128 (0.1M parameters), fast on 2 cores at 32 px.
DEMO_TRUNK = {"depth": 6, "w0": 16, "wa": 16.0, "wm": 2.0, "group_w": 8}


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pretrain_overrides(out: Path, urls: str, steps: int, world_size: int, image_size: int, seed: int) -> dict:
    """The pretraining config of the demo, as overrides of seer.config defaults.

    Tuned for a tiny trunk and few steps on CPU: plain SGD at a high learning rate (LARS's 0.001 trust ratio moves
    weights by ~0.1% a step: right for 100k steps, far too slow for a few hundred), a small prototype set and
    sharper codes (epsilon 0.02, temperature 0.2), and the "demo" multi-crop (2x32 + 2x16, no blur).
    """
    return {
        "run_dir": str(out / "pretrain"),
        "model": {"preset": "regnety_200mf", "cfg": DEMO_TRUNK, "zero_init": False},
        "swav": {
            "head_dims": [256, 32],
            "n_prototypes": 64,
            "temperature": 0.2,
            "sinkhorn_iters": 3,
            "epsilon": 0.02,
            "freeze_prototypes_iters": 10,
            "queue_length": 0,
        },
        "data": {
            "source": "shards",
            "urls": urls,
            "multicrop": "demo",
            "global_batch_size": 64,
            "workers": 1,
            "shuffle_buffer": 500,
            "image_size": image_size,
        },
        "optim": {"name": "sgd", "base_lr": 3.2, "warmup_iters": 10, "weight_decay": 1e-6, "final_lr_ratio": 0.01},
        "train": {
            "total_steps": steps,
            "log_every": 20,
            "ckpt_every_steps": max(steps // 4, 10),
            "keep_last": 2,
            "seed": seed,
            "tensorboard": False,
        },
    }


# x global batch 64 / 256 = 0.03. Measured with SGD on a small dense RegNetY on the glyphs task (docs/swav.md): 0.1
# and more leave cross-entropy at ln C; the demo's supervised row trains at it.
SUPERVISED_BASE_LR = 0.12


def supervised_overrides(pretrain: dict, n_classes: int, out: Path) -> dict:
    """The supervised ceiling: the pretraining config with ``method: supervised``, same trunk, data, augmentations,
    steps and batch. Only the learning rate is its own (``SUPERVISED_BASE_LR``: cross-entropy does not train at
    SwAV's 0.8)."""
    cfg = yaml.safe_load(yaml.safe_dump(pretrain))  # a deep copy
    cfg["run_dir"] = str(out / "supervised")
    cfg["method"] = "supervised"
    cfg["supervised"] = {"n_classes": n_classes}
    cfg.pop("swav", None)
    cfg["optim"]["base_lr"] = SUPERVISED_BASE_LR
    return cfg


def _pretrain(cfg_path: Path, world_size: int, log_path: Path) -> None:
    if world_size > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
               "-m", "seer.cli", "pretrain", "--config", str(cfg_path)]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "seer.cli", "pretrain", "--config", str(cfg_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world_size))}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:  # tee: the user sees the throughput / ETA lines as they come
            log.write(line)
            if line.startswith("step ") or "error" in line.lower() or "Error" in line:
                print("    " + line.rstrip(), flush=True)
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"pretraining failed (exit {rc}); see {log_path}")


def _plot(out: Path, metrics: list[dict], table: dict) -> None:
    matplotlib = optional("matplotlib", "loss.png and accuracy.png")
    if matplotlib is None:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], marker="o", ms=3)
    ax.set(xlabel="step", ylabel="SwAV loss", title="Pretraining loss (2-process FSDP)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)

    names = list(table)
    cols = ["kNN top-1 (k=20)", "linear top-1"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [100 * table[name][c] if c in table[name] else np.nan for c in cols]
        bars = ax.bar(np.arange(len(cols)) + (i - (len(names) - 1) / 2) * width, vals, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(np.arange(len(cols)), cols)
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title="Frozen-feature accuracy on the test split")
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)


def run_demo(out: str | Path = "runs/demo", *, n_train_per_class: int = 200, n_test_per_class: int = 50,
             image_size: int = 32, steps: int = 600, world_size: int = 2, seed: int = 0) -> dict:  # fmt: skip
    """Run the whole pipeline into ``out`` and return the results dict (also written to results.json)."""
    import torch

    import seer
    from seer.data.shards import write_shards
    from seer.data.synthetic import CLASSES, write_image_folder
    from seer.evaluation import eval_knn, eval_linear
    from seer.models.regnet import RegNetCfg

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. data ------------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    train_dir = write_image_folder(out / "data" / "train", n_train_per_class, image_size, seed=seed)
    test_dir = write_image_folder(out / "data" / "test", n_test_per_class, image_size, seed=seed + 1)
    timings["data"] = time.perf_counter() - t
    _log(f"data: {n_train_per_class * len(CLASSES)} train / {n_test_per_class * len(CLASSES)} test images, "
         f"{image_size} px, {len(CLASSES)} classes -> {out / 'data'}")  # fmt: skip

    # 2. shards ----------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    index = write_shards(train_dir, out / "shards", prefix="train", max_samples_per_shard=250, shuffle=True,
                         seed=seed, progress=False)  # fmt: skip
    urls = str(out / "shards" / index["pattern"])
    timings["shards"] = time.perf_counter() - t
    _log(f"shards: {index['num_shards']} tar shards, {index['total']} samples -> {urls}")

    # 3. pretrain --------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    overrides = pretrain_overrides(out, urls, steps, world_size, image_size, seed)
    cfg_path = out / "pretrain.yaml"
    cfg_path.write_text(yaml.safe_dump(overrides, sort_keys=False))
    _log(f"pretrain: SwAV, {steps} steps, global batch 64, FSDP over {world_size} processes (config {cfg_path})")
    _pretrain(cfg_path, world_size, out / "pretrain.log")
    timings["pretrain"] = time.perf_counter() - t

    # 3b. the supervised ceiling: the same trunk, data, augmentations and steps, trained on the labels ------------
    t = time.perf_counter()
    sup = supervised_overrides(overrides, len(CLASSES), out)
    sup_path = out / "supervised.yaml"
    sup_path.write_text(yaml.safe_dump(sup, sort_keys=False))
    _log(f"supervised: the same trunk and {steps} steps on the labels (config {sup_path})")
    _pretrain(sup_path, world_size, out / "supervised.log")
    timings["supervised"] = time.perf_counter() - t

    # 4. export ----------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    trunk_path = out / "trunk.safetensors"
    from seer.weights.cli import cli_export

    for run, path in ((out / "pretrain", trunk_path), (out / "supervised", out / "supervised.safetensors")):
        if cli_export([str(run), str(path)]) != 0:
            raise RuntimeError(f"seer export of {run} failed")
    timings["export"] = time.perf_counter() - t
    _log(f"export: {trunk_path} ({trunk_path.stat().st_size / 1e6:.1f} MB), {out / 'supervised.safetensors'}")

    # 5. features --------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    train_files = sorted(train_dir.rglob("*.jpg"))
    test_files = sorted(test_dir.rglob("*.jpg"))
    y_train = np.array([CLASSES.index(p.parent.name) for p in train_files])
    y_test = np.array([CLASSES.index(p.parent.name) for p in test_files])
    pretrained = seer.load_trunk(trunk_path)
    torch.manual_seed(seed)
    random_init = seer.build_trunk(RegNetCfg(**DEMO_TRUNK))  # the pretraining's own initialization (same seed)
    trunks = {"SwAV pretrained": pretrained, "random init": random_init,
              "supervised": seer.load_trunk(out / "supervised.safetensors")}  # fmt: skip
    feats = {}
    prep = {"resolution": image_size, "crop_pct": 1.0}
    for name, trunk in trunks.items():
        feats[name] = (
            seer.extract_features(train_files, trunk, progress=False, **prep),
            seer.extract_features(test_files, trunk, progress=False, **prep),
        )
    timings["features"] = time.perf_counter() - t
    _log(f"features: {len(train_files)} + {len(test_files)} images x {len(trunks)} trunks, "
         f"{feats['SwAV pretrained'][0].shape[1]}-d")  # fmt: skip

    # 6. evaluate --------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    table, details = {}, {}
    for name, (f_train, f_test) in feats.items():
        knn = eval_knn(f_train, y_train, f_test, y_test, ks=(10, 20, 100, 200), temperature=0.07)
        linear = eval_linear(f_train, y_train, f_test, y_test, epochs=30, seed=seed)
        table[name] = {
            "kNN top-1 (k=20)": knn["top1"][20],
            "kNN top-5 (k=20)": knn["top5"][20],
            "linear top-1": linear["top1"],
            "linear top-5": linear["top5"],
        }
        details[name] = {"knn": knn, "linear": linear}
    timings["evaluate"] = time.perf_counter() - t

    # 7. report ----------------------------------------------------------------------------------------------------
    metrics = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines() if line]
    margin = table["SwAV pretrained"]["kNN top-1 (k=20)"] - table["random init"]["kNN top-1 (k=20)"]
    timings["total"] = time.perf_counter() - t_all
    raw = _raw_pixel_knn(train_files, y_train, test_files, y_test)
    _plot(out, metrics, {**table, "raw pixels": {"kNN top-1 (k=20)": raw}})
    results = {
        "table": table,
        "raw_pixel_knn_top1": raw,
        "knn_margin_points": 100 * margin,
        "timings_s": timings,
        "settings": {
            "trunk": DEMO_TRUNK,
            "pretrain_overrides": overrides,
            "supervised_overrides": sup,
            "n_train": len(train_files),
            "n_test": len(test_files),
            "image_size": image_size,
            "world_size": world_size,
            "seed": seed,
            "knn": {"k": 20, "temperature": 0.07, "metric": "cosine", "layer": "avgpool"},
            "linear": {"epochs": 30, "selection": "held-out 20% of train", "layer": "avgpool"},
        },
        "details": details,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    (out / "report.md").write_text(_report(results, metrics))
    _log(f"kNN top-1: pretrained {100 * table['SwAV pretrained']['kNN top-1 (k=20)']:.1f}% vs random init "
         f"{100 * table['random init']['kNN top-1 (k=20)']:.1f}% (margin {100 * margin:+.1f} points); "
         f"raw pixels {100 * raw:.1f}%")  # fmt: skip
    _log(f"report: {out / 'report.md'} (+ loss.png, accuracy.png, results.json) in {timings['total']:.0f} s")
    return results


def _raw_pixel_knn(train_files, y_train, test_files, y_test) -> float:
    """kNN on raw pixels, the baseline the dataset is built to defeat."""
    from PIL import Image

    from seer.evaluation import eval_knn

    def pixels(files):
        return np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).ravel() for f in files])

    return eval_knn(pixels(train_files), y_train, pixels(test_files), y_test, ks=(20,))["top1"][20]


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _report(results: dict, metrics: list[dict]) -> str:
    s, tm, tab = results["settings"], results["timings_s"], results["table"]
    cols = list(next(iter(tab.values())))
    lines = [
        "# seer demo report",
        "",
        f"SwAV pretraining of a tiny RegNetY ({s['trunk']}) on {s['n_train']} synthetic shapes-and-textures images "
        f"({s['image_size']} px, 10 classes), FSDP2 over {s['world_size']} CPU processes; frozen features scored "
        f"by kNN and a linear probe on {s['n_test']} held-out test images.",
        "",
        "## Accuracy (test split)",
        "",
        "| trunk | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
        *[f"| {name} | " + " | ".join(f"{100 * row[c]:.1f}%" for c in cols) + " |" for name, row in tab.items()],
        f"| raw pixels | {100 * results['raw_pixel_knn_top1']:.1f}% | | | |",
        "",
        f"**kNN top-1 margin of the pretrained trunk over random initialization: "
        f"{results['knn_margin_points']:+.1f} points.** The supervised row is the same trunk trained on the labels "
        "with the same data, augmentations and steps (supervised.yaml): the ceiling self-supervision is measured "
        "against.",
        "",
        "![accuracy](accuracy.png)",
        "",
        "## Pretraining",
        "",
        f"Loss {metrics[0]['loss']:.3f} at step {metrics[0]['step']} -> {metrics[-1]['loss']:.3f} at step "
        f"{metrics[-1]['step']}; {np.mean([m['images_per_sec'] for m in metrics]):.0f} images/s on average.",
        "",
        "![loss](loss.png)",
        "",
        "## Settings",
        "",
        "- kNN: k=20 (also 10, 100, 200 in results.json), temperature 0.07, cosine on L2-normalized avgpool features",
        f"- linear probe: {s['linear']['epochs']} epochs, SGD + cosine, learning rate grid selected on a held-out 20% "
        "of train, retrained on all of train, scored once on test",
        f"- seed {s['seed']}; the full pretraining config is in pretrain.yaml and pretrain/config.yaml",
        "",
        "## Timings",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in tm.items()],
        "",
    ]
    return "\n".join(lines)


def cli_main(argv: list[str]) -> int:
    """`seer demo [--out DIR] [--steps N] [--world-size N]`."""
    parser = argparse.ArgumentParser(prog="seer demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run_demo(args.out, n_train_per_class=args.train_per_class, n_test_per_class=args.test_per_class,
             image_size=args.image_size, steps=args.steps, world_size=args.world_size, seed=args.seed)  # fmt: skip
    return 0
