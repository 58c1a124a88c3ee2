"""Classifiers: logits parity with the libraries that wrote the checkpoints, export round trips, hostile heads."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_weights import X, _Payload, hf_config, randomize_bn, rel_err, to_vissl_key

import seer
from seer.models.classifier import RegNetClassifier
from seer.weights import CheckpointError, load_trunk, save_trunk

LABELS5 = {0: "cat", 1: "dog", 2: "fox", 3: "owl", 4: "eel"}


def logits_of(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=x) if hasattr(model, "config") else model(x)
    return getattr(out, "logits", out)


def hf_classifier(**overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.RegNetForImageClassification(hf_config(id2label=LABELS5, label2id={v: k for k, v in
                                                                                           LABELS5.items()},
                                                                **overrides))  # fmt: skip
    with torch.no_grad():
        model.classifier[1].bias.normal_()
    return randomize_bn(model)


# ----------------------------------------------------------------------------------------------------------------
# Loading: parity with checkpoints the real libraries saved
# ----------------------------------------------------------------------------------------------------------------
def test_hf_directory_logits_and_labels(tmp_path):
    ref = hf_classifier()
    ref.save_pretrained(tmp_path / "hf")
    model = seer.load_classifier(tmp_path / "hf")
    assert isinstance(model, RegNetClassifier) and not model.training
    assert rel_err(logits_of(ref, X), model(X).detach()) < 1e-4
    assert model.id2label == LABELS5
    assert model.trunk.checkpoint_format == "hf" and "resolution" in model.pretrained_cfg
    # model.trunk is the usual trunk: the same features load_trunk gives
    assert rel_err(load_trunk(tmp_path / "hf")(X), model.trunk(X)) < 1e-6


def test_hf_hub_id_from_offline_cache(tmp_path):
    cache = tmp_path / "cache"
    repo = cache / "models--facebook--regnet-y-tiny-seer-in1k"
    ref = hf_classifier()
    ref.save_pretrained(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    torch.save(X, tmp_path / "x.pt")
    torch.save(logits_of(ref, X), tmp_path / "ref.pt")
    code = (
        "import torch, seer\n"
        "m = seer.load_classifier('facebook/regnet-y-tiny-seer-in1k')\n"
        f"x, ref = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "with torch.no_grad():\n    out = m(x)\n"
        "print('ERR', float((out - ref).norm() / ref.norm()), m.id2label[2])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert "ERR" in out.stdout, out.stderr
    err, label = out.stdout.split()[1:3]
    assert float(err) < 1e-4 and label == "fox"


def test_timm_regnety_008_with_its_head(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = randomize_bn(timm.create_model("regnety_008", pretrained=False))
    torch.save(ref.state_dict(), tmp_path / "regnety_008.pth")
    model = seer.load_classifier(tmp_path / "regnety_008.pth")
    assert model.n_classes == 1000
    assert rel_err(logits_of(ref, X), model(X).detach()) < 1e-4
    assert model.id2label[0] == "tench"  # a 1000-way head without names gets ImageNet-1k's


def test_torchvision_regnet_y_400mf_with_fc(tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = randomize_bn(tv.models.regnet_y_400mf(num_classes=7))
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    model = seer.load_classifier(tmp_path / "tv.pth")
    assert rel_err(logits_of(ref, X), model(X).detach()) < 1e-4
    assert model.id2label == {i: str(i) for i in range(7)}


def _vissl_checkpoint(path, heads: dict) -> torch.nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = randomize_bn(timm.create_model("regnety_002", pretrained=False, num_classes=0))
    trunk = {to_vissl_key(k, 0): v for k, v in ref.state_dict().items()}
    ckpt = {"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}}}, "phase_idx": 3}
    torch.save(ckpt, path)
    return ref


def test_vissl_finetune_head(tmp_path):
    w, b = torch.randn(5, 368), torch.randn(5)
    ref = _vissl_checkpoint(tmp_path / "model_final_checkpoint_phase3.torch", {"0.clf.0.weight": w, "0.clf.0.bias": b})
    model = seer.load_classifier(tmp_path / "model_final_checkpoint_phase3.torch")
    with torch.no_grad():
        expect = ref(X) @ w.T + b
    assert rel_err(expect, model(X).detach()) < 1e-4


def test_vissl_linear_eval_head_folds_its_batchnorm(tmp_path):
    """eval_mlp: BatchNorm2d on the pooled features, then the linear layer (VISSL's linear benchmarks)."""
    g = torch.Generator().manual_seed(1)
    bn = {"weight": torch.rand(368, generator=g) + 0.5, "bias": torch.randn(368, generator=g),
          "running_mean": torch.randn(368, generator=g), "running_var": torch.rand(368, generator=g) + 0.1,
          "num_batches_tracked": torch.tensor(5)}  # fmt: skip
    w, b = torch.randn(4, 368, generator=g), torch.randn(4, generator=g)
    heads = {**{f"0.channel_bn.{k}": v for k, v in bn.items()}, "0.clf.clf.0.weight": w, "0.clf.clf.0.bias": b}
    ref = _vissl_checkpoint(tmp_path / "linear.torch", heads)
    model = seer.load_classifier(tmp_path / "linear.torch")
    layer = torch.nn.BatchNorm1d(368).eval()
    layer.load_state_dict(bn)
    with torch.no_grad():
        expect = layer(ref(X)) @ w.T + b
    assert rel_err(expect, model(X).detach()) < 1e-4


def test_feature_checkpoint_names_load_trunk(tmp_path):
    _vissl_checkpoint(tmp_path / "swav.torch", {"0.projection_head.0.weight": torch.randn(16, 368),
                                                 "0.prototypes0.weight": torch.randn(30, 16)})  # fmt: skip
    with pytest.raises(CheckpointError, match=r"swav.torch.*no classifier head.*load_trunk"):
        seer.load_classifier(tmp_path / "swav.torch")
    trunk = seer.build_trunk("regnety_200mf")
    save_trunk(trunk, tmp_path / "t.safetensors")
    with pytest.raises(CheckpointError, match=r"no classifier head.*load_trunk"):
        seer.load_classifier(tmp_path / "t.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Hostile checkpoints
# ----------------------------------------------------------------------------------------------------------------
def test_pickle_payload_is_refused_and_never_run(tmp_path):
    timm = pytest.importorskip("timm")
    marker = tmp_path / "pwned"
    sd = timm.create_model("regnety_002", pretrained=False, num_classes=3).state_dict()
    torch.save({"state_dict": sd, "payload": _Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil.pth: refused to load"):
        seer.load_classifier(tmp_path / "evil.pth")
    assert not marker.exists()


def test_head_that_disagrees_with_its_config(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_classifier().save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["classifier.1.weight"] = weights["classifier.1.weight"][:3].contiguous()
    weights["classifier.1.bias"] = weights["classifier.1.bias"][:3].contiguous()
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"labels name 5 classes.*head has 3 outputs"):
        seer.load_classifier(tmp_path / "hf")
    weights["classifier.1.weight"] = torch.randn(5, 17)  # not the trunk's 192 pooled features
    weights["classifier.1.bias"] = torch.randn(5)
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"does not take the trunk's 192 pooled features"):
        seer.load_classifier(tmp_path / "hf")


# ----------------------------------------------------------------------------------------------------------------
# Export with the head
# ----------------------------------------------------------------------------------------------------------------
def test_export_hf_loads_in_auto_model_and_pipeline(tmp_path):
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    hf_classifier().save_pretrained(tmp_path / "src")
    model = seer.load_classifier(tmp_path / "src")
    out = save_trunk(model, tmp_path / "export", format="hf")
    auto = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    assert rel_err(model(X).detach(), logits_of(auto, X)) < 1e-4
    assert auto.config.id2label == LABELS5
    back = seer.load_classifier(out)
    assert back.id2label == LABELS5 and rel_err(model(X).detach(), back(X).detach()) < 1e-6

    rng = torch.Generator().manual_seed(3)
    image = Image.fromarray((torch.rand(40, 56, 3, generator=rng) * 255).byte().numpy())
    pipe = transformers.pipeline("image-classification", model=str(out), top_k=5)
    got = [(r["label"], r["score"]) for r in pipe(image)]
    # seer on the same pixels: the processor's own preprocessing, then seer's logits
    pixels = transformers.AutoImageProcessor.from_pretrained(out)(image, return_tensors="pt")["pixel_values"]
    probs = model(pixels).detach().softmax(-1)[0]
    top = probs.topk(5)
    assert [label for label, _ in got] == [LABELS5[int(i)] for i in top.indices]
    assert torch.allclose(torch.tensor([s for _, s in got]), top.values, atol=1e-5)


def test_export_timm_logits(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = randomize_bn(timm.create_model("regnety_002", pretrained=False, num_classes=6))
    torch.save(ref.state_dict(), tmp_path / "src.pth")
    model = seer.load_classifier(tmp_path / "src.pth")
    path = save_trunk(model, tmp_path / "export.safetensors", format="timm")
    # timm keeps a pretrained head only when the pretrained_cfg's num_classes matches (else it re-initializes it)
    back = timm.create_model("regnety_002", pretrained=True, num_classes=6,
                             pretrained_cfg_overlay={"file": str(path), "num_classes": 6}).eval()  # fmt: skip
    assert rel_err(model(X).detach(), logits_of(back, X)) < 1e-4
    back = timm.create_model("regnety_002", num_classes=6, checkpoint_path=str(path)).eval()
    assert rel_err(model(X).detach(), logits_of(back, X)) < 1e-4


@pytest.mark.parametrize("fmt, suffix", [("seer", ".safetensors"), ("torchvision", ".pth")])
def test_export_round_trips_through_seer(tmp_path, fmt, suffix):
    trunk = randomize_bn(seer.build_trunk("regnety_200mf"))
    model = RegNetClassifier(trunk, 3, id2label={0: "a", 1: "b", 2: "c"})
    with torch.no_grad():
        model.head.weight.normal_()
        model.head.bias.normal_()
    path = save_trunk(model, tmp_path / f"m{suffix}", format=fmt)
    back = seer.load_classifier(path)
    assert rel_err(model(X).detach(), back(X).detach()) < 1e-6
    if fmt == "seer":
        assert back.id2label == model.id2label


# ----------------------------------------------------------------------------------------------------------------
# classify / `seer classify`
# ----------------------------------------------------------------------------------------------------------------
def _images(folder, n: int) -> list:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray((torch.rand(30 + 4 * i, 40, 3, generator=g) * 255).byte().numpy()).save(path)
        paths.append(path)
    return paths


def test_classify_matches_the_logits_in_input_order(tmp_path):
    from seer.data.images import Preprocess, load_image
    from seer.features.classify import classify

    hf_classifier().save_pretrained(tmp_path / "hf")
    model = seer.load_classifier(tmp_path / "hf")
    paths = _images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")
    order = [paths[2], tmp_path / "imgs" / "broken.png", paths[0], paths[1]]
    got = classify(order, tmp_path / "hf", top_k=3, on_error="skip")
    assert [r["index"] for r in got] == [0, 1, 2, 3]
    assert "error" in got[1] and "broken.png" in got[1]["input"]
    pre = Preprocess.for_model(model)
    for r, path in zip(got, order):
        if "error" in r:
            continue
        x = torch.from_numpy(np.array(pre(load_image(path)))).permute(2, 0, 1)[None].float() / 255
        x = (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
        probs = model(x).detach().softmax(-1)[0]
        top = probs.topk(3)
        assert r["labels"] == [LABELS5[int(i)] for i in top.indices] and r["input"] == str(path)
        assert torch.allclose(torch.tensor(r["probs"]), top.values, atol=1e-4)
    with pytest.raises(seer.features.ImageError, match="broken.png"):
        classify(order, model, on_error="raise")


def test_seer_classify_cli(tmp_path, capsys):
    import tarfile

    from seer.cli import main

    hf_classifier().save_pretrained(tmp_path / "hf")
    paths = _images(tmp_path / "imgs", 3)
    (tmp_path / "list.txt").write_text("\n".join(str(p) for p in reversed(paths)) + "\n")
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:
        for i, p in enumerate(paths[:2]):
            tar.add(p, arcname=f"s{i:03d}.png")
    rc = main(["classify", str(paths[1]), str(tmp_path / "list.txt"), str(tmp_path / "shard-000000.tar"),
               "--model", str(tmp_path / "hf"), "--top-k", "2"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 1 + 3 + 2
    names = [line.split("\t")[0] for line in lines]
    assert names == [str(paths[1]), *map(str, reversed(paths)), f"{tmp_path / 'shard-000000.tar'}:s000",
                     f"{tmp_path / 'shard-000000.tar'}:s001"]  # fmt: skip
    # the same image gives the same labels whichever way it came in
    assert lines[0].split("\t")[1] == lines[2].split("\t")[1] == lines[5].split("\t")[1]
    assert all(len(line.split("\t")[1].split("  ")) == 2 for line in lines)
    rc = main(["classify", str(paths[0]), "--model", str(tmp_path / "imgs")])
    assert rc == 1 and "seer classify:" in capsys.readouterr().err


def test_hf_sharded_checkpoint_with_the_head_in_its_own_shard(tmp_path):
    """A big classifier's files: sharded safetensors with an index, the head in a later shard than the stem."""
    ref = hf_classifier()
    ref.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = seer.load_classifier(tmp_path / "hf")
    assert rel_err(logits_of(ref, X), model(X).detach()) < 1e-4 and model.id2label == LABELS5
