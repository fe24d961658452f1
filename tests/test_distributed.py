"""rim_fast.distributed without a process group: reading torchrun's and SLURM's environments, SLURM node lists,
the device of each local process, and the refusal to train as several rank-0 processes. The real two-process runs
(torchrun and SLURM variables) are in test_ddp.py."""
import os

import pytest
import torch

import rim_fast
from rim_fast import distributed as D


@pytest.mark.parametrize("nodelist,first", [
    ("localhost", "localhost"), ("gpu[03-05,9],cpu1", "gpu03"), ("node-1,node-2", "node-1"),
    ("a[1-2]-b[07-08]", "a1-b07"), ("rack[2,4]", "rack2"), (" n[001-128] ", "n001")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert D.first_host(nodelist) == first


def test_launch_reads_torchrun_then_slurm():
    torchrun = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert D.launch(torchrun) == D.Launch("torchrun", 4, 3, 1, "h", 29500)
    slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[12-13]",
             "SLURM_JOB_ID": "4242137", "SLURM_STEP_ID": "0"}
    assert D.launch(slurm) == D.Launch("slurm", 8, 5, 1, "gpu12", 15000 + 2137)
    assert D.launch({**slurm, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}).master_addr == "10.0.0.1"
    # torchrun inside a SLURM job: torchrun's processes are the ones that train
    assert D.launch({**slurm, **torchrun}).source == "torchrun"
    # one task or nothing: one process
    assert D.launch({**slurm, "SLURM_NTASKS": "1"}).source == "single"
    assert D.launch({}) == D.Launch("single")


def test_slurm_processes_are_the_tasks_of_an_srun_step():
    """Only srun's tasks form a group: a batch script of --ntasks=8 that runs python itself (SLURM_NTASKS=8 and
    SLURM_PROCID=0, no step), salloc's shell and ``srun --pty bash`` train as one process; srun inside an
    allocation named "interactive" (salloc's) starts its tasks as a group, not as processes each rank 0."""
    job = {"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "gpu[12-13]",
           "SLURM_JOB_ID": "4242137"}
    assert D.launch(job).source == "single" and D.slurm_tasks_without_srun(job) == 8
    for step in ("0", "3", " 12 "):
        assert D.launch({**job, "SLURM_STEP_ID": step}).source == "slurm"
    assert D.launch({**job, "SLURM_STEPID": "1"}).source == "slurm"  # the older name
    step = {**job, "SLURM_STEP_ID": "0"}
    assert D.launch({**step, "SLURM_JOB_NAME": "interactive"}) == D.Launch("slurm", 8, 0, 0, "gpu12", 17137)
    assert D.slurm_tasks_without_srun(step) is None
    # the step's own task count (srun -n 2 in an allocation of 8)
    assert D.launch({**step, "SLURM_STEP_NUM_TASKS": "2"}).world_size == 2
    # SLURM's special steps (batch 0xfffffffb, extern, interactive 0xfffffffa)
    for special in ("4294967291", "4294967290", "extern", "batch", ""):
        assert D.launch({**job, "SLURM_STEP_ID": special}).source == "single"
    # srun --pty bash: a step of one task; srun in it starts a step of its own (its tasks inherit SLURM_PTY_PORT)
    assert D.launch({**step, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PTY_PORT": "40123"}).source == "single"
    assert D.launch({**step, "SLURM_STEP_NUM_TASKS": "4", "SLURM_PTY_PORT": "40123"}).world_size == 4
    # torchrun's processes inside a batch script: no warning about srun
    assert D.slurm_tasks_without_srun({**job, "WORLD_SIZE": "4"}) is None
    assert D.slurm_tasks_without_srun({**job, "SLURM_NTASKS": "1"}) is None


def test_fit_warns_when_a_batch_script_of_several_tasks_runs_python_itself(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS",
                 "SLURM_PTY_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    torch.manual_seed(0)
    r = rim_fast.RIM((16,), rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6), score_fn=lambda x, y: y - x,
                     T=2, device="cpu")
    data = torch.utils.data.TensorDataset(torch.randn(2, 1, 16), torch.randn(2, 1, 16))
    with pytest.warns(RuntimeWarning, match=r"SLURM_NTASKS=4, but this process is not a task of an srun step"):
        assert len(r.fit(data, epochs=1, verbose=-1, loss_curve=False)) == 1


def test_each_local_process_takes_its_gpu_when_the_device_is_left_at_its_default():
    two = D.Launch("slurm", 4, 3, local_rank=1)
    cuda, cuda0, cuda1 = torch.device("cuda"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert D.local_device(cuda0, two, cuda_count=2) == cuda1  # rim_fast's default device is cuda:0
    assert D.local_device(cuda, two, cuda_count=4) == cuda1
    assert D.local_device(cuda0, two, cuda_count=1) == cuda0  # srun --gpus-per-task=1: each sees its own GPU
    assert D.local_device(torch.device("cuda", 3), two, cuda_count=4) == torch.device("cuda", 3)  # chosen by hand
    assert D.local_device(torch.device("cpu"), two, cuda_count=4) == torch.device("cpu")
    assert D.local_device(cuda0, D.Launch("single"), cuda_count=4) == cuda0


def test_a_group_formed_without_local_rank_takes_the_gpu_each_process_selected():
    """torch.multiprocessing.spawn and a hand-made init_process_group set no LOCAL_RANK: a process' GPU is the one
    it selected, else its rank modulo the GPUs it sees, never GPU 0 for all (NCCL refuses duplicate GPUs)."""
    assert D.unnamed_local_rank(3, current_cuda=3, cuda_count=4) == 3  # torch.cuda.set_device(rank)
    assert D.unnamed_local_rank(5, current_cuda=0, cuda_count=4) == 1  # nothing selected
    assert D.unnamed_local_rank(0, current_cuda=0, cuda_count=4) == 0
    assert D.unnamed_local_rank(2, current_cuda=0, cuda_count=1) == 0  # one GPU visible per process
    assert D.unnamed_local_rank(1, current_cuda=None, cuda_count=0) == 0


def test_the_default_device_of_one_of_several_processes_is_its_gpu(monkeypatch):
    """Under torchrun (or srun with a GPU per local process) a RIM built with the default device goes to
    cuda:LOCAL_RANK from the start, not to GPU 0 in every process; one process keeps torch_rim's cuda:0."""
    from rim_fast import definitions
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert definitions._default_device() == torch.device("cuda", 0)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert definitions._default_device() == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU visible per process
    assert definitions._default_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "two")
    assert definitions._default_device() == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert definitions._default_device() == torch.device("cpu")


def test_the_process_group_waits_as_long_under_nccl_as_under_gloo(monkeypatch):
    """NCCL's default timeout is 10 minutes (gloo's 30): rank 0's checkpoint writing and hooks, which the other
    ranks wait for at their next collective, get gloo's 30 under either backend."""
    from datetime import timedelta
    calls = []
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kw: calls.append(kw))
    D._init(D.Launch("torchrun", 2, 1, 1, "h", 29500), torch.device("cpu"))
    D._init(D.Launch("slurm", 2, 1, 1, "h", 29500), torch.device("cpu"))
    assert [c["timeout"] for c in calls] == [timedelta(minutes=30)] * 2 and calls[0]["backend"] == "gloo"


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, r"WORLD_SIZE=2 says this is one of several processes, but "
                                                          r"MASTER_ADDR \(or SLURM_JOB_NODELIST\) is not set"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "localhost",
      "SLURM_STEP_ID": "0"},
     r"SLURM_NTASKS=2 says this is one of several processes, but MASTER_PORT \(or SLURM_JOB_ID\) is not set"),
], ids=["torchrun-no-master", "slurm-no-port"])
def test_several_processes_without_a_group_raise_before_touching_the_directory(tmp_path, monkeypatch, env, message):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_PTY_PORT",
                 "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    torch.manual_seed(0)
    r = rim_fast.RIM((16,), rim_fast.Hourglass(1, dimensions=1, nf=4, hidden_units=6), score_fn=lambda x, y: y - x,
                     T=2, device="cpu")
    x = torch.randn(4, 1, 16)
    directory = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match=message):
        r.fit(torch.utils.data.TensorDataset(x, x), epochs=1, checkpoints_directory=directory, verbose=-1)
    assert not os.path.exists(directory)
    assert not torch.distributed.is_initialized()
