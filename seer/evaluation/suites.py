"""Frozen-feature benchmark suites: datasets x protocols x checkpoints -> a markdown table, JSON and a plot.

    seer eval-suite --suite small --out runs/eval-small
    seer eval-suite --suite imagenet1k --set IMAGENET_DIR=/data/imagenet \\
        --checkpoint rg32=/ckpt/seer_rg32.safetensors --out runs/eval-in1k

``--suite`` takes a shipped suite's name (``seer.catalog.available("eval")``) or a yaml file. A suite is YAML data
(never code):

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

``${VAR}`` placeholders come from ``--set VAR=VALUE`` or the environment (names are case-sensitive); a missing one,
and a ``--set`` the suite does not use, are errors naming them. ``--checkpoint NAME=PATH`` (repeatable) replaces a
checkpoint entry whose source is only a placeholder (the shipped suites' ``source: ${SEER_CHECKPOINT}``) unless a
``--set`` fills it, and an entry named ``NAME``; it is added to the others.
Features are extracted with ``seer.features.extract_dataset`` into ``OUT/features/<checkpoint>/<dataset>/<split>/
<layer>/`` (``seer.evaluation.cache``) and reused by every protocol and by a re-run; generated datasets are written
to ``OUT/data``. Each protocol's full result (every setting) is stored in ``OUT/results.json``.

``OUT`` is new, empty, or an earlier suite's output (marked by ``OUT/.seer-output.json``; its features are reused);
any other non-empty directory is refused unless ``--overwrite`` is given, and then seer writes its own files
(``features/``, ``data/``, ``launch/``, ``results.*``) beside the others and deletes nothing. A directory holding a
checkpoint or a dataset of the suite is always refused.

The same suite runs in one process (``run_suite``) or sliced into job arrays by ``seer launch eval``
(``plan_tasks``, ``task_record_path``, ``collect``).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
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

from seer.io import (
    OutputDirError,
    atomic_write,
    claim_output_files,
    honour_umask,
    mark_output_dir,
    prepare_output_dir,
)
from seer.logs import configure_logging

__all__ = [
    "PROTOCOLS",
    "SuiteError",
    "load_suite",
    "parse_variables",
    "select",
    "protocol_label",
    "generate_dataset",
    "suite_device",
    "split_kwargs",
    "feature_cache",
    "protocol_meta",
    "run_protocol",
    "result_row",
    "run_suite",
    "EVAL_OUTPUT_KIND",
    "check_output_dir",
    "mark_output",
    "suite_sources",
    "markdown_table",
    "plot",
    "write_outputs",
    "plan_tasks",
    "slug",
    "task_record_path",
    "collect",
    "add_suite_args",
    "suite_from_args",
    "main",
]

PROTOCOLS = ("knn", "linear", "logreg")
PLOTS_EXTRA = 'pip install "seer-ssl[plots]"'
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOP_KEYS = {"name", "description", "features", "checkpoints", "datasets", "protocols", "seed"}


# ----------------------------------------------------------------------------------------------------------------
# The suite language
# ----------------------------------------------------------------------------------------------------------------
class SuiteError(ValueError):
    """A suite file is invalid: the message names the file, the entry and the problem."""


def _expand(value: Any, variables: Mapping[str, str], missing: set[str], used: set[str]) -> Any:
    """``value`` with every ``${VAR}`` replaced (``variables`` first, then the environment); the names found go to
    ``used``, the ones neither gives to ``missing``."""
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            name = m.group(1)
            used.add(name)
            if name in variables:
                return variables[name]
            if name in os.environ:
                return os.environ[name]
            missing.add(name)
            return m.group(0)

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, variables, missing, used) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, variables, missing, used) for k, v in value.items()}
    return value


def _placeholder_source(entry: Any) -> str | None:
    """``VAR`` when a checkpoint entry's ``source`` is a ``${VAR}`` placeholder and nothing else."""
    source = entry.get("source") if isinstance(entry, dict) else None
    match = _VAR.fullmatch(source) if isinstance(source, str) else None
    return match.group(1) if match else None


def _add_checkpoints(listed: Any, extra: list, variables: Mapping[str, str]) -> Any:
    """The suite's checkpoints with ``--checkpoint`` entries (``NAME=PATH`` strings or ``{name, source}`` dicts).

    An entry whose source is only a placeholder no ``--set`` fills (``source: ${SEER_CHECKPOINT}``: "the checkpoint
    you evaluate") is replaced by them; an entry of the same name is replaced; the others stay, the new ones follow.
    """
    if not extra:
        return listed
    entries = []
    for spec in extra:
        if isinstance(spec, Mapping):
            entries.append(dict(spec))
            continue
        name, sep, source = str(spec).partition("=")
        if not sep or not name or not source:
            raise SuiteError(f"--checkpoint expects NAME=PATH, got {spec!r}")
        entries.append({"name": name, "source": source})
    names = {e["name"] for e in entries}
    kept = [
        c
        for c in (listed if isinstance(listed, list) else [])
        if not (isinstance(c, dict) and (c.get("name") in names or _placeholder_source(c) not in (None, *variables)))
    ]
    return kept + entries


def _close(name: str, candidates: list[str]) -> str | None:
    """The candidate ``name`` was probably meant as: the same letters in another case first, else a close spelling."""
    same = [c for c in candidates if c.lower() == name.lower()]
    if same:
        return same[0]
    import difflib

    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.7)
    return close[0] if close else None


def _missing_message(path: Path, missing: list[str], slots: set[str], variables: Mapping[str, str]) -> str:
    fills = []
    for name in missing:
        fill = f"--set {name}=..."
        if name in slots:  # the suite's "your checkpoint" entry: --checkpoint NAME=PATH replaces it
            fill += " (or --checkpoint NAME=PATH)"
        fills.append(fill)
    text = (f"{path}: {', '.join('${' + n + '}' for n in missing)} not set: pass {' '.join(fills)}, or export "
            f"{'it as an environment variable' if len(missing) == 1 else 'them as environment variables'}")  # fmt: skip
    for name in missing:
        given = _close(name, list(variables))
        if given is not None:
            case = " (placeholder names are case-sensitive)" if given.lower() == name.lower() else ""
            text += f"; --set {given}=... does not fill ${{{name}}}{case}: did you mean --set {name}=...?"
    return text


def _unused_message(path: Path, unused: list[str], used: list[str]) -> str:
    has = f"its placeholders: {', '.join(used)}" if used else "it has no placeholders"
    text = f"{path}: --set {', '.join(unused)}: no such ${{VAR}} placeholder in the suite ({has})"
    for name in unused:
        meant = _close(name, used)
        if meant is not None:
            case = " (placeholder names are case-sensitive)" if meant.lower() == name.lower() else ""
            text += f"; did you mean --set {meant}=...{case}?"
    return text


def parse_variables(items: list[str]) -> dict[str, str]:
    """``--set VAR=VALUE`` arguments -> ``{VAR: VALUE}``."""
    variables = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SuiteError(f"--set expects VAR=VALUE, got {item!r}")
        variables[key] = value
    return variables


def protocol_label(proto: Mapping[str, Any]) -> str:
    """A protocol entry's name in the table (its ``label``, else its ``name``)."""
    return str(proto.get("label", proto["name"]))


def load_suite(
    path: str | os.PathLike, variables: Mapping[str, str] | None = None, extra_checkpoints: list[str] | None = None
) -> dict:
    """Read and validate a suite (a shipped suite's name or a yaml file), expanding ``${VAR}`` placeholders
    (``variables`` first, then the environment).

    ``extra_checkpoints`` (``--checkpoint NAME=PATH``, or ``{"name", "source"}`` dicts) replace the suite's
    placeholder checkpoint (``source: ${SEER_CHECKPOINT}``) unless ``variables`` fills it, and any entry of the same
    name; others are added. A placeholder left unset, and a variable the suite never uses, are ``SuiteError``s naming
    them and the ``--set`` meant (``imagenet_dir`` for ``IMAGENET_DIR``: names are case-sensitive).
    """
    import yaml

    from seer.catalog import RecipeNotFoundError, resolve

    try:
        path = resolve(path, "eval")
    except RecipeNotFoundError as exc:
        raise SuiteError(str(exc)) from None
    try:
        suite = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{path}: not valid yaml: {exc}") from None
    if not isinstance(suite, dict):
        raise SuiteError(f"{path}: a suite is a mapping with datasets, protocols and checkpoints")
    unknown = set(suite) - _TOP_KEYS
    if unknown:
        raise SuiteError(f"{path}: unknown top-level keys {sorted(unknown)}")
    variables = dict(variables or {})
    slots = {v for v in map(_placeholder_source, suite.get("checkpoints") or []) if v}  # ${SEER_CHECKPOINT}
    suite["checkpoints"] = _add_checkpoints(suite.get("checkpoints"), extra_checkpoints or [], variables)
    missing: set[str] = set()
    used: set[str] = set()
    suite = _expand(suite, variables, missing, used)
    if missing:
        raise SuiteError(_missing_message(path, sorted(missing), slots, variables))
    unused = sorted(set(variables) - used)
    if unused:
        raise SuiteError(_unused_message(path, unused, sorted(used)))
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


def select(suite: dict, datasets: list[str] | None = None, protocols: list[str] | None = None) -> dict:
    """Keep only the named datasets / protocol labels (``--only-dataset`` / ``--only-protocol``); in place."""
    for flag, key, names, name_of in (("--only-dataset", "datasets", datasets, lambda e: e["name"]),
                                      ("--only-protocol", "protocols", protocols, protocol_label)):  # fmt: skip
        if not names:
            continue
        known = [name_of(e) for e in suite[key]]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise SuiteError(f"{flag} {', '.join(unknown)}: not in the suite (it has {', '.join(known)})")
        suite[key] = [e for e in suite[key] if name_of(e) in names]
    return suite


# ----------------------------------------------------------------------------------------------------------------
# Generated datasets (the small suite runs anywhere)
# ----------------------------------------------------------------------------------------------------------------
def generate_dataset(spec: Mapping[str, Any], root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a generated dataset as image folders ``root/{train,test}/<class>/*.png`` once; returns both paths.

    kinds: ``digits`` (scikit-learn's bundled 8x8 digits, upsampled to ``size`` RGB, stratified 70/30 split) and
    ``shapes`` (``seer.data.synthetic``: shapes and textures, ``n_train_per_class`` / ``n_test_per_class``).
    """
    kind = spec.get("kind")
    root = Path(root)
    train, test = root / "train", root / "test"
    if (root / ".complete").exists():
        return train, test
    if kind not in ("digits", "shapes"):
        raise SuiteError(f"unknown generated dataset kind {kind!r} (expected 'digits' or 'shapes')")
    if root.exists():
        # Written whole and renamed into place with its .complete: a directory without one is not seer's to replace.
        raise SuiteError(f"{root} exists but is not a generated dataset (no .complete file); move it away or choose "
                         "another --out")  # fmt: skip
    size = int(spec.get("size", 32))
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    honour_umask(tmp, directory=True)  # renamed into place below: mkdtemp's 0700 would hide it from the group
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
                img = Image.fromarray((x[i].reshape(8, 8) * (255 / 16)).astype(np.uint8))
                img.resize((size, size), Image.BICUBIC).convert("RGB").save(d / f"{i:05d}.png")
    else:
        from seer.data.synthetic import write_image_folder

        n_classes = int(spec.get("n_classes", 10))
        write_image_folder(tmp / "train", int(spec.get("n_train_per_class", 40)), size, seed, n_classes)
        write_image_folder(tmp / "test", int(spec.get("n_test_per_class", 15)), size, seed + 1, n_classes)
    (tmp / ".complete").write_text("ok\n")
    os.replace(tmp, root)
    return train, test


# ----------------------------------------------------------------------------------------------------------------
# One (checkpoint, dataset): features and the settings recorded with every result
# ----------------------------------------------------------------------------------------------------------------
def suite_device(suite: Mapping[str, Any]):
    """The suite's ``features.device`` as a torch device (``auto``: CUDA when available); ValueError naming the
    suite's key when it asks for a GPU this machine lacks (``seer.hardware.resolve_device``)."""
    from seer.hardware import resolve_device

    where = f"suite {suite['name']!r}: features.device" if "name" in suite else "features.device"
    return resolve_device(suite["features"].get("device", "auto"), what=where)


def _resolution(suite: Mapping[str, Any], ds: Mapping[str, Any]) -> tuple[int, float | None]:
    fcfg = suite["features"]
    return int(ds.get("resolution", fcfg.get("resolution", 224))), ds.get("crop_pct", fcfg.get("crop_pct"))


def split_kwargs(suite: Mapping[str, Any], ckpt: Mapping[str, Any], ds: Mapping[str, Any], *,
                 progress: bool | None = False):  # fmt: skip
    """The keyword arguments of ``seer.evaluation.cache.split_features`` for one checkpoint on one dataset
    (``progress``: the extraction's, ``None`` for splits of 512 images or more; ``features.num_workers`` capped at
    the CPUs this process may use)."""
    fcfg = suite["features"]
    resolution, crop_pct = _resolution(suite, ds)
    return {
        "layers": list(fcfg.get("layers", ["avgpool"])),
        "resolution": resolution,
        "crop_pct": crop_pct,
        "batch_size": int(fcfg.get("batch_size", 64)),
        # at most one decoding process per CPU this process may use: the shipped suites ask for 8 (a GPU node's
        # share); on a 2-core machine 8 only compete with the model (torch warns, and it runs slower)
        "num_workers": min(int(fcfg.get("num_workers", 0)), _cpus()),
        "device": suite_device(suite),
        "pixel_size": int(ckpt.get("size", 16)),
        "progress": progress,
    }


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def feature_cache(out: str | os.PathLike, ckpt_name: str, ds_name: str, split: str) -> Path:
    """Where the features of one checkpoint on one split live: ``OUT/features/<checkpoint>/<dataset>/<split>``."""
    return Path(out) / "features" / ckpt_name / ds_name / split


def protocol_meta(suite: Mapping[str, Any], ckpt: Mapping[str, Any], ds: Mapping[str, Any]) -> dict:
    """The settings recorded in every result of one (checkpoint, dataset)."""
    resolution, crop_pct = _resolution(suite, ds)
    return {
        "suite": suite["name"],
        "dataset": ds["name"],
        "checkpoint": ckpt["name"],
        "checkpoint_source": str(ckpt.get("source", ckpt.get("preset", ckpt.get("kind")))),
        "resolution": resolution,
        "crop_pct": crop_pct,
        "train": str(ds["train"]),
        "test": str(ds["test"]),
    }


def run_protocol(
    proto: Mapping[str, Any],
    train: dict[str, np.ndarray],
    ytr: np.ndarray,
    test: dict[str, np.ndarray],
    yte: np.ndarray,
    meta: dict,
    device: str,
    *,
    progress: bool | None = False,
) -> list[dict]:
    """One protocol entry on cached features -> result dicts (one per layer for kNN).

    ``n_per_class`` / ``n_tries`` make a probe few-shot: it is trained on ``n_per_class`` samples of every class
    drawn with seeds ``0 .. n_tries - 1`` (the rows kNN's own few-shot mode draws) and the accuracies averaged.
    ``progress`` is passed to ``eval_knn`` / ``eval_linear`` (``None``: shown for long searches and grids only).
    """
    from seer.evaluation import eval_knn, eval_linear
    from seer.evaluation.knn import _few_shot_rows

    opts = {k: v for k, v in proto.items() if k not in ("name", "label", "layers")}
    layers = [lay for lay in proto.get("layers") or list(train) if lay in train] or list(train)  # pixels: "pixels"
    tag = {"protocol_label": protocol_label(proto)}
    run = {"device": device, "progress": progress}
    if proto["name"] == "knn":
        return [
            eval_knn(train[lay], ytr, test[lay], yte, metadata={**meta, "layer": lay, **tag}, **run, **opts)
            for lay in layers
        ]
    n_shot = opts.pop("n_per_class", None)
    n_tries = int(opts.pop("n_tries", 1))
    method = "sgd" if proto["name"] == "linear" else "logreg"
    tries = []
    for t in range(n_tries if n_shot else 1):
        rows = _few_shot_rows(ytr, int(n_shot), seed=t) if n_shot else np.arange(len(ytr))
        xs = {lay: train[lay][rows] for lay in layers}
        xte = {lay: test[lay] for lay in layers}
        tries.append(eval_linear(xs, ytr[rows], xte, yte, method=method, metadata={**meta, **tag}, **run, **opts))
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


def result_row(res: dict, suite: str) -> dict:
    """One row of the table from one result (kNN: k = 20, else the largest k; probes: the selected head)."""
    meta = res["metadata"]
    if res.get("protocol") == "linear" or res["settings"].get("protocol") == "linear":
        top1, top5 = res["top1"], res["top5"]
        sel = res["selected"]
        detail = ", ".join(f"{k}={v}" for k, v in sel.items() if k in ("layer", "head", "lr", "C", "weight_decay"))
        layer = sel["layer"]
    else:
        k = _shown_k(res["top1"])
        top1, top5 = res["top1"][k], res["top5"][k]
        detail = "; ".join(f"k={kk}: {100 * v:.1f}" for kk, v in res["top1"].items())
        layer = meta["layer"]
    row = {
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
    if row["kind"] == "knn":
        row["k"] = int(k)
    return row


def _shown_k(top1: Mapping[Any, float]) -> Any:
    """The k of a kNN row: 20 (DINO's headline) when it ran, else the largest k (keys may be JSON strings)."""
    return next((k for k in top1 if int(k) == 20), max(top1, key=int))


def _footer(rows: list[dict]) -> str:
    """The sentence under the table: which k each kNN protocol's rows show (the ks that ran), what probe rows show."""
    shown: dict[str, set[str]] = {}
    for r in rows:
        if r.get("kind") == "knn" and "k" in r:
            shown.setdefault(r["protocol"], set()).add(str(r["k"]))
    parts = []
    if shown:
        if len(shown) == 1:
            ((label, ks),) = shown.items()
            which = f"k = {', '.join(sorted(ks, key=int))}"
        else:
            which = "; ".join(f"{label}: k = {', '.join(sorted(ks, key=int))}" for label, ks in shown.items())
        parts.append(f"kNN rows show {which} (every k that ran in details).")
    if any(r.get("kind") == "probe" for r in rows):
        parts.append("Linear / logreg rows show the head selected on a held-out split of train (a grid of one "
                     "configuration: that one).")  # fmt: skip
    parts.append("Every setting is in results.json.")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# The output directory
# ----------------------------------------------------------------------------------------------------------------
EVAL_OUTPUT_KIND = "eval"  # `seer eval-suite` and `seer launch eval` share the layout (and so a directory)
EVAL_OUTPUTS = ("features", "data", "launch", "results.json", "results.md", "results.png")


def suite_sources(suite: Mapping[str, Any]) -> list[str]:
    """The local paths a suite reads (checkpoints, dataset folders, the directory of a shard pattern)."""
    paths = [str(c.get("source") or "") for c in suite.get("checkpoints", [])]
    for ds in suite.get("datasets", []):
        for split in ("train", "test"):
            p = str(ds.get(split) or "")
            # a shard pattern ("dir/train-{000..009}.tar", "dir/*.tar"): the directory before the first pattern
            cut = min((p.index(c) for c in "{*[?" if c in p), default=len(p))
            paths.append(p if cut == len(p) else os.path.dirname(p[:cut]))
    # Only paths that exist here: a hub id ("facebook/regnet-y-10b-seer") is not one, whatever the current directory.
    return [p for p in paths if p and "://" not in p and Path(p).expanduser().exists()]


def check_output_dir(suite: Mapping[str, Any], out: str | os.PathLike, *, overwrite: bool = False,
                     flag: str = "overwrite=True") -> str:  # fmt: skip
    """Check, before any work, that the suite may write into ``out`` (``seer.io.prepare_output_dir``): returns its
    state, raises ``OutputDirError`` (nothing changed) when it may not. ``flag`` is how the caller gives
    ``overwrite``, named in the message (a command passes ``"--overwrite"``)."""
    return prepare_output_dir(out, kind=EVAL_OUTPUT_KIND, overwrite=overwrite, sources=suite_sources(suite),
                              flag=flag)  # fmt: skip


def mark_output(out: str | os.PathLike, state: str) -> None:
    """Create ``out`` and mark it as a suite's output (in a directory of the user's: claim only seer's names)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if state == "foreign":
        claim_output_files(out, EVAL_OUTPUT_KIND, EVAL_OUTPUTS)
    else:  # new, empty, or an earlier suite's output: its features are reused, nothing is removed
        mark_output_dir(out, EVAL_OUTPUT_KIND, EVAL_OUTPUTS)


# ----------------------------------------------------------------------------------------------------------------
# The whole suite in one process
# ----------------------------------------------------------------------------------------------------------------
def run_suite(suite: dict, out: str | os.PathLike, *, progress: bool = True, overwrite: bool = False,
              flag: str = "overwrite=True") -> dict:  # fmt: skip
    """Run every (checkpoint, dataset, protocol); write results.json, results.md and results.png under ``out``.

    ``out``: new, empty, or an earlier suite's output (its cached features are reused); another non-empty directory
    only with ``overwrite`` (seer's files are added, nothing is removed). Refused: ``seer.io.OutputDirError``, whose
    message names ``flag`` (how the caller gives ``overwrite``). ``progress``: a line per step on stderr, the
    extraction's progress, and that of the probes long enough to need one (rate and ETA, ``seer.progress``).
    """
    from seer.evaluation.cache import build_model, split_features

    out = Path(out)
    mark_output(out, check_output_dir(suite, out, overwrite=overwrite, flag=flag))
    device = suite_device(suite)
    results, rows = [], []
    t0 = time.perf_counter()
    for ckpt in suite["checkpoints"]:
        model = build_model(ckpt, device)
        for ds in suite["datasets"]:
            if "generate" in ds:
                train, test = generate_dataset(ds["generate"], out / "data" / ds["name"], int(suite.get("seed", 0)))
                ds = {**ds, "train": str(train), "test": str(test)}
            kwargs = split_kwargs(suite, ckpt, ds, progress=progress)
            layers = ["pixels"] if ckpt.get("kind") == "pixels" else kwargs["layers"]
            split = {}
            for s in ("train", "test"):
                if progress:  # names the extraction whose progress lines follow (one per layer)
                    print(f"[{time.perf_counter() - t0:6.1f}s] {ckpt['name']} / {ds['name']} / {s}: features "
                          f"({', '.join(layers)})", file=sys.stderr)  # fmt: skip
                split[s] = split_features(model, str(ds[s]), feature_cache(out, ckpt["name"], ds["name"], s), **kwargs)
            (xtr, ytr), (xte, yte) = split["train"], split["test"]
            meta = protocol_meta(suite, ckpt, ds)
            for proto in suite["protocols"]:
                if progress:
                    elapsed = time.perf_counter() - t0
                    print(f"[{elapsed:6.1f}s] {ckpt['name']} / {ds['name']} / {protocol_label(proto)}", file=sys.stderr)
                shown = None if progress else False  # the long probes only (kNN / linear decide)
                for res in run_protocol(proto, xtr, ytr, xte, yte, meta, str(device), progress=shown):
                    results.append(res)
                    rows.append(result_row(res, suite["name"]))
    payload = {"suite": suite, "rows": rows, "results": results, "seconds": time.perf_counter() - t0}
    payload["outputs"] = write_outputs(out, payload, markdown_table(rows, suite))
    return payload


def markdown_table(rows: list[dict], suite: dict) -> str:
    """The results table (markdown) with a footer that says which k each kNN row shows."""
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
    lines += ["", _footer(rows)]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, data: str | bytes) -> None:
    atomic_write(path, data.encode() if isinstance(data, str) else data)  # the umask's mode, not mkstemp's 0600


def _series(r: dict) -> str:
    # kNN has one row per layer; probes report the layer chosen on held-out train data ("selected").
    return f"{r['checkpoint']} [{r['layer'] if r['kind'] == 'knn' else 'selected'}]"


def plot(rows: list[dict], path: str | os.PathLike, title: str) -> bool:
    """Grouped bars of top-1 (one group per (dataset, protocol), one bar per checkpoint [layer]) into ``path``.

    matplotlib is optional: without it one line says which extra installs it, and ``False`` is returned.
    """
    try:
        import matplotlib
    except ImportError:
        print(f"note: {Path(path).name} skipped: matplotlib is not installed ({PLOTS_EXTRA})", file=sys.stderr)
        return False
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    _atomic_write(Path(path), buf.getvalue())
    return True


def write_outputs(out: Path, payload: dict, table: str) -> list[str]:
    """``results.json``, ``results.md`` and (with matplotlib, when there are rows) ``results.png``; their names."""
    from seer.evaluation import write_json

    write_json(payload, out / "results.json")
    _atomic_write(out / "results.md", table)
    names = ["results.json", "results.md"]
    if payload["rows"] and plot(payload["rows"], out / "results.png", title=f"{payload['suite']['name']}: top-1"):
        names.append("results.png")
    return names


# ----------------------------------------------------------------------------------------------------------------
# The suite as job arrays (seer launch eval): the plan, the task records, the table
# ----------------------------------------------------------------------------------------------------------------
def plan_tasks(suite: dict) -> dict:
    """``{"features": [(ckpt, dataset)], "protocols": [(ckpt, dataset, label)]}`` in suite order; labels unique."""
    labels = [protocol_label(p) for p in suite["protocols"]]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise SuiteError(f"protocol labels must be unique within a suite (give each a 'label'): {dupes}")
    for key in ("checkpoints", "datasets"):
        names = [e["name"] for e in suite[key]]
        dupes = sorted({x for x in names if names.count(x) > 1})
        if dupes:
            raise SuiteError(f"{key} names must be unique: {dupes}")
    feats = [(c["name"], d["name"]) for c in suite["checkpoints"] for d in suite["datasets"]]
    protos = [(c, d, lab) for c, d in feats for lab in labels]
    return {"features": feats, "protocols": protos}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "x"


def task_record_path(out: str | os.PathLike, kind: str, *parts: str) -> Path:
    """The status record of one task of an eval launch: ``OUT/launch/tasks/<kind>__<parts>.json``."""
    return Path(out) / "launch" / "tasks" / f"{kind}__{'__'.join(slug(p) for p in parts)}.json"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def collect(out: str | os.PathLike) -> dict:
    """Gather the task records of an eval launch into ``results.json`` / ``results.md`` / ``results.png``.

    Rows follow the suite order (checkpoint, dataset, protocol). Tasks that failed or never wrote a result are
    listed under the table with their error, and counted in ``payload["missing"]``.
    """
    out = Path(out)
    plan_file = out / "launch" / "plan.json"
    if not plan_file.is_file():
        raise FileNotFoundError(f"{out} is not an eval launch directory (no launch/plan.json)")
    plan = json.loads(plan_file.read_text())
    suite = plan["suite"]
    rows, results, missing = [], [], []
    for kind in ("features", "protocols"):
        for parts in plan[kind]:
            path = task_record_path(out, "features" if kind == "features" else "protocol", *parts)
            rec = json.loads(path.read_text()) if path.is_file() else {"status": "not started"}
            if rec["status"] != "done":
                missing.append({"task": "/".join(parts), "kind": kind, "status": rec["status"],
                                "error": rec.get("error")})  # fmt: skip
            elif kind == "protocols":
                rows += rec["rows"]
                results += rec["results"]
    payload = {"suite": suite, "rows": rows, "results": results, "missing": missing, "collected": _now()}
    text = markdown_table(rows, suite)
    if missing:
        text += "\n## Missing results\n\n| task | kind | status | error |\n|---|---|---|---|\n"
        text += "".join(f"| {m['task']} | {m['kind']} | {m['status']} | {m['error'] or ''} |\n" for m in missing)
    payload["outputs"] = write_outputs(out, payload, text)
    return payload


# ----------------------------------------------------------------------------------------------------------------
# `seer eval-suite` (eval/benchmark.py)
# ----------------------------------------------------------------------------------------------------------------
def add_suite_args(p: argparse.ArgumentParser) -> None:
    """``--suite --out --set --checkpoint --only-dataset --only-protocol``: shared with ``seer launch eval``."""
    from seer.catalog import available

    p.add_argument("--suite", required=True, help=f"suite name ({', '.join(available('eval'))}) or yaml file")
    p.add_argument(
        "--out",
        required=True,
        help="output directory (features cache, results.{json,md,png}): new, empty, or an earlier suite's output",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out that is not a suite's output (seer's files are added, nothing removed)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="value of a ${VAR} placeholder of the suite (case-sensitive: --set IMAGENET_DIR=/data/in1k)",
    )
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="a checkpoint to evaluate (repeat for several): replaces the suite's ${SEER_CHECKPOINT} entry "
                   "and any entry named NAME; added to the others")  # fmt: skip
    p.add_argument("--only-dataset", action="append", default=[], help="run only these datasets")
    p.add_argument("--only-protocol", action="append", default=[], help="run only these protocol labels")


def suite_from_args(args: argparse.Namespace) -> dict:
    """The suite the ``add_suite_args`` arguments name, with variables, extra checkpoints and the subset applied."""
    suite = load_suite(args.suite, parse_variables(args.set), args.checkpoint)
    return select(suite, args.only_dataset, args.only_protocol)


def main(argv: list[str] | None = None, *, prog: str = "seer eval-suite") -> int:
    """`seer eval-suite --suite NAME|FILE --out DIR ...`: run a suite in this process; print its table."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_suite_args(p)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    configure_logging()
    try:
        suite = suite_from_args(args)
    except SuiteError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        payload = run_suite(suite, args.out, progress=not args.quiet, overwrite=args.overwrite, flag="--overwrite")
    except (OutputDirError, SuiteError) as exc:  # refused output directory, or a dataset folder in the way
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(payload["rows"], suite))
    print(f"wrote {', '.join(payload['outputs'])} to {args.out} in {payload['seconds']:.1f}s")
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
    p.add_argument("--out", required=True, help="output directory: new, empty, or an earlier run's output")
    p.add_argument("--overwrite", action="store_true", help="write into another non-empty --out (nothing removed)")


def run_single(args: argparse.Namespace, proto: dict, kind: str) -> int:
    """Run one protocol for one checkpoint on one dataset as a one-row suite; print its table."""
    ckpt = {"name": Path(args.checkpoint).stem or args.checkpoint}
    ckpt.update({"preset": args.checkpoint} if args.random_init else {"source": args.checkpoint})
    if args.n_per_class:
        proto = {**proto, "n_per_class": args.n_per_class, "n_tries": args.tries}
    features = {"layers": args.layers, "batch_size": args.batch_size, "num_workers": args.num_workers,
                "device": args.device}  # fmt: skip
    dataset = {"name": args.name, "train": args.train, "test": args.test, "resolution": args.resolution,
               "crop_pct": args.crop_pct}  # fmt: skip
    suite = {"name": f"{kind}-{args.name}", "features": features, "checkpoints": [ckpt], "datasets": [dataset],
             "protocols": [proto]}  # fmt: skip
    try:
        payload = run_suite(suite, args.out, overwrite=args.overwrite, flag="--overwrite")
    except (OutputDirError, SuiteError) as exc:
        print(f"eval/{kind}.py: error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(payload["rows"], suite))
    return 0
