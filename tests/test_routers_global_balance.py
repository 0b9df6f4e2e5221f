"""Global-batch balance loss (Qiu et al. 2025; Qwen3-MoE): expert fractions counted over the micro-batches
of a step (and across ranks), router probabilities local; a 2-process gloo run gives every rank the
loss of the pooled counts."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import impls


def test_fractions_pool_the_micro_batches_of_a_step():
    torch.manual_seed(0)
    r = impls.build_router("topk", d_model=8, num_experts=4, k=1, normalize=False, global_balance=True)
    a, b = torch.randn(6, 8) + 2.0, torch.randn(6, 8) - 2.0  # two "domains"
    pa = r(a)
    pb = r(b)
    counts = torch.bincount(torch.cat([pa.expert_ids_TK, pb.expert_ids_TK]).flatten(), minlength=4).float()
    f = counts / counts.sum()
    torch.testing.assert_close(pb.losses["global_load_balance"], 4 * (f * pb.scores_TE.mean(0)).sum())
    # the micro-batch loss uses the batch's own fractions
    fb = torch.bincount(pb.expert_ids_TK.flatten(), minlength=4).float() / 6
    torch.testing.assert_close(pb.losses["load_balance"], 4 * (fb * pb.scores_TE.mean(0)).sum())
    impls.step_routers(r)
    assert float(r.global_counts.sum()) == 0.0
    pe = r.eval()(a)  # evaluation: the batch's own counts, nothing accumulated
    torch.testing.assert_close(pe.losses["global_load_balance"], pe.losses["load_balance"])
    assert float(r.global_counts.sum()) == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60)
    )
    try:
        torch.manual_seed(0)
        r = impls.build_router("topk", d_model=8, num_experts=4, k=1, normalize=False, global_balance=True)
        r.balance_group = dist.group.WORLD
        x = torch.randn(2, 6, 8)[rank] + (2.0 if rank == 0 else -2.0)
        plan = r(x)
        ids = [torch.zeros_like(plan.expert_ids_TK) for _ in range(world)]
        dist.all_gather(ids, plan.expert_ids_TK)
        out[rank] = (
            plan.losses["global_load_balance"].item(),
            torch.cat(ids).tolist(),
            plan.scores_TE.mean(0).tolist(),
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_the_pooled_fractions():
    port = _free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(2, port, out), nprocs=2, join=True, start_method="spawn")
        results = dict(out)
    for rank in (0, 1):
        loss, all_ids, P = results[rank]
        counts = torch.bincount(torch.tensor(all_ids).flatten(), minlength=4).float()
        expected = 4 * (counts / counts.sum() * torch.tensor(P)).sum()
        assert abs(loss - float(expected)) < 1e-6
