import torch

DTYPE = torch.float32


def _default_device() -> torch.device:
    """torch_rim's default, ``cuda:0`` (else the CPU), except in one of several processes started by torchrun or
    srun with a GPU per local process: that process' GPU, ``cuda:LOCAL_RANK`` (``distributed.local_device``), so
    that building a RIM does not put every process' context and weights on GPU 0 before ``fit`` moves them."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from .distributed import launch, local_device
    try:
        return local_device(torch.device("cuda", 0), launch(), torch.cuda.device_count())
    except ValueError:  # a malformed launch variable: fit names it
        return torch.device("cuda", 0)


DEVICE = _default_device()
