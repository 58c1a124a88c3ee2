"""Frozen-feature benchmark suites: datasets x protocols x checkpoints -> a markdown table, JSON and a plot.

    python eval/benchmark.py --suite configs/eval/small.yaml --out runs/eval-small
    python eval/benchmark.py --suite configs/eval/imagenet1k.yaml --set IMAGENET_DIR=/data/imagenet \\
        --checkpoint rg32=/ckpt/seer_rg32.safetensors --out runs/eval-in1k

A suite is YAML data (never code):

    name: my-suite
    features: {layers: [avgpool], batch_size: 64, num_workers: 4, device: auto}
    checkpoints:            # each: source (any checkpoint seer.load_trunk reads), or preset (+ init_seed) for a
      - name: rg32          # randomly initialised trunk, or kind: pixels (raw-pixel baseline)
        source: ${CKPT}
    datasets:               # each split: an image folder (class subfolders) or a webdataset shard pattern
      - name: imagenet1k
        train: ${IMAGENET_DIR}/train
        test: ${IMAGENET_DIR}/val
        resolution: 224     # eval transform: resize floor(r / crop_pct), center crop r, ImageNet mean/std
        crop_pct: 0.875
      - name: digits        # or generated here: generate: {kind: digits | shapes, ...}
        generate: {kind: digits, size: 32}
    protocols:              # kNN runs once per layer; linear / logreg probe all layers at once
      - {name: knn, ks: [10, 20, 100, 200], temperature: 0.07}
      - {name: knn, n_per_class: 5, n_tries: 5, ks: [1, 5], label: knn-5shot}
      - {name: linear, lrs: [0.01, 0.1, 1.0], head_types: [linear, bn], epochs: 30}
      - {name: logreg, Cs: [0.1, 1, 10], n_per_class: 5, label: logreg-5shot}

``${VAR}`` placeholders come from ``--set VAR=VALUE`` or the environment; a missing one is an error naming it.
Trunk features are extracted with ``seer.features.extract_dataset`` (chunked, resumable) into
``OUT/features/<checkpoint>/<dataset>/<split>/<layer>/``, pixel baselines into ``.../<split>.npz``; both are reused
by every protocol and by a re-run. Each protocol's full result (every setting) is stored in ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from seer.evaluation import eval_knn, eval_linear, write_json

PROTOCOLS = ("knn", "linear", "logreg")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# ----------------------------------------------------------------------------------------------------------------
# Suite loading
# ----------------------------------------------------------------------------------------------------------------
class SuiteError(ValueError):
    """A suite file is invalid: the message names the file, the entry and the problem."""


def _expand(value: Any, variables: Mapping[str, str], where: str, missing: set[str]) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            name = m.group(1)
            if name in variables:
                return variables[name]
            if name in os.environ:
                return os.environ[name]
            missing.add(name)
            return m.group(0)

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, variables, where, missing) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, variables, where, missing) for k, v in value.items()}
    return value


def load_suite(
    path: str | os.PathLike, variables: Mapping[str, str] | None = None, extra_checkpoints: list[str] | None = None
) -> dict:
    """Read and validate a suite YAML, expanding ``${VAR}`` placeholders (``variables`` first, then env)."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file not found: {path}")
    suite = yaml.safe_load(path.read_text()) or {}
    if not isinstance(suite, dict):
        raise SuiteError(f"{path}: a suite is a mapping with datasets, protocols and checkpoints")
    unknown = set(suite) - {"name", "description", "features", "checkpoints", "datasets", "protocols", "seed"}
    if unknown:
        raise SuiteError(f"{path}: unknown top-level keys {sorted(unknown)}")
    for spec in extra_checkpoints or []:
        name, sep, source = spec.partition("=")
        if not sep:
            raise SuiteError(f"--checkpoint expects NAME=PATH, got {spec!r}")
        suite.setdefault("checkpoints", [])
        suite["checkpoints"] = [c for c in suite["checkpoints"] if c.get("name") != name] + [
            {"name": name, "source": source}
        ]
    missing: set[str] = set()
    suite = _expand(suite, dict(variables or {}), str(path), missing)
    if missing:
        names = ", ".join(sorted(missing))
        raise SuiteError(
            f"{path} needs {names}: set the environment variable(s) or pass "
            + " ".join(f"--set {n}=..." for n in sorted(missing))
        )
    suite.setdefault("name", path.stem)
    suite.setdefault("features", {})
    for key in ("checkpoints", "datasets", "protocols"):
        if not isinstance(suite.get(key), list) or not suite[key]:
            raise SuiteError(f"{path}: '{key}' must be a non-empty list")
        for i, entry in enumerate(suite[key]):
            if not isinstance(entry, dict) or "name" not in entry:
                raise SuiteError(f"{path}: {key}[{i}] must be a mapping with a 'name'")
    for d in suite["datasets"]:
        if "generate" not in d and not ("train" in d and "test" in d):
            raise SuiteError(f"{path}: dataset {d['name']!r} needs 'train' and 'test' paths or 'generate'")
    for p in suite["protocols"]:
        if p["name"] not in PROTOCOLS:
            raise SuiteError(f"{path}: protocol {p['name']!r} is not one of {PROTOCOLS}")
    for c in suite["checkpoints"]:
        if not ({"source", "preset"} & set(c) or c.get("kind") == "pixels"):
            raise SuiteError(f"{path}: checkpoint {c['name']!r} needs 'source', 'preset' or 'kind: pixels'")
    return suite


# ----------------------------------------------------------------------------------------------------------------
# Generated datasets (the small suite runs anywhere)
# ----------------------------------------------------------------------------------------------------------------
def _write_png(img: np.ndarray | Any, path: Path) -> None:
    from PIL import Image

    (img if not isinstance(img, np.ndarray) else Image.fromarray(img)).save(path)


def generate_dataset(spec: Mapping[str, Any], root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a generated dataset as image folders ``root/{train,test}/<class>/*.png`` once; returns both paths.

    kinds: ``digits`` (scikit-learn's bundled 8x8 digits, upsampled to ``size`` RGB, stratified 70/30 split) and
    ``shapes`` (``seer.data.synthetic``: shapes and textures, ``n_train_per_class`` / ``n_test_per_class``).
    """
    kind = spec.get("kind")
    done = root / ".complete"
    train, test = root / "train", root / "test"
    if done.exists():
        return train, test
    size = int(spec.get("size", 32))
    tmp = Path(tempfile.mkdtemp(dir=root.parent if root.parent.exists() else None, prefix=f".{root.name}."))
    if kind == "digits":
        from PIL import Image
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        idx_tr, idx_te = train_test_split(
            np.arange(len(y)), test_size=float(spec.get("test_fraction", 0.3)), random_state=seed, stratify=y
        )
        for split, idx in (("train", idx_tr), ("test", idx_te)):
            for i in idx:
                d = tmp / split / f"digit{y[i]}"
                d.mkdir(parents=True, exist_ok=True)
                img = (
                    Image.fromarray((x[i].reshape(8, 8) * (255 / 16)).astype(np.uint8))
                    .resize((size, size), Image.BICUBIC)
                    .convert("RGB")
                )
                img.save(d / f"{i:05d}.png")
    elif kind == "shapes":
        from seer.data.synthetic import write_image_folder

        n_classes = int(spec.get("n_classes", 10))
        write_image_folder(tmp / "train", int(spec.get("n_train_per_class", 40)), size, seed, n_classes)
        write_image_folder(tmp / "test", int(spec.get("n_test_per_class", 15)), size, seed + 1, n_classes)
    else:
        raise SuiteError(f"unknown generated dataset kind {kind!r} (expected 'digits' or 'shapes')")
    (tmp / ".complete").write_text("ok\n")
    if root.exists():  # an incomplete earlier attempt
        import shutil

        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)
    return train, test


# ----------------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------------
def build_model(ckpt: Mapping[str, Any], device: torch.device) -> torch.nn.Module | None:
    """The frozen trunk of a checkpoint entry (None for the raw-pixel baseline)."""
    if ckpt.get("kind") == "pixels":
        return None
    if "source" in ckpt:
        from seer.weights import load_trunk

        trunk = load_trunk(ckpt["source"], preset=ckpt.get("preset"))
    else:
        from seer.models.regnet import build_trunk

        torch.manual_seed(int(ckpt.get("init_seed", 0)))
        trunk = build_trunk(ckpt["preset"])
    return trunk.to(device).eval()


def _batches(split_path: str, transform, batch_size: int, num_workers: int):
    """(images, labels, indices) batches of an image folder or a shard pattern, every sample once."""
    p = Path(split_path)
    if p.is_dir() and not any(p.glob("*.tar")):
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(str(p), transform=transform)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, shuffle=False)
        offset = 0
        for images, labels in loader:
            yield images, labels, torch.arange(offset, offset + len(labels))
            offset += len(labels)
        return
    from seer.data.shards import eval_loader

    urls = str(p / "*.tar") if p.is_dir() else split_path
    for images, labels, _keys, indices in eval_loader(urls, transform, batch_size=batch_size, num_workers=num_workers):
        yield images, labels, indices


def compute_features(
    model: torch.nn.Module | None,
    split_path: str,
    *,
    layers: list[str],
    resolution: int,
    crop_pct: float | None,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    pixel_size: int = 16,
    progress: bool = False,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features of every image of one split, in dataset order: ``({layer: [N, D] float32}, labels [N])``.

    A plain single-process loop, used for the pixel baseline (and for trunks when ``seer.features`` is missing);
    ``split_features`` sends trunks through ``seer.features.extract_dataset``. The pixel baseline (``model=None``)
    returns the normalized image average-pooled to ``pixel_size`` x ``pixel_size`` and flattened.
    """
    from seer.data.transforms import eval_transform
    from seer.evaluation.linear import trunk_features

    pcfg = getattr(model, "pretrained_cfg", None) or {}
    tf_kwargs = {k: pcfg[k] for k in ("mean", "std", "interpolation") if k in pcfg}
    transform = eval_transform(resolution, crop_pct=crop_pct, **tf_kwargs)
    feats: dict[str, list[np.ndarray]] = {}
    labels, order = [], []
    t0, n = time.perf_counter(), 0
    for images, y, idx in _batches(split_path, transform, batch_size, num_workers):
        if model is None:  # raw-pixel baseline: the normalized image, average-pooled to pixel_size, flattened
            out = {"pixels": torch.nn.functional.adaptive_avg_pool2d(images, pixel_size).flatten(1)}
        else:
            with torch.inference_mode():
                out = trunk_features(model, images.to(device), layers)
        for k, v in out.items():
            feats.setdefault(k, []).append(v.float().cpu().numpy())
        labels.append(np.asarray(y))
        order.append(np.asarray(idx))
        n += len(y)
        if progress:
            print(f"\r  {split_path}: {n} images, {n / (time.perf_counter() - t0):.0f} img/s", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    if not labels:
        raise ValueError(f"no images found in {split_path}")
    perm = np.argsort(np.concatenate(order), kind="stable")
    return {k: np.concatenate(v)[perm] for k, v in feats.items()}, np.concatenate(labels)[perm].astype(np.int64)


def _extract_dataset_available() -> bool:
    try:
        from seer.features import extract_dataset, load_feature_file  # noqa: F401
    except ImportError:
        return False
    return True


def split_features(
    model: torch.nn.Module | None,
    split_path: str,
    cache: Path,
    *,
    layers: list[str],
    resolution: int,
    crop_pct: float | None,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    pixel_size: int = 16,
    progress: bool = False,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features of one split, cached under ``cache``: trunks go through ``seer.features.extract_dataset`` (chunked,
    resumable, atomic; one directory per layer), the pixel baseline through ``compute_features``."""
    if model is None or not _extract_dataset_available():
        compute = functools.partial(
            compute_features,
            model,
            split_path,
            layers=layers,
            resolution=resolution,
            crop_pct=crop_pct,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            pixel_size=pixel_size,
            progress=progress,
        )
        return _cached_features(cache.with_suffix(".npz"), compute)
    import json
    import warnings

    from seer.features import extract_dataset, load_feature_file

    p = Path(split_path)
    source: Any = sorted(str(t) for t in p.glob("*.tar")) if p.is_dir() and any(p.glob("*.tar")) else split_path
    feats, labels = {}, None
    for layer in layers:
        out = cache / layer
        meta = out / "meta.json"
        if not (meta.is_file() and "merged" in json.loads(meta.read_text())):
            overrides = {"resolution": resolution} | ({"crop_pct": crop_pct} if crop_pct is not None else {})
            extract_dataset(
                source,
                out,
                model,
                layer=layer,
                batch_size=batch_size,
                device=device,
                dtype="float32",
                num_workers=num_workers,
                progress=progress,
                merge=True,
                **overrides,
            )
        data = load_feature_file(out, mmap=False)
        if data["skipped"]:
            warnings.warn(f"{split_path}: {len(data['skipped'])} unreadable inputs were skipped", stacklevel=2)
        feats[layer] = np.asarray(data["features"], dtype=np.float32)
        if labels is not None and not np.array_equal(labels, data["labels"]):
            raise RuntimeError(f"{cache}: layers {layers} disagree on the samples (re-extract with a clean cache)")
        labels = np.asarray(data["labels"], dtype=np.int64)
    if labels is not None and (labels < 0).any():
        raise ValueError(f"{split_path}: {(labels < 0).sum()} samples have no label (class subfolders needed)")
    return feats, labels


def _cached_features(path: Path, compute) -> tuple[dict[str, np.ndarray], np.ndarray]:
    if path.exists():
        with np.load(path) as z:
            return {k[len("feat_") :]: z[k] for k in z.files if k.startswith("feat_")}, z["labels"]
    feats, labels = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    np.savez(tmp, labels=labels, **{f"feat_{k}": v for k, v in feats.items()})
    os.replace(tmp, path)
    return feats, labels


# ----------------------------------------------------------------------------------------------------------------
# Running protocols
# ----------------------------------------------------------------------------------------------------------------
def _subsample(labels: np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = [
        rng.choice(np.flatnonzero(labels == c), size=min(n_per_class, int((labels == c).sum())), replace=False)
        for c in np.unique(labels)
    ]
    return np.sort(np.concatenate(rows))


def run_protocol(
    proto: Mapping[str, Any],
    train: dict[str, np.ndarray],
    ytr: np.ndarray,
    test: dict[str, np.ndarray],
    yte: np.ndarray,
    meta: dict,
    device: str,
) -> list[dict]:
    """One protocol entry on cached features -> result dicts (one per layer for kNN)."""
    opts = {k: v for k, v in proto.items() if k not in ("name", "label", "layers")}
    layers = proto.get("layers") or list(train)
    missing = [lay for lay in layers if lay not in train]
    if missing:
        layers = [lay for lay in layers if lay in train] or list(train)  # e.g. the pixel baseline has "pixels"
    label = proto.get("label", proto["name"])
    out = []
    if proto["name"] == "knn":
        for lay in layers:
            res = eval_knn(
                train[lay],
                ytr,
                test[lay],
                yte,
                device=device,
                metadata={**meta, "layer": lay, "protocol_label": label},
                **opts,
            )
            out.append(res)
        return out
    n_shot = opts.pop("n_per_class", None)
    n_tries = int(opts.pop("n_tries", 1))
    method = "sgd" if proto["name"] == "linear" else "logreg"
    tries = []
    for t in range(n_tries if n_shot else 1):
        rows = _subsample(ytr, int(n_shot), seed=t) if n_shot else np.arange(len(ytr))
        xs = {lay: train[lay][rows] for lay in layers}
        tries.append(
            eval_linear(
                xs,
                ytr[rows],
                {lay: test[lay] for lay in layers},
                yte,
                method=method,
                device=device,
                metadata={**meta, "protocol_label": label},
                **opts,
            )
        )
    res = tries[0]
    if len(tries) > 1:
        res = dict(res)
        res["top1"] = float(np.mean([r["top1"] for r in tries]))
        res["top5"] = float(np.mean([r["top5"] for r in tries]))
        res["tries"] = [
            {"seed": i, "top1": r["top1"], "top5": r["top5"], "selected": r["selected"]} for i, r in enumerate(tries)
        ]
    if n_shot:
        res["settings"] = {**res["settings"], "n_per_class": int(n_shot), "n_tries": len(tries)}
    return [res]


def _row(res: dict, suite: str) -> dict:
    meta = res["metadata"]
    if res.get("protocol") == "linear" or res["settings"].get("protocol") == "linear":
        top1, top5 = res["top1"], res["top5"]
        sel = res["selected"]
        detail = ", ".join(f"{k}={v}" for k, v in sel.items() if k in ("layer", "head", "lr", "C", "weight_decay"))
        layer = sel["layer"]
    else:
        k = 20 if 20 in res["top1"] else max(res["top1"])
        top1, top5 = res["top1"][k], res["top5"][k]
        detail = "; ".join(f"k={kk}: {100 * v:.1f}" for kk, v in res["top1"].items())
        layer = meta["layer"]
    return {
        "suite": suite,
        "dataset": meta["dataset"],
        "checkpoint": meta["checkpoint"],
        "protocol": meta["protocol_label"],
        "kind": "probe" if "selected" in res else "knn",
        "layer": layer,
        "top1": top1,
        "top5": top5,
        "detail": detail,
    }


def run_suite(suite: dict, out: str | os.PathLike, *, progress: bool = True) -> dict:
    """Run every (checkpoint, dataset, protocol); write results.json, results.md and results.png under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fcfg = suite["features"]
    dev_name = fcfg.get("device", "auto")
    device = torch.device(
        "cuda" if dev_name == "auto" and torch.cuda.is_available() else ("cpu" if dev_name == "auto" else dev_name)
    )
    layers = list(fcfg.get("layers", ["avgpool"]))
    results, rows = [], []
    t0 = time.perf_counter()
    for ckpt in suite["checkpoints"]:
        model = build_model(ckpt, device)
        for ds in suite["datasets"]:
            if "generate" in ds:
                train_path, test_path = generate_dataset(
                    ds["generate"], out / "data" / ds["name"], int(suite.get("seed", 0))
                )
            else:
                train_path, test_path = ds["train"], ds["test"]
            resolution = int(ds.get("resolution", fcfg.get("resolution", 224)))
            crop_pct = ds.get("crop_pct", fcfg.get("crop_pct"))
            split_feats = {}
            for split, path in (("train", train_path), ("test", test_path)):
                split_feats[split] = split_features(
                    model,
                    str(path),
                    out / "features" / ckpt["name"] / ds["name"] / split,
                    layers=layers,
                    resolution=resolution,
                    crop_pct=crop_pct,
                    batch_size=int(fcfg.get("batch_size", 64)),
                    num_workers=int(fcfg.get("num_workers", 0)),
                    device=device,
                    pixel_size=int(ckpt.get("size", 16)),
                    progress=progress,
                )
            (xtr, ytr), (xte, yte) = split_feats["train"], split_feats["test"]
            meta = {
                "suite": suite["name"],
                "dataset": ds["name"],
                "checkpoint": ckpt["name"],
                "checkpoint_source": str(ckpt.get("source", ckpt.get("preset", ckpt.get("kind")))),
                "resolution": resolution,
                "crop_pct": crop_pct,
                "train": str(train_path),
                "test": str(test_path),
            }
            for proto in suite["protocols"]:
                label = proto.get("label", proto["name"])
                if progress:
                    elapsed = time.perf_counter() - t0
                    print(f"[{elapsed:6.1f}s] {ckpt['name']} / {ds['name']} / {label}", file=sys.stderr)
                for res in run_protocol(proto, xtr, ytr, xte, yte, meta, str(device)):
                    results.append(res)
                    rows.append(_row(res, suite["name"]))
    payload = {"suite": suite, "rows": rows, "results": results, "seconds": time.perf_counter() - t0}
    write_json(payload, out / "results.json")
    _atomic_text(out / "results.md", markdown_table(rows, suite))
    plot(rows, out / "results.png", title=f"{suite['name']}: top-1")
    return payload


def markdown_table(rows: list[dict], suite: dict) -> str:
    lines = [
        f"# {suite['name']}",
        "",
        "| dataset | checkpoint | protocol | layer | top-1 | top-5 | details |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['checkpoint']} | {r['protocol']} | {r['layer']} | "
            f"{100 * r['top1']:.2f} | {100 * r['top5']:.2f} | {r['detail']} |"
        )
    lines += [
        "",
        "kNN rows show k = 20 (all ks in details); linear rows show the head selected on a held-out split "
        "of train. Every setting is in results.json.",
    ]
    return "\n".join(lines) + "\n"


def _series(r: dict) -> str:
    # kNN has one row per layer; probes report the layer chosen on held-out train data ("selected").
    return f"{r['checkpoint']} [{r['layer'] if r['kind'] == 'knn' else 'selected'}]"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars of top-1: one group per (dataset, protocol), one bar per checkpoint [layer]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["dataset"], r["protocol"]) for r in rows))
    series = list(dict.fromkeys(_series(r) for r in rows))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.9 * len(groups) + 2)), 4.2))
    for j, name in enumerate(series):
        vals = [
            next((100 * r["top1"] for r in rows if (r["dataset"], r["protocol"]) == g and _series(r) == name), math.nan)
            for g in groups
        ]
        ax.bar(np.arange(len(groups)) + j * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
    ax.set_xticklabels(["\n".join(g) for g in groups], fontsize=7)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True, help="suite YAML (configs/eval/*.yaml)")
    p.add_argument("--out", required=True, help="output directory (features cache, results.{json,md,png})")
    p.add_argument("--set", action="append", default=[], metavar="VAR=VALUE", help="value of a ${VAR} placeholder")
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="add (or replace) a checkpoint; repeatable",
    )
    p.add_argument("--only-dataset", action="append", default=[], help="run only these datasets")
    p.add_argument("--only-protocol", action="append", default=[], help="run only these protocol labels")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    variables = {}
    for item in args.set:
        k, sep, v = item.partition("=")
        if not sep:
            p.error(f"--set expects VAR=VALUE, got {item!r}")
        variables[k] = v
    try:
        suite = load_suite(args.suite, variables, args.checkpoint)
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.only_dataset:
        suite["datasets"] = [d for d in suite["datasets"] if d["name"] in args.only_dataset]
    if args.only_protocol:
        suite["protocols"] = [q for q in suite["protocols"] if q.get("label", q["name"]) in args.only_protocol]
    payload = run_suite(suite, args.out, progress=not args.quiet)
    print(markdown_table(payload["rows"], suite))
    print(f"wrote {args.out}/results.json, results.md, results.png in {payload['seconds']:.1f}s")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# One checkpoint x one dataset x one protocol (eval/knn.py, eval/linear.py)
# ----------------------------------------------------------------------------------------------------------------
def cached_features_cli(argv: list[str], module: str) -> int | None:
    """``eval/knn.py --features ...`` / ``eval/linear.py --features ...``: hand the other arguments to the
    cached-features CLI of ``module`` (``seer knn`` / ``seer linear``); ``None`` when ``--features`` is absent."""
    if "--features" not in argv:
        return None
    import importlib

    rest = list(argv)
    rest.remove("--features")
    return importlib.import_module(module).cli_main(rest)


def add_single_run_args(p: argparse.ArgumentParser) -> None:
    """The arguments eval/knn.py and eval/linear.py share: what to evaluate, on what, and where to write."""
    p.add_argument("--checkpoint", required=True, help="checkpoint file/dir/hub id, or a preset with --random-init")
    p.add_argument("--random-init", action="store_true", help="--checkpoint is a preset name: random weights")
    p.add_argument("--train", required=True, help="train image folder or shard pattern")
    p.add_argument("--test", required=True, help="test image folder or shard pattern")
    p.add_argument("--name", default="dataset")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--layers", nargs="+", default=["avgpool"])
    p.add_argument("--n-per-class", type=int, default=None, help="few-shot: train samples per class")
    p.add_argument("--tries", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="feature-extraction batch size")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)


def run_single(args: argparse.Namespace, proto: dict, kind: str) -> int:
    """Run one protocol for one checkpoint on one dataset as a one-row suite; print its table."""
    ckpt = {"name": Path(args.checkpoint).stem or args.checkpoint}
    ckpt.update({"preset": args.checkpoint} if args.random_init else {"source": args.checkpoint})
    if args.n_per_class:
        proto = {**proto, "n_per_class": args.n_per_class, "n_tries": args.tries}
    suite = {
        "name": f"{kind}-{args.name}",
        "features": {
            "layers": args.layers,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
            "device": args.device,
        },
        "checkpoints": [ckpt],
        "datasets": [
            {
                "name": args.name,
                "train": args.train,
                "test": args.test,
                "resolution": args.resolution,
                "crop_pct": args.crop_pct,
            }
        ],  # fmt: skip
        "protocols": [proto],
    }
    payload = run_suite(suite, args.out)
    print(markdown_table(payload["rows"], suite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
