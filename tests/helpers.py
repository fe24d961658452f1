"""Shared builders for tests: paired torch_rim / rim_fast models with the same weights."""
import torch

import rim
import rim_fast


def tiny_hourglass_kwargs(dimensions, **kw):
    base = dict(channels=1, dimensions=dimensions, nf=4, ch_mult=(2, 2), hidden_units=6, kernel_size=3)
    base.update(kw)
    return base


def paired_models(cls_name="Hourglass", **kwargs):
    torch.manual_seed(1)
    ref = getattr(rim, cls_name)(**kwargs)
    new = getattr(rim_fast, cls_name)(**kwargs)
    new.load_state_dict(ref.state_dict())
    # non-zero GRU biases so that every bias path is exercised
    with torch.no_grad():
        named_ref, params_new = list(ref.named_parameters()), list(new.parameters())
        assert len(named_ref) == len(params_new)
        for (name, p_ref), p_new in zip(named_ref, params_new):
            if "bias_" in name:
                p_ref.uniform_(-0.5, 0.5)
                p_new.copy_(p_ref)
    return ref, new


def assert_close(a, b, rtol=1e-5, atol=1e-6, msg=""):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")
