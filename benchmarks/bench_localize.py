"""Benchmark: DPN-LE localization of five traits over Llama-3-8B-shaped statistics.

Synthetic statistics (32 layers x 14,336 MLP neurons, 1,000 high + 1,000 low samples per
trait: the means and variances are generated directly, not 2,000 x 458k raw activations).
Timed, for the five traits together:

- ``vectorized``: dpnle.localize.select_dpnle over layers 12-31, the neurons Parquet written
  into a run directory, then the cross-trait overlap table (what `dpnle localize --all` does
  after reading the statistics);
- ``end-to-end``: dpnle.localize.localize_all on a run whose captures hold the statistics in
  collect's stats.parquet format (adds reading them back and the manifest bookkeeping);
- ``naive``: the same selection written the obvious way (per-neuron Python loop, a list of
  dicts into pandas, groupby-rank weights, Python-set overlap), to show what vectorizing buys.

Run:  python benchmarks/bench_localize.py [--traits 5] [--skip-naive]
Target (issue 4): under 30 s for the five traits on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from dpnle import localize as loc
from dpnle.concepts import TRAITS
from dpnle.runs import Run, write_parquet
from dpnle.stats import LayerStats

LAYERS, WIDTH, N_HIGH, N_LOW = 32, 14_336, 1_000, 1_000
TARGET_LAYERS = list(range(12, 32))
QUANTILE, TAU = 0.995, 0.8
MODEL_ID = "meta-llama/Meta-Llama-3-8B-Instruct"
TARGET_S = 30.0


def synthetic_stats(concept: str, seed: int) -> LayerStats:
    """Means and unbiased variances as a 1,000 / 1,000 capture would give them.

    Most neurons differ by noise (|d| ~ 0.05); about 1% carry the trait with |d| ~ 1, and
    their shift is large in absolute terms too, so both DPN-LE criteria have work to do.
    """
    rng = np.random.default_rng(seed)
    shape = (LAYERS, WIDTH)
    sd = np.exp(rng.normal(-2.0, 0.7, shape))
    base = rng.normal(0.0, 0.05, shape)
    d = rng.normal(0.0, 0.05, shape)
    carriers = rng.random(shape) < 0.01
    d[carriers] = rng.choice([-1.0, 1.0], carriers.sum()) * rng.uniform(0.5, 1.6, carriers.sum())
    sd[carriers] *= 3.0
    delta = d * sd
    var_high = sd**2 * rng.chisquare(N_HIGH - 1, shape) / (N_HIGH - 1)
    var_low = sd**2 * rng.chisquare(N_LOW - 1, shape) / (N_LOW - 1)
    return LayerStats(
        concept=concept,
        site="mlp",
        policy="last",
        layers=list(range(LAYERS)),
        n_high=np.full(LAYERS, N_HIGH, dtype=np.int64),
        n_low=np.full(LAYERS, N_LOW, dtype=np.int64),
        mean_high=base + delta,
        mean_low=base,
        var_high=var_high,
        var_low=var_low,
        meta={
            "model": {"id": MODEL_ID, "digest": "synthetic", "num_layers": LAYERS, "intermediate_size": WIDTH}
        },
    )


# ---------------------------------------------------------------------------------------------
# vectorized (dpnle)


def timed(fn, *args):
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def run_vectorized(run: Run, all_stats: dict[str, LayerStats]) -> dict[str, pd.DataFrame]:
    selections = {}
    for concept, stats in all_stats.items():
        frame = loc.select_dpnle(stats, TARGET_LAYERS, quantile=QUANTILE, d_threshold=TAU)
        write_parquet(
            run.neurons_path(concept), frame, {"method": "dpnle", "quantile": QUANTILE, "d_threshold": TAU}
        )
        selections[concept] = frame[frame["selected"]]
    table = loc.overlap_from_selections(selections)
    write_parquet(loc.overlap_path(run), table, {"method": "dpnle"})
    return selections


# ---------------------------------------------------------------------------------------------
# end-to-end through the capture's stats.parquet


def write_capture(run: Run, stats: LayerStats) -> None:
    """dpnle.collect's capture format: manifest.json and stats.parquet, one row per (pole,
    layer) with n and float64 lists mean, m2 (= var * (n - 1)) and pos_frac_sum (null here)."""
    poles, layers, counts, rows_mean, rows_m2 = [], [], [], [], []
    for pole, n, mean, var in (
        ("high", stats.n_high, stats.mean_high, stats.var_high),
        ("low", stats.n_low, stats.mean_low, stats.var_low),
    ):
        for r, layer in enumerate(stats.layers):
            poles.append(pole)
            layers.append(layer)
            counts.append(int(n[r]))
            rows_mean.append(mean[r])
            rows_m2.append(var[r] * (int(n[r]) - 1))
    offsets = pa.array(np.arange(len(poles) + 1, dtype=np.int32) * WIDTH, pa.int32())
    table = pa.table(
        {
            "pole": pa.array(poles, pa.string()),
            "layer": pa.array(layers, pa.int16()),
            "n": pa.array(counts, pa.int64()),
            "mean": pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(rows_mean))),
            "m2": pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(rows_m2))),
            "pos_frac_sum": pa.nulls(len(poles), pa.list_(pa.float64())),
        }
    )
    folder = run.activations_dir(stats.concept) / "mlp-last"
    folder.mkdir(parents=True, exist_ok=True)
    write_parquet(folder / "stats.parquet", table, {"kind": "stats", "concept": stats.concept})
    manifest = {
        "kind": "activations",
        "concept": stats.concept,
        "site": "mlp",
        "policy": "last",
        "layers": stats.layers,
        "width": WIDTH,
        "model": {"id": MODEL_ID, "fingerprint": stats.meta["model"]},
        "pairs": {"digest": "synthetic", "num_pairs": N_HIGH},
        "num_samples": N_HIGH + N_LOW,
        "shard_size": 256,
        "status": "done",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def run_end_to_end(run: Run) -> list:
    return loc.localize_all(run, method="dpnle", quantile=QUANTILE, d_threshold=TAU, layers="12-31")


# ---------------------------------------------------------------------------------------------
# naive baseline


def run_naive(out_dir: Path, all_stats: dict[str, LayerStats]) -> dict[str, set]:
    sets: dict[str, dict] = {}
    for concept, s in all_stats.items():
        rows = []
        for layer in TARGET_LAYERS:
            n_h, n_l = int(s.n_high[layer]), int(s.n_low[layer])
            deltas = [s.mean_high[layer, i] - s.mean_low[layer, i] for i in range(WIDTH)]
            cut = float(np.quantile(np.abs(deltas), QUANTILE))
            for i in range(WIDTH):
                vh, vl = s.var_high[layer, i], s.var_low[layer, i]
                pooled = ((n_h - 1) * vh + (n_l - 1) * vl) / (n_h + n_l - 2)
                d = deltas[i] / math.sqrt(pooled + 1e-8)
                keep = abs(deltas[i]) > cut and abs(d) > TAU
                rows.append(
                    {
                        "layer": layer,
                        "neuron": i,
                        "mean_high": s.mean_high[layer, i],
                        "mean_low": s.mean_low[layer, i],
                        "var_high": vh,
                        "var_low": vl,
                        "n_high": n_h,
                        "n_low": n_l,
                        "delta": deltas[i],
                        "cohens_d": d,
                        "selected": keep,
                        "pole": ("high" if d > 0 else "low") if keep else None,
                    }
                )
        frame = pd.DataFrame(rows)
        sel = frame[frame["selected"]]
        ranks = sel.assign(a=sel["cohens_d"].abs()).groupby("layer")["a"].rank(method="first") - 1
        sizes = sel.groupby("layer")["layer"].transform("size")
        frame["weight"] = (0.75 + 0.25 * ranks / (sizes - 1)).where(sizes > 1, 1.0)
        frame.to_parquet(out_dir / f"{concept}.naive.parquet")
        sets[concept] = {(r.layer, r.neuron): r.pole for r in sel.itertuples(index=False)}
    names = list(sets)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = set(sets[a]) & set(sets[b])
            union = set(sets[a]) | set(sets[b])
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "shared": len(shared),
                    "jaccard": len(shared) / len(union),
                    "opposite": sum(sets[a][k] != sets[b][k] for k in shared),
                }
            )
    pd.DataFrame(rows).to_parquet(out_dir / "overlap.naive.parquet")
    return {c: set(v) for c, v in sets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traits", type=int, default=5)
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    concepts = list(TRAITS[: args.traits])

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"numpy {np.__version__}, pandas {pd.__version__}"
    )
    print(
        f"shape: {LAYERS} layers x {WIDTH} neurons, {N_HIGH}+{N_LOW} samples/trait, layers 12-31, "
        f"q={QUANTILE}, tau={TAU}, {len(concepts)} traits"
    )
    t0 = time.perf_counter()
    all_stats = {c: synthetic_stats(c, seed) for seed, c in enumerate(concepts)}
    print(f"setup: synthetic statistics {time.perf_counter() - t0:.2f} s")

    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    verdict = lambda s: "PASS" if s < TARGET_S else "FAIL"  # noqa: E731
    code = "import time; t = time.perf_counter(); import dpnle.localize, dpnle.collect; print(time.perf_counter() - t)"
    import_s = float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    print(
        f"import dpnle.localize + dpnle.collect in a fresh process (numpy, pandas, pyarrow, torch): {import_s:.2f} s"
    )

    with tempfile.TemporaryDirectory() as tmp:
        run = Run.create_or_open("bench", MODEL_ID, root=Path(tmp))
        for stats in all_stats.values():
            write_capture(run, stats)

        selections, vec_s, vec_cpu = timed(run_vectorized, run, all_stats)
        counts = {
            c: (int((s["pole"] == "high").sum()), int((s["pole"] == "low").sum()))
            for c, s in selections.items()
        }
        print(f"selected (high, low) per trait: {counts}")
        print(
            f"vectorized: select_dpnle + Parquet + overlap, {len(concepts)} traits: {vec_s:.2f} s wall, "
            f"{vec_cpu:.2f} s CPU ({verdict(vec_s)} vs target < {TARGET_S:.0f} s)"
        )
        _, e2e_s, e2e_cpu = timed(run_end_to_end, run)
        print(
            f"end-to-end: localize_all (read stats.parquet, select, write, manifest, overlap): {e2e_s:.2f} s wall, "
            f"{e2e_cpu:.2f} s CPU ({verdict(e2e_s)} vs target < {TARGET_S:.0f} s)"
        )
        if not args.skip_naive:
            naive_sets, naive_s, naive_cpu = timed(run_naive, Path(tmp), all_stats)
            same = all(
                naive_sets[c] == set(zip(s["layer"].astype(int), s["neuron"].astype(int), strict=True))
                for c, s in selections.items()
            )
            print(
                f"naive: per-neuron Python loop + pandas, {len(concepts)} traits: {naive_s:.2f} s wall, "
                f"{naive_cpu:.2f} s CPU (vectorized is {naive_s / vec_s:.1f}x faster wall, "
                f"{naive_cpu / vec_cpu:.1f}x CPU; same selected sets: {same})"
            )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
