"""The documentation is tested: every fenced block of README.md and docs/*.md is run, dry-run or checked, as the
reviewed list tests/docs_blocks.yaml says (the machinery and the kinds: tests/doccheck.py).

Commands run in this process through their own entry points (``seer.cli.main`` for ``seer``), each block in a
fresh directory, on stand-in data built once for the module: a 10-class digits image folder, a CSV and a TXT file
list, shards written by ``seer shards``, a 2-step ``tiny_cpu`` pretraining run and a 2-step fine-tune of it, and
their exports (a trunk and a classifier).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import doccheck as dc
import pytest

LISTED = dc.load_list()
BLOCKS = {(b.file, b.id): b for b in dc.all_blocks()}
# skip entries need no test: the listing test checks that each has its reason
CASES = [(f, bid) for f, entries in LISTED.items() for bid, e in (entries or {}).items() if e.get("kind") != "skip"]


def test_every_block_is_listed_and_reviewed():
    problems = dc.list_problems(list(BLOCKS.values()), LISTED)
    assert not problems, "\n\n".join(problems)


def test_extractor_finds_fences_ids_and_commands():
    text = """# Title
```bash
seer presets   # a comment
```
## Two words
- a list item:

  ```
  seer plan --config tiny_cpu \\
      --world-size 2; seer export a b
  ```
~~~python
print("```")
~~~
"""
    blocks = dc.extract_blocks("x.md", text)
    assert [(b.id, b.lang, b.line) for b in blocks] == [("title/1", "bash", 2), ("two-words/1", "", 8),
                                                        ("two-words/2", "python", 12)]  # fmt: skip
    assert blocks[2].text == 'print("```")'
    assert dc.shell_commands(blocks[0].text) == ["seer presets"]
    assert dc.shell_commands(blocks[1].text) == ["seer plan --config tiny_cpu --world-size 2", "seer export a b"]
    inv = dc.parse_invocation("A=1 srun -n 8 python -m seer.cli plan --config x")
    assert (inv.program, inv.argv, inv.env, inv.launcher) == ("seer", ["plan", "--config", "x"], {"A": "1"},
                                                              ["srun", "-n", "8"])  # fmt: skip
    assert dc.inline_commands("x.md", text + "Run `seer knn --train a` (`seer.load_trunk`, `seer <command>`).\n") == [
        (15, "seer knn --train a")
    ]
    assert len(BLOCKS) >= 50  # the docs' blocks are still found (54 when this was written)


def test_inline_commands_name_real_commands_and_flags():
    """Commands quoted inline in the prose (`seer knn --train ... --ks 10 20`): each names a real command, target,
    marker or script, and every flag it spells exists (argument values are often placeholders: not parsed)."""
    problems, seen = [], 0
    for rel in dc.doc_files():
        for line, span in dc.inline_commands(rel):
            seen += 1
            try:
                inv = dc.parse_invocation(span)
                problems += [f"{rel}:{line}: `{span}`: {p}" for p in dc.check_invocation(inv, usage=True)]
            except (ValueError, AssertionError) as exc:
                problems.append(f"{rel}:{line}: `{span}`: {exc}")
    assert not problems, "\n".join(problems)
    assert seen >= 100  # the spans are still found (203 when this was written)


def _seer(argv: list[str], cwd: Path) -> str:
    """Run ``seer ARGV`` in this process; its stdout (fails with its output unless it exits 0)."""
    res = dc.call(dc.Invocation("seer", "", argv, {}, []), cwd)
    assert res.rc == 0, f"seer {' '.join(argv)} exited {res.rc}:\n{res.out[-2000:]}\n{res.err[-3000:]}"
    return res.out


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> dict[str, str]:
    """The stand-in data the blocks' paths are replaced with (``{name}`` in docs_blocks.yaml)."""
    from seer.data.tasks import write_task

    root = tmp_path_factory.mktemp("standin")
    task = write_task("digits", root / "images", n_train=40, n_test=30, seed=0)
    train, test = root / "images" / "train", root / "images" / "test"
    (root / "images.csv").write_text(
        "path,label\n" + "".join(f"{p.resolve()},{y}\n" for p, y in zip(*task["files"]["train"]))
    )
    (root / "list.txt").write_text("".join(f"{p.resolve()}\t{y}\n" for p, y in zip(*task["files"]["test"])))
    shutil.copytree(train, root / "imagenet" / "train")
    shutil.copytree(test, root / "imagenet" / "val")
    _seer(["shards", str(train), str(root / "shards"), "--max-samples", "20", "--workers", "1", "--no-progress"], root)
    small = [
        "train.total_steps=2",
        "optim.warmup_iters=0",
        "data.global_batch_size=8",
        "train.log_every=1",
        "train.tensorboard=false",
    ]
    run, finetune_run = root / "runs" / "tiny_cpu", root / "runs" / "finetune_tiny_cpu"
    _seer(["pretrain", "--config", "tiny_cpu", f"run_dir={run}", *small], root)
    _seer(["finetune", "--config", "tiny_cpu", f"run_dir={finetune_run}", f"model.init_from={run}",
           f"data.images={train}", *small], root)  # fmt: skip
    _seer(["export", str(run), str(root / "trunk.safetensors")], root)
    _seer(["export", str(finetune_run), str(root / "classifier.safetensors")], root)
    return {
        "images": str(root / "images"),
        "train": str(train),
        "test": str(test),
        "photo": str(task["files"]["test"][0][0].resolve()),
        "csv": str(root / "images.csv"),
        "list": str(root / "list.txt"),
        "shards": str(root / "shards"),
        "shard0": str(root / "shards" / "data-000000.tar"),
        "shard_pattern": str(root / "shards" / "data-{000000..000001}.tar"),
        "imagenet": str(root / "imagenet"),
        "trunk": str(root / "trunk.safetensors"),
        "run": str(run),
        "finetune_run": str(finetune_run),
        "classifier": str(root / "classifier.safetensors"),
        "configs": str(dc.REPO / "configs"),
        "root": str(root),
    }


def _fill(text: str, subs: dict | None, standin: dict[str, str]) -> str:
    """``text`` with the entry's replacements applied in order, then ``{name}`` stand-ins filled in (other braces,
    such as shard ranges, are left alone)."""
    for old, new in (subs or {}).items():
        if old not in text:
            raise AssertionError(f"sub: {old!r} is not in {text[:200]!r}")
        text = text.replace(old, new)
    return re.sub(r"\{(\w+)\}", lambda m: standin.get(m.group(1), m.group(0)), text)


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in root.rglob("*")}


def _run_command(command: str, entry: dict, standin: dict[str, str], cwd: Path) -> None:
    kind = entry.get("kind")
    inv = dc.parse_invocation(_fill(command, entry.get("sub"), standin))
    problems = dc.check_invocation(inv, usage=entry.get("mode") == "usage")
    assert not problems, f"{command}:\n" + "\n".join(problems)
    if kind == "check":
        return
    if kind == "dry-run":
        before = _snapshot(cwd, Path(standin["root"]))
        res = dc.call(dc.Invocation(inv.program, inv.target, [*inv.argv, "--dry-run"], inv.env, inv.launcher), cwd)
        assert res.rc == 0, f"{command} --dry-run exited {res.rc}:\n{res.out[-2000:]}\n{res.err[-3000:]}"
        after = _snapshot(cwd, Path(standin["root"]))
        changed = sorted(set(before.items()) ^ set(after.items()))
        assert not changed, f"{command} --dry-run wrote: {changed[:10]}"
        return
    assert kind == "run", f"unknown kind {kind!r}"
    res = dc.call(inv, cwd)
    assert res.rc == 0, f"{command} exited {res.rc}:\n{res.out[-2000:]}\n{res.err[-3000:]}"
    if entry.get("mode") == "console":
        assert dc.console_matches(res.out, entry["_output"], excerpt=entry.get("excerpt", False)), (
            f"{command}: the output differs from the doc's (a `...` line stands for any lines):\n{res.out}"
        )


@pytest.fixture(scope="module")
def namespaces() -> dict:
    """The globals of each Python block that ran, for a block that continues it (``after:``)."""
    return {}


def _run_python(block: dc.Block, entry: dict, standin: dict[str, str], cwd: Path, namespaces: dict) -> None:
    text = _fill(block.text, entry.get("sub"), standin)
    problems = dc.check_python(text, block.where)
    assert not problems, "\n".join(problems)
    if entry.get("kind") == "check":
        return
    if entry.get("after"):
        key = (block.file, entry["after"])
        if key not in namespaces:
            _run_python(BLOCKS[key], LISTED[block.file][entry["after"]], standin, cwd, namespaces)
        ns = namespaces[key]
    else:
        ns = {"__name__": "__doc_block__"}
    with dc._cwd(cwd):
        if entry.get("setup"):
            exec(compile(_fill(entry["setup"], None, standin), f"{block.where} setup", "exec"), ns)
        checked = dc.run_python(text, block.where, ns, check_comments="claims" in entry)
    namespaces[(block.file, block.id)] = ns
    assert checked == entry.get("claims", 0), (
        f"{block.where}: {checked} comment claims checked, the list says {entry.get('claims', 0)}"
    )


def _needs_standin(entry: dict) -> bool:
    """Whether a block runs anything, or names a stand-in path (a block that is only checked does not wait for the
    stand-in data, nor fails with it)."""
    parts = [entry, *(entry.get("commands") or [])]
    return any(e.get("kind", "check") != "check" or "{" in str(e.get("sub", "")) for e in parts)


@pytest.mark.parametrize(("file", "block_id"), CASES, ids=[f"{f}::{b}" for f, b in CASES])
def test_block(file: str, block_id: str, namespaces, tmp_path, request):
    entry = LISTED[file][block_id]
    block = BLOCKS.get((file, block_id))
    if block is None:
        pytest.fail(f"{file} has no block {block_id} any more: update {dc.LIST_FILE.name}")
    standin = request.getfixturevalue("standin") if _needs_standin(entry) else {}
    if block.lang == "python":
        _run_python(block, entry, standin, tmp_path, namespaces)
        return
    if entry.get("mode") == "console":
        entry = {**entry, "_output": dc.console_output(block)}
    commands = dc.entry_commands(block, entry)
    assert commands, f"{block.where}: no command found"
    for command, sub_entry in commands:
        _run_command(command, sub_entry, standin, tmp_path)
