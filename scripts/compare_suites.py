"""Compare two evaluation suites of one run item by item (e.g. the same edit-eval on two engines).

    python scripts/compare_suites.py --run demo engine-hf engine-vllm [--tolerance 1e-6] [--concept extraversion]

For every (concept, condition, benchmark, scorer, item) both suites scored: are the generated
outputs the same text, and do the scores agree within ``--tolerance``? Prints one line per
(concept, condition, benchmark) and the paper tables of both suites; exits 1 when an output
differs, a score differs beyond the tolerance, or the suites did not score the same items.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from dpnle import evaluate as ev
from dpnle.runs import Run

KEY = ["concept", "condition", "benchmark", "scorer", "dimension", "item_id"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("suite_a")
    parser.add_argument("suite_b")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--concept", action="append", help="Compare only these concepts (repeatable; default: all).")
    args = parser.parse_args()
    run = Run.open(args.run)
    a = ev.load_eval(run.with_suite(args.suite_a))
    b = ev.load_eval(run.with_suite(args.suite_b))
    if args.concept:
        a, b = a[a["concept"].isin(args.concept)], b[b["concept"].isin(args.concept)]
        if a.empty or b.empty:
            print(f"no rows of {', '.join(args.concept)} in {args.suite_a if a.empty else args.suite_b}")
            return 1
    merged = a.merge(b, on=KEY, how="outer", suffixes=("_a", "_b"), indicator=True)
    ok = True
    only = merged[merged["_merge"] != "both"]
    if len(only):
        ok = False
        print(f"{len(only)} item(s) scored in one suite only, e.g. {only[KEY].iloc[0].to_dict()}")
    both = merged[merged["_merge"] == "both"]
    for (concept, condition, benchmark), part in both.groupby(["concept", "condition", "benchmark"], sort=False):
        same_text = int((part["output_a"].fillna("") == part["output_b"].fillna("")).sum())
        diff = np.abs(part["score_a"].to_numpy(float) - part["score_b"].to_numpy(float))
        diff = diff[np.isfinite(diff)]
        worst = float(diff.max()) if diff.size else 0.0
        bad = same_text < len(part) or worst > args.tolerance
        ok &= not bad
        print(f"{'DIFFERS' if bad else 'same   '} {concept} {condition} {benchmark}: {same_text}/{len(part)} outputs "
              f"identical, max |score difference| {worst:.2e}")
    for suite, rows in ((args.suite_a, a), (args.suite_b, b)):
        print(f"\npaper table, suite {suite}")
        print(ev.to_markdown(ev.paper_table(ev.summarize(rows, ev.load_validity(run.with_suite(suite))))))
    print("suites agree" if ok else "suites DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
