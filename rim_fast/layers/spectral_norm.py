"""score_models' own SpectralNorm (not torch's): keys ``weight_u``, ``weight_v``, ``weight_bar``; one power
iteration on every forward, in eval too."""
import torch
from torch import nn
from torch.nn import Parameter


def l2normalize(v, eps=1e-12):
    return v / (v.norm() + eps)


class SpectralNorm(nn.Module):
    def __init__(self, module: nn.Module, name: str = "weight", power_iterations: int = 1):
        super().__init__()
        self.module = module
        self.name = name
        self.power_iterations = power_iterations
        w = getattr(module, name)
        height = w.shape[0]
        width = w.view(height, -1).shape[1]
        u = Parameter(l2normalize(w.data.new(height).normal_(0, 1)), requires_grad=False)
        v = Parameter(l2normalize(w.data.new(width).normal_(0, 1)), requires_grad=False)
        w_bar = Parameter(w.data)
        del module._parameters[name]
        module.register_parameter(name + "_u", u)
        module.register_parameter(name + "_v", v)
        module.register_parameter(name + "_bar", w_bar)

    def _update_u_v(self):
        u = getattr(self.module, self.name + "_u")
        v = getattr(self.module, self.name + "_v")
        w = getattr(self.module, self.name + "_bar")
        height = w.data.shape[0]
        for _ in range(self.power_iterations):
            v.data = l2normalize(torch.mv(torch.t(w.view(height, -1).data), u.data))
            u.data = l2normalize(torch.mv(w.view(height, -1).data, v.data))
        sigma = u.dot(w.view(height, -1).mv(v))
        setattr(self.module, self.name, w / sigma.expand_as(w))

    def forward(self, *args):
        self._update_u_v()
        return self.module.forward(*args)
