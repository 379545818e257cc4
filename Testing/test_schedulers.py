"""The scheduler interface: one DDIM update for both DDIM samplers, timesteps, noising, steps and one callback."""

from __future__ import annotations

import math

import pytest
import torch

from DiffusionCore import schedulers
from DiffusionCore.schedulers import Scheduler, StepOutput, ddim_step, denoise
from DiffusionCore.sr import resshift
from DiffusionCore.sr.resshift import DDIMProcess, ResShiftProcess
from DiffusionCore.xray import vdiffusion
from DiffusionCore.xray.vdiffusion import VDiffusion, alpha_sigma, ddim_sample


def _processes() -> list[Scheduler]:
    return [ResShiftProcess(num_steps=15), DDIMProcess(num_steps=1000), VDiffusion(prediction="x0")]


def test_one_ddim_update_is_the_closed_form():
    x0 = torch.tensor([2.0, -0.5], dtype=torch.float64)
    eps = torch.tensor([-1.0, 0.25], dtype=torch.float64)
    # the alpha-bar form: abar_prev = 0.36 -> scales 0.6 and 0.8
    abar = torch.tensor(0.36, dtype=torch.float64)
    out = ddim_step(x0, eps, abar.sqrt(), (1 - abar).sqrt())
    assert out.tolist() == pytest.approx([0.6 * 2.0 - 0.8, 0.6 * -0.5 + 0.8 * 0.25], abs=1e-15)
    # the cosine form at t = 1/3: cos(pi/6), sin(pi/6)
    a, s = alpha_sigma(torch.tensor(1.0 / 3.0, dtype=torch.float64))
    out = ddim_step(x0, eps, a, s)
    assert out.tolist() == pytest.approx([math.sqrt(3) - 0.5, -math.sqrt(3) / 4 + 0.125], abs=1e-12)
    # at the clean end (alpha 1, sigma 0) the update is the clean estimate
    assert torch.equal(ddim_step(x0, eps, torch.tensor(1.0), torch.tensor(0.0)), x0)
    # both DDIM samplers move with this one function
    assert resshift.ddim_step is schedulers.ddim_step and vdiffusion.ddim_step is schedulers.ddim_step


def test_every_process_speaks_the_interface():
    for proc in _processes():
        assert isinstance(proc, Scheduler)
    assert [p.predicts for p in _processes()] == ["x0", "eps", "x0"]
    with pytest.raises(ValueError, match="prediction"):
        VDiffusion(prediction="score")


def test_set_timesteps_sequences():
    rs = ResShiftProcess(num_steps=15)
    assert rs.set_timesteps(None) == list(range(14, -1, -1))
    assert rs.set_timesteps(4) == [14, 9, 5, 0]
    assert rs.set_timesteps(1) == [14]
    assert rs.set_timesteps(40) == rs.set_timesteps(None)
    assert ResShiftProcess(num_steps=4).set_timesteps(None) == [3, 2, 1, 0]
    with pytest.raises(ValueError):
        rs.set_timesteps(0)
    ddim = DDIMProcess(num_steps=1000)
    for steps, length in [(None, 50), (10, 10), (1, 1), (5000, 1000)]:
        ts = ddim.set_timesteps(steps)
        assert len(ts) == length and ts[0] == 999 and ts[-1] == (999 if length == 1 else 0)
        assert all(a > b for a, b in zip(ts, ts[1:]))
    vd = VDiffusion()
    assert vd.set_timesteps(4).tolist() == [1.0, 0.75, 0.5, 0.25]
    ts = vd.set_timesteps(3, t_start=0.4)
    assert ts.dtype == torch.float32 and len(ts) == 3
    assert float(ts[0]) == pytest.approx(0.4) and float(ts[-1]) == pytest.approx(0.4 / 3)
    assert bool((ts[:-1] > ts[1:]).all())
    with pytest.raises(ValueError, match="steps"):
        vd.set_timesteps(None)


def test_add_noise_is_each_forward_process():
    g = torch.Generator().manual_seed(0)
    x0, y, noise = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    rs = ResShiftProcess(num_steps=15)
    t = torch.tensor([3, 14])
    eta = rs.eta(t).view(-1, 1, 1)
    expected = x0 + eta * (y - x0) + rs.kappa * eta.sqrt() * noise
    torch.testing.assert_close(rs.add_noise(x0, noise, t, y=y), expected)
    with pytest.raises(ValueError, match="needs y"):
        rs.add_noise(x0, noise, t)
    ddim = DDIMProcess(num_steps=1000)
    a = ddim.abar(t).view(-1, 1, 1)
    torch.testing.assert_close(ddim.add_noise(x0, noise, t, y=y), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    tc = torch.tensor([0.25, 0.9], dtype=torch.float64)
    c, s = torch.cos(0.5 * math.pi * tc).view(-1, 1, 1), torch.sin(0.5 * math.pi * tc).view(-1, 1, 1)
    torch.testing.assert_close(VDiffusion().add_noise(x0, noise, tc), c * x0 + s * noise)


def test_a_step_with_the_exact_estimate_lands_on_the_forward_process():
    """Deterministic DDIM given the true x0 (or eps) moves x_t = add_noise(x0, eps, t) to add_noise(x0, eps, s)
    and, at the clean end, to x0; ResShift's posterior mean at the clean end is x0."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 1, 3, 3, 3, generator=g, dtype=torch.float64) * 1.8 - 0.9
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ddim = DDIMProcess(num_steps=1000)
    t = torch.tensor([700, 700])
    x_t = ddim.add_noise(x0, eps, t)
    step = ddim.step(eps, t, 300, x_t)
    assert isinstance(step, StepOutput)
    torch.testing.assert_close(step.x0, x0)
    torch.testing.assert_close(step.prev, ddim.add_noise(x0, eps, torch.tensor([300, 300])))
    torch.testing.assert_close(ddim.step(eps, t, None, x_t).prev, x0)

    vd = VDiffusion(prediction="x0")
    x0f, epsf = x0.float(), eps.float()
    tc = torch.tensor([0.7, 0.7])
    x_t = vd.add_noise(x0f, epsf, tc)
    step = vd.step(x0f, tc, torch.tensor(0.3), x_t)
    torch.testing.assert_close(step.prev, vd.add_noise(x0f, epsf, torch.tensor(0.3)))
    assert torch.equal(vd.step(x0f, tc, None, x_t).prev, x0f)  # alpha 1, sigma 0: exactly x0

    rs = ResShiftProcess(num_steps=15)
    y = x0 + 0.2 * eps
    ti = torch.tensor([9, 9])
    x_t = rs.add_noise(x0, eps, ti, y=y)
    torch.testing.assert_close(rs.step(x0, ti, None, x_t, generator=g).prev, x0)
    mid = rs.step(x0, ti, 4, x_t, generator=torch.Generator().manual_seed(2)).prev
    mean, var = rs.posterior_mean_var(x_t, x0, ti, torch.tensor([4, 4]))
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float32).double()
    assert torch.equal(mid, mean + var.sqrt() * z)


def test_the_sr_ddim_sampler_is_the_textbook_loop_bit_for_bit():
    proc = DDIMProcess(num_steps=1000)
    y = torch.zeros(2, 4, 2, 3, 3)

    def net(x, t):
        return torch.tanh(0.5 * x + 1e-3 * t.view(-1, 1, 1, 1, 1))

    got = proc.sample(net, y, steps=7, generator=torch.Generator().manual_seed(4))
    ts = proc.set_timesteps(7)
    x = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    for i, t in enumerate(ts):
        a_t = proc.abar(torch.tensor([t, t])).float().view(-1, 1, 1, 1, 1)
        a_s = proc.abar(torch.tensor([ts[i + 1] if i + 1 < len(ts) else -1] * 2)).float().view(-1, 1, 1, 1, 1)
        e = net(x, torch.tensor([t, t]))
        x0 = (x - torch.sqrt(1 - a_t) * e) / torch.sqrt(a_t)
        x = torch.sqrt(a_s) * x0 + torch.sqrt(1 - a_s) * e
    assert torch.equal(got, x)


def test_every_sampler_takes_the_same_callback_once_per_step():
    g = torch.Generator().manual_seed(3)
    target = torch.rand(2, 1, 3, 3, 3, generator=g) * 1.6 - 0.8
    noise = torch.randn(target.shape, generator=g)
    events = []

    def callback(done, total):
        events.append(("callback", done, total))

    def predict_x0(x, t):
        events.append(("model", tuple(t.shape)))
        return target

    def predict_eps(x, t):
        events.append(("model", tuple(t.shape)))
        return torch.zeros_like(x)

    once_per_step = [e for i in range(1, 5) for e in (("model", (2,)), ("callback", i, 4))]
    ResShiftProcess(num_steps=15).sample(predict_x0, target, steps=4, generator=g, step_callback=callback)
    assert events == once_per_step
    events.clear()
    DDIMProcess(num_steps=1000).sample(predict_eps, target, steps=4, generator=g, step_callback=callback)
    assert events == once_per_step
    events.clear()
    VDiffusion("x0").sample(predict_x0, noise, steps=4, step_callback=callback)
    assert events == once_per_step
    events.clear()
    ddim_sample(predict_x0, noise, steps=4, prediction="x0", step_callback=callback)
    assert events == once_per_step
    events.clear()
    ResShiftProcess(num_steps=15).estimate_mean(predict_x0, target, step_callback=callback)
    assert events == [("model", (2,)), ("callback", 1, 1)]


def test_a_callback_that_raises_cancels_the_chain():
    class Stop(Exception):
        pass

    def stop_at_two(done, total):
        if done == 2:
            raise Stop

    evaluations = []
    with pytest.raises(Stop):
        VDiffusion("x0").sample(lambda x, t: evaluations.append(t) or x, torch.zeros(1, 1, 2, 2, 2), steps=5,
                                step_callback=stop_at_two)  # fmt: skip
    assert len(evaluations) == 2


def test_denoise_walks_each_timestep_to_the_next_and_ends_clean():
    class Recorder:
        predicts = "x0"

        def __init__(self):
            self.steps = []

        def step(self, output, t, t_prev, x_t, *, generator=None):
            self.steps.append((t.tolist(), t_prev))
            return StepOutput(x_t + 1, output)

    rec = Recorder()
    out = denoise(rec, lambda x, t: x * 0 + float(t[0]), torch.zeros(3, 2), [5, 2, 1])
    assert rec.steps == [([5, 5, 5], 2), ([2, 2, 2], 1), ([1, 1, 1], None)]
    assert torch.equal(out.prev, torch.full((3, 2), 3.0)) and torch.equal(out.x0, torch.full((3, 2), 1.0))
    times = torch.tensor([0.5, 0.25])
    rec = Recorder()
    denoise(rec, lambda x, t: x, torch.zeros(2, 1), times)
    assert [s[0] for s in rec.steps] == [[0.5, 0.5], [0.25, 0.25]] and rec.steps[-1][1] is None
    with pytest.raises(ValueError):
        denoise(rec, lambda x, t: x, torch.zeros(2, 1), [])
