"""RIM.compile: the whole unrolled loop as one graph, equal to eager, no graph break, no recompiles.

Compiling takes ~10 s per graph on our CPU: tiny sizes, T=2, few configurations."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import rim_fast

from conftest import requires_cuda
from helpers import assert_close


def score_fn(x, y):
    return y - 0.7 * x


def energy_fn(x, y):
    return 0.5 * ((y - 0.7 * x) ** 2).flatten(1).sum(1)


def softplus_inv(x):
    return x + torch.log(-torch.expm1(-x))


CONFIGS = [
    pytest.param(1, dict(score_fn=score_fn, score_preprocessing_method="ADAM"), id="1D-score-adam"),
    pytest.param(2, dict(energy_fn=energy_fn, score_preprocessing_method="identity",
                         link_function=torch.nn.functional.softplus, inverse_link_function=softplus_inv),
                 id="2D-energy-identity-link"),
]
SIZES = {1: (16,), 2: (8, 8)}


def _pair(dims, kw, device="cpu"):
    torch.manual_seed(0)
    net = rim_fast.Hourglass(1, dimensions=dims, nf=4, hidden_units=6)
    eager = rim_fast.RIM(SIZES[dims], net, T=2, device=device, **kw)
    net2 = rim_fast.Hourglass(1, dimensions=dims, nf=4, hidden_units=6)
    net2.load_state_dict(net.state_dict())
    compiled = rim_fast.RIM(SIZES[dims], net2, T=2, device=device, **kw)
    return eager, compiled


def _trajectory_length(rim) -> int:
    """T steps, and x_0 first with initialization "model"."""
    return rim.T + (rim.initialization_method == "model")


def _assert_same_loss_and_grads(compiled, eager, y, x_true, atol=1e-6):
    """loss_fn equal, and after backward every parameter gradient (grads zeroed first)."""
    compiled.model.zero_grad()
    eager.model.zero_grad()
    loss_c, loss_e = compiled.loss_fn(y, x_true), eager.loss_fn(y, x_true)
    assert_close(loss_c, loss_e)
    loss_c.backward()
    loss_e.backward()
    named_e, params_c = list(eager.model.named_parameters()), list(compiled.model.parameters())
    assert len(named_e) == len(params_c)
    for (name, p_e), p_c in zip(named_e, params_c):
        assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("dims,kw", CONFIGS)
def test_compiled_equals_eager_with_one_compilation(dims, kw):
    torch._dynamo.reset()
    eager, compiled = _pair(dims, kw)
    counter = CompileCounterWithBackend("inductor")
    compiled.compile(backend=counter)
    for call in range(3):
        y = torch.randn(2, 1, *SIZES[dims])
        x_true = torch.rand(2, 1, *SIZES[dims]) + 0.1
        saved = [(t, t.clone(), t._version) for t in (y, x_true)]
        assert_close(compiled.predict(y), eager.predict(y))
        _assert_same_loss_and_grads(compiled, eager, y, x_true)
        for t, before, version in saved:  # the user's inputs are never written
            assert t._version == version and torch.equal(t, before)
    # one graph for predict (keep_trajectory=False, no target) and one for loss_fn, whatever the call count
    assert counter.frame_count == 2


def test_compiled_forward_trajectory_and_no_graph_breaks():
    torch._dynamo.reset()
    eager, compiled = _pair(1, dict(score_fn=score_fn, score_preprocessing_method="RMSPROP"))
    y = torch.randn(3, 1, 16)
    explanation = torch._dynamo.explain(eager._loop)(y, (), {}, None, True)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled.compile()
    traj_c, traj_e = compiled(y), eager(y)
    assert len(traj_c) == len(traj_e) == _trajectory_length(eager)
    for a, b in zip(traj_c, traj_e):
        assert_close(a, b)


def _symbolic_inputs(gm: torch.fx.GraphModule) -> list:
    """The graph's inputs that are symbolic: SymInt sizes, or tensors with a symbolic size."""
    found = []
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        sizes = value.shape if isinstance(value, torch.Tensor) else [value]
        if any(isinstance(s, torch.SymInt) for s in sizes):
            found.append(node.name)
    return found


def _recording_backend():
    """(graphs, backend): a torch.compile backend that runs each traced graph as it is and keeps it in graphs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, backend


def test_a_new_shape_compiles_with_static_shapes():
    """RIM.compile defaults to dynamic=False: a second batch size compiles a graph for that shape, with no
    symbolic sizes (torch.compile's default would make the sizes symbolic and hand them to the Triton gate
    launchers and CUDA graphs)."""
    torch._dynamo.reset()
    eager, compiled = _pair(1, dict(score_fn=score_fn))
    graphs, backend = _recording_backend()
    compiled.compile(backend=backend)
    for batch in (2, 3, 5, 3):
        y = torch.randn(batch, 1, 16)
        assert_close(compiled.predict(y), eager.predict(y))
    assert len(graphs) == 3  # one per batch size, none again for a size seen before
    assert [_symbolic_inputs(gm) for gm in graphs] == [[], [], []]


def test_a_copy_of_a_compiled_rim_runs_its_own_weights():
    """copy.deepcopy of a compiled RIM: its compiled loop would call the original's (and read its weights); the
    copy is compiled again with the same arguments."""
    import copy
    torch._dynamo.reset()
    eager, compiled = _pair(1, dict(score_fn=score_fn))
    graphs, backend = _recording_backend()
    compiled.compile(backend=backend)
    y = torch.randn(2, 1, 16)
    compiled.predict(y)
    twin = copy.deepcopy(compiled)
    with torch.no_grad():
        for p, q in zip(twin.model.parameters(), eager.model.parameters()):
            p.add_(0.05)
            q.add_(0.05)
    assert_close(twin.predict(y), eager.predict(y))
    assert len(graphs) == 2  # the copy traced its own loop


def test_hidden_state_is_made_on_the_rim_device():
    """h_0 is created on the RIM's device and in its state dtype (no CPU tensor copied to the GPU inside the
    compiled loop, which CUDA graphs cannot capture); a network with torch_rim's two-argument
    ``initalize_hidden_states`` still works, its state moved."""
    eager, compiled = _pair(1, dict(score_fn=score_fn))
    calls = []
    make = compiled.model.initalize_hidden_states

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return make(*args, **kwargs)

    compiled.model.initalize_hidden_states = spy
    compiled.compile(backend="aot_eager")
    y = torch.randn(2, 1, 16)
    assert_close(compiled.predict(y), eager.predict(y))
    assert calls and all(k == {"device": compiled.device, "dtype": torch.float32} for k in calls)

    class TwoArgumentState(rim_fast.Hourglass):
        def initalize_hidden_states(self, dimensions, batch_size):
            return super().initalize_hidden_states(dimensions, batch_size).double()  # moved and cast by the RIM

    net = TwoArgumentState(1, dimensions=1, nf=4, hidden_units=6)
    net.load_state_dict(eager.model.state_dict())
    assert_close(rim_fast.RIM(SIZES[1], net, T=2, score_fn=score_fn).predict(y), eager.predict(y))


@requires_cuda
def test_reduce_overhead_on_cuda_equals_eager_and_outputs_survive():
    torch._dynamo.reset()
    eager, compiled = _pair(2, dict(score_fn=score_fn, score_preprocessing_method="ADAM"), device="cuda")
    compiled.compile()  # mode="reduce-overhead" by default on CUDA
    y1 = torch.randn(4, 1, 8, 8, device="cuda")
    y2 = torch.randn(4, 1, 8, 8, device="cuda")
    y1_before, y1_version = y1.clone(), y1._version
    first = compiled.predict(y1)
    traj = compiled(y1)
    for _ in range(3):
        compiled.predict(y2)
        compiled(y2)
    assert y1._version == y1_version and torch.equal(y1, y1_before)  # the user's input is never written
    assert_close(first, eager.predict(y1))
    traj_e = eager(y1)
    assert len(traj) == len(traj_e) == _trajectory_length(eager)
    for a, b in zip(traj, traj_e):
        assert_close(a, b)
    _assert_same_loss_and_grads(compiled, eager, y1, torch.rand_like(y1), atol=1e-5)


def test_fit_with_compile_trains_like_eager():
    torch._dynamo.reset()
    eager, compiled = _pair(1, dict(score_fn=score_fn))
    x = torch.randn(4, 1, 16)
    data = torch.utils.data.TensorDataset(x + 0.1, x)
    losses_e = eager.fit(data, epochs=2, batch_size=2, learning_rate=1e-3, verbose=-1)
    losses_c = compiled.fit(data, epochs=2, batch_size=2, learning_rate=1e-3, verbose=-1, compile=True)
    assert compiled.__dict__.get("_compiled_loop") is not None
    assert losses_c == pytest.approx(losses_e, rel=1e-4)


MODES = [pytest.param(dict(score_preprocessing_method=m), id=m) for m in ("ADAM", "RMSPROP", "arcsinh", "identity")]
MODES += [pytest.param(dict(initialization_method="approximate_inverse", approximate_inverse_fn=lambda y: 0.5 * y),
                       id="init-approximate_inverse"),
          pytest.param(dict(initialization_method="model", score_preprocessing_method="ADAM"), id="init-model")]


@pytest.mark.parametrize("kw", MODES)
def test_every_preprocessing_and_initialisation_compiles_fullgraph(kw):
    """Each preprocessing mode and initialisation traces as one graph (fullgraph=True: a break would raise),
    forward and backward equal to eager. aot_eager keeps this cheap; inductor is covered above."""
    torch._dynamo.reset()
    eager, compiled = _pair(1, dict(score_fn=score_fn, **kw))
    counter = CompileCounterWithBackend("aot_eager")
    compiled.compile(backend=counter)
    y = torch.randn(2, 1, 16)
    x_true = torch.rand(2, 1, 16) + 0.1
    traj_c, traj_e = compiled(y), eager(y)
    assert len(traj_c) == len(traj_e) == _trajectory_length(eager)
    for a, b in zip(traj_c, traj_e):
        assert_close(a, b)
    _assert_same_loss_and_grads(compiled, eager, y, x_true)
    assert counter.frame_count == 2  # forward (trajectory) and loss_fn
