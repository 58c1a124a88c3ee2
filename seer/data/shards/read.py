"""Reading webdataset shards: URL expansion, skip accounting, the train and eval streams, verification.

Hostile shard directories: a name found by a glob, a directory listing or an ``index.json`` is always a local file,
returned as an absolute path and opened by ``open_shard`` as a regular file; only a pattern the caller gives may be a
``pipe:`` command or a remote URL (webdataset's ``gopen`` runs any name starting with ``pipe:`` in a shell). Tar
members are read only up to ``seer.data.limits``' member cap (their declared, expanded size, checked before reading).
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import braceexpand
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import base_plus_ext, group_by_keys

from seer.data.images import ImageDecodeError, decode_image, open_regular_file
from seer.data.limits import DEFAULT_LIMITS, read_limits
from seer.data.shards.write import INDEX_NAME
from seer.data.sources import IMAGE_MEMBER_KEYS

log = logging.getLogger("seer.data")

_REMOTE_SCHEMES = {"http", "https", "gs", "s3", "ais", "sftp", "ftps", "scp", "hf", "htgs"}


# ====================================================================================================================
# URLs


def read_index(path: str | os.PathLike) -> dict:
    """Read a shard directory's `index.json` (or the file itself); shard paths are returned in `index["urls"]`."""
    path = Path(path).expanduser()
    file = path / INDEX_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no {INDEX_NAME}: shard writing did not finish there, or it is not a shard directory "
            f"(pass a pattern such as '{path}/data-{{000000..000009}}.tar' to read shards without an index)"
        )
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
        names = [s["name"] for s in index["shards"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{str(file)!r} is not a valid shard index: {exc}") from exc
    # An index may come from a stranger: its names must stay inside its own directory and can never be commands or
    # URLs. The absolute path keeps a name such as "pipe:..." from reaching any URL opener as a scheme.
    base = os.path.dirname(os.path.abspath(file))
    for entry, name in zip(index["shards"], names):
        _check_index_entry(file, entry, name)
    index["urls"] = [os.path.join(base, n) for n in names]
    return index


def _check_index_entry(file: Path, entry: Any, name: Any) -> None:
    """A shard entry of an index: a plain file name in the index's directory and, if given, a sample count."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name or os.path.isabs(name):
        raise ValueError(
            f"{str(file)!r}: shard entry {name!r} is not a plain file name (an index may name only files in its own "
            "directory: no '/', no '..', nothing absolute)"
        )
    samples = entry.get("samples", 0) if isinstance(entry, dict) else 0
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"{str(file)!r}: shard entry {name!r} has samples={samples!r}, not a count")


def _expand_local(pattern: str, original: str) -> list[str]:
    """Local files of a pattern, as absolute paths (see `expand_urls`)."""
    path = os.path.expanduser(pattern[len("file://") :] if pattern.startswith("file://") else pattern)
    if os.path.isdir(path) or (path.endswith(".json") and os.path.isfile(path)):
        urls = read_index(path)["urls"]
        missing = [u for u in urls if not os.path.exists(u)]
        if missing:
            raise FileNotFoundError(f"{original!r}: the index lists missing shard(s): {', '.join(missing[:3])}")
        return urls
    if os.path.exists(path):  # a name that exists is that file, whatever it holds ('{', '*', '[', '::', ':')
        return [os.path.abspath(path)]
    result, missing = [], []
    for p in braceexpand.braceexpand(path):
        if glob.has_magic(p):
            result += sorted(glob.glob(p))
        elif os.path.exists(p):  # a FIFO or a directory too: reading reports it (only regular files are read)
            result.append(p)
        else:
            missing.append(p)
    if missing and result:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"shard pattern {original!r}: {len(missing)} file(s) do not exist: {shown}")
    # Absolute: a listed name such as "pipe:cmd #.tar" or "s3:x.tar" must never be taken for a command or a URL.
    return [os.path.abspath(p) for p in result]


def is_local_url(url: str) -> bool:
    """Whether `open_shard` reads `url` as a local file (anything but a `pipe:` command or a remote URL)."""
    return not (url.startswith("pipe:") or urlparse(url).scheme in _REMOTE_SCHEMES)


def expand_urls(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand shard patterns into a list of URLs.

    Accepts brace patterns (`data-{000000..000127}.tar`), globs, `::`-separated or list-of patterns, a shard
    directory or its `index.json`, `file://` URLs, `pipe:` commands and remote URLs (http(s), gs, s3, ...; not
    checked). Local files must exist: a pattern matching no file raises `FileNotFoundError` naming the pattern.

    Only the pattern itself may be a command or a URL. Every file found by a glob or listed by an index is returned
    as an absolute local path, so a file named `pipe:...` is read as a file and never run; a pattern that names an
    existing file (or an `os.PathLike`) is that file, taken literally.
    """
    if isinstance(pattern, (list, tuple)):
        urls = [u for p in pattern for u in expand_urls(p)]
        if not urls:
            raise FileNotFoundError(f"no shard matches any of {list(pattern)!r}")
        return urls
    if not isinstance(pattern, (str, os.PathLike)) or not os.fspath(pattern).strip():
        raise ValueError(f"a shard pattern must be a non-empty string, got {pattern!r}")
    if not isinstance(pattern, str) or os.path.exists(pattern):
        # a path object, or a name that exists (e.g. one from a directory listing): a local file or directory, never
        # split at '::', brace-expanded, globbed or run
        return _expand_local(os.fspath(pattern), os.fspath(pattern))
    text = os.fspath(pattern).strip()
    urls: list[str] = []
    for part in text.split("::"):
        scheme = urlparse(part).scheme
        if part.startswith("pipe:") or scheme in _REMOTE_SCHEMES:
            urls += list(braceexpand.braceexpand(part))
        else:
            urls += _expand_local(part, text)
    if not urls:
        raise FileNotFoundError(f"no shard matches the pattern {text!r}")
    return urls


# ====================================================================================================================
# Skip accounting


class SampleError(Exception):
    """A bad sample, with where it came from. `kind` is one of `SKIP_KINDS`."""

    def __init__(self, kind: str, key: str | None, url: str | None, message: str):
        super().__init__(f"{kind}: {message} (key={key}, shard={url})")
        self.kind, self.key, self.url, self.message = kind, key, url, message


SKIP_KINDS = (
    "unreadable_shard",  # the URL could not be opened
    "bad_tar",  # truncated or corrupt tar data (the rest of that shard is lost)
    "empty_shard",  # a shard with no member at all
    "no_image",  # a sample without an image member (e.g. a stray non-image file)
    "missing_sample",  # a sample the shard's count promises, but the shard ended first (truncated, stale index)
    "missing_label",  # no .cls member (when labels are required)
    "bad_label",  # a .cls member that is not an integer
    "oversized_member",  # a tar member larger than the member cap (seer.data.limits; never read)
    "oversized_file",  # an image file larger than the file cap (seer.data.limits; read no further than the cap)
    "corrupt_image",  # image bytes that do not decode
    "transform_error",  # the transform raised on a decoded image
    "bad_sample",  # anything else raised while grouping or preparing a sample
)


class SkipLog:
    """Counts skipped samples in one worker, warns at a limited rate, and hands records to the batcher.

    `handler` is the webdataset exception handler (returns True: skip and continue). After `max_consecutive`
    skips in a row without a good sample it raises instead, so a stream where everything is bad (a wrong pattern,
    a transform bug) fails loudly rather than spinning forever.
    """

    def __init__(self, max_consecutive: int | None = None, warn_first: int = 5, warn_every_s: float = 60.0):
        self.max_consecutive = max_consecutive
        self.warn_first, self.warn_every_s = warn_first, warn_every_s
        self.counts: Counter[str] = Counter()
        self.pending: list[dict] = []
        self.consecutive = 0
        self._last_warn = 0.0
        self._since_warn = 0

    def record(self, kind: str, key: str | None, url: str | None, error: Any) -> None:
        message = str(error)[:300]
        self.counts[kind] += 1
        self.pending.append({"kind": kind, "key": key, "url": url, "error": message})
        self.consecutive += 1
        total = sum(self.counts.values())
        self._since_warn += 1
        now = time.monotonic()
        if total <= self.warn_first:
            log.warning("skipping %s (key=%s, shard=%s): %s", kind, key, url, message)
            self._since_warn, self._last_warn = 0, now
        elif now - self._last_warn >= self.warn_every_s:
            log.warning(
                "skipped %d more bad samples (%d in this worker so far: %s)", self._since_warn, total, dict(self.counts)
            )
            self._since_warn, self._last_warn = 0, now
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self.consecutive} bad samples or shards in a row (last: {kind} key={key} shard={url}: {message}); "
                "check the shard pattern, the data and the transform"
            )

    def handler(self, exn: BaseException) -> bool:
        if isinstance(exn, SampleError):
            self.record(exn.kind, exn.key, exn.url, exn.message)
        else:
            self.record("bad_sample", None, None, f"{type(exn).__name__}: {exn}")
        return True

    def ok(self) -> None:
        self.consecutive = 0

    def drain(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out


# ====================================================================================================================
# Pipeline stages (classes, so a pipeline pickles into spawned DataLoader workers)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def make_nodesplitter(rank: int, world_size: int) -> Callable[[Iterable], Iterator]:
    """webdataset nodesplitter for an explicit rank (no torch.distributed): every `world_size`-th item from `rank`."""

    def nodesplitter(src: Iterable) -> Iterator:
        yield from islice(src, rank, None, world_size)

    return nodesplitter


def split_by_worker(src: Iterable) -> Iterator:
    """Every `num_workers`-th item from this DataLoader worker's id (webdataset's version also reads
    torch.distributed state, which data code must not touch)."""
    wid, nw = _worker()
    yield from islice(src, wid, None, nw)


class _ShardList(IterableDataset):
    """Finite shard list for evaluation: this rank's, then this worker's share (each shard read once overall)."""

    def __init__(self, urls: list[str], rank: int, world_size: int):
        super().__init__()
        self.urls, self.rank, self.world_size = urls, rank, world_size

    def __iter__(self) -> Iterator[dict]:
        mine = make_nodesplitter(self.rank, self.world_size)(self.urls)
        for url in split_by_worker(mine):
            yield {"url": url}


# ====================================================================================================================
# Opening shards and reading their members within the caps


def open_shard(url: str) -> IO[bytes]:
    """Open one shard URL from `expand_urls`: a `pipe:` command (logged, then run by webdataset's ``gopen``), a
    remote URL (``gopen``), or else a local regular file (`open_regular_file`), never through ``gopen``.

    `expand_urls` returns every listed or indexed file as an absolute path, so only a pattern given by the caller
    can start with ``pipe:``."""
    if url.startswith("pipe:"):
        log.info("running the shell command of shard pattern %r: %s", url, url[len("pipe:") :])
        return wds.gopen(url)
    if not is_local_url(url):
        return wds.gopen(url)
    return open_regular_file(url[len("file://") :] if url.startswith("file://") else url)


class OversizedMember:
    """Stands for the data of a tar member whose declared size is over the member cap; the data is never read,
    and the sample it belongs to is skipped as ``oversized_member``."""

    __slots__ = ("name", "size", "cap")

    def __init__(self, name: str, size: int, cap: int):
        self.name, self.size, self.cap = name, size, cap

    def __reduce__(self) -> tuple:
        return (OversizedMember, (self.name, self.size, self.cap))

    def __str__(self) -> str:
        return (
            f"member {self.name!r} is {self.size} bytes, over the cap of {self.cap} bytes per tar member "
            "(SEER_MAX_MEMBER_MB or seer.data.limits.limits(max_member_bytes=...) raise it)"
        )


_EXTENDED_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                     tarfile.SOLARIS_XHDTYPE)  # fmt: skip


class _CappedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses a pax or GNU long-name header larger than the member cap: tarfile reads those into
    memory whole, before any member is seen."""

    max_header_bytes = DEFAULT_LIMITS.max_member_bytes

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED_HEADERS and self.size > self.max_header_bytes:
            raise tarfile.ReadError(
                f"an extended tar header declares {self.size} bytes, over the cap of {self.max_header_bytes} bytes "
                "per tar member"
            )
        return super()._proc_member(tarfile_)


@functools.lru_cache(maxsize=8)
def capped_tarinfo(max_member_bytes: int) -> type[tarfile.TarInfo]:
    """A ``tarinfo=`` class for ``tarfile.open`` that caps extended headers at `max_member_bytes`."""
    return type("CappedTarInfo", (_CappedTarInfo,), {"max_header_bytes": max_member_bytes})


_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (__meta__, __index__): skipped
_SKIP_CHUNK = 8 << 20


def tar_members(fileobj: IO[bytes], max_member_bytes: int) -> Iterator[dict]:
    """``{"fname", "data"}`` of each regular member of a tar stream (plain or compressed), like webdataset's
    ``tar_file_iterator`` but never reading more than `max_member_bytes` for one member: a member whose declared
    size (for a sparse member, its expanded size) is over the cap gets an `OversizedMember` as its data, and its
    bytes are skipped in chunks."""
    tar = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=capped_tarinfo(max_member_bytes))
    for info in tar:
        if not info.isreg() or _META_MEMBER.match(info.name):
            continue
        if info.size > max_member_bytes:
            data: Any = OversizedMember(info.name, info.size, max_member_bytes)
            # Move to the next header in bounded reads: tarfile's own skip of a compressed stream is quadratic,
            # and reading the member (a sparse one expands its holes) would allocate its full size.
            stream = tar.fileobj
            while stream.tell() < tar.offset:
                if not stream.read(min(_SKIP_CHUNK, tar.offset - stream.tell())):
                    break
        else:
            data = tar.extractfile(info).read()
        yield {"fname": info.name, "data": data}
        tar.members = []  # a stream of any length: keep no TarInfo


class _TarMembers:
    """dict(url) -> tar members, recording unreadable, truncated and empty shards; an end-of-shard marker `{}`
    keeps a truncated shard's partial sample from merging with the next shard's first one. Shards are opened by
    `open_shard`, members read by `tar_members` under `max_member_bytes` (default: the cap in force now)."""

    def __init__(self, skips: SkipLog, max_member_bytes: int | None = None):
        self.skips = skips
        self.max_member_bytes = max_member_bytes or read_limits().max_member_bytes

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        for item in src:
            url = item["url"]
            try:
                stream = open_shard(url)
            except Exception as exc:  # noqa: BLE001
                self.skips.record("unreadable_shard", None, url, f"{type(exc).__name__}: {exc}")
                continue
            start = item.get("start", 0)
            if start and is_local_url(url):  # `shard_samples(start=)`: record how many samples the seek passed
                item["skipped"] = start if seek_sample(stream, start, self.max_member_bytes) else 0
            n, problem = 0, None
            try:
                for member in tar_members(stream, self.max_member_bytes):
                    member["__url__"] = url
                    n += 1
                    yield member
                if n == 0:
                    problem = ("empty_shard", "the shard has no members")
            except Exception as exc:  # noqa: BLE001 - tarfile raises ReadError, EOFError, OSError, ...
                if n == 0 and "empty file" in str(exc):  # a 0-byte shard
                    problem = ("empty_shard", "the shard file is empty (0 bytes)")
                else:
                    problem = ("bad_tar", f"{type(exc).__name__}: {exc} (after {n} members)")
            finally:
                try:
                    stream.close()
                except Exception as exc:  # noqa: BLE001 - a failing pipe: command reports its exit status here
                    problem = ("unreadable_shard", f"{type(exc).__name__}: {exc} (after {n} members)")
            if problem is not None:
                self.skips.record(problem[0], None, url, problem[1])
            yield {}


class _GroupByKeys:
    def __init__(self, skips: SkipLog):
        self.skips = skips

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        return group_by_keys(src, handler=self.skips.handler)


def seek_sample(fileobj: IO[bytes], start: int, max_member_bytes: int) -> bool:
    """Move an open local shard file to the header of its sample `start` (0-based, grouped as `shard_samples`
    groups members), reading member headers only, never their data; True when it did.

    False, with the file back at its beginning, when it cannot: a compressed shard, one that ends (or breaks) before
    sample `start`, or a pax global header before it (it applies to the members after it, so they cannot be read
    without it). The caller then reads the shard from its first member."""
    raw = getattr(fileobj, "raw", fileobj)  # unbuffered: a buffered read would pull in data around each header
    try:
        raw.seek(0)
        tar = tarfile.open(fileobj=raw, mode="r:", tarinfo=capped_tarinfo(max_member_bytes))
        n, last = 0, None
        while (info := tar.next()) is not None:
            tar.members = []  # keep no TarInfo: a shard of any length
            if not info.isreg() or _META_MEMBER.match(info.name):  # what `tar_members` skips
                continue
            prefix, _ = base_plus_ext(info.name)
            if prefix is None or prefix == last:  # what group_by_keys drops, or the same sample
                continue
            if n == start:
                if tar.pax_headers:
                    break
                fileobj.seek(info.offset)  # the first header of the sample (a long-name or pax header included)
                return True
            n, last = n + 1, prefix
    except (tarfile.TarError, EOFError, OSError, ValueError):
        pass
    fileobj.seek(0)
    return False


def shard_samples(url: str, skips: SkipLog, max_member_bytes: int | None = None, start: int = 0) -> Iterator[dict]:
    """The samples of one shard (members grouped by key, webdataset style) from sample `start` on, read through
    `open_shard` and `tar_members`; shard-level problems are recorded in `skips`. A sample with an `OversizedMember`
    value is yielded as it is: `_Prepare` turns it into an ``oversized_member`` skip, so it still takes its position.

    A local uncompressed shard starts at sample `start` by its headers (`seek_sample`); any other is read from its
    first member and the samples before `start` dropped."""
    item = {"url": url, "start": start}
    for i, sample in enumerate(_GroupByKeys(skips)(_TarMembers(skips, max_member_bytes)([item]))):
        if i + item.get("skipped", 0) >= start:  # "skipped" is set when the shard opens, before its first sample
            yield sample


# Exceptions a transform that decodes bytes itself raises on bad image data.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    ImageDecodeError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
)


def _wants_bytes(transform: Any) -> bool:
    """decode="auto": transforms that decode bytes themselves (seer's MultiCrop: reduced-size JPEG decoding) get the
    raw bytes; any other transform gets a decoded PIL image. A transform can opt in with `accepts_bytes = True`."""
    if getattr(transform, "accepts_bytes", False):
        return True
    from seer.data.transforms import MultiCrop

    return isinstance(transform, MultiCrop)


class _Prepare:
    """Sample dict -> (transform(image), label[, key, index]); raises SampleError (counted by the handler)."""

    def __init__(self, transform: Callable | None, decode: str, require_label: bool, with_meta: bool):
        if decode not in ("auto", "pil", "bytes"):
            raise ValueError(f"decode must be 'auto', 'pil' or 'bytes', got {decode!r}")
        if decode == "auto":
            decode = "bytes" if transform is not None and _wants_bytes(transform) else "pil"
        self.transform, self.decode = transform, decode
        self.require_label, self.with_meta = require_label, with_meta
        self.skips: SkipLog | None = None  # set by the pipeline builder, to reset the consecutive-skip counter

    def __call__(self, sample: dict) -> tuple:
        key, url = sample.get("__key__"), sample.get("__url__")
        oversized = next((v for v in sample.values() if isinstance(v, OversizedMember)), None)
        if oversized is not None:
            raise SampleError("oversized_member", key, url, str(oversized))
        image_key = next((k for k in IMAGE_MEMBER_KEYS if k in sample), None)
        if image_key is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise SampleError("no_image", key, url, f"no image member (members: {members})")
        raw = sample.get("cls")
        if raw is None:
            if self.require_label:
                raise SampleError("missing_label", key, url, "no .cls member")
            label = -1
        else:
            try:
                label = int(bytes(raw).decode("ascii").strip())
            except (ValueError, UnicodeDecodeError) as exc:
                raise SampleError("bad_label", key, url, f".cls is not an integer: {bytes(raw)[:20]!r}") from exc
        data = sample[image_key]
        if self.decode == "pil":
            try:
                data = decode_image(data)
            except Exception as exc:  # noqa: BLE001 - PIL raises many exception types on bad data
                raise SampleError("corrupt_image", key, url, f"{type(exc).__name__}: {exc}") from exc
        try:
            out = self.transform(data) if self.transform is not None else data
        except Exception as exc:  # noqa: BLE001
            decoding = self.decode == "bytes" and isinstance(exc, _DECODE_ERRORS)
            kind = "corrupt_image" if decoding else "transform_error"
            raise SampleError(kind, key, url, f"{type(exc).__name__}: {exc}") from exc
        if self.skips is not None:
            self.skips.ok()
        if not self.with_meta:
            return out, label
        return out, label, key, _sample_index(sample, key)


def _sample_index(sample: dict, key: str | None) -> int:
    """The global sample index: `index` in the .json member (written by write_shards), else a numeric key, else -1."""
    meta = sample.get("json")
    if meta is not None:
        try:
            return int(json.loads(meta)["index"])
        except (ValueError, KeyError, TypeError):
            pass
    return int(key) if key is not None and key.isdigit() else -1


def _identity(x: Any) -> Any:
    return x


class _Batcher:
    """Collates samples into batches (the last one partial), each yielded as ("batch", batch, skip records since
    the last batch); skip records left after the last batch are sent as ("skips", None, records)."""

    def __init__(self, batch_size: int, collate_fn: Callable, skips: SkipLog):
        self.batch_size, self.collate_fn, self.skips = batch_size, collate_fn, skips

    def __call__(self, src: Iterable[tuple]) -> Iterator[tuple]:
        buf = []
        for sample in src:
            buf.append(sample)
            if len(buf) == self.batch_size:
                yield "batch", self.collate_fn(buf), self.skips.drain()
                buf = []
        if buf:
            yield "batch", self.collate_fn(buf), self.skips.drain()
        records = self.skips.drain()
        if records:
            yield "skips", None, records


# ====================================================================================================================
# Loaders


class _LoaderBase:
    """Shared bookkeeping: skip statistics merged from the workers' in-band records."""

    keep_skipped: int | None = None

    def _reset_stats(self) -> None:
        self.stats: dict[str, Any] = {"batches": 0, "samples": 0, "skipped": 0, "by_kind": {}}
        self.skipped: list[dict] = []
        self._last_summary = time.monotonic()

    def _absorb(self, records: list[dict]) -> None:
        if not records:
            return
        self.stats["skipped"] += len(records)
        by_kind = self.stats["by_kind"]
        for r in records:
            by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
        self.skipped += records
        if self.keep_skipped is not None and len(self.skipped) > self.keep_skipped:
            del self.skipped[: len(self.skipped) - self.keep_skipped]
        if time.monotonic() - self._last_summary > 300:
            self.log_summary()

    def log_summary(self) -> None:
        """Log the skip counts so far (called at the end of every pass and at most every 5 minutes)."""
        self._last_summary = time.monotonic()
        if self.stats["skipped"]:
            log.warning(
                "%s: %d sample(s) or shard(s) skipped so far (%s) after %d batches",
                type(self).__name__,
                self.stats["skipped"],
                ", ".join(f"{k}={v}" for k, v in sorted(self.stats["by_kind"].items())),
                self.stats["batches"],
            )

    def _dataloader(self, pipeline: IterableDataset) -> Any:
        if self.num_workers == 0:
            return pipeline
        kwargs = {"prefetch_factor": self.prefetch_factor} if self.prefetch_factor is not None else {}
        if self.multiprocessing_context is not None:
            kwargs["multiprocessing_context"] = self.multiprocessing_context
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            **kwargs,
        )


def _count(batch: Any, default: int) -> int:
    """Samples in a batch: the length of its labels (second element), else the batch size."""
    try:
        return len(batch[1])
    except (TypeError, IndexError, KeyError):
        return default


def _check_rank(rank: int, world_size: int, batch_size: int, num_workers: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


class EvalLoader(_LoaderBase):
    """Finite evaluation stream: each sample of `urls` exactly once across ranks x workers, in batches of
    `(images, labels, keys, indices)`. Shards are split over ranks, then workers, so ranks may get different
    numbers of batches (do not run per-batch collectives on it). Skipped samples are listed in `.skipped` with
    their keys (or shard URL for shard-level failures) and counted in `.stats`."""

    def __init__(
        self,
        urls: Any,
        transform: Callable | None,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
        decode: str = "auto",
        require_label: bool = True,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: str | None = None,
    ):
        _check_rank(rank, world_size, batch_size, num_workers)
        self.urls = expand_urls(urls)
        self.transform, self.batch_size = transform, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.collate_fn = collate_fn or default_collate
        self.decode, self.require_label = decode, require_label
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.max_member_bytes = read_limits().max_member_bytes  # the cap in force now, also in spawned workers
        _Prepare(transform, decode, require_label, True)
        self._reset_stats()

    def pipeline(self) -> wds.DataPipeline:
        skips = SkipLog(max_consecutive=None)
        prepare = _Prepare(self.transform, self.decode, self.require_label, with_meta=True)
        prepare.skips = skips
        return wds.DataPipeline(
            _ShardList(self.urls, self.rank, self.world_size),
            _TarMembers(skips, self.max_member_bytes),
            _GroupByKeys(skips),
            wds.map(prepare, handler=skips.handler),
            _Batcher(self.batch_size, self.collate_fn, skips),
        )

    def __iter__(self) -> Iterator[Any]:
        self._reset_stats()
        for tag, batch, records in self._dataloader(self.pipeline()):
            self._absorb(records)
            if tag == "batch":
                self.stats["batches"] += 1
                self.stats["samples"] += _count(batch, self.batch_size)
                yield batch
        self.log_summary()

    @property
    def skipped_keys(self) -> list[str]:
        """Keys of the samples skipped in the last pass (shard-level failures have no key: see `.skipped`)."""
        return [r["key"] for r in self.skipped if r["key"] is not None]


def eval_loader(
    urls: Any,
    transform: Callable | None,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    **kwargs: Any,
) -> EvalLoader:
    """Evaluation stream over shards: finite batches `(images, labels, keys, indices)`, each sample exactly once
    across ranks and workers; skipped keys in `.skipped` / `.skipped_keys` after a pass. See `EvalLoader`."""
    return EvalLoader(
        urls, transform, batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers, **kwargs
    )


# ====================================================================================================================
# Verification


def _verify_one(args: tuple[str, int | None, bool, bool, int]) -> dict:
    """Read one shard completely: count samples, find problems, optionally decode every image."""
    url, expected, decode, require_label, max_member_bytes = args
    # the report lists every problem: no per-sample warnings (but the log still says which commands run)
    skips = SkipLog(warn_first=0, warn_every_s=float("inf"))
    prepare = _Prepare(None, "bytes", require_label=require_label, with_meta=False)
    samples = unlabeled = 0
    for sample in shard_samples(url, skips, max_member_bytes):
        try:
            data, label = prepare(sample)
            unlabeled += "cls" not in sample
            if decode:
                try:
                    decode_image(data)
                except Exception as exc:  # noqa: BLE001
                    key = sample.get("__key__")
                    raise SampleError("corrupt_image", key, url, f"{type(exc).__name__}: {exc}") from exc
            samples += 1
        except SampleError as exc:
            skips.handler(exc)
    problems = skips.drain()
    if expected is not None and samples + sum(1 for p in problems if p["key"] is not None) != expected:
        problems.append({"kind": "count_mismatch", "key": None, "url": url, "error": f"index says {expected} samples"})
    return {"url": url, "samples": samples, "unlabeled": unlabeled, "expected": expected, "problems": problems}


def verify_shards(
    urls: Any, *, decode: bool = False, workers: int = 1, progress: bool = True, require_label: bool = True
) -> dict:
    """Read every shard to the end and report problems: unreadable / truncated / empty shards, samples without an
    image (or, with `require_label`, without a label: pretraining needs none), members over the member cap
    (``seer.data.limits``), undecodable images (with `decode=True`), and sample counts that differ from `index.json`
    (the only way to notice a tar truncated exactly between two members).

    Returns `{"shards": [{"url", "samples", "unlabeled", "expected", "problems"}], "total", "unlabeled",
    "problems": [...], "ok": bool}`.
    """
    expanded = expand_urls(urls)
    expected: dict[str, int] = {}
    if isinstance(urls, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(urls))
        if os.path.isdir(path) or (path.endswith(".json") and os.path.isfile(path)):
            index = read_index(path)
            expected = {u: s["samples"] for u, s in zip(index["urls"], index["shards"])}
    from tqdm.auto import tqdm

    cap = read_limits().max_member_bytes
    jobs = [(u, expected.get(u), decode, require_label, cap) for u in expanded]
    results = []
    with tqdm(total=len(jobs), unit="shard", desc="verify", disable=not progress) as bar:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            with mp.get_context().Pool(min(workers, len(jobs))) as pool:
                for r in pool.imap(_verify_one, jobs):
                    results.append(r)
                    bar.update(1)
        else:
            for job in jobs:
                results.append(_verify_one(job))
                bar.update(1)
    problems = [p for r in results for p in r["problems"]]
    total, unlabeled = sum(r["samples"] for r in results), sum(r["unlabeled"] for r in results)
    return {"shards": results, "total": total, "unlabeled": unlabeled, "problems": problems, "ok": not problems}
