"""The top of the `seer` command: `seer --version` / `-V`, `seer config show`, and `seer pretrain --help` pointing
at it. The key docs are the comments in the dataclass sources, read by `seer.config_doc`."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

import seer
from seer import extras
from seer.cli import main
from seer.config import PretrainConfig, config_to_dict, load_config
from seer.config_doc import field_comments, key_docs, section_docs

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# seer --version
# ----------------------------------------------------------------------------------------------------------------
def test_version_prints_what_a_bug_report_needs_and_imports_nothing_heavy():
    code = (
        "import json, sys\n"
        "from seer.cli import main\n"
        "assert main(['--version']) == 0\n"
        "print('=====')\n"
        "assert main(['-V']) == 0\n"
        "print('=====')\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    long, short, modules = out.split("=====\n")
    assert long == short
    lines = long.splitlines()
    assert lines[0].startswith(f"seer {seer.__version__} (seer-ssl, ")
    assert f"python {sys.version.split()[0]}" in long
    assert f"torch {torch.__version__}" in long
    if torch.version.cuda:
        assert f"built for CUDA {torch.version.cuda}" in long
    else:
        assert "CPU-only build" in long
    assert f"torchvision {importlib.metadata.version('torchvision')}" in long
    assert re.search(r"oneDNN bf16 (yes|no), fp16 (yes|no); AMX (yes|no)", long)
    from seer import hardware

    assert f"oneDNN bf16 {'yes' if hardware.cpu_bf16_kernels() else 'no'}" in long
    # every extra seer knows, installed or not, as find_spec sees its modules
    rows = dict(re.findall(r"^  (\w+) +(yes|no)\b", long, flags=re.M))
    for module, (extra, _) in extras.EXTRAS.items():
        if "." not in module:
            installed = importlib.util.find_spec(module) is not None
            assert rows[extra] == "yes" or not installed, (extra, module)
    for extra, state in rows.items():
        if state == "no":
            assert f'pip install "seer-ssl[{extra}]"' in long
    # fast: no model, loader or evaluation module was imported for it
    loaded = set(json.loads(modules))
    heavy = {"seer.weights", "seer.features", "seer.train", "seer.evaluation", "torchvision", "timm", "faiss",
             "onnxruntime", "openvino", "matplotlib"}  # fmt: skip
    assert not loaded & heavy, sorted(loaded & heavy)


def test_help_lists_config_show_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "seer --version" in out and re.search(r"^  config +config show RECIPE", out, flags=re.M)


@pytest.mark.parametrize("kind, hint", [("pretrain", "seer config show RECIPE"), ("finetune", "--kind finetune")])
def test_pretrain_help_points_at_config_show(capsys, kind, hint):
    with pytest.raises(SystemExit) as exc:
        main([kind, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "seer config show RECIPE" in out and hint in out


# ----------------------------------------------------------------------------------------------------------------
# Docs from the source
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Documented:
    """A section.

    More prose that is not the header.
    """

    plain: int = 0
    inline: int = 1  # the inline doc
    # the block above,
    # over two lines,
    above: str = "x"  # then its inline tail

    # a comment a blank line separates from the field

    separated: bool = False
    multi: list = field(
        default_factory=list  # inside the call
    )
    directive: int = 0  # fmt: skip
    hashed: str = "a # inside a string"
    union: dict | None = None  # typed as written


def test_field_comments_read_the_dataclass_source():
    docs = field_comments(_Documented)
    assert {name: doc for name, (_, doc) in docs.items()} == {
        "plain": "",
        "inline": "the inline doc",
        "above": "the block above, over two lines, then its inline tail",
        "separated": "",
        "multi": "inside the call",
        "directive": "",
        "hashed": "",
        "union": "typed as written",
    }
    assert docs["union"][0] == "dict | None" and docs["multi"][0] == "list"
    assert section_docs(_Documented) == {"": "A section."}


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(_section_type(prefix + key)):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _section_type(dotted: str):
    node = PretrainConfig()
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_key_docs_cover_every_key_of_the_tree_method_sections_included():
    keys = [kd.key for kd in key_docs()]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(_leaves(config_to_dict(PretrainConfig())))
    assert {"swav.n_prototypes", "supervised.n_classes", "train.fsdp.reduce_dtype", "run_dir"} <= set(keys)
    defaults = {kd.key: kd.default for kd in key_docs()}
    assert defaults == _leaves(config_to_dict(PretrainConfig()))


# Keys whose field has no comment (seer/config.py, seer/ssl/swav.py SwAVConfig, seer/train/supervised.py): none. A
# new key must come with one, so that `seer config show` documents every key.
UNDOCUMENTED: set[str] = set()


def test_every_key_has_a_doc():
    missing = sorted(kd.key for kd in key_docs() if not kd.doc)
    assert set(missing) <= UNDOCUMENTED, f"keys without a doc comment: {sorted(set(missing) - UNDOCUMENTED)}"
    assert UNDOCUMENTED <= {kd.key for kd in key_docs()}, "UNDOCUMENTED names keys that no longer exist"


# ----------------------------------------------------------------------------------------------------------------
# seer config show
# ----------------------------------------------------------------------------------------------------------------
_LINE = re.compile(r"^  (?P<key>[\w.]+): (?P<type>[^=]+) = (?P<value>.*?)(?:   \(default (?P<default>.*)\))?$")


def _shown(text: str) -> dict[str, tuple[str, str | None]]:
    return {m["key"]: (m["value"], m["default"]) for m in map(_LINE.match, text.splitlines()) if m}


def _same(shown: str, value) -> bool:
    parsed = yaml.safe_load(shown)
    return float(parsed) == value if isinstance(value, float) else parsed == value


def test_config_show_prints_every_key_its_value_and_its_doc(capsys):
    assert main(["config", "show", "tiny_cpu", "optim.base_lr=0.1", "train.total_steps=50"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert captured.err == ""  # the recipe runs as it is: no note
    header = " ".join(line.lstrip("# ") for line in out.splitlines() if line.startswith("#"))
    assert "tiny_cpu (pretraining recipe " in header
    assert "a finetune recipe has this name too: --kind finetune" in header
    cfg = load_config("tiny_cpu", ["optim.base_lr=0.1", "train.total_steps=50"])
    values = _leaves(config_to_dict(cfg))
    shown = _shown(out)
    assert set(shown) == set(values)
    defaults = _leaves(config_to_dict(PretrainConfig()))
    for key, (text, default) in shown.items():
        assert _same(text, values[key]), (key, text, values[key])
        assert (default is None) == (values[key] == defaults[key]), key  # the default is shown where it differs
        assert default is None or _same(default, defaults[key]), key
    assert shown["optim.base_lr"] == ("0.1", "0.3") and shown["train.fsdp.reduce_dtype"] == ("fp32", None)
    flat = " ".join(out.split())
    for kd in key_docs():
        if kd.doc:
            assert f"{kd.key}: " in flat and " ".join(kd.doc.split()) in flat, kd.key
    assert "model: The RegNetY trunk." in flat
    assert "supervised (not used by this method):" in flat and "swav (not used" not in flat


def test_config_show_yaml_is_a_recipe_of_its_own(capsys, tmp_path):
    assert main(["config", "show", "--yaml", "tiny_cpu", "optim.weight_decay=1e-5", "data.workers=1"]) == 0
    text = capsys.readouterr().out
    expected = load_config("tiny_cpu", ["optim.weight_decay=1e-5", "data.workers=1"])
    assert yaml.safe_load(text) == config_to_dict(expected)
    (tmp_path / "mine.yaml").write_text(text)
    assert load_config(str(tmp_path / "mine.yaml")) == expected


def test_config_show_finds_finetune_recipes_and_says_what_they_still_need(capsys):
    assert main(["config", "show", "seer_rg32_in1k"]) == 0  # only a fine-tuning recipe has this name
    captured = capsys.readouterr()
    assert "# seer_rg32_in1k (fine-tuning recipe " in captured.out
    assert _shown(captured.out)["method"][0] == "supervised"
    assert "swav (not used by this method):" in " ".join(captured.out.split())
    assert "note: this config does not run as it stands: data.urls: is required" in captured.err
    args = ["config", "show", "tiny_cpu", "--kind", "finetune", "data.images=x", "supervised.n_classes=3"]
    assert main(args) == 0  # a name both kinds have, overrides after the flag
    captured = capsys.readouterr()
    shown = _shown(captured.out)
    assert shown["method"][0] == "supervised" and shown["supervised.n_classes"] == ("3", "0")
    assert captured.err == ""


def test_config_show_without_a_recipe_shows_the_defaults(capsys):
    assert main(["config", "show", "optim.base_lr=0.5"]) == 0
    out = capsys.readouterr().out
    shown = _shown(out)
    assert "the defaults in code" in out and shown["optim.base_lr"] == ("0.5", "0.3")
    assert all(default is None for key, (_, default) in shown.items() if key != "optim.base_lr")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["show", "tiny_cpu", "optim.bse_lr=1"], r"unknown config key 'optim.bse_lr'; did you mean optim.base_lr\?"),
        (["show", "tiny_cpuu"], r"'tiny_cpuu' is neither a file nor a shipped pretraining recipe"),
        (["show", "tiny_cpu", "train.total_steps=many"], r"train.total_steps: expected int, got 'many'"),
        (["shw"], r"unknown action 'shw'"),
        ([], r"an action is required"),
    ],
)
def test_config_show_errors_name_the_problem(capsys, argv, message):
    assert main(["config", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)
