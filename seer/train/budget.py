"""A run's length from a time budget (``train.max_minutes``): measured, bought once, agreed, kept on resume.

    seer pretrain --config tiny_cpu train.max_minutes=5        # as many steps as 5 minutes buy on this machine

The loop times this process's first steps (the first one excluded: it pays one-off costs such as a compile or the
loader's start), then buys

    total = done + floor((budget - elapsed - reserve) / seconds per step),   capped by train.total_steps when > 0

where ``elapsed`` is everything since ``pretrain`` began (process group, model, data, the measured steps) and
``reserve`` the final checkpoint's estimated write. Every rank takes the slowest rank's measurement (one max
all-reduce), so all buy the same count. The count, the warmup it fits and the measurement go into every later
checkpoint's ``meta.json`` (``"budget"``) and a resume reuses them: it never measures again, so a resumed run follows
the schedule the first start bought. The price: the count depends on the machine, so a seed no longer fixes the run
exactly across machines (docs/pretraining.md, "A time budget").

The learning rate does not depend on the total until the total is known: the measured steps take the warmup's own
values (``optim.warmup_iters`` in steps, independent of the total), so when the warmup outlasts the measurement the
whole lr sequence is the one ``train.total_steps=<bought>`` gives. The bought count is a plan, not a deadline: the
steps it bought are trained even when later steps are slower (periodic checkpoints, the kNN monitor).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["PROBE_STEPS", "WARMUP_MAX_FRACTION", "Budget", "buy_steps", "fit_warmup", "probe_lr", "checkpoint_reserve"]

# Steps timed after the excluded first one: enough to average a step's jitter, few enough for a minutes-long run.
PROBE_STEPS = 10
# A warmup longer than this fraction of the bought steps would leave little of the cosine: it is cut to this fraction.
WARMUP_MAX_FRACTION = 0.25
# The final checkpoint's reserve: its bytes at this write speed (a slow network filesystem), and at least this long.
RESERVE_BYTES_PER_SECOND = 100e6
RESERVE_MIN_SECONDS = 1.0


@dataclass
class Budget:
    """What a time budget bought: saved in every checkpoint's meta (``"budget"``) and reused on resume."""

    max_minutes: float  # the budget the count was bought with
    total_steps: int  # the bought count (the run's last step)
    warmup_iters: int  # the warmup fitted to it (fit_warmup)
    measured_at_step: int  # the step the count was bought at
    sec_per_step: float  # the measurement (the slowest rank's)
    elapsed_seconds: float  # since the run began, when the count was bought (the slowest rank's)
    reserve_seconds: float  # kept for the final checkpoint
    capped: bool = False  # train.total_steps bounded the count

    def to_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> Budget | None:
        """The budget a checkpoint's meta records (None: a run without one, or a checkpoint saved before buying)."""
        rec = meta.get("budget")
        if not isinstance(rec, dict) or not isinstance(rec.get("total_steps"), int):
            return None
        return cls(**{k: rec[k] for k in cls.__dataclass_fields__ if k in rec})

    def line(self, world_size: int = 1) -> str:
        """The log line that says what the budget bought (on ``world_size`` ranks)."""
        cap = " (capped by train.total_steps)" if self.capped else ""
        who = f", the slowest of {world_size} ranks" if world_size > 1 else ""
        return (
            f"time budget: {self.max_minutes:g} min bought {self.total_steps} steps{cap} at "
            f"{self.sec_per_step:.3f} s/step (measured over steps {self.measured_at_step - PROBE_STEPS + 1}-"
            f"{self.measured_at_step}{who}), {self.elapsed_seconds:.1f} s spent by step "
            f"{self.measured_at_step}, {self.reserve_seconds:.1f} s kept for the final checkpoint; warmup "
            f"{self.warmup_iters} steps"
        )


def buy_steps(budget_s: float, elapsed_s: float, reserve_s: float, sec_per_step: float, done: int, cap: int) -> int:
    """The run's total steps: ``done`` plus the steps the time left buys at ``sec_per_step``, at most ``cap`` (0: no
    cap), never fewer than ``done`` (a budget already spent ends the run at once, with its checkpoint)."""
    if not (sec_per_step > 0 and math.isfinite(sec_per_step)):
        raise ValueError(f"sec_per_step must be a positive finite number, got {sec_per_step}")
    left = budget_s - elapsed_s - reserve_s
    total = done + max(0, math.floor(left / sec_per_step))
    return min(total, cap) if cap > 0 else total


def fit_warmup(warmup_iters: int, total: int) -> int:
    """``optim.warmup_iters`` when it is at most ``WARMUP_MAX_FRACTION`` of ``total``, else that fraction (floor)."""
    return min(warmup_iters, math.floor(WARMUP_MAX_FRACTION * total))


def probe_lr(step: int, peak: float, warmup_iters: int, start_warmup: float) -> float:
    """The lr of ``step`` before the total is known: the warmup's value (the same float ``cosine_schedule`` gives,
    which does not depend on the total), or ``peak`` once the warmup is over (the cosine's start)."""
    if step >= warmup_iters:
        return float(peak)
    return float(np.linspace(start_warmup, peak, warmup_iters, endpoint=False)[step])


def checkpoint_reserve(state_bytes: int, sec_per_step: float) -> float:
    """Seconds kept for the final checkpoint: its bytes at ``RESERVE_BYTES_PER_SECOND``, at least
    ``RESERVE_MIN_SECONDS`` and two steps (a step's jitter should not push the run past its budget)."""
    return max(RESERVE_MIN_SECONDS, 2 * sec_per_step, state_bytes / RESERVE_BYTES_PER_SECOND)
