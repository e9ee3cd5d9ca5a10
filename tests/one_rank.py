"""A one-process gloo group, as torchrun sets it up for a world of 1, for tests that build real
engines in the test process (DeepSpeed keeps the first group it sees for the process's life).

Importing deepspeed sets PYTORCH_NVML_BASED_CUDA_CHECK for good, and torch's first optimizer step
TORCHINDUCTOR_CACHE_DIR: both happen inside, so a module-scoped fixture that enters this runs them
before the per-test env-leak check watches.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch


@contextmanager
def one_rank_world(engines: bool = True) -> Iterator[None]:
    """The group, for the life of the context. `engines`: DeepSpeed's and Accelerate's engines will be
    built in it, so deepspeed is imported and the first optimizer step taken first; without, neither
    (DeepSpeed would keep this group as its own, and a later module's engines could not use theirs)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "DS_ACCELERATOR": "cpu",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        if engines:
            import accelerate  # noqa: F401
            import deepspeed  # noqa: F401

            w = torch.zeros(1, requires_grad=True)
            w.grad = torch.ones(1)
            torch.optim.AdamW([w]).step()
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            yield
        finally:
            _destroy(engines)


def _destroy(engines: bool) -> None:
    """Destroy the group, through DeepSpeed where it took it as its own: it then lets go of it, and
    the next module's group becomes DeepSpeed's."""
    import torch.distributed as dist

    if engines:
        import deepspeed.comm as ds_comm

        if ds_comm.is_initialized():
            ds_comm.destroy_process_group()
            return
    dist.destroy_process_group()
