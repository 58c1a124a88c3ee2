"""The small real-image tasks of seer.data.tasks: shapes, labels, determinism, and train/test separation."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from seer.data import tasks


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_every_task_builds_labeled_rgb_images_deterministically(name):
    if name == "textures":
        pytest.importorskip("skimage")
    a = tasks.make_task(name, n_train=30, n_test=12, size=32, seed=3)
    b = tasks.make_task(name, n_train=30, n_test=12, size=32, seed=3)
    assert len(a["classes"]) == 10
    for part, n in (("train", 30), ("test", 12)):
        images, labels = a[part]
        assert len(images) == n and labels.shape == (n,) and labels.dtype == np.int64
        assert all(im.size == (32, 32) and im.mode == "RGB" for im in images)
        assert labels.min() >= 0 and labels.max() < 10
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(images, b[part][0]))
    c = tasks.make_task(name, n_train=30, n_test=12, size=32, seed=4)
    assert not np.array_equal(np.asarray(a["train"][0][0]), np.asarray(c["train"][0][0]))


def test_printed_digits_tests_on_fonts_never_seen_in_train(monkeypatch):
    seen: dict[str, set] = {"train": set(), "test": set()}
    real = tasks.ImageFont.truetype
    part = {"now": "train"}

    def spy(path, size):
        seen[part["now"]].add(path)
        return real(path, size)

    real_place = tasks._place
    count = {"n": 0}

    def place(*a, **k):  # the train images come first: switch after n_train of them
        count["n"] += 1
        if count["n"] == 40:
            part["now"] = "test"
        return real_place(*a, **k)

    monkeypatch.setattr(tasks.ImageFont, "truetype", spy)
    monkeypatch.setattr(tasks, "_place", place)
    tasks.make_task("printed_digits", n_train=40, n_test=40, seed=0)
    assert seen["train"] and seen["test"] and not (seen["train"] & seen["test"])


def test_textures_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(RuntimeError, match="pip install scikit-image"):
        tasks.make_task("textures", n_train=2, n_test=2)


def test_unknown_task_lists_the_choices():
    with pytest.raises(ValueError, match="unknown task 'cifar'.*printed_digits.*textures"):
        tasks.make_task("cifar")
