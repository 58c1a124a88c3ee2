"""Suite-wide fixtures."""

import os

import pytest


@pytest.fixture(autouse=True)
def _restore_environment():
    """Give every test the environment it started with.

    Code under test exports torch.distributed variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) straight into
    os.environ, as a launcher must; monkeypatch only restores keys it touched itself, so without this a later
    in-process `pretrain()` would try to join a process group that does not exist and wait forever.
    """
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


# The smallest pretraining run the tests train (SwAV on a 4-block trunk, 2x32 + 2x16 crops of 48 px synthetic
# images, metrics every step, no TensorBoard). A test adds what it changes on purpose (batch size, steps, the
# prototype freeze, the learning rate, ...) after it: later overrides win.
TINY_OVERRIDES = (
    "model.cfg={depth: 4, w0: 16, wa: 8.0, wm: 2.0, group_w: 8}",
    "swav.head_dims=[32, 16]",
    "swav.n_prototypes=32",
    "data.crops=[[2, 32], [2, 16]]",
    "data.image_size=48",
    "data.synthetic_classes=8",
    "train.log_every=1",
    "train.tensorboard=false",
)


@pytest.fixture(scope="session")
def tiny_overrides() -> tuple[str, ...]:
    """``TINY_OVERRIDES``: dotted overrides of a tiny pretraining config (session-scoped, so hypothesis tests and
    module-level fixtures can use it)."""
    return TINY_OVERRIDES


@pytest.fixture
def fused_conv_spy(monkeypatch):
    """Record the dtype of every input that reaches the trunk's fused oneDNN convolutions.

    Where this CPU really has oneDNN bf16 kernels the real kernels run; where it has none (AVX2-only CPUs) a bf16
    input is computed in fp32 and rounded to bf16, as the kernel would, so a test forcing the "bf16 kernels"
    branch checks the dispatch on any machine. The real no-kernel branch runs in test_hardware.py.
    """
    import torch
    import torch.nn.functional as F

    from seer import hardware
    from seer.models import regnet

    seen: list = []
    real = hardware._probe("cpu_bf16")

    def conv(x, weight, bias, padding, stride, dilation, groups, act="none", residual=None):
        if x.dtype != torch.bfloat16 or real:
            if residual is None:
                return real_conv(x, weight, bias, padding, stride, dilation, groups, act)
            return real_add(x, residual, weight, bias, padding, stride, dilation, groups)
        y = F.conv2d(x.float(), weight.float(), bias.float(), stride, padding, dilation, groups)
        if residual is not None:
            y = y + residual.float()
        if act == "relu" or residual is not None:
            y = y.relu()
        return y.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

    real_conv, real_add = regnet._fused_conv, regnet._fused_conv_add_relu

    def fused(x, weight, bias, padding, stride, dilation, groups, act):
        seen.append(x.dtype)
        return conv(x, weight, bias, padding, stride, dilation, groups, act)

    def fused_add(x, residual, weight, bias, padding, stride, dilation, groups):
        seen.append(x.dtype)
        return conv(x, weight, bias, padding, stride, dilation, groups, residual=residual)

    monkeypatch.setattr(regnet, "_fused_conv", fused)
    monkeypatch.setattr(regnet, "_fused_conv_add_relu", fused_add)
    return seen


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node SLURM cluster (tests/slurm_cluster.py) for the session, its SLURM_CONF exported; the
    daemons it started are stopped at the end. Skips, with the reason, where none can be started (no packages and
    no root to install them, daemons that do not come up)."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from slurm_cluster import ClusterUnavailable, SlurmCluster

    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.up()
    except ClusterUnavailable as exc:
        cluster.down()
        pytest.skip(f"no SLURM cluster here: {exc}")
    saved = os.environ.get("SLURM_CONF")
    os.environ.update(cluster.env())
    yield cluster
    cluster.down()
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


@pytest.fixture
def gloo_ranks(tmp_path):
    """``run(source, world=2, *args, timeout=240) -> (results, logs)``: the script ``source`` on ``world`` gloo ranks
    on this machine (one process without a process group when ``world`` is 1), called as ``script OUT *args``; rank
    ``r`` writes ``OUT.r.json``. The results are judged from what the workers wrote, not their exit codes: gloo may
    abort during interpreter shutdown after the work is done."""
    import json
    import socket
    import subprocess
    import sys

    def run(source: str, world: int = 2, *args: str, timeout: float = 240) -> tuple[list[dict], list[str]]:
        script = tmp_path / "worker.py"
        script.write_text(source)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        if world > 1:
            env.update(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(tmp_path / "out"), *args],
                env=dict(env, RANK=str(r), LOCAL_RANK=str(r)) if world > 1 else env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(world)
        ]
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
        results = []
        for r in range(world):
            path = tmp_path / f"out.{r}.json"
            assert path.is_file(), logs[r][-3000:]
            results.append(json.loads(path.read_text()))
        return results, logs

    return run
