"""The process group as ``fit`` sees it: launched by torchrun, by SLURM's srun, initialised by the user, or one
process.

``launch()`` reads the environment: torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (with ``MASTER_ADDR`` and
``MASTER_PORT``), else, in a task srun started (``srun python train.py``; ``srun_task``), SLURM's
``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``)/``SLURM_PROCID``/``SLURM_LOCALID``: the master address is
``MASTER_ADDR`` when set, else the first host of ``SLURM_JOB_NODELIST`` (``SLURM_NODELIST``); the port
``MASTER_PORT`` when set, else 15000 + the last four digits of ``SLURM_JOB_ID`` (Lightning's rule, so that two jobs
sharing a node do not collide). ``setup(rim)`` then forms the group (NCCL for a CUDA RIM, gloo
otherwise) and, when the RIM's device is left at its default under several processes, moves each process' RIM to
``cuda:LOCAL_RANK``. When several processes are detected but no group can be formed, it raises: never several
processes each training, and writing one checkpoints directory, as rank 0.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from .validation import warn

_log = logging.getLogger("rim_fast")

__all__ = ["Launch", "Group", "launch", "first_host", "local_device", "setup", "srun_task",
           "slurm_tasks_without_srun"]


@dataclass(frozen=True)
class Launch:
    """How this process was started: ``source`` is "torchrun", "slurm", "process_group" (the user initialised
    one) or "single"."""
    source: str
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None

    @property
    def several(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[03-05,9],cpu1"`` -> ``"gpu03"``; ``"a[1-2]-b[07-08]"`` ->
    ``"a1-b07"``."""
    nodelist = nodelist.strip()
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first)


def _int(environ: Mapping[str, str], name: str) -> Optional[int]:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def launch(environ: Mapping[str, str] = os.environ) -> Launch:
    """What the environment says about the processes of this run (see the module docstring)."""
    if dist.is_available() and dist.is_initialized():
        return Launch("process_group", dist.get_world_size(), dist.get_rank(),
                      _int(environ, "LOCAL_RANK") or _int(environ, "SLURM_LOCALID") or 0)
    world = _int(environ, "WORLD_SIZE")
    if world is not None and world > 1:
        return Launch("torchrun", world, _int(environ, "RANK") or 0, _int(environ, "LOCAL_RANK") or 0,
                      environ.get("MASTER_ADDR"), _int(environ, "MASTER_PORT"))
    ntasks = _int(environ, "SLURM_STEP_NUM_TASKS") or _int(environ, "SLURM_NTASKS")
    procid = _int(environ, "SLURM_PROCID")
    if ntasks is not None and ntasks > 1 and procid is not None and srun_task(environ):
        addr = environ.get("MASTER_ADDR")
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if not addr and nodelist:
            addr = first_host(nodelist)
        port = _int(environ, "MASTER_PORT")
        job = environ.get("SLURM_JOB_ID", "")
        if port is None and job.isdigit():
            port = 15000 + int(job[-4:])
        return Launch("slurm", ntasks, procid, _int(environ, "SLURM_LOCALID") or 0, addr or None, port)
    return Launch("single")


#: step ids from this one up are SLURM's special steps (batch script, extern, interactive, pending), not srun's
_LAST_STEP_ID = 0xFFFFFFF0


def srun_task(environ: Mapping[str, str]) -> bool:
    """Whether this process is one of the tasks of an srun step: its step has an id (``SLURM_STEP_ID``, or
    ``SLURM_STEPID``), which a batch script that runs python itself has not (it sees the job's ``SLURM_NTASKS``
    and ``SLURM_PROCID=0``), nor salloc's shell (or it has a special one: an interactive step). ``srun --pty
    bash`` is a step of one task. (The job's name, Lightning's test of an interactive allocation, names the
    allocation, not the step: ``srun -n 4 python train.py`` in salloc's "interactive" job starts four processes
    that form one group.)"""
    step = environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID")
    return step is not None and step.strip().isdigit() and int(step) < _LAST_STEP_ID


def slurm_tasks_without_srun(environ: Mapping[str, str] = os.environ) -> Optional[int]:
    """The job's ``SLURM_NTASKS`` when it is more than one but this process is not an srun task (``python
    train.py`` in a batch script of ``--ntasks=4``): it trains alone, which its user may not have meant."""
    ntasks = _int(environ, "SLURM_NTASKS")
    if ntasks is not None and ntasks > 1 and not srun_task(environ) and _int(environ, "WORLD_SIZE") is None:
        return ntasks
    return None


def local_device(device: torch.device, launch: Launch, cuda_count: int) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` when several processes run and the RIM's device is the
    default (``cuda`` or ``cuda:0``) and the node shows a GPU per local process; the device unchanged otherwise
    (one process, a CPU RIM, an explicit other GPU, or one visible GPU per process as with
    ``srun --gpus-per-task=1``)."""
    if not launch.several or device.type != "cuda":
        return device
    if device.index not in (None, 0):
        return device
    if cuda_count > launch.local_rank and cuda_count > 1:
        return torch.device("cuda", launch.local_rank)
    return torch.device("cuda", 0)


class Group:
    """The process group of a run: rank, world size, and the collectives fit needs (no-ops for one process)."""

    def __init__(self, device: torch.device, launch: Launch, created: bool = False):
        self.device = device
        self.launch = launch
        self.created = created
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.local_rank = launch.local_rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.on:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.on:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_tensors(self, tensors) -> None:
        """Rank 0's values of these tensors, in place, on every rank."""
        if self.on:
            for tensor in tensors:
                dist.broadcast(tensor, src=0)

    def gather(self, value) -> list:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if not self.on:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.on:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


#: how long a collective waits for the other processes: gloo's default, 30 minutes, for NCCL too (whose default is
#: 10): rank 0 alone writes the checkpoints (a slow shared filesystem) and runs the on_checkpoint and on_epoch_end
#: hooks (an upload) while the others wait at the next collective, and NCCL's watchdog ends a process that waits
#: longer
TIMEOUT = timedelta(minutes=30)


def _init(launch: Launch, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    where = ("torchrun's WORLD_SIZE" if launch.source == "torchrun"
             else "SLURM_STEP_NUM_TASKS" if os.environ.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS")
    if not dist.is_available():
        raise RuntimeError(f"{where}={launch.world_size} says this is one of several processes, but this torch has "
                           f"no torch.distributed: training would run {launch.world_size} times as rank 0")
    if not launch.master_addr or launch.master_port is None:
        missing = "MASTER_ADDR (or SLURM_JOB_NODELIST)" if not launch.master_addr else "MASTER_PORT (or SLURM_JOB_ID)"
        raise RuntimeError(f"{where}={launch.world_size} says this is one of several processes, but {missing} is not "
                           f"set, so no process group can be formed; launch with torchrun or srun, or set "
                           f"MASTER_ADDR and MASTER_PORT")
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if launch.source == "torchrun":
            dist.init_process_group(backend=backend, timeout=TIMEOUT)
        else:
            dist.init_process_group(backend=backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                    rank=launch.rank, world_size=launch.world_size, timeout=TIMEOUT)
    except Exception as e:  # noqa: BLE001 - rendezvous failures come as many types
        raise RuntimeError(f"{where}={launch.world_size}: the process group could not be formed at "
                           f"{launch.master_addr}:{launch.master_port} as rank {launch.rank} "
                           f"({type(e).__name__}: {e})") from e


def unnamed_local_rank(rank: int, current_cuda: Optional[int], cuda_count: int) -> int:
    """The local rank of a process in a group its caller formed without saying it (no ``LOCAL_RANK`` nor
    ``SLURM_LOCALID``, as with ``torch.multiprocessing.spawn``): the GPU the process selected
    (``torch.cuda.set_device``) where it selected one other than 0, else ``rank`` modulo the GPUs it sees (every
    process on GPU 0 would make NCCL fail)."""
    if current_cuda not in (None, 0):
        return current_cuda
    return rank % cuda_count if cuda_count > 1 else 0


def setup(rim) -> Group:
    """Form (or join) the process group of a ``fit`` call, placing the RIM on this process' GPU first. Raises
    when several processes are detected but no group can be formed."""
    found = launch()
    device = rim.device
    if (found.source == "process_group" and device.type == "cuda" and _int(os.environ, "LOCAL_RANK") is None
            and _int(os.environ, "SLURM_LOCALID") is None):
        found = replace(found, local_rank=unnamed_local_rank(found.rank, torch.cuda.current_device(),
                                                             torch.cuda.device_count()))
    if found.several:
        chosen = local_device(device, found, torch.cuda.device_count() if torch.cuda.is_available() else 0)
        if chosen != device:
            _log.info("rank %d: RIM moved from %s to %s (local rank %d)", found.rank, device, chosen,
                      found.local_rank)
            rim.to(chosen)
            device = rim.device = chosen
        elif (device.type == "cuda" and device.index is not None and device.index != found.local_rank
              and torch.cuda.device_count() > 1):
            warn(f"RIM.device is {device} on local rank {found.local_rank}: processes may share one GPU; "
                 f"build the RIM with device=f'cuda:{{local_rank}}' (or leave the device at its default)")
    alone = slurm_tasks_without_srun() if found.source == "single" else None
    if alone is not None:
        warn(f"SLURM_NTASKS={alone}, but this process is not a task of an srun step "
             f"(SLURM_STEP_ID unset or special): it trains alone; `srun python train.py` starts one process per "
             f"task")
    created = False
    if found.source in ("torchrun", "slurm"):
        _init(found, device)
        created = True
    elif found.several and device.type == "cuda" and device.index is not None:
        # a group the caller formed: NCCL's collectives (barrier, broadcast_object_list) and the pin-memory thread
        # work on the current device, which must be this process' GPU
        torch.cuda.set_device(device)
    return Group(device, found, created)
