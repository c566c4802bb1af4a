"""Math tests of diffusegen.diffusion: agreement with diffusers' DDPMScheduler, the VB term, the stop-gradient,
respacing, and pinned numbers on a tiny seeded diffusers UNet2DModel."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffusegen.diffusion import (
    DeviceDiffusion,
    GaussianDiffusion,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    draw_noise,
    linear_betas,
    mean_flat,
    model_fn_diffusers,
    normal_kl,
    randn_per_sample,
    space_timesteps,
)

TS = [0, 1, 2, 500, 998, 999]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this file


@pytest.fixture(scope="module")
def gd():
    return GaussianDiffusion(linear_betas(1000))


def _scheduler(float64_from=None, **kw):
    "diffusers' learned-range DDPM sampler; `float64_from`: replace its float32 tables by a GaussianDiffusion's."
    s = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range", clip_sample=False, **kw
    )  # clip_sample defaults to True in diffusers; the paper's code does not clip
    if float64_from is not None:
        s.betas, s.alphas = torch.from_numpy(float64_from.betas), torch.from_numpy(float64_from.alphas)
        s.alphas_cumprod, s.one = torch.from_numpy(float64_from.alphas_cumprod), torch.tensor(1.0, dtype=torch.float64)
    return s


def _inputs(seed, dtype=torch.float64, B=3, C=4, H=8):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, C, H, H, generator=g, dtype=dtype) * 2 - 1
    noise = torch.randn(B, C, H, H, generator=g, dtype=dtype)
    out = torch.cat(
        [torch.randn(B, C, H, H, generator=g, dtype=dtype), torch.rand(B, C, H, H, generator=g, dtype=dtype) * 2 - 1], 1
    )  # [ε, v], v in [-1, 1]
    return x0, noise, out


def _diffusers_step(s, out, t, x_t, seed):
    "diffusers' step with known noise: (prev_sample, pred_original_sample, its mean, its log-variance, the noise)."
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(seed), dtype=x_t.dtype)  # what step() draws
    r = s.step(out, t, x_t, generator=torch.Generator().manual_seed(seed))
    logvar = s._get_variance(t, predicted_variance=out[:, x_t.shape[1] :])
    mean = r.prev_sample - (torch.exp(0.5 * logvar) * z if t > 0 else 0)
    return r.prev_sample, r.pred_original_sample, mean, logvar, z


# ------------------------------------------------------------------ schedule and agreement with diffusers
def test_linear_betas_match_diffusers_defaults(gd):
    s = _scheduler()
    assert (s.config.beta_start, s.config.beta_end) == (1e-4, 0.02)  # diffusers' defaults are ours: no trained_betas
    assert np.abs(s.betas.double().numpy() - gd.betas).max() < 5e-9  # float32 rounding only
    assert gd.betas.dtype == np.float64 and gd.alphas_cumprod.dtype == np.float64
    assert np.allclose(linear_betas(250)[[0, -1]], [4e-4, 0.08], rtol=0, atol=1e-15)  # scaled by 1000/T


@pytest.mark.parametrize("t", TS)
def test_formulas_agree_with_diffusers_float64(gd, t):
    "Same float64 tables in diffusers: q_sample, x̂0, the step's mean and the learned-range variance agree to 1e-10."
    s = _scheduler(float64_from=gd)
    x0, noise, out = _inputs(t)
    tt = torch.full((3,), t)
    x_t = gd.q_sample(x0, tt, noise)
    assert (x_t - s.add_noise(x0, noise, tt)).abs().max() < 1e-10
    prev, xhat, mean, logvar, z = _diffusers_step(s, out, t, x_t, seed=100 + t)
    ours = gd.p_mean_variance(out, x_t, tt)
    assert (ours["pred_xstart"] - xhat).abs().max() < 1e-10
    assert (ours["mean"] - mean).abs().max() < 1e-10
    assert (gd.p_sample(out, x_t, tt, z) - prev).abs().max() < 1e-10
    if t > 0:
        assert (ours["log_variance"] - logvar).abs().max() < 1e-10
    else:
        # Index 0: β̃ = 0. Improved DDPM clips log β̃_0 to log β̃_1; diffusers uses log(1e-20). Sampling adds no noise
        # there, so only the decoder term L_0 (which diffusers does not have) sees the difference.
        frac = (out[:, 4:] + 1) / 2
        assert torch.allclose(logvar, frac * math.log(gd.betas[0]) + (1 - frac) * math.log(1e-20))
        assert torch.allclose(
            ours["log_variance"], frac * math.log(gd.betas[0]) + (1 - frac) * gd.posterior_log_variance_clipped[1]
        )


@pytest.mark.parametrize("t", TS)
def test_agree_with_diffusers_out_of_the_box(gd, t):
    "diffusers' own float32 schedule: 1e-6 where float32 does not cancel; at t ≤ 2, 1−ᾱ_t in float32 costs ~1e-4."
    s = _scheduler()
    x0, noise, out = _inputs(t)
    tt = torch.full((3,), t)
    x_t = gd.q_sample(x0, tt, noise)
    _, _, mean, logvar, _ = _diffusers_step(s, out, t, x_t, seed=7)
    ours = gd.p_mean_variance(out, x_t, tt)
    # measured worst cases: q_sample 3.5e-6 (t ≤ 2) / 3e-8; mean 2.6e-4 (t ≤ 2) / 2.4e-7; log Σ 1.1e-4 / 6.7e-6
    big = t >= 500
    assert (x_t - s.add_noise(x0, noise, tt)).abs().max() < (1e-6 if big else 1e-5)
    assert (ours["mean"] - mean).abs().max() < (1e-6 if big else 1e-3)
    if t > 0:
        assert (ours["log_variance"] - logvar).abs().max() < (1e-5 if big else 1e-3)


def test_float64_schedule_beats_float32_at_small_t(gd):
    "Why the tables are float64: diffusers' float32 √(1−ᾱ_0) is off by ~8e-5 relative (1 − 0.9999 cancels)."
    ac32 = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0)
    rel32 = abs((1 - ac32[0]).sqrt().item() / gd.sqrt_one_minus_alphas_cumprod[0] - 1)
    assert 1e-5 < rel32 < 1e-3
    x = torch.ones(1, 1, 1, 1)  # ours, cast to float32 after computing in float64: exact to float32 rounding
    assert abs(gd.q_sample(torch.zeros_like(x), 0, x).item() / gd.sqrt_one_minus_alphas_cumprod[0] - 1) < 1e-7


def test_respaced_agrees_with_diffusers_linspace(gd):
    "200 respaced steps = diffusers' timestep_spacing='linspace' (not its default 'leading', which stops at 995)."
    s = _scheduler(float64_from=gd, timestep_spacing="linspace")
    s.set_timesteps(200)
    d = gd.respace(space_timesteps(1000, 200))
    assert s.timesteps.flip(0).tolist() == d.timestep_map.tolist()
    lead = _scheduler()
    lead.set_timesteps(200)
    assert lead.timesteps.max().item() == 995 and 999 in d.timestep_map
    for i in [1, 24, 25, 100, 199]:
        x0, noise, out = _inputs(i)
        ti = torch.full((3,), i)
        x_t = d.q_sample(x0, ti, noise)
        assert (x_t - s.add_noise(x0, noise, d.model_timesteps(ti))).abs().max() < 1e-10
        prev, _, mean, logvar, z = _diffusers_step(s, out, int(d.timestep_map[i]), x_t, seed=i)
        ours = d.p_mean_variance(out, x_t, ti)
        assert (ours["mean"] - mean).abs().max() < 1e-10
        assert (ours["log_variance"] - logvar).abs().max() < 1e-10
        assert (d.p_sample(out, x_t, ti, z) - prev).abs().max() < 1e-10


# ------------------------------------------------------------------ the VB term
def test_normal_kl_identical_is_zero_and_matches_closed_form():
    rng = np.random.default_rng(0)
    m1, l1, m2, l2 = (rng.normal(size=50) for _ in range(4))
    T = lambda a: torch.from_numpy(a)
    assert normal_kl(T(m1), T(l1), T(m1), T(l1)).abs().max() < 1e-15  # 0 up to float64 rounding
    # closed form with variances s1, s2: log(σ2/σ1) + (s1 + (μ1−μ2)²) / (2 s2) − ½
    s1, s2 = np.exp(l1), np.exp(l2)
    ref = np.log(np.sqrt(s2) / np.sqrt(s1)) + (s1 + (m1 - m2) ** 2) / (2 * s2) - 0.5
    assert np.abs(normal_kl(T(m1), T(l1), T(m2), T(l2)).numpy() - ref).max() < 1e-12
    assert (normal_kl(T(m1), T(l1), T(m2), T(l2)) >= 0).all()
    assert torch.allclose(normal_kl(T(m1), 0.0, 0.0, 0.0), T(m1**2 / 2))  # float arguments broadcast


@pytest.mark.parametrize("mean,log_scale", [(0.0, 0.0), (0.3, -2.0), (-0.9, -4.0)])
def test_discretized_likelihood_sums_to_one(mean, log_scale):
    bins = -1 + 2 * torch.arange(256, dtype=torch.float64) / 255
    p = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale)).exp()
    assert abs(p.sum().item() - 1) < 1e-9 and (p >= 0).all()
    x = torch.linspace(-4, 4, 161, dtype=torch.float64)
    assert (approx_standard_normal_cdf(x) - 0.5 * (1 + torch.erf(x / math.sqrt(2)))).abs().max() < 2e-4


def test_vb_term_definition(gd):
    x0, noise, out = _inputs(1, B=4)
    t = torch.tensor([0, 1, 500, 999])
    x_t = gd.q_sample(x0, t, noise)
    vb = gd.vb_terms_bpd(out, x0, x_t, t)
    assert vb.shape == (4,) and (vb[1:] >= 0).all()
    p = gd.p_mean_variance(out, x_t, t)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2)
    qm, _, qlv = gd.q_posterior(x0, x_t, t)
    kl = mean_flat(normal_kl(qm, qlv, p["mean"], p["log_variance"])) / math.log(2)
    assert torch.allclose(vb[0], nll[0], rtol=0, atol=1e-12)  # t = 0: the decoder NLL
    assert torch.allclose(vb[1:], kl[1:], rtol=0, atol=1e-12)  # t > 0: the KL in bits/dim
    exact = torch.cat([noise, -torch.ones_like(noise)], 1)  # ε_θ = ε and Σ_θ = β̃_t: p_θ = q
    assert gd.vb_terms_bpd(exact, x0, x_t, t)[1:].abs().max() < 1e-10
    L = gd.training_losses(out, x0, t, noise)
    assert torch.equal(L["loss"], L["mse"] + L["vb"]) and torch.allclose(L["vb"], vb, rtol=0, atol=1e-12)
    assert torch.allclose(L["mse"], ((noise - out[:, :4]) ** 2).mean(dim=(1, 2, 3)))


def test_stop_gradient(gd):
    x0, noise, out = _inputs(2, B=4)
    out.requires_grad_(True)
    L = gd.training_losses(out, x0, torch.tensor([0, 3, 400, 999]), noise)
    (g_vb,) = torch.autograd.grad(L["vb"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(L["mse"].sum(), out)
    assert (g_vb[:, :4] == 0).all() and (g_vb[:, 4:] != 0).any(axis=(1, 2, 3)).all()  # VB trains only v
    assert (g_mse[:, 4:] == 0).all() and (g_mse[:, :4] != 0).all()  # MSE trains only ε


# ------------------------------------------------------------------ respacing
def test_space_timesteps():
    s = space_timesteps(1000, 200)
    assert len(s) == 200 and s[0] == 0 and s[-1] == 999
    assert s[:25] == list(range(0, 121, 5))  # stride 999/199 ≈ 5.02, rounded
    gaps = np.diff(s)
    assert set(gaps) == {5, 6} and [s[i] for i in np.where(gaps == 6)[0]] == [120, 371, 622, 873]
    assert space_timesteps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, 3) == [0, 500, 999]  # 499.5 rounds half to even
    assert space_timesteps(1000, 1000) == list(range(1000)) and space_timesteps(5, 1) == [0]
    with pytest.raises(ValueError, match="count"):
        space_timesteps(100, 101)


def test_respace(gd):
    kept = space_timesteps(1000, 200)
    d = gd.respace(kept)
    assert d.num_timesteps == 200 and d.timestep_map.tolist() == kept
    assert np.abs(d.alphas_cumprod - gd.alphas_cumprod[kept]).max() < 1e-12
    assert abs(d.betas[0] - gd.betas[0]) < 1e-15 and (d.betas[1:] > gd.betas[kept][1:]).all()  # each spans 5–6 steps
    assert np.abs(gd.respace(range(1000)).betas - gd.betas).max() < 1e-12
    assert np.abs(gd.respace(range(1000)).posterior_variance - gd.posterior_variance).max() < 1e-12
    dd = d.respace(range(0, 200, 4))  # composes: map stays original steps
    assert dd.timestep_map.tolist() == kept[::4]
    assert np.abs(dd.alphas_cumprod - gd.alphas_cumprod[kept[::4]]).max() < 1e-12
    assert d.model_timesteps(torch.tensor([0, 25, 199])).tolist() == [0, 126, 999]
    with pytest.raises(ValueError, match="use_timesteps"):
        d.respace([0, 200])


# ------------------------------------------------------------------ seeded noise and sampling
def test_noise_helpers():
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    a = randn_per_sample(gens([1, 2]), (3, 4))
    assert a.shape == (2, 3, 4) and torch.equal(a[1], torch.randn(3, 4, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(draw_noise((2, 3, 4), gens([1, 2])), a)
    assert torch.equal(
        draw_noise((2, 3), torch.Generator().manual_seed(5)),
        torch.randn(2, 3, generator=torch.Generator().manual_seed(5)),
    )
    with pytest.raises(ValueError, match="generators"):
        draw_noise((3, 2), gens([1]))


def test_sample_loop_noises_and_last_step(gd):
    "`noises` replaces the generator: x_T, then one tensor per step; the last step adds none."
    d = gd.respace(space_timesteps(1000, 3))
    calls = []

    def model(x, t):
        calls.append(t.tolist())
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1)

    zs = [torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    x = d.sample_loop(model, (2, 1, 2, 2), noises=zs)
    assert calls == [[999, 999], [500, 500], [0, 0]]  # the network sees the original steps
    ref = zs[0]
    for i, z in zip([2, 1, 0], zs[1:]):
        ref = d.p_sample(torch.zeros(2, 2, 2, 2), ref, torch.full((2,), i), z)
    assert torch.equal(x, ref)
    x_other_last = d.sample_loop(model, (2, 1, 2, 2), noises=zs[:3] + [zs[3] + 100])
    assert torch.equal(x, x_other_last)


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        in_channels=4,
        out_channels=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


@pytest.fixture(scope="module")
def tiny_unet():
    return _tiny_unet()


def test_pinned_losses_tiny_unet(gd, tiny_unet):
    # Pinned numbers, obtained once by running exactly this code (torch 2.14.1, diffusers 0.42.1, CPU, 1 and 2
    # threads gave the same 6 decimals); a change means the loss math or the model's seeded init changed.
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 4, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(4, 4, 16, 16, generator=g)
    with torch.no_grad():
        L = gd.model_losses(model_fn_diffusers(tiny_unet), x0, torch.tensor([0, 1, 500, 999]), noise)
    assert np.allclose(L["mse"].numpy(), [1.122585, 1.237900, 1.138576, 1.125738], rtol=0, atol=1e-3)
    assert np.allclose(L["vb"].numpy(), [2.528810, 0.786454, 0.009054, 0.016573], rtol=0, atol=1e-3)
    assert np.allclose(L["loss"].numpy(), [3.651395, 2.024354, 1.147631, 1.142311], rtol=0, atol=1e-3)


def test_pinned_sample_tiny_unet(gd, tiny_unet):
    # 10 respaced steps (0, 111, …, 999) from seeded noise; an untrained net, so values are large (x̂0 multiplies
    # ε by up to 156). Pinned as above; relative tolerance 1e-4.
    d10 = gd.respace(space_timesteps(1000, 10))
    x = d10.sample_loop(model_fn_diffusers(tiny_unet), (2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 16, 16) and torch.isfinite(x).all()
    assert math.isclose(x.abs().mean().item(), 148.43955, rel_tol=1e-4)
    assert math.isclose(x.sum().item(), -62595.51, rel_tol=1e-3)


def test_per_sample_generators_batch_independent(gd, tiny_unet):
    d10 = gd.respace(space_timesteps(1000, 10))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    fn = model_fn_diffusers(tiny_unet)
    a = d10.sample_loop(fn, (1, 4, 16, 16), generator=gens([3]))
    b = d10.sample_loop(fn, (3, 4, 16, 16), generator=gens([3, 4, 5]))
    assert (a[0] - b[0]).abs().max() <= 1e-5 * a.abs().max()  # batched conv only reorders float sums
    assert (b[0] - b[1]).abs().mean() > 1  # different generators, different samples
    one = d10.sample_loop(fn, (3, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    assert (one[0] - a[0]).abs().mean() > 1  # one generator for the batch: sample 0 is not the per-sample one


# --- the device tables: bit-identical to GaussianDiffusion on the CPU ---


def test_device_diffusion_is_bit_identical_on_cpu():
    base = GaussianDiffusion(linear_betas(1000)).respace(space_timesteps(1000, 50))
    dd = DeviceDiffusion(base)
    g = torch.Generator().manual_seed(0)
    x, n, mo = (
        torch.randn(5, 4, 6, 6, generator=g),
        torch.randn(5, 4, 6, 6, generator=g),
        torch.randn(5, 8, 6, 6, generator=g),
    )
    t = torch.tensor([0, 1, 17, 48, 49])
    assert torch.equal(dd.q_sample(x, t, n), base.q_sample(x, t, n))
    assert torch.equal(dd.q_step(x, t, n), base.q_step(x, t, n))
    assert torch.equal(dd.p_sample(mo, x, t, n), base.p_sample(mo, x, t, n))
    assert torch.equal(dd.p_sample(mo, x, t, n, grad=n), base.p_sample(mo, x, t, n, grad=n))
    for k, v in base.p_mean_variance(mo, x, t).items():
        assert torch.equal(dd.p_mean_variance(mo, x, t)[k], v), k
    assert torch.equal(dd.model_timesteps(t), base.model_timesteps(t))
    x64 = x.double()  # another dtype: its own table, still exact
    assert torch.equal(dd.q_sample(x64, t, n.double()), base.q_sample(x64, t, n.double()))


def test_ddim_step_matches_its_formula():
    base = GaussianDiffusion(linear_betas(1000)).respace(space_timesteps(1000, 20))
    dd = DeviceDiffusion(base)
    x, mo, z = torch.randn(2, 4, 5, 5), torch.randn(2, 8, 5, 5), torch.randn(2, 4, 5, 5)
    i = 9
    a, ap = base.alphas_cumprod[i], base.alphas_cumprod_prev[i]
    eps = mo[:, :4]
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    for eta in (0.0, 0.5, 1.0):
        sig = eta * np.sqrt((1 - ap) / (1 - a)) * np.sqrt(1 - a / ap)
        want = np.sqrt(ap) * x0 + np.sqrt(1 - ap - sig**2) * eps + sig * z
        assert torch.allclose(dd.ddim_sample(mo, x, i, z, eta), want.float(), atol=1e-5), eta
    sig1 = np.sqrt((1 - ap) / (1 - a)) * np.sqrt(1 - a / ap)
    assert np.isclose(sig1**2, base.posterior_variance[i])  # η = 1: the DDPM posterior variance
