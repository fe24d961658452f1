"""The README's main job, in its short mode: a fixed number of steps from fixed seeds (reproducible), after which
the RIM's reconstruction is clearly closer to the truth than the observation, as the README claims."""
import math
import os

from rim_fast import demo


def test_demo_short_mode(tmp_path):
    result = demo.main(["--short", "--out", str(tmp_path), "--size", "16"])
    assert result["steps"] == demo.SHORT_STEPS
    assert math.isfinite(result["rmse_reconstruction"]) and result["rmse_observation"] > 0
    # measured: 0.149 (observation) -> 0.120 (RIM), a ratio of 0.81
    assert result["rmse_reconstruction"] < 0.9 * result["rmse_observation"], result
    assert os.path.getsize(result["png"]) > 1000
