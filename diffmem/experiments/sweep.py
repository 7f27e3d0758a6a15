"""``diffmem sweep``: the phase-transition experiment over a (d, K, N) grid (SPEC F.5: 64
configurations), one folder per configuration under the sweep folder, ``--shard i/n`` to split
the configurations across processes, and a summary (summary.json, printed table, summary.png)
of the measured transition against the predicted crossover.

Under torchrun (RANK and WORLD_SIZE set) each process takes the shard RANK/WORLD_SIZE unless
--shard is given (they must then agree), and --device cuda means cuda:LOCAL_RANK; the processes
share nothing but the sweep folder, so no process group is needed.

With --data templates the grid is over the colored templates' own parameters: image side
(d = 3 side^2), number of templates K and N (default GRIDS["templates"]: 2 x 2 x 2 around the
paper's 15x15, K = 6, N = 100 run), asking the same question: does the transition stay near
the measured crossover as the configuration changes?"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

from .args import config_from_args, out_folder
from .budget import check_memory
from .config import GRIDS, ConfigError
from .results import read_json, writable_folder, write_json
from .runner import kind_for, run_phase_transition
from .runtime import Runtime, check_runtime, runtime_from_args


def configurations(dims, components, samples) -> list[tuple[int, int, int]]:
    """All (d, K, N) in the order d, then K, then N."""
    return list(itertools.product(dims, components, samples))


def summary_row(results: dict) -> dict:
    """One summary line of a results.json: transition (fractions of N) and predictions."""
    c, tr, p = results["config"], results["transition"], results["predictions"]
    return {"tag": f"d{c['dim']}-K{c['components']}-N{c['samples']}",
            "data": c.get("data", "gmm"), "dim": c["dim"],
            "components": c["components"], "samples": c["samples"],
            "start_fraction": tr.get("start_fraction"), "end_fraction": tr.get("end_fraction"),
            "midpoint_fraction": tr.get("midpoint_fraction"), "coded": p.get("coded"),
            "instancewise": p.get("instancewise"), "measured": p.get("measured")}


def summarize(root: Path, data: str | None = None) -> list[dict]:
    """Rows for every finished configuration folder under root (sorted by d, K, N); only those
    of data kind `data` ("gmm" or "templates") when given."""
    rows = []
    for path in sorted(root.glob("*/results.json")):
        r = read_json(path)
        if r.get("transition", {}).get("start_fraction") is not None:
            row = summary_row(r)
            if data is None or row["data"] == data:
                rows.append(row)
    return sorted(rows, key=lambda r: (r["dim"], r["components"], r["samples"]))


def format_table(rows: list[dict]) -> str:
    f = lambda v: "   -  " if v is None else f"{v:6.3f}"  # noqa: E731
    lines = ["config            start    rho=.5   end    | coded  inst.  measured",
             "-" * 66]
    for r in rows:
        lines.append(f"{r['tag']:<16} {f(r['start_fraction'])} {f(r['midpoint_fraction'])} "
                     f"{f(r['end_fraction'])} | {f(r['coded'])} {f(r['instancewise'])} "
                     f"{f(r['measured'])}")
    return "\n".join(lines)


def launcher_shard(environ=None) -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when torchrun (or another launcher) set both, else None; ConfigError
    for values that are not a rank in [0, WORLD_SIZE)."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    text = f"RANK={environ['RANK']!r} WORLD_SIZE={environ['WORLD_SIZE']!r}"
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
    except ValueError:
        raise ConfigError(f"torchrun environment: expected integers, got {text}") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"torchrun environment: need WORLD_SIZE >= 1 and 0 <= RANK < "
                          f"WORLD_SIZE, got {text}")
    return rank, world


def pick_shard(given: tuple[int, int] | None, environ=None) -> tuple[int, int]:
    """The shard (i, n) of this process: --shard, else torchrun's RANK/WORLD_SIZE, else (0, 1);
    ConfigError when --shard and the launcher's variables disagree."""
    launched = launcher_shard(environ)
    if given is not None and launched is not None and tuple(given) != launched:
        raise ConfigError(f"--shard {given[0]}/{given[1]} disagrees with torchrun's RANK="
                          f"{launched[0]} WORLD_SIZE={launched[1]}; give one or the other")
    return tuple(given) if given is not None else launched or (0, 1)


def local_device(runtime: Runtime, environ=None) -> Runtime:
    """runtime with --device cuda made cuda:LOCAL_RANK when a launcher set LOCAL_RANK (one GPU
    per process); unchanged otherwise."""
    environ = os.environ if environ is None else environ
    if runtime.device != "cuda" or "LOCAL_RANK" not in environ:
        return runtime
    try:
        local = int(environ["LOCAL_RANK"])
    except ValueError:
        raise ConfigError(f"torchrun environment: LOCAL_RANK must be an integer, got "
                          f"{environ['LOCAL_RANK']!r}") from None
    return check_runtime(dataclasses.replace(runtime, device=f"cuda:{local}"))


def run_sweep(args) -> int:
    """Handler of the sweep subcommand; returns the exit code (ConfigError for bad input)."""
    i, n = pick_shard(args.shard)
    runtime = local_device(runtime_from_args(args))
    grid = dict(zip(("dims", "components", "samples"), GRIDS[args.data]))
    for name in grid:
        values = getattr(args, name)
        if values is not None:
            if any(v < 1 for v in values):
                raise ConfigError(f"--{name} values must be positive, got {values}")
            grid[name] = values
    configs = configurations(grid["dims"], grid["components"], grid["samples"])
    # validate every configuration (and its memory) before running any
    built = [config_from_args(args, dim=d, components=k, samples=n) for d, k, n in configs]
    for config in built:
        check_memory(config, kind_for(config))
    kind = "" if args.data == "gmm" else f"{args.data}-"
    root = writable_folder(out_folder(args, f"runs/sweep-{kind}{built[0].preset}-s{built[0].seed}"))
    mine = [c for j, c in enumerate(built) if j % n == i]
    for j, config in enumerate(mine):
        folder = root / config.tag()
        if not args.quiet:
            print(f"[sweep {j + 1}/{len(mine)} of shard {i}/{n}] {config.tag()}", flush=True)
        run_phase_transition(config, folder, resume=args.resume, quiet=args.quiet,
                             plots=not args.no_plots, runtime=runtime)
    rows = summarize(root, args.data)
    write_json(root / "summary.json", {"schema": "diffmem.sweep/1", "data": args.data,
                                       "runtime": runtime.record(), "shard": [i, n],
                                       "rows": rows})
    print(format_table(rows))
    if not args.no_plots:
        from .plots import plot_sweep
        plot_sweep(rows, root / "summary.png")
    print(f"summary: {root / 'summary.json'}")
    return 0


__all__ = ["configurations", "format_table", "launcher_shard", "local_device", "pick_shard",
           "run_sweep", "summarize", "summary_row"]
