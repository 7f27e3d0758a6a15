"""PNG figures of a phase-transition run (SPEC I) and of a sweep, each written atomically
(diffmem.files); matplotlib is imported lazily, and every function returns [] when it is not
installed."""

from __future__ import annotations

from pathlib import Path

from ..files import atomic_write


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _vlines(ax, results):
    tr, pred = results["transition"], results["predictions"]
    ax.axvline(tr["start_fraction"], color="gray", ls=":", label="transition start/end")
    ax.axvline(tr["end_fraction"], color="gray", ls=":")
    styles = {"coded": "tab:red", "instancewise": "tab:purple", "measured": "tab:green"}
    for k, color in styles.items():
        if pred.get(k) is not None:
            ax.axvline(pred[k], color=color, ls="--", lw=1, label=f"predicted M*/N ({k})")


def _save(fig, path, made):
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    made.append(str(path))


def plot_run(results: dict, folder) -> list[str]:
    """Memorization ratio, learned variance, learned-means distances and losses (x0 units, at the
    config's plot t indices, and averaged) against M/N. Returns the files written."""
    plt = _pyplot()
    if plt is None:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made: list[str] = []
    N = results["config"]["samples"]
    f, trained = results["fractions"], results["trained"]
    sizes = results["sizes"]

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(f, results["memorization_ratio"], "o-", color="tab:blue", label="trained")
    _vlines(ax, results)
    ax.set(xlabel="M / N", ylabel="memorization ratio", ylim=(-0.05, 1.05),
           title=results["config"]["preset"] + " " + _tag(results))
    ax.legend(fontsize=6)
    _save(fig, folder / "memorization_ratio.png", made)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy(f, results["variance"], "o-")
    ax.set(xlabel="M / N", ylabel="learned variance", title=_tag(results))
    _save(fig, folder / "variance.png", made)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("mean_dT1", "to nearest true mean"), ("mean_dS1", "to nearest sample")):
        ax.plot(f, [trained[str(m)]["learned_means"][key] for m in sizes], "o-", label=label)
    ax.set(xlabel="M / N", ylabel="avg distance of learned means", title=_tag(results))
    ax.legend(fontsize=7)
    _save(fig, folder / "learned_means_distances.png", made)
    plt.close(fig)

    scale, base = results["x0_scale"], results["baselines"]
    pm_sizes = sorted(int(m) for m in base["partial_mem"])
    for split in ("train", "val"):
        panels = [(f"t = {results['grid'][j]:.3f}", lambda v, j=j: v[j] * scale[j])
                  for j in results["config"]["plot_t_indices"]]
        panels.append(("average over t", lambda v: sum(a * b for a, b in zip(v, scale)) / len(v)))
        for title, reduce in panels:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.plot(f, [reduce(trained[str(m)][f"{split}_loss"]) for m in sizes], "o",
                    color="tab:blue", label="trained")
            ax.plot([m / N for m in pm_sizes],
                    [reduce(base["partial_mem"][str(m)][split]) for m in pm_sizes],
                    color="tab:red", label="partially memorizing")
            if split == "train" and "partial_mem_approx" in base:
                ax.plot([m / N for m in pm_sizes],
                        [reduce(base["partial_mem_approx"][str(m)]["train"]) for m in pm_sizes],
                        color="tab:red", ls=":", label="pmem approx (coded)")
                ax.axhline(reduce(base["ground_truth_approx"]["train"]), color="green", ls=":",
                           label="ground truth approx")
            ax.axhline(reduce(base["memorizing"][split]), color="goldenrod", ls="--",
                       label="memorizing")
            ax.axhline(reduce(base["ground_truth"][split]), color="green", ls="--",
                       label="ground truth")
            ax.set_yscale("log")
            ax.set(xlabel="M / N", ylabel=f"{split} loss (x0 units)",
                   title=f"{title}, {_tag(results)}")
            ax.legend(fontsize=6)
            name = "avg" if title.startswith("average") else title.split("= ")[1].replace(".", "_")
            _save(fig, folder / f"{split}_loss_{name}.png", made)
            plt.close(fig)
    return made


def plot_samples(samples: dict, folder, name: str = "generated_samples.png") -> list[str]:
    """One row of generated images per size M: samples {M: (n, C, H, W)}, shown as RGB
    (C = 3) or gray (first channel), each image min-max scaled to [0, 1]."""
    plt = _pyplot()
    if plt is None or not samples:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = sorted(samples)
    n = max(v.shape[0] for v in samples.values())
    fig, axes = plt.subplots(len(sizes), n, figsize=(0.9 * n + 0.6, 0.9 * len(sizes) + 0.3),
                             squeeze=False)
    for i, M in enumerate(sizes):
        for j in range(n):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < samples[M].shape[0]:
                x = samples[M][j].double()
                x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
                img = x.permute(1, 2, 0).numpy() if x.shape[0] == 3 else x[0].numpy()
                ax.imshow(img, cmap=None if x.shape[0] == 3 else "gray")
            if j == 0:
                ax.set_ylabel(f"M={M}", fontsize=7)
    made: list[str] = []
    _save(fig, folder / name, made)
    plt.close(fig)
    return made


def _tag(results) -> str:
    c = results["config"]
    return f"d={c['dim']} K={c['components']} N={c['samples']}"


def plot_sweep(rows: list[dict], path) -> list[str]:
    """Measured transition (start, rho=0.5, end as fractions of N) vs predicted M*/N per config."""
    plt = _pyplot()
    if plt is None or not rows:
        return []
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(rows)), 3.5))
    x = list(range(len(rows)))
    get = lambda k: [r.get(k) if r.get(k) is not None else float("nan") for r in rows]  # noqa
    ax.vlines(x, get("start_fraction"), get("end_fraction"), color="gray", label="transition")
    ax.plot(x, get("midpoint_fraction"), "o", color="tab:blue", label="rho = 0.5")
    for k, c in (("coded", "tab:red"), ("instancewise", "tab:purple"), ("measured", "tab:green")):
        ax.plot(x, get(k), "_", ms=12, color=c, label=f"predicted ({k})")
    ax.set_xticks(x, [r["tag"] for r in rows], rotation=90, fontsize=6)
    ax.set(ylabel="M / N")
    ax.legend(fontsize=6)
    made: list[str] = []
    _save(fig, path, made)
    plt.close(fig)
    return made


def _image(values, lo: float, hi: float):
    """(H, W, C) values in [lo, hi] -> an array imshow takes (gray for C = 1)."""
    import numpy as np

    v = np.clip((np.asarray(values, dtype=np.float64) - lo) / (hi - lo or 1.0), 0, 1)
    return v[..., 0] if v.shape[-1] == 1 else v


def plot_sample_pairs(rows, path, lo: float = -1.0, hi: float = 1.0) -> list[str]:
    """One row per denoiser: each sample beside its nearest training image, with d1/d2 under
    the pair. rows: [(label, samples (n, H, W, C), nearest (n, H, W, C), ratios (n,))];
    values shown on [lo, hi]. Returns the files written ([] without matplotlib)."""
    plt = _pyplot()
    if plt is None or not rows:
        return []
    n = max(r[1].shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), 2 * n, figsize=(1.1 * 2 * n, 1.45 * len(rows)),
                             squeeze=False)
    for i, (label, samples, nearest, ratios) in enumerate(rows):
        for j in range(n):
            for k, (img, title) in enumerate(((samples, "sample"), (nearest, "nearest"))):
                ax = axes[i, 2 * j + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if j >= img.shape[0]:
                    ax.axis("off")
                    continue
                ax.imshow(_image(img[j], lo, hi), cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
                if i == 0:
                    ax.set_title(title, fontsize=6)
            if j < samples.shape[0]:
                axes[i, 2 * j].set_xlabel(f"d1/d2 {ratios[j]:.2f}", fontsize=6, loc="left")
        axes[i, 0].set_ylabel(label, fontsize=6)
    made: list[str] = []
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path, made)
    plt.close(fig)
    return made


def plot_crossover_vs_n(rows: list[dict], path, title: str = "") -> list[str]:
    """Predicted M*/N (coded, instance-wise, measured with +-1 SE bars) against N, log x; rows
    as in crossover_vs_n.json."""
    plt = _pyplot()
    if plt is None or not rows:
        return []
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    n = [r["samples"] for r in rows]
    get = lambda k: [r.get(k) if r.get(k) is not None else float("nan") for r in rows]  # noqa
    ax.plot(n, get("coded"), "--", color="tab:red", label="coded (closed form)")
    ax.plot(n, get("instancewise"), "s-", color="tab:purple", ms=4, label="instance-wise")
    if any(r.get("measured") is not None for r in rows):
        se = [v if v == v else 0.0 for v in get("measured_se")]
        ax.errorbar(n, get("measured"), yerr=se, fmt="o-", color="tab:green", ms=4, capsize=3,
                    label="measured (+-1 SE)")
    ax.set_xscale("log")
    ax.set(xlabel="N (training points)", ylabel="predicted M* / N", title=title)
    ax.legend(fontsize=7)
    made: list[str] = []
    _save(fig, path, made)
    plt.close(fig)
    return made


__all__ = ["plot_crossover_vs_n", "plot_run", "plot_sample_pairs", "plot_samples", "plot_sweep"]
