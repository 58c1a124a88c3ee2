"""`seer demo` / `make demo`: the main job end to end on a CPU machine in about five minutes.

1. data      a real-image task the dependencies ship (``seer.data.tasks``, default ``digits``: scikit-learn's
             handwritten digits at random position and scale on 32 px canvases; train and test split the writers),
             written as PNG image folders;
2. shards    the train folder written as webdataset tar shards (seer.data.shards.write_shards);
3. pretrain  the ``tiny_cpu`` recipe (SwAV, a one-stage RegNetY) on the shards, once per seed, with the kNN monitor
             on the test folder; and the supervised ceiling: the same trunk, shards, augmentations and steps trained
             on the labels (``method: supervised``);
4. export    each trunk exported from its run directory (seer export) to a safetensors file;
5. features  seer.extract_features of train and test images for every trained trunk, and for the same trunk at
             random initialization (the pretraining's own seed);
6. evaluate  kNN (DINO protocol) and a linear probe (hyper-parameters selected on a split of train) for each, next to
             raw pixels;
7. report    DIR/report.md (settings, mean ± std table, the three learning criteria, timings), accuracy.png,
             loss.png, results.json.

`--minutes M` makes M the whole demo's wall-clock budget: 85% of it (``TRAIN_SHARE``) trains, split evenly over the
seeds, and each training run buys its steps from its own measured speed (``train.max_minutes``), so SwAV and the
supervised ceiling train for the same time, not the same steps. Without it (the default) each run trains the recipe's
600 steps, as before (278 s for the whole demo on 2 Intel Xeon cores, 556 s on 2 AMD EPYC cores).

Everything is seeded (with ``--minutes``, the step counts depend on the machine). `--out DIR` (default runs/demo)
must be new, empty, or the output of an earlier demo (marked by its .seer-output.json file), which is replaced; any
other non-empty directory is refused and left as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from seer.extras import optional
from seer.io import OutputDirError, clear_output_dir, mark_output_dir, prepare_output_dir
from seer.progress import progress

RECIPE = "tiny_cpu"
OUTPUT_KIND = "demo"  # the output marker's kind: a directory holding only a demo's output is replaced by the next
ROWS = ("SwAV pretrained", "random init", "raw pixels", "supervised")
METRICS = ("kNN top-1 (k=20)", "linear top-1")
# What "the features learn" means, on the kNN top-1 means: the margin over random init, raw pixels, and the
# fraction of the supervised ceiling the pretrained trunk reaches.
CRITERIA = {"min_margin_over_random_points": 20.0, "min_fraction_of_supervised": 0.8}
# x global batch 64 / 256 = 0.03: SGD on the tiny_cpu trunk, measured on the digits and glyphs tasks (docs/swav.md):
# 0.1 and more leave cross-entropy near ln C for hundreds of steps.
SUPERVISED_BASE_LR = 0.12
# `--minutes M`: the share of M the training runs get, split evenly over the seeds (a seed's SwAV and supervised runs
# side by side share it; one after the other, they halve it). The rest pays for what each run's train.max_minutes
# does not count: data, shards, the processes' start (imports), export, features and evaluation: about 31 s of
# 556 s in a default demo on 2 AMD EPYC cores (benchmarks/RESULTS.md), so 15% of a few minutes leaves a margin.
TRAIN_SHARE = 0.85


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def recipe(run_dir: str | os.PathLike, *, data: dict, steps: int | None = None, seed: int = 0,
           monitor_images: str | os.PathLike | None = None, minutes: float | None = None) -> dict:  # fmt: skip
    """The ``tiny_cpu`` recipe as a config dict, pointed at ``data`` (``data.*`` keys, e.g. ``{"source": "shards",
    "urls": ...}``) with ``run_dir``, ``seed``, ``steps`` (default: the recipe's) and, when given, the kNN monitor on
    a labeled folder. Every other setting is the recipe file's, so the demo trains exactly what
    ``seer pretrain --config tiny_cpu`` trains.

    ``minutes``: a time budget (``train.max_minutes``) instead of a step count: the run buys its length on this
    machine (``steps``, when given, caps it); the log, checkpoint and monitor cadences stay the recipe's."""
    from seer.catalog import resolve

    cfg = yaml.safe_load(resolve(RECIPE, "pretrain").read_text())
    recipe_steps = int(cfg["train"]["total_steps"])
    cap = int(steps or 0)
    steps = int(steps or recipe_steps) if minutes is None else recipe_steps  # the cadences' basis
    if (
        minutes is None and steps < recipe_steps
    ):  # a shorter run (a smoke test) keeps the schedule's shape: warmup and freeze shrink
        cfg["optim"]["warmup_iters"] = cfg["optim"]["warmup_iters"] * steps // recipe_steps
        if "swav" in cfg:
            cfg["swav"]["freeze_prototypes_iters"] = cfg["swav"]["freeze_prototypes_iters"] * steps // recipe_steps
    cfg["run_dir"] = str(run_dir)
    cfg["data"].update(data)
    log_every = max(1, min(50, steps // 6))
    cfg["train"].update(total_steps=steps, seed=seed, tensorboard=False, log_every=log_every,
                        ckpt_every_steps=max(10, steps // 3))  # fmt: skip
    if minutes is not None:
        cfg["train"].update(total_steps=cap, max_minutes=float(minutes))
    if monitor_images is not None:  # the monitor runs on log steps: three times a run, and at the end
        every = log_every * max(1, steps // 3 // log_every)
        cfg["train"].update(monitor_images=str(monitor_images), monitor_every=every, monitor_max_images=500)
    return cfg


def supervised_overrides(pretrain: dict, n_classes: int, run_dir: str | os.PathLike) -> dict:
    """The supervised ceiling: the pretraining config with ``method: supervised``, same trunk, data, augmentations,
    steps and batch. Only the learning rate is its own (``SUPERVISED_BASE_LR``: cross-entropy does not train at
    SwAV's)."""
    cfg = yaml.safe_load(yaml.safe_dump(pretrain))  # a deep copy
    cfg["run_dir"] = str(run_dir)
    cfg["method"] = "supervised"
    cfg["supervised"] = {"n_classes": n_classes}
    cfg.pop("swav", None)
    cfg["optim"]["base_lr"] = SUPERVISED_BASE_LR
    return cfg


def _length(train: dict) -> str:
    """A run's length as the log and the report say it: its steps, or its time budget."""
    if not train.get("max_minutes"):
        return f"{train['total_steps']} steps"
    cap = f", at most {train['total_steps']} steps" if train.get("total_steps") else ""
    return f"as many steps as train.max_minutes={train['max_minutes']:.3g} buys{cap}"


def _bought(ms: list[dict]) -> int | None:
    """The steps a run's time budget bought, from its metrics.jsonl records (None: a run of fixed length)."""
    return next((m["budget"]["total_steps"] for m in ms if "budget" in m), None)


def run_minutes(minutes: float, n_seeds: int, runs_per_seed: int, concurrent: int) -> float:
    """Each training run's ``train.max_minutes`` for a whole demo of ``minutes``: ``TRAIN_SHARE`` of it over the
    seeds, and over a seed's runs when fewer than all of them train at once."""
    if not (minutes > 0 and minutes < float("inf")):
        raise ValueError(f"--minutes must be a positive number of minutes, got {minutes}")
    rounds = -(-runs_per_seed // concurrent)  # a seed's runs, ``concurrent`` at a time
    return TRAIN_SHARE * minutes / (n_seeds * rounds)


def _start(cfg_path: Path, world_size: int, log_path: Path, threads: int, tag: str) -> tuple:
    """Start ``seer pretrain --config cfg_path`` (torchrun for ``world_size > 1``) with ``threads`` torch threads per
    process; a thread tees its output to ``log_path`` and echoes the step / monitor / collapse lines, tagged."""
    if world_size > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
               "-m", "seer.cli", "pretrain", "--config", str(cfg_path)]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "seer.cli", "pretrain", "--config", str(cfg_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def tee() -> None:
        with open(log_path, "w") as log:
            for line in proc.stdout:  # the user sees the throughput / ETA / monitor lines as they come
                log.write(line)
                if line.startswith(("step ", "monitor ", "collapse", "time budget")) or "rror" in line:
                    print(f"    [{tag}] {line.rstrip()}", flush=True)

    thread = threading.Thread(target=tee, daemon=True)
    thread.start()
    return proc, thread, log_path


def _train_all(jobs: list[tuple[Path, str]], world_size: int, log_dir: Path, concurrent: int) -> dict[str, float]:
    """Train each ``(config, tag)`` of ``jobs``, ``concurrent`` at a time, sharing the cores; seconds per tag."""
    cores = os.cpu_count() or 2
    threads = max(1, cores // (world_size * concurrent))
    seconds: dict[str, float] = {}
    for i in range(0, len(jobs), concurrent):
        t = time.perf_counter()
        started = [_start(cfg, world_size, log_dir / f"{cfg.stem}.log", threads, tag) for cfg, tag in
                   jobs[i : i + concurrent]]  # fmt: skip
        failed = []
        for (proc, thread, log_path), (_, tag) in zip(started, jobs[i : i + concurrent]):
            rc = proc.wait()
            thread.join()
            seconds[tag] = time.perf_counter() - t
            if rc != 0:
                failed.append(f"{tag} (exit {rc}; see {log_path})")
        if failed:
            raise RuntimeError("training failed: " + ", ".join(failed))
    return seconds


def raw_pixels(files: Sequence[str | os.PathLike]) -> np.ndarray:
    """The raw-pixel baseline's features: each image's RGB values, flattened, ``[N, H * W * 3]`` float32."""
    from PIL import Image

    def load(f):
        with Image.open(f) as img:
            return np.asarray(img.convert("RGB"), dtype=np.float32).ravel()

    return np.stack([load(f) for f in files])


def _evaluate(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, seed: int) -> dict:
    from seer.evaluation import eval_knn, eval_linear
    from seer.evaluation.knn import DEFAULT_KS

    ks = tuple(k for k in DEFAULT_KS if k <= len(train))  # a small --train has fewer neighbours (k=20 is kept)
    # progress=None: the search's and the probe's progress (rate, ETA) when they are long enough to need it
    knn = eval_knn(train, y_train, test, y_test, ks=ks, temperature=0.07, progress=None)
    linear = eval_linear(train, y_train, test, y_test, epochs=30, seed=seed, progress=None)
    return {"scores": {METRICS[0]: knn["top1"][20], METRICS[1]: linear["top1"]}, "knn": knn, "linear": linear}


def _stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": [float(v) for v in values]}


def _cell(stats: dict) -> str:
    """An accuracy in the report: ``mean ± std%`` over several values; one value alone, with no spread (a single
    seed, or the deterministic raw pixels, measures none: "± 0.0" would claim a spread of zero)."""
    if len(stats["values"]) > 1:
        return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}%"
    return f"{100 * stats['mean']:.1f}%"


def _over_seeds(n: int) -> str:
    """What the accuracies are, in words: ``mean ± std over 3 seeds`` or ``one seed, no spread``."""
    return f"mean ± std over {n} seeds" if n > 1 else "one seed, no spread"


def _criteria(table: dict) -> dict:
    """The three learning criteria on the kNN top-1 means: margin over random init, over raw pixels, and the
    fraction of the supervised ceiling."""
    knn = {row: table[row][METRICS[0]]["mean"] for row in ROWS if row in table}
    margin = 100 * (knn["SwAV pretrained"] - knn["random init"])
    out = {
        "knn_margin_over_random_points": margin,
        "knn_margin_over_raw_pixels_points": 100 * (knn["SwAV pretrained"] - knn["raw pixels"]),
        "passed": {
            f"margin over random init >= {CRITERIA['min_margin_over_random_points']:g} points": bool(
                margin >= CRITERIA["min_margin_over_random_points"]
            ),
            "above raw pixels": bool(knn["SwAV pretrained"] > knn["raw pixels"]),
        },
    }
    if "supervised" in knn:
        frac = knn["SwAV pretrained"] / max(knn["supervised"], 1e-9)
        out["fraction_of_supervised"] = frac
        out["passed"][f">= {100 * CRITERIA['min_fraction_of_supervised']:.0f}% of supervised"] = bool(
            frac >= CRITERIA["min_fraction_of_supervised"]
        )
    return out


def _output_names(seeds: Sequence[int]) -> list[str]:
    """What a demo writes in its output directory (the marker's list: the next demo removes these, nothing else)."""
    return ["data", "shards", *(f"seed{s}" for s in seeds), "results.json", "report.md", "loss.png", "accuracy.png"]


def run_demo(out: str | Path = "runs/demo", *, task: str = "digits", n_train: int = 2000, n_test: int = 500,
             steps: int | None = None, seeds: Sequence[int] = (0, 1, 2), world_size: int = 1,
             image_size: int = 32, supervised: bool = True, minutes: float | None = None) -> dict:  # fmt: skip
    """Run the whole pipeline into ``out`` and return the results dict (also written to results.json).

    ``task`` is one of ``seer.data.tasks.TASKS``; ``steps`` defaults to the recipe's; ``minutes``: the whole demo's
    wall-clock budget instead, each training run's length bought from it (``run_minutes``; ``steps`` then caps it);
    each seed pretrains (and, with
    ``supervised``, trains the ceiling) once, on the same data; ``world_size > 1`` trains under FSDP over that many
    processes (slower on 2 cores: it shows the distributed path, not speed).

    ``out`` must be new, empty, or an earlier demo's output (its ``.seer-output.json`` marker lists what it wrote),
    which is replaced; any other non-empty directory raises ``seer.io.OutputDirError`` before anything is written.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("run_demo: seeds is empty; give at least one")
    cores = os.cpu_count() or 2
    # SwAV and the supervised ceiling of a seed train side by side when the cores allow: a tiny trunk gains less
    # from a second thread than from a second process (its data pipeline is single-threaded).
    concurrent = 2 if supervised and cores >= 2 * world_size else 1
    per_run = None if minutes is None else run_minutes(minutes, len(seeds), 1 + supervised, concurrent)
    if n_train < 20 or n_test < 1:  # kNN at k=20 needs 20 train images
        raise ValueError(f"run_demo: needs n_train >= 20 and n_test >= 1, got n_train={n_train}, n_test={n_test}")
    out = Path(out).expanduser()
    # Checked before any work: never a directory of the user's; an earlier demo's output only loses what it wrote.
    if prepare_output_dir(out, kind=OUTPUT_KIND, what="demo output directory", flag=None) == "own":
        clear_output_dir(out, OUTPUT_KIND)
    out.mkdir(parents=True, exist_ok=True)
    # Marked before the first file: a demo killed half-way is still recognised (and replaced) by the next one.
    mark_output_dir(out, OUTPUT_KIND, _output_names(seeds))

    import torch

    import seer
    from seer import hardware
    from seer.config import load_config, trunk_cfg
    from seer.data.shards import write_shards
    from seer.data.tasks import write_task
    from seer.weights.cli import cli_export

    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. data ------------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    data = write_task(task, out / "data", n_train=n_train, n_test=n_test, size=image_size, seed=0)
    classes = data["classes"]
    (train_files, y_train), (test_files, y_test) = data["files"]["train"], data["files"]["test"]
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    test_dir = out / "data" / "test"
    timings["data"] = time.perf_counter() - t
    _log(f"data: task {task!r}, {len(train_files)} train / {len(test_files)} test images, {image_size} px, "
         f"{len(classes)} classes -> {out / 'data'}")  # fmt: skip

    # 2. shards ----------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    index = write_shards(out / "data" / "train", out / "shards", prefix="train", max_samples_per_shard=500,
                         shuffle=True, seed=0, progress=False)  # fmt: skip
    urls = str(out / "shards" / index["pattern"])
    timings["shards"] = time.perf_counter() - t
    _log(f"shards: {index['num_shards']} tar shards, {index['total']} samples -> {urls}")

    # 3-6. per seed: pretrain, supervised, export, features, evaluate ------------------------------------------------
    raw_train, raw_test = raw_pixels(train_files), raw_pixels(test_files)
    runs: dict[str, list[dict]] = {row: [] for row in ROWS if supervised or row != "supervised"}
    configs, metrics = {}, {}
    prep = {"resolution": image_size, "crop_pct": 1.0}
    for stage in ("train", "export", "features", "evaluate"):
        timings[stage] = 0.0
    for seed in seeds:
        run = out / f"seed{seed}"
        run.mkdir()
        t = time.perf_counter()
        cfg = recipe(run / "pretrain", data={"source": "shards", "urls": urls}, steps=steps, seed=seed,
                     monitor_images=test_dir, minutes=per_run)  # fmt: skip
        (run / "pretrain.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        configs.setdefault("pretrain", cfg)
        trained = {"SwAV pretrained": run / "pretrain"}
        jobs = [(run / "pretrain.yaml", f"swav s{seed}")]
        if supervised:
            sup = supervised_overrides(cfg, len(classes), run / "supervised")
            (run / "supervised.yaml").write_text(yaml.safe_dump(sup, sort_keys=False))
            configs.setdefault("supervised", sup)
            trained["supervised"] = run / "supervised"
            jobs.append((run / "supervised.yaml", f"supervised s{seed}"))
        same = "time" if minutes else "steps"  # with --minutes each run buys its own steps in the same time
        _log(
            f"seed {seed}: SwAV ({RECIPE} recipe)" + (f" and the supervised ceiling (same trunk, data, {same})" if
            supervised else "") + f", {_length(cfg['train'])}, global batch "
            f"{cfg['data']['global_batch_size']}, {world_size} process(es) each, {concurrent} at a time"
        )  # fmt: skip
        for tag, sec in _train_all(jobs, world_size, run, concurrent).items():
            timings[f"train {tag}"] = sec
        timings["train"] += time.perf_counter() - t

        t = time.perf_counter()
        trunks = {}
        for name, run_dir in trained.items():
            path = run / f"{run_dir.name}.safetensors"
            if cli_export([str(run_dir), str(path)]) != 0:
                raise RuntimeError(f"seer export of {run_dir} failed")
            trunks[name] = seer.load_trunk(path)
        torch.manual_seed(seed)
        trunks["random init"] = seer.build_trunk(trunk_cfg(load_config(str(run / "pretrain.yaml")).model))
        timings["export"] += time.perf_counter() - t

        t = time.perf_counter()
        feats = {name: (seer.extract_features(train_files, trunk, progress=False, **prep),
                        seer.extract_features(test_files, trunk, progress=False, **prep))
                 for name, trunk in trunks.items()}  # fmt: skip
        feats["raw pixels"] = (raw_train, raw_test)
        timings["features"] += time.perf_counter() - t

        t = time.perf_counter()
        todo = [name for name in runs if not (name == "raw pixels" and runs[name])]  # raw pixels: scored once
        with progress(len(todo), f"seed {seed}: kNN and linear probe", "feature set") as bar:
            for name in todo:
                f_train, f_test = feats[name]
                runs[name].append(_evaluate(f_train, y_train, f_test, y_test, seed=seed))
                bar.update(1)
        timings["evaluate"] += time.perf_counter() - t
        metrics[seed] = {name: _read_metrics(d / "metrics.jsonl") for name, d in trained.items()}
        _log(f"seed {seed}: kNN top-1 " + ", ".join(f"{name} {100 * runs[name][-1]['scores'][METRICS[0]]:.1f}%"
                                                    for name in runs))  # fmt: skip

    # 7. report ----------------------------------------------------------------------------------------------------
    table = {name: {m: _stats([r["scores"][m] for r in rs]) for m in METRICS} for name, rs in runs.items()}
    criteria = _criteria(table)
    timings["total"] = time.perf_counter() - t_all
    results = {
        "task": task,
        "seeds": seeds,
        "table": table,
        "criteria": criteria,
        "knn_margin_points": criteria["knn_margin_over_random_points"],
        "timings_s": timings,
        "settings": {
            "recipe": RECIPE,
            "pretrain_config": configs["pretrain"],
            "supervised_config": configs.get("supervised"),
            "task": task,
            "classes": classes,
            "n_train": len(train_files),
            "n_test": len(test_files),
            "image_size": image_size,
            "world_size": world_size,
            "concurrent_runs": concurrent,
            # --minutes: the whole demo's budget, each run's train.max_minutes, and what each run bought
            "minutes": minutes,
            "run_minutes": per_run,
            "train_share": TRAIN_SHARE if minutes is not None else None,
            "steps_bought": {seed: {name: _bought(ms) for name, ms in runs.items()} for seed, runs in metrics.items()}
            if minutes is not None
            else None,
            "seeds": seeds,
            "data_seed": 0,
            "knn": {"k": 20, "temperature": 0.07, "metric": "cosine", "layer": "avgpool"},
            "linear": {"epochs": 30, "selection": "held-out 20% of train", "layer": "avgpool"},
            "machine": hardware.cpu_info(),
        },
        "details": {name: [{"knn": r["knn"], "linear": r["linear"]} for r in rs] for name, rs in runs.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    _plot(out, metrics, table)
    (out / "report.md").write_text(_report(results, metrics))
    knn = {name: table[name][METRICS[0]] for name in table}
    _log(f"kNN top-1 ({_over_seeds(len(seeds))}): " + ", ".join(f"{n} {_cell(v)}" for n, v in knn.items()))
    _log("criteria: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in criteria["passed"].items()))
    _log(f"report: {out / 'report.md'} (+ accuracy.png, loss.png, results.json) in {timings['total']:.0f} s")
    return results


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _plot(out: Path, metrics: dict, table: dict) -> None:
    matplotlib = optional("matplotlib", "loss.png and accuracy.png")
    if matplotlib is None:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for k, (seed, runs) in enumerate(metrics.items()):  # a colour per seed, a line style per method
        for name, ms in runs.items():
            style = {"color": f"C{k}", "linestyle": "-" if name == "SwAV pretrained" else "--"}
            if name == "SwAV pretrained":
                axes[0].plot([m["step"] for m in ms], [m["loss"] for m in ms], **style, label=f"seed {seed}")
            mon = [m for m in ms if "monitor_knn_top1" in m]
            axes[1].plot([m["step"] for m in mon], [100 * m["monitor_knn_top1"] for m in mon], **style, marker="o",
                         ms=3, label=f"{name}, seed {seed}")  # fmt: skip
    axes[0].set(xlabel="step", ylabel="SwAV loss", title="Pretraining loss")
    axes[1].set(xlabel="step", ylabel="kNN top-1 (%)", title="kNN monitor on the test folder", ylim=(0, 100))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)

    names = list(table)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        x = np.arange(len(METRICS)) + (i - (len(names) - 1) / 2) * width
        means = [100 * table[name][m]["mean"] for m in METRICS]
        spread = [len(table[name][m]["values"]) > 1 for m in METRICS]  # one value: no error bar, no "± 0.0"
        stds = [100 * table[name][m]["std"] if s else 0.0 for m, s in zip(METRICS, spread)]
        bars = ax.bar(x, means, width, yerr=stds, capsize=3 * any(spread), label=name)
        labels = [f"{m:.1f}±{sd:.1f}" if s else f"{m:.1f}" for m, sd, s in zip(means, stds, spread)]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
        for j, m in enumerate(METRICS):  # every seed as a dot: the spread behind the error bar
            vals = [100 * v for v in table[name][m]["values"]]
            ax.scatter(np.full(len(vals), x[j]), vals, s=8, color="black", zorder=3)
    ax.set_xticks(np.arange(len(METRICS)), METRICS)
    n_seeds = max(len(table[n][METRICS[0]]["values"]) for n in names)
    title = f"Frozen features on the test split ({_over_seeds(n_seeds)})"
    ax.set(ylabel="accuracy (%)", ylim=(0, 105), title=title)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)


def _report(results: dict, metrics: dict) -> str:
    s, tm, tab, crit = results["settings"], results["timings_s"], results["table"], results["criteria"]
    p = s["pretrain_config"]
    seeds = ", ".join(map(str, s["seeds"]))
    spread = "" if len(s["seeds"]) > 1 else " One seed only: no spread is measured (`--seeds 0 1 2` measures it)."
    losses = [runs["SwAV pretrained"] for runs in metrics.values()]
    lines = [
        "# seer demo report",
        "",
        f"SwAV pretraining with the `{s['recipe']}` recipe (RegNetY {p['model']['cfg']}) on the `{s['task']}` task: "
        f"{s['n_train']} train images, {s['image_size']} px, {len(s['classes'])} classes, streamed from webdataset "
        f"shards; {_length(p['train'])} at global batch {p['data']['global_batch_size']} on "
        f"{s['world_size']} process(es), seeds {seeds}. Frozen avgpool features are scored by kNN and a linear probe "
        f"on {s['n_test']} held-out test images.{spread}",
        "",
        f"## Accuracy (test split, {_over_seeds(len(s['seeds']))})",
        "",
        "| features | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
        *[f"| {name} | " + " | ".join(_cell(row[m]) for m in METRICS) + " |" for name, row in tab.items()],
        "",
        f"**kNN top-1 margin of the pretrained trunk over random init: {crit['knn_margin_over_random_points']:+.1f} "
        f"points; over raw pixels: {crit['knn_margin_over_raw_pixels_points']:+.1f} points"
        + (
            f"; {100 * crit['fraction_of_supervised']:.0f}% of the supervised ceiling"
            if "fraction_of_supervised" in crit
            else ""
        )
        + ".**",
        "",
        *[f"- {name}: {'yes' if ok else '**no**'}" for name, ok in crit["passed"].items()],
        "",
        "Random init is the same trunk at the seed's initialization, never trained. Raw pixels are the images' RGB "
        "values (deterministic: one figure). The supervised row is the same trunk trained on the labels with the "
        "same shards, augmentations and steps (seed*/supervised.yaml): the ceiling self-supervision is measured "
        "against.",
        "",
        "![accuracy](accuracy.png)",
        "",
        "## Pretraining",
        "",
        *[
            f"- seed {seed}: loss {ms[0]['loss']:.3f} at step {ms[0]['step']} -> {ms[-1]['loss']:.3f} at step "
            f"{ms[-1]['step']}; {np.mean([m['images_per_sec'] for m in ms]):.0f} images/s; kNN monitor "
            + " -> ".join(f"{100 * m['monitor_knn_top1']:.1f}%" for m in ms if "monitor_knn_top1" in m)
            for seed, ms in zip(s["seeds"], losses)
        ],  # fmt: skip
        "",
        *(
            [
                "",
                f"Time budget: `--minutes {s['minutes']:g}` for the whole demo; {100 * s['train_share']:.0f}% of it "
                f"for training, split over {len(s['seeds'])} seed(s): train.max_minutes={s['run_minutes']:.3g} per "
                f"run ({s['concurrent_runs']} run(s) at a time). Steps bought: "
                + "; ".join(
                    f"seed {seed}: " + ", ".join(f"{n} {b}" for n, b in runs.items())
                    for seed, runs in s["steps_bought"].items()
                )  # fmt: skip
                + ".",
            ]
            if s.get("minutes") is not None
            else []
        ),
        "",
        "![loss](loss.png)",
        "",
        "## Settings",
        "",
        "- kNN: k=20 (also 10, 100, 200 in results.json), temperature 0.07, cosine on L2-normalized avgpool features",
        f"- linear probe: {s['linear']['epochs']} epochs, SGD + cosine, learning rate grid selected on a held-out 20% "
        "of train, retrained on all of train, scored once on test",
        f"- the full configs are seed*/pretrain.yaml and seed*/supervised.yaml; CPU: {s['machine']['cpu_model']} "
        f"({s['machine']['cores']} cores, {s['machine']['cpu_capability']}); torch {s['machine']['torch']}",
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
    """`seer demo [--out DIR] [--task NAME] [--seeds S ...] [--steps N] [--minutes M] [--world-size N]`."""
    from seer.data.tasks import TASKS

    parser = argparse.ArgumentParser(prog="seer demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--out",
        default="runs/demo",
        help="output directory (default: runs/demo): new, empty, or an earlier demo's output, which is replaced; "
        "any other non-empty directory is refused and left untouched",
    )
    parser.add_argument("--task", default="digits", choices=sorted(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per training run (default: the tiny_cpu recipe's 600); with --minutes, a cap",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help=f"the whole demo's wall-clock budget: {100 * TRAIN_SHARE:.0f}%% of it trains, split over the seeds, "
        "each run buying its steps from its measured speed (train.max_minutes); default: none, the recipe's steps",
    )
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--train", type=int, default=2000, help="train images")
    parser.add_argument("--test", type=int, default=500, help="test images")
    parser.add_argument("--no-supervised", action="store_true", help="skip the supervised ceiling")
    args = parser.parse_args(argv)
    if args.minutes is not None and not 0 < args.minutes < float("inf"):
        parser.error(f"--minutes must be a positive number of minutes, got {args.minutes}")
    if args.train < 20 or args.test < 1:  # run_demo's own check names its arguments; here, the flags
        parser.error(f"needs --train >= 20 (kNN at k=20) and --test >= 1, got --train {args.train} --test {args.test}")
    try:
        run_demo(args.out, task=args.task, n_train=args.train, n_test=args.test, steps=args.steps, seeds=args.seeds,
                 world_size=args.world_size, supervised=not args.no_supervised, minutes=args.minutes)  # fmt: skip
    except OutputDirError as exc:  # refused before any work: the directory is as it was
        print(f"seer demo: {exc}", file=sys.stderr)
        return 2
    return 0
