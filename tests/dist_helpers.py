"""Run a function on ``W`` local processes over gloo (127.0.0.1, a free port, bounded timeouts).

``run_distributed(fn, world_size, *args)`` spawns the processes, initializes the default process
group in each, calls ``fn(rank, world_size, *args)`` and returns every rank's result (anything
``torch.save`` can write), rank order. A process that fails makes the call raise with its
traceback; one that hangs is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, args, out_dir, collective_timeout, backend):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=collective_timeout),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn, world_size: int, *args, timeout: float = 180, collective_timeout: float = 60, backend: str = "gloo"
):
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), args, out, collective_timeout, backend),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world_size} processes ran past {timeout} s")
        except mp.ProcessRaisedException as exc:
            errs = sorted(Path(out).glob("*.err"))
            detail = "\n".join(e.read_text() for e in errs) or str(exc)
            raise RuntimeError(f"{fn.__name__} failed on {world_size} processes:\n{detail}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(Path(out) / f"{r}.pt", weights_only=False) for r in range(world_size)]
