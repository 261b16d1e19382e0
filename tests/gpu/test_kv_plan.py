"""KV budget -> max_num_seqs arithmetic (no GPU needed)."""

from __future__ import annotations

import pytest

from gateway.engines.base import EngineError
from gateway.engines.torch_loader import kv_bytes_per_seq, plan_kv

GiB = 1 << 30


def test_per_seq_bytes_smollm2():
    # 30 layers x 3 kv heads x 64 dims x 2048 tokens x K and V x 2 bytes = 45 MiB
    assert kv_bytes_per_seq(30, 3, 64, 2048, 2) == 47185920


def test_budget_derives_max_num_seqs():
    per = kv_bytes_per_seq(30, 3, 64, 2048, 2)
    p = plan_kv(free_bytes=10 * GiB, weight_bytes=GiB // 4, per_seq_bytes=per, fraction=0.5,
                reserve_bytes=2 * GiB, default_max=10_000)
    assert p.budget_bytes == int((10 * GiB - GiB // 4 - 2 * GiB) * 0.5)
    assert p.fits == p.budget_bytes // per == 88
    assert p.max_num_seqs == 88 and "capped by memory" in p.why


def test_default_cap_and_override():
    per = kv_bytes_per_seq(30, 3, 64, 2048, 2)
    big = plan_kv(130 * GiB, GiB // 4, per)
    assert big.fits > 1000 and big.max_num_seqs == 256 and "default cap" in big.why
    assert plan_kv(130 * GiB, GiB // 4, per, requested=64).max_num_seqs == 64
    small = plan_kv(4 * GiB, GiB // 4, per, requested=4096)
    assert small.max_num_seqs == small.fits < 4096  # an override never exceeds what fits


def test_too_little_memory():
    with pytest.raises(EngineError, match="max_model_len"):
        plan_kv(2 * GiB, GiB, kv_bytes_per_seq(30, 3, 64, 8192, 2))
