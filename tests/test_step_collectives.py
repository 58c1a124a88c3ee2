"""What one SwAV training step asks of the process group and of the host, counted on a real ``pretrain`` run.

Each rank runs ``seer.train.loop.pretrain`` under torch's profiler and attributes every ``c10d::`` collective (what
``torch.distributed``'s functions and DTensor's functional collectives both end in) and every host read to the
step it happens in. A step runs from one ``set_lr`` call to the next, less the making of the next batch; the last
step (its checkpoint save) is left out. FSDP2's own all-gathers and reduce-scatters are counted apart from the
all-reduces: they move the parameters and gradients, and their number is set by the FSDP units, not by the step.

Host reads are the ops that make the host wait for an accelerator: ``item`` / ``float`` / ``bool`` of a tensor
(``aten::_local_scalar_dense``), ``tolist``, and ops whose output size depends on the values (``nonzero``,
``unique``, ``masked_select``). The run behaves as on an accelerator (``seer.ssl.swav._host_read_is_free`` says
no), since on the CPU Sinkhorn checks its rare fallback on the host, where that costs nothing.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

WORKER = textwrap.dedent(
    """
    import bisect, collections, json, os, sys
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    import seer.ssl.swav as swav
    import seer.train.loop as loop
    import seer.train.optim as optim
    from seer.config import load_config

    STEP, OPT, DATA, TOLIST = "seer_test::step", "seer_test::optimizer", "seer_test::data", "seer_test::tolist"
    HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
                  "aten::unique_consecutive", "aten::masked_select", TOLIST}
    info = {}
    real_set_lr, real_build, real_next, real_tolist = (optim.set_lr, optim.build_optimizer, loop._Data.__next__,
                                                       torch.Tensor.tolist)

    def set_lr(opt, lr):  # the loop calls it first in every step
        with record_function(STEP):
            pass
        real_set_lr(opt, lr)

    def build(model, cfg):
        opt = real_build(model, cfg)
        step = opt.step

        def counted(*args, **kwargs):
            with record_function(OPT):
                return step(*args, **kwargs)

        opt.step = counted
        info["param_tensors"] = sum(len(g["params"]) for g in opt.param_groups)
        return opt

    def next_batch(self):  # making the batch (a data loader's work on a real run) is not the step's
        with record_function(DATA):
            return real_next(self)

    def tolist(self):  # tolist reaches no profiled op on a CPU tensor: name it
        with record_function(TOLIST):
            return real_tolist(self)

    optim.set_lr, optim.build_optimizer, loop._Data.__next__, torch.Tensor.tolist = set_lr, build, next_batch, tolist
    if hasattr(swav, "_host_read_is_free"):
        swav._host_read_is_free = lambda t: False  # as on an accelerator
    cfg = load_config(None, json.loads(sys.argv[2]))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loop.pretrain(cfg)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    starts = [e.time_range.start for e in events if e.name == STEP]

    def ranges(name):
        return [(e.time_range.start, e.time_range.end) for e in events if e.name == name]

    def inside(t, spans):
        return any(a <= t <= b for a, b in spans)

    opt_spans, data_spans = ranges(OPT), ranges(DATA)
    steps = [{"collectives": collections.Counter(), "optimizer": collections.Counter(),
              "host_reads": collections.Counter()} for _ in starts[:-1]]
    for e in events:
        i = bisect.bisect_right(starts, e.time_range.start) - 1
        if not 0 <= i < len(steps):
            continue
        if e.name.startswith("c10d::"):
            steps[i]["collectives"][e.name] += 1
            if inside(e.time_range.start, opt_spans):
                steps[i]["optimizer"][e.name] += 1
        elif e.name in HOST_READS and not inside(e.time_range.start, data_spans):
            steps[i]["host_reads"][e.name] += 1
    for i, s in enumerate(steps):
        s["log"] = (i + 1) % cfg.train.log_every == 0
    result = {"param_tensors": info["param_tensors"], "steps": steps}
    with open(f"{sys.argv[1]}.{os.environ.get('RANK', '0')}.json", "w") as f:
        json.dump(result, f)
    """
)

SMALL = ["model.cfg={depth: 4, w0: 16, wa: 8.0, wm: 2.0, group_w: 8}", "swav.head_dims=[32, 16]"]
# twice the trunk's blocks and a deeper head: 127 parameter tensors instead of 68
LARGE = ["model.cfg={depth: 8, w0: 16, wa: 8.0, wm: 2.0, group_w: 8}", "swav.head_dims=[48, 48, 16]"]


def count_step_collectives(gloo_ranks, tmp_path: Path, tiny_overrides, model: list[str], world: int,
                           extra=()) -> list[dict]:  # fmt: skip
    """Run 5 steps of a tiny SwAV pretraining on ``world`` gloo ranks (or one process without a process group) and
    return each rank's per-step counts (steps 1-4; steps 2 and 4 log)."""
    overrides = [*tiny_overrides, *model, f"run_dir={tmp_path / 'run'}", "train.total_steps=5", "train.log_every=2",
                 "swav.freeze_prototypes_iters=0", "data.batch_size_per_gpu=4", *extra]  # fmt: skip
    return gloo_ranks(WORKER, world, json.dumps(overrides), timeout=400)[0]


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("model", [SMALL, LARGE], ids=["small", "large"])
def test_one_swav_step_on_two_ranks_issues_few_all_reduces(gloo_ranks, tmp_path, tiny_overrides, model):
    """FSDP2 on 2 gloo ranks, 3 Sinkhorn iterations: the optimizer issues one all-reduce whatever the number of
    parameter tensors; the step issues 1 (loss agreement) + 1 + 3 (Sinkhorn, both assignment crops together) + 1
    (LARS) = 6, at most 12; the host waits once per step, on log steps also for the collapse statistics."""
    results = count_step_collectives(gloo_ranks, tmp_path, tiny_overrides, model, world=2)
    n_params = {r["param_tensors"] for r in results}
    assert n_params == {68 if model is SMALL else 127}
    for res in results:
        steps = res["steps"]
        assert len(steps) == 4 and [s["log"] for s in steps] == [False, True, False, True]
        for s in steps:
            kinds = s["collectives"]
            assert s["optimizer"] == {"c10d::allreduce_": 1}, s  # at most 2 asked
            assert kinds["c10d::allreduce_"] == 1 + (1 + 3) + 1 <= 12, s
            # FSDP2's parameter and gradient traffic: counted apart, one per unit and direction (not the limit)
            assert kinds["c10d::_allgather_base_"] > 0 and kinds["c10d::_reduce_scatter_base_"] > 0, s
            assert set(kinds) == {"c10d::allreduce_", "c10d::_allgather_base_", "c10d::_reduce_scatter_base_"}, s
            if not s["log"]:
                assert s["host_reads"] == {"seer_test::tolist": 1}, s  # the all-rank agreement, nothing else
            else:  # the agreement + diagnose's collapse statistics (two unique, their numbers)
                assert s["host_reads"]["seer_test::tolist"] == 1 and s["host_reads"]["aten::_unique2"] == 2, s
        assert steps[0]["collectives"] == steps[1]["collectives"] == steps[3]["collectives"]


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_one_process_step_issues_no_collective_and_one_host_read(gloo_ranks, tmp_path, tiny_overrides):
    """Without a process group (no FSDP) the step issues no collective, and the host still waits once."""
    (res,) = count_step_collectives(gloo_ranks, tmp_path, tiny_overrides, SMALL, world=1)
    for s in res["steps"]:
        assert s["collectives"] == {} and s["optimizer"] == {}, s
        if not s["log"]:
            assert s["host_reads"] == {"seer_test::tolist": 1}, s


def test_sinkhorn_solves_assignment_crops_together():
    """``sinkhorn`` on ``[A, B, K]`` gives each problem the codes it gets alone (so SwAV's crops share collectives),
    and the fallback for rows that underflowed is the same whether or not the host is asked first."""
    import torch

    import seer.ssl.swav as swav

    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(2, 12, 8, generator=g), dim=-1) * 3
    both = swav.sinkhorn(scores, 5, 0.05)
    for a in range(2):
        torch.testing.assert_close(both[a], swav.sinkhorn(scores[a], 5, 0.05), rtol=1e-6, atol=1e-9)
    dead = scores.clone()
    dead[1, 3] -= 1000  # every entry ~1000 below each prototype's best: exp underflows to 0
    on_host = swav.sinkhorn(dead, 3, 0.05)
    assert torch.isfinite(on_host).all() and on_host[1, 3].sum() == pytest.approx(1.0, abs=1e-5)
    real = swav._host_read_is_free
    try:
        swav._host_read_is_free = lambda t: False
        on_device = swav.sinkhorn(dead, 3, 0.05)
    finally:
        swav._host_read_is_free = real
    torch.testing.assert_close(on_device, on_host, rtol=0, atol=0)
