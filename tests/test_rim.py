"""The RIM module's own API beside its loop (the loop itself: test_parity_rim, test_compile, test_ops_dispatch)."""
import pytest
import torch

import rim_fast
from rim_fast import ops
from rim_fast.rim import SCORE_PREPROCESSING, preprocessing_method


@pytest.mark.parametrize("compat", ["torch_rim", "fixed"])
def test_preprocessing_names(compat):
    c = rim_fast.compat.resolve(compat)
    assert {name: preprocessing_method(name.swapcase(), c) for name in SCORE_PREPROCESSING} == {
        "Identity": "identity", "arcsinh": "arcsinh", "ADAM": "adam",
        "RMSPROP": "rmsprop" if compat == "torch_rim" else "rmsprop_fixed"}
    assert set(SCORE_PREPROCESSING.values()) | {"rmsprop_fixed"} == set(ops.PREPROCESSING)


@pytest.mark.parametrize("compat", ["torch_rim", "fixed"])
@pytest.mark.parametrize("name", ["ADAM", "RMSPROP"])
def test_torch_rims_stateful_preprocessing_api(compat, name):
    """adam_score_update / rmsprop_score_update keep their moments on the module and reset them at step 0."""
    net = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6)
    r = rim_fast.RIM((8,), net, score_fn=lambda x, y: y - x, compat=compat, device="cpu")
    update = r.adam_score_update if name == "ADAM" else r.rmsprop_score_update
    method = preprocessing_method(name, r.compat)
    scores = [torch.randn(2, 1, 8) for _ in range(3)]
    for _ in range(2):  # the second pass starts again at step 0
        m = v = torch.zeros_like(scores[0])
        for t, s in enumerate(scores):
            expected, m, v = ops.preprocess_score(s, m, v, t, method=method, beta_1=r.beta_1, beta_2=r.beta_2,
                                                  epsilon=r.epsilon)
            assert torch.equal(update(s, t), expected)
