"""SyncBatchNorm in groups of ranks (``train.sync_bn_group``), its per-step traffic (``seer plan``), and the FSDP2
gradient reduction dtype (``train.fsdp.reduce_dtype``).

torch's SyncBatchNorm forward needs CUDA; its conversion does not, so a 4-rank gloo world checks the groups every
converted layer gets. The traffic arithmetic is checked against the BatchNorm calls a real CPU training step makes
and against issue 30's figures.
"""

from __future__ import annotations

import json
import logging
import textwrap

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from seer.config import ConfigError, PretrainConfig, load_config
from seer.distributed.parallel import SYNC_BN_GROUP, sync_bn_group_size
from seer.train.plan import bn_sync_traffic, cli_main


# ----------------------------------------------------------------------------------------------------------------
# The group size
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "world, setting, size",
    [
        (496, 64, 62),  # the 10B recipe: 496 = 2^4 x 31
        (512, 64, 64),
        (6, 4, 3),
        (8, 64, 8),  # one node: all its ranks
        (13, 8, 1),  # a prime world: no divisor but 1 -> plain BatchNorm
        (512, 0, 512),  # 0: all ranks
        (512, 1, 1),
        (4, 2, 2),
        (1, 64, 1),
    ],
)
def test_group_size_is_the_largest_divisor_not_above_the_setting(world, setting, size):
    assert sync_bn_group_size(world, setting) == size


def test_group_size_logs_when_the_divisor_rule_changes_it(caplog):
    with caplog.at_level(logging.WARNING, logger="seer.distributed"):
        assert sync_bn_group_size(496, 64, log_change=True) == 62
    assert caplog.messages == [
        "train.sync_bn_group=64 does not divide the world size 496: BatchNorm syncs in groups of 62, "
        "the largest divisor not above 64"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="seer.distributed"):
        assert sync_bn_group_size(6, 4, log_change=True) == 3
        assert sync_bn_group_size(13, 8, log_change=True) == 1
        assert sync_bn_group_size(496, 64) == 62  # log_change off (seer plan, other ranks): silent
        for world, setting in [(512, 64), (8, 64), (512, 0), (512, 1)]:  # unchanged: silent
            sync_bn_group_size(world, setting, log_change=True)
    assert len(caplog.messages) == 2
    assert "groups of 3" in caplog.messages[0]
    assert "no BatchNorm sync (plain BatchNorm per rank)" in caplog.messages[1]
    with pytest.raises(ValueError, match="sync_bn_group"):
        sync_bn_group_size(8, -1)


def test_config_fields_defaults_and_validation(tiny_overrides):
    cfg = PretrainConfig()
    assert cfg.train.sync_bn_group == SYNC_BN_GROUP == 64
    assert cfg.train.fsdp.reduce_dtype == "fp32"
    cfg = load_config(None, [*tiny_overrides, "train.sync_bn_group=0", "train.fsdp.reduce_dtype=bf16"])
    assert (cfg.train.sync_bn_group, cfg.train.fsdp.reduce_dtype) == (0, "bf16")
    with pytest.raises(ConfigError, match="train.sync_bn_group: must be >= 0"):
        load_config(None, [*tiny_overrides, "train.sync_bn_group=-1"])
    with pytest.raises(ConfigError, match="train.fsdp.reduce_dtype: must be one of fp32, bf16, got 'fp16'"):
        load_config(None, [*tiny_overrides, "train.fsdp.reduce_dtype=fp16"])
    with pytest.raises(ConfigError, match="train.sync_bn_group"):
        load_config(None, [*tiny_overrides, "train.sync_bn_group=all"])


# ----------------------------------------------------------------------------------------------------------------
# Conversion on a 4-rank gloo world, and FSDP2's reduction dtype
# ----------------------------------------------------------------------------------------------------------------
_WORKER = textwrap.dedent(
    """
    import json, logging, sys, torch, torch.distributed as dist
    from torch import nn
    from seer.config import load_config
    from seer.distributed.env import init_distributed
    from seer.distributed.parallel import convert_sync_bn, is_fsdp, parallelize
    from seer.models.regnet import build_trunk
    from seer.train.loop import build_model

    logging.basicConfig(level=logging.WARNING, format="LOG %(name)s: %(message)s", stream=sys.stdout)
    env = init_distributed(device="cpu")
    overrides = json.loads(sys.argv[2])
    result = {"rank": env.rank, "groups": {}, "reduce": {}}

    def bn_layers(model):
        return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    for setting in (1, 2, 0, 3):
        torch.manual_seed(0)
        model = build_model(load_config(None, overrides))  # trunk + SwAV head with BatchNorm1d (use_bn)
        before = [(n, type(m).__name__, m.num_features) for n, m in bn_layers(model)]
        model = convert_sync_bn(model, setting)
        after = bn_layers(model)
        groups = {id(m.process_group): m.process_group for _, m in after if isinstance(m, nn.SyncBatchNorm)}
        result["groups"][str(setting)] = {
            "before": before,
            "after": [(n, type(m).__name__, m.num_features) for n, m in after],
            "sync": sum(isinstance(m, nn.SyncBatchNorm) for _, m in after),
            "group_objects": len(groups),
            "ranks": [dist.get_process_group_ranks(g) for g in groups.values()],
            "sizes": [dist.get_world_size(g) for g in groups.values()],
        }

    # parallelize applies SyncBatchNorm on CUDA only (torch's SyncBatchNorm forward needs it): plain BN on CPU
    torch.manual_seed(0)
    cpu = parallelize(build_model(load_config(None, overrides)), fsdp=False, sync_bn_group=2)
    result["cpu_sync_layers"] = sum(isinstance(m, nn.SyncBatchNorm) for m in cpu.modules())

    # FSDP2: the policy each unit gets, and the dtype of every gradient reduce-scatter of one backward
    seen = []
    real = dist.reduce_scatter_single

    def spy(output, input, *args, **kwargs):
        seen.append((str(input.dtype), input.numel()))
        return real(output, input, *args, **kwargs)

    dist.reduce_scatter_single = spy
    for precision, reduce in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "fp32"), ("bf16", "bf16")):
        torch.manual_seed(0)
        trunk = build_trunk({"depth": 3, "w0": 16, "wa": 8.0, "wm": 2.0, "group_w": 8})
        n_params = sum(p.numel() for p in trunk.parameters())
        parallelize(trunk, activation_checkpointing=True, precision=precision, reduce_dtype=reduce)
        seen.clear()
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(env.rank))
        # two trunk calls per step, as multi-crop makes them
        torch.cat([trunk(x), trunk(x[:, :, :16, :16])]).float().square().mean().backward()
        policy = lambda m: str(m._get_fsdp_state()._mp_policy.reduce_dtype)
        result["reduce"][f"{precision}/{reduce}"] = {
            "block_policy": policy(trunk.stages[1].blocks[0]),
            "bn_policy": policy(trunk.stem.bn) if is_fsdp(trunk.stem.bn) else None,
            "reduce_scatter_dtypes": sorted({dtype for dtype, _ in seen}),
            "reduce_scatters": len(seen),
            "reduced_elements": sum(n for _, n in seen),
            "params": n_params,
            "units": sum(is_fsdp(m) for m in trunk.modules()),
            "grad_dtypes": sorted({str(p.grad.dtype) for p in trunk.parameters() if p.grad is not None}),
        }
    try:
        parallelize(build_trunk({"depth": 3, "w0": 16, "wa": 8.0, "wm": 2.0, "group_w": 8}), reduce_dtype="fp16")
    except ValueError as exc:
        result["bad_reduce_dtype"] = str(exc)
    json.dump(result, open(sys.argv[1] + f".{env.rank}.json", "w"))
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_sync_bn_groups_on_four_gloo_ranks(gloo_ranks, tiny_overrides):
    results, logs = gloo_ranks(_WORKER, 4, json.dumps(list(tiny_overrides)))
    for rank, res in enumerate(results):
        g = res["groups"]
        bn = g["1"]["before"]
        # every BatchNorm of the model: stem, 3 per block + 1 projection per stage, and the head's BatchNorm1d
        assert len(bn) > 10 and any(kind == "BatchNorm1d" for _, kind, _ in bn), bn
        # 1: no sync, the layers stay plain BatchNorm
        assert g["1"]["sync"] == 0 and g["1"]["after"] == bn
        own_pair = [rank // 2 * 2, rank // 2 * 2 + 1]
        for setting, size, ranks in (("2", 2, own_pair), ("0", 4, [0, 1, 2, 3]), ("3", 2, own_pair)):
            got = g[setting]
            # every BatchNorm converted, same names and widths, all sharing one group of the configured size
            assert got["sync"] == len(bn), (setting, got)
            assert [(n, c) for n, _, c in got["after"]] == [(n, c) for n, _, c in bn]
            assert {kind for _, kind, _ in got["after"]} == {"SyncBatchNorm"}
            assert got["group_objects"] == 1 and got["sizes"] == [size] and got["ranks"] == [ranks], (setting, got)
        assert res["cpu_sync_layers"] == 0

        r = res["reduce"]
        for run in r.values():  # one reduce-scatter per FSDP unit per step, however many trunk calls; all parameters
            assert run["reduce_scatters"] == run["units"] >= 4, run
            assert run["params"] <= run["reduced_elements"] < 1.2 * run["params"], run  # + padding to the world
            del run["reduce_scatters"], run["units"], run["reduced_elements"], run["params"]
        fp32, bf16 = "torch.float32", "torch.bfloat16"
        # default: fp32 reduction (FSDP's policy leaves it at the parameters' dtype)
        assert r["fp32/fp32"]["reduce_scatter_dtypes"] == [fp32] and r["fp32/fp32"]["block_policy"] == "None"
        # bf16 reduction of fp32 parameters: every reduce-scatter in bf16, the sharded gradients back in fp32
        assert r["fp32/bf16"] == {"block_policy": str(bf16), "bn_policy": None, "reduce_scatter_dtypes": [bf16],
                                  "grad_dtypes": [fp32]}, r  # fmt: skip
        # bf16 compute: fp32 reduction by default; with bf16 the blocks reduce in bf16, BatchNorm units still in fp32
        assert r["bf16/fp32"]["block_policy"] == fp32 and r["bf16/fp32"]["reduce_scatter_dtypes"] == [fp32]
        assert r["bf16/bf16"]["block_policy"] == bf16 and r["bf16/bf16"]["bn_policy"] == fp32
        assert r["bf16/bf16"]["reduce_scatter_dtypes"] == [bf16, fp32] and r["bf16/bf16"]["grad_dtypes"] == [fp32]
        assert "reduce_dtype must be one of" in res["bad_reduce_dtype"]
    # setting 3 on 4 ranks: the divisor rule, logged once (rank 0)
    lines = [ln for log in logs for ln in log.splitlines() if ln.startswith("LOG seer.distributed")]
    assert lines == [
        "LOG seer.distributed: train.sync_bn_group=3 does not divide the world size 4: BatchNorm syncs in groups of "
        "2, the largest divisor not above 3"
    ], logs[0][-3000:]


_GPU_WORKER = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist
    from seer.distributed.parallel import convert_sync_bn
    from seer.models.regnet import build_trunk

    # gloo, so that every rank can share one GPU (NCCL refuses two ranks on one device); torch's SyncBatchNorm
    # has a gloo branch, and gloo all-gathers and all-reduces CUDA tensors.
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device(sys.argv[2])
    torch.backends.cudnn.allow_tf32 = False  # exact fp32 on both sides of the comparison
    spec = {"depth": 3, "w0": 16, "wa": 8.0, "wm": 2.0, "group_w": 8}
    xs = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
    result = {}
    for setting, size in [(int(a), int(b)) for a, b in (s.split(":") for s in sys.argv[3].split(","))]:
        torch.manual_seed(0)
        model = convert_sync_bn(build_trunk(spec), setting).to(dev).train()
        x = xs[rank].clone().to(dev).requires_grad_(True)
        out = model(x)
        out.square().sum().backward()
        # reference: one plain-BatchNorm trunk on the concatenated batch of this rank's group
        torch.manual_seed(0)
        ref = build_trunk(spec).to(dev).train()
        first = rank // size * size
        xr = torch.cat(xs[first : first + size]).clone().to(dev).requires_grad_(True)
        out_ref = ref(xr)
        out_ref.square().sum().backward()  # the group's loss: the sum of its ranks' losses
        mine = slice((rank - first) * 4, (rank - first + 1) * 4)
        rel = lambda a, b: float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())
        result[str(setting)] = {
            "out": rel(out, out_ref[mine]),
            "grad": rel(x.grad, xr.grad[mine]),
            "running_var": rel(model.stem.bn.running_var, ref.stem.bn.running_var),
            "sync": sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()),
        }
    json.dump(result, open(sys.argv[1] + f".{rank}.json", "w"))
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.gpu
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_grouped_sync_bn_normalizes_over_its_group_on_cuda(gloo_ranks):
    """Each rank's output, input gradient and running statistics under SyncBatchNorm in groups of 2 (of 4 ranks)
    equal a plain-BatchNorm trunk's on the group's concatenated batch; all ranks and no sync likewise."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (torch's SyncBatchNorm forward)")
    results, _ = gloo_ranks(_GPU_WORKER, 4, "cuda:0", "2:2,0:4,1:1")
    for res in results:
        for setting, got in res.items():
            assert got["out"] < 1e-4 and got["grad"] < 1e-4 and got["running_var"] < 1e-5, (setting, got)
        assert res["2"]["sync"] == res["0"]["sync"] > 10 and res["1"]["sync"] == 0, res


# ----------------------------------------------------------------------------------------------------------------
# Traffic per step
# ----------------------------------------------------------------------------------------------------------------
class _BatchNormCalls(TorchDispatchMode):
    """Channels of every BatchNorm forward (recomputation included) and backward kernel run under it."""

    def __init__(self):
        super().__init__()
        self.forward: list[int] = []
        self.backward: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if "batch_norm" in name and "backward" in name:
            self.backward.append(args[1].shape[1])
        elif "batch_norm" in name and not name.startswith("batch_norm_"):  # the kernel, not its helpers
            self.forward.append(args[0].shape[1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["model.activation_checkpointing=block"],
        ["model.activation_checkpointing=[[1], [2], []]", "train.bn_splits=2"],  # stages of 1, 3, 2 blocks
        ["model.activation_checkpointing=stage", "swav.use_bn=false", "data.crops=[[2, 32], [1, 16], [1, 24]]"],
    ],
)
def test_bn_traffic_counts_the_batchnorm_calls_of_a_real_step(tiny_overrides, extra):
    from seer.distributed.parallel import parallelize
    from seer.train.loop import build_model

    cfg = load_config(None, [*tiny_overrides, "model.cfg={depth: 6, w0: 16, wa: 8.0, wm: 2.0, group_w: 8}",
                             "data.batch_size_per_gpu=4", *extra])  # fmt: skip
    torch.manual_seed(0)
    model = parallelize(build_model(cfg), activation_checkpointing=cfg.model.activation_checkpointing, fsdp=False)
    assert model.trunk.depths == [1, 3, 2]
    gen = torch.Generator().manual_seed(0)
    crops = [torch.randn(4, 3, r, r, generator=gen) for c, r in cfg.data.crops for _ in range(c)]
    model.before_forward(cfg.swav.freeze_prototypes_iters)
    calls = _BatchNormCalls()
    with calls:
        model(crops)["loss"].backward()
    for world, group in ((4, 0), (8, 2), (6, 4)):
        t = bn_sync_traffic(cfg, world, group)
        g = t["group_size"]
        assert (t["bn_calls"], t["all_reduces"]) == (len(calls.forward), len(calls.backward)), (extra, t)
        assert t["collectives"] == t["all_gathers"] + t["all_reduces"] and t["host_syncs"] == t["all_gathers"]
        assert t["gathered_bytes"] == sum(4 * g * (2 * c + 1) for c in calls.forward)
        backward = sum(4 * 2 * (g - 1) / g * 2 * c for c in calls.backward)
        assert t["received_bytes"] == pytest.approx(t["gathered_bytes"] * (g - 1) / g + backward)
    none = bn_sync_traffic(cfg, 4, 1)
    assert none["collectives"] == none["received_bytes"] == 0


def test_bn_traffic_at_64_nodes_matches_issue_30():
    """Issue 30's figures: RG-256 on 512 GPUs with all ranks ~4.8 GB received per GPU per step in ~340 forward
    collectives (+ ~170 backward all-reduces); the 10B on 496 GPUs ~11.7 GB."""
    rg256, b10 = load_config("seer_rg256"), load_config("seer_10b")
    t = bn_sync_traffic(rg256, 512, 0)
    assert t["group_size"] == 512 and t["trunk_calls"] == 2
    assert t["received_bytes"] == pytest.approx(4.8e9, rel=0.1)
    assert t["all_gathers"] == pytest.approx(340, rel=0.1) and t["all_reduces"] == pytest.approx(170, rel=0.1)
    t10 = bn_sync_traffic(b10, 496, 0)
    assert t10["received_bytes"] == pytest.approx(11.7e9, rel=0.1)
    # the default (64) tiles 512 ranks into 8 groups; on 496 the divisor rule gives 62
    assert bn_sync_traffic(rg256, 512)["group_size"] == 64 and bn_sync_traffic(b10, 496)["group_size"] == 62
    # the bytes scale with the group size; the number of collectives (and host syncs) does not
    for cfg, world in ((rg256, 512), (b10, 496)):
        full = bn_sync_traffic(cfg, world, 0)
        for group in (64, 8):
            small = bn_sync_traffic(cfg, world, group)
            g = small["group_size"]
            assert small["collectives"] == full["collectives"]
            assert small["gathered_bytes"] == pytest.approx(full["gathered_bytes"] * g / world)
    assert bn_sync_traffic(b10, 496, 8)["received_bytes"] < 0.2e9


def test_seer_plan_prints_the_bn_traffic(capsys):
    assert cli_main(["--config", "seer_10b", "--world-size", "496"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("BN sync:"))
    assert line.startswith("BN sync: 506 collectives, 1.46 GB received per GPU per step (groups of 62;"), line
    assert "train.sync_bn_group=64 does not divide 496" in line
    assert cli_main(["--config", "seer_rg256", "--world-size", "512", "train.sync_bn_group=0"]) == 0
    assert "BN sync: 514 collectives, 4.80 GB received per GPU per step (groups of 512 = all ranks;" in (
        capsys.readouterr().out
    )
    assert cli_main(["--config", "seer_rg256", "--world-size", "512", "train.sync_bn_group=1"]) == 0
    assert "BN sync: none (groups of 1" in capsys.readouterr().out
    assert cli_main(["--config", "seer_rg256", "--world-size", "1"]) == 0
    assert "BN sync" not in capsys.readouterr().out


def test_parallelize_rejects_an_unknown_reduce_dtype():
    from seer.distributed.parallel import parallelize

    with pytest.raises(ValueError, match="reduce_dtype must be one of"):
        parallelize(nn.Sequential(nn.Linear(2, 2)), fsdp=False, reduce_dtype="fp16")
