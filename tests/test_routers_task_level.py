"""Task-level MoE: one route per task from a learned task embedding, straight-through Gumbel top-1."""

from __future__ import annotations

import math

import torch

import impls
from impls.routers.token_choice.task_level import TaskLevelRouter


def test_every_token_of_a_task_takes_the_same_expert_whatever_the_token():
    torch.manual_seed(0)
    r = TaskLevelRouter(8, 4, num_tasks=3, task_dim=6).train()
    tasks = torch.tensor([0, 1, 2, 1, 0, 2] * 5)
    plan = r(torch.randn(30, 8) * 10, task_ids=tasks)
    for t in range(3):
        assert plan.expert_ids_TK[tasks == t].unique().numel() == 1
    assert (plan.weights_TK == 1).all()  # hard one-hot forward


def test_straight_through_gradient_reaches_the_task_embedding_and_router():
    torch.manual_seed(1)
    r = TaskLevelRouter(8, 4, num_tasks=2, task_dim=6)
    plan = r(torch.randn(10, 8), task_ids=torch.tensor([0, 1] * 5))
    (plan.weights_TK * torch.randn_like(plan.weights_TK)).sum().backward()
    assert r.task_embedding.weight.grad.abs().sum() > 0
    assert r.mlp[0].weight.grad.abs().sum() > 0


def test_eval_takes_the_argmax_of_the_task_logits():
    torch.manual_seed(2)
    r = TaskLevelRouter(8, 4, num_tasks=3, task_dim=6).eval()
    tasks = torch.arange(3)
    plan = r(torch.randn(3, 8), task_ids=tasks)
    logits = r.mlp(r.task_embedding(tasks))
    assert torch.equal(plan.expert_ids_TK[:, 0], logits.argmax(-1))
    assert torch.equal(r(torch.randn(3, 8), task_ids=tasks).expert_ids_TK, plan.expert_ids_TK)


def test_temperature_schedule_and_soft_selection():
    r = TaskLevelRouter(8, 3, num_tasks=2, task_dim=4, selection="softmax")
    assert math.isclose(float(r.temperature), 2.0)
    for _ in range(1000):
        impls.step_routers(r)
    assert math.isclose(float(r.temperature), 2.0 * math.exp(-0.3), rel_tol=1e-5)
    for _ in range(20000):
        r.on_optimizer_step()
    assert math.isclose(float(r.temperature), 0.1, rel_tol=1e-6)  # floor tau_min
    plan = r(torch.randn(4, 8), task_ids=torch.tensor([0, 1, 0, 1]))
    torch.testing.assert_close(plan.weights_TK.sum(-1), torch.ones(4))
    assert plan.expert_ids_TK.shape == (4, 3)
    assert impls.PRESETS["task_level_moe"].num_experts == 3
