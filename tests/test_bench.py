"""The server benchmark runs and reports what the issue asks for (numbers are not checked)."""

import pytest

from simulations.bench_server import run_one


def test_bench_reports_one_transfer_round():
    result = run_one(8, 4, "cpu", 0, 16, group_targets=True)
    for key in ("clients", "groups", "rank", "seconds", "peak_mb", "bytes_per_client"):
        assert key in result
    assert (result["clients"], result["groups"], result["rank"]) == (8, 4, 4)
    assert result["group_targets"] is True
    # packet up, pieces up, merged down: 3·r·(m+n) numbers against 2·m·n for FedAvg
    expected = 3 * 4 * (768 + 768) / (2 * 768 * 768)
    assert result["ratio_by_group"]["bert_value"] == pytest.approx(expected, abs=1e-4)
    assert 0 < result["bytes_per_client"] < result["bytes_full"]
