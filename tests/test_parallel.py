"""Launcher environments, SLURM nodelists, activation checkpointing equivalence, FSDP units, BN stat sync."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from seer.distributed.env import detect_launcher, init_distributed, parse_nodelist
from seer.distributed.parallel import block_groups, parallelize
from seer.models.regnet import build_trunk
from seer.ssl.swav import SwAV, SwAVModel

TINY = {"depth": 6, "w0": 16, "wa": 8.0, "wm": 2.0, "group_w": 8}


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node001", ["node001"]),
        ("node[001-003]", ["node001", "node002", "node003"]),
        ("node[8-10,12]", ["node8", "node9", "node10", "node12"]),
        ("gpu-a[01-02],cpu7", ["gpu-a01", "gpu-a02", "cpu7"]),
        ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
        ("a[09-11]b", ["a09b", "a10b", "a11b"]),
        ("10.0.0.1", ["10.0.0.1"]),
    ],
)
def test_parse_nodelist(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "node]1[", "node[3-1]", "node[a-b]", ""])
def test_parse_nodelist_rejects_garbage(bad):
    with pytest.raises(ValueError, match="nodelist"):
        parse_nodelist(bad)


def test_detect_launcher():
    assert detect_launcher({}) is None
    tr = detect_launcher(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29400"}
    )
    assert tr == {"launcher": "torchrun", "rank": 3, "world_size": 8, "local_rank": 1, "master_addr": "h0",
                  "master_port": 29400}  # fmt: skip
    slurm = detect_launcher({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                             "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "123456"})  # fmt: skip
    assert slurm["launcher"] == "slurm" and slurm["master_addr"] == "gpu017"
    assert (slurm["rank"], slurm["world_size"], slurm["local_rank"]) == (5, 16, 1)
    assert 20000 <= slurm["master_port"] < 40000
    sub = detect_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1",
                           "SUBMITIT_FOLDER": "/x"})  # fmt: skip
    assert sub["launcher"] == "submitit"


def test_single_process_needs_no_process_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    env = init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.backend, env.device.type) == (0, 1, None, "cpu")
    assert not torch.distributed.is_initialized()


def test_block_groups():
    trunk = build_trunk(TINY)
    depths = trunk.depths
    assert sum(len(g) for g in block_groups(trunk)) == sum(depths) and all(len(g) == 1 for g in block_groups(trunk))
    assert [len(g) for g in block_groups(trunk, shard_unit="group")] == depths
    spec = [[1]] + [[] for _ in depths[1:]]
    first = [1, depths[0] - 1] if depths[0] > 1 else [1]
    assert [len(g) for g in block_groups(trunk, spec, "group")] == [*first, *depths[1:]]


def _grads(ac) -> tuple[float, dict]:
    torch.manual_seed(0)
    model = SwAVModel(build_trunk(TINY), SwAV([build_trunk(TINY).num_features, 32, 16], n_prototypes=24,
                                               freeze_prototypes_iters=0))  # fmt: skip
    parallelize(model, activation_checkpointing=ac)
    gen = torch.Generator().manual_seed(1)
    crops = [torch.randn(6, 3, 32, 32, generator=gen) for _ in range(2)] + [
        torch.randn(6, 3, 16, 16, generator=gen) for _ in range(2)
    ]
    model.head.normalize_prototypes()
    loss = model(crops, 0)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    return loss.item(), {**grads, **stats}


@pytest.mark.parametrize("ac", [True, "stage", "groups"])
def test_activation_checkpointing_gives_the_same_gradients(ac):
    if ac == "groups":
        depths = build_trunk(TINY).depths
        ac = [[1]] + [[d] for d in depths[1:]]
    loss0, ref = _grads(False)
    loss1, got = _grads(ac)
    assert loss1 == pytest.approx(loss0, abs=1e-6)
    assert set(got) == set(ref) and len(ref) > 20
    for name in ref:  # gradients and BN running statistics (updated once, not again during recomputation)
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


_WORKER = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist
    from seer.distributed.env import init_distributed
    from seer.distributed.parallel import parallelize, sync_bn_stats
    from seer.models.regnet import build_trunk
    env = init_distributed(device="cpu")
    torch.manual_seed(0)
    trunk = build_trunk({"depth": 4, "w0": 16, "wa": 8.0, "wm": 2.0, "group_w": 8})
    parallelize(trunk, activation_checkpointing=True, precision=sys.argv[2])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(10 + env.rank))
    y = torch.cat([trunk(x), trunk(x[:, :, :16, :16])])  # two trunk calls per step, as multi-crop does
    y.float().square().mean().backward()
    bn = trunk.stem.bn
    mine = bn.running_mean.clone()
    sync_bn_stats(trunk)
    gathered = [torch.zeros_like(mine) for _ in range(env.world_size)]
    dist.all_gather(gathered, mine)
    ok = torch.allclose(bn.running_mean, torch.stack(gathered).mean(0), atol=1e-6)
    for m in trunk.modules():  # bf16 BN units stay gathered after backward; their gradients live on the shards
        if hasattr(m, "reshard"):
            m.reshard()
    grads = all(p.grad is not None for p in trunk.parameters())
    json.dump({"rank": env.rank, "synced": bool(ok), "differ": not torch.equal(gathered[0], gathered[1]),
               "grads": grads}, open(sys.argv[1] + f".{env.rank}.json", "w"))
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp_two_ranks_with_checkpointing_and_bn_sync(tmp_path, precision):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "out"), precision],
            env=dict(
                os.environ,
                RANK=str(r),
                WORLD_SIZE="2",
                LOCAL_RANK=str(r),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
            ),  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    # judge what the workers wrote (gloo may abort during interpreter shutdown after the work is done)
    results = []
    for r in range(2):
        path = tmp_path / f"out.{r}.json"
        assert path.is_file(), logs[r][-3000:]
        results.append(json.loads(path.read_text()))
    for res in results:
        assert res["synced"] and res["differ"] and res["grads"], res


_FP32_WORKER = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist
    from seer.distributed.env import init_distributed
    from seer.distributed.parallel import is_fsdp, parallelize
    from seer.models.regnet import build_trunk
    from seer.ssl.swav import SwAVConfig, build_model
    env = init_distributed(device="cpu")
    result = {}
    for fp32 in (True, False):
        torch.manual_seed(0)
        trunk = build_trunk({"depth": 4, "w0": 16, "wa": 8.0, "wm": 2.0, "group_w": 8})
        cfg = SwAVConfig(head_dims=[32, 16], n_prototypes=24, freeze_prototypes_iters=0, fp32_prototypes=fp32)
        model = parallelize(build_model(trunk, cfg), precision="bf16")
        seen = {}

        def pre(name, param):  # runs after FSDP's own pre-forward hook: inputs cast, parameters gathered
            def hook(module, args):
                seen[name] = {"input": str(args[0].dtype), "param": str(param(module).dtype)}
            return hook

        def post(module, args, out):
            seen["scores"] = str(out[1].dtype)
            seen["emb"] = str(out[0].dtype)

        protos = model.head.prototypes
        protos.register_forward_pre_hook(pre("prototypes", lambda m: m.weight))
        protos.register_forward_hook(post)
        block = model.trunk.stages[1].blocks[0]
        block.register_forward_pre_hook(pre("block", lambda m: m.conv1.conv.weight))
        model.head.projection.register_forward_pre_hook(pre("projection", lambda m: m[0].weight))
        g = torch.Generator().manual_seed(env.rank)
        crops = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
        model.before_forward(0)
        out = model(crops)
        out["loss"].backward()
        seen["own_unit"] = is_fsdp(protos)
        seen["grad"] = protos.weight.grad is not None and bool(torch.isfinite(protos.weight.grad.full_tensor()).all())
        seen["loss"] = float(out["loss"])
        result[str(fp32)] = seen
    json.dump(result, open(sys.argv[1] + f".{env.rank}.json", "w"))
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_bf16_fsdp_keeps_swav_prototypes_in_fp32(gloo_ranks):
    """Under FSDP2 bf16 the prototypes (normalization + scores) are their own fp32 unit, as VISSL's swav_head_fsdp
    keeps them; the trunk and the projection compute in bf16. ``swav.fp32_prototypes=false`` leaves them bf16."""
    for res in gloo_ranks(_FP32_WORKER)[0]:
        on, off = res["True"], res["False"]
        assert on["own_unit"] and not off["own_unit"]
        assert on["prototypes"] == {"input": "torch.float32", "param": "torch.float32"}, on
        assert on["scores"] == on["emb"] == "torch.float32"
        assert on["block"] == {"input": "torch.bfloat16", "param": "torch.bfloat16"}, on
        assert on["projection"] == {"input": "torch.bfloat16", "param": "torch.bfloat16"}, on
        assert off["prototypes"]["param"] == "torch.bfloat16" and off["scores"] == "torch.bfloat16", off
        assert on["grad"] and off["grad"]
