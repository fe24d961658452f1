"""rim_fast.metrics against scikit-image on the same arrays: PSNR and SSIM (Gaussian weights, sigma 1.5) within
1e-4 in 1D, 2D and 3D; MSE and NMSE by their definitions."""
import pytest
import torch

from rim_fast import metrics

skimage_metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is a test dependency")

SHAPES = {
    "1D-B3-C2-L37": (3, 2, 37),
    "2D-B2-C3-23x17": (2, 3, 23, 17),
    "2D-B1-C1-11x11": (1, 1, 11, 11),
    "3D-B2-C1-13x12x15": (2, 1, 13, 12, 15),
}


def _pair(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g) * 3 - 1  # not in [0, 1]: the data range matters
    estimate = target + 0.2 * torch.randn(shape, generator=g)
    return estimate.to(dtype), target.to(dtype)


def _skimage_ssim(estimate, target, data_range, **kw):
    return skimage_metrics.structural_similarity(estimate.numpy(), target.numpy(), data_range=data_range,
                                                 channel_axis=0, gaussian_weights=True, sigma=1.5, **kw)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("data_range", [None, 2.5], ids=["range-of-target", "range-given"])
def test_psnr_and_ssim_match_scikit_image(shape, data_range):
    estimate, target = _pair(shape)
    psnr, ssim = metrics.psnr(estimate, target, data_range), metrics.ssim(estimate, target, data_range)
    assert psnr.shape == ssim.shape == (shape[0],)
    for b in range(shape[0]):
        r = float(target[b].max() - target[b].min()) if data_range is None else data_range
        expected_ssim = _skimage_ssim(estimate[b], target[b], r, use_sample_covariance=False)
        expected_psnr = skimage_metrics.peak_signal_noise_ratio(target[b].numpy(), estimate[b].numpy(), data_range=r)
        assert abs(float(ssim[b]) - expected_ssim) < 1e-4, (b, float(ssim[b]), expected_ssim)
        assert abs(float(psnr[b]) - expected_psnr) < 1e-4, (b, float(psnr[b]), expected_psnr)
        assert 0.05 < expected_ssim < 0.99  # neither trivial nor degenerate data


def test_ssim_sample_covariance_and_float64_match_scikit_image():
    estimate, target = _pair((2, 1, 16, 16), seed=1, dtype=torch.float64)
    ours = metrics.ssim(estimate, target, 3.0, use_sample_covariance=True)
    assert ours.dtype == torch.float64
    for b in range(2):
        expected = _skimage_ssim(estimate[b], target[b], 3.0, use_sample_covariance=True)
        assert abs(float(ours[b]) - expected) < 1e-10


def test_mse_nmse_and_identities():
    estimate, target = _pair((3, 2, 8, 8))
    err = (estimate - target) ** 2
    torch.testing.assert_close(metrics.mse(estimate, target), err.flatten(1).mean(1))
    torch.testing.assert_close(metrics.nmse(estimate, target), err.flatten(1).sum(1) / (target ** 2).flatten(1).sum(1))
    same = torch.rand(2, 1, 12, 12)
    torch.testing.assert_close(metrics.ssim(same, same), torch.ones(2), rtol=0, atol=1e-6)
    assert torch.isinf(metrics.psnr(same, same)).all()
    # a [B] data range per sample
    r = torch.tensor([1.0, 4.0, 9.0])
    expected = torch.stack([metrics.psnr(estimate[i:i + 1], target[i:i + 1], float(r[i]))[0] for i in range(3)])
    torch.testing.assert_close(metrics.psnr(estimate, target, r), expected)
    values = metrics.image_metrics(estimate, target)
    assert set(values) == {"mse", "nmse", "psnr"}  # 8x8 is smaller than SSIM's window: left out


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"ssim: every spatial size must be >= the Gaussian window \(11"):
        metrics.ssim(torch.rand(1, 1, 10, 30), torch.rand(1, 1, 10, 30))
    with pytest.raises(ValueError, match=r"psnr: estimate and target must have the same shape"):
        metrics.psnr(torch.rand(1, 1, 8), torch.rand(1, 1, 9))
    with pytest.raises(ValueError, match=r"mse: inputs must be \[B, C, \*spatial\]"):
        metrics.mse(torch.rand(8), torch.rand(8))
    assert metrics.ssim_window() == 11 and metrics.ssim_window(sigma=1.0) == 9
