"""Process-group setup from torchrun, SLURM or submitit environment variables.

    env = init_distributed()          # one process with no variables set: no process group, rank 0 of 1
    ...
    destroy_distributed()

Backend: NCCL when CUDA is available, gloo otherwise. The rendezvous address of a SLURM job is the first host of
``SLURM_JOB_NODELIST`` (parsed here in pure Python; ``scontrol`` is not needed).
"""

from __future__ import annotations

import datetime
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seer.hardware import resolve_device

__all__ = [
    "DistEnv",
    "init_distributed",
    "destroy_distributed",
    "parse_nodelist",
    "detect_launcher",
    "is_peer_failure",
    "collective_timeout",
]

# datetime.timedelta's own limit (999999999 days), in minutes: a longer timeout cannot even be represented
MAX_TIMEOUT_MINUTES = datetime.timedelta.max // datetime.timedelta(minutes=1)

# What a rank raises when a peer is gone or hung: gloo's transport errors (a RuntimeError naming the socket), NCCL's
# watchdog / abort errors and the store's (torch.distributed.DistError and subclasses), and collective timeouts.
_PEER_FAILURE = re.compile(
    r"Connection (reset|closed) by peer|Broken pipe|third_party/gloo|Timed out waiting|"
    r"Socket Timeout|NCCL communicator was aborted|Watchdog caught collective operation timeout|"
    r"ProcessGroupNCCL.*(timeout|abort)",
    re.IGNORECASE,
)


def is_peer_failure(exc: BaseException) -> bool:
    """Did this rank fail because another rank died or hung (not because of its own bug or data)?

    The launcher requeues a job on these: the dead rank's work is lost, the others resume from the last complete
    checkpoint. Anything else (a bad config, bad data, NaN loss, out of memory) fails the job as it is.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
        if isinstance(exc, (RuntimeError, ConnectionError, TimeoutError)) and _PEER_FAILURE.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


# ----------------------------------------------------------------------------------------------------------------
# SLURM nodelists: "node[001-003,007],gpu-a[1-2]" -> ["node001", "node002", "node003", "node007", "gpu-a1", ...]
# ----------------------------------------------------------------------------------------------------------------
def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"bad SLURM nodelist {text!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"bad SLURM nodelist {text!r}: unbalanced '['")
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _expand_range(spec: str, nodelist: str) -> list[str]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        if re.fullmatch(r"\d+", item):
            out.append(item)
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", item)
        if not m or int(m.group(1)) > int(m.group(2)):
            raise ValueError(f"bad SLURM nodelist {nodelist!r}: range {item!r}")
        lo, hi = m.groups()
        width = len(lo)  # zero padding is kept: node[001-010] -> node001 ... node010
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist expression (what ``scontrol show hostnames`` prints), in order.

    Supports several bracket groups per name (``rack[1-2]-n[01-02]``), zero-padded ranges and comma lists.
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        names = [""]
        for m in re.finditer(r"([^\[\]]+)|\[([^\[\]]*)\]", part):
            if m.group(1) is not None:
                names = [n + m.group(1) for n in names]
            else:
                names = [n + x for n in names for x in _expand_range(m.group(2), nodelist)]
        hosts.extend(names)
    if not hosts:
        raise ValueError(f"empty SLURM nodelist {nodelist!r}")
    return hosts


# ----------------------------------------------------------------------------------------------------------------
# Environment detection
# ----------------------------------------------------------------------------------------------------------------
def detect_launcher(environ: dict | None = None) -> dict | None:
    """Rank/world/local rank/master address from torchrun, submitit or SLURM variables (in that order).

    Returns ``None`` when nothing says this is a multi-process job.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or anything that sets the torch variables)
        return {
            "launcher": "torchrun",
            "rank": int(env["RANK"]),
            "world_size": int(env["WORLD_SIZE"]),
            "local_rank": int(env.get("LOCAL_RANK", 0)),
            "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
            "master_port": int(env.get("MASTER_PORT", 29500)),
        }
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun / sbatch / submitit (which runs under srun)
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        # A stable port per job so every task agrees without talking: 20000 + last digits of the job id.
        job_id = env.get("SLURM_JOB_ID", "0")
        default_port = 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000
        return {
            "launcher": "submitit" if "SUBMITIT_EXECUTOR" in env or "SUBMITIT_FOLDER" in env else "slurm",
            "rank": int(env["SLURM_PROCID"]),
            "world_size": int(env["SLURM_NTASKS"]),
            "local_rank": int(env.get("SLURM_LOCALID", 0)),
            "master_addr": env.get("MASTER_ADDR") or parse_nodelist(nodelist)[0],
            "master_port": int(env.get("MASTER_PORT", default_port)),
        }
    return None


def collective_timeout(minutes: float) -> datetime.timedelta:
    """The collective timeout of ``minutes``; ValueError (not an OverflowError traceback) when it is not a finite
    number of minutes > 0 that a ``timedelta`` holds: ``.inf`` or ``1e300`` used to fail deep in ``timedelta``."""
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)):
        raise ValueError(f"must be a number of minutes, got {minutes!r}")
    if not (math.isfinite(minutes) and 0 < minutes <= MAX_TIMEOUT_MINUTES):
        raise ValueError(f"must be a finite number of minutes > 0 and <= {MAX_TIMEOUT_MINUTES}, got {minutes!r}")
    return datetime.timedelta(minutes=minutes)


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0, device: str = "auto") -> DistEnv:
    """Initialize the default process group from the launcher's variables (no-op for a lone process).

    Args:
        backend: force "nccl" or "gloo"; default NCCL on CUDA, gloo on CPU.
        timeout_minutes: collective timeout.
        device: "auto" (CUDA if available), "cpu" or "cuda" (a lone process may name its GPU: "cuda:1"; the ranks
            of a job take GPU ``local_rank``).

    Raises:
        ValueError: ``timeout_minutes`` is not a finite number of minutes > 0 (checked first, on every launcher);
            ``device`` is not a device, or asks for a GPU this machine lacks (``seer.hardware.resolve_device``).
    """
    try:
        timeout = collective_timeout(timeout_minutes)
    except ValueError as exc:
        raise ValueError(f"timeout_minutes (train.dist_timeout_minutes): {exc}") from None
    requested = resolve_device(device, what="train.device")
    if requested.type not in ("cpu", "cuda"):
        raise ValueError(f"train.device={device!r}: training runs on 'cpu' or 'cuda' (or 'auto'), not {requested.type}")
    use_cuda = requested.type == "cuda"
    info = detect_launcher()
    if info is None or info["world_size"] == 1 and not dist.is_initialized() and info["launcher"] != "torchrun":
        dev = torch.device("cuda", requested.index or 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        return DistEnv(0, 1, 0, dev, None)
    rank, world_size, local_rank = info["rank"], info["world_size"], info["local_rank"]
    if use_cuda:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        # torch reads these for init_method="env://"; SLURM does not set them.
        os.environ.setdefault("MASTER_ADDR", str(info["master_addr"]))
        os.environ.setdefault("MASTER_PORT", str(info["master_port"]))
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=dev if use_cuda else None,
            store=_elastic_store(world_size, timeout),
        )
    return DistEnv(rank, world_size, local_rank, dev, backend)


def _elastic_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the agent's store with a prefix per restart of the worker group (None elsewhere: env://).

    torchrun's agent serves one TCPStore for every restart of the group, and torch's env:// rendezvous adds no
    per-restart prefix to it (it assumes a new store per restart). A restarted rank could then read a dead peer's
    gloo address from the previous round and fail with "Connection refused" (seen: a torchrun worker SIGKILLed,
    the restarted group failing to connect in 4 of 5 runs).
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                         timeout=timeout)  # fmt: skip
    return dist.PrefixStore(f"seer/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/restart_{restart}", base)


def destroy_distributed(*, wait_for_peers: bool = False) -> None:
    """Tear down the default process group if there is one.

    ``wait_for_peers`` (the success path) first meets every rank at a barrier, so no rank tears its group down, or
    exits and takes the TCP store (rank 0) with it, while a peer still has gloo work in flight: a rank that lost
    that race was seen dying with SIGABRT after its run had finished. A failed barrier (a peer already gone) is
    not an error here: teardown goes on.
    """
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers and dist.get_world_size() > 1:
            try:
                dist.barrier()
            except Exception:  # noqa: BLE001 - a dead peer must not turn a finished run into a failure
                pass
        dist.destroy_process_group()
