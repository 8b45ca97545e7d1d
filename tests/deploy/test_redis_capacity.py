"""The capacity script (tests/deploy/redis_capacity.py, whose numbers deploy/README.md
reports) runs end to end on a small N and gives plausible figures."""

from __future__ import annotations

import pytest

from tests.fixtures.redis_binary import RedisBinary

from .redis_capacity import measure


@pytest.mark.slow
def test_capacity_script_measures(redis_binary: RedisBinary) -> None:
    result = measure(sessions=60, apis=1, workers=1, concurrency=8)
    assert result["redis_version"] == redis_binary.version_text  # measured on the Redis the run chose
    assert result["sessions"] == 60
    assert result["admitted_per_s"] > 0 and result["ready_per_s"] > 0
    assert 500 < result["bytes_per_live_session"] < 200_000
    assert result["redis_commands_per_session"] > 5
    assert result["redis_cpu_s_per_session"] > 0
