"""The Recurrent Inference Machine: torch_rim.RIM's interface, with the loop state carried locally."""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import vjp

from . import ops
from .compat import CompatLike, resolve
from .definitions import DEVICE
from .utils import load_architecture

_INITIALIZATIONS = ("zeros", "approximate_inverse", "model")
_DEFAULTS = {"T": 10, "score_preprocessing_method": "Identity", "initialization_method": "zeros",
             "epsilon": 1e-7, "beta_1": 0.9, "beta_2": 0.999}


def _preprocessing_name(method) -> str:
    if not isinstance(method, str):
        raise TypeError(f"score_preprocessing_method must be a str, got {type(method).__name__}")
    name = method.lower()
    if name not in ("adam", "rmsprop", "arcsinh", "identity"):
        raise ValueError(f"score_preprocessing_method {method!r} is not implemented; expected one of 'ADAM', "
                         f"'RMSPROP', 'arcsinh', 'identity' (any case)")
    return name


class RIM(nn.Module):
    """Recurrent Inference Machine (Putzky & Welling 2017) over a backbone ``model``.

    Same arguments as torch_rim 0.2.9's RIM. ``T``, ``score_preprocessing_method``, ``initialization_method``,
    ``epsilon``, ``beta_1`` and ``beta_2`` default to 10, "Identity", "zeros", 1e-7, 0.9, 0.999; with
    ``checkpoints_directory`` and ``compat`` flag ``ignore_saved_rim_settings=False`` unspecified ones take the
    saved values. ``compat`` defaults to the model's compat setting (torch_rim's behaviour).

    The preprocessing moments are loop state, not module attributes: one RIM can serve concurrent calls."""

    def __init__(self, dimensions: tuple, model: nn.Module = None, checkpoints_directory=None,
                 score_fn: Callable = None, energy_fn: Callable = None, T: int = None,
                 link_function: Callable = None, inverse_link_function: Callable = None,
                 initialization_method: str = None, approximate_inverse_fn: Callable = None,
                 score_preprocessing_method: str = None, epsilon=None, beta_1=None, beta_2=None,
                 device=DEVICE, compat: CompatLike = None, **hyperparameters):
        super().__init__()
        if model is None and checkpoints_directory is None:
            raise ValueError("Must provide one of 'model' or 'checkpoints_directory'")
        device = torch.device(device)
        saved = {}
        if checkpoints_directory is not None:
            model, hyperparams = load_architecture(checkpoints_directory, model=model, device=device,
                                                   hyperparameters=hyperparameters)
            saved = dict(hyperparams)
            hyperparameters.update(hyperparams)
        else:
            hyperparameters.update(getattr(model, "hyperparameters", {}))
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not hasattr(model, "channels"):
            raise ValueError("model must have a 'channels' attribute (the number of channels of x)")
        self.compat = resolve(compat if compat is not None else getattr(model, "compat", None))
        given = {"T": T, "score_preprocessing_method": score_preprocessing_method,
                 "initialization_method": initialization_method, "epsilon": epsilon, "beta_1": beta_1,
                 "beta_2": beta_2}
        settings = {}
        for key, value in given.items():
            if value is None and not self.compat.ignore_saved_rim_settings and key in saved:
                value = saved[key]
            settings[key] = _DEFAULTS[key] if value is None else value
        T = settings["T"]
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be an int >= 1, got {T!r}")
        if isinstance(dimensions, int):
            dimensions = (dimensions,)
        dimensions = tuple(int(n) for n in dimensions)
        if hasattr(model, "_check_spatial"):
            model._check_spatial(dimensions, "dimensions")
        self.device = device
        # torch_rim left a passed-in model where it was while creating x and h on `device` (bug 12)
        self.model = model.to(device)
        self.C = self.model.channels
        self.T = T
        self.dimensions = dimensions
        self.epsilon = settings["epsilon"]
        self.beta_1 = settings["beta_1"]
        self.beta_2 = settings["beta_2"]

        if link_function is not None:
            if inverse_link_function is None:
                raise ValueError("Both link function and its inverse must be provided")
            self.link_function = link_function
            self.inverse_link_function = inverse_link_function
        else:
            if inverse_link_function is not None:
                raise ValueError("Both link function and its inverse must be provided")
            self.link_function = nn.Identity()
            self.inverse_link_function = nn.Identity()
        initialization_method = settings["initialization_method"]
        if initialization_method not in _INITIALIZATIONS:
            raise ValueError(f"Initialization method {initialization_method!r} not supported; expected one of "
                             f"{_INITIALIZATIONS}")
        if initialization_method == "approximate_inverse":
            if approximate_inverse_fn is None or not callable(approximate_inverse_fn):
                raise ValueError("approximate_inverse_fn must be provided (a callable y -> x) with "
                                 "initialization_method='approximate_inverse'")
            self.approximate_inverse_fn = approximate_inverse_fn
        self.initialization_method = initialization_method
        self.score_preprocessing_method = settings["score_preprocessing_method"]
        self._preprocessing = _preprocessing_name(self.score_preprocessing_method)
        if self._preprocessing == "rmsprop" and not self.compat.rmsprop_without_second_moment:
            self._preprocessing = "rmsprop_fixed"
        hyperparameters.update({k: settings[k] for k in _DEFAULTS})
        self.hyperparameters = hyperparameters

        if score_fn is None:
            if energy_fn is None:
                raise ValueError("Either 'score_fn' or 'energy_fn' need to be provided")
            if not callable(energy_fn):
                raise TypeError("energy_fn must be callable")

            def score_fn(x, y, *args, **kwargs):
                energy, vjp_func = vjp(lambda x: self.energy_fn(x, y, *args, **kwargs), x)
                return vjp_func(torch.ones_like(energy))[0]

            def model_score_fn(x, y, *args, **kwargs):
                energy, vjp_func = vjp(lambda x: self.energy_fn(self.link_function(x), y, *args, **kwargs), x)
                return vjp_func(torch.ones_like(energy))[0]
        else:
            if not callable(score_fn):
                raise TypeError("score_fn must be callable")

            def model_score_fn(x, y, *args, **kwargs):
                linked_x, vjp_func = vjp(self.link_function, x)
                return vjp_func(self.score_fn(linked_x, y, *args, **kwargs))[0]
        self.score_fn = score_fn
        self.model_score_fn = model_score_fn
        self.energy_fn = energy_fn

    # ---- the loop ------------------------------------------------------------------------------------

    def _state_dtype(self) -> torch.dtype:
        # torch_rim always used float32 (bug 18); a float64 model gets a float64 state instead of a crash
        for p in self.model.parameters():
            if p.is_floating_point():
                return torch.float64 if p.dtype == torch.float64 else torch.float32
        return torch.float32

    def _call_model(self, x, y, score, h, zero_state):
        if zero_state is not None and getattr(self.model, "supports_zero_state_hint", False):
            return self.model(x, y, score, h, zero_state=zero_state)
        return self.model(x, y, score, h)

    def initialization(self, observation: Tensor):
        """(trajectory start, x, h, m, v) for an observation; torch_rim returned (out, x, h)."""
        batch_size = observation.shape[0]
        dtype = self._state_dtype()
        h = self.model.initalize_hidden_states(self.dimensions, batch_size).to(self.device, dtype)
        shape = (batch_size, self.C, *self.dimensions)
        out = []
        zero_state = "all"
        if self.initialization_method == "zeros":
            x = torch.zeros(shape, device=self.device, dtype=dtype)
        elif self.initialization_method == "approximate_inverse":
            x = self.inverse_link_function(self.approximate_inverse_fn(observation))
        else:
            x = torch.zeros(shape, device=self.device, dtype=dtype)
            score = torch.zeros(shape, device=self.device, dtype=dtype)
            if self.compat.model_init_swaps_y_and_score:
                x, h = self._call_model(x, score, observation, h, zero_state)
            else:
                x, h = self._call_model(x, observation, score, h, zero_state)
            out.append(x)
            zero_state = "first" if self.compat.stale_gru_state else None
        m = v = None
        if self._preprocessing in ("adam", "rmsprop", "rmsprop_fixed"):
            m, v = torch.zeros_like(x), torch.zeros_like(x)
        return out, x, h, m, v, zero_state

    def _loop(self, y: Tensor, args, kwargs, x_true: Optional[Tensor], keep_trajectory: bool):
        """The T-step loop (what ``compile`` traces as one graph). Returns (trajectory or [x_T], loss sum)."""
        out, x, h, m, v, zero_state = self.initialization(y)
        loss = None
        if x_true is not None and out:
            loss = ((out[0] - x_true) ** 2).sum()
        stale = self.compat.stale_gru_state
        for t in range(self.T):
            with torch.no_grad():
                score = self.model_score_fn(x, y, *args, **kwargs)
                score, m, v = ops.preprocess_score(score, m, v, t, self._preprocessing, self.beta_1, self.beta_2,
                                                   self.epsilon)
            g, h = self._call_model(x, y, score, h, zero_state)
            zero_state = "first" if stale and zero_state is not None else None
            x, loss_t = ops.update_state(x, g, x_true, None)
            if loss_t is not None:
                loss = loss_t if loss is None else loss + loss_t
            if keep_trajectory:
                out.append(x)
        return (out if keep_trajectory else [x]), loss

    def _run(self, y: Tensor, args, kwargs, x_true: Optional[Tensor] = None, keep_trajectory: bool = True):
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        compiled = self.__dict__.get("_compiled_loop")
        if compiled is None:
            return self._loop(y, args, kwargs, x_true, keep_trajectory)
        out, loss = compiled(y, args, kwargs, x_true, keep_trajectory)
        if self.__dict__.get("_uses_cuda_graphs"):
            # a later CUDA-graph replay reuses the output memory (pytorch #152887): hand out copies
            out = [x.clone() for x in out]
            loss = None if loss is None else loss.clone()
        return out, loss

    def compile(self, **kwargs) -> "RIM":
        """Compile the whole unrolled T-step loop as one graph; ``forward``, ``predict`` and ``loss_fn`` (and
        their backward) then run compiled. Keyword arguments go to ``torch.compile``; defaults:
        ``fullgraph=True``, and ``mode="reduce-overhead"`` (CUDA graphs) when the RIM's device is CUDA.
        A new input shape compiles once; calls with the same shapes never recompile. Returns the RIM."""
        kwargs.setdefault("fullgraph", True)
        if self.device.type == "cuda" and "mode" not in kwargs and "options" not in kwargs:
            kwargs["mode"] = "reduce-overhead"
        self.__dict__["_uses_cuda_graphs"] = self.device.type == "cuda" and (
            kwargs.get("mode") in ("reduce-overhead", "max-autotune")
            or bool(kwargs.get("options", {}).get("triton.cudagraphs", False)))
        self.__dict__["_compiled_loop"] = torch.compile(self._loop, **kwargs)
        return self

    def forward(self, y: Tensor, *args, **kwargs) -> list:
        """The trajectory [x_1, ..., x_T] (x_0 first with initialization "model"), in model space."""
        return self._run(y, args, kwargs)[0]

    def predict(self, y: Tensor, *args, **kwargs) -> Tensor:
        """link_function(x_T): the estimate in physical space."""
        return self.link_function(self._run(y, args, kwargs, keep_trajectory=False)[0][-1])

    def loss_fn(self, y: Tensor, x_true: Tensor, *args, **kwargs) -> Tensor:
        """sum_t sum((x_t - inverse_link(x_true))^2) / B over the trajectory, as torch_rim."""
        if not isinstance(x_true, Tensor):
            raise TypeError(f"x_true must be a torch.Tensor, got {type(x_true).__name__}")
        B = y.shape[0]
        x_true = self.inverse_link_function(x_true)
        _, loss = self._run(y, args, kwargs, x_true=x_true, keep_trajectory=False)
        return loss / B

    # ---- torch_rim's stateful preprocessing API, kept for callers that used it ------------------------

    def adam_score_update(self, score: Tensor, time_step: int):
        if time_step == 0 or not hasattr(self, "_score_mean"):
            self._score_mean, self._score_var = torch.zeros_like(score), torch.zeros_like(score)
        out, self._score_mean, self._score_var = ops.preprocess_score(
            score, self._score_mean, self._score_var, time_step, "adam", self.beta_1, self.beta_2, self.epsilon)
        return out

    def rmsprop_score_update(self, score: Tensor, time_step: int):
        if time_step == 0 or not hasattr(self, "_score_mean"):
            self._score_mean, self._score_var = torch.zeros_like(score), torch.zeros_like(score)
        method = "rmsprop" if self.compat.rmsprop_without_second_moment else "rmsprop_fixed"
        out, self._score_mean, self._score_var = ops.preprocess_score(
            score, self._score_mean, self._score_var, time_step, method, self.beta_1, self.beta_2, self.epsilon)
        return out

    def fit(self, dataset, epochs=100, learning_rate=1e-4, scheduler=None, batch_size=1, shuffle=False,
            patience=float("inf"), tolerance=0, max_time=float("inf"), warmup=0, clip=0.,
            checkpoints_directory=None, model_checkpoint=None, checkpoints=10, models_to_keep=3, ema_decay=0,
            seed=None, logname=None, logdir=None, n_iterations_in_epoch=None, logname_prefix="rim", verbose=0,
            compile=False):
        """Train the backbone on ``dataset`` of (y, x_true, *args) tuples; see ``rim_fast.training.fit``.
        ``compile=True`` compiles the training step (``RIM.compile()``) first."""
        from .training import fit
        return fit(self, dataset, epochs=epochs, learning_rate=learning_rate, scheduler=scheduler,
                   batch_size=batch_size, shuffle=shuffle, patience=patience, tolerance=tolerance,
                   max_time=max_time, warmup=warmup, clip=clip, checkpoints_directory=checkpoints_directory,
                   model_checkpoint=model_checkpoint, checkpoints=checkpoints, models_to_keep=models_to_keep,
                   ema_decay=ema_decay, seed=seed, logname=logname, logdir=logdir,
                   n_iterations_in_epoch=n_iterations_in_epoch, logname_prefix=logname_prefix, verbose=verbose,
                   compile=compile)
