#!/usr/bin/env python3
"""The token-limit parsers timed alone in V8 (node): the request estimate on bench/chat.json and
the usage of the mock provider's answer (answer.json), as the filter builds them (wasm32,
opt-level z, LTO). Builds the harness against `--base` (default HEAD as committed) and against HEAD
plus the working tree's changes to the `--tree` paths (default the estimate, usage and meter),
each in a temporary git worktree, then runs them alternately (ROUNDS rounds of N calls per run,
RUNS runs each) and prints ns per call: the median over runs of each run's median, and the minimum.

    python3 bench/tokens-micro/run.py [--base 4b1cc1d] [--runs 6]
"""

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = ROOT / "target/bench-micro"


def build(rev, diff):
    """The harness .wasm built at `rev` with `diff` applied (cached by both and the harness)."""
    OUT.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True, capture_output=True,
                          text=True).stdout.strip()
    key = hashlib.sha256(diff.encode())
    for f in sorted(["Cargo.toml", "answer.json", "src/lib.rs", "run.mjs"]):
        key.update((HERE / f).read_bytes())
    out = OUT / f"{head}-{key.hexdigest()[:10]}.wasm"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="llm-micro-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), head], check=True)
        try:
            if diff:
                subprocess.run(["git", "-C", str(tree), "apply", "-"], input=diff, text=True, check=True)
            harness = tree / "bench/tokens-micro"
            shutil.rmtree(harness, ignore_errors=True)
            shutil.copytree(HERE, harness, ignore=shutil.ignore_patterns("target", "Cargo.lock"))
            subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-unknown-unknown",
                            "--manifest-path", str(harness / "Cargo.toml"), "--target-dir", str(OUT / "target")],
                           check=True)
            shutil.copy(OUT / "target/wasm32-unknown-unknown/release/bench_tokens_micro.wasm", out)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="HEAD", help="the revision to compare with (default HEAD as committed)")
    ap.add_argument("--tree", default="src/tokens/estimate.rs,src/tokens/usage.rs,src/tokens/meter.rs",
                    help="paths whose working-tree changes, on HEAD, make the second build")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    diff = subprocess.run(["git", "-C", str(ROOT), "diff", "--binary", "HEAD", "--", *args.tree.split(",")],
                          check=True, capture_output=True, text=True).stdout
    wasms = {args.base: build(args.base, "")}
    if diff or args.base != "HEAD":
        wasms["HEAD + tree" if diff else "HEAD"] = build("HEAD", diff)
    res = {label: [] for label in wasms}
    for _ in range(args.runs):
        for label, wasm in wasms.items():
            out = subprocess.run(["node", str(HERE / "run.mjs"), str(wasm), str(args.rounds), str(args.n)],
                                 check=True, capture_output=True, text=True).stdout
            res[label].append(json.loads(out))
    print(f"ns per call, median over {args.runs} runs of each run's median (min):")
    for name in ["estimate", "copy", "usage", "usage_only"]:
        row = [f"{name:9}"]
        for label, runs in res.items():
            med = statistics.median(r[name]["median_ns"] for r in runs)
            low = min(r[name]["min_ns"] for r in runs)
            row.append(f"{label}: {med:8.0f} ({low:.0f})")
        print("  ".join(row))
    for label, wasm in wasms.items():
        print(f"{label}: {wasm.stat().st_size:,} bytes of harness .wasm")
    (OUT / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
