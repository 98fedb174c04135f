"""The PPO agent's actor and critic as one flat parameter vector, with the PPO loss's
gradient written out by hand.

Why: CartPole-sized networks (two 64-unit ``tanh`` layers each for the actor and the critic)
are so small that a PPO minibatch step is dominated by per-call overhead, not arithmetic:
autograd records and replays ~40 graph nodes, ``clip_grad_norm_`` and Adam walk 12
parameter tensors. Here

* every parameter of an :class:`rl_engine.ppo.Agent` is a *view* into one flat tensor
  (:attr:`FlatActorCritic.flat`), laid out so that the actor's and the critic's layers
  run side by side: the first layers as one ``(M, D) x (D, 2 H1)`` product, deeper hidden
  layers as one batched product over stacked ``(2, Hk, Hk-1)`` weights;
* :meth:`FlatActorCritic.ppo_loss_and_grad` computes the clipped-PPO loss (the same loss
  as ``PPOTrainer``'s reference formulation through :meth:`Agent.get_action_and_value`)
  and writes its exact gradient into one flat gradient tensor, without autograd;
* so the gradient norm is one ``norm`` call and Adam updates one tensor.

The Agent module stays the public network (``state_dict``, serving, ``act_greedy``): its
parameters share storage with :attr:`FlatActorCritic.flat`, so an optimizer step on the flat
tensor is immediately visible through the module. The hand-written gradient equals
autograd's up to float rounding (``tests/unit/test_actor_critic.py`` compares them over
hidden sizes and loss options).

Shapes: ``M`` minibatch rows, ``D`` observation size, ``A`` actions, ``Hk`` the width of
hidden layer ``k`` (``L`` hidden layers). Derivatives used (row ``i`` of a minibatch):

* softmax log-probabilities ``l = log_softmax(z)``, ``p = exp(l)``:
  ``d l_a / d z = onehot(a) - p``; entropy ``H = -sum_j p_j l_j``:
  ``d H / d z_j = -p_j (l_j + H)``;
* clipped surrogate ``max(-A r, -A clip(r, 1-e, 1+e))`` (Schulman et al. 2017,
  arXiv:1707.06347, eq. 7, as a loss): ``d / d r = -A`` where the unclipped term is the
  larger one (ties included: there the clip is inactive or on its closed boundary), else 0;
  ``d r / d log pi(a|s) = r``;
* clipped value loss ``0.5 max((v - R)^2, (V + clip(v - V, -e, e) - R)^2)``: ``v - R`` where
  the first term is the larger one (ties included), else ``(V + clip(v - V) - R)`` inside
  the clip range and 0 outside it;
* ``tanh' = 1 - tanh^2``; linear layers as usual (``dW = dz^T h``, ``db = sum dz``,
  ``dh = dz W``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.optim.adam import adam

from .scalars import ScalarTensors

if TYPE_CHECKING:  # pragma: no cover
    from .ppo import Agent

__all__ = [
    "FlatActorCritic", "FlatAdam", "PPOLossCoefficients", "LOSS_FIELDS", "loss_values",
    "host_actor_logits",
]

LOSS_FIELDS = ("loss", "policyLoss", "valueLoss", "entropy", "gradNorm", "clipped")
"""Keys of :func:`loss_values`: total loss, policy loss, value loss, mean entropy, the
gradient's L2 norm before clipping, and the number of rows whose ratio left
``[1 - clip, 1 + clip]``."""


@dataclass(frozen=True)
class PPOLossCoefficients:
    """The loss options of :class:`rl_engine.ppo.PPOConfig` that the gradient depends on."""

    clip_coef: float
    ent_coef: float
    vf_coef: float
    norm_adv: bool
    clip_vloss: bool


class FlatActorCritic:
    """An :class:`rl_engine.ppo.Agent` whose parameters live in one flat tensor.

    Re-points every parameter of ``agent`` (in place: the module keeps working, with the
    same values) to a view of :attr:`flat`; do not move ``agent`` to another device
    afterwards (that would allocate new, unshared parameters).

    Args:
        agent: the network; its actor and critic must have the same hidden sizes
            (always true of ``Agent``).

    Attributes:
        flat: all parameters, ``(P,)``, an ``nn.Parameter`` (give it to the optimizer).
        grad: the gradient buffer, ``(P,)``, the same tensor as ``flat.grad``.
    """

    def __init__(self, agent: "Agent") -> None:
        actor = [m for m in agent.actor if isinstance(m, nn.Linear)]
        critic = [m for m in agent.critic if isinstance(m, nn.Linear)]
        if [m.weight.shape for m in actor[:-1]] != [m.weight.shape for m in critic[:-1]]:
            raise ValueError("actor and critic must have the same hidden sizes")
        p0 = actor[0].weight
        self.widths = [m.out_features for m in actor[:-1]]
        self.num_actions = actor[-1].out_features
        # Blocks in flat order: (tensor shape, [(module, attribute, slice of the block)]).
        blocks: list[tuple[tuple[int, ...], list[tuple[nn.Linear, str, tuple]]]] = []
        h0 = self.widths[0]
        blocks.append(((2 * h0, agent.obs_dim),
                       [(actor[0], "weight", (slice(0, h0),)),
                        (critic[0], "weight", (slice(h0, 2 * h0),))]))
        blocks.append(((2 * h0,), [(actor[0], "bias", (slice(0, h0),)),
                                   (critic[0], "bias", (slice(h0, 2 * h0),))]))
        for a, c in zip(actor[1:-1], critic[1:-1]):
            blocks.append(((2, *a.weight.shape), [(a, "weight", (0,)), (c, "weight", (1,))]))
            blocks.append(((2, a.out_features), [(a, "bias", (0,)), (c, "bias", (1,))]))
        for head in (actor[-1], critic[-1]):
            blocks.append((tuple(head.weight.shape), [(head, "weight", ())]))
            blocks.append((tuple(head.bias.shape), [(head, "bias", ())]))

        sizes = [math.prod(shape) for shape, _ in blocks]
        flat = torch.zeros(sum(sizes), dtype=p0.dtype, device=p0.device)
        grad = torch.zeros_like(flat)
        self._views: list[torch.Tensor] = []
        self._grads: list[torch.Tensor] = []
        offset = 0
        with torch.no_grad():
            for (shape, members), size in zip(blocks, sizes):
                view = flat[offset : offset + size].view(shape)
                self._views.append(view)
                self._grads.append(grad[offset : offset + size].view(shape))
                for module, name, index in members:
                    view[index].copy_(getattr(module, name))
                offset += size
        self.flat = nn.Parameter(flat)
        self.flat.grad = grad
        self.grad = grad
        # Re-point the module's parameters to views of the flat storage.
        for (shape, members), view in zip(blocks, self._views):
            for module, name, index in members:
                setattr(module, name, nn.Parameter(view[index]))
        self.agent = agent
        self._k = ScalarTensors(flat.dtype, flat.device)
        """0-dim constants of the hot loops (see :mod:`rl_engine.scalars`)."""
        # The layer views, made once (they alias flat and grad for good), in the orientation
        # each product uses.
        w_in, b_in, hidden, w_pi, b_pi, w_v, b_v = self._layers(self._views)
        self._fwd = (w_in.t(), b_in, [(b.unsqueeze(1), w.transpose(1, 2)) for w, b in hidden],
                     w_pi.t(), b_pi, w_v.t(), b_v)
        """``(W_in^T (D, 2H1), b_in, [(b (2, 1, Hk), W^T (2, Hk-1, Hk))], W_pi^T (HL, A), b_pi,
        W_v^T (HL, 1), b_v (1,))``: what :meth:`_forward` multiplies with."""
        self._bwd = ([w for w, _ in hidden], w_pi, w_v)
        """``([W (2, Hk, Hk-1)], W_pi (A, HL), W_v (1, HL))``: what the backward pass
        multiplies with."""
        gw_in, gb_in, g_hidden, gw_pi, gb_pi, gw_v, gb_v = self._layers(self._grads)
        self._param_grads = (gw_in.view(2, h0, agent.obs_dim), gb_in.view(2, h0), g_hidden,
                             gw_pi, gb_pi, gw_v, gb_v)
        """The gradient's blocks, the first layer's as ``(2, H1, D)`` and ``(2, H1)``."""
        # Each network alone, as [(b, W^T)] per layer (rollout time).
        self._actor = [(b_in[:h0], w_in[:h0].t())] + [(b[0], w[0].t()) for w, b in hidden]
        self._actor.append((b_pi, w_pi.t()))
        self._critic = [(b_in[h0:], w_in[h0:].t())] + [(b[1], w[1].t()) for w, b in hidden]
        self._critic.append((b_v, w_v.t()))

    # ------------------------------------------------------------------ layout helpers

    def _layers(self, params: list[torch.Tensor]):
        """``(w_in (2H1, D), b_in (2H1,), hidden [(w (2, Hk, Hk-1), b (2, Hk))], w_pi (A, HL),
        b_pi (A,), w_v (1, HL), b_v (1,))`` from the block list ``params``."""
        n_hidden = len(self.widths) - 1
        w_in, b_in = params[0], params[1]
        hidden = [(params[2 + 2 * k], params[3 + 2 * k]) for k in range(n_hidden)]
        w_pi, b_pi, w_v, b_v = params[2 + 2 * n_hidden :]
        return w_in, b_in, hidden, w_pi, b_pi, w_v, b_v

    # ------------------------------------------------------------------ forward passes

    @torch.inference_mode()
    def actor_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The actor alone (rollout time): logits ``(M, A)`` for observations ``(M, D)``."""
        return self._mlp(self._actor, x)

    @torch.inference_mode()
    def critic_values(self, x: torch.Tensor) -> torch.Tensor:
        """The critic alone: values ``(M,)`` for observations ``(M, D)``."""
        return self._mlp(self._critic, x).view(-1)

    def _mlp(self, layers: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
        *hidden, (b_out, w_out_t) = layers
        h = x
        for b, w_t in hidden:
            h = _affine_tanh(b, h, w_t, self._k)
        return torch.addmm(b_out, h, w_out_t)

    @torch.inference_mode()
    def host_actor(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The actor's layers as numpy ``(W^T (in, out), b (out,))`` pairs, for acting on
        the host (:func:`host_actor_logits`). On the CPU these are views of :attr:`flat`
        (they follow every optimizer step); on another device, copies taken now."""
        return [(w_t.cpu().numpy(), b.cpu().numpy()) for b, w_t in self._actor]

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Both networks side by side: ``(logits (M, A), value (M, 1), activations)`` where
        ``activations[k]`` is hidden layer ``k``'s output, ``(2, M, Hk)`` (actor, critic)."""
        w_in_t, b_in, hidden, w_pi_t, b_pi, w_v_t, b_v = self._fwd
        k = self._k
        m = x.shape[0]
        h = _affine_tanh(b_in, x, w_in_t, k).view(m, 2, self.widths[0]).transpose(0, 1)
        acts = [h]
        for b, w_t in hidden:
            h = _affine_tanh(b, h, w_t, k)
            acts.append(h)
        logits = torch.addmm(b_pi, h[0], w_pi_t)
        value = torch.addmm(b_v, h[1], w_v_t)
        return logits, value, acts

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (M, A), value (M,))`` for observations ``(M, D)``; equal to
        ``(agent.actor(x), agent.get_value(x))`` up to float rounding."""
        logits, value, _ = self._forward(x)
        return logits, value.view(-1)

    # ------------------------------------------------------------------ the PPO gradient

    @torch.inference_mode()
    def ppo_loss_and_grad(
        self,
        obs: torch.Tensor,
        onehot: torch.Tensor,
        old_logprob: torch.Tensor,
        advantage: torch.Tensor,
        returns: torch.Tensor,
        old_value: torch.Tensor,
        coef: PPOLossCoefficients,
        want_kl: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The clipped-PPO loss of one minibatch, and its gradient written to :attr:`grad`.

        ``loss = pg_loss - ent_coef * mean(H) + vf_coef * v_loss`` exactly as in
        ``rl_engine.ppo`` (CleanRL's ``ppo.py``): per-minibatch advantage normalization
        (``(A - mean) / (std + 1e-8)``, unbiased std) when ``coef.norm_adv``, the clipped
        value loss when ``coef.clip_vloss``.

        Args:
            obs: ``(M, D)`` observations.
            onehot: ``(M, A)`` one-hot of the actions taken.
            old_logprob: ``(M, 1)`` log pi_old(a|s) from the rollout.
            advantage: ``(M, 1)`` GAE advantages (not yet normalized).
            returns: ``(M, 1)`` value targets (``advantage + old_value``).
            old_value: ``(M, 1)`` V_old(s) from the rollout.
            coef: loss coefficients.
            want_kl: also return ``[old_approx_kl, approx_kl]`` (Schulman's ``k3``
                estimator, http://joschu.net/blog/kl-approx.html).

        The per-row inputs are ``(M, 1)`` columns (what splitting the trainer's minibatch
        table gives), so that they broadcast against ``(M, A)`` without reshaping.

        Returns:
            ``(values, kl)``: ``values`` is a ``(5,)`` tensor of sums whose entries, with
            :func:`loss_values`, give the fields of :data:`LOSS_FIELDS` (one host read
            per minibatch); ``kl`` is ``(2,)`` or ``None``. The gradient is *not* clipped
            here.
        """
        m = obs.shape[0]
        k = self._k
        c = coef.clip_coef
        logits, value, acts = self._forward(obs)
        logp = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
        newlogprob = (logp * onehot).sum(-1, keepdim=True)
        neg_entropy = (p * logp).sum(-1, keepdim=True)
        logratio = newlogprob - old_logprob
        ratio = logratio.exp()

        adv = advantage
        if coef.norm_adv and m > 1:
            std, mean = torch.std_mean(adv)
            adv = (adv - mean).div_(std.add_(k[1e-8]))
        # The clipped surrogate as an objective: min(A r, A clip(r)); pg_loss = -mean.
        ratio_clipped = torch.clamp(ratio, k[1 - c], k[1 + c])
        surrogate = adv * ratio
        surrogate_clipped = adv * ratio_clipped
        chosen = torch.where(surrogate <= surrogate_clipped, surrogate, k[0.0])  # A r, unclipped
        objective = torch.minimum(surrogate, surrogate_clipped)

        v_err = value - returns
        if coef.clip_vloss:
            delta = value - old_value
            delta_clipped = torch.clamp(delta, k[-c], k[c])
            inside = delta_clipped == delta
            vc_err = delta_clipped.add_(old_value).sub_(returns)
            v_sq, vc_sq = v_err * v_err, vc_err * vc_err
            v_term = torch.maximum(v_sq, vc_sq)
            # Inside the clip range both branches are v - R; outside, only the unclipped one
            # carries a gradient, and only where it is the larger.
            d_value = torch.where((v_sq >= vc_sq).logical_or_(inside), v_err, k[0.0])
        else:
            v_term = v_err * v_err
            d_value = v_err

        # d loss / d logits, times M:  p * (chosen + ent_coef (log p + H)) - onehot * chosen.
        q = torch.add(chosen, logp - neg_entropy, alpha=coef.ent_coef)
        d_logits = torch.addcmul(p * q, onehot, chosen, value=-1.0).div_(k[float(m)])
        d_value.mul_(k[coef.vf_coef / m])

        gw_in, gb_in, g_hidden, gw_pi, gb_pi, gw_v, gb_v = self._param_grads
        hidden_w, w_pi, w_v = self._bwd
        h_last = acts[-1]
        torch.mm(d_logits.t(), h_last[0], out=gw_pi)
        torch.sum(d_logits, 0, out=gb_pi)
        torch.mm(d_value.t(), h_last[1], out=gw_v)
        torch.sum(d_value, 0, out=gb_v)
        d_h = torch.empty((2, m, w_pi.shape[1]), dtype=obs.dtype, device=obs.device)
        torch.mm(d_logits, w_pi, out=d_h[0])
        torch.mul(d_value, w_v, out=d_h[1])
        for layer in range(len(hidden_w), -1, -1):
            h = acts[layer]
            d_z = torch.addcmul(d_h, d_h * h, h, value=-1.0)  # tanh' = 1 - tanh^2
            if layer == 0:
                break
            gw, gb = g_hidden[layer - 1]
            torch.bmm(d_z.transpose(1, 2), acts[layer - 1], out=gw)
            torch.sum(d_z, 1, out=gb)
            d_h = torch.bmm(d_z, hidden_w[layer - 1])
        # First layer, (2 H1, D) = both networks' (H1, D) blocks: one batched product, in
        # the (D, H1) orientation (MKL is several times slower at (H1, M) x (M, D) for a
        # small D), copied in transposed.
        gw_in.copy_(torch.bmm(obs.t().expand(2, *obs.shape[::-1]), d_z).transpose(1, 2))
        torch.sum(d_z, 1, out=gb_in)

        # Sums (means are taken on the host): surrogate objective, squared value error,
        # negative entropy, rows clipped; then the squared gradient norm.
        clipped = ratio_clipped != ratio
        sums = torch.cat((objective, v_term, neg_entropy, clipped), 1).sum(0)
        values = torch.cat((sums, torch.dot(self.grad, self.grad).view(1)))
        kl = None
        if want_kl:
            kl = torch.cat((-logratio, (ratio - 1) - logratio), 1).mean(0)
        return values, kl


class FlatAdam:
    """Adam (Kingma & Ba 2015, arXiv:1412.6980, Algorithm 1) on one flat tensor, through
    PyTorch's functional form ``torch.optim.adam.adam`` with the fused kernel.

    The update is ``torch.optim.Adam(..., fused=True)``'s, bit for bit
    (``tests/unit/test_actor_critic.py``); what it leaves out is the optimizer object's
    per-step bookkeeping (hooks, parameter groups, state lookup), which costs more than the
    fused kernel itself on a CartPole-sized network (~50 µs of ~80 µs a step here; 16 steps
    per PPO iteration).

    Args:
        param: the flat parameter tensor (:attr:`FlatActorCritic.flat`); its ``.grad``
            is the gradient each :meth:`step` applies.
        eps: Adam's epsilon (PPO: 1e-5).
        betas: ``(beta1, beta2)``.

    Attributes:
        exp_avg, exp_avg_sq: the first and second moment estimates, shaped like ``param``.
        steps_taken: optimizer steps so far.
    """

    def __init__(self, param: torch.Tensor, eps: float = 1e-8,
                 betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self._param = param.detach()  # an alias: stepping it in place updates ``param``
        self._grad = param.grad
        if self._grad is None:
            raise ValueError("FlatAdam: param.grad must be allocated (FlatActorCritic does)")
        self.exp_avg = torch.zeros_like(self._param)
        self.exp_avg_sq = torch.zeros_like(self._param)
        self._step = torch.zeros((), dtype=torch.float32, device=self._param.device)
        self.eps = float(eps)
        self.betas = (float(betas[0]), float(betas[1]))

    @property
    def steps_taken(self) -> int:
        return int(self._step.item())

    def step(self, lr: float) -> None:
        """One Adam step of size ``lr`` with the current ``param.grad``."""
        adam([self._param], [self._grad], [self.exp_avg], [self.exp_avg_sq], [], [self._step],
             fused=True, amsgrad=False, beta1=self.betas[0], beta2=self.betas[1], lr=lr,
             weight_decay=0.0, eps=self.eps, maximize=False)


def host_actor_logits(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """Actor logits ``(M, A)`` for observations ``x`` ``(M, D)`` with the numpy layers of
    :meth:`FlatActorCritic.host_actor` (``tanh`` hidden layers)."""
    *hidden, (w_out, b_out) = layers
    h = x
    for w, b in hidden:
        h = np.tanh(h @ w + b)
    return h @ w_out + b_out


def loss_values(values: list[float], rows: int, coef: PPOLossCoefficients) -> dict[str, float]:
    """The ``(5,)`` result of :meth:`FlatActorCritic.ppo_loss_and_grad` for a minibatch of
    ``rows`` rows, read on the host (``values.tolist()``), as a dict of :data:`LOSS_FIELDS`."""
    objective, v_term, neg_entropy, clipped, grad_sq = values
    pg_loss, v_loss, entropy = -objective / rows, 0.5 * v_term / rows, -neg_entropy / rows
    return {
        "loss": pg_loss - coef.ent_coef * entropy + coef.vf_coef * v_loss,
        "policyLoss": pg_loss,
        "valueLoss": v_loss,
        "entropy": entropy,
        "gradNorm": math.sqrt(grad_sq),  # nan and inf stay so
        "clipped": clipped,
    }


_SIGMOID_TANH_MIN_ELEMENTS = 16384


def _affine_tanh(bias: torch.Tensor, x: torch.Tensor, weight_t: torch.Tensor,
                 k: ScalarTensors, min_elements: int = _SIGMOID_TANH_MIN_ELEMENTS) -> torch.Tensor:
    """``tanh(x @ weight_t + bias)``: ``addmm`` for 2-D ``x``, ``baddbmm`` for 3-D.

    On the CPU, for large outputs, computed as ``2 sigmoid(2 z) - 1`` with the doubling
    folded into the product: PyTorch's CPU sigmoid kernel is several times faster than its
    tanh kernel, and the two agree to float rounding (~2e-7;
    ``hack/bench/tanh_kernels.py``, docs/benchmarks.md). ``k`` holds the constants in the
    dtype and device of ``x``; ``min_elements`` is the output size from which the sigmoid
    form is used.
    """
    product = torch.addmm if x.dim() == 2 else torch.baddbmm
    out_elements = math.prod(x.shape[:-1]) * weight_t.shape[-1]
    if x.device.type == "cpu" and out_elements >= min_elements:
        z2 = product(bias, x, weight_t, beta=2.0, alpha=2.0)
        return torch.sigmoid_(z2).mul_(k[2.0]).sub_(k[1.0])
    return product(bias, x, weight_t).tanh_()
