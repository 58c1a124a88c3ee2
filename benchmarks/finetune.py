"""Fine-tuning a SwAV-pretrained tiny trunk on a small real labeled set: full fine-tune vs the linear protocol.

On a task of ``seer.data.tasks`` (default: scikit-learn's digits at random position and scale), one seed:

1. pretrain the trunk with the ``tiny_cpu`` SwAV recipe on the train images (no labels);
2. ``seer finetune --config tiny_cpu`` (the whole network, a new head) and ``--config tiny_cpu_linear`` (a linear
   head on the frozen trunk), both validated on the test split every epoch;
3. the linear probe of ``seer linear`` (``eval_linear``: its own grid of weight decays) on the same frozen
   features, as the published protocol's reference;
4. export the fine-tuned run (with its head and class names) and run `seer classify` on the test images: the labels it
   prints are scored against the folders they came from.

Not part of ``make bench`` (a few minutes on 2 cores):

    python -m benchmarks.finetune --task digits --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _last_val(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_top1" in r]
    curve = [(r["step"], r["val_top1"]) for r in val]
    return {"top1": val[-1]["val_top1"], "top5": val[-1]["val_top5"], "curve": curve}


def run(task: str, seed: int, workdir: Path, n_train: int, n_test: int, pretrain_steps: int | None,
        finetune_steps: int | None) -> dict:  # fmt: skip
    from seer.cli import main as seer_main
    from seer.config import load_config
    from seer.data.tasks import write_task
    from seer.demo import recipe
    from seer.evaluation import eval_linear
    from seer.features import extract_features
    from seer.train.loop import pretrain
    from seer.weights import load_trunk

    data = write_task(task, workdir / "data", n_train=n_train, n_test=n_test, seed=seed)
    train_dir, test_dir = workdir / "data" / "train", workdir / "data" / "test"
    out: dict = {"task": task, "seed": seed, "n_train": n_train, "n_test": n_test, "classes": data["classes"]}

    t0 = time.perf_counter()
    images = {"source": "images", "images": str(train_dir)}
    swav = recipe(workdir / "swav", data=images, steps=pretrain_steps, seed=seed)
    (workdir / "swav.yaml").write_text(json.dumps(swav))  # json is yaml
    pretrain(load_config(str(workdir / "swav.yaml")))
    out["pretrain_seconds"] = time.perf_counter() - t0

    common = [f"model.init_from={workdir / 'swav'}", f"data.images={train_dir}", f"train.val_images={test_dir}",
              f"train.seed={seed}", "train.tensorboard=false"]  # fmt: skip
    if finetune_steps:
        common.append(f"train.total_steps={finetune_steps}")
    for name, config in (("finetune", "tiny_cpu"), ("linear_head", "tiny_cpu_linear")):
        t0 = time.perf_counter()
        cfg = load_config(config, [f"run_dir={workdir / name}", *common], kind="finetune")
        pretrain(cfg)
        out[name] = {**_last_val(workdir / name), "seconds": time.perf_counter() - t0, "steps": cfg.total_steps,
                     "lr": cfg.optim.base_lr, "freeze_trunk": cfg.supervised.freeze_trunk}  # fmt: skip

    # the published linear protocol on the same frozen SwAV features (seer linear)
    trunk = load_trunk(workdir / "swav")
    files = {part: data["files"][part] for part in ("train", "test")}
    feats = {part: extract_features([str(p) for p in files[part][0]], trunk, progress=False) for part in files}
    lin = eval_linear(feats["train"], np.asarray(files["train"][1]), feats["test"], np.asarray(files["test"][1]))
    out["linear_probe"] = {"top1": float(lin["top1"]), "top5": float(lin["top5"]), "selected": lin.get("selected")}

    # export with the head, then `seer classify` on the test images: are the printed labels right?
    # seer's format: the tiny trunk standardizes each image (image_norm), which HF / timm RegNets cannot express
    assert seer_main(["export", str(workdir / "finetune"), str(workdir / "finetuned.safetensors")]) == 0
    paths = [str(p) for p in files["test"][0]]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert seer_main(["classify", *paths, "--model", str(workdir / "finetuned.safetensors"), "--top-k", "1"]) == 0
    printed = [line.split("\t") for line in buf.getvalue().strip().splitlines()]
    truth = [data["classes"][y] for y in files["test"][1]]
    assert [p for p, _ in printed] == paths, "seer classify changed the input order"
    out["classify_export"] = {
        "images": len(paths),
        "top1": float(np.mean([label.split()[0] == t for (_, label), t in zip(printed, truth)])),
        "first_lines": ["\t".join(p) for p in printed[:3]],
    }
    return out


def markdown(r: dict, cpu: str) -> str:
    rows = [
        ("fine-tune (whole network, new head; `seer finetune --config tiny_cpu`)", r["finetune"]),
        ("linear head on the frozen trunk (`--config tiny_cpu_linear`)", r["linear_head"]),
        ("linear probe, published protocol (`seer linear`, frozen avgpool features)", r["linear_probe"]),
        ("`seer classify` on the export of the fine-tune (printed labels vs folders)", r["classify_export"]),
    ]
    lines = [
        f"Fine-tuning a SwAV-pretrained tiny trunk on `{r['task']}` ({r['n_train']} train / {r['n_test']} test images, "
        f"seed {r['seed']}); CPU {cpu}. Pretraining {r['pretrain_seconds']:.0f} s.",
        "",
        "| run | top-1 | top-5 |",
        "|---|---|---|",
    ]
    for name, row in rows:
        top5 = f"{100 * row['top5']:.1f}" if "top5" in row else "-"
        lines.append(f"| {name} | {100 * row['top1']:.1f} | {top5} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import machine_info, write_result
    from seer.data.tasks import TASKS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="digits", choices=sorted(TASKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--pretrain-steps", type=int, default=None, help="default: the tiny_cpu recipe's")
    ap.add_argument("--finetune-steps", type=int, default=None, help="default: the finetune recipes'")
    ap.add_argument("--name", default="finetune")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="seer-finetune-") as tmp:
        result = run(args.task, args.seed, Path(tmp), args.train, args.test, args.pretrain_steps, args.finetune_steps)
    write_result(args.name, result, markdown(result, machine_info()["processor"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
