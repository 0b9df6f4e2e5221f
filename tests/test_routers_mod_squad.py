"""Mod-Squad: task-specific routers and the task-expert mutual-information loss, hand-checked."""

from __future__ import annotations

import math

import pytest
import torch

import impls
from impls.routers.token_choice.mod_squad import ModSquadRouter, task_expert_mutual_information


def test_mutual_information_of_hand_made_joints():
    # each task's tokens all go to their own expert: I(T; E) = H(T) = log 2
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    tasks = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(task_expert_mutual_information(probs, tasks, 2), torch.tensor(math.log(2)))
    # both tasks route identically: independent, I = 0
    same = torch.tensor([[0.7, 0.3]] * 4)
    torch.testing.assert_close(task_expert_mutual_information(same, tasks, 2), torch.tensor(0.0))
    # a half-way case computed by hand: P(t, e) = [[0.375, 0.125], [0.125, 0.375]]
    mixed = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.25, 0.75], [0.25, 0.75]])
    j = torch.tensor([[0.375, 0.125], [0.125, 0.375]])
    expected = (j * torch.log(j / 0.25)).sum()
    torch.testing.assert_close(task_expert_mutual_information(mixed, tasks, 2), expected)
    # padding takes no part
    mask = torch.tensor([True, True, True, True, False])
    padded = torch.cat([mixed, torch.tensor([[1.0, 0.0]])])
    got = task_expert_mutual_information(padded, torch.tensor([0, 0, 1, 1, 1]), 2, mask)
    torch.testing.assert_close(got, expected)


def test_each_task_routes_with_its_own_gate():
    torch.manual_seed(0)
    r = ModSquadRouter(6, 4, num_tasks=2, k=2, zero_init=False)
    x = torch.randn(10, 6)
    tasks = torch.tensor([0, 1] * 5)
    plan = r(x, task_ids=tasks)
    for t in (0, 1):
        probs = torch.softmax(x[tasks == t] @ r.task_gates[t].T, -1)
        w, ids = probs.topk(2)
        assert torch.equal(plan.expert_ids_TK[tasks == t], ids)
        torch.testing.assert_close(plan.weights_TK[tasks == t], w)  # raw probabilities
    torch.testing.assert_close(
        plan.losses["mutual_information"], -task_expert_mutual_information(plan.scores_TE, tasks, 2)
    )


def test_minimizing_the_loss_separates_the_tasks_experts():
    torch.manual_seed(0)
    # (a zero start is a stationary point of the MI: every task routes alike, and by symmetry the
    # gradient vanishes; in a model the task loss breaks the tie, here a random start does)
    r = ModSquadRouter(8, 4, num_tasks=2, k=1, zero_init=False)
    opt = torch.optim.Adam(r.parameters(), lr=0.05)
    x = torch.randn(64, 8)
    tasks = torch.arange(64) % 2
    start = -float(r(x, task_ids=tasks).losses["mutual_information"].detach())
    for _ in range(100):
        loss = r(x, task_ids=tasks).losses["mutual_information"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    plan = r(x, task_ids=tasks)
    end = -float(plan.losses["mutual_information"].detach())
    assert start < 0.1 and end > 0.6 * math.log(2)
    e0 = set(plan.expert_ids_TK[tasks == 0, 0].tolist())
    e1 = set(plan.expert_ids_TK[tasks == 1, 0].tolist())
    assert not e0 & e1, (e0, e1)


def test_mod_squad_preset_and_task_ids():
    r = impls.build_router("mod_squad", d_model=8, num_tasks=3)
    assert r.num_experts == 16 and r.config.k == 4 and (r.task_gates == 0).all()
    assert impls.PRESETS["mod_squad"].loss_coefficients == {"mutual_information": 0.005}
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, 3\)"):
        r(torch.randn(2, 8), task_ids=torch.tensor([0, 3]))
