"""Bad input gets a clear error at the API boundary: a ValueError or TypeError (a RuntimeError for unreadable
files) naming the argument and what was expected, never a deep torch traceback.

Device mismatches are tested with the ``meta`` device (CI has no GPU): the checks compare devices only."""
import json
import os

import pytest
import torch

import rim_fast
from rim_fast import GRUBlock, Hourglass, Unet

D = (16,)


def score_fn(x, y):
    return y - x


def energy_fn(x, y):
    return 0.5 * ((y - x) ** 2).flatten(1).sum(1)


def net(**kw):
    return Hourglass(1, dimensions=1, nf=4, hidden_units=6, **kw)


def make(**kw):
    kw.setdefault("score_fn", score_fn)
    kw.setdefault("T", 2)
    kw.setdefault("device", "cpu")
    return rim_fast.RIM(D, kw.pop("model", None) or net(), **kw)


def y_():
    return torch.randn(2, 1, *D)


def data(n=4):
    x = torch.randn(n, 1, *D)
    return torch.utils.data.TensorDataset(x + 0.1, x)


def fit(**kw):
    kw.setdefault("verbose", -1)
    dataset = kw.pop("dataset") if "dataset" in kw else data()
    return make().fit(dataset, **{"epochs": 1, **kw})


class _Dicts(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return {"y": torch.zeros(1, *D), "x": torch.zeros(1, *D)}


class _NoLen(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([])


def _on_meta():
    r = make()
    r.model.to("meta")
    return r.predict(y_())


CASES = [
    # ---- the RIM's constructor
    ("T=0", lambda: make(T=0), ValueError, r"T must be an int >= 1, got 0"),
    ("T=2.5", lambda: make(T=2.5), ValueError, r"T must be an int >= 1"),
    ("no score_fn or energy_fn", lambda: make(score_fn=None), ValueError, r"Either 'score_fn' or 'energy_fn'"),
    ("score_fn not callable", lambda: make(score_fn=3), TypeError, r"score_fn must be callable"),
    ("energy_fn not callable", lambda: make(score_fn=None, energy_fn="e"), TypeError, r"energy_fn must be callable"),
    ("link without inverse", lambda: make(link_function=torch.exp), ValueError, r"link function and its inverse"),
    ("inverse without link", lambda: make(inverse_link_function=torch.log), ValueError,
     r"link function and its inverse"),
    ("link not callable", lambda: make(link_function=1, inverse_link_function=torch.log), TypeError,
     r"link_function must be callable"),
    ("unknown preprocessing", lambda: make(score_preprocessing_method="adamw"), ValueError,
     r"score_preprocessing_method must be one of \('Identity', 'arcsinh', 'ADAM', 'RMSPROP'\) "
     r"\(any case\), got 'adamw'"),
    ("preprocessing not a str", lambda: make(score_preprocessing_method=1), TypeError,
     r"score_preprocessing_method must be a str"),
    ("unknown initialisation", lambda: make(initialization_method="random"), ValueError,
     r"initialization_method must be one of \('zeros', 'approximate_inverse', 'model'\), got 'random'"),
    ("approximate_inverse without fn", lambda: make(initialization_method="approximate_inverse"), ValueError,
     r"approximate_inverse_fn must be provided"),
    ("sizes the Hourglass cannot round-trip", lambda: rim_fast.RIM((18,), net(), score_fn=score_fn, device="cpu"),
     ValueError, r"multiple of 4"),
    ("sizes the Unet cannot round-trip",
     lambda: rim_fast.RIM((16, 10), Unet(1, dimensions=2, nf=4, hidden_units=6), score_fn=score_fn, device="cpu"),
     ValueError, r"multiple of 4.*\(16, 10\)"),
    ("too few spatial sizes", lambda: rim_fast.RIM((16,), Hourglass(1, dimensions=2, nf=4), score_fn=score_fn,
                                                   device="cpu"), ValueError, r"needs 2 spatial sizes"),
    ("dimensions not ints", lambda: rim_fast.RIM(("a",), net(), score_fn=score_fn, device="cpu"), ValueError,
     r"dimensions must be a non-empty sequence of ints >= 1 \(the spatial sizes of x\), got \('a',\)"),
    ("model not a module", lambda: rim_fast.RIM(D, model=lambda x: x, score_fn=score_fn, device="cpu"), TypeError,
     r"model must be an nn.Module"),
    ("no model nor directory", lambda: rim_fast.RIM(D, score_fn=score_fn), ValueError,
     r"one of 'model' or 'checkpoints_directory'"),
    ("bad device", lambda: make(device="gpu0"), ValueError, r"device 'gpu0' is not a torch device"),
    ("bad compat", lambda: make(compat="sometimes"), ValueError, r"compat='sometimes'"),
    ("gradient_checkpointing not a bool", lambda: make(gradient_checkpointing="yes"), TypeError,
     r"gradient_checkpointing must be a bool"),
    ("check_finite unknown", lambda: make(check_finite="maybe"), ValueError, r"check_finite must be one of"),

    # ---- calls: y, x_true, devices, dtypes
    ("y not a tensor", lambda: make().predict([1.0, 2.0]), TypeError, r"y must be a torch.Tensor, got list"),
    ("integer y", lambda: make().predict(torch.ones(2, 1, *D, dtype=torch.int64)), TypeError,
     r"y must be a floating-point \(or complex\) tensor, got dtype torch.int64"),
    ("y without batch dimension", lambda: make().predict(torch.tensor(1.0)), ValueError,
     r"y must have a leading batch dimension"),
    ("y on another device", lambda: make().predict(torch.randn(2, 1, *D, device="meta")), ValueError,
     r"y is on meta but the RIM runs on cpu"),
    ("score argument on another device", lambda: make(score_fn=lambda x, y, a: y - a * x).predict(
        y_(), torch.ones(1, device="meta")), ValueError, r"score function argument args\[0\] is on meta"),
    ("network moved without the RIM", _on_meta, ValueError, r"network's parameters are on meta but RIM.device is cpu"),
    ("y with wrong channels", lambda: make().predict(torch.randn(2, 3, *D)), ValueError,
     r"score_fn returned a score of shape \(2, 3, 16\), expected x's shape \(2, 1, 16\).*y has shape \(2, 3, 16\)"),
    ("y with wrong rank", lambda: make().predict(torch.randn(2, 1, 16, 16)), ValueError,
     r"score_fn returned a score of shape .* check the batch size, rank and channels of y"),
    ("y fed to the network with the wrong shape", lambda: make(initialization_method="model").predict(
        torch.randn(2, 2, *D)), ValueError, r"initialization_method='model' feeds y to the network"),
    ("x_true with wrong channels", lambda: make().loss_fn(y_(), torch.randn(2, 2, *D)), ValueError,
     r"x_true must have x's shape \[B, C, \*dimensions\] = \(2, 1, 16\).*got \(2, 2, 16\)"),
    ("x_true with wrong rank", lambda: make().loss_fn(y_(), torch.randn(2, 16)), ValueError,
     r"x_true must have x's shape"),
    ("x_true with another batch size", lambda: make().loss_fn(y_(), torch.randn(3, 1, *D)), ValueError,
     r"x_true must have x's shape .*\(B from y\)"),
    ("integer x_true", lambda: make().loss_fn(y_(), torch.ones(2, 1, *D, dtype=torch.int32)), TypeError,
     r"x_true must be a floating-point tensor, got dtype torch.int32"),
    ("complex x_true", lambda: make().loss_fn(y_(), torch.ones(2, 1, *D, dtype=torch.complex64)), TypeError,
     r"x_true must be a floating-point tensor"),
    ("x_true on another device", lambda: make().loss_fn(y_(), torch.ones(2, 1, *D, device="meta")), ValueError,
     r"x_true is on meta but the RIM runs on cpu"),
    ("x_true not a tensor", lambda: make().loss_fn(y_(), 1.0), TypeError, r"x_true must be a torch.Tensor"),
    ("w of the wrong shape", lambda: make().loss_fn(y_(), y_(), w=torch.ones(3, 1, *D)), ValueError,
     r"w \(per-pixel loss weights\) must broadcast to x's shape \(2, 1, 16\), got \(3, 1, 16\)"),
    ("integer w", lambda: make().loss_fn(y_(), y_(), w=torch.ones(1, dtype=torch.int64)), TypeError,
     r"w must be a floating-point tensor"),
    ("time_weights of the wrong length", lambda: make().loss_fn(y_(), y_(), time_weights=[1.0, 2.0, 3.0]),
     ValueError, r"time_weights must have one weight per step, shape \[2\], got \(3,\)"),
    ("time_weights not numbers", lambda: make().loss_fn(y_(), y_(), time_weights=["a", "b"]), TypeError,
     r"time_weights must be a sequence of numbers or a 1-D tensor"),
    ("loss weights without x_true", lambda: make()(y_(), w=torch.ones(1)), ValueError,
     r"w and time_weights weigh the loss: pass x_true"),

    # ---- what the user's functions return
    ("score_fn returning the wrong shape", lambda: make(score_fn=lambda x, y: (y - x).sum(-1)).predict(y_()),
     ValueError, r"score_fn returned a score of shape \(2, 1\), expected x's shape \(2, 1, 16\)"),
    ("score_fn returning a tuple", lambda: make(score_fn=lambda x, y: (y - x, 0)).predict(y_()), TypeError,
     r"score_fn must return a tensor"),
    ("score_fn returning complex", lambda: make(score_fn=lambda x, y: (y - x).to(torch.complex64)).predict(y_()),
     TypeError, r"score_fn must return a real floating-point score"),
    ("energy_fn returning the batch sum", lambda: make(score_fn=None, energy_fn=lambda x, y: energy_fn(x, y).sum())
     .predict(y_()), ValueError, r"energy_fn must return one energy per sample, shape \[B\] = \[2\], got shape \(\)"),
    ("energy_fn returning per-pixel energies", lambda: make(score_fn=None, energy_fn=lambda x, y: (y - x) ** 2)
     .predict(y_()), ValueError, r"one energy per sample.*got shape \(2, 1, 16\)"),
    ("approximate_inverse_fn returning the wrong shape", lambda: make(
        initialization_method="approximate_inverse", approximate_inverse_fn=lambda y: y[:, :, :8]).predict(y_()),
     ValueError, r"approximate_inverse_fn must return x of shape \[B, C, \*dimensions\] = \(2, 1, 16\), got "
                 r"\(2, 1, 8\)"),

    # ---- networks and layers
    ("odd hidden_units (Hourglass)", lambda: Hourglass(1, dimensions=1, hidden_units=5), ValueError,
     r"hidden units 5 must be divisible by 2"),
    ("odd hidden_units (GRUBlock)", lambda: GRUBlock(4, 5, dimensions=1), ValueError,
     r"hidden units 5 must be divisible by 2"),
    ("kernel_size 0", lambda: Hourglass(1, dimensions=1, kernel_size=0), ValueError,
     r"kernel_size must be an int >= 1, got 0"),
    ("conv_kernel_size 0", lambda: Hourglass(1, dimensions=1, conv_kernel_size=0), ValueError,
     r"conv_kernel_size must be None or an int >= 1 \(None = kernel_size; square kernels only\), got 0"),
    ("input_kernel_size -1 (Unet)", lambda: Unet(1, dimensions=1, input_kernel_size=-1), ValueError,
     r"input_kernel_size must be None"),
    ("GRUBlock kernel_size 0", lambda: GRUBlock(4, 6, kernel_size=0, dimensions=1), ValueError,
     r"GRUBlock: kernel_size must be an int >= 1, got 0"),
    ("GRUBlock conv_kernel_size 2.5", lambda: GRUBlock(4, 6, conv_kernel_size=2.5, dimensions=1), ValueError,
     r"GRUBlock: conv_kernel_size must be an int >= 1, got 2.5"),
    ("empty FIR kernel", lambda: Hourglass(1, dimensions=1, resample_with_conv=False, fir_kernel=()), ValueError,
     r"fir_kernel must be a non-empty 1-D sequence"),
    ("4 spatial dimensions", lambda: Hourglass(1, dimensions=4), ValueError, r"The dimensions 4 is not supported"),
    ("empty ch_mult", lambda: Hourglass(1, dimensions=1, ch_mult=()), ValueError, r"ch_mult must be a non-empty"),
    ("unknown activation", lambda: Hourglass(1, dimensions=1, activation="gelu"), ValueError,
     r"activation must be one of \('elu', .*\) \(any case\), got 'gelu'"),
    ("zero channels", lambda: Unet(0, dimensions=1), ValueError, r"channels must be an int >= 1, got 0"),

    # ---- fit's arguments and data
    ("epochs -1", lambda: fit(epochs=-1), ValueError, r"epochs must be an int >= 0, got -1"),
    ("epochs 2.5", lambda: fit(epochs=2.5), ValueError, r"epochs must be an int"),
    ("batch_size 0", lambda: fit(batch_size=0), ValueError, r"batch_size must be an int >= 1, got 0"),
    ("learning_rate 0", lambda: fit(learning_rate=0), ValueError, r"learning_rate must be a finite number > 0"),
    ("learning_rate inf", lambda: fit(learning_rate=float("inf")), ValueError, r"learning_rate must be a finite"),
    ("learning_rate as a string", lambda: fit(learning_rate="1e-3"), ValueError, r"learning_rate must be"),
    ("patience 0", lambda: fit(patience=0), ValueError, r"patience must be a number > 0"),
    ("models_to_keep 0", lambda: fit(models_to_keep=0), ValueError, r"models_to_keep must be an int >= 1"),
    ("checkpoints 0", lambda: fit(checkpoints=0), ValueError, r"checkpoints must be an int >= 1"),
    ("tolerance 1.5", lambda: fit(tolerance=1.5), ValueError, r"tolerance must be a number in \[0, 1\)"),
    ("ema_decay 1", lambda: fit(ema_decay=1), ValueError, r"ema_decay must be a number in \[0, 1\), got 1"),
    ("max_epochs -1", lambda: fit(max_epochs=-1), ValueError, r"max_epochs must be None or an int >= 0, got -1"),
    ("accumulate_grad_batches 0", lambda: fit(accumulate_grad_batches=0), ValueError,
     r"accumulate_grad_batches must be an int >= 1"),
    ("unknown precision", lambda: fit(precision="fp16"), ValueError, r"precision must be one of"),
    ("unknown on_nan", lambda: fit(on_nan="ignore"), ValueError, r"on_nan must be one of \('stop', 'skip'\)"),
    ("scheduler not callable", lambda: fit(scheduler=3), TypeError, r"scheduler must be callable \(optimizer -> LR scheduler"),
    ("w neither tensor nor callable", lambda: fit(w=[1.0]), TypeError, r"w must be a tensor or a callable"),
    ("dataset of single tensors", lambda: fit(dataset=torch.utils.data.TensorDataset(torch.randn(4, 1, *D))),
     ValueError, r"the dataset must yield tuples \(y, x_true, \*args\).*length 1"),
    ("dataset of dicts", lambda: fit(dataset=_Dicts()), ValueError, r"must yield tuples .* batch 0 is a dict"),
    ("dataset yielding a non-tensor target", lambda: fit(dataset=[(torch.randn(1, *D), "x")] * 2), TypeError,
     r"x_true of batch 0 is a"),
    ("dataset with x_true of the wrong shape", lambda: fit(dataset=torch.utils.data.TensorDataset(
        torch.randn(4, 1, *D), torch.randn(4, 1, 8))), ValueError, r"x_true must have x's shape"),
    ("empty dataset", lambda: fit(dataset=torch.utils.data.TensorDataset(torch.randn(0, 1, *D),
                                                                         torch.randn(0, 1, *D))),
     ValueError, r"dataset is empty"),
    ("dataset without a length", lambda: fit(dataset=_NoLen()), ValueError,
     r"dataset must be a map-style dataset \(with __len__\)"),
    ("NaN in the data", lambda: fit(dataset=torch.utils.data.TensorDataset(torch.full((2, 1, *D), float("nan")),
                                                                           torch.zeros(2, 1, *D))),
     ValueError, r"y of batch 0 contains NaN or inf"),
]


@pytest.mark.parametrize("thunk,error,pattern", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_is_reported_clearly(thunk, error, pattern):
    with pytest.raises(error, match=pattern):
        thunk()


# ---- checkpoint directories ---------------------------------------------------------------------------------

def test_missing_checkpoints_directory(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoints_directory .*missing.* is not an existing directory"):
        rim_fast.RIM(D, checkpoints_directory=str(tmp_path / "missing"), score_fn=score_fn, device="cpu")


def test_checkpoints_directory_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a directory")
    with pytest.raises(ValueError, match=r"is not an existing directory"):
        rim_fast.RIM(D, checkpoints_directory=str(path), score_fn=score_fn, device="cpu")
    with pytest.raises(ValueError, match=r"exists and is not a directory"):
        fit(checkpoints_directory=str(path))


def test_unreadable_hyperparameters(tmp_path):
    (tmp_path / "model_hparams.json").write_text("{not json")
    with pytest.raises(RuntimeError, match=r"model_hparams.json' is not valid JSON"):
        rim_fast.RIM(D, checkpoints_directory=str(tmp_path), score_fn=score_fn, device="cpu")


def test_directory_of_corrupt_checkpoints(tmp_path):
    directory = str(tmp_path / "run")
    fit(checkpoints_directory=directory)
    (tmp_path / "run" / "model_hparams.json").write_text(json.dumps(net().hyperparameters))
    for name in os.listdir(directory):
        if name.startswith("checkpoint_"):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(b"truncated")
    with pytest.warns(RuntimeWarning, match=r"checkpoint_.*\.pt' is unreadable or corrupt"), \
            pytest.raises(RuntimeError, match=r"no readable checkpoint in"):
        rim_fast.RIM(D, checkpoints_directory=directory, score_fn=score_fn, device="cpu")


def test_model_checkpoint_that_does_not_exist(tmp_path):
    directory = str(tmp_path / "run")
    fit(checkpoints_directory=directory)
    with pytest.raises(ValueError, match=r"model_checkpoint=9 not found .* available: \[1\]"):
        fit(checkpoints_directory=directory, model_checkpoint=9)


def test_checks_cost_no_graph_break():
    """The boundary checks are metadata only: torch.compile traces predict and loss_fn as one graph each."""
    r = make(score_preprocessing_method="ADAM")
    y = y_()
    for fn, args in ((r.predict, (y,)), (r.loss_fn, (y, y))):
        explanation = torch._dynamo.explain(fn)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons


def test_export_refuses_a_torch_without_is_exporting(monkeypatch):
    """torch 2.6 (our floor) has no torch.compiler.is_exporting and its export cannot trace the score's vjp: RIM.export
    says so instead of failing deep in the trace."""
    monkeypatch.delattr(torch.compiler, "is_exporting", raising=False)
    rim = make()
    with pytest.raises(RuntimeError, match="RIM.export needs a torch newer than 2.6"):
        rim.export(torch.randn(2, 1, *rim.dimensions))
