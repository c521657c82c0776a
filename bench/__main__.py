"""Run every benchmark module, print one table, and merge the results into reports/bench.json.

Each module in `MODULES` exposes `run(quick: bool) -> list[dict]`, one dict per figure with the keys
`key, value, target, unit, note` (`target` like ">= 10" or "<= 1.2", or "" when there is none).
`python -m bench --only train --quick` runs a subset, smaller.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time
from pathlib import Path

from pipeline.core.files import read_json, write_json

# ingest first: its workers may fork only before TensorFlow loads
MODULES = ("ingest", "crops", "train", "precision", "heads", "localise")
OUT = Path("reports/bench.json")


def meets(value: float, target: str | float) -> str:
    """'yes'/'NO' against a target such as '>= 10' or '<= 1.2' (a bare number means at least)."""
    if target in ("", None):
        return ""
    op, bound = target.split() if isinstance(target, str) else (">=", target)
    ok = value >= float(bound) if op == ">=" else value <= float(bound)
    return "yes" if ok else "NO"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(MODULES))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke check")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results = read_json(OUT) if OUT.exists() else {}
    # Rows from before rows carried a date keep the date of the run that wrote them, not this run's.
    earlier = results.get("_machine", {}).get("date")
    for key, row in results.items():
        if key != "_machine" and earlier:
            row.setdefault("date", earlier)
    rows = []
    # Each row carries its own date: a partial run (--only) replaces some rows and keeps the others.
    date = time.strftime("%Y-%m-%d %H:%M")
    for name in args.only:
        started = time.perf_counter()
        module_rows = importlib.import_module(f"bench.{name}").run(quick=args.quick)
        for row in module_rows:
            row["module"] = name
            row["date"] = date
            results[row["key"]] = row
        rows += module_rows
        print(f"[bench.{name}: {time.perf_counter() - started:.0f} s]")
    results["_machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "quick": args.quick,
                           "date": date}
    write_json(OUT, results)
    width = max(len(r["key"]) for r in rows)
    print(f"\n{'key':<{width}}  {'value':>9}  {'target':>7}  met  note")
    for r in rows:
        met = meets(r["value"], r["target"])
        print(f"{r['key']:<{width}}  {r['value']:>9.3g}  {str(r['target']):>7}  {met:>3}  {r['note']}")
    print(f"\nwritten to {OUT}")
    print(json.dumps({r["key"]: round(r["value"], 3) for r in rows}))


if __name__ == "__main__":
    main()
