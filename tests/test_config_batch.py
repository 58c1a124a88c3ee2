"""A global batch that does not divide the world size: the error suggests the nearest valid batches, with the peak
lr and warmup start the loop would use for each (seer_10b's 7936 at 512 GPUs)."""

from __future__ import annotations

import re

import pytest

from seer.cli import main
from seer.config import ConfigError, batch_per_gpu, load_config, validate
from seer.train.optim import cosine_schedule, scaled_lr


def _error(cfg, world_size: int) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size)
    return str(info.value)


def _schedule_start(cfg, world_size: int) -> tuple[float, float]:
    """(peak lr, first lr) exactly as seer.train.loop computes them."""
    o = cfg.optim
    peak = scaled_lr(o.base_lr, batch_per_gpu(cfg, world_size) * world_size, o.reference_batch)
    lrs = cosine_schedule(peak, cfg.total_steps, o.warmup_iters, o.start_warmup_lr * peak, o.final_lr_ratio)
    return peak, float(lrs[0])


def test_seer_10b_at_512_gpus_suggests_7680_and_8192_with_their_lr_and_warmup_start():
    cfg = load_config("seer_10b")
    msg = _error(cfg, 512)
    assert msg.startswith("data.global_batch_size: is not divisible by the world size 512, got 7936")
    assert "7680 (15 per GPU) or 8192 (16 per GPU)" in msg
    # each suggestion is valid at 512, and the figures the message gives are the loop's own
    for batch in (7680, 8192):
        ok = load_config("seer_10b", [f"data.global_batch_size={batch}"])
        validate(ok, 512)
        peak, start = _schedule_start(ok, 512)
        assert f"{peak:.4g} at {batch}" in msg.split("The warmup")[0]
        assert f"{start:.4g} at {batch}" in msg.split("The warmup")[1]
    assert "9.6 at 8192" in msg and "0.1548 at 8192" in msg  # 9.3 x 8192 / 7936; 0.016129 x 9.6
    assert "start_warmup_lr = start / peak" in msg and "docs/pretraining.md" in msg


def test_below_the_world_size_only_the_multiple_above_is_suggested():
    msg = _error(load_config(None, ["data.global_batch_size=3"]), 8)
    assert "Nearest valid: 8 (1 per GPU)." in msg and " or " not in msg.split("Nearest valid:")[1].split(".")[0]


def test_no_warmup_no_warmup_advice():
    cfg = load_config(None, ["data.global_batch_size=100", "optim.warmup_iters=0"])
    msg = _error(cfg, 16)
    assert "96 (6 per GPU) or 112 (7 per GPU)" in msg and "warmup starts" not in msg
    nums = [float(x) for x in re.findall(r"([\d.]+) at (?:96|112)\b", msg)]
    assert nums == pytest.approx([0.3 * 96 / 256, 0.3 * 112 / 256], rel=1e-3)


def test_seer_plan_prints_the_suggestion(capsys):
    assert main(["plan", "--config", "seer_10b", "--world-size", "512"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seer plan: data.global_batch_size") and "8192 (16 per GPU)" in err
