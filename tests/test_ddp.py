"""torch.distributed for real: ``torchrun --nproc_per_node 2`` on CPU with gloo (tests/ddp_worker.py), and two
processes started with SLURM's variables as ``srun`` would, compared with one process at twice the batch over the
same samples."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import ddp_worker as W
from rim_fast import checkpoints as ckpt

HERE = os.path.dirname(os.path.abspath(__file__))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available() or not os.path.exists(TORCHRUN),
                                 reason="needs torch.distributed and torchrun"),
              pytest.mark.usefixtures("one_thread")]  # conftest: small CPU trainings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           os.path.join(HERE, "ddp_worker.py"), out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = {}
    for scenario in ("fit", "accumulate", "ema_seeds", "compiled", "score_module", "unequal", "streams", "user_loss",
                     "user_trajectory_bf16"):
        results[scenario] = [torch.load(os.path.join(out, f"{scenario}_rank{r}.pt")) for r in (0, 1)]
    results["dir"] = os.path.join(out, "run")
    results["stderr"] = proc.stderr
    return results


def _dataset():
    x, y = W.data()
    return torch.utils.data.TensorDataset(y, x)


def _assert_params_equal_across_ranks(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _assert_close_params(a, b, rtol=1e-5, atol=1e-6):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _assert_trains_like_one_process_at_batch_4(ranks, single, **fit_kw):
    """Both ranks end with the same weights, and with the losses and weights of ``single`` trained in one process
    at batch 4 over the same samples."""
    rank0, rank1 = ranks
    _assert_params_equal_across_ranks(rank0["params"], rank1["params"])
    losses = single.fit(_dataset(), epochs=2, batch_size=4, learning_rate=1e-3, verbose=-1, **fit_kw)
    assert rank0["losses"] == pytest.approx(losses, rel=1e-5)
    _assert_close_params(W.params(single), rank0["params"])


def test_fit_ranks_agree_and_match_one_process_at_twice_the_batch(runs):
    rank0, rank1 = runs["fit"]
    _assert_params_equal_across_ranks(rank0["params"], rank1["params"])
    assert rank0["losses"] == rank1["losses"]  # all-reduced: every rank logs (and decides on) the same loss
    single = W.build()
    losses = single.fit(_dataset(), epochs=3, batch_size=4, learning_rate=1e-3, verbose=-1)
    assert rank0["losses"] == pytest.approx(losses, rel=1e-5)
    _assert_close_params(W.params(single), rank0["params"])
    # the weights moved: the comparison is not between two untouched initialisations
    assert not torch.equal(W.params(W.build())["input_layer.weight"], rank0["params"]["input_layer.weight"])


def test_fit_with_an_ema_from_ranks_built_with_other_seeds(runs):
    """DDP starts every rank from rank 0's weights, and the EMA's shadows follow: every rank ends with the same
    (EMA) weights, those of one process from rank 0's initial weights at twice the batch."""
    _assert_trains_like_one_process_at_batch_4(runs["ema_seeds"], W.build(seed=0), ema_decay=0.9)


def test_fit_compiled_under_ddp_matches_one_process_at_twice_the_batch(runs):
    _assert_trains_like_one_process_at_batch_4(runs["compiled"], W.build())


def test_fit_with_a_score_module_holding_a_parameter(runs):
    """A score function that is an nn.Module with a parameter is a RIM submodule without gradients: DDP ignores it
    (else it waits for its gradient and fails at the second step); the network trains as in one process."""
    _assert_trains_like_one_process_at_batch_4(runs["score_module"], W.build(score_fn=W.ScoreModule()))


def test_fit_rank_zero_writes_and_both_resume(runs):
    rank0, rank1 = runs["fit"]
    _assert_params_equal_across_ranks(rank0["resumed_params"], rank1["resumed_params"])
    assert rank0["resumed_losses"] == rank1["resumed_losses"] and len(rank0["resumed_losses"]) == 2
    found = ckpt.list_checkpoints(runs["dir"])
    # 3 + 2 epochs, one checkpoint each, the last 2 kept; numbering continued after the resume
    assert [f.index for f in found] == [4, 5]
    assert all(f.optimizer and f.trainstate for f in found)
    assert not [n for n in os.listdir(runs["dir"]) if n.startswith(".tmp_")]
    with open(os.path.join(runs["dir"], "score_sheet.txt")) as f:
        assert [line.split()[0] for line in f.read().splitlines()] == ["1", "2", "3", "4", "5"]
    # the last checkpoint holds the weights both ranks ended with
    state = torch.load(found[-1].model)
    _assert_params_equal_across_ranks(state, rank0["resumed_params"])
    train_state = torch.load(found[-1].trainstate)
    # a resumed run continues the checkpoint's shuffling stream (seed=11), not the new call's seed=7
    assert train_state["epoch"] == 5 and train_state["world_size"] == 2 and train_state["sampler_seed"] == 11


def test_fit_accumulation_under_ddp_matches_one_process(runs):
    # 2 processes x batch 1 x 2 accumulated batches = one process at batch 4
    _assert_trains_like_one_process_at_batch_4(runs["accumulate"], W.build())


def test_fit_takes_the_same_number_of_steps_on_ranks_with_unequal_shards(runs):
    rank0, rank1 = runs["unequal"]
    # both ranks finish (unequal steps would leave one waiting in DDP's backward) with the same weights
    assert len(rank0["losses"]) == 2 and rank0["losses"] == rank1["losses"]
    _assert_params_equal_across_ranks(rank0["params"], rank1["params"])
    notes = [w for w in rank0["warnings"] if "batches per epoch" in w]
    assert len(notes) == 1 and "give 3, 2 batches" in notes[0] and "takes 2 per epoch" in notes[0]
    assert not [w for w in rank1["warnings"] if "batches per epoch" in w]


def test_fit_ranks_draw_their_own_random_numbers_and_resume_their_own_streams(runs):
    rank0, rank1 = runs["streams"]
    # 3 epochs x 4 samples per rank; the ranks' augmentations differ
    assert rank0["whole"]["draws"].shape[0] == rank1["whole"]["draws"].shape[0] == 12
    assert not torch.equal(rank0["whole"]["draws"], rank1["whole"]["draws"])
    for rank in (rank0, rank1):
        # the same seed, the same stream: the interrupted run's first 2 epochs, then its resumed third
        assert torch.equal(rank["first"], rank["whole"]["draws"][:8])
        assert torch.equal(rank["resumed"]["draws"], rank["whole"]["draws"][8:])
        assert rank["resumed"]["losses"] == pytest.approx(rank["whole"]["losses"][2:], rel=1e-6)
        _assert_close_params(rank["resumed"]["params"], rank["whole"]["params"])
    assert rank0["whole"]["losses"] == rank1["whole"]["losses"]


def test_user_loop_with_ddp_forward_loss(runs):
    rank0, rank1 = runs["user_loss"]
    _assert_params_equal_across_ranks(rank0["params"], rank1["params"])
    # each rank's loss is its own shard's; DDP averages the gradients, so the mean is one process' loss
    single = W.build()
    losses = torch.stack(W.user_loop(single, 0, 1))
    torch.testing.assert_close((rank0["losses"] + rank1["losses"]) / 2, losses, rtol=1e-5, atol=1e-6)
    assert not torch.equal(rank0["losses"], rank1["losses"])
    _assert_close_params(W.params(single), rank0["params"])


def test_user_loop_trajectory_under_autocast_with_checkpointing(runs):
    rank0, rank1 = runs["user_trajectory_bf16"]
    _assert_params_equal_across_ranks(rank0["params"], rank1["params"])
    single = W.build(gradient_checkpointing=True)
    losses = torch.stack(W.user_loop(single, 0, 1, trajectory=True, bf16=True))
    # bf16 network: the two runs round differently (different batch shapes), so a bf16-sized tolerance
    torch.testing.assert_close((rank0["losses"] + rank1["losses"]) / 2, losses, rtol=2e-2, atol=1e-3)
    _assert_close_params(W.params(single), rank0["params"], rtol=2e-2, atol=1e-4)


# ---- SLURM: two processes with SLURM's variables and no torchrun variables, as srun starts them --------------

_LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                     "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")


@pytest.fixture(scope="module")
def slurm_runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("slurm"))
    base = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    # as srun's tasks see them (SLURM_STEP_ID: a step's tasks, not a batch script of --ntasks=2)
    base.update(OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_STEP_ID="0", SLURM_JOB_NODELIST="localhost",
                MASTER_PORT=str(_free_port()),
                PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "ddp_worker.py"), out, "--slurm"],
                              env=dict(base, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return [torch.load(os.path.join(out, f"slurm_rank{r}.pt")) for r in (0, 1)], os.path.join(out, "slurm_run")


def _csv(directory):
    import csv
    with open(os.path.join(directory, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_slurm_processes_with_dataloader_workers_train_like_one_process_at_twice_the_batch(slurm_runs, tmp_path):
    (rank0, rank1), directory = slurm_runs
    _assert_params_equal_across_ranks(rank0["params"], rank1["params"])
    assert rank0["losses"] == rank1["losses"]
    single = W.build()
    losses = W.slurm_fit(single, _dataset(), str(tmp_path / "single"), batch_size=4)
    assert rank0["losses"] == pytest.approx(losses, rel=1e-5)
    _assert_close_params(W.params(single), rank0["params"])
    # validation sharded 3 + 2: every sample once, the metrics those of one process over the 5 samples
    ours, reference = _csv(directory), _csv(str(tmp_path / "single"))
    assert len(ours) == len(reference) == 3
    for a, b in zip(ours, reference):
        for name in ("val_loss", "val_mse", "val_nmse", "val_psnr", "val_ssim"):
            # abs: SSIM and NMSE lie in [-1, 1] and near 0 here (untrained), where the relative rounding differences
            # of the 3 + 2 and the 5 batch shardings are large
            assert float(a[name]) == pytest.approx(float(b[name]), rel=1e-5, abs=1e-7), name
    # the user's DataLoader with a DistributedSampler (and workers) trains the same
    assert rank0["own_losses"] == rank1["own_losses"]
    assert rank0["own_losses"] == pytest.approx(losses, rel=1e-5)
    _assert_close_params(W.params(single), rank0["own_params"])
    # and one without a per-process sampler is refused on every rank
    for rank in (rank0, rank1):
        assert "under DDP (2 processes) a DataLoader must carry a DistributedSampler" in rank["error"]
