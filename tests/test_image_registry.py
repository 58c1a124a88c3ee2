"""The registry of shipped images (seer.data.tasks.SHIPPED_IMAGES): no pixel and no scene serves two purposes that
must stay apart, the registered files are the installed ones, and each task reads only the files registered for it,
in its purpose."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seer.data import tasks

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sklearn": "scikit-learn", "skimage": "scikit-image", "matplotlib": "matplotlib"}
# purposes kept apart at the scene level, whatever the registry's own rule says: the recipe may have been tuned on
# any pixel of a tuning scene, and copy-detection originals must be scenes no trunk trained on and no test set holds
MUST_NOT_SHARE_A_SCENE = [("tuning", p) for p in tasks.PURPOSES if p != "tuning"] + [
    ("copy_originals", p) for p in tasks.PURPOSES if p not in ("tuning", "copy_originals")
]
WHOLE_ONLY_KINDS = ("photo_stack", "digits_table", "font")  # arrays of items, tables, fonts: no columns to cut
REAL_PHOTO_KINDS = ("photo", "photo_stack")
# where the packages keep their image files, and what counts as one
IMAGE_DIRS = {"sklearn": "datasets/images", "skimage": "data", "matplotlib": "mpl-data/sample_data"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff", ".bmp", ".npy", ".npz", ".ima.gz")


def violations(entries, sharing=tasks.SCENE_SHARING, task_purposes=tasks.TASK_PURPOSES) -> list[str]:
    """Everything in ``entries`` that breaks the registry's rules (an empty list: none)."""
    problems = []
    for key in ("id", "path", "sha256"):
        seen = [getattr(e, key) if key != "path" else (e.package, e.path) for e in entries]
        problems += [f"{key} {v!r} registered twice" for v in {v for v in seen if seen.count(v) > 1}]
    scenes: dict[str, list] = {}
    for e in entries:
        scenes.setdefault(e.scene, []).append(e)
        if e.kind not in tasks.KINDS:
            problems.append(f"{e.id}: unknown kind {e.kind!r}")
        purposes = [p for p, _, _ in e.regions]
        if not purposes or len(set(purposes)) != len(purposes):
            problems.append(f"{e.id}: each purpose once, at least one: {purposes}")
        problems += [f"{e.id}: unknown purpose {p!r}" for p in purposes if p not in tasks.PURPOSES]
        spans = sorted((x0, x1) for _, x0, x1 in e.regions)
        if any(not 0.0 <= x0 < x1 <= 1.0 for x0, x1 in spans):
            problems.append(f"{e.id}: a column range outside [0, 1] or empty: {spans}")
        # sorted and touching at most: int(x * width) is monotone, so the pixel columns are disjoint at any width
        if any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
            problems.append(f"{e.id}: two purposes share pixels: {e.regions}")
        if e.kind in WHOLE_ONLY_KINDS and spans != [(0.0, 1.0)]:
            problems.append(f"{e.id}: a {e.kind} serves one purpose, whole: {e.regions}")
        if "untuned" in purposes and e.kind not in REAL_PHOTO_KINDS:
            problems.append(f"{e.id}: the untuned tasks take real photos only, not a {e.kind}")
        for task in e.tasks:
            if task not in task_purposes or task_purposes[task] not in purposes:
                problems.append(f"{e.id}: read by task {task!r}, but not in its purpose")
    for scene, files in scenes.items():
        purposes = {p for e in files for p, _, _ in e.regions}
        for a, b in itertools.combinations(sorted(purposes), 2):
            if frozenset((a, b)) not in sharing:
                problems.append(f"scene {scene!r} serves both {a!r} and {b!r}, which must stay apart")
        if len(files) > 1 and len(purposes) > 1:  # columns of two views of one scene are not disjoint content
            problems.append(f"scene {scene!r} has {len(files)} files: they serve one purpose, whole")
    return problems


def test_the_rule_keeps_apart_what_must_stay_apart():
    assert list(tasks.PURPOSES) == ["tuning", "untuned", "copy_originals", "curation_pool", "curation_test"]
    allowed = [tuple(sorted(pair)) for pair in tasks.SCENE_SHARING]
    assert not [pair for pair in MUST_NOT_SHARE_A_SCENE if tuple(sorted(pair)) in allowed]
    assert all(set(pair) <= set(tasks.PURPOSES) for pair in allowed)


def test_no_image_serves_two_purposes_that_must_stay_apart():
    assert violations(list(tasks.SHIPPED_IMAGES.values())) == []


def _bad(image_id: str, **changes):
    entries = dict(tasks.SHIPPED_IMAGES)
    entries[image_id] = dataclasses.replace(entries[image_id], **changes)
    return list(entries.values())


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (_bad("skimage:brick", regions=(("tuning", 0.0, 0.6), ("untuned", 0.6, 1.0))), "'tuning' and 'untuned'"),
        (_bad("skimage:astronaut", regions=(("untuned", 0, 0.6), ("curation_pool", 0.5, 1))), "share pixels"),
        (_bad("skimage:rocket", regions=(("copy_originals", 0, 0.5), ("curation_test", 0.5, 1))), "must stay apart"),
        (_bad("skimage:rocket", scene="skimage:coffee"), "'copy_originals' and 'curation_pool'"),
        (_bad("skimage:motorcycle_right", regions=(("curation_pool", 0.0, 1.0),)), "must stay apart"),
        (_bad("skimage:lfw_subset", regions=(("untuned", 0.0, 0.5),)), "serves one purpose, whole"),
        (_bad("matplotlib:s1045", regions=(("untuned", 0.0, 1.0),)), "real photos only"),
        (_bad("sklearn:china", tasks=("digits_on_photos", "textures"), regions=(("untuned", 0.0, 1.0),)),
         "not in its purpose"),
        (_bad("skimage:camera", sha256=tasks.SHIPPED_IMAGES["skimage:coins"].sha256), "registered twice"),
        (_bad("skimage:coffee", regions=(("finetuning", 0.0, 1.0),)), "unknown purpose"),
    ],
)  # fmt: skip
def test_the_separation_check_finds_each_kind_of_mix(entries, expected):
    assert any(expected in p for p in violations(entries)), violations(entries)


def test_the_share_is_enough_for_each_purpose():
    """Two untuned tasks of 3 classes or more, curation's 10 classes (issue 34), copy originals from 2 scenes."""
    scenes = {p: {e.scene for e in tasks.SHIPPED_IMAGES.values() if p in e.purposes} for p in tasks.PURPOSES}
    assert len(scenes["untuned"]) >= 6
    assert len(scenes["curation_pool"]) >= 10 and scenes["curation_pool"] == scenes["curation_test"]
    assert len(scenes["copy_originals"]) >= 2
    used = {e.id for e in tasks.SHIPPED_IMAGES.values() if e.tasks}
    assert used == {e.id for e in tasks.SHIPPED_IMAGES.values() if "tuning" in e.purposes}


def _installed(package: str) -> Path:
    root = tasks._package_dir(package)
    if root is None:  # CI installs them all: scikit-learn is a dependency, the others are in the dev extra
        pytest.skip(f"{PACKAGES[package]} is not installed here (pip install {PACKAGES[package]})")
    return root


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_the_registered_files_are_the_installed_ones(package):
    root = _installed(package)
    entries = [e for e in tasks.SHIPPED_IMAGES.values() if e.package == package]
    assert entries
    changed = {e.id: e.path for e in entries if hashlib.sha256((root / e.path).read_bytes()).hexdigest() != e.sha256}
    assert not changed, f"{PACKAGES[package]} changed these files: re-check their purposes, then their sha256"


def test_ci_installs_every_package_the_registry_reads():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {r.split(">")[0].split("=")[0].split("[")[0].strip().lower()
             for r in project["dependencies"] + project["optional-dependencies"]["dev"]}  # fmt: skip
    assert {PACKAGES[e.package] for e in tasks.SHIPPED_IMAGES.values()} <= names


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_image_file_the_packages_ship_is_registered_or_excluded(package):
    root = _installed(package)
    files = sorted(p.relative_to(root).as_posix() for p in (root / IMAGE_DIRS[package]).rglob("*")
                   if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))  # fmt: skip
    registered = {e.path for e in tasks.SHIPPED_IMAGES.values() if e.package == package}
    excluded = {k.split(":", 1)[1] for k in tasks.UNREGISTERED if k.split(":", 1)[0] == package}
    assert files
    assert [f for f in files if f not in registered | excluded] == [], "a new image file: give it a purpose or a reason"
    assert excluded <= set(files), "UNREGISTERED names files the package no longer ships"


# Runs every task in a fresh interpreter and records each file it opens inside the three packages (an audit hook sees
# every open() of Python code, PIL's and numpy's included; FreeType opens fonts in C, so truetype is watched).
_WATCH = r"""
import json, os, sys
from PIL import ImageFont
from seer.data import tasks
roots = [str(r) for r in map(tasks._package_dir, ("sklearn", "skimage", "matplotlib")) if r is not None]
opened, current = {}, [None]
def note(path):
    path = str(path)
    if current[0] and path.startswith(tuple(roots)) and not path.endswith((".py", ".pyc", ".so")):
        opened[current[0]].add(path)
def hook(event, args):
    if event == "open" and not isinstance(args[0], int):  # a path, not a file descriptor
        note(os.fsdecode(args[0]))
sys.addaudithook(hook)
truetype = ImageFont.truetype
ImageFont.truetype = lambda font, *a, **k: (note(font), truetype(font, *a, **k))[1]
for name in sys.argv[1:]:
    for cache in (tasks._decode, tasks._sample_photos, tasks._file_sha256):
        cache.cache_clear()
    current[0] = name
    opened[name] = set()
    tasks.make_task(name, n_train=40, n_test=20, size=32, seed=0)
    current[0] = None
print(json.dumps({k: sorted(v) for k, v in opened.items()}))
"""


def test_each_task_reads_only_the_files_registered_for_it():
    names = sorted(tasks.TASKS)
    if tasks._package_dir("skimage") is None:
        names.remove("textures")
    proc = subprocess.run([sys.executable, "-c", _WATCH, *names], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    opened = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(tasks.TASK_PURPOSES) == set(tasks.TASKS)
    for name in names:
        registered = {e for e in tasks.SHIPPED_IMAGES.values() if name in e.tasks}
        paths = {str(tasks._package_dir(e.package) / e.path): e for e in registered}
        assert set(opened[name]) <= set(paths), f"task {name!r} read unregistered files"
        # every registered image is read (fonts: those the draw picked, so at least one)
        images = {p for p, e in paths.items() if e.kind != "font"}
        assert images <= set(opened[name]), f"task {name!r} is registered for files it never reads"
        fonts = {p for p, e in paths.items() if e.kind == "font"}
        assert bool(fonts) == bool(set(opened[name]) & fonts)


def test_a_task_asking_for_an_image_outside_its_purpose_fails(monkeypatch):
    monkeypatch.setitem(tasks.TASK_PURPOSES, "digits", "untuned")
    with pytest.raises(ValueError, match="task 'digits' asks for shipped image 'sklearn:digits' as 'untuned', but "
                                         r"it serves \['tuning'\] only"):  # fmt: skip
        tasks.make_task("digits", n_train=4, n_test=2)
    with pytest.raises(ValueError, match="task 'textures' reads shipped image 'skimage:astronaut', which is not "
                                         r"registered for it \(it is for no task\)"):  # fmt: skip
        tasks._task_image("textures", "skimage:astronaut")
    with pytest.raises(ValueError, match="'skimage:astronaut' as 'tuning', but it serves"):
        tasks.shipped_image("skimage:astronaut", "tuning")
    with pytest.raises(ValueError, match="unknown purpose 'testing'; choose one of"):
        tasks.shipped_images("testing")
    with pytest.raises(ValueError, match="no shipped image 'skimage:lena' is registered"):
        tasks.shipped_image("skimage:lena", "untuned")


def test_shipped_images_are_each_purposes_columns_of_the_file():
    _installed("skimage")
    _installed("matplotlib")
    parts = [tasks.shipped_image("skimage:chelsea", p) for p in ("untuned", "curation_pool", "curation_test")]
    whole = np.asarray(Image.open(tasks.shipped_path("skimage:chelsea")))
    assert [p.shape[1] for p in parts] == [270, 383 - 270, 451 - 383] and whole.shape == (300, 451, 3)
    assert np.array_equal(np.concatenate(parts, axis=1), whole)
    assert not parts[0].flags.writeable  # the cached decode is shared: nobody may write into it
    untuned = tasks.shipped_images("untuned")
    assert set(untuned) == {e.id for e in tasks.SHIPPED_IMAGES.values() if "untuned" in e.purposes}
    assert untuned["skimage:lfw_subset"].shape == (200, 25, 25)
    copies = tasks.shipped_images("copy_originals")
    assert sorted(copies) == ["skimage:motorcycle_left", "skimage:motorcycle_right", "skimage:rocket"]
    assert all(a.dtype == np.uint8 and a.ndim == 3 for a in copies.values())


def test_curation_reads_the_real_images_that_are_not_photos():
    _installed("matplotlib")
    _installed("skimage")
    pool, test = tasks.shipped_images("curation_pool"), tasks.shipped_images("curation_test")
    assert set(pool) == set(test)
    mri = tasks.shipped_image("matplotlib:s1045", "curation_pool")
    assert mri.dtype == np.uint16 and mri.shape == (256, 192)  # the left 75% of a 256 x 256 slice
    assert pool["matplotlib:jacksboro_fault_dem"].shape[0] == test["matplotlib:jacksboro_fault_dem"].shape[0] == 344


def test_a_changed_or_missing_file_is_noticed(monkeypatch, tmp_path):
    images = tmp_path / "datasets" / "images"
    images.mkdir(parents=True)
    (images / "china.jpg").write_bytes(b"not the registered photo")
    monkeypatch.setattr(tasks, "_package_dir", lambda package: tmp_path)
    monkeypatch.setattr(tasks, "_WARNED", set())
    with pytest.warns(UserWarning, match=r"china.jpg \('sklearn:china'\) is not the file seer registered"):
        assert tasks.shipped_path("sklearn:china") == images / "china.jpg"
    with pytest.raises(FileNotFoundError, match=r"needs .*datasets/images/flower.jpg, which the installed "
                                                r"scikit-learn does not have"):  # fmt: skip
        tasks.shipped_path("sklearn:flower")


def test_a_missing_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match="task 'glyphs' needs matplotlib's mpl-data/fonts/ttf/.*pip install "
                                           "matplotlib"):  # fmt: skip
        tasks.make_task("glyphs", n_train=4, n_test=2)
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(RuntimeError, match="'skimage:motorcycle_left' needs scikit-image's data/motorcycle_left.png, "
                                           "and scikit-image is not installed: pip install scikit-image"):  # fmt: skip
        tasks.shipped_images("copy_originals")
