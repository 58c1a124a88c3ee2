"""eval_knn against a brute-force numpy implementation of the DINO protocol, out-of-core banks, bad inputs."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

from seer.evaluation import eval_knn, knn, knn_search, write_json
from seer.evaluation.knn import _few_shot_rows, cli_main


def _data(n_train=1500, n_test=200, dim=24, n_classes=13, seed=0, label_offset=100):
    """Clustered random features; labels are non-contiguous integers (any class ids must work)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim))
    ytr = rng.integers(0, n_classes, n_train)
    yte = rng.integers(0, n_classes, n_test)
    xtr = centers[ytr] + 1.5 * rng.normal(size=(n_train, dim))
    xte = centers[yte] + 1.5 * rng.normal(size=(n_test, dim))
    return xtr.astype(np.float32), ytr * 7 + label_offset, xte.astype(np.float32), yte * 7 + label_offset


def brute_force_knn(xtr, ytr, xte, yte, ks, temperature):
    """The protocol written plainly in float64: cosine, top-k, votes exp(sim/T) summed per class, top-1/top-5.

    A class without votes is never predicted; vote ties go to the smaller class id.
    """
    a = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    b = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    sims = b.astype(np.float64) @ a.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")
    classes = np.unique(np.concatenate([ytr, yte]))
    top1, top5, preds = {}, {}, {}
    for k in ks:
        p = np.full((len(xte), 5), -1)
        for i in range(len(xte)):
            votes = {}
            for j in order[i, :k]:
                votes[ytr[j]] = votes.get(ytr[j], 0.0) + np.exp(sims[i, j] / temperature)
            ranked = sorted(votes, key=lambda c: (-votes[c], c))[:5]
            p[i, : len(ranked)] = ranked
        preds[k] = p
        top1[k] = float(np.mean(p[:, 0] == yte))
        top5[k] = float(np.mean((p == yte[:, None]).any(1)))
    assert len(classes) > 5
    return top1, top5, preds


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_matches_brute_force(backend):
    xtr, ytr, xte, yte = _data()
    ks = (1, 5, 10, 20, 100, 200)
    ref1, ref5, ref_pred = brute_force_knn(xtr, ytr, xte, yte, ks, 0.07)
    # Small chunks: many train chunks (the filtered merge path) and several test chunks.
    res = eval_knn(
        xtr,
        ytr,
        xte,
        yte,
        ks=ks,
        backend=backend,
        device="cpu",
        train_chunk_size=128,
        test_chunk_size=64,
        return_predictions=True,
    )
    for k in ks:
        np.testing.assert_array_equal(res["predictions"][k], ref_pred[k], err_msg=f"k={k}")
        assert res["top1"][k] == pytest.approx(ref1[k], abs=1e-12)
        assert res["top5"][k] == pytest.approx(ref5[k], abs=1e-12)
    assert 0.3 < res["top1"][20] <= 1.0  # clustered data: far above chance (1/13)


def test_one_chunk_equals_many_chunks():
    xtr, ytr, xte, yte = _data(seed=1)
    a = eval_knn(xtr, ytr, xte, yte, device="cpu")
    b = eval_knn(xtr, ytr, xte, yte, device="cpu", train_chunk_size=100, test_chunk_size=33)
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]


def test_search_exact_with_ties_and_duplicates():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 8)).astype(np.float32)
    xtr = base[rng.integers(0, 50, 3000)]  # many exact duplicates -> tied similarities everywhere
    xte = rng.normal(size=(70, 8)).astype(np.float32)
    k = 40
    sims, idx = knn_search(xtr, xte, k, device="cpu", train_chunk_size=97, test_chunk_size=16)
    ref = (
        torch.nn.functional.normalize(torch.from_numpy(xte), dim=1)
        @ torch.nn.functional.normalize(torch.from_numpy(xtr), dim=1).T
    )
    ref_v = ref.topk(k, dim=1).values
    torch.testing.assert_close(sims, ref_v, rtol=0, atol=1e-5)
    # Whatever indices were chosen among ties, they are distinct and have the reported similarities.
    torch.testing.assert_close(ref.gather(1, idx), sims, rtol=0, atol=1e-5)
    assert all(len(set(r.tolist())) == k for r in idx)


def test_memmap_chunks_equal_in_memory(tmp_path):
    xtr, ytr, xte, yte = _data(seed=2)
    paths = []
    for i, (a, b) in enumerate([(0, 500), (500, 1100), (1100, 1500)]):
        paths.append(tmp_path / f"part{i}.npy")
        np.save(paths[-1], xtr[a:b].astype(np.float16))  # fp16 on disk, fp32 search
    mm = [np.load(p, mmap_mode="r") for p in paths]
    ref = eval_knn(np.concatenate([m.astype(np.float32) for m in mm]), ytr, xte, yte, device="cpu")
    res_paths = eval_knn([str(p) for p in paths], ytr, xte, yte, device="cpu", train_chunk_size=256)
    res_mm = eval_knn(mm, ytr, xte, yte, device="cpu", train_chunk_size=300)
    assert res_paths["top1"] == ref["top1"] == res_mm["top1"]
    assert res_paths["settings"]["n_train"] == 1500


def test_settings_metadata_and_json(tmp_path):
    xtr, ytr, xte, yte = _data(seed=3)
    res = eval_knn(
        xtr,
        ytr,
        xte,
        yte,
        ks=(10, 20),
        device="cpu",
        metadata={"layer": "res5", "resolution": 224, "checkpoint": "ckpt.safetensors"},
    )
    s = res["settings"]
    assert s["ks"] == [10, 20] and s["temperature"] == 0.07 and s["normalize"] is True
    assert s["n_train"] == 1500 and s["n_test"] == 200 and s["n_classes"] == 13 and s["feature_dim"] == 24
    assert s["backend"] in ("torch", "faiss") and s["backend_choice"]["requested"] == "auto"
    assert s["k_effective"] == {10: 10, 20: 20}
    assert res["metadata"]["layer"] == "res5"
    out = write_json(res, tmp_path / "sub" / "knn.json")
    loaded = json.loads(out.read_text())
    assert loaded["top1"]["20"] == res["top1"][20]
    assert loaded["metadata"]["checkpoint"] == "ckpt.safetensors"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def backend_probe(monkeypatch):
    """backend="auto" on its own: no SEER_KNN_BACKEND, an empty probe cache, a small probe, and per-backend counts
    of search calls (the process's real cache comes back afterwards)."""
    monkeypatch.delenv(knn.BACKEND_ENV, raising=False)
    monkeypatch.setattr(knn, "_BACKEND_CACHE", {})
    monkeypatch.setattr(knn, "PROBE_TRAIN", 1024)
    monkeypatch.setattr(knn, "PROBE_TEST", 64)
    monkeypatch.setattr(knn, "PROBE_K", 20)
    calls = {"torch": 0, "faiss": 0}
    for name in calls:
        real = getattr(knn, f"_search_{name}")

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(knn, f"_search_{name}", counted)
    return calls


def _no_probe(dim):
    raise AssertionError("this choice must not run the probe")


@pytest.mark.parametrize("forced", ["torch", "faiss"])
def test_auto_obeys_forced_backend(forced, backend_probe, monkeypatch):
    if forced == "faiss":
        pytest.importorskip("faiss")
    monkeypatch.setattr(knn, "_probe_seconds", _no_probe)
    monkeypatch.setenv(knn.BACKEND_ENV, f" {forced.upper()} ")  # case and spaces are forgiven
    xtr, ytr, xte, yte = _data(seed=10)
    res = eval_knn(xtr, ytr, xte, yte, ks=(5, 20), device="cpu")
    assert res["settings"]["backend"] == forced
    assert res["settings"]["backend_choice"] == {
        "requested": "auto",
        "rule": "forced by SEER_KNN_BACKEND",
        "seconds": {},
    }
    assert backend_probe == {"torch": int(forced == "torch"), "faiss": int(forced == "faiss")}  # it really ran
    knn_search(xtr, xte, 5, device="cpu")
    assert backend_probe[forced] == 2
    explicit = eval_knn(xtr, ytr, xte, yte, ks=(5, 20), device="cpu", backend="torch")
    assert explicit["settings"]["backend_choice"] == {"requested": "torch", "rule": "requested", "seconds": {}}
    assert explicit["top1"] == res["top1"] and explicit["top5"] == res["top5"]  # exact either way
    monkeypatch.setenv(knn.BACKEND_ENV, "annoy")
    with pytest.raises(ValueError, match="SEER_KNN_BACKEND must be"):
        eval_knn(xtr, ytr, xte, yte, ks=(5,), device="cpu")


def test_probe_times_both_and_caches(backend_probe):
    pytest.importorskip("faiss")
    name, record = knn.pick_backend("cpu", 64)
    assert name in ("torch", "faiss") and record["rule"] == "probe"
    seconds = record["seconds"]
    assert set(seconds) == {"torch", "faiss"} and all(0 < s < 10 for s in seconds.values())
    assert seconds[name] == min(seconds.values())
    assert backend_probe == {"torch": knn.PROBE_REPEATS, "faiss": knn.PROBE_REPEATS}
    # Cached: neither a second call nor eval_knn times again; eval_knn records the cached probe and runs its pick.
    assert knn.pick_backend("cpu", 64) == (name, record)
    xtr, ytr, xte, yte = _data(seed=11)
    res = eval_knn(xtr, ytr, xte, yte, ks=(5,), device="cpu")
    assert res["settings"]["backend"] == name
    assert res["settings"]["backend_choice"] == {"requested": "auto", **record}
    other = "faiss" if name == "torch" else "torch"
    assert backend_probe == {name: knn.PROBE_REPEATS + 1, other: knn.PROBE_REPEATS}
    knn.clear_backend_cache()
    knn.pick_backend("cpu", 64)
    assert backend_probe == {name: 2 * knn.PROBE_REPEATS + 1, other: 2 * knn.PROBE_REPEATS}


@pytest.mark.parametrize("slow", ["torch", "faiss"])
def test_probe_picks_the_faster(slow, backend_probe, monkeypatch):
    pytest.importorskip("faiss")
    real = getattr(knn, f"_search_{slow}")

    def slowed(*args, **kwargs):
        time.sleep(0.25)  # far more than either search of the small probe takes
        return real(*args, **kwargs)

    monkeypatch.setattr(knn, f"_search_{slow}", slowed)
    name, record = knn.pick_backend("cpu", 16)
    assert name == ("faiss" if slow == "torch" else "torch")
    assert record["seconds"][slow] > 0.25 > record["seconds"][name]


def test_auto_without_faiss_picks_torch(backend_probe, monkeypatch):
    # A faiss choice cached while faiss was importable must not outlive faiss.
    knn._BACKEND_CACHE[("cpu", torch.get_num_threads())] = ("faiss", {"rule": "probe", "seconds": {}})
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    monkeypatch.setattr(knn, "_probe_seconds", _no_probe)
    xtr, ytr, xte, yte = _data(seed=12)
    res = eval_knn(xtr, ytr, xte, yte, ks=(5,), device="cpu")
    assert res["settings"]["backend"] == "torch"
    assert res["settings"]["backend_choice"] == {"requested": "auto", "rule": "faiss not installed", "seconds": {}}
    knn_search(xtr, xte, 5, device="cpu")
    assert backend_probe == {"torch": 2, "faiss": 0}
    # CUDA keeps torch without probing (no GPU needed: the device is only named).
    assert knn.pick_backend("cuda", 64) == ("torch", {"rule": "cuda: torch, not probed", "seconds": {}})


def test_many_classes_no_hard_coded_count():
    rng = np.random.default_rng(0)
    n_classes = 1500  # more than 1000
    xtr = rng.normal(size=(3000, 16)).astype(np.float32)
    ytr = np.repeat(np.arange(n_classes), 2)
    xte = xtr[::2] + 0.01 * rng.normal(size=(1500, 16)).astype(np.float32)
    res = eval_knn(xtr, ytr, xte, ytr[::2], ks=(1, 2), device="cpu")
    assert res["settings"]["n_classes"] == n_classes
    assert res["top1"][1] > 0.99


def test_few_shot_averages_seeded_tries():
    xtr, ytr, xte, yte = _data(seed=4)
    res = eval_knn(xtr, ytr, xte, yte, ks=(1, 10, 20), n_per_class=2, n_tries=3, seed=5, device="cpu")
    assert len(res["tries"]) == 3 and [t["seed"] for t in res["tries"]] == [5, 6, 7]
    assert all(t["n_train"] == 26 for t in res["tries"])
    # k=20 > 26? no; k_effective is clamped only when needed. Each try equals a brute-force run on its rows.
    classes = np.unique(np.concatenate([ytr, yte]))
    rows = _few_shot_rows(np.searchsorted(classes, ytr), 2, 6)
    ref1, _, _ = brute_force_knn(xtr[rows], ytr[rows], xte, yte, (1, 10, 20), 0.07)
    assert res["tries"][1]["top1"] == pytest.approx(ref1)
    assert res["top1"][10] == pytest.approx(np.mean([t["top1"][10] for t in res["tries"]]))
    # 1-shot with k = 20 > 13 samples: clamped (documented), recorded
    one = eval_knn(xtr, ytr, xte, yte, ks=(20,), n_per_class=1, n_tries=2, device="cpu")
    assert one["tries"][0]["k_effective"] == {20: 13}


def test_k_larger_than_bank():
    xtr, ytr, xte, yte = _data(n_train=50, seed=5)
    with pytest.raises(ValueError, match="larger than the train bank"):
        eval_knn(xtr, ytr, xte, yte, ks=(10, 200), device="cpu")
    res = eval_knn(xtr, ytr, xte, yte, ks=(10, 200), clamp_k=True, device="cpu")
    assert res["settings"]["k_effective"] == {10: 10, 200: 50}
    full = eval_knn(xtr, ytr, xte, yte, ks=(50,), device="cpu")
    assert res["top1"][200] == full["top1"][50]


def test_bad_inputs():
    xtr, ytr, xte, yte = _data(seed=6)
    with pytest.raises(ValueError, match="train_features has 1500 rows but train_labels has 1499"):
        eval_knn(xtr, ytr[:-1], xte, yte)
    with pytest.raises(ValueError, match="test_features has 200 rows but test_labels has 3"):
        eval_knn(xtr, ytr, xte, yte[:3])
    with pytest.raises(TypeError, match="integers"):
        eval_knn(xtr, ytr.astype(np.float32), xte, yte)
    with pytest.raises(TypeError, match="integers"):
        eval_knn(xtr, ytr, xte, np.array(["cat"] * 200))
    with pytest.raises(ValueError, match="feature dims differ"):
        eval_knn(xtr, ytr, xte[:, :5], yte)
    bad = xtr.copy()
    bad[1234, 3] = np.nan  # in a late chunk: checked while streaming
    with pytest.raises(ValueError, match=r"train_features contains NaN.*1234"):
        eval_knn(bad, ytr, xte, yte, train_chunk_size=256)
    bad_te = xte.copy()
    bad_te[7] = np.inf
    with pytest.raises(ValueError, match="test_features contains NaN"):
        eval_knn(xtr, ytr, bad_te, yte)
    with pytest.raises(ValueError, match="backend"):
        eval_knn(xtr, ytr, xte, yte, backend="annoy")
    with pytest.raises(ValueError, match="ks"):
        eval_knn(xtr, ytr, xte, yte, ks=(0, 5))


def test_class_with_one_sample_and_unseen_test_class():
    xtr, ytr, xte, yte = _data(seed=7)
    ytr = ytr.copy()
    ytr[0] = 999  # a class with a single train sample
    yte = yte.copy()
    yte[:5] = 12345  # test classes absent from train can never be predicted
    res = eval_knn(xtr, ytr, xte, yte, ks=(1, 10), device="cpu", return_predictions=True)
    assert res["settings"]["n_classes"] == 15
    assert not (res["predictions"][1][:5, 0] == 12345).any()


def test_cli_writes_json(tmp_path):
    xtr, ytr, xte, yte = _data(seed=8)
    np.save(tmp_path / "train.npy", xtr)
    np.save(tmp_path / "train.labels.npy", ytr)
    np.savez(tmp_path / "test.npz", features=xte, labels=yte)
    out = tmp_path / "knn.json"
    rc = cli_main(
        [
            "--train",
            str(tmp_path / "train.npy"),
            "--test",
            str(tmp_path / "test.npz"),
            "--ks",
            "5",
            "20",
            "--meta",
            "layer=res4",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    direct = eval_knn(xtr, ytr, xte, yte, ks=(5, 20), device="cpu")
    assert res["top1"]["20"] == direct["top1"][20]
    assert res["metadata"]["layer"] == "res4" and res["settings"]["ks"] == [5, 20]


def test_cli_on_seer_extract_output(tmp_path):
    from seer.data.synthetic import write_image_folder
    from seer.features import extract_dataset
    from seer.models.regnet import RegNetCfg, build_trunk

    folder = write_image_folder(tmp_path / "imgs", n_per_class=3, size=32, n_classes=3)
    trunk = build_trunk(RegNetCfg(depth=4, w0=16, wa=8.0, wm=2.0, group_w=8)).eval()
    extract_dataset(str(folder), tmp_path / "feats", trunk, resolution=32, batch_size=4, num_workers=0, progress=False)
    out = tmp_path / "knn.json"
    assert (
        cli_main(
            [
                "--train",
                str(tmp_path / "feats"),
                "--test",
                str(tmp_path / "feats" / "features.npy"),
                "--ks",
                "1",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["top1"]["1"] == 1.0 and res["settings"]["n_train"] == 9  # each image finds itself
    assert res["metadata"]["train_features_meta"]["layer"] == "avgpool"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_cuda_matches_cpu(backend):
    xtr, ytr, xte, yte = _data(seed=9)
    cpu = eval_knn(xtr, ytr, xte, yte, device="cpu", return_predictions=True)
    gpu = eval_knn(xtr, ytr, xte, yte, device="cuda", backend=backend, train_chunk_size=256, return_predictions=True)
    assert gpu["settings"]["device"].startswith("cuda")
    for k in cpu["settings"]["ks"]:
        np.testing.assert_array_equal(gpu["predictions"][k], cpu["predictions"][k])


def test_small_search_does_not_start_a_probe_but_uses_a_paid_one(backend_probe, monkeypatch):
    pytest.importorskip("faiss")
    xtr, ytr, xte, yte = _data(seed=12)
    monkeypatch.setattr(knn, "_probe_seconds", _no_probe)
    res = eval_knn(xtr, ytr, xte, yte, ks=(5,), device="cpu")
    assert res["settings"]["backend"] == "torch"
    assert res["settings"]["backend_choice"]["rule"].startswith(f"small search ({len(xtr) * len(xte)} pairs")
    assert backend_probe == {"torch": 1, "faiss": 0}
    paid = ("faiss", {"rule": "probe", "seconds": {"faiss": 0.1, "torch": 0.2}})
    monkeypatch.setitem(knn._BACKEND_CACHE, ("cpu", torch.get_num_threads()), paid)
    assert eval_knn(xtr, ytr, xte, yte, ks=(5,), device="cpu")["settings"]["backend"] == "faiss"
