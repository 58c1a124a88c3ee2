"""seer.catalog: shipped recipes and suites by name (source checkout and installed wheel), by path, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from seer import catalog
from seer.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not through the working directory
    assert catalog.resolve("seer_rg32", "pretrain") == ROOT / "configs" / "pretrain" / "seer_rg32.yaml"
    assert catalog.resolve("small", "eval") == ROOT / "configs" / "eval" / "small.yaml"
    assert catalog.available("pretrain") == sorted(p.stem for p in (ROOT / "configs" / "pretrain").glob("*.yaml"))
    assert {"small", "imagenet1k", "inat2018", "places205"} <= set(catalog.available("eval"))
    assert load_config("seer_rg32").model.preset == "regnety_32gf"


def test_an_existing_path_comes_first(tmp_path, monkeypatch):
    own = tmp_path / "seer_rg32.yaml"
    own.write_text("model: {preset: regnety_400mf}\n")
    assert catalog.resolve(own, "pretrain") == own
    assert catalog.resolve(str(own), "pretrain") == own
    monkeypatch.chdir(tmp_path)
    bare = tmp_path / "tiny_cpu"  # a file in the working directory named like a recipe wins over the recipe
    bare.write_text("train: {total_steps: 7}\n")
    assert catalog.resolve("tiny_cpu", "pretrain") == Path("tiny_cpu")
    assert load_config("tiny_cpu").train.total_steps == 7
    assert load_config(str(ROOT / "configs" / "pretrain" / "tiny_cpu.yaml")).train.total_steps == 600


def test_unknown_names_and_missing_paths(tmp_path):
    with pytest.raises(catalog.RecipeNotFoundError, match="did you mean seer_rg32") as info:
        catalog.resolve("seer_rg23", "pretrain")
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in catalog.available("pretrain"))
    assert isinstance(info.value, FileNotFoundError)  # callers that catch FileNotFoundError keep working
    with pytest.raises(catalog.RecipeNotFoundError, match="shipped: .*small"):
        catalog.resolve("no_such_suite_at_all", "eval")
    with pytest.raises(catalog.RecipeNotFoundError, match="file not found: .*nope.yaml"):
        catalog.resolve(tmp_path / "nope.yaml", "pretrain")
    # a path to a missing file named like a recipe: say that the name works
    with pytest.raises(catalog.RecipeNotFoundError, match="pass just 'seer_10b'"):
        catalog.resolve("elsewhere/configs/pretrain/seer_10b.yaml", "pretrain")
    with pytest.raises(catalog.RecipeNotFoundError, match="a directory"):
        catalog.resolve(tmp_path, "eval")
    with pytest.raises(catalog.RecipeNotFoundError, match="empty"):
        catalog.resolve("", "pretrain")
    with pytest.raises(ValueError, match="kind"):
        catalog.resolve("small", "evaluation")


def test_an_installed_wheel_finds_its_package_data(tmp_path, monkeypatch):
    """A wheel ships configs/ as seer/recipes/ beside the modules, and no configs/ next to the package."""
    pkg = tmp_path / "site-packages" / "seer"
    shutil.copytree(ROOT / "configs", pkg / "recipes")
    (pkg / "recipes" / "eval" / "only_in_wheel.yaml").write_text("name: w\n")
    monkeypatch.setattr(catalog, "PACKAGE_DIR", pkg)
    assert catalog.search_dirs("eval")[0] == pkg / "recipes" / "eval"
    assert catalog.resolve("seer_10b", "pretrain") == pkg / "recipes" / "pretrain" / "seer_10b.yaml"
    assert catalog.resolve("only_in_wheel", "eval") == pkg / "recipes" / "eval" / "only_in_wheel.yaml"
    assert "only_in_wheel" in catalog.available("eval")
    shutil.rmtree(pkg / "recipes")  # package data not installed: the error says so
    with pytest.raises(catalog.RecipeNotFoundError, match="is the package data installed"):
        catalog.resolve("seer_10b", "pretrain")


def test_seer_pretrain_and_plan_take_names(capsys):
    from seer.cli import main

    assert main(["plan", "--config", "seer_10b", "--world-size", "496", "--gpu-memory-gb", "40"]) == 0
    assert "FITS" in capsys.readouterr().out
    assert main(["pretrain", "--config", "seer_rg23"]) == 2  # nothing starts
    err = capsys.readouterr().err
    assert err.startswith("seer pretrain: ") and "did you mean seer_rg32" in err and err.count("\n") == 1
