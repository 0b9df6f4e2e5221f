"""Expert parallelism on several processes (gloo on 127.0.0.1): ``impls.parallel.ExpertParallel``.

Every rank's output, routing, losses and gradients equal one process running the same layer on
all ranks' tokens concatenated (float32, 1e-5), for several routers, uneven and empty splits, a
rank whose tokens are all padding, both gradient conventions, global and local routing, and every
dispatch policy; router state stays identical on every rank; sharded checkpoints reshard across
world sizes; DistributedDataParallel trains the rest of the model; the benchmark runs under
torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import free_port, run_distributed
from tests.ep_workers import (
    D,
    F,
    built_sharded,
    checkpoint_load,
    checkpoint_save,
    ddp_training,
    equality_many,
    refusals,
)

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
    pytest.mark.timeout(600),
]
REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5
DSV3 = {"router": "deepseek_v3", "options": {"n_group": 4, "topk_group": 2, "k": 2}, "num_experts": 8}


def _specs(world: int) -> dict:
    n = 8 * world
    uneven = [4 * (r + 1) for r in range(world)]
    return {
        "topk": {"router": "topk", "options": {"k": 2}, "sizes": uneven},
        "topk_sum": {"router": "topk", "options": {"k": 2}, "sizes": uneven, "grad_reduction": "sum"},
        "switch_capacity": {
            "router": "switch",
            "options": {"capacity_factor": 1.0},
            "sizes": [8] * world,
            "seq": 4,
            "coefficients": {"load_balance": 0.01, "z_loss": 0.001},
        },
        "switch_capacity_sum": {
            "router": "switch",
            "options": {"capacity_factor": 1.25, "drop_policy": "probability"},
            "sizes": uneven,
            "grad_reduction": "sum",
            "coefficients": {"load_balance": 0.1},
        },
        "switch_base_padding": {
            "router": "switch_base",
            "train": False,
            "sizes": [8] * world,
            "seq": 4,
            "mask": "random",
        },
        "deepseek_v3_bias": {**DSV3, "sizes": uneven, "steps": 3, "lr": 0.05},
        "sinkhorn": {"router": "sinkhorn_balanced", "sizes": uneven},
        "sinkhorn_ot": {"router": "sinkhorn_ot", "options": {"k": 2}, "sizes": [8] * world},
        "expert_choice": {"router": "expert_choice", "sizes": [8] * world},
        "empty_rank": {"router": "topk", "options": {"k": 2}, "sizes": [0] + [8] * (world - 1)},
        "all_padding_rank": {
            "router": "topk",
            "options": {"k": 2},
            "sizes": [8] * world,
            "mask": "rank1_all_masked",
        },
        "nothing_received": {
            "router": "switch",
            "options": {"router_bias": True},
            "sizes": [6] * world,
            "hot_expert": 0,
            "hot_strength": 50.0,
        },
        "local_topk": {"router": "topk", "options": {"k": 2}, "sizes": uneven, "routing": "local"},
        "quantile_state": {
            "router": "quantile_balancing",
            "options": {"k": 2},
            "sizes": [n] * world,
            "steps": 3,
        },
        "bip_state": {"router": "bip_balancing", "sizes": [n] * world, "steps": 2},
    }


def _policy_specs(world: int) -> dict:
    hot = {
        "router": "topk",
        "options": {"k": 2, "router_bias": True},
        "sizes": [24] * world,
        "hot_expert": 0,
        "hot_strength": 2.0,
    }
    return {
        "llep": {**hot, "policy": "llep", "policy_options": {"min_chunk": 1}},
        "llep_sum": {**hot, "policy": "llep", "policy_options": {"min_chunk": 1}, "grad_reduction": "sum"},
        "finemoe": {**hot, "policy": "finemoe"},
        "relibra": {
            **hot,
            "policy": "relibra",
            "policy_options": {"ranks_per_node": 2},
            "plan_placement": [400, 5, 4, 3, 300, 2, 2, 1],
        },
        "llep_dsv3_capacity": {
            **DSV3,
            "options": {**DSV3["options"], "capacity_factor": 1.5, "router_bias": True},
            "sizes": [16] * world,
            "hot_expert": 1,
            "policy": "llep",
            "policy_options": {"min_chunk": 1},
            "steps": 2,
            "lr": 0.05,
        },
    }


def _check(results: list[dict], names) -> None:
    bad = {}
    for name in names:
        for rank, res in enumerate(results):
            worst = {k: v for k, v in res[name]["errors"].items() if not v <= TOL}
            if worst:
                bad[f"{name}@rank{rank}"] = worst
    assert not bad, bad


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_one_process(world):
    specs = _specs(world)
    results = run_distributed(equality_many, world, specs, timeout=400)
    _check(results, specs)
    # the hot-expert case really leaves ranks without rows to compute
    assert any(load == 0 for load in results[0]["nothing_received"]["load"])
    # stateful routers: identical state on every rank (and equal to one process: checked above)
    for name in ("deepseek_v3_bias", "quantile_state", "bip_state"):
        states = [r[name]["router_state"] for r in results]
        assert states[0], name
        for s in states[1:]:
            assert all(torch.equal(s[k], states[0][k]) for k in states[0]), name


@pytest.mark.parametrize("world", [2, 4])
def test_balancing_policies_move_work_and_keep_the_result(world):
    specs = _policy_specs(world)
    results = run_distributed(equality_many, world, specs, timeout=400)
    _check(results, specs)
    for name in specs:
        assert results[0][name]["transfers"], f"{name} moved no work: the case does not exercise it"


def test_realb_switches_the_hot_rank_to_nvfp4_only():
    spec = {
        "router": "topk",
        "options": {"k": 2, "router_bias": True},
        "train": False,
        "sizes": [32, 32],
        "hot_expert": 0,
        "hot_strength": 2.0,
        "policy": "realb",
        "policy_options": {"batch_threshold": 0},
    }
    results = run_distributed(equality_many, 2, {"realb": spec})
    low = results[0]["realb"]["low_precision"]
    assert low == [True, False]
    errs = [r["realb"]["errors"] for r in results]
    # tokens whose rows all stay on the exact rank are exact; the hot rank's experts are quantized
    assert errs[0]["routing"] == 0 and errs[1]["routing"] == 0
    assert 1e-4 < max(e["output"] for e in errs) < 0.5


def test_sharded_checkpoints_reshard_across_world_sizes():
    from impls import MoELayer

    with tempfile.TemporaryDirectory() as d2, tempfile.TemporaryDirectory() as d4:
        full = run_distributed(checkpoint_save, 2, d2, DSV3)[0]
        for res in run_distributed(checkpoint_load, 4, d2, {**DSV3, "full": full}):
            assert max(res.values()) == 0.0, res
        full4 = run_distributed(checkpoint_save, 4, d4, {**DSV3, "seed": 3})[0]
        for res in run_distributed(checkpoint_load, 2, d4, {**DSV3, "seed": 3, "full": full4}):
            assert max(res.values()) == 0.0, res
        # and into a full layer on one process, without torch.distributed
        import torch.distributed.checkpoint as dcp

        layer = MoELayer(D, F, 8, DSV3["router"], **DSV3["options"])
        sd = layer.state_dict()
        dcp.load(sd, checkpoint_id=d2, no_dist=True)
        layer.load_state_dict(sd)
        for k, v in layer.state_dict().items():
            torch.testing.assert_close(v, full[k], rtol=0, atol=0)


@pytest.mark.parametrize("world", [2, 4])
def test_built_sharded_equals_its_full_layer_on_any_world_size(world):
    spec = {**DSV3, "seed": 5}
    for errs in run_distributed(built_sharded, world, spec):
        assert max(errs.values()) <= TOL, errs


def test_data_parallel_trains_like_one_process():
    spec = {"router": "switch", "coefficients": {"load_balance": 0.01}, "steps": 3}
    results = run_distributed(ddp_training, 2, spec)
    for res in results:
        assert max(res["errors"].values()) <= TOL, res["errors"]
    assert results[0]["losses"] == results[1]["losses"]


def test_bad_set_ups_are_refused_on_every_rank():
    for msgs in run_distributed(refusals, 2):
        assert "num_experts divisible by the world size" in msgs["indivisible"]
        assert "cannot shard" in msgs["soft_moe"]
        assert "routing must be" in msgs["routing"]
        assert "different sequence lengths" in msgs["seq"]
        assert "token_modality" in msgs["modality"]


def test_needs_an_initialized_process_group():
    from impls import MoELayer
    from impls.parallel import ExpertParallel

    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallel(MoELayer(D, F, 4, "topk"))


def test_benchmark_runs_under_torchrun(tmp_path):
    out = tmp_path / "ep.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(REPO / "scripts" / "bench_ep.py"),
        "--tokens",
        "64",
        "--d-model",
        "16",
        "--d-hidden",
        "32",
        "--experts",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--policies",
        "standard,llep",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["provenance"]["script"] == "scripts/bench_ep.py"
    (run,) = data["runs"]
    assert run["world_size"] == 2 and run["launcher"] == "torchrun"
    rows = {r["policy"]: r for r in run["results"]}
    assert set(rows) == {"standard", "llep"}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["bytes_per_step"] >= 0 and r["max_load"] >= r["mean_load"]


def _cuda_specs(world: int) -> dict:
    specs = _specs(world)
    keep = ("topk", "switch_capacity", "deepseek_v3_bias", "sinkhorn", "expert_choice", "empty_rank")
    out = {k: {**specs[k], "device": "cuda"} for k in keep}
    out.update({f"{k}_cuda": {**v, "device": "cuda"} for k, v in _policy_specs(world).items()})
    return out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_nccl_single_rank_equals_the_layer():
    """On one GPU: the NCCL code path (CUDA tensors in every exchange) against the plain layer."""
    specs = {k: v for k, v in _cuda_specs(1).items() if "policy" not in v}
    _check(run_distributed(equality_many, 1, specs, backend="nccl", timeout=400), specs)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL expert parallelism needs 2 CUDA devices")
def test_nccl_expert_parallel_equals_one_process():
    specs = _cuda_specs(2)
    _check(run_distributed(equality_many, 2, specs, backend="nccl", timeout=400), specs)
