"""The sharded start: build a model on the meta device, shard it, then give each rank only its shards.

A model built the usual way (``build_model(cfg)``) exists whole on every rank before ``parallelize`` shards it: the
10B is 38.5 GB per GPU and ~308 GB of host RAM per 8-GPU node at start-up. Here instead:

1. ``record_init(build)`` runs the model's own construction on the meta device (no memory) under a dispatch mode
   that records every tensor operation it makes: the constructors' default inits, the trunk's ``init_weights``,
   the head's, the prototypes' normalization, layout conversions. The model code is unchanged and unaware.
2. ``parallelize`` shards the meta model (FSDP2's ``fully_shard`` works on meta modules).
3. ``materialize`` allocates only the shards (``to_empty``) and replays the recorded operations on the CPU generator
   in their original order, so every random draw is the one the whole-model build makes: each tensor is initialized
   *whole*, bit for bit as before, this rank's slice of it is copied into its shard, and it is freed. A per-shard
   local initialization could not give the same numbers.

The replay keeps a tensor only while a later operation still needs its value (liveness over the recorded program):
a draw that is overwritten later (``nn.Conv2d``'s default init before ``init_weights``' normal draw) is made in a
scratch buffer and dropped at once, and a pure layout copy (``channels_last``) of a finished tensor is read from the
tensor itself. Start-up memory per rank is then one shard of the model plus about the largest tensor (twice, where
an operation reads one tensor to write another), whatever the model size; ``InitProgram.replay_peak_bytes`` computes
that peak without running anything (``seer plan`` prints it).

What the replay cannot reproduce it refuses, by name: a value set outside the operations a dispatch mode sees (a
``torch.tensor(...)`` literal on the meta device that no recorded operation overwrites), random numbers drawn on a
real device while the model is built on the meta device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["InitProgram", "InitRecorder", "ReplayError", "record_init", "materialize", "copy_into", "local_slice"]

aten = torch.ops.aten


class ReplayError(RuntimeError):
    """The recorded construction of a model cannot be replayed exactly (what and why is in the message)."""


# Operations that overwrite their first argument without reading it (when it covers its whole storage): the value
# the storage held before is dead, so the replay need not keep it.
_OVERWRITES = {
    aten.fill_,
    aten.zero_,
    aten.uniform_,
    aten.normal_,
    aten.random_,
    aten.bernoulli_,
    aten.exponential_,
    aten.geometric_,
    aten.cauchy_,
    aten.log_normal_,
    aten.copy_,
}
# A copy that changes only the memory layout: its result has the values of its input, index for index.
_LAYOUT_COPIES = {aten._to_copy.default, aten.clone.default}


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A recorded tensor: a view (dtype, size, stride, offset) of recorded storage ``sid``."""

    sid: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclasses.dataclass(frozen=True)
class _Const:
    """A real (non-meta) tensor an operation read, kept as it was (a checkpoint's head, a CPU literal)."""

    tensor: torch.Tensor


_META_DEVICE = torch.device("meta")


@dataclasses.dataclass
class _Op:
    func: Any
    args: Any  # (args, kwargs) with tensors as _Ref / _Const
    outs: list  # the output leaves: _Ref (meta tensors) or None
    reads: frozenset[int]
    writes: frozenset[int]
    creates: frozenset[int]
    overwrites: frozenset[int]  # storages written in full without being read
    rng: bool
    # filled by InitProgram._plan
    execute: bool = True
    emits: tuple[int, ...] = ()
    keep: frozenset[int] = frozenset()  # the storages this op touches that stay live after it


def _covers_storage(t: torch.Tensor) -> bool:
    """True when ``t`` addresses every byte of its storage exactly once."""
    return (
        t.storage_offset() == 0
        and t.numel() * t.element_size() == t.untyped_storage().nbytes()
        and (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)))
    )


class InitRecorder(TorchDispatchMode):
    """Record the tensor operations of a model's construction on the meta device.

    ``with InitRecorder() as rec, torch.device("meta"): model = build()`` then ``rec.program(model)``. Operations on
    real tensors alone are not recorded (reading a checkpoint's head is allowed), but random numbers drawn on a real
    device during the recording are an error: the replay could not draw them again in the same place.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []
        self._sids: dict[int, int] = {}  # StorageImpl address -> storage id
        self.nbytes: list[int] = []
        self.outside: set[int] = set()  # storages first seen as inputs (made without a recorded operation)
        self._keep: list[torch.Tensor] = []  # meta tensors kept alive: no StorageImpl address is reused meanwhile
        self.rng_state: torch.Tensor | None = None

    def __enter__(self) -> InitRecorder:
        # The replay starts from the generator state the build starts from (the build on meta draws nothing).
        self.rng_state = torch.get_rng_state()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        torch.set_rng_state(self.rng_state)

    def _sid(self, t: torch.Tensor, *, new: bool) -> int:
        storage = t.untyped_storage()
        key = storage._cdata
        sid = self._sids.get(key)
        if sid is None:
            sid = len(self.nbytes)
            self._sids[key] = sid
            self.nbytes.append(storage.nbytes())
            if not new:
                self.outside.add(sid)
            self._keep.append(t)
        else:
            self.nbytes[sid] = max(self.nbytes[sid], storage.nbytes())
        return sid

    def _ref(self, t: torch.Tensor, *, new: bool = False) -> _Ref:
        return _Ref(self._sid(t, new=new), t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        rng = torch.Tag.nondeterministic_seeded in func.tags
        out = func(*args, **kwargs)
        out_leaves = pytree.tree_leaves(out)
        on_meta = any(t.is_meta for t in leaves) or any(isinstance(t, torch.Tensor) and t.is_meta for t in out_leaves)
        if not on_meta:
            if rng:
                where = [t.device for t in [*leaves, *out_leaves] if isinstance(t, torch.Tensor)]
                raise ReplayError(
                    f"{func} drew random numbers on {where[0] if where else 'a real device'} while the model was built "
                    "on the meta device: build every tensor on the default device so that the sharded start can "
                    "replay its initialization"
                )
            return out
        if any(isinstance(t, torch.Tensor) and not t.is_meta for t in out_leaves):
            raise ReplayError(f"{func} copied a meta tensor to a real device while the model was built")

        def convert(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return self._ref(x) if x.is_meta else _Const(x)
            return x

        for t in leaves:  # inputs first: a storage made without a recorded operation is "outside"
            if t.is_meta:
                self._sid(t, new=False)
        rec_args = pytree.tree_map(convert, (args, kwargs))
        writes: set[int] = set()
        schema_args = func._schema.arguments
        for i, a in enumerate(schema_args):
            if a.alias_info is not None and a.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(a.name)
                writes.update(self._sid(t, new=False) for t in pytree.tree_leaves(value)
                              if isinstance(t, torch.Tensor) and t.is_meta)  # fmt: skip
        # Everything an operation is given counts as read, except the target of a pure overwrite (its old value).
        first = args[0] if args and isinstance(args[0], torch.Tensor) and args[0].is_meta else None
        overwrites: set[int] = set()
        if first is not None and func.overloadpacket in _OVERWRITES and _covers_storage(first):
            overwrites.add(self._sid(first, new=False))
        others = [t for t in pytree.tree_leaves((args[1:], kwargs)) if isinstance(t, torch.Tensor) and t.is_meta]
        reads = {self._sid(t, new=False) for t in others}
        if first is not None and not overwrites:
            reads.add(self._sid(first, new=False))
        creates: set[int] = set()
        outs = []
        for t in out_leaves:
            if not isinstance(t, torch.Tensor):
                outs.append(None)
                continue
            known = t.untyped_storage()._cdata in self._sids
            ref = self._ref(t, new=True)
            if not known:
                creates.add(ref.sid)
            outs.append(ref)
        self.ops.append(_Op(func, rec_args, outs, frozenset(reads), frozenset(writes), frozenset(creates),
                            frozenset(overwrites), rng))  # fmt: skip
        return out

    def program(self, model: nn.Module) -> InitProgram:
        """The recorded construction of ``model``: where each parameter's and buffer's final value is."""
        final: dict[str, _Ref] = {}
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            if t is None:
                continue
            if not t.is_meta:
                raise ReplayError(f"{name} is on {t.device}, not on the meta device: not built under record_init")
            if t.untyped_storage()._cdata not in self._sids:
                raise ReplayError(
                    f"{name}: its value was set without any tensor operation the recording sees (e.g. "
                    "torch.tensor(...) on the meta device): the sharded start cannot replay it"
                )
            final[name] = self._ref(t)
        return InitProgram(self.ops, list(self.nbytes), set(self.outside), final, self.rng_state)


def record_init(build: Callable[[], nn.Module]) -> tuple[nn.Module, InitProgram]:
    """``build()`` on the meta device, its initialization recorded: ``(meta model, program)``.

    The global CPU generator is left as it was: ``materialize`` draws the same numbers from the same state later.
    """
    with InitRecorder() as rec, torch.device("meta"):
        model = build()
    return model, rec.program(model)


class InitProgram:
    """A model's recorded construction: the operations, and where each parameter's and buffer's value ends up.

    ``replay(sink)`` runs it on the CPU, calling ``sink(names, value)`` with each final tensor as soon as no later
    operation writes it (``names``: the parameters / buffers that hold it), and drops every tensor as soon as no later
    operation reads it.
    """

    def __init__(self, ops: list[_Op], nbytes: list[int], outside: set[int], final: dict[str, _Ref],
                 rng_state: torch.Tensor | None) -> None:  # fmt: skip
        self.ops, self.nbytes, self.outside, self.final, self.rng_state = ops, nbytes, outside, final, rng_state

    @property
    def names(self) -> list[str]:
        """Every parameter and buffer the program gives a value."""
        return list(self.final)

    def numel(self) -> dict[str, int]:
        """Elements of every final tensor."""
        return {n: int(torch.Size(r.size).numel()) for n, r in self.final.items()}

    # -- analysis ------------------------------------------------------------------------------------------------
    def _plan(self, skip: Callable[[str], bool]) -> tuple[list[_Op], dict[int, list[tuple[str, _Ref]]]]:
        """Which operations run, what each emits, and what stays live after it (a copy of the ops)."""
        ops = [dataclasses.replace(op) for op in self.ops]
        final: dict[str, _Ref] = {n: r for n, r in self.final.items() if not skip(n)}

        writers: dict[int, list[int]] = {}
        readers: dict[int, list[int]] = {}
        for i, op in enumerate(ops):
            for s in op.writes | op.creates:
                writers.setdefault(s, []).append(i)
            for s in op.reads:
                readers.setdefault(s, []).append(i)

        # A pure layout copy (channels_last) of a tensor neither written after it: read the final value from the
        # copy's input instead, so the input need not wait, whole, for the conversion of the whole model.
        by_sid: dict[int, list[str]] = {}
        for n, r in final.items():
            by_sid.setdefault(r.sid, []).append(n)
        for i, op in enumerate(ops):
            if op.func not in _LAYOUT_COPIES or len(op.creates) != 1 or len(op.reads) != 1:
                continue
            inputs = [x for x in pytree.tree_leaves(op.args) if isinstance(x, _Ref)]
            src, out, kwargs = (inputs[0] if len(inputs) == 1 else None), op.outs[0], op.args[1]
            if src is None or out is None or out.sid not in op.creates or src.size != out.size:
                continue
            if kwargs.get("dtype", src.dtype) != src.dtype or kwargs.get("device", _META_DEVICE) != _META_DEVICE:
                continue
            later_writes = [j for s in (src.sid, out.sid) for j in writers.get(s, []) if j > i]
            later_reads = [j for j in readers.get(out.sid, []) if j > i]
            names = by_sid.get(out.sid, [])
            if later_writes or later_reads or not names or any(final[n] != out for n in names):
                continue
            for n in names:
                final[n] = src
            by_sid.setdefault(src.sid, []).extend(names)
            del by_sid[out.sid]

        emit_at: dict[int, list[int]] = {}
        emitted: dict[int, list[tuple[str, _Ref]]] = {}
        for sid, names in by_sid.items():
            if sid not in writers:
                raise ReplayError(f"{names[0]}: no recorded operation sets its value (set outside the recording)")
            emit_at.setdefault(writers[sid][-1], []).append(sid)
            emitted[sid] = [(n, final[n]) for n in names]

        # Liveness, backwards: ``live`` holds the storages whose current value a later operation (or emission) reads.
        live: set[int] = set()
        for i in range(len(ops) - 1, -1, -1):
            op = ops[i]
            op.emits = tuple(emit_at.get(i, ()))
            op.keep = frozenset((op.reads | op.writes | op.creates) & live)
            needed = live | set(op.emits)
            # an operation runs when it draws random numbers (every later draw depends on it) or sets a needed value
            op.execute = op.rng or bool((op.writes | op.creates) & needed)
            live = (needed - op.overwrites - op.creates) | op.reads if op.execute else needed
        if live:  # name what the first operation reading such a value sets
            first = min(readers[s][0] for s in live)
            written = ops[first].writes | ops[first].creates
            names = [n for n, r in self.final.items() if r.sid in written] or ["a temporary"]
            raise ReplayError(
                f"the recorded construction reads values it never set (made outside the recording, e.g. a "
                f"torch.tensor(...) literal on the meta device): {ops[first].func} reads one to set {names[:4]}"
            )
        return ops, emitted

    def replay_peak_bytes(self, skip: Callable[[str], bool] = lambda name: False) -> int:
        """The most bytes the replay holds at once (whole tensors before they are sharded, temporaries, its scratch
        buffer), computed from the program alone: nothing is allocated."""
        ops, _ = self._plan(skip)
        pool = _Pool(lambda n: _Size(n))
        for op in ops:
            if not op.execute:
                continue
            for s in op.writes - pool.env.keys():
                pool.scratch(s, self.nbytes[s])
            for s in op.creates:
                pool.adopt(s, _Size(self.nbytes[s]))
            pool.mark_peak()
            for s in (op.reads | op.writes | op.creates) - op.keep:
                pool.free(s)
        return pool.peak

    # -- replay --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def replay(self, sink: Callable[[list[str], torch.Tensor], None], *,
               skip: Callable[[str], bool] = lambda name: False) -> dict:  # fmt: skip
        """Run the program on the CPU from the recorded generator state; ``sink(names, value)`` for each final tensor.

        ``skip(name)``: parameters / buffers whose values come from elsewhere (``model.init_from``): their
        operations still draw their random numbers (so that every later draw is the same), into scratch buffers.
        Returns ``{"ops", "executed", "peak_bytes", "tensors"}`` (bytes held at once by the replay).
        """
        ops, emitted = self._plan(skip)
        cpu = torch.device("cpu")
        pool = _Pool(lambda n: torch.UntypedStorage(n, device=cpu))
        env = pool.env
        tensors = executed = 0

        def real(x: Any) -> Any:
            if isinstance(x, _Ref):
                return torch.empty(0, dtype=x.dtype, device=cpu).set_(env[x.sid], x.offset, x.size, x.stride)
            if isinstance(x, _Const):
                return x.tensor
            if isinstance(x, torch.device) and x.type == "meta":
                return cpu
            return x

        if self.rng_state is not None:
            torch.set_rng_state(self.rng_state)
        for op in ops:
            if not op.execute:
                continue
            executed += 1
            for s in op.writes - env.keys():
                # a dead value (overwritten in full here, or a draw no one reads): only the storage is needed
                pool.scratch(s, self.nbytes[s])
            args, kwargs = pytree.tree_map(real, op.args)
            out = op.func(*args, **kwargs)
            for ref, t in zip(op.outs, pytree.tree_leaves(out)):
                if ref is None or ref.sid not in op.creates:
                    continue
                if (tuple(t.shape), tuple(t.stride()), t.storage_offset()) != (ref.size, ref.stride, ref.offset):
                    # laid out otherwise than on meta: keep the recorded layout, which later views address
                    storage = torch.UntypedStorage(self.nbytes[ref.sid], device=cpu)
                    view = torch.empty(0, dtype=ref.dtype, device=cpu).set_(storage, ref.offset, ref.size, ref.stride)
                    view.copy_(t)
                    pool.adopt(ref.sid, storage)
                else:
                    pool.adopt(ref.sid, t.untyped_storage())
            pool.mark_peak()
            for s in op.emits:
                for name, ref in emitted[s]:
                    sink([name], real(ref))
                    tensors += 1
            for s in (op.reads | op.writes | op.creates) - op.keep:
                pool.free(s)
        return {"ops": len(ops), "executed": executed, "peak_bytes": pool.peak, "tensors": tensors}


class _Size:
    """A storage's size alone (``replay_peak_bytes`` simulates the replay's allocations with these)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def nbytes(self) -> int:
        return self.n


class _Pool:
    """The replay's storages (``env``: storage id -> storage) and the bytes they hold, with one spare buffer.

    The largest freed scratch buffer is kept and reused for the next dead value that fits: most draws are dead
    (every ``nn.Conv2d`` draws its default init before ``init_weights`` draws again), and a fresh allocation each time
    costs a page fault per 4 KiB page (measured: a third of the replay's time on RG-256). The spare stays counted.
    """

    def __init__(self, allocate: Callable[[int], Any]) -> None:
        self.allocate, self.env, self.own = allocate, {}, set()
        self.spare: Any = None
        self.held = self.peak = 0

    def scratch(self, sid: int, n: int) -> None:
        if self.spare is not None and self.spare.nbytes() >= n:
            self.env[sid], self.spare = self.spare, None
        else:
            if self.spare is not None:  # too small: released first, so that two large buffers are never held
                self.held -= self.spare.nbytes()
                self.spare = None
            self.env[sid] = self.allocate(n)
            self.held += n
        self.own.add(sid)  # allocated here: nothing else refers to it, so it may be reused once freed

    def adopt(self, sid: int, storage: Any) -> None:
        self.env[sid] = storage
        self.held += storage.nbytes()

    def mark_peak(self) -> None:
        self.peak = max(self.peak, self.held)

    def free(self, sid: int) -> None:
        storage = self.env.pop(sid, None)
        if storage is None:
            return
        if sid in self.own:
            self.own.discard(sid)
            if self.spare is None or storage.nbytes() > self.spare.nbytes():
                if self.spare is not None:
                    self.held -= self.spare.nbytes()
                self.spare = storage
                return
        self.held -= storage.nbytes()


# ----------------------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------------------
def local_slice(dst: torch.Tensor) -> tuple[slice, ...] | None:
    """The index of the full tensor that ``dst`` holds on this rank: a DTensor's local shard, None for a plain
    tensor (it holds everything)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(dst, DTensor):
        return None
    shape, offset = compute_local_shape_and_global_offset(dst.shape, dst.device_mesh, dst.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def copy_into(dst: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Copy this rank's part of ``full`` into ``dst`` (a sharded DTensor's local shard, or a plain tensor whole).

    ``full`` is only indexed: a memory-mapped checkpoint tensor is read for this rank's rows alone. Returns the part
    read (before conversion to ``dst``'s dtype and device).
    """
    if tuple(full.shape) != tuple(dst.shape):
        raise ValueError(f"shape {tuple(full.shape)} does not fit {tuple(dst.shape)}")
    index = local_slice(dst)
    part = full if index is None else full[index]
    local = dst if index is None else dst.to_local()
    local.copy_(part)
    return part


def materialize(model: nn.Module, program: InitProgram, device: torch.device | str, *,
                skip: Iterable[str] = ()) -> dict:  # fmt: skip
    """Allocate ``model``'s (sharded) parameters and buffers on ``device`` and initialize them as ``program`` did.

    ``model`` is the meta model ``record_init`` built, after ``parallelize`` sharded it (parameter names unchanged).
    Each tensor is initialized whole on the CPU, in the recorded order and from the recorded generator state, and
    only this rank's shard of it is copied to ``device``. ``skip``: name prefixes (``"trunk."``) whose values are
    loaded afterwards (``model.init_from``); they are allocated but their values left undefined.

    Returns the replay's ``{"ops", "executed", "peak_bytes", "tensors"}``.
    """
    prefixes = tuple(skip)
    model.to_empty(device=device)
    targets: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    targets.update((n, b) for n, b in model.named_buffers(remove_duplicate=False) if b is not None)
    expected = {n for n in program.names if not n.startswith(prefixes)} if prefixes else set(program.names)
    wanted = {n for n in targets if not n.startswith(prefixes)} if prefixes else set(targets)
    if wanted != expected:
        extra, missing = sorted(wanted - expected), sorted(expected - wanted)
        raise ReplayError(
            f"the sharded model's tensors differ from the recorded ones: new {extra[:4]}, gone {missing[:4]}"
        )
    done: set[str] = set()

    def sink(names: list[str], value: torch.Tensor) -> None:
        for name in names:
            copy_into(targets[name], value)
            done.add(name)

    stats = program.replay(sink, skip=lambda name: name.startswith(prefixes) if prefixes else False)
    if done != expected:
        raise ReplayError(f"the replay left {sorted(expected - done)[:4]} without a value")
    return stats
