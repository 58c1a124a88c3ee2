"""SwAV (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"), in one module.

Everything the method needs lives here: its config (``SwAVConfig``, the ``swav:`` section of a pretraining config),
the projection head, the prototypes, the Sinkhorn-Knopp codes, the queue, the swapped-prediction loss, and the
trunk + head model the training loop trains (``SwAVModel``, built by ``build_model``; ``seer.train.methods`` maps
``method: swav`` to it). It runs in one process as well as on many: the only collectives are the Sinkhorn sums,
guarded by ``dist.is_available() and dist.is_initialized()``, which make the codes of a batch split over ranks equal
to the codes of the whole batch in one process (as in SwAV's ``distributed_sinkhorn``).

Typical step (what ``seer.train.loop`` does with any method's model)::

    model = build_model(trunk, SwAVConfig(head_dims=[2048, 128]))
    model.before_forward(step)          # L2-normalized prototypes; the step (queue start) for the forward
    out = model(crops)                  # {"loss", "codes", "queue_used"}
    out["loss"].backward()
    model.before_optimizer_step(step)   # no update reaches frozen prototypes
    optimizer.step()
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seer.validation import check_numbers

__all__ = [
    "SwAVConfig",
    "CollapseStats",
    "SwAV",
    "Prototypes",
    "SwAVModel",
    "build_model",
    "build_projection",
    "head_params",
    "multicrop_forward",
    "sinkhorn",
]


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _host_read_is_free(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host costs no wait for a device (a CPU tensor)."""
    return t.device.type == "cpu"


def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum" or "max") when a process group is up; identity in one process."""
    if _dist_on():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------------------------------------------
# Config: the ``swav`` section of a pretraining config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SwAVConfig:
    """The SwAV head and loss (see ``SwAV``); ``head_dims`` follow the trunk width."""

    # Projection MLP widths after the trunk's (hidden layers, then the embedding): SEER RG-32 [4096, 4096, 256].
    head_dims: list = field(default_factory=lambda: [2048, 128])
    use_bn: bool = True  # BatchNorm1d after each hidden layer of the projection (False in SEER-10B's head)
    n_prototypes: int = 3000  # K, the prototypes the codes are spread over (SwAV 3000, SEER 16000)
    temperature: float = 0.1  # softmax temperature of the predictions against the prototypes
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations per step computing the codes (SEER 10)
    epsilon: float = 0.05  # Sinkhorn regularization: lower gives sharper codes (SEER-10B 0.03)
    crops_for_assign: list = field(default_factory=lambda: [0, 1])  # crops whose codes are the targets (global ones)
    # Steps during which the prototypes get no update (their gradient is dropped); 313: SwAV's first ImageNet epoch.
    freeze_prototypes_iters: int = 313
    # Embeddings kept per assignment crop over all ranks for the codes (0: no queue); each rank keeps
    # queue_length // world size, rounded down to a multiple of its batch, so it must hold one batch per rank.
    queue_length: int = 0
    queue_start_iter: int = 0  # the step from which the queue fills (it is used once full)
    # L2 normalization + prototype scores in fp32 under bf16 (their own fp32 FSDP unit; autocast off without FSDP),
    # as VISSL's swav_head_fsdp keeps the prototypes in full precision "for convergence". False: the trunk's dtype.
    fp32_prototypes: bool = True

    def validate(self, n_crops: int, section: str = "swav") -> None:
        """Reject impossible values for a run of ``n_crops`` crops per image.

        Raises:
            ValueError: naming the dotted key (``swav.n_prototypes: must be >= 1, got 0``).
        """

        def bad(key: str, value, why: str, fix: str = "") -> ValueError:
            # seer.config's form: then the override that fixes it, where that is another key or a choice of values
            return ValueError(f"{key}: {why}, got {value!r}" + (f"; {fix}" if fix else ""))

        check_numbers(self, section)  # first: range checks take inf as valid (temperature=.inf), and `nan < 0` is false
        if not self.head_dims or any(not isinstance(v, int) or v < 1 for v in self.head_dims):
            raise bad(f"{section}.head_dims", self.head_dims, "must be a non-empty list of positive integers")
        for key in ("n_prototypes", "sinkhorn_iters"):
            if getattr(self, key) < 1:
                raise bad(f"{section}.{key}", getattr(self, key), "must be >= 1")
        for key in ("temperature", "epsilon"):
            if not getattr(self, key) > 0:
                raise bad(f"{section}.{key}", getattr(self, key), "must be > 0")
        if n_crops < 2:  # first: no crops_for_assign can fix it
            raise bad("data.crops", n_crops, "SwAV needs at least 2 crops per image (its swapped prediction)",
                      "set data.multicrop to a preset with 2 or more crops, or data.crops=[[2, RES], ...]")  # fmt: skip
        c = self.crops_for_assign
        if not c or any(not isinstance(i, int) or not 0 <= i < n_crops for i in c):
            raise bad(f"{section}.crops_for_assign", c, f"must be crop indices in [0, {n_crops})",
                      f"set {section}.crops_for_assign=[0, 1] (the first two crops), or more crops per image "
                      "(data.multicrop / data.crops)")  # fmt: skip
        for key in ("freeze_prototypes_iters", "queue_length", "queue_start_iter"):
            if getattr(self, key) < 0:
                raise bad(f"{section}.{key}", getattr(self, key), "must be >= 0")

    def head_params(self, trunk_width: int) -> int:
        """Parameters of the head (projection MLP + prototypes) on a trunk of ``trunk_width`` features."""
        return head_params(trunk_width, self.head_dims, self.n_prototypes, self.use_bn)

    def head_activations(self) -> int:
        """Head elements held per crop image until backward (``seer plan``): projection outputs (+ BN), the
        prototype scores, their softmax and its gradients."""
        return sum(self.head_dims) * (3 if self.use_bn else 2) + 4 * self.n_prototypes


# ----------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sinkhorn(scores: torch.Tensor, n_iters: int = 3, epsilon: float = 0.05) -> torch.Tensor:
    """Soft codes of a batch: SwAV's ``distributed_sinkhorn`` made numerically safe, with ``1 + n_iters`` collectives.

    ``Q = exp(scores / epsilon)`` is scaled so that, over the global batch (every rank's rows), each prototype gets
    the same total mass and each sample a total of 1. Under torch.distributed the sums are all-reduced, so splitting
    a batch over ranks gives the same codes as the whole batch in one process. ``[A, B, K]`` scores are A independent
    problems (SwAV's assignment crops) solved together: their sums travel in the same collectives.

    Numerical safety (the results equal SwAV's on ordinary inputs):
      * computed in fp32 whatever the input dtype (bf16 autocast included);
      * each prototype's global max score is subtracted before ``exp`` (the first column normalization cancels any
        per-prototype factor exactly, so this changes nothing but overflow);
      * zero sums are clamped; a sample whose every entry underflowed (scores ~100 epsilon below every prototype's
        best sample: only possible with unnormalized embeddings) gets ``softmax(scores / epsilon + log row scaling)``,
        the value Sinkhorn's final column normalization tends to, instead of a row of zeros;
      * NaN scores are read as 0 and infinities as the largest finite value, so the codes are always finite (the loss,
        computed from the raw scores, still shows a NaN).

    Collectives: one max (the shift) and one sum per iteration; the global sample count rides with the first sum.
    SwAV's division by the total mass is left out: the first column normalization cancels it exactly. Nothing is read
    on the host, so the caller never waits for the device here.

    Args:
        scores: ``[B, K]`` sample-prototype similarities of this rank's rows, or ``[A, B, K]`` for A problems.
        n_iters: Sinkhorn iterations (>= 1; SwAV 3, SEER 10).
        epsilon: entropic regularization (SwAV 0.05, SEER-10B 0.03).

    Returns:
        fp32 codes of the scores' shape; every row sums to 1, and every column sums to ``B_global / K`` over the
        global batch up to the accuracy of ``n_iters`` iterations.
    """
    if scores.dim() not in (2, 3):
        raise ValueError(f"sinkhorn: scores must be [B, K] or [A, B, K], got shape {tuple(scores.shape)}")
    if n_iters < 1:
        raise ValueError(f"sinkhorn: n_iters must be >= 1, got {n_iters}")
    if not epsilon > 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        # one fp32 buffer, transformed in place: logits -> shifted -> exp -> codes
        q = torch.nan_to_num_(scores.detach().to(torch.float32, copy=True).div_(epsilon))
        n_local, n_protos = q.shape[-2:]
        tiny = torch.finfo(torch.float32).tiny

        # Per-prototype max over the global batch (a sample-free shift: cancelled by the first column normalization).
        shift = q.amax(dim=-2) if n_local else q.new_full((*q.shape[:-2], n_protos), -torch.inf)
        _all_reduce(shift, "max")
        shift = torch.nan_to_num(shift)  # no rows on any rank: -inf -> finite
        q = q.sub_(shift.unsqueeze(-2)).exp_()  # entries in [0, 1], each prototype has a 1 somewhere
        log_u = -shift  # log of the per-prototype scaling applied so far (for the underflow fallback)

        n_global = None
        for _ in range(n_iters):
            # each prototype (column of q) gets total mass 1/K
            col = q.sum(dim=-2)
            if n_global is None:  # the first sum also counts the global batch (no collective of its own)
                packed = torch.cat([col.reshape(-1), torch.full((1,), float(n_local), device=col.device)])
                _all_reduce(packed)
                col, n_global = packed[:-1].view_as(col), packed[-1]
            else:
                _all_reduce(col)
            col = col.clamp_min(tiny) * n_protos
            q /= col.unsqueeze(-2)
            log_u = log_u - col.log()
            # each sample (row of q) gets total mass 1/B_global
            q /= q.sum(dim=-1, keepdim=True).clamp_min(tiny) * n_global
        q *= n_global  # rows sum to 1: a distribution over prototypes per sample

        # Fallback for samples whose every entry underflowed to 0 (see above). Local: no collective, no desync. On
        # an accelerator it is computed for every row and selected on the device: asking the host whether any row
        # is dead would make the host wait for the device every step, and the rows are this rank's few. On the
        # CPU that question costs nothing, and skipping the softmax keeps large CPU batches fast.
        dead = q.sum(dim=-1, keepdim=True) == 0
        if not _host_read_is_free(dead) or bool(dead.any()):
            logits = torch.nan_to_num(scores.detach().float() / epsilon).double()
            fix = torch.softmax(logits + log_u.double().unsqueeze(-2), dim=-1)
            q = torch.where(dead, torch.nan_to_num(fix, nan=1.0 / n_protos).float(), q)
    return q


# ----------------------------------------------------------------------------------------------------------------
# Head
# ----------------------------------------------------------------------------------------------------------------
def head_params(trunk_width: int, head_dims: Sequence[int], n_prototypes: int, use_bn: bool = True) -> int:
    """Parameters of the SwAV projection MLP (+ BN) and the prototypes (arithmetic: nothing is built)."""
    dims = [trunk_width, *head_dims]
    n = 0
    for i in range(len(dims) - 1):
        n += dims[i] * dims[i + 1] + dims[i + 1]
        if use_bn and i < len(dims) - 2:
            n += 2 * dims[i + 1]
    return n + dims[-1] * n_prototypes


def build_projection(dims: Sequence[int], use_bn: bool = True) -> nn.Sequential:
    """``Linear -> [BN] -> ReLU`` for every hidden layer, then a last ``Linear`` (SwAV / VISSL's ``swav_head``).

    The layer indices match VISSL's ``projection_head`` (``0`` Linear, ``1`` BN, ``2`` ReLU, ...), so its weights load
    by index. ``dims = [D, out]`` is a single linear layer.
    """
    dims = [int(d) for d in dims]
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise ValueError(f"head_dims must list at least [in, out] positive widths, got {list(dims)}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            if use_bn:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Prototypes(nn.Module):
    """L2-normalize the embedding and score it against K prototypes: ``forward(z, queue=None) -> (emb, scores,
    queue_scores)``.

    ``weight`` is ``[K, d]`` (state-dict key ``prototypes.weight``, initialized like ``nn.Linear``); its rows are kept
    unit-norm by ``normalize_()``, so scores are cosine similarities. ``queue`` (already normalized embeddings,
    ``[..., d]``) is scored without gradient in the same call, so that under FSDP2 the weight is gathered once.

    With ``fp32=True`` the normalization and both products run in fp32 whatever the caller's dtype (autocast is
    disabled here), and ``fp32_unit`` asks ``seer.distributed.parallel.parallelize`` for an FSDP unit with fp32
    parameters, reduction and inputs on bf16 runs: VISSL's ``swav_head_fsdp`` keeps the prototypes in full precision
    because they are renormalized every step and their scores feed Sinkhorn and the loss.
    """

    def __init__(self, dim: int, n_prototypes: int, fp32: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_prototypes, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's init (the rows are normalized next)
        self.fp32 = fp32
        self.fp32_unit = fp32

    @torch.no_grad()
    def normalize_(self) -> None:
        """L2-normalize every row in place. Works on FSDP2 row shards (``Shard(0)``): each rank normalizes its own."""
        w = self.weight
        local = w.to_local() if hasattr(w, "to_local") else w  # DTensor under FSDP2
        local.copy_(F.normalize(local.float(), dim=1).to(local.dtype))

    def forward(self, z: torch.Tensor, queue: torch.Tensor | None = None):
        if not self.fp32:
            emb = F.normalize(z, dim=1)
            with torch.no_grad():
                queue_scores = None if queue is None else F.linear(queue.to(emb.dtype), self.weight)
            return emb, F.linear(emb, self.weight), queue_scores
        with torch.autocast(z.device.type, enabled=False):
            w = self.weight.float()
            emb = F.normalize(z.float(), dim=1)
            with torch.no_grad():
                queue_scores = None if queue is None else F.linear(queue.float(), w)
            return emb, F.linear(emb, w), queue_scores

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, n_prototypes={self.weight.shape[0]}, fp32={self.fp32}"


class CollapseStats(Mapping):
    """``codes_used`` / ``preds_used`` (distinct prototypes among the codes' / predictions' argmaxes on this rank) and
    ``code_confidence`` (the mean largest code: 1/K for uniform codes) of one forward.

    A read-only mapping that computes its values when first read. Reading them makes the host wait for the device
    (``unique`` and the Python numbers), so the training loop reads them on its log steps only; a step that does
    not read them costs nothing.
    """

    _KEYS = ("codes_used", "preds_used", "code_confidence")

    def __init__(self, codes: torch.Tensor, log_p: torch.Tensor) -> None:
        self._codes, self._log_p, self._values = codes, log_p, None

    def _read(self) -> dict:
        if self._values is None:
            with torch.no_grad():
                self._values = {
                    "codes_used": int(self._codes.argmax(-1).unique().numel()),
                    "preds_used": int(self._log_p.argmax(-1).unique().numel()),
                    "code_confidence": float(self._codes.max(-1).values.mean()),
                }
            self._codes = self._log_p = None  # the values are all that is needed from now on
        return self._values

    def __getitem__(self, key: str):
        return self._read()[key]

    def __iter__(self):
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)

    def __repr__(self) -> str:
        return f"CollapseStats({self._read()})"


class SwAV(nn.Module):
    """The SwAV head and swapped-prediction loss over multi-crop features.

    Args:
        head_dims: projection widths, first = trunk width (``[2048, 2048, 128]`` SwAV RN50,
            ``[3712, 4096, 4096, 256]`` SEER RG-32, ``[28280, 8192, 8192, 256]`` SEER 10B with ``use_bn=False``).
        use_bn: BatchNorm1d after each hidden linear layer.
        n_prototypes: K (SwAV 3000, SEER 16000).
        temperature: softmax temperature of the predictions (0.1).
        sinkhorn_iters: Sinkhorn iterations (SwAV 3, SEER 10).
        epsilon: Sinkhorn regularization (0.05; SEER-10B 0.03).
        crops_for_assign: crops whose codes are targets (the two large crops).
        freeze_prototypes_iters: ``before_optimizer_step`` drops the prototypes' gradients before this iteration.
        queue_length: embeddings kept per assignment crop over *all* ranks (0: no queue); each rank keeps
            ``queue_length // world_size`` rounded down to a multiple of its batch, as SwAV does.
        queue_start_iter: the queue is filled from this iteration on and used as soon as it is full.
        fp32_prototypes: normalize and score in fp32 (see ``Prototypes``); False: in the caller's dtype.

    ``forward`` returns ``{"loss", "codes" [n_assign, B, K] (detached), "queue_used" (bool), "stats"}``; ``stats``
    (a ``CollapseStats``, computed when first read): ``codes_used`` / ``preds_used`` (distinct prototypes among the
    codes' / predictions' argmaxes on this rank) and ``code_confidence`` (the mean largest code: 1/K for uniform
    codes).
    """

    def __init__(
        self,
        head_dims: Sequence[int],
        *,
        use_bn: bool = True,
        n_prototypes: int = 3000,
        temperature: float = 0.1,
        sinkhorn_iters: int = 3,
        epsilon: float = 0.05,
        crops_for_assign: Sequence[int] = (0, 1),
        freeze_prototypes_iters: int = 313,
        queue_length: int = 0,
        queue_start_iter: int = 0,
        fp32_prototypes: bool = True,
    ) -> None:
        super().__init__()
        if n_prototypes < 1:
            raise ValueError(f"n_prototypes must be >= 1, got {n_prototypes}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not crops_for_assign or len(set(crops_for_assign)) != len(crops_for_assign):
            raise ValueError(f"crops_for_assign must list distinct crop indices, got {list(crops_for_assign)}")
        if queue_length < 0 or queue_start_iter < 0:
            raise ValueError(f"queue_length and queue_start_iter must be >= 0, got {queue_length}, {queue_start_iter}")
        self.projection = build_projection(head_dims, use_bn)
        self.embed_dim = int(head_dims[-1])
        self.prototypes = Prototypes(self.embed_dim, n_prototypes, fp32=fp32_prototypes)
        self.n_prototypes = n_prototypes
        self.temperature = temperature
        self.sinkhorn_iters = sinkhorn_iters
        self.epsilon = epsilon
        self.crops_for_assign = tuple(int(c) for c in crops_for_assign)
        self.freeze_prototypes_iters = freeze_prototypes_iters
        self.queue_length = queue_length
        self.queue_start_iter = queue_start_iter
        # Per-rank queue [n_assign, L, d], newest first; allocated at the first step that needs it. Not persistent:
        # every rank holds different rows, so it is not part of the (rank-agnostic) state dict but of the per-rank
        # state (``rank_state``, saved next to each checkpoint as SwAV saves queue{rank}.pth); ``queue_filled``
        # counts valid rows (it is used once full, like SwAV's "last row non-zero" test).
        self.register_buffer("queue", None, persistent=False)
        self.queue_filled = 0
        self.normalize_prototypes()

    # -- prototypes ---------------------------------------------------------------------------------------------
    def normalize_prototypes(self) -> None:
        """L2-normalize every prototype row in place (call each step before the forward; FSDP2 shards included)."""
        self.prototypes.normalize_()

    def before_optimizer_step(self, iteration: int) -> None:
        """Drop the prototypes' gradient while frozen, so neither the update nor weight decay reaches them."""
        if iteration < self.freeze_prototypes_iters:
            self.prototypes.weight.grad = None

    # -- queue --------------------------------------------------------------------------------------------------
    def _queue_rows(self, batch: int) -> int:
        world = dist.get_world_size() if _dist_on() else 1
        rows = (self.queue_length // world) // batch * batch
        if rows < batch:
            raise ValueError(
                f"swav.queue_length: must hold at least one batch per rank, the global batch {batch * world} "
                f"({batch} per rank x {world} ranks), got {self.queue_length}; set swav.queue_length="
                f"{batch * world} or more (a multiple of the global batch), or swav.queue_length=0 (no queue)"
            )
        return rows

    def reset_queue(self) -> None:
        """Forget the queue (it refills from the next step at or after ``queue_start_iter``)."""
        self.queue, self.queue_filled = None, 0

    def rank_state(self) -> dict:
        """This rank's queue (``None`` before it exists) and its fill count, for the per-rank checkpoint files."""
        queue = None if self.queue is None else self.queue.detach().cpu().clone()
        return {"queue": queue, "queue_filled": int(self.queue_filled)}

    def load_rank_state(self, state: dict) -> None:
        """Restore what ``rank_state`` returned (on this rank, same world size). A queue whose shape no longer fits
        the run (``queue_length`` or the batch changed) is dropped at the next forward, with a warning."""
        queue = state.get("queue")
        if queue is None:
            self.reset_queue()
            return
        self.queue = queue.to(device=self.prototypes.weight.device, dtype=torch.float32)
        self.queue_filled = int(state.get("queue_filled", 0))

    def _ensure_queue(self, batch: int, device: torch.device) -> None:
        shape = (len(self.crops_for_assign), self._queue_rows(batch), self.embed_dim)
        if self.queue is not None and tuple(self.queue.shape) != shape:
            warnings.warn(
                f"SwAV queue of shape {tuple(self.queue.shape)} does not fit this run ({shape}: queue_length or "
                "the per-rank batch changed); starting a new queue",
                stacklevel=3,
            )
            self.queue = None
        if self.queue is None:
            self.queue = torch.zeros(shape, device=device, dtype=torch.float32)
            self.queue_filled = 0

    # -- loss ---------------------------------------------------------------------------------------------------
    def forward(self, feats: torch.Tensor, n_crops: int, iteration: int = 0) -> dict:
        """Swapped-prediction loss of crop-major features ``[n_crops * B, D]`` (crop 0's batch, then crop 1's ...)."""
        if feats.dim() != 2 or n_crops < 2 or feats.shape[0] % n_crops:
            raise ValueError(
                f"SwAV expects crop-major features [n_crops * B, D] with n_crops >= 2, got shape "
                f"{tuple(feats.shape)} for n_crops={n_crops}"
            )
        if max(self.crops_for_assign) >= n_crops or min(self.crops_for_assign) < 0:
            raise ValueError(f"crops_for_assign {list(self.crops_for_assign)} out of range for {n_crops} crops")
        bs = feats.shape[0] // n_crops
        use_queue = self.queue_length > 0 and iteration >= self.queue_start_iter
        if use_queue:
            self._ensure_queue(bs, feats.device)
        queue_used = use_queue and self.queue_filled >= self.queue.shape[1]
        # normalized embeddings, their scores [n_crops * B, K], and the queue's with today's prototypes (no grad)
        emb, scores, queue_scores = self.prototypes(self.projection(feats), self.queue if queue_used else None)
        log_p = F.log_softmax(scores.float() / self.temperature, dim=1).view(n_crops, bs, -1)

        with torch.no_grad():
            targets = []
            for i, c in enumerate(self.crops_for_assign):
                out = scores[c * bs : (c + 1) * bs].detach()
                if queue_used:  # queue scores first, batch last: only the batch's codes are kept
                    out = torch.cat([queue_scores[i].to(out.dtype), out])
                if use_queue:  # newest first, as in SwAV (the queue's scores were taken before this update)
                    self.queue[i, bs:] = self.queue[i, :-bs].clone()
                    self.queue[i, :bs] = emb[c * bs : (c + 1) * bs].detach().float()
                targets.append(out)
            # every assignment crop's codes at once: one set of Sinkhorn collectives per step, not one per crop
            codes_t = sinkhorn(torch.stack(targets), self.sinkhorn_iters, self.epsilon)[:, -bs:].contiguous()
        loss = scores.new_zeros((), dtype=torch.float32)
        for q, c in zip(codes_t, self.crops_for_assign):
            others = [v for v in range(n_crops) if v != c]
            # mean over samples of -sum_k q log p, averaged over the other crops
            loss = loss - (q.unsqueeze(0) * log_p[others]).sum(dim=2).mean()
        if use_queue:
            self.queue_filled = min(self.queue_filled + bs, self.queue.shape[1])
        loss = loss / len(self.crops_for_assign)
        # what a collapse looks like (see SwAVModel.diagnose), computed when first read: on the loop's log steps
        stats = CollapseStats(codes_t, log_p.detach())
        return {"loss": loss, "codes": codes_t, "queue_used": queue_used, "stats": stats}

    def extra_repr(self) -> str:
        return (
            f"n_prototypes={self.n_prototypes}, temperature={self.temperature}, sinkhorn_iters={self.sinkhorn_iters}, "
            f"epsilon={self.epsilon}, crops_for_assign={self.crops_for_assign}, "
            f"freeze_prototypes_iters={self.freeze_prototypes_iters}, queue_length={self.queue_length}, "
            f"queue_start_iter={self.queue_start_iter}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Multi-crop trunk forward
# ----------------------------------------------------------------------------------------------------------------
def multicrop_forward(trunk: nn.Module, crops: Sequence[torch.Tensor], bn_splits: int = 1) -> torch.Tensor:
    """Crop-major trunk features ``[n_crops * B, D]`` with one trunk call per run of equal-resolution crops.

    As in SwAV, consecutive crops of the same size are concatenated along the batch (fewer, larger calls; BatchNorm
    sees all crops of a resolution together). ``bn_splits > 1`` runs the trunk on that many chunks of the batch
    (ghost batch norm: the BatchNorm batches of ``bn_splits`` ranks without SyncBN).
    """
    if not crops:
        raise ValueError("multicrop_forward: no crops")
    if bn_splits > 1:
        chunks = [multicrop_forward(trunk, list(part)) for part in zip(*(c.chunk(bn_splits) for c in crops))]
        n = len(crops)  # crop-major [n * b, D] per chunk -> crop-major over the whole batch
        return torch.cat([c.reshape(n, -1, c.shape[-1]) for c in chunks], dim=1).reshape(-1, chunks[0].shape[-1])
    batch = crops[0].shape[0]
    for i, c in enumerate(crops):
        if c.dim() != 4 or c.shape[0] != batch:
            raise ValueError(f"crop {i} has shape {tuple(c.shape)}; expected [B={batch}, C, H, W] for every crop")
    outs = []
    for _, group in itertools.groupby(crops, key=lambda t: tuple(t.shape[-2:])):
        group = list(group)
        outs.append(trunk(group[0] if len(group) == 1 else torch.cat(group)))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# ----------------------------------------------------------------------------------------------------------------
# The model the training loop trains: trunk + head behind one forward (FSDP2's root unit needs one)
# ----------------------------------------------------------------------------------------------------------------
class SwAVModel(nn.Module):
    """``forward(crops) -> SwAV output dict`` (``{"loss", ...}``) with ``trunk`` and ``head`` submodules.

    The loop's hooks: ``before_forward(step)`` normalizes the prototypes and records the step (the queue starts at
    ``queue_start_iter``); ``before_optimizer_step(step)`` drops the prototypes' gradient while they are frozen;
    ``rank_state()`` / ``load_rank_state(state)`` save and restore this rank's queue with each checkpoint.

    ``bn_splits > 1`` runs the trunk on each crop batch in that many chunks (ghost batch norm): one process then
    sees exactly the BatchNorm batches that ``bn_splits`` FSDP ranks without SyncBN would.
    """

    def __init__(self, trunk: nn.Module, head: nn.Module, bn_splits: int = 1) -> None:
        super().__init__()
        self.trunk, self.head, self.bn_splits = trunk, head, bn_splits
        self.step = 0

    def before_forward(self, step: int) -> None:
        self.step = step
        self.head.normalize_prototypes()

    def before_optimizer_step(self, step: int) -> None:
        self.head.before_optimizer_step(step)

    def rank_state(self) -> dict:
        """This rank's state outside the shared state dict (the queue): saved per rank with each checkpoint."""
        return self.head.rank_state()

    def load_rank_state(self, state: dict) -> None:
        self.head.load_rank_state(state)

    def diagnose(self, out: dict, step: int) -> str | None:
        """A named collapse, with the knobs that address it, or None (the loop calls this optional hook).

        - uniform codes / loss at ln K: every embedding alike, so Sinkhorn can only spread each sample evenly;
        - codes on a few prototypes: Sinkhorn's equipartition lost (epsilon too small for the batch, no queue);
        - predictions on a few prototypes: one prototype takes (almost) every sample.
        """
        head = self.head
        stats, k = out.get("stats") or {}, head.n_prototypes
        if not stats or step < head.freeze_prototypes_iters:
            return None
        batch = out["codes"].shape[0] * out["codes"].shape[1]
        few = max(1, min(k, batch) // 10)  # a tenth of the prototypes the batch could spread over
        loss, ln_k = float(out["loss"].detach()), math.log(k)
        if stats["code_confidence"] < 1.2 / k or abs(loss - ln_k) < 0.02 * ln_k:
            return (
                f"codes collapsed to uniform at step {step} (loss {loss:.3f}, ln K = {ln_k:.3f}; mean largest code "
                f"{stats['code_confidence']:.2g} vs 1/K = {1 / k:.2g}): the embeddings no longer differ. Lower "
                "optim.base_lr or lengthen optim.warmup_iters; a smaller swav.epsilon sharpens the codes"
            )
        if stats["codes_used"] <= few:
            return (
                f"codes collapsed to {stats['codes_used']} of {k} prototypes at step {step}: raise swav.epsilon, "
                "add a queue (swav.queue_length) for small batches, or use fewer swav.n_prototypes"
            )
        if stats["preds_used"] <= few:
            return (
                f"predictions collapsed to {stats['preds_used']} of {k} prototypes at step {step}: raise "
                "swav.temperature or swav.freeze_prototypes_iters, or lower optim.base_lr"
            )
        return None

    def features(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return multicrop_forward(self.trunk, crops, self.bn_splits)

    def forward(self, crops: list[torch.Tensor], iteration: int | None = None) -> dict:
        """The loss of a multi-crop batch at ``iteration`` (default: the step given to ``before_forward``)."""
        return self.head(self.features(crops), len(crops), self.step if iteration is None else iteration)


def build_model(trunk: nn.Module, cfg: SwAVConfig, *, bn_splits: int = 1) -> SwAVModel:
    """The SwAV model a config describes on ``trunk`` (its head freshly initialized, on CPU, fp32)."""
    head = SwAV(
        [trunk.num_features, *cfg.head_dims],
        use_bn=cfg.use_bn,
        n_prototypes=cfg.n_prototypes,
        temperature=cfg.temperature,
        sinkhorn_iters=cfg.sinkhorn_iters,
        epsilon=cfg.epsilon,
        crops_for_assign=cfg.crops_for_assign,
        freeze_prototypes_iters=cfg.freeze_prototypes_iters,
        queue_length=cfg.queue_length,
        queue_start_iter=cfg.queue_start_iter,
        fp32_prototypes=cfg.fp32_prototypes,
    )
    return SwAVModel(trunk, head, bn_splits)
