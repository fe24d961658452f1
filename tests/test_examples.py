"""The worked examples (examples/*.py) in their short mode: small sizes, a fixed number of training steps from
fixed seeds (reproducible on one machine: another CPU rounds differently and trains to other numbers), one
thread. Each must beat its naive inverse on PSNR and SSIM by a clear margin, and save its figure. Measured on
our 2-core CPU, quiet (naive -> RIM, PSNR dB / SSIM; test time):

  spectra_1d   Wiener 25.81 / 0.833 -> RIM 29.26 / 0.896   (softplus link; 22 s)
  mri          zero-filled 14.79 / 0.419 -> RIM 19.39 / 0.740   (vmap score, a mask per sample; 250 steps, 21 s;
               on a Xeon with AVX-512, 2026-12-03: 150 steps gave 15.55 / 0.477 there, 17.53 / 0.670 on an AMD EPYC)
  astronomy    Wiener 30.51 / 0.742 -> RIM 31.30 / 0.789   (energy_fn: the log-likelihood; 28 s)
"""
import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

#: example -> (PSNR margin dB, SSIM margin) that the RIM must exceed over the naive inverse
MARGINS = {"spectra_1d": (1.0, 0.03), "mri": (1.5, 0.1), "astronomy": (0.5, 0.02)}


#: one thread (conftest.one_thread): the numbers above are measured so
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(MARGINS))
def test_example_short_mode_beats_the_naive_inverse(name, tmp_path):
    example = importlib.import_module(name)
    result = example.main(["--short", "--out", str(tmp_path), "--device", "cpu"])
    assert result["steps"] == example.SHORT["steps"]
    naive, rim = result["naive"], result["rim"]
    psnr_margin, ssim_margin = MARGINS[name]
    assert rim["psnr"] > naive["psnr"] + psnr_margin, result
    assert rim["ssim"] > naive["ssim"] + ssim_margin, result
    if result["figure"] is not None:
        with open(result["figure"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    if name == "spectra_1d":
        assert result["rim_min"] > 0, "the softplus link keeps the estimate positive"
