"""The flat actor-critic: its parameters alias the Agent module's, its fused forward equals
the modules', and its hand-written PPO gradient equals autograd's on the reference loss."""

from __future__ import annotations

import pytest
import torch

from rl_engine.actor_critic import FlatActorCritic, FlatAdam, PPOLossCoefficients, loss_values
from rl_engine.ppo import Agent, gumbel_noise

torch.set_num_threads(1)


def reference_loss(agent: Agent, obs, actions, old_logprob, advantage, returns, old_value,
                   coef: PPOLossCoefficients) -> dict[str, torch.Tensor]:
    """CleanRL ppo.py's minibatch loss, through the modules and autograd (written
    independently of rl_engine.actor_critic)."""
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(obs, actions)
    logratio = newlogprob - old_logprob
    ratio = logratio.exp()
    adv = advantage
    if coef.norm_adv:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg_loss = torch.max(-adv * ratio,
                        -adv * torch.clamp(ratio, 1 - coef.clip_coef, 1 + coef.clip_coef)).mean()
    if coef.clip_vloss:
        v_unclipped = (newvalue - returns) ** 2
        v_clipped = old_value + torch.clamp(newvalue - old_value, -coef.clip_coef, coef.clip_coef)
        v_loss = 0.5 * torch.max(v_unclipped, (v_clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((newvalue - returns) ** 2).mean()
    loss = pg_loss - coef.ent_coef * entropy.mean() + coef.vf_coef * v_loss
    return {"loss": loss, "policyLoss": pg_loss, "valueLoss": v_loss, "entropy": entropy.mean(),
            "clipped": ((ratio - 1).abs() > coef.clip_coef).sum().to(loss.dtype)}


def _batch(agent: Agent, m: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    dtype = next(agent.parameters()).dtype
    obs = torch.randn(m, agent.obs_dim, generator=g, dtype=dtype)
    actions = torch.randint(0, agent.num_actions, (m,), generator=g)
    with torch.no_grad():
        _, logp, _, value = agent.get_action_and_value(obs, actions)
    # old log-probs and values off the current ones, so that both clips are exercised
    old_logprob = logp + spread * torch.randn(m, generator=g, dtype=dtype)
    old_value = value + spread * torch.randn(m, generator=g, dtype=dtype)
    advantage = torch.randn(m, generator=g, dtype=dtype)
    returns = old_value + advantage
    return obs, actions, old_logprob, advantage, returns, old_value


@pytest.mark.parametrize("hidden", [(64, 64), (32,), (16, 8, 4)])
@pytest.mark.parametrize("norm_adv,clip_vloss", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("spread", [0.0, 0.5])
def test_hand_written_gradient_equals_autograd(hidden, norm_adv, clip_vloss, spread):
    torch.manual_seed(0)
    agent = Agent(5, 3, hidden).double()
    net = FlatActorCritic(agent)
    coef = PPOLossCoefficients(clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, norm_adv=norm_adv,
                               clip_vloss=clip_vloss)
    obs, actions, old_logprob, advantage, returns, old_value = _batch(agent, 33, spread, 1)

    ref = reference_loss(agent, obs, actions, old_logprob, advantage, returns, old_value, coef)
    agent.zero_grad()
    ref["loss"].backward()
    onehot = torch.nn.functional.one_hot(actions, 3).double()
    columns = (t.unsqueeze(1) for t in (old_logprob, advantage, returns, old_value))
    values, _ = net.ppo_loss_and_grad(obs, onehot, *columns, coef)
    got = loss_values(values.tolist(), len(obs), coef)
    for name in ("loss", "policyLoss", "valueLoss", "entropy", "clipped"):
        assert got[name] == pytest.approx(ref[name].item(), rel=1e-10, abs=1e-12), name
    if spread:
        assert got["clipped"] > 0  # the clip branches were taken
    # Each module parameter's autograd gradient against the matching slice of the flat one.
    flat_grad_of = {p.data_ptr(): None for p in agent.parameters()}
    offset0 = net.flat.data_ptr()
    itemsize = net.flat.element_size()
    for name, p in agent.named_parameters():
        start = (p.data_ptr() - offset0) // itemsize
        mine = net.grad[start : start + p.numel()].view_as(p)
        torch.testing.assert_close(mine, p.grad, rtol=1e-9, atol=1e-12, msg=name)
        flat_grad_of[p.data_ptr()] = name
    assert all(flat_grad_of.values())
    assert got["gradNorm"] == pytest.approx(net.grad.norm().item(), rel=1e-12)


def test_parameters_alias_the_flat_tensor_and_the_forward_matches_the_modules():
    torch.manual_seed(0)
    agent = Agent(4, 2, (64, 64))
    x = torch.randn(9, 4)
    before_actor, before_value = agent.actor(x).detach(), agent.get_value(x).detach()
    net = FlatActorCritic(agent)
    # same values after re-pointing; every parameter lives inside the flat tensor
    torch.testing.assert_close(agent.actor(x), before_actor)
    total = sum(p.numel() for p in agent.parameters())
    assert net.flat.numel() == total
    logits, value = net.forward(x)
    torch.testing.assert_close(logits, before_actor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value, before_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.actor_logits(x), before_actor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.critic_values(x), before_value, rtol=1e-5, atol=1e-6)
    # an in-place step on the flat tensor is what the module computes with
    with torch.no_grad():
        net.flat.add_(0.1)
    assert not torch.allclose(agent.actor(x), before_actor)
    torch.testing.assert_close(net.actor_logits(x), agent.actor(x), rtol=1e-5, atol=1e-6)
    # the state dict (what artifacts save) loads back into a plain Agent
    plain = Agent(4, 2, (64, 64))
    plain.load_state_dict(agent.state_dict())
    torch.testing.assert_close(plain.actor(x), agent.actor(x))


def test_gumbel_max_sampling_follows_the_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[0.3, -1.2, 0.9]])
    noise = gumbel_noise((20000, 1, 3), torch.device("cpu"))
    actions = (logits - noise).argmax(-1).flatten()
    freq = torch.bincount(actions, minlength=3).float() / len(actions)
    torch.testing.assert_close(freq, torch.softmax(logits, -1)[0], atol=0.015, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flat_adam_is_torch_adam_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(3)
    start = torch.randn(300, generator=g, dtype=dtype)
    mine = torch.nn.Parameter(start.clone())
    mine.grad = torch.zeros_like(mine)
    ref = torch.nn.Parameter(start.clone())
    opt = FlatAdam(mine, eps=1e-5)
    ref_opt = torch.optim.Adam([ref], lr=1.0, eps=1e-5, fused=True)
    for step, lr in enumerate([2.5e-4, 2.4e-4, 1e-3, 3e-2, 1e-5], 1):
        grad = torch.randn(300, generator=g, dtype=dtype) * step
        mine.grad.copy_(grad)
        ref.grad = grad.clone()
        opt.step(lr)
        ref_opt.param_groups[0]["lr"] = lr
        ref_opt.step()
        assert torch.equal(mine.detach(), ref.detach()), step
    assert opt.steps_taken == 5
    assert not torch.equal(mine.detach(), start)


def test_flat_adam_needs_an_allocated_gradient():
    with pytest.raises(ValueError, match="grad"):
        FlatAdam(torch.nn.Parameter(torch.zeros(3)))
