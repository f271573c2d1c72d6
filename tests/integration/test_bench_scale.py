"""`xenpv bench scale`: N guests on one dom0, each frontend in a process of its own, all through one netback."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xenpv.base.errors import ConfigError
from xenpv.harness.bench.scale import _counts

pytestmark = pytest.mark.integration


@pytest.mark.slow  # the benchmark's own run: one guest, then two
def test_two_guests_report_aggregate_per_guest_and_the_ratio_with_its_target() -> None:
    done = subprocess.run([sys.executable, "-m", "xenpv.harness.cli", "bench", "scale", "--guests", "2",
                           "--seconds", "0.5", "--json"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)["figures"]
    # One guest is always measured too: the ratio's denominator comes from the same run.
    one, two = figures["1 guest(s): aggregate"]["value"], figures["2 guest(s): aggregate"]["value"]
    assert one > 0 and figures["2 guest(s): per guest, slowest"]["value"] > 0  # both guests' frames came back
    assert figures["2 guests: aggregate / one guest"]["value"] == pytest.approx(two / one)


@pytest.mark.parametrize("text, want", [("1,2,4", [1, 2, 4]), ("4", [1, 4]), ("2,8", [1, 2, 8])])
def test_counts(text: str, want: list[int]) -> None:
    assert _counts(text) == want


@pytest.mark.parametrize("text", ["", "0", "9", "two", "1,,x"])
def test_bad_counts_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="--guests"):
        _counts(text)
