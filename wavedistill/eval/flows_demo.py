"""The flow library on 2-D toys: densities by maximum likelihood, energies by reverse KL.

* Maximum likelihood (forward KL) on samples of two moons, eight Gaussians, rings and a checkerboard,
  with every family that evaluates densities in parallel (RealNVP, NICE, Glow-style
  ActNorm + 1×1 + coupling on vectors, MAF, CNF); scored by held-out NLL (nats per point).
* Reverse KL to the Rezende–Mohamed energies U1–U4 with the sampling-direction families (planar,
  Sylvester (Householder), IAF) at K = 2, 8, 32 layers; scored by ``E_q[log q + U]`` (the variational
  free energy ``F``), ``log Z`` by importance sampling with ``q`` as proposal, and
  ``KL(q‖p) = F + log Z`` with ``log Z`` from a fine grid.  U2–U4 are improper along ``z₁``; as is usual
  they are confined to the plotted box by a quadratic wall beyond ``|z₁| = 4``.

Writes ``flows_demo.png`` (learned densities next to the targets), ``flows_demo.json`` and
``flows_demo.md`` (the tables) into ``out``.  Used by ``wavedistill flows-demo`` and
``benchmarks/flows_demo.py``.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..flows import (
    CNF, IAF, MAF, ActNorm, FlowDistribution, FlowSequence, HouseholderSylvester, InvertibleConv1x1, MaskedCoupling,
    PlanarFlow, Scaling, StandardNormal, TimeMLP, alternating_mask,
)

DATASETS = ["two_moons", "eight_gaussians", "rings", "checkerboard"]
DENSITY_FAMILIES = ["realnvp", "nice", "glow", "maf", "cnf"]
ENERGIES = ["U1", "U2", "U3", "U4"]
VARIATIONAL_FAMILIES = ["planar", "sylvester", "iaf"]
DEPTHS = [2, 8, 32]
BOX = 4.0


# --- targets ----------------------------------------------------------------------------------------------------

def sample_dataset(name: str, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` points of a 2-D toy distribution (float32), roughly inside ``[-4, 4]²``."""
    if name == "two_moons":
        t = torch.rand(n, generator=g) * math.pi
        upper = torch.rand(n, generator=g) < 0.5
        x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
        y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
        pts = torch.stack([x - 0.5, y - 0.25], 1) * 2.0
        return pts + 0.1 * torch.randn(n, 2, generator=g)
    if name == "eight_gaussians":
        k = torch.randint(0, 8, (n,), generator=g).float() * (math.pi / 4)
        centres = 2.5 * torch.stack([torch.cos(k), torch.sin(k)], 1)
        return centres + 0.2 * torch.randn(n, 2, generator=g)
    if name == "rings":
        r = (torch.randint(0, 3, (n,), generator=g).float() + 1.0) * 0.95
        a = torch.rand(n, generator=g) * 2 * math.pi
        return r.unsqueeze(1) * torch.stack([torch.cos(a), torch.sin(a)], 1) + 0.08 * torch.randn(n, 2, generator=g)
    if name == "checkerboard":
        x1 = torch.rand(n, generator=g) * 4 - 2
        x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g).float() * 2
        x2 = x2 + torch.floor(x1) % 2
        return torch.stack([x1, x2], 1) * 1.8
    raise ValueError(f"unknown dataset {name!r}")


def energy(name: str, z: torch.Tensor) -> torch.Tensor:
    """Rezende & Mohamed (2015) U1–U4 (U2–U4 with a wall beyond ``|z₁| = 4``)."""
    z1, z2 = z[..., 0], z[..., 1]
    w1 = torch.sin(2 * math.pi * z1 / 4)
    if name == "U1":
        r = z.norm(dim=-1)
        return 0.5 * ((r - 2) / 0.4) ** 2 - torch.logaddexp(-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2)
    wall = 0.5 * ((z1.abs() - BOX).clamp_min(0) / 0.2) ** 2
    if name == "U2":
        return 0.5 * ((z2 - w1) / 0.4) ** 2 + wall
    if name == "U3":
        w2 = 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
        return -torch.logaddexp(-0.5 * ((z2 - w1) / 0.35) ** 2, -0.5 * ((z2 - w1 + w2) / 0.35) ** 2) + wall
    if name == "U4":
        w3 = 3 * torch.sigmoid((z1 - 1) / 0.3)
        return -torch.logaddexp(-0.5 * ((z2 - w1) / 0.4) ** 2, -0.5 * ((z2 - w1 + w3) / 0.35) ** 2) + wall
    raise ValueError(f"unknown energy {name!r}")


def grid_log_z(name: str, half: float = 7.0, step: float = 0.01) -> float:
    """``log ∫ exp(−U)`` by the midpoint rule on ``[−half, half]²`` (float64)."""
    axis = torch.arange(-half + step / 2, half, step, dtype=torch.float64)
    total = []
    for a in axis.split(200):
        pts = torch.cartesian_prod(a, axis)
        total.append(torch.logsumexp(-energy(name, pts), 0))
    return (torch.logsumexp(torch.stack(total), 0) + 2 * math.log(step)).item()


# --- models -----------------------------------------------------------------------------------------------------

def density_model(family: str, hidden: int = 64) -> FlowDistribution:
    """Transform data → base for maximum likelihood."""
    if family == "realnvp":
        t = FlowSequence([MaskedCoupling(alternating_mask(2, i % 2), hidden=hidden) for i in range(8)])
    elif family == "nice":
        t = FlowSequence([MaskedCoupling(alternating_mask(2, i % 2), affine=False, hidden=hidden) for i in range(6)] + [Scaling(2)])
    elif family == "glow":
        t = FlowSequence([f for i in range(4) for f in (ActNorm(2), InvertibleConv1x1(2, 0, seed=i),
                                                         MaskedCoupling(alternating_mask(2, i % 2), hidden=hidden))])
    elif family == "maf":
        t = FlowSequence([MAF(2, hidden=(hidden, hidden), order=torch.tensor([0, 1] if i % 2 == 0 else [1, 0]))
                          for i in range(5)])
    elif family == "cnf":
        # fixed-step RK4 while training (cheap, deterministic); evaluation switches to dopri5 (see _eval_cnf)
        t = CNF(2, TimeMLP(2, hidden, 2), method="rk4", options={"step_size": 0.25})
    else:
        raise ValueError(f"unknown density family {family!r}")
    return FlowDistribution(StandardNormal(2), t)


def variational_model(family: str, depth: int, hidden: int = 32) -> FlowDistribution:
    """Sampling-direction flows, entered as ``.inv`` (the transform maps data → base)."""
    if family == "planar":
        flows = [PlanarFlow(2, init_scale=0.5) for _ in range(depth)]
    elif family == "sylvester":
        # Householder Q (2 reflections): exact and cheap; the orthogonal variant's iterative
        # orthogonalisation costs ~10 matrix products per layer and step (K = 32: 4× slower).
        flows = [HouseholderSylvester(2, reflections=2, init_scale=0.3) for _ in range(depth)]
    elif family == "iaf":
        flows = [IAF(2, hidden=(hidden, hidden), order=torch.tensor([0, 1] if i % 2 == 0 else [1, 0]))
                 for i in range(depth)]
    else:
        raise ValueError(f"unknown variational family {family!r}")
    return FlowDistribution(StandardNormal(2), FlowSequence(flows).inv)


# --- training and evaluation ------------------------------------------------------------------------------------

def _grid(res: int) -> torch.Tensor:
    axis = torch.linspace(-BOX, BOX, res)
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)


def _density_image(model: FlowDistribution, res: int) -> torch.Tensor:
    with torch.no_grad():
        pts = _grid(res)
        lp = torch.cat([model.log_prob(p) for p in pts.split(4096)])
    return lp.exp().reshape(res, res)


def _use_accurate_solver(model: FlowDistribution) -> None:
    t = model.transform
    if isinstance(t, CNF):
        t.method, t.options, t.atol, t.rtol = "dopri5", None, 1e-5, 1e-5


def fit_density(dataset: str, family: str, steps: int, batch: int, n_test: int, res: int, seed: int) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = density_model(family)
    with torch.no_grad():
        model.log_prob(sample_dataset(dataset, 1024, g))  # ActNorm's data-dependent initialisation
    opt = torch.optim.Adam(model.parameters(), lr=2e-3 if family != "cnf" else 5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = model.forward_kl_loss(sample_dataset(dataset, batch, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    _use_accurate_solver(model)
    test = sample_dataset(dataset, n_test, torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        nll = -torch.cat([model.log_prob(p) for p in test.split(4096)])
    out = {"dataset": dataset, "family": family, "steps": steps, "train_seconds": round(train_s, 2),
           "test_nll": nll.mean().item(), "test_nll_se": (nll.std() / math.sqrt(len(nll))).item()}
    if isinstance(model.transform, CNF):
        model.log_prob(test[:256])
        out["cnf_eval"] = {"method": "dopri5", "atol": 1e-5, "rtol": 1e-5, "nfe": model.transform.nfe,
                           "train": {"method": "rk4", "step_size": 0.25}}
    return out, _density_image(model, res)


def fit_energy(name: str, family: str, depth: int, steps: int, batch: int, n_is: int, res: int, seed: int,
               log_z_grid: float) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = variational_model(family, depth)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3 if family != "iaf" else 2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    t0 = time.perf_counter()
    for step in range(steps):
        beta = min(1.0, 0.2 + 0.8 * step / max(1, steps // 2))  # anneal the energy in over the first half
        loss = model.reverse_kl_loss(lambda x: -beta * energy(name, x), batch, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        x, log_q = model.rsample_and_log_prob(n_is, generator=torch.Generator().manual_seed(10_000 + seed))
        log_w = (-energy(name, x) - log_q).double()
        free_energy = (-log_w).mean().item()  # E_q[log q + U]
        log_z_is = (torch.logsumexp(log_w, 0) - math.log(n_is)).item()
        ess = (torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)) / n_is).item()
    out = {"energy": name, "family": family, "K": depth, "steps": steps, "train_seconds": round(train_s, 2),
           "free_energy": free_energy, "log_z_is": log_z_is, "log_z_grid": log_z_grid,
           "kl": free_energy + log_z_grid, "ess_fraction": ess}
    return out, _density_image(model, res)


# --- report -----------------------------------------------------------------------------------------------------

def _data_image(dataset: str, res: int) -> torch.Tensor:
    pts = sample_dataset(dataset, 200_000, torch.Generator().manual_seed(7))
    edges = torch.linspace(-BOX, BOX, res + 1)
    h, _ = torch.histogramdd(pts, bins=[edges, edges])
    return h.T  # rows = y


def _energy_image(name: str, res: int) -> torch.Tensor:
    pts = _grid(res)
    return torch.exp(-energy(name, pts)).reshape(res, res)


def plot_png(density_imgs: dict, energy_imgs: dict, res: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + len(VARIATIONAL_FAMILIES) * len(DEPTHS)
    rows = len(DATASETS) + len(ENERGIES)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.95, rows * 1.02))
    kw = dict(origin="lower", extent=(-BOX, BOX, -BOX, BOX), cmap="magma", interpolation="nearest")
    for r, ds in enumerate(DATASETS):
        heads = ["data"] + DENSITY_FAMILIES
        imgs = [_data_image(ds, res)] + [density_imgs[(ds, f)] for f in DENSITY_FAMILIES]
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                ax.imshow(imgs[c].numpy(), **kw)
                ax.set_title(heads[c] if r == 0 else "", fontsize=6)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(ds.replace("_", " "), fontsize=6)
    for i, en in enumerate(ENERGIES):
        r = len(DATASETS) + i
        heads = ["exp(-U)"] + [f"{f} K={k}" for f in VARIATIONAL_FAMILIES for k in DEPTHS]
        imgs = [_energy_image(en, res)] + [energy_imgs[(en, f, k)] for f in VARIATIONAL_FAMILIES for k in DEPTHS]
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(imgs[c].numpy(), **kw)
            ax.set_title(heads[c] if i == 0 else "", fontsize=5)
        axes[r, 0].set_ylabel(en, fontsize=6)
    fig.subplots_adjust(left=0.03, right=0.995, bottom=0.005, top=0.975, wspace=0.06, hspace=0.2)  # tight_layout: ~10 s
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    return buf.getvalue()


def markdown_tables(report: dict) -> str:
    lines = ["### Maximum likelihood: held-out NLL (nats per point, lower is better)", "",
             "| dataset | " + " | ".join(DENSITY_FAMILIES) + " |", "|---|" + "---:|" * len(DENSITY_FAMILIES)]
    by = {(r["dataset"], r["family"]): r for r in report["density"]}
    for ds in DATASETS:
        lines.append(f"| {ds} | " + " | ".join(f"{by[(ds, f)]['test_nll']:.3f}" for f in DENSITY_FAMILIES) + " |")
    lines += ["", "### Reverse KL to U1–U4: KL(q‖p) = E_q[log q + U] + log Z_grid (nats, lower is better); "
              "log Z by importance sampling (q as proposal) vs the grid", "",
              "| energy | log Z (grid) | " + " | ".join(f"{f} K={k}" for f in VARIATIONAL_FAMILIES for k in DEPTHS) + " |",
              "|---|---:|" + "---:|" * (len(VARIATIONAL_FAMILIES) * len(DEPTHS))]
    bv = {(r["energy"], r["family"], r["K"]): r for r in report["variational"]}
    for en in ENERGIES:
        cells = [f"{bv[(en, f, k)]['kl']:.3f} ({bv[(en, f, k)]['log_z_is']:.3f})" for f in VARIATIONAL_FAMILIES for k in DEPTHS]
        lines.append(f"| {en} | {report['log_z_grid'][en]:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "Cells of the second table: KL (log Z by importance sampling).", ""]
    return "\n".join(lines)


def run_flows_demo(out: str | Path, steps: int | None = None, quick: bool = False, threads: int = 1, seed: int = 0) -> dict:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; give a directory path")
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    cfg = dict(steps=steps or (15 if quick else 500), batch=64 if quick else 256, n_test=256 if quick else 4000,
               n_is=256 if quick else 20000, res=16 if quick else 64, grid_step=0.1 if quick else 0.01)
    cfg["variational_steps"] = steps or (15 if quick else 400)
    t0 = time.perf_counter()
    report = {"config": {**cfg, "quick": quick, "threads": threads, "seed": seed}, "density": [], "variational": [],
              "log_z_grid": {}}
    density_imgs, energy_imgs = {}, {}
    for i, ds in enumerate(DATASETS):
        for j, fam in enumerate(DENSITY_FAMILIES):
            r, img = fit_density(ds, fam, cfg["steps"], cfg["batch"], cfg["n_test"], cfg["res"], seed + 100 * i + j)
            report["density"].append(r)
            density_imgs[(ds, fam)] = img
    for i, en in enumerate(ENERGIES):
        log_z = grid_log_z(en, step=cfg["grid_step"])
        report["log_z_grid"][en] = log_z
        for j, fam in enumerate(VARIATIONAL_FAMILIES):
            for k in DEPTHS:
                r, img = fit_energy(en, fam, k, cfg["variational_steps"], cfg["batch"], cfg["n_is"], cfg["res"],
                                    seed + 1000 + 100 * i + 10 * j + k, log_z)
                report["variational"].append(r)
                energy_imgs[(en, fam, k)] = img
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "flows_demo.png", plot_png(density_imgs, energy_imgs, cfg["res"]))
    atomic_write_json(out / "flows_demo.json", report)
    atomic_write_text(out / "flows_demo.md", markdown_tables(report))
    return report
