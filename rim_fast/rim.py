"""The Recurrent Inference Machine: torch_rim.RIM's interface, with the loop state carried locally."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import vjp
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

from . import cpu_pool, ops
from .architectures.base import EncoderDecoder
from .checkpoints import load_architecture
from .compat import Compat, CompatLike, resolve
from .cuda_graphs import CudaRecorder, GraphCache, Identity, Variant, signature
from .definitions import DEVICE
from .layers import derived
from .validation import as_device, choice, flag, function, integer, integers, same_device, tensor, warn

_INITIALIZATIONS = ("zeros", "approximate_inverse", "model")
_DEFAULTS = {"T": 10, "score_preprocessing_method": "Identity", "initialization_method": "zeros",
             "epsilon": 1e-7, "beta_1": 0.9, "beta_2": 0.999}
_CHECK_FINITE = (False, True, "error", "warn")
#: the graph variants of ``RIM.cuda_graph_variants``: the CUDA convolutions in NCHW (the default) and in channels-last
CUDA_LAYOUT_VARIANTS = (Variant("contiguous", lambda: ops.use_cuda_layout("contiguous")),
                        Variant("channels_last", lambda: ops.use_cuda_layout("channels_last")))
#: score_preprocessing_method as torch_rim spells it (matched in any case) -> the method of ops.preprocess_score
SCORE_PREPROCESSING = {"Identity": "identity", "arcsinh": "arcsinh", "ADAM": "adam", "RMSPROP": "rmsprop"}
#: the ops.preprocess_score methods that carry moments (m, v) from step to step
_WITH_MOMENTS = ("adam", "rmsprop", "rmsprop_fixed")


def preprocessing_method(score_preprocessing_method, compat: Compat) -> str:
    """The ``ops.preprocess_score`` method of a ``score_preprocessing_method``. RMSPROP is torch_rim's update
    (its second moment never moves: score / epsilon) under the compat flag ``rmsprop_without_second_moment``,
    and "rmsprop_fixed" without it."""
    name = choice("score_preprocessing_method", score_preprocessing_method, SCORE_PREPROCESSING, ignore_case=True)
    method = SCORE_PREPROCESSING[name]
    if method == "rmsprop" and not compat.rmsprop_without_second_moment:
        return "rmsprop_fixed"
    return method


def _network(model, checkpoints_directory, device: torch.device, hyperparameters: dict) -> tuple:
    """(network, saved settings): the network given or loaded from ``checkpoints_directory``, and the
    hyperparameters saved there ({} without a directory). ``hyperparameters`` (the RIM's extra keyword
    arguments) is updated in place with the saved ones, or with the given network's own."""
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
    return model, saved


def _settings(given: dict, saved: dict, compat: Compat) -> dict:
    """The RIM settings of ``_DEFAULTS``, checked: each as given; else, with the compat flag
    ``ignore_saved_rim_settings`` off, as saved with the network; else torch_rim's default."""
    settings = {}
    for key, default in _DEFAULTS.items():
        value = given[key]
        if value is None and not compat.ignore_saved_rim_settings and key in saved:
            value = saved[key]
        settings[key] = default if value is None else value
    settings["T"] = integer("T", settings["T"])
    choice("initialization_method", settings["initialization_method"], _INITIALIZATIONS)
    return settings


def _spatial_sizes(dimensions, model: nn.Module) -> tuple:
    """``dimensions`` (a tuple of spatial sizes, or one int) as a tuple of ints the network can take."""
    if isinstance(dimensions, int):
        dimensions = (dimensions,)
    dimensions = integers("dimensions", dimensions, note=" (the spatial sizes of x)")
    if hasattr(model, "_check_spatial"):
        model._check_spatial(dimensions, "dimensions")
    return dimensions


def _link_functions(link_function, inverse_link_function) -> tuple:
    """(link, inverse link): both given, or neither (identities)."""
    for name, fn in (("link_function", link_function), ("inverse_link_function", inverse_link_function)):
        if fn is not None:
            function(name, fn)
    if (link_function is None) != (inverse_link_function is None):
        raise ValueError("Both link function and its inverse must be provided")
    if link_function is None:
        return nn.Identity(), nn.Identity()
    return link_function, inverse_link_function


def _approximate_inverse(approximate_inverse_fn) -> Callable:
    """The y -> x function that ``initialization_method="approximate_inverse"`` needs."""
    if approximate_inverse_fn is None or not callable(approximate_inverse_fn):
        raise ValueError("approximate_inverse_fn must be provided (a callable y -> x) with "
                         "initialization_method='approximate_inverse'")
    return approximate_inverse_fn


def _check_score_shape(score, x: Tensor, y: Tensor, who: str) -> None:
    # shapes are Python metadata (trace-time constants under torch.compile): no host sync
    if not isinstance(score, Tensor):
        raise TypeError(f"{who} must return a tensor (the score, with x's shape), got {type(score).__name__}")
    if not score.is_floating_point():
        raise TypeError(f"{who} must return a real floating-point score (x is real), got dtype {score.dtype}")
    if score.shape != x.shape:
        raise ValueError(f"{who} returned a score of shape {tuple(score.shape)}, expected x's shape "
                         f"{tuple(x.shape)} = [B, C, *dimensions] (y has shape {tuple(y.shape)}): check the batch "
                         f"size, rank and channels of y and what the score function returns")


def _check_energy_shape(energy, x: Tensor) -> None:
    if not isinstance(energy, Tensor):
        raise TypeError(f"energy_fn must return a tensor of one energy per sample, got {type(energy).__name__}")
    B = x.shape[0]
    if energy.numel() != B or (energy.dim() > 0 and energy.shape[0] != B) or energy.dim() > 2:
        raise ValueError(f"energy_fn must return one energy per sample, shape [B] = [{B}], got shape "
                         f"{tuple(energy.shape)} (a batch sum or mean would scale every sample's score)")


def _score_functions(rim: "RIM", score_fn, energy_fn) -> tuple:
    """(score_fn, model_score_fn), torch_rim's pair: the score of x in physical space, and the score of x in model
    space, through the vector-Jacobian product of ``rim.link_function`` (skipped for an identity, whose vjp is its
    cotangent). Given ``energy_fn`` only, both are the gradient of the per-sample energy by ``torch.func.vjp``.
    They read ``rim.score_fn``, ``rim.energy_fn`` and ``rim.link_function`` when called, as torch_rim's closures
    do."""
    if score_fn is not None:
        function("score_fn", score_fn)

        def model_score_fn(x, y, *args, **kwargs):
            if isinstance(rim.link_function, nn.Identity):  # the vjp of an identity is its cotangent
                score = rim.score_fn(x, y, *args, **kwargs)
                _check_score_shape(score, x, y, "score_fn")
                return score
            linked_x, vjp_func = vjp(rim.link_function, x)
            score = rim.score_fn(linked_x, y, *args, **kwargs)
            _check_score_shape(score, linked_x, y, "score_fn")
            return vjp_func(score)[0]
        return score_fn, model_score_fn
    if energy_fn is None:
        raise ValueError("Either 'score_fn' or 'energy_fn' need to be provided")
    function("energy_fn", energy_fn)

    def score_fn(x, y, *args, **kwargs):
        energy, vjp_func = vjp(lambda x: rim.energy_fn(x, y, *args, **kwargs), x)
        _check_energy_shape(energy, x)
        return vjp_func(torch.ones_like(energy))[0]

    def model_score_fn(x, y, *args, **kwargs):
        if isinstance(rim.link_function, nn.Identity):
            return score_fn(x, y, *args, **kwargs)
        energy, vjp_func = vjp(lambda x: rim.energy_fn(rim.link_function(x), y, *args, **kwargs), x)
        _check_energy_shape(energy, x)
        return vjp_func(torch.ones_like(energy))[0]
    return score_fn, model_score_fn


def _recompute_in_this_layout() -> dict:
    """``checkpoint``'s arguments that make its recompute run in the forward's CUDA layout: the autograd engine runs
    a CUDA backward on its own thread per device, where the layout a thread selected (``ops.use_cuda_layout``, per
    thread) is not (torch carries grad mode and autocast over, not Python's thread-local state). Eagerly only:
    torch.compile traces a checkpoint whose ``context_fn`` is torch's own, and its backward is compiled code."""
    if torch.compiler.is_compiling():
        return {}
    layout = ops.cuda_layout()
    return {"context_fn": lambda: (contextlib.nullcontext(), ops.use_cuda_layout(layout))}


class RIM(nn.Module):
    """Recurrent Inference Machine (Putzky & Welling 2017) over a backbone ``model``.

    Same arguments as torch_rim 0.2.9's RIM. ``T``, ``score_preprocessing_method``, ``initialization_method``,
    ``epsilon``, ``beta_1`` and ``beta_2`` default to 10, "Identity", "zeros", 1e-7, 0.9, 0.999; with
    ``checkpoints_directory`` and ``compat`` flag ``ignore_saved_rim_settings=False`` unspecified ones take the
    saved values. ``compat`` defaults to the model's compat setting (torch_rim's behaviour).

    The preprocessing moments are loop state, not module attributes: one RIM can serve concurrent calls.

    rim_fast additions (keyword arguments, not saved with the model):

    - ``gradient_checkpointing=False``: recompute each step's network in the backward pass instead of storing its
      activations (``torch.utils.checkpoint``, non-reentrant): activation memory no longer grows with T by the
      network's activations (only x, the score and h of each step are kept), for about one more network forward
      per step. Gradients are unchanged.
    - ``check_finite=False``: ``True``/``"error"`` raises a ValueError, ``"warn"`` warns, when y (or x_true) holds
      NaN or inf. It costs one host sync per call (eager only; skipped inside ``torch.compile``).

    Under ``torch.autocast`` the network runs in the autocast dtype while x, the hidden state h, the score and
    the preprocessing moments stay in float32 (the score function and the link functions run with autocast off).
    ``forward(y, *args, x_true=...)`` returns ``loss_fn(y, x_true, *args)``: the pattern for
    ``DistributedDataParallel(rim)`` in your own training loop (see ``rim_fast.training``)."""

    def __init__(self, dimensions: tuple, model: nn.Module = None, checkpoints_directory=None,
                 score_fn: Callable = None, energy_fn: Callable = None, T: int = None,
                 link_function: Callable = None, inverse_link_function: Callable = None,
                 initialization_method: str = None, approximate_inverse_fn: Callable = None,
                 score_preprocessing_method: str = None, epsilon=None, beta_1=None, beta_2=None,
                 device=DEVICE, compat: CompatLike = None, gradient_checkpointing: bool = False,
                 check_finite=False, cuda_graphs: bool = True, **hyperparameters):
        super().__init__()
        if model is None and checkpoints_directory is None:
            raise ValueError("Must provide one of 'model' or 'checkpoints_directory'")
        flag("gradient_checkpointing", gradient_checkpointing)
        flag("cuda_graphs", cuda_graphs)
        choice("check_finite", check_finite, _CHECK_FINITE)
        device = as_device("device", device)
        model, saved = _network(model, checkpoints_directory, device, hyperparameters)
        self.compat = resolve(compat if compat is not None else getattr(model, "compat", None))
        settings = _settings({"T": T, "score_preprocessing_method": score_preprocessing_method,
                              "initialization_method": initialization_method, "epsilon": epsilon,
                              "beta_1": beta_1, "beta_2": beta_2}, saved, self.compat)
        self.dimensions = _spatial_sizes(dimensions, model)
        self.device = device
        # x and h are created on `device`, so the network goes there too (torch_rim left a given model where it was)
        self.model = model.to(device)
        self.C = self.model.channels
        self.T = settings["T"]
        self.epsilon, self.beta_1, self.beta_2 = settings["epsilon"], settings["beta_1"], settings["beta_2"]
        self.gradient_checkpointing = gradient_checkpointing
        self.check_finite = check_finite
        self.cuda_graphs = cuda_graphs and os.environ.get("RIM_FAST_CUDA_GRAPHS", "1") != "0"
        self.link_function, self.inverse_link_function = _link_functions(link_function, inverse_link_function)
        self.initialization_method = settings["initialization_method"]
        if self.initialization_method == "approximate_inverse":
            self.approximate_inverse_fn = _approximate_inverse(approximate_inverse_fn)
        self.score_preprocessing_method = settings["score_preprocessing_method"]
        self._preprocessing = preprocessing_method(self.score_preprocessing_method, self.compat)
        hyperparameters.update(settings)
        self.hyperparameters = hyperparameters
        self.score_fn, self.model_score_fn = _score_functions(self, score_fn, energy_fn)
        self.energy_fn = energy_fn

    def _state_dtype(self) -> torch.dtype:
        # torch_rim always used float32, and a float64 model crashed; a float64 model gets a float64 state
        for p in self.model.parameters():
            if p.is_floating_point():
                return torch.float64 if p.dtype == torch.float64 else torch.float32
        return torch.float32

    def _apply(self, fn, *args, **kwargs):
        # rim.to(device) / rim.cuda() move the network; x and h are created on self.device, so it follows
        out = super()._apply(fn, *args, **kwargs)
        for p in self.model.parameters():
            self.device = p.device
            break
        return out

    def _zero_state_hint(self, previous: Optional[str] = None, *, initial: bool = False) -> Optional[str]:
        """The network's ``zero_state`` promise for its next call (``Model.zero_state_hint``): ``initial`` when h
        is the network's initial zero state, else for the state that a call given ``previous`` returned. None
        for networks that take no promise (torch_rim's, users' own)."""
        hint = getattr(self.model, "zero_state_hint", None)
        return None if hint is None else hint(previous, initial=initial)

    def _call_model(self, x, y, score, h, zero_state):
        if zero_state is None:
            return self.model(x, y, score, h)
        return self.model(x, y, score, h, zero_state=zero_state)

    def _no_autocast(self, amp: bool):
        """The score, the preprocessing and the link functions run in the state's precision under autocast."""
        return torch.autocast(self.device.type, enabled=False) if amp else contextlib.nullcontext()

    def _autocast_enabled(self) -> bool:
        try:
            return torch.is_autocast_enabled(self.device.type)
        except (RuntimeError, TypeError):  # a device type without autocast support (meta, ...)
            return False

    def _initial_hidden_state(self, batch_size: int, dtype: torch.dtype) -> Tensor:
        """The network's zero state h_0, made on the RIM's device when the network can (rim_fast's Hourglass and
        Unet): a state made on the CPU and copied inside a compiled loop costs a host-to-device copy per call and
        keeps CUDA graphs from capturing the loop. Other networks' states (torch_rim's signature) are moved."""
        init = self.model.initalize_hidden_states
        if type(self.model).initalize_hidden_states is EncoderDecoder.initalize_hidden_states:
            return init(self.dimensions, batch_size, device=self.device, dtype=dtype)
        return init(self.dimensions, batch_size).to(self.device, dtype)

    def initialization(self, observation: Tensor, amp: bool = False):
        """(trajectory start, x, h, m, v, zero-state hint) for an observation; torch_rim returned (out, x, h).
        ``amp``: autocast is on; the network's outputs are cast back to the state dtype."""
        batch_size = observation.shape[0]
        dtype = self._state_dtype()
        h = self._initial_hidden_state(batch_size, dtype)
        shape = (batch_size, self.C, *self.dimensions)
        out = []
        zero_state = self._zero_state_hint(initial=True)
        if self.initialization_method == "zeros":
            x = torch.zeros(shape, device=self.device, dtype=dtype)
        elif self.initialization_method == "approximate_inverse":
            with self._no_autocast(amp):
                x = self.inverse_link_function(self.approximate_inverse_fn(observation))
            if not isinstance(x, Tensor) or tuple(x.shape) != shape:
                raise ValueError(f"approximate_inverse_fn must return x of shape [B, C, *dimensions] = {shape}, got "
                                 f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        else:
            x = torch.zeros(shape, device=self.device, dtype=dtype)
            score = torch.zeros(shape, device=self.device, dtype=dtype)
            if self.compat.model_init_swaps_y_and_score:
                if observation.shape != x.shape:
                    raise ValueError(f"initialization_method='model' feeds y to the network in place of the score "
                                     f"(torch_rim's argument order, compat flag model_init_swaps_y_and_score), so y "
                                     f"must have x's shape {shape}, got {tuple(observation.shape)}")
                x, h = self._call_model(x, score, observation, h, zero_state)
            else:
                x, h = self._call_model(x, observation, score, h, zero_state)
            if amp:
                x, h = x.to(dtype), h.to(dtype)
            out.append(x)
            zero_state = self._zero_state_hint(zero_state)
        m = v = None
        if self._preprocessing in _WITH_MOMENTS:
            m, v = torch.zeros_like(x), torch.zeros_like(x)
        return out, x, h, m, v, zero_state

    def _loop(self, y: Tensor, args, kwargs, x_true: Optional[Tensor], keep_trajectory: bool,
              w: Optional[Tensor] = None, time_weights: Optional[Tensor] = None, amp: bool = False):
        """The T-step loop (what ``compile`` traces as one graph). Returns (trajectory or [x_T], loss sum).

        w: per-pixel loss weights broadcastable to x; time_weights: [T] (or [T + 1] with initialization "model",
        the first for x_0) scaling each step's loss term; amp: autocast is on (cast g and h back)."""
        # what depends on the parameters alone is built once per call (layers.derived), inside whatever records
        # or traces the call; push/pop, not a context manager: torch.compile traces this function. Not with
        # gradient checkpointing: traced, its steps become subgraphs, which may not write to the cache; eagerly,
        # a step's recomputation (in backward, the cache gone) must save the tensors its forward saved, so every
        # step builds its own (the merged output conv's weight product saves its factors)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._steps(y, args, kwargs, x_true, keep_trajectory, w, time_weights, amp)
        derived.push()
        try:
            return self._steps(y, args, kwargs, x_true, keep_trajectory, w, time_weights, amp)
        finally:
            derived.pop()

    def _steps(self, y, args, kwargs, x_true, keep_trajectory, w, time_weights, amp):
        out, x, h, m, v, zero_state = self.initialization(y, amp)
        h_dtype = h.dtype
        loss = None
        offset = 0
        if x_true is not None and out:
            err = (out[0] - x_true) ** 2
            loss = (err if w is None else w * err).sum()
            if time_weights is not None:
                loss = loss * time_weights[0]
            offset = 1
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for t in range(self.T):
            with torch.no_grad(), self._no_autocast(amp):
                score = self.model_score_fn(x, y, *args, **kwargs)
                score, m, v = ops.preprocess_score(score, m, v, t, method=self._preprocessing, beta_1=self.beta_1,
                                                   beta_2=self.beta_2, epsilon=self.epsilon)
            if recompute:
                # the step's activations are recomputed in backward; x, score and h flow in as inputs
                g, h = checkpoint(self._call_model, x, y, score, h, zero_state, use_reentrant=False,
                                  **_recompute_in_this_layout())
            else:
                g, h = self._call_model(x, y, score, h, zero_state)
            if amp:
                g, h = g.to(x.dtype), h.to(h_dtype)
            zero_state = self._zero_state_hint(zero_state)
            x, loss_t = ops.update_state(x, g, x_true, w)
            if loss_t is not None:
                if time_weights is not None:
                    loss_t = loss_t * time_weights[t + offset]
                loss = loss_t if loss is None else loss + loss_t
            if keep_trajectory:
                out.append(x)
        return (out if keep_trajectory else [x]), loss

    def _check_observation(self, y, args, kwargs) -> None:
        """y, the score function's tensor arguments and the network on the RIM's device (metadata only)."""
        tensor("y", y, self.device, allow_complex=True)
        if y.dim() < 1 or y.shape[0] < 1:
            raise ValueError(f"y must have a leading batch dimension of size >= 1, got shape {tuple(y.shape)}")
        for where, value in [(f"args[{i}]", a) for i, a in enumerate(args)] + \
                [(f"kwargs[{k!r}]", a) for k, a in kwargs.items()]:
            if isinstance(value, Tensor) and not same_device(value.device, self.device):
                raise ValueError(f"score function argument {where} is on {value.device} but the RIM runs on "
                                 f"{self.device}")
        for p in self.model.parameters():
            if not same_device(p.device, self.device):
                raise ValueError(f"the network's parameters are on {p.device} but RIM.device is {self.device}; move "
                                 f"the RIM itself (rim.to(device)), not only rim.model")
            break

    def _x_shape(self, y: Tensor) -> tuple:
        return (y.shape[0], self.C, *self.dimensions)

    def _check_target(self, x_true, y: Tensor) -> None:
        tensor("x_true", x_true, self.device)
        shape = self._x_shape(y)
        if x_true.dim() != len(shape) or any(a != b and a != 1 for a, b in zip(x_true.shape, shape)):
            raise ValueError(f"x_true must have x's shape [B, C, *dimensions] = {shape} (B from y), got "
                             f"{tuple(x_true.shape)}")

    def _loss_weights(self, y: Tensor, w, time_weights):
        shape = self._x_shape(y)
        if w is not None:
            tensor("w", w, self.device)
            try:
                ok = torch.broadcast_shapes(w.shape, shape) == shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"w (per-pixel loss weights) must broadcast to x's shape {shape}, got "
                                 f"{tuple(w.shape)}")
        if time_weights is not None:
            n = self.T + (1 if self.initialization_method == "model" else 0)
            if not isinstance(time_weights, Tensor):
                try:
                    time_weights = torch.tensor(time_weights, dtype=self._state_dtype(), device=self.device)
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(f"time_weights must be a sequence of numbers or a 1-D tensor, got "
                                    f"{type(time_weights).__name__}") from None
            tensor("time_weights", time_weights, self.device)
            if time_weights.shape != (n,):
                extra = " (T + 1 with initialization_method='model': the first weighs x_0)" if n > self.T else ""
                raise ValueError(f"time_weights must have one weight per step, shape [{n}]{extra}, got "
                                 f"{tuple(time_weights.shape)}")
        return w, time_weights

    @staticmethod
    def _cpu_pool(y: Tensor):
        """The CPU memory pool (``rim_fast.cpu_pool``) around an eager call on the CPU: its steps reuse the
        activations' memory instead of faulting it in again (S2 predict 640 -> 515 ms on a 2-core Xeon, rim_fast
        alone); with autograd the backward through the outputs runs with it too (``cpu_pool.during_backward``)."""
        if y.device.type != "cpu" or torch.compiler.is_compiling():
            return contextlib.nullcontext()
        return cpu_pool.pooled()

    def _finite_check(self, **tensors) -> None:
        if self.check_finite is False or torch.compiler.is_compiling():
            return
        for name, value in tensors.items():
            if value is not None and not bool(torch.isfinite(value).all()):
                message = (f"{name} contains NaN or inf (check_finite={self.check_finite!r}; "
                           f"check_finite=False skips this check)")
                if self.check_finite == "warn":
                    warn(message)
                else:
                    raise ValueError(message)

    def _run(self, y: Tensor, args, kwargs, x_true: Optional[Tensor] = None, keep_trajectory: bool = True,
             w: Optional[Tensor] = None, time_weights=None):
        self._check_observation(y, args, kwargs)
        w, time_weights = self._loss_weights(y, w, time_weights)
        self._finite_check(y=y)
        amp = self._autocast_enabled()
        compiled = self.__dict__.get("_compiled_loop")
        if compiled is None:
            def loop(y, args, kwargs, x_true, w, time_weights):
                return self._loop(y, args, kwargs, x_true, keep_trajectory, w, time_weights, amp)

            inputs = [y, args, kwargs, x_true, w, time_weights]
            graphs = self._graphs_for(*inputs)
            if graphs is None:
                with self._cpu_pool(y) as pooled:
                    out, loss = loop(*inputs)
                if pooled and torch.is_grad_enabled():
                    cpu_pool.during_backward(*([loss] if loss is not None else out))  # loss_fn returns no x_t
                return out, loss
            return graphs(signature((inputs, keep_trajectory, amp, self._loop_settings(amp))), loop, inputs,
                          self.cuda_graph_variants())
        out, loss = compiled(y, args, kwargs, x_true, keep_trajectory, w, time_weights, amp)
        if self.__dict__.get("_uses_cuda_graphs"):
            # a later CUDA-graph replay reuses the output memory (pytorch #152887): hand out copies
            out = [x.clone() for x in out]
            loss = None if loss is None else loss.clone()
        return out, loss

    def _graph_recorder(self):
        """How this RIM records graphs: CUDA graphs on a GPU, none elsewhere (tests put the CPU stand-in here)."""
        return CudaRecorder(self.device) if self.device.type == "cuda" else None

    def cuda_graph_variants(self) -> tuple:
        """The ways of running a call that its graph is recorded in and timed against each other (the first is
        the default): on a GPU with ``RIM_FAST_CUDA_LAYOUT=auto`` (the default), the convolutions in NCHW and in
        channels-last (``ops.use_cuda_layout``); none where results must not depend on a timing
        (``torch.use_deterministic_algorithms``, ``torch.backends.cudnn.deterministic``), nor for a float64 network
        (aten runs cuDNN's float64 convolutions in NCHW whatever the layout: nothing to choose)."""
        if (self.device.type != "cuda" or ops.cuda_layout() != "auto" or torch.backends.cudnn.deterministic
                or torch.are_deterministic_algorithms_enabled()):
            return ()
        weight = next(self.model.parameters(), None)
        if weight is not None and weight.dtype == torch.float64:
            return ()
        return CUDA_LAYOUT_VARIANTS

    def _graphs_for(self, *inputs) -> Optional[GraphCache]:
        """The graph cache for an eager call: None when graphs are off (``cuda_graphs=False``,
        ``RIM_FAST_CUDA_GRAPHS=0``), elsewhere than on a GPU, or when the call needs autograd (training runs
        eagerly or compiled); it is checked against the parameters' and buffers' memory first."""
        if not self.cuda_graphs:
            return None
        if torch.is_grad_enabled() and (any(p.requires_grad for p in self.parameters()) or any(
                t.requires_grad for t in tree_flatten(list(inputs))[0] if isinstance(t, Tensor))):
            return None
        graphs = self.__dict__.get("_graph_cache")
        if graphs is not None and self.__dict__.get("_graph_device") != self.device:
            graphs.clear()  # the RIM moved: its recorder was for the old device
            graphs = self.__dict__["_graph_cache"] = None
        if graphs is None:
            recorder = self._graph_recorder()
            if recorder is None:
                return None
            graphs = self.__dict__["_graph_cache"] = GraphCache(recorder)
            self.__dict__["_graph_device"] = self.device
        graphs.watch([*self.parameters(), *self.buffers()])
        return graphs

    def _loop_settings(self, amp: bool) -> tuple:
        """What a recorded loop depends on besides its inputs: the RIM's settings and functions (by identity,
        holding the objects: a bare ``id`` is reused by a new function once the old one is freed), train or eval
        mode, autocast, the backend, the CUDA convolutions' layout, the TF32 switches, the deterministic switches
        (they decide whether both layouts are recorded: ``cuda_graph_variants``)."""
        return (self.T, self._preprocessing, self.epsilon, self.beta_1, self.beta_2, self.initialization_method,
                self.compat, *map(Identity, (self.model, self.score_fn, self.energy_fn, self.model_score_fn,
                                             self.link_function, self.inverse_link_function,
                                             getattr(self, "approximate_inverse_fn", None))),
                self.training, self.model.training,
                torch.get_autocast_dtype(self.device.type) if amp else None, ops.backend(), ops.cuda_layout(),
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())

    def clear_cuda_graphs(self) -> None:
        """Drop the CUDA graphs recorded for eager inference (their memory goes back to the allocator); the next
        call of each signature records again."""
        graphs = self.__dict__.get("_graph_cache")
        if graphs is not None:
            graphs.clear()

    def compile(self, **kwargs) -> "RIM":
        """Compile the whole unrolled T-step loop as one graph; ``forward``, ``predict`` and ``loss_fn`` (and
        their backward) then run compiled. Keyword arguments go to ``torch.compile``; defaults:
        ``fullgraph=True``, ``dynamic=False``, and ``mode="reduce-overhead"`` (CUDA graphs) when the RIM's device
        is CUDA. A new input shape compiles once, for that shape (static shapes: the Triton gate kernels get
        their launch grid as numbers, and CUDA graphs one graph per shape); calls with the same shapes never
        recompile. Returns the RIM."""
        ops.check_compilable(self.device)
        kwargs.setdefault("fullgraph", True)
        kwargs.setdefault("dynamic", False)
        if self.device.type == "cuda" and "mode" not in kwargs and "options" not in kwargs:
            kwargs["mode"] = "reduce-overhead"
        self.__dict__["_uses_cuda_graphs"] = self.device.type == "cuda" and (
            kwargs.get("mode") in ("reduce-overhead", "max-autotune")
            or bool(kwargs.get("options", {}).get("triton.cudagraphs", False)))
        self.__dict__["_compile_kwargs"] = dict(kwargs)
        self.__dict__["_compiled_loop"] = torch.compile(self._loop, **kwargs)
        return self

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy``, pickling) leaves out what belongs to this RIM alone: its CUDA graphs (they
        read this RIM's parameters) and its compiled loop (it calls this RIM's ``_loop``). The copy records its
        own graphs, and is compiled again with the same arguments (lazily: at its first call)."""
        state = super().__getstate__()
        for name in ("_graph_cache", "_graph_device", "_compiled_loop"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if state.get("_compile_kwargs") is not None:
            self.__dict__["_compiled_loop"] = torch.compile(self._loop, **state["_compile_kwargs"])

    def export(self, y: Tensor, *args, ops: str = "auto", dynamic_batch: bool = False,
               **kwargs) -> "torch.export.ExportedProgram":
        """``predict(y, *args, **kwargs)`` as a ``torch.export`` program: the T-step loop, the score function, the
        preprocessing and the link function in one graph, with the RIM's weights. It runs without the RIM (nor
        its score function's Python code): ``torch.export.save(program, "rim.pt2")``, then
        ``torch.export.load("rim.pt2").module()(y, *args)``; ``torch._inductor.aoti_compile_and_package(program,
        package_path="rim_aoti.pt2")`` compiles it with AOTInductor into a package that runs from Python
        (``torch._inductor.aoti_load_package``) or C++ (``torch::inductor::AOTIModelPackageLoader``).

        ``ops``: ``"auto"`` traces the op layer as it runs under torch.compile: ops whose kernels serve compiled
        code stay in the graph as ``rim_fast::`` custom ops, traced through their fake implementations (on CUDA the
        Triton gate kernels, which AOTInductor compiles into its package; on the CPU ``auto`` picks the
        references there); loading a program that holds such ops needs ``import rim_fast`` first (their
        registrations). ``"reference"``: the pure-PyTorch references only, a program that loads with torch alone.
        ``"kernels"``: every op's kernels, or an error (``RIM_FAST_BACKEND=kernels``).
        ``dynamic_batch``: the batch size (y's first dimension, and that of the tensor arguments that share it)
        is a symbol of the program instead of the example's value.

        The example inputs fix every other shape, the dtypes, the device and the non-tensor arguments. The
        program computes what ``predict`` computes (same ops, same order): equal within float32 rounding."""
        from .ops import BACKENDS, use_backend
        from .ops._dispatch import export_region
        if ops not in BACKENDS:
            raise ValueError(f"ops must be one of {BACKENDS}, got {ops!r}")
        if not hasattr(torch.compiler, "is_exporting"):
            raise RuntimeError(f"RIM.export needs a torch newer than 2.6 (one with torch.compiler.is_exporting); this "
                               f"is torch {torch.__version__}, whose export cannot trace the score's vjp. rim.compile() "
                               f"and predict work on it")
        flag("dynamic_batch", dynamic_batch)
        self._check_observation(y, args, kwargs)
        rim = self

        class Predict(nn.Module):
            """predict as a module, so that the RIM's parameters and buffers become the program's state."""

            def __init__(self):
                super().__init__()
                self.rim = rim

            def forward(self, y, *args, **kwargs):
                return self.rim.predict(y, *args, **kwargs)

        dynamic_shapes = None
        if dynamic_batch:
            batch = torch.export.Dim("batch")

            def spec(value):
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == y.shape[0]:
                    return {0: batch}
                return None
            dynamic_shapes = {"y": {0: batch}, "args": tuple(spec(a) for a in args)}
            if kwargs:
                dynamic_shapes["kwargs"] = {k: spec(v) for k, v in kwargs.items()}
        def autograd_vjp(fn, *primals):
            # torch.func.vjp's (output, vjp_fn) through torch.autograd.grad, which torch.export traces into the
            # program's graph: torch.func.vjp leaks tensors of the trace into the program as constants (torch 2.14)
            with torch.enable_grad():
                inputs = [p.detach().requires_grad_() for p in primals]
                out = fn(*inputs)

            def vjp_fn(cotangent):
                grads = torch.autograd.grad(out, inputs, cotangent, allow_unused=True)
                return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads))
            return out, vjp_fn

        # the eager paths that a trace must not take: CUDA-graph replays and a loop compiled by rim.compile();
        # the score functions' vjp (energy_fn, link functions) through autograd while tracing
        module = globals()
        saved = {k: self.__dict__.pop(k) for k in ("_compiled_loop",) if k in self.__dict__}
        cuda_graphs, self.cuda_graphs = self.cuda_graphs, False
        func_vjp, module["vjp"] = module["vjp"], autograd_vjp
        try:
            with use_backend(ops), export_region(), torch.no_grad():
                # non-strict, as newer torch does by default (a strict dynamo trace refuses autograd_vjp)
                return torch.export.export(Predict().eval(), (y, *args), kwargs=kwargs or None,
                                           dynamic_shapes=dynamic_shapes, strict=False)
        finally:
            module["vjp"] = func_vjp
            self.cuda_graphs = cuda_graphs
            self.__dict__.update(saved)

    def forward(self, y: Tensor, *args, x_true: Optional[Tensor] = None, w: Optional[Tensor] = None,
                time_weights=None, **kwargs):
        """The trajectory [x_1, ..., x_T] (x_0 first with initialization "model"), in model space.

        With ``x_true`` (keyword), returns ``loss_fn(y, x_true, *args, w=w, time_weights=time_weights, **kwargs)``
        instead: call ``DistributedDataParallel(rim)(y, *args, x_true=x_true)`` so that the loss goes through
        DDP's forward. ``x_true``, ``w`` and ``time_weights`` are therefore not passed on to the score function."""
        if x_true is not None:
            return self.loss_fn(y, x_true, *args, w=w, time_weights=time_weights, **kwargs)
        if w is not None or time_weights is not None:
            raise ValueError("w and time_weights weigh the loss: pass x_true too (or call loss_fn)")
        return self._run(y, args, kwargs)[0]

    def predict(self, y: Tensor, *args, **kwargs) -> Tensor:
        """link_function(x_T): the estimate in physical space."""
        x = self._run(y, args, kwargs, keep_trajectory=False)[0][-1]
        with self._no_autocast(self._autocast_enabled()):
            return self.link_function(x)

    def loss_fn(self, y: Tensor, x_true: Tensor, *args, w: Optional[Tensor] = None, time_weights=None,
                **kwargs) -> Tensor:
        """sum_t time_weights[t] sum(w (x_t - inverse_link(x_true))^2) / B over the trajectory (torch_rim's loss
        when w and time_weights are None).

        ``w``: per-pixel weights broadcastable to x's shape [B, C, *dimensions] (model space);
        ``time_weights``: one weight per step, length T (T + 1 with initialization "model", the first for x_0).
        Both are keyword-only and taken out before ``*args, **kwargs`` reach the score function, so a score
        function cannot receive keyword arguments named ``w`` or ``time_weights`` through loss_fn."""
        self._check_observation(y, args, kwargs)
        self._check_target(x_true, y)
        self._finite_check(x_true=x_true)
        B = y.shape[0]
        with self._no_autocast(self._autocast_enabled()):
            x_true = self.inverse_link_function(x_true)
        _, loss = self._run(y, args, kwargs, x_true=x_true, keep_trajectory=False, w=w, time_weights=time_weights)
        return loss / B

    def _stateful_score_update(self, score: Tensor, time_step: int, name: str) -> Tensor:
        """torch_rim's stateful preprocessing: the moments live on the module, reset at step 0."""
        if time_step == 0 or not hasattr(self, "_score_mean"):
            self._score_mean, self._score_var = torch.zeros_like(score), torch.zeros_like(score)
        out, self._score_mean, self._score_var = ops.preprocess_score(
            score, self._score_mean, self._score_var, time_step, method=preprocessing_method(name, self.compat),
            beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon)
        return out

    def adam_score_update(self, score: Tensor, time_step: int):
        """torch_rim's API, kept for callers that used it (the loop carries its moments itself)."""
        return self._stateful_score_update(score, time_step, "ADAM")

    def rmsprop_score_update(self, score: Tensor, time_step: int):
        """torch_rim's API, kept for callers that used it (the loop carries its moments itself)."""
        return self._stateful_score_update(score, time_step, "RMSPROP")

    def fit(self, dataset, epochs=100, learning_rate=1e-4, scheduler=None, batch_size=1, shuffle=False,
            patience=float("inf"), tolerance=0, max_time=float("inf"), warmup=0, clip=0.,
            checkpoints_directory=None, model_checkpoint=None, checkpoints=10, models_to_keep=3, ema_decay=0,
            seed=None, logname=None, logdir=None, n_iterations_in_epoch=None, logname_prefix="rim", verbose=0,
            compile=False, **options):
        """Train the backbone on ``dataset`` (a Dataset of (y, x_true, *args) tuples, or a DataLoader); see
        ``rim_fast.training.fit`` for the keyword-only ``options`` (max_epochs, precision, optimizer, num_workers,
        val_dataset, monitor, loggers, ...). ``compile=True`` compiles the training step (``RIM.compile()``)
        first. Under torchrun or srun (or an initialised process group) it trains with DistributedDataParallel;
        ``batch_size`` is per process."""
        from .training import fit
        return fit(self, dataset, epochs=epochs, learning_rate=learning_rate, scheduler=scheduler,
                   batch_size=batch_size, shuffle=shuffle, patience=patience, tolerance=tolerance,
                   max_time=max_time, warmup=warmup, clip=clip, checkpoints_directory=checkpoints_directory,
                   model_checkpoint=model_checkpoint, checkpoints=checkpoints, models_to_keep=models_to_keep,
                   ema_decay=ema_decay, seed=seed, logname=logname, logdir=logdir,
                   n_iterations_in_epoch=n_iterations_in_epoch, logname_prefix=logname_prefix, verbose=verbose,
                   compile=compile, **options)
