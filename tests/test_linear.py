"""eval_linear: digits vs scikit-learn, one-pass grid == separate runs, selection never sees the test split."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

import seer.evaluation.linear as linear_mod
from seer.evaluation import eval_linear, eval_linear_online
from seer.evaluation.linear import HeadConfig, LinearHeads, _train, cli_main, stratified_split


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x.astype(np.float32), y, test_size=0.3, random_state=0, stratify=y)
    return xtr, ytr, xte, yte


def test_digits_matches_logistic_regression(digits):
    xtr, ytr, xte, yte = digits
    ref = LogisticRegression(max_iter=5000).fit(xtr, ytr).score(xte, yte)
    res = eval_linear(xtr, ytr, xte, yte, epochs=30, device="cpu")
    assert res["top1"] >= ref - 0.01, (res["top1"], ref, res["selected"])
    assert res["top5"] >= res["top1"]
    s = res["settings"]
    assert s["n_heads"] == 14 and s["selection"].startswith("held-out") and s["n_fit"] + s["n_val"] == len(ytr)
    assert {"layer", "head", "lr", "weight_decay", "val_top1", "val_top5"} <= set(res["selected"])
    assert len(res["heads"]) == 14 and all("test_top1" in h for h in res["heads"])
    json.dumps(res)  # plain types only


def test_float16_features(digits):
    xtr, ytr, xte, yte = digits
    kw = {"lrs": (0.01, 0.1), "head_types": ("bn",), "epochs": 5, "device": "cpu"}
    a = eval_linear(xtr, ytr, xte, yte, **kw)
    b = eval_linear(xtr.astype(np.float16), ytr, xte.astype(np.float16), yte, **kw)  # digits are exact in fp16
    assert b["selected"]["lr"] == a["selected"]["lr"] and abs(a["top1"] - b["top1"]) < 0.01


def test_logreg_mode(digits):
    xtr, ytr, xte, yte = digits
    res = eval_linear(xtr, ytr, xte, yte, method="logreg", Cs=(0.001, 1.0), device="cpu")
    assert res["selected"]["C"] in (0.001, 1.0) and res["top1"] > 0.9
    assert [h["C"] for h in res["heads"]] == [0.001, 1.0]


def test_grid_in_one_pass_equals_separate_runs():
    rng = np.random.default_rng(0)
    x = {
        "a": torch.from_numpy(rng.normal(size=(300, 12)).astype(np.float32)),
        "b": torch.from_numpy(rng.normal(size=(300, 7)).astype(np.float32)),
    }
    y = torch.from_numpy(rng.integers(0, 5, 300))
    grid = [
        HeadConfig(lay, h, lr, wd)
        for lay in ("a", "b")
        for h in ("linear", "bn")
        for lr in (0.01, 0.5)
        for wd in (0.0, 1e-3)
    ]
    together = LinearHeads({"a": 12, "b": 7}, 5, grid, seed=3)
    _train(together, x, y, epochs=3, batch_size=64, momentum=0.9, warmup_epochs=1, seed=1, progress=False, desc="")
    logits = together.logits(x)
    for i in (0, 5, 11, 15):
        alone = LinearHeads({"a": 12, "b": 7}, 5, [grid[i]], seed=3)
        _train(alone, x, y, epochs=3, batch_size=64, momentum=0.9, warmup_epochs=1, seed=1, progress=False, desc="")
        torch.testing.assert_close(alone.logits(x)[:, 0], logits[:, i], rtol=1e-4, atol=1e-5)


def test_gradient_matches_autograd():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    heads = LinearHeads({"f": 6}, 4, [HeadConfig("f", "linear", 1.0, 0.0), HeadConfig("f", "linear", 0.1, 0.0)])
    g = heads.groups[0]
    w = g.weight.clone().requires_grad_(True)
    b = g.bias.clone().requires_grad_(True)
    z = (x @ w + b).view(32, 2, 4)
    loss = sum(torch.nn.functional.cross_entropy(z[:, h], y) for h in range(2))
    loss.backward()
    w0 = g.weight.clone()
    g.step(x, y, lr_factor=1.0, momentum=0.0)
    lr = torch.tensor([1.0] * 4 + [0.1] * 4)
    torch.testing.assert_close(g.weight, w0 - w.grad * lr)


def test_selection_uses_held_out_train_not_test():
    """Layer "good" is clean on train (so on the held-out split) but very noisy on test; layer "trap" is the reverse.
    Selecting on the test split would pick "trap"; the protocol must pick "good" and report its (poorer) test
    accuracy honestly."""
    rng = np.random.default_rng(0)
    n, d, c = 800, 8, 4
    ytr, yte = rng.integers(0, c, n), rng.integers(0, c, 400)
    centers = {"good": rng.normal(size=(c, d)) * 3, "trap": rng.normal(size=(c, d)) * 3}

    def feats(layer, y, sigma):
        return (centers[layer][y] + sigma * rng.normal(size=(len(y), d))).astype(np.float32)

    train = {"good": feats("good", ytr, 0.5), "trap": feats("trap", ytr, 5.0)}
    test = {"good": feats("good", yte, 8.0), "trap": feats("trap", yte, 0.5)}
    res = eval_linear(train, ytr, test, yte, lrs=(0.1,), head_types=("linear",), epochs=10, device="cpu")
    by_layer = {h["layer"]: h for h in res["heads"]}
    # the construction: on the held-out split "good" wins, on test "trap" wins
    assert by_layer["good"]["val_top1"] > by_layer["trap"]["val_top1"] + 0.1
    assert by_layer["trap"]["test_top1"] > by_layer["good"]["test_top1"] + 0.1
    assert res["selected"]["layer"] == "good"
    assert res["top1"] < by_layer["trap"]["test_top1"] - 0.1  # the reported number is the selected layer's


class _Spy:
    """A feature matrix that logs when its values are read."""

    def __init__(self, arr, log):
        self.arr, self.log, self.shape = arr, log, arr.shape

    def __array__(self, dtype=None, copy=None):
        self.log.append("test features read")
        return self.arr if dtype is None else self.arr.astype(dtype)

    def __getitem__(self, item):
        self.log.append("test features read")
        return self.arr[item]


@pytest.mark.parametrize("method", ["sgd", "logreg"])
def test_test_features_untouched_before_selection(digits, monkeypatch, method):
    xtr, ytr, xte, yte = digits
    log: list[str] = []
    real_select = linear_mod._select

    def spy_select(heads):
        log.append("selected")
        return real_select(heads)

    monkeypatch.setattr(linear_mod, "_select", spy_select)
    eval_linear(xtr, ytr, _Spy(xte, log), yte, method=method, lrs=(0.01, 0.1), Cs=(0.1, 1.0), epochs=2, device="cpu")
    assert log[0] == "selected" and "test features read" in log


def test_stratified_split_and_single_sample_classes():
    y = np.array([0] * 10 + [1] * 5 + [2])
    with pytest.warns(UserWarning, match="1 classes have a single train sample"):
        fit, val = stratified_split(y, 0.2, seed=0)
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(16))
    assert (y[val] == 0).sum() == 2 and (y[val] == 1).sum() == 1 and (y[val] == 2).sum() == 0
    again, _ = stratified_split(y[:15], 0.2, seed=0)
    assert np.array_equal(again, stratified_split(y[:15], 0.2, seed=0)[0])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no class has 2 or more"):
        stratified_split(np.arange(5), 0.2, seed=0)


def test_class_with_one_sample_runs(digits):
    xtr, ytr, xte, yte = digits
    ytr = ytr.copy()
    ytr[0] = 10  # a class seen once in train, never in test
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = eval_linear(xtr, ytr, xte, yte, lrs=(0.01, 0.1), head_types=("bn",), epochs=3, device="cpu")
    assert res["settings"]["n_classes"] == 11 and 0 <= res["top1"] <= 1


def test_single_configuration_needs_no_split():
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    res = eval_linear(
        x, np.arange(5), x, np.arange(5), lrs=(0.1,), head_types=("linear",), epochs=50, batch_size=5, device="cpu"
    )
    assert res["settings"]["selection"].startswith("none") and res["settings"]["n_fit"] == 5


def test_bad_inputs(digits):
    xtr, ytr, xte, yte = digits
    with pytest.raises(ValueError, match="1257 rows but train_labels has 1256"):
        eval_linear(xtr, ytr[:-1], xte, yte)
    bad = xtr.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        eval_linear(bad, ytr, xte, yte, epochs=1)
    with pytest.raises(TypeError, match="integers"):
        eval_linear(xtr, ytr.astype(float), xte, yte)
    with pytest.raises(ValueError, match="layers differ"):
        eval_linear({"a": xtr}, ytr, {"b": xte}, yte)
    with pytest.raises(ValueError, match="head type"):
        eval_linear(xtr, ytr, xte, yte, head_types=("mlp",))
    with pytest.raises(ValueError, match="method"):
        eval_linear(xtr, ytr, xte, yte, method="svm")


def test_online_augmentation_mode():
    from seer.models.regnet import RegNetCfg, build_trunk

    trunk = build_trunk(RegNetCfg(depth=4, w0=16, wa=8.0, wm=2.0, group_w=8))
    g = torch.Generator().manual_seed(0)

    def batches(n_batches, augment):
        out = []
        for _ in range(n_batches):
            y = torch.randint(0, 2, (16,), generator=g)
            # class 0: dark images, class 1: bright; augmentation = random horizontal flips + noise
            x = torch.rand(16, 3, 32, 32, generator=g) * 0.5 + y[:, None, None, None] * 1.0
            if augment:
                x = torch.where(torch.rand(16, 1, 1, 1, generator=g) < 0.5, x.flip(3), x)
            out.append((x, y))
        return out

    train, val, test = batches(6, True), batches(2, False), batches(2, False)
    res = eval_linear_online(
        trunk,
        train,
        val,
        test,
        num_classes=2,
        layers=("avgpool", "res3"),
        lrs=(0.01, 0.1),
        head_types=("bn",),
        epochs=2,
        device="cpu",
    )
    assert res["settings"]["n_heads"] == 4 and res["selected"]["layer"] in ("avgpool", "res3")
    assert res["top1"] > 0.8
    assert all(not p.requires_grad for p in trunk.parameters())
    with pytest.raises(ValueError, match="val_loader"):
        eval_linear_online(trunk, train, None, test, num_classes=2, lrs=(0.01, 0.1), epochs=1, device="cpu")


def test_cli_writes_json(tmp_path, digits):
    xtr, ytr, xte, yte = digits
    np.savez(tmp_path / "train.npz", features=xtr, labels=ytr)
    np.savez(tmp_path / "test.npz", features=xte, labels=yte)
    out = tmp_path / "lin.json"
    rc = cli_main(
        [
            "--train",
            str(tmp_path / "train.npz"),
            "--test",
            str(tmp_path / "test.npz"),
            "--epochs",
            "5",
            "--lrs",
            "0.01",
            "0.1",
            "--device",
            "cpu",
            "--meta",
            "layer=res5",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["metadata"]["layer"] == "res5" and 0.8 < res["top1"] <= 1


@pytest.mark.parametrize("n_classes", [10, 100])  # both softmax paths (by hand below 64 classes, torch's above)
def test_diverging_heads_feed_no_subnormals_to_the_gemms(n_classes, monkeypatch):
    """A diverged head's softmax underflows; subnormal gradients make the weight GEMM ~200x slower on every thread
    that FTZ does not cover (torch's intra-op workers), so no GEMM operand may hold one."""
    torch.manual_seed(0)
    heads = LinearHeads({"f": 8}, n_classes, [HeadConfig("f", "linear", 1.0, 0.0)])
    group = heads.groups[0]
    with torch.no_grad():
        group.weight.normal_(0, 30.0)  # logits spread over hundreds: exp(z - max) lands in the subnormal range
    tiny, seen = torch.finfo(torch.float32).tiny, []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        seen.append(sum(int(((t != 0) & (t.abs() < tiny)).sum()) for t in args if isinstance(t, torch.Tensor)))
        return real_addmm(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", spy)
    group.step(torch.randn(64, 8), torch.randint(0, n_classes, (64,)), 1.0, 0.0)
    assert len(seen) == 2 and seen == [0, 0]  # the logits GEMM and the weight-gradient GEMM
