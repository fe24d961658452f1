"""The data side of ``fit``: the training and validation DataLoaders, their checks, and moving batches.

``fit`` takes a map-style ``Dataset`` of ``(y, x_true, *args)`` tuples, for which it builds the DataLoader
(``num_workers``, ``pin_memory``, ``persistent_workers``, ``prefetch_factor``, ``collate_fn``, ``drop_last``,
``multiprocessing_context``; a ``DistributedSampler`` under DDP), or a ``DataLoader`` of the user's, taken as it
is. Under DDP a user's training DataLoader must carry a per-process sampler (a ``DistributedSampler``, or any
sampler with ``num_replicas`` and ``rank`` attributes matching the process group). Validation under DDP is
sharded with ``ShardSampler`` (every sample exactly once, no padding), a user's validation DataLoader rebuilt over
its dataset with its batch size, workers (and their start method), collate_fn and pinning.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .fit_config import FitConfig
from .validation import warn

_log = logging.getLogger("rim_fast")

__all__ = ["ShardSampler", "is_loader", "check_length", "train_loader", "val_loader", "per_process_sampler",
           "fresh_iter", "to_device", "check_batch", "check_batch_finite", "check_val_items"]


class ShardSampler(Sampler):
    """Rank ``rank`` of ``world``: indices rank, rank + world, ... of range(n), each sample on exactly one rank
    (unlike DistributedSampler, no sample is repeated to even the shards)."""

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def is_loader(value) -> bool:
    return isinstance(value, DataLoader)


def check_length(dataset, name: str) -> int:
    try:
        n = len(dataset)
    except TypeError:
        raise ValueError(f"{name} must be a map-style dataset (with __len__) of (y, x_true, *args) tuples, or a "
                         f"DataLoader, got {type(dataset).__name__}") from None
    if n == 0:
        raise ValueError(f"{name} is empty")
    return n


def per_process_sampler(loader: DataLoader):
    """The loader's sampler when it gives each process its own part (a DistributedSampler or one with
    ``num_replicas`` and ``rank``), else None."""
    inner = getattr(loader.batch_sampler, "sampler", None)
    for sampler in (inner, loader.sampler):
        if sampler is not None and hasattr(sampler, "num_replicas") and hasattr(sampler, "rank"):
            return sampler
    return None


def _epoch_sampler(loader: DataLoader):
    """The sampler whose ``set_epoch`` fit calls each epoch (None when it has none)."""
    inner = getattr(loader.batch_sampler, "sampler", None)
    for sampler in (loader.batch_sampler, inner, loader.sampler):
        if sampler is not None and callable(getattr(sampler, "set_epoch", None)):
            return sampler
    return None


def _pinned(config: FitConfig, device: torch.device, dataset=None, name: str = "dataset") -> bool:
    """Whether fit's DataLoader pins its batches: by default on a GPU, unless ``dataset`` yields tensors that are
    not on the CPU already (a dataset kept on the GPU: only CPU tensors can be pinned)."""
    if device.type != "cuda":
        if config.pin_memory:
            _log.info("pin_memory=True: the RIM runs on %s, batches are not pinned (pinning serves copies to a GPU)",
                      device)
        return False
    elsewhere = _off_cpu(_first_item(dataset)) if dataset is not None else None
    if elsewhere is not None:
        if config.pin_memory:
            raise ValueError(f"pin_memory=True, but {name} yields tensors on {elsewhere} (only CPU tensors can be "
                             f"pinned): leave pin_memory out")
        return False
    return True if config.pin_memory is None else config.pin_memory


def _off_cpu(item) -> Optional[torch.device]:
    """The device of the first tensor of a sample that is not on the CPU, else None."""
    from torch.utils._pytree import tree_flatten
    for leaf in tree_flatten(item)[0] if item is not None else ():
        if isinstance(leaf, torch.Tensor) and leaf.device.type != "cpu":
            return leaf.device
    return None


def _check_user_loader(loader: DataLoader, config: FitConfig, group, name: str) -> None:
    given = config.loader_options_given()
    if given:
        raise ValueError(f"{', '.join(given)}: options of the DataLoader fit builds from a dataset; {name} is a "
                         f"DataLoader of yours, set them on it")
    if config.batch_size != 1 and loader.batch_size is not None and config.batch_size != loader.batch_size:
        raise ValueError(f"batch_size={config.batch_size} but the DataLoader given as {name} has batch_size="
                         f"{loader.batch_size}; with a DataLoader, fit takes its batches (leave batch_size out)")
    if config.accumulate_grad_batches > 1 and loader.batch_size is None:
        warn(f"accumulate_grad_batches={config.accumulate_grad_batches} with a DataLoader ({name}) that has "
             f"no fixed batch_size (a batch_sampler): each batch's mean loss counts equally in the accumulated "
             f"step, which equals one larger batch only when the batches have equal sizes")
    if group.on:
        sampler = per_process_sampler(loader)
        if sampler is None:
            raise ValueError(f"{name}: under DDP ({group.world} processes) a DataLoader must carry a "
                             f"DistributedSampler (or a sampler with num_replicas and rank), else every process "
                             f"trains on every sample; got a {type(loader.sampler).__name__}. Pass the dataset "
                             f"instead and fit shards it")
        if (sampler.num_replicas, sampler.rank) != (group.world, group.rank):
            raise ValueError(f"{name}: its sampler has num_replicas={sampler.num_replicas}, rank={sampler.rank}, but "
                             f"this process is rank {group.rank} of {group.world}")


def train_loader(dataset, config: FitConfig, group, device: torch.device, sampler_seed: Optional[int]) -> tuple:
    """(loader, sampler to call set_epoch on or None, batches pinned, batches per epoch or None when unknown)."""
    if is_loader(dataset):
        _check_user_loader(dataset, config, group, "dataset")
        try:
            n = len(dataset)
        except TypeError:
            n = None
            if config.n_iterations_in_epoch is None:
                raise ValueError("dataset: a DataLoader without a length (an IterableDataset) needs "
                                 "n_iterations_in_epoch") from None
        return dataset, _epoch_sampler(dataset), bool(dataset.pin_memory) and device.type == "cuda", n
    check_length(dataset, "dataset")
    pinned = _pinned(config, device, dataset, "dataset")
    kwargs = _worker_options(config, pinned)
    if group.on:
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(dataset, num_replicas=group.world, rank=group.rank, shuffle=config.shuffle,
                                     seed=sampler_seed, drop_last=False)
        loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, drop_last=config.drop_last,
                            **kwargs)
    else:
        sampler = None
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=config.shuffle,
                            drop_last=config.drop_last, **kwargs)
    n = len(loader)
    if n == 0:
        raise ValueError(f"drop_last=True leaves no batch: {len(dataset)} samples "
                         f"{'per process ' if group.on else ''}< batch_size={config.batch_size}")
    return loader, sampler, pinned, n


def _worker_options(config: FitConfig, pinned: bool) -> dict:
    kwargs = dict(num_workers=config.num_workers, pin_memory=pinned)
    if config.collate_fn is not None:
        kwargs["collate_fn"] = config.collate_fn
    if config.num_workers > 0:
        kwargs["persistent_workers"] = config.persistent_workers
        if config.prefetch_factor is not None:
            kwargs["prefetch_factor"] = config.prefetch_factor
        if config.multiprocessing_context is not None:
            kwargs["multiprocessing_context"] = config.multiprocessing_context
    return kwargs


def val_loader(val, config: FitConfig, group, device: torch.device) -> tuple:
    """(loader, pinned) for ``val_dataset``: under DDP each rank gets its own samples, each exactly once."""
    if is_loader(val):
        if not group.on:
            return val, bool(val.pin_memory) and device.type == "cuda"
        if val.batch_size is None:
            raise ValueError("val_dataset: under DDP fit shards a validation DataLoader's dataset itself (each sample "
                             "exactly once), which needs its batch_size; this one has a batch_sampler. Pass the "
                             "dataset (and val_batch_size)")
        check_length(val.dataset, "val_dataset")
        kwargs = dict(num_workers=val.num_workers, pin_memory=val.pin_memory, collate_fn=val.collate_fn)
        if val.num_workers > 0:
            kwargs.update(persistent_workers=val.persistent_workers, prefetch_factor=val.prefetch_factor,
                          multiprocessing_context=val.multiprocessing_context)
        return (DataLoader(val.dataset, batch_size=val.batch_size, sampler=ShardSampler(len(val.dataset), group.rank,
                                                                                       group.world), **kwargs),
                bool(val.pin_memory) and device.type == "cuda")
    n = check_length(val, "val_dataset")
    pinned = _pinned(config, device, val, "val_dataset")
    sampler = ShardSampler(n, group.rank, group.world) if group.on else None
    loader = DataLoader(val, batch_size=config.val_batch_size or config.batch_size, sampler=sampler, shuffle=False,
                        drop_last=False, **_worker_options(config, pinned))
    return loader, pinned


def fresh_iter(loader):
    """``iter(loader)``, drawing from the RNG as a new iterator does even when persistent workers reuse theirs: the
    shuffling order then depends on the seed and the epoch alone, the same with or without (persistent) workers
    and after a resume. (The workers' own RNGs, for random augmentations, continue in persistent workers: resume
    them exactly with persistent_workers=False.)"""
    if loader.persistent_workers and loader.num_workers > 0 and getattr(loader, "_iterator", None) is not None:
        torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
    return iter(loader)


def to_device(value, device: torch.device, non_blocking: bool):
    """A batch element on the RIM's device (``non_blocking`` only for pinned batches: from pageable memory CUDA
    stages the copy through a pinned buffer before returning, so it would overlap nothing)."""
    return value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value


def check_batch(batch, index: int, name: str = "dataset") -> None:
    who = "the dataset" if name == "dataset" else name
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError(f"{who} must yield tuples (y, x_true, *args) (args go to the score function); batch "
                         f"{index} is a {type(batch).__name__}"
                         f"{' of length ' + str(len(batch)) if isinstance(batch, (list, tuple)) else ''}")
    for part, value in (("y", batch[0]), ("x_true", batch[1])):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{who} must yield tuples (y, x_true, *args) of tensors; {part} of batch {index} is "
                            f"a {type(value).__name__}")


def _all_finite(value: torch.Tensor) -> bool:
    """Whether every element is finite: the sum is NaN or inf when one is (one pass, no mask: several times faster
    than ``isfinite(value).all()`` on the CPU); a sum that overflowed from finite values takes the exact check."""
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())


def check_batch_finite(y, x_true, mode: str, given, index: int) -> None:
    for part, value in (("y", y), ("x_true", x_true)):
        if (value.is_floating_point() or value.is_complex()) and not _all_finite(value):
            message = (f"{part} of batch {index} contains NaN or inf (fit's check_finite={given!r}; "
                       f"check_finite=False trains on it anyway)")
            if mode == "warn":
                warn(message)
            else:
                raise ValueError(message)


def _first_item(data):
    dataset = data.dataset if is_loader(data) else data
    if not isinstance(dataset, Dataset) and not hasattr(dataset, "__getitem__"):
        return None
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return None
    try:
        if len(dataset) == 0:
            return None
    except TypeError:
        return None
    return dataset[0]


def _shape(value) -> Optional[tuple]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def check_val_items(val, train, rim) -> None:
    """The first validation item against the RIM and the first training item: a (y, x_true, *args) tuple of the
    training data's arity, x_true of shape [C, *dimensions], y and args of the training data's shapes. Checked
    before training starts, so that a mistake is not found after the first epoch."""
    item = _first_item(val)
    if item is None:
        return
    if not isinstance(item, (list, tuple)) or len(item) < 2:
        raise ValueError(f"val_dataset must yield tuples (y, x_true, *args); item 0 is a {type(item).__name__}"
                         f"{' of length ' + str(len(item)) if isinstance(item, (list, tuple)) else ''}")
    for part, value in (("y", item[0]), ("x_true", item[1])):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"val_dataset must yield tuples (y, x_true, *args) of tensors; {part} of item 0 is a "
                            f"{type(value).__name__}")
    expected = (rim.C, *rim.dimensions)
    shape = tuple(item[1].shape)
    if len(shape) != len(expected) or any(a != b and a != 1 for a, b in zip(shape, expected)):
        raise ValueError(f"val_dataset: x_true of item 0 has shape {shape}; the RIM's x is [C, *dimensions] = "
                         f"{expected} per sample")
    reference = _first_item(train)
    if not isinstance(reference, (list, tuple)):
        return
    if len(item) != len(reference):
        raise ValueError(f"val_dataset yields tuples of {len(item)} (y, x_true and {len(item) - 2} score-function "
                         f"arguments) but the training data yields {len(reference)}")
    names = ["y", "x_true"] + [f"args[{i}]" for i in range(len(item) - 2)]
    for part, a, b in zip(names, item, reference):
        if _shape(a) != _shape(b):
            raise ValueError(f"val_dataset: {part} of item 0 has shape {_shape(a)}, the training data's has "
                             f"{_shape(b)}")
