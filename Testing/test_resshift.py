"""The ResShift and DDIM math: schedule, marginals, posterior, sampling with an oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from DiffusionCore.sr.resshift import DDIMProcess, ResShiftProcess, default_eta_1, resshift_eta_schedule


def test_schedule_endpoints_and_monotonic():
    etas = resshift_eta_schedule(15, kappa=2.0, power=0.3, eta_1=0.0004, eta_T=0.99)
    assert etas.shape == (15,)
    assert etas[0] == pytest.approx(0.0004, rel=1e-12)
    assert etas[-1] == pytest.approx(0.99, rel=1e-12)
    assert np.all(np.diff(etas) > 0)
    # p < 1 front-loads growth: the midpoint of sqrt(eta) in log-space is passed before t = T/2
    log_mid = 0.5 * (math.log(math.sqrt(0.0004)) + math.log(math.sqrt(0.99)))
    assert np.argmax(np.log(np.sqrt(etas)) > log_mid) < 7
    four = resshift_eta_schedule(4, 2.0, 0.3, 0.0004, 0.99)
    assert four[0] == pytest.approx(0.0004) and four[-1] == pytest.approx(0.99)
    assert default_eta_1(2.0) == pytest.approx(0.0004)
    with pytest.raises(ValueError):
        resshift_eta_schedule(15, 2.0, 0.3, 0.5, 0.2)


def test_marginal_mean_and_variance_match_markov_chain_monte_carlo():
    """Running the one-step chain x_t = x_{t-1} + alpha_t (y - x0) + kappa sqrt(alpha_t) eps from x0
    reproduces q(x_t | x0, y) = N(x0 + eta_t (y - x0), kappa^2 eta_t)."""
    proc = ResShiftProcess(num_steps=15, kappa=2.0, power=0.3)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n,), 0.3, dtype=torch.float64)
    y = torch.full((n,), -0.5, dtype=torch.float64)
    x = x0.clone()
    checks = {}
    prev = 0.0
    for t in range(15):
        eta = float(proc.etas[t])
        alpha = eta - prev
        x = (
            x
            + alpha * (y - x0)
            + proc.kappa * math.sqrt(alpha) * torch.randn(n, generator=g, dtype=torch.float64)
        )
        prev = eta
        checks[t] = (x.mean().item(), x.var().item())
    for t in (0, 4, 14):
        mean, var = proc.q_mean_var(x0[:1], y[:1], torch.tensor([t]))
        mc_mean, mc_var = checks[t]
        sd = math.sqrt(float(var))
        assert mc_mean == pytest.approx(float(mean), abs=5 * sd / math.sqrt(n))
        assert mc_var == pytest.approx(float(var), rel=0.02)
    # q_sample draws from the same marginal
    t = torch.full((n,), 9)
    xs = proc.q_sample(x0, y, t, torch.randn(n, generator=g, dtype=torch.float64))
    mean, var = proc.q_mean_var(x0[:1], y[:1], torch.tensor([9]))
    assert xs.mean().item() == pytest.approx(float(mean), abs=0.01)
    assert xs.var().item() == pytest.approx(float(var), rel=0.02)


@pytest.mark.parametrize("t,s", [(7, 6), (14, 13), (0, -1), (14, 5)])
def test_posterior_matches_bayes_closed_form(t, s):
    """q(x_s | x_t, x0) equals the Gaussian product of q(x_s | x0) and q(x_t | x_s)."""
    proc = ResShiftProcess(num_steps=15, kappa=2.0, power=0.3)
    g = torch.Generator().manual_seed(1)
    x0, y, xt = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    k2 = proc.kappa**2
    eta_t, eta_s = float(proc.eta(torch.tensor([t]))), float(proc.eta(torch.tensor([s])))
    alpha = eta_t - eta_s
    e0 = y - x0
    mean, var = proc.posterior_mean_var(xt, x0, torch.tensor([t, t]), torch.tensor([s, s]))
    if s < 0:
        assert torch.allclose(mean, x0) and torch.all(var == 0)
        return
    v1, v2 = k2 * eta_s, k2 * alpha
    post_var = 1.0 / (1.0 / v1 + 1.0 / v2)
    post_mean = post_var * ((x0 + eta_s * e0) / v1 + (xt - alpha * e0) / v2)
    assert torch.allclose(mean, post_mean, atol=1e-10)
    assert torch.allclose(var.flatten(), torch.full((2,), post_var, dtype=torch.float64), rtol=1e-10)


@pytest.mark.parametrize("steps", [None, 4, 1])
def test_resshift_sampling_with_oracle_returns_x0(steps):
    proc = ResShiftProcess(num_steps=15)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 4, 3, 5, 5, generator=g)
    y = x0 + 0.3 * torch.randn(x0.shape, generator=g)
    calls = []

    def oracle(x_t, t):
        calls.append(int(t[0]))
        return x0

    out = proc.sample(oracle, y, steps=steps, generator=g)
    assert torch.allclose(out, x0, atol=1e-5)
    assert calls[0] == 14
    assert calls[-1] == (14 if steps == 1 else 0)
    assert len(calls) == (15 if steps is None else steps)
    start = proc.prior_sample(y, torch.zeros_like(y))
    assert torch.equal(start, y)


@pytest.mark.parametrize("num_steps,steps", [(15, None), (4, None), (15, 4)])
def test_mean_estimate_is_one_evaluation_at_y_and_beats_a_sample_in_squared_error(num_steps, steps):
    """Gaussian toy with a known posterior: x0 | y ~ N(y, s^2). The Bayes x0 predictor from x_t is linear,
    E[x0 | x_t] = y + g_t (x_t - y) with g_t = (1 - eta_t) s^2 / ((1 - eta_t)^2 s^2 + kappa^2 eta_t). The mean
    estimate evaluates it once, at x_T = y, and so returns E[x0 | y] = y: the least squared error there is
    (s^2). The reverse chain returns a random draw: its error against an independent x0 is larger."""
    proc = ResShiftProcess(num_steps=num_steps, kappa=2.0)
    s, n = 0.5, 100_000
    g = torch.Generator().manual_seed(4)
    y = 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    x0 = y + s * torch.randn(n, 1, generator=g, dtype=torch.float64)
    calls = []

    def bayes(x_t, t):
        calls.append((x_t, t))
        eta = proc.eta(t)[:, None].to(x_t.dtype)
        return y + (1 - eta) * s**2 / ((1 - eta) ** 2 * s**2 + proc.kappa**2 * eta) * (x_t - y)

    steps_seen = []
    mean = proc.estimate_mean(bayes, y, step_callback=lambda i, k: steps_seen.append((i, k)))
    assert len(calls) == 1 and steps_seen == [(1, 1)]
    assert torch.equal(calls[0][0], y) and bool((calls[0][1] == num_steps - 1).all())
    assert torch.allclose(mean, y)
    mse_mean = float(((mean - x0) ** 2).mean()) / s**2
    sample = proc.sample(bayes, y, steps=steps, generator=g)
    mse_sample = float(((sample - x0) ** 2).mean()) / s**2
    assert mse_mean == pytest.approx(1.0, rel=0.02)
    assert mse_sample > 1.2 * mse_mean


def test_ddim_with_oracle_noise_returns_x0():
    proc = DDIMProcess(num_steps=1000)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 4, 2, 4, 4, generator=g, dtype=torch.float64)

    def oracle_eps(x_t, t):
        a = proc.abar(t).reshape(-1, 1, 1, 1, 1).to(x_t.dtype)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    out = proc.sample(oracle_eps, x0.float(), steps=10, generator=g)
    assert torch.allclose(out.double(), x0, atol=1e-4)
    x_t, t, target = proc.training_pair(x0, x0, generator=g)
    a = proc.abar(t).reshape(-1, 1, 1, 1, 1).to(x0.dtype)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * target)
