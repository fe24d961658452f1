"""The README's main job, in its short mode: trains, reports finite errors, writes the PNG."""
import math
import os

from rim_fast import demo


def test_demo_short_mode(tmp_path):
    result = demo.main(["--short", "--out", str(tmp_path), "--size", "16"])
    assert result["steps"] >= 1
    assert math.isfinite(result["rmse_reconstruction"]) and result["rmse_observation"] > 0
    assert os.path.getsize(result["png"]) > 1000
