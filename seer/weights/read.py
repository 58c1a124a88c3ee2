"""Reading checkpoints without building a model: files (safetensors, ``torch.load`` with ``weights_only=True``), HF
directories and hub snapshots, timm hub directories, VISSL / ClassyVision checkpoints and pretraining run directories.

Tensors are not copied: safetensors and ``torch.load(mmap=True, weights_only=True)`` both map the file, and nothing
is unpickled but tensors and plain containers. ``read_checkpoint`` returns a ``Checkpoint`` under our key names.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seer.models.regnet import RegNetCfg, describe_value
from seer.weights.formats import (
    FINETUNED_NAME,
    FINETUNED_PREPROCESS,
    Checkpoint,
    CheckpointError,
    cfg_from_dict,
    check_cfg_fits,
    check_preprocess,
    convert_state_dict,
    hf_preprocess,
    timm_preprocess,
)
from seer.weights.named import NamedWeights, named_weights, suggest_name

__all__ = ["DEFAULT_HUB_MODEL", "read_checkpoint", "cached_snapshot", "hub_offline_reason"]

# The model `seer.extract_features(images)` uses when no model is given: SEER RegNetY-32GF (RG-32) features.
DEFAULT_HUB_MODEL = "facebook/regnet-y-320-seer"


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------
# numpy data types some checkpoints carry (VISSL stores numpy scalars next to the weights): data, never code.
_NUMPY_DATA_GLOBALS = {"_reconstruct", "scalar", "ndarray", "dtype"}
_NUMPY_DATA_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray")


def _numpy_data_globals(path: Path) -> list:
    """The numpy data-type globals a checkpoint needs, if those are all it needs beyond torch's defaults."""
    import importlib

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: no allowlisting, plain weights_only rules
        return []
    found = []
    for name in names:
        module, _, attr = name.rpartition(".")
        if not ((module in _NUMPY_DATA_MODULES and attr in _NUMPY_DATA_GLOBALS) or module == "numpy.dtypes"):
            return []
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            return []
    if found:  # unpickling a numpy dtype builds its DType class (numpy.dtypes.Int64DType ...): data classes too
        import numpy as np

        found += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", None)) if n.endswith("DType")]
    return found


def _torch_load(path: Path) -> Any:
    """``torch.load`` of an untrusted file: tensors and plain containers only, memory-mapped when the format allows."""

    def load(**kwargs: Any) -> Any:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True, **kwargs)
        except RuntimeError as exc:  # legacy (pre-zip) serialization cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)

    try:
        numpy_globals = _numpy_data_globals(path)
        if numpy_globals:
            with torch.serialization.safe_globals(numpy_globals):
                return load()
        return load()
    except pickle.UnpicklingError as exc:
        with contextlib.suppress(Exception):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        detail = f"it references {unsafe}" if "unsafe" in locals() and unsafe else str(exc).splitlines()[0]
        raise CheckpointError(
            f"{path}: refused to load: the file holds pickled objects other than tensors and plain containers "
            f"({detail}). It was read with torch.load(weights_only=True), so nothing in it was executed. If you "
            f"trust the file, convert it yourself to a plain state dict or safetensors."
        ) from None
    except (EOFError, OSError, RuntimeError, ValueError, IndexError, KeyError, TypeError, AttributeError) as exc:
        # the weights-only unpickler meets arbitrary bytes with any of these (e.g. IndexError: pop from empty list)
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata  # memory-mapped: pages are read on first use
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read as safetensors ({exc})") from exc


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, origin: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Find the trunk tensors (and head tensors) inside a loaded checkpoint object."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{origin}: expected a dict of tensors, got {type(obj).__name__}")
    heads: dict[str, torch.Tensor] = {}
    if "classy_state_dict" in obj:  # VISSL / ClassyVision
        try:
            model = obj["classy_state_dict"]["base_model"]["model"]
            trunk = model["trunk"]
        except (KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{origin}: VISSL checkpoint without ['classy_state_dict']['base_model']['model']['trunk'] ({exc!r})"
            ) from None
        heads = {f"heads.{k}": v for k, v in (model.get("heads") or {}).items() if isinstance(v, torch.Tensor)}
        return dict(trunk), heads
    for key in ("state_dict", "model", "model_state", "model_state_dict", "module", "trunk"):
        if key in obj and isinstance(obj[key], Mapping) and not isinstance(obj[key], torch.Tensor):
            inner = obj[key]
            if _is_tensor_dict(inner) or "trunk" in inner or "classy_state_dict" in inner:
                return _unwrap(inner, origin)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{origin}: no tensors found (top-level keys: {sorted(map(str, obj))[:10]})")
    return tensors, heads


def _read_file_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor]]:
    """(tensors, safetensors metadata, head tensors set aside by the unwrapping) of one file."""
    if path.suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
        return tensors, metadata, {}
    obj = _torch_load(path)
    tensors, heads = _unwrap(obj, str(path))
    return tensors, {}, heads


# ----------------------------------------------------------------------------------------------------------------
# Sources: paths, directories, hub ids, state dicts, modules
# ----------------------------------------------------------------------------------------------------------------
def read_checkpoint(source: Any, *, format: str | None = None) -> Checkpoint:
    """Read any supported checkpoint into our key names, without building a model.

    Args:
        source: a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` / ``.torch`` file, an HF directory, a
            pretraining run directory, an HF hub id, the name of released SEER weights (``seer-rg32``:
            ``seer.weights.named``; an existing path of that name wins), a state dict, or an ``nn.Module``.
        format: force a layout ("seer", "timm", "torchvision", "hf", "vissl", "classy") instead of detecting it.
    """
    if isinstance(source, nn.Module):
        hf_config = getattr(getattr(source, "config", None), "to_dict", lambda: None)()
        ckpt = convert_state_dict(source.state_dict(), format, origin=type(source).__name__)
        ckpt.hf_config = hf_config if ckpt.format == "hf" else None
        return ckpt
    if isinstance(source, Mapping):
        tensors, heads = _unwrap(source, "<state dict>")
        ckpt = convert_state_dict(tensors, format)
        ckpt.heads.update(heads)
        return ckpt
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_trunk: expected a path, hub id, state dict or module, got {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.exists():  # an existing local path always wins over a name or a hub id
        entry = named_weights(source)
        if entry is not None:
            return _read_named(entry)
        if isinstance(source, str) and _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
            return _read_hf_dir(_hub_snapshot(source))
        raise FileNotFoundError(f"no such checkpoint file or directory: {path}{_did_you_mean(os.fspath(source))}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return _read_hf_dir(path)
        if (path / "checkpoints").is_dir() or (path / ".metadata").is_file():
            return _read_run_dir(path)
        raise CheckpointError(
            f"{path}: a directory that is neither an HF model (config.json + weights) nor a pretraining run "
            f"(checkpoints/step_*)"
        )
    tensors, metadata, heads = _read_file_tensors(path)
    if metadata.get("format") == "seer":
        if "regnet_cfg" not in metadata:
            raise CheckpointError(f"{path}: seer safetensors without its 'regnet_cfg' metadata")
        ckpt = convert_state_dict(tensors, "seer", origin=str(path))
        where = f"{path}: 'regnet_cfg' metadata"
        ckpt.cfg = _file_cfg(_parse_json(metadata["regnet_cfg"], where), ckpt.state_dict, where)
        if "preprocess" in metadata:
            where = f"{path}: 'preprocess' metadata"
            ckpt.preprocess = check_preprocess(_parse_json(metadata["preprocess"], where), where)
        if "id2label" in metadata:
            id2label = _parse_json(metadata["id2label"], f"{path}: 'id2label' metadata")
            try:
                ckpt.labels = {int(k): str(v) for k, v in id2label.items()}
            except (AttributeError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: bad 'id2label' metadata ({exc})") from exc
        return ckpt
    ckpt = convert_state_dict(tensors, format, origin=str(path))
    ckpt.heads.update(heads)
    if ckpt.format in ("timm", "vissl", "classy") and FINETUNED_NAME.search(path.name):
        ckpt.preprocess = dict(FINETUNED_PREPROCESS)
    return ckpt


def _read_run_dir(path: Path) -> Checkpoint:
    """A pretraining run (its latest checkpoint) or one checkpoint directory, read by the checkpoint format's owner."""
    # Imported here: torch.distributed.checkpoint is loaded only when a run directory is read.
    from seer.train.checkpoint import (
        META_NAME,
        read_classifier_state,
        read_meta,
        read_trunk_state,
        resolve_checkpoint,
    )

    state, cfg_dict = read_trunk_state(path)
    ckpt = convert_state_dict(state, "seer", origin=str(path))
    ckpt_dir = resolve_checkpoint(path)
    ckpt.cfg = _file_cfg(cfg_dict, ckpt.state_dict, f"{ckpt_dir / META_NAME}: regnet_cfg")
    pre = read_meta(ckpt_dir).get("preprocess")
    if pre is not None:  # the run's own eval preprocessing (older runs: the format's default)
        ckpt.preprocess = check_preprocess(pre, f"{ckpt_dir / META_NAME}: preprocess")
    # A supervised / fine-tune run's linear classifier is ``model.head`` (weight + bias); SwAV's head is not one.
    head, labels = read_classifier_state(path)
    if head:
        ckpt.heads.update({f"head.fc.{k}": v for k, v in head.items()})
        ckpt.labels = labels
    return ckpt


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# huggingface_hub retries an unreachable endpoint for about 25 s before it gives up; one TCP connection attempt
# bounded by this many seconds says "offline" first, so a missing model fails at once instead.
HUB_PROBE_TIMEOUT_S = 2.5
_PROBE_TTL_S = 30.0  # a probe's answer is reused this long (a named model tries two repositories)
_PROBES: dict[tuple[str, int], tuple[float, str | None]] = {}


class _HubUnavailable(CheckpointError):
    """The hub could not give a repository (offline, unreachable, missing, no weights): another source may."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache_dir() -> str | None:
    """``HF_HUB_CACHE`` as it is now (huggingface_hub reads it once, at import), else the library's default."""
    return os.environ.get("HF_HUB_CACHE") or None


def _probe(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection to ``host:port`` opens within ``timeout`` s (name lookup included), else why not."""
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as exc:
            result.append(f"{type(exc).__name__}: {exc}")

    # a thread, because the name lookup (getaddrinfo) takes no timeout: a hung DNS must not hang the caller
    thread = threading.Thread(target=connect, name="seer-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else f"no answer within {timeout:g} s"


def hub_offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be reached now, or None when it (or the proxy to it) answers.

    ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set is offline without a request; otherwise one TCP connection
    to the endpoint (``HF_ENDPOINT``), or to the proxy the environment names for it, must open within
    ``HUB_PROBE_TIMEOUT_S`` seconds. The answer is kept for 30 s.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return "offline mode: HF_HUB_OFFLINE is set"
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    host = endpoint.hostname or ""
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    what = f"{constants.ENDPOINT}"
    proxies = urllib.request.getproxies()
    proxy = proxies.get(endpoint.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
        what = f"the proxy {parsed.hostname}:{port} for {constants.ENDPOINT}"
    now = time.monotonic()
    cached = _PROBES.get((host, port))
    if cached is not None and now - cached[0] < _PROBE_TTL_S:
        return cached[1]
    failure = _probe(host, port, HUB_PROBE_TIMEOUT_S)
    reason = None if failure is None else f"cannot reach {what} ({failure})"
    _PROBES[(host, port)] = (now, reason)
    return reason


def _has_weights(path: Path) -> bool:
    return any((path / n).is_file() for n in _WEIGHT_FILES + _WEIGHT_INDEXES) and (path / "config.json").is_file()


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The hub repository's snapshot in the local HF cache (config and weights there), or None; makes no request."""
    from huggingface_hub import snapshot_download

    with contextlib.suppress(Exception):  # not cached, partly cached, an unreadable cache: all mean "not here"
        local = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=_hub_cache_dir()))
        if _has_weights(local):
            return local
    return None


def _download_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """Download a hub repository's config, processor and weights (safetensors when it has them) into the HF cache.

    Raises:
        _HubUnavailable: offline (``hub_offline_reason``), or the hub refused or failed (missing repository, no
            weights, network error): the message says which.
    """
    import huggingface_hub
    from huggingface_hub import snapshot_download

    offline = hub_offline_reason()
    if offline:
        raise _HubUnavailable(offline)
    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
        kind = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", kind],
                                      cache_dir=_hub_cache_dir()))  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - network, auth, offline mode and missing repos all end here
        raise _HubUnavailable(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from None
    if not _has_weights(path):
        raise _HubUnavailable(f"{repo_id}: the hub repository has no config.json with model.safetensors or "
                              f"pytorch_model.bin")  # fmt: skip
    return path


def _hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """An HF hub model from the local HF cache (no request), else downloaded: config, processor and weights only."""
    local = cached_snapshot(repo_id, revision)
    if local is not None:
        return local
    try:
        return _download_snapshot(repo_id, revision)
    except _HubUnavailable as exc:
        raise CheckpointError(
            f"no local file or directory {repo_id!r}, it is not in the local Hugging Face cache, and it could not be "
            f"downloaded from the hub ({exc}). Without network access, pass a local directory holding config.json "
            f"and model.safetensors (or pytorch_model.bin), e.g. one made with `hf download {repo_id} --local-dir "
            f"DIR` elsewhere."
        ) from None


def _read_named(entry: NamedWeights) -> Checkpoint:
    """Released SEER weights by name: the local HF cache (HF's repository, then timm's) with no request, else a
    download (HF, then timm). The checkpoint gets the name's preprocessing, whichever source gave it."""
    sources = entry.hub_sources()
    path = next((p for p in (cached_snapshot(repo) for _, repo in sources) if p is not None), None)
    failures: list[str] = []
    if path is None and sources:
        offline = hub_offline_reason()  # once, before any download: offline, fail now rather than per repository
        if offline:
            failures.append(offline)
        for _, repo in [] if offline else sources:
            try:
                path = _download_snapshot(repo)
                break
            except _HubUnavailable as exc:
                failures.append(f"{repo}: {exc}")
    if path is None:
        raise CheckpointError(_named_unavailable(entry, failures))
    ckpt = _read_hf_dir(path)
    ckpt.preprocess = entry.preprocess
    ckpt.origin = f"{entry.name} ({ckpt.origin})"
    return ckpt


def _named_unavailable(entry: NamedWeights, failures: list[str]) -> str:
    """The message of released weights found nowhere: what was tried, and how to get the file by hand."""
    repos = [repo for _, repo in entry.hub_sources()]
    cache = _hub_cache_dir() or "the default HF cache"
    if repos:
        where = f"not in the local Hugging Face cache ({cache}) as {' or '.join(repos)}"
        why = f", and could not be downloaded ({'; '.join(failures)})" if failures else ""
        hf = f"`hf download {repos[0]} --local-dir DIR` then seer.load_trunk(DIR), or "
    else:
        where, why, hf = "no hub repository seer can load holds these weights", "", ""
    skipped = f" ({entry.hf_skip})" if entry.hf_skip else ""
    return (
        f"{entry.name} ({entry.title}): {where}{why}{skipped}. Where there is network access, get it with "
        f"{hf}download the original VISSL checkpoint {entry.vissl_url} and pass that file "
        f"(seer.load_trunk('{entry.vissl_url.rsplit('/', 1)[-1]}')). `seer models` lists the sources."
    )


def _did_you_mean(text: str) -> str:
    """A hint for a missing path that looks like a released-weights name, or a pretraining recipe's name."""
    close = suggest_name(text)
    if close is None:
        return ""
    from seer.catalog import available

    if text in available("pretrain"):
        return (
            f" ({text!r} is a pretraining recipe: `seer pretrain --config {text}`; the released weights of that "
            f"model are {close!r}, see `seer models`)"
        )
    return f" (did you mean the released weights {close!r}? `seer models` lists them)"


def _parse_json(text: str | bytes, where: str) -> Any:
    """JSON text from a file (or a file's metadata) -> its value; any failure is a ``CheckpointError`` naming it."""
    try:
        return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{where}: not UTF-8 text ({exc})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an integer of > 4300 digits, deep nesting
        raise CheckpointError(f"{where}: not valid JSON ({type(exc).__name__}: {exc})") from None


def _read_json_file(file: Path) -> Any:
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc})") from exc
    return _parse_json(data, str(file))


def _file_cfg(cfg_dict: Any, sd: Mapping[str, torch.Tensor], where: str) -> RegNetCfg:
    """The ``RegNetCfg`` a file states, type-checked and checked against its tensors before anything is built."""
    try:
        cfg = cfg_from_dict(cfg_dict)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    check_cfg_fits(cfg, sd, where)
    return cfg


def _read_hf_dir(path: Path) -> Checkpoint:
    hf = _read_json_file(path / "config.json")
    if not isinstance(hf, Mapping):
        raise CheckpointError(
            f"{path}/config.json: expected a JSON object (HF's model config), got {describe_value(hf)}"
        )
    if "model_type" not in hf and "pretrained_cfg" in hf:
        return _read_timm_dir(path, hf)
    tensors: dict[str, torch.Tensor] = {}
    index = next((path / n for n in _WEIGHT_INDEXES if (path / n).is_file()), None)
    if index is not None:  # sharded weights (large models)
        index_json = _read_json_file(index)
        weight_map = index_json.get("weight_map") if isinstance(index_json, Mapping) else None
        if not isinstance(weight_map, Mapping) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map: expected an object of tensor name -> shard file name")
        for shard in sorted(set(weight_map.values())):
            # a shard is a file beside the index: never an absolute path or one that climbs out of the directory
            if not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise CheckpointError(f"{index}: weight_map: shard {shard!r} is not a file name in {path}")
            tensors.update(_read_file_tensors(path / shard)[0])
    else:
        weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: HF directory without model.safetensors or pytorch_model.bin")
        tensors = _read_file_tensors(weights)[0]
    ckpt = convert_state_dict(tensors, "hf", origin=str(path))
    ckpt.hf_config = hf
    ckpt.preprocess = _hf_preprocess(path)
    return ckpt


def _read_timm_dir(path: Path, config: Mapping) -> Checkpoint:
    """A timm hub directory (``timm/regnety_320.seer_ft_in1k``): timm keys, preprocessing from ``pretrained_cfg``."""
    weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: timm directory without model.safetensors or pytorch_model.bin")
    tensors, _, heads = _read_file_tensors(weights)
    ckpt = convert_state_dict(tensors, "timm", origin=str(path))
    ckpt.heads.update(heads)
    pretrained_cfg = config["pretrained_cfg"]
    ckpt.preprocess = timm_preprocess(
        {} if pretrained_cfg is None else pretrained_cfg, where=f"{path}/config.json: pretrained_cfg"
    )
    if config.get("label_names") is not None:
        names = config["label_names"]
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            raise CheckpointError(
                f"{path}/config.json: label_names: expected a list of class names, got {describe_value(names)}"
            )
        ckpt.labels = [str(n) for n in names]
    return ckpt


def _hf_preprocess(path: Path) -> dict | None:
    """The preprocessing of an HF directory's ``preprocessor_config.json`` (None without one).

    A file that is there but unreadable or malformed is an error, not a silent fallback to other preprocessing.
    """
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return None
    return hf_preprocess(_read_json_file(file), where=str(file))
