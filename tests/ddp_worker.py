"""Worker of tests/test_ddp.py, run as ``torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR`` on CPU (gloo).

Scenarios, each saving what the test compares to ``OUT_DIR/<scenario>_rank<r>.pt``:

- ``fit``: RIM.fit under torchrun, the process group initialised by fit from torchrun's environment;
  per-process batch 2, no shuffle, with a checkpoints directory that rank 0 alone writes; then a second
  call (in the same group) that resumes from it, with shuffle.
- ``accumulate``: fit with accumulate_grad_batches=2 at per-process batch 1.
- ``ema_seeds``: fit with an EMA, each rank's RIM built with its own seed (other initial weights).
- ``compiled``: fit with ``compile=True`` (the RIM's loop compiled by Inductor, inside DDP's eager wrapper).
- ``score_module``: fit with an ``nn.Module`` holding a parameter as the score function (a RIM submodule that
  gets no gradient).
- ``unequal``: a DataLoader of the user's whose sampler gives the ranks 3 and 2 batches per epoch.
- ``streams``: a dataset that draws noise from torch's stream at every read, trained 3 epochs with ``seed``, and
  again 2 epochs, then resumed for the third.
- ``user_loss``: the user's own loop: DistributedDataParallel(rim), the loss through DDP's forward
  (``ddp(y, x_true=x)``), the user's Adam and StepLR.
- ``user_trajectory_bf16``: the same loop with the user's own loss on the trajectory (``ddp(y)``), under
  ``torch.autocast("cpu", torch.bfloat16)``, with gradient checkpointing.

Run as ``python tests/ddp_worker.py OUT_DIR --slurm`` in two processes with SLURM's variables (SLURM_NTASKS,
SLURM_STEP_ID, SLURM_PROCID, SLURM_LOCALID, SLURM_JOB_NODELIST, MASTER_PORT) and no torchrun variables, it saves
``slurm_rank<r>.pt``:

- ``fit`` forms the process group from SLURM's environment and reads through its DataLoader with
  ``num_workers=2`` (persistent, started by a fork server: ``WORKERS_START``), validating on 5 samples (sharded
  3 + 2) with ``monitor="val_loss"``;
- a DataLoader of the user's with a DistributedSampler and ``num_workers=2`` (persistent, from the fork server);
- a DataLoader without a DistributedSampler: the error every rank raises.
"""
import os
import sys

import torch
import torch.distributed as dist

import rim_fast

D = (16,)
N = 8
T = 3


def score_fn(x, y):
    return y - 0.8 * x


def data():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(N, 1, *D, generator=g)
    y = 0.8 * x + 0.1 * torch.randn(N, 1, *D, generator=g)
    return x, y


def val_data():
    """5 validation samples: 2 processes get 3 and 2, each sample once."""
    g = torch.Generator().manual_seed(321)
    x = torch.randn(5, 1, *D, generator=g)
    return torch.utils.data.TensorDataset(0.8 * x + 0.1 * torch.randn(5, 1, *D, generator=g), x)


def slurm_fit(rim, dataset, directory, **kw):
    """The fit call of the SLURM scenario (also the single-process reference of the test, at batch 4)."""
    return rim.fit(dataset, epochs=3, learning_rate=1e-3, val_dataset=val_data(), monitor="val_loss",
                   checkpoints_directory=directory, checkpoints=1, loss_curve=False, verbose=-1, **kw)


class Noisy(torch.utils.data.Dataset):
    """The samples of ``data()`` with noise drawn from torch's stream at every read (an augmentation), each draw
    kept in ``draws``."""

    def __init__(self):
        self.x, self.y = data()
        self.draws = []

    def __len__(self):
        return N

    def __getitem__(self, i):
        noise = 0.05 * torch.randn(self.y[i].shape)
        self.draws.append(noise)
        return self.y[i] + noise, self.x[i]


class UnequalShards(torch.utils.data.Sampler):
    """A per-process sampler of the user's that gives rank 0 five of the 8 samples and rank 1 three."""

    def __init__(self, rank: int):
        self.num_replicas, self.rank = 2, rank
        self.indices = list(range(5)) if rank == 0 else list(range(5, N))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class ScoreModule(torch.nn.Module):
    """A score function with a parameter (a forward model's learned constant, say): not trained by fit."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.8))

    def forward(self, x, y):
        return y - self.a * x


def build(seed=0, **kw):
    torch.manual_seed(seed)
    net = rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6)
    kw.setdefault("score_fn", score_fn)
    return rim_fast.RIM(D, net, T=T, score_preprocessing_method="ADAM", device="cpu", **kw)


def params(rim):
    return {k: v.detach().clone() for k, v in rim.model.state_dict().items()}


def user_loop(rim, rank, world, trajectory=False, bf16=False):
    from torch.nn.parallel import DistributedDataParallel
    x, y = data()
    # the single-process reference of the test runs the same loop on the bare RIM
    ddp = DistributedDataParallel(rim) if dist.is_initialized() else rim
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    per_rank = N // world
    losses = []
    for step in range(4):
        # every step the whole dataset, split over the ranks as DistributedSampler does (rank r: r, r + W, ...)
        batch = slice(rank, N, world)
        yb, xb = y[batch][:per_rank], x[batch][:per_rank]
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if trajectory:
                out = ddp(yb)
                loss = sum(((xt - xb) ** 2).mean() for xt in out)
            else:
                loss = ddp(yb, x_true=xb)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach())
    return losses


def main(out):
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    x, y = data()
    dataset = torch.utils.data.TensorDataset(y, x)
    directory = os.path.join(out, "run")

    # fit initialises the process group itself from torchrun's environment
    assert not dist.is_initialized()
    rim = build()
    losses = rim.fit(dataset, epochs=3, batch_size=2, learning_rate=1e-3, checkpoints_directory=directory,
                     checkpoints=1, models_to_keep=2, seed=11, verbose=-1)
    assert dist.is_initialized()
    first = params(rim)
    rim2 = build()
    losses2 = rim2.fit(dataset, epochs=2, batch_size=2, learning_rate=1e-3, shuffle=True, seed=7,
                       checkpoints_directory=directory, checkpoints=1, models_to_keep=2, verbose=-1)
    torch.save({"losses": losses, "params": first, "resumed_losses": losses2, "resumed_params": params(rim2)},
               os.path.join(out, f"fit_rank{rank}.pt"))

    rim = build()
    losses = rim.fit(dataset, epochs=2, batch_size=1, accumulate_grad_batches=2, learning_rate=1e-3, verbose=-1)
    torch.save({"losses": losses, "params": params(rim)}, os.path.join(out, f"accumulate_rank{rank}.pt"))

    rim = build(seed=rank)  # every rank its own initial weights; DDP starts them all from rank 0's
    losses = rim.fit(dataset, epochs=2, batch_size=2, learning_rate=1e-3, ema_decay=0.9, verbose=-1)
    torch.save({"losses": losses, "params": params(rim)}, os.path.join(out, f"ema_seeds_rank{rank}.pt"))

    rim = build()
    losses = rim.fit(dataset, epochs=2, batch_size=2, learning_rate=1e-3, compile=True, verbose=-1)
    torch.save({"losses": losses, "params": params(rim)}, os.path.join(out, f"compiled_rank{rank}.pt"))

    rim = build(score_fn=ScoreModule())
    losses = rim.fit(dataset, epochs=2, batch_size=2, learning_rate=1e-3, verbose=-1)
    torch.save({"losses": losses, "params": params(rim)}, os.path.join(out, f"score_module_rank{rank}.pt"))

    # a user's sampler with unequal shards: 3 batches on rank 0, 2 on rank 1
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rim = build()
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=UnequalShards(rank))
        losses = rim.fit(loader, epochs=2, learning_rate=1e-3, verbose=-1)
    torch.save({"losses": losses, "params": params(rim), "warnings": [str(w.message) for w in caught]},
               os.path.join(out, f"unequal_rank{rank}.pt"))

    # augmentations drawn from torch's stream: each rank its own; a run resumed after 2 of 3 epochs draws as the
    # uninterrupted one on every rank
    noisy = Noisy()
    rim = build()
    losses = rim.fit(noisy, epochs=3, batch_size=2, learning_rate=1e-3, seed=5, verbose=-1,
                     checkpoints_directory=os.path.join(out, "streams_whole"), loss_curve=False)
    whole = {"losses": losses, "params": params(rim), "draws": torch.stack(noisy.draws)}
    part = Noisy()
    build().fit(part, epochs=2, batch_size=2, learning_rate=1e-3, seed=5, verbose=-1,
                checkpoints_directory=os.path.join(out, "streams_part"), loss_curve=False)
    rest, rim = Noisy(), build()
    losses = rim.fit(rest, epochs=1, batch_size=2, learning_rate=1e-3, seed=5, verbose=-1,
                     checkpoints_directory=os.path.join(out, "streams_part"), loss_curve=False)
    torch.save({"whole": whole, "first": torch.stack(part.draws),
                "resumed": {"losses": losses, "params": params(rim), "draws": torch.stack(rest.draws)}},
               os.path.join(out, f"streams_rank{rank}.pt"))

    rim = build()
    losses = user_loop(rim, rank, world)
    torch.save({"losses": torch.stack(losses), "params": params(rim)}, os.path.join(out, f"user_loss_rank{rank}.pt"))

    rim = build(gradient_checkpointing=True)
    losses = user_loop(rim, rank, world, trajectory=True, bf16=True)
    torch.save({"losses": torch.stack(losses), "params": params(rim)},
               os.path.join(out, f"user_trajectory_bf16_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# DataLoader workers start from a fork server, not by forking this process: on Python 3.11 a fork while one of
# gloo's threads takes the interpreter's lock (it creates a thread state to release a tensor's Python object)
# leaves the worker deadlocked in PyOS_AfterFork_Child (CPython gh-112275; 1 run in ~80 under load hung so)
WORKERS_START = "forkserver"


def main_slurm(out):
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    torch.set_num_threads(1)
    assert not {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"} & set(os.environ)
    rank = int(os.environ["SLURM_PROCID"])
    x, y = data()
    dataset = torch.utils.data.TensorDataset(y, x)
    rim = build()
    losses = slurm_fit(rim, dataset, os.path.join(out, "slurm_run"), batch_size=2, num_workers=2,
                       persistent_workers=True, multiprocessing_context=WORKERS_START)
    assert dist.is_initialized() and dist.get_world_size() == 2 and dist.get_rank() == rank
    loader = DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, shuffle=False), num_workers=2,
                        persistent_workers=True, multiprocessing_context=WORKERS_START)
    own = build()
    own_losses = own.fit(loader, epochs=3, learning_rate=1e-3, verbose=-1)
    try:
        build().fit(DataLoader(dataset, batch_size=2), epochs=1, verbose=-1)
        error = None
    except ValueError as e:
        error = str(e)
    torch.save({"losses": losses, "params": params(rim), "own_losses": own_losses, "own_params": params(own),
                "error": error}, os.path.join(out, f"slurm_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[2:] == ["--slurm"]:
        main_slurm(sys.argv[1])
    else:
        main(sys.argv[1])
