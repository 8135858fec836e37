#!/usr/bin/env python3
"""Ablation of the admit path (`make bench` runs it after bench/run.py): the filter as built at
successive commits, each adding one lever, measured in one run against the same Envoy setup
(direct_response, --concurrency 2, wrk closed loop), interleaved within each repetition so
drift hits all alike; plus the current build with leases off (`bucket.max_lease: 1`), and the
current source with one part switched off (a patch, below) to attribute what is left, with the
direct_response upstream and with the mock provider. Appends its tables to BENCHMARKS.md.
Python 3 standard library only; builds each commit in a temporary git worktree with the current
Makefile's wasm-opt flags.
"""

import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the benchmark's Envoy, wrk and report helpers)

ROOT = run.ROOT
OUT = ROOT / "target/ablation"
# The build before the reject-path levers, whose reject path is measured beside the current one.
BEFORE = "dccedf6"
# (label, commit or None for the working tree's build, extra filter JSON)
STEPS = [
    ("every admission a compare-and-swap, the provider state read and counters written per request",
     "6bd9eed", {}),
    ("+ the provider state cached for 1 ms (leases built in, but inert until a later fix sized them)",
     "b073d88", {}),
    ("+ counters written per tick, the priority header rewritten only when it differs", "0e9bc44", {}),
    ("+ leases sized by the traffic, refusals reused for 1 ms", BEFORE, {}),
    ("+ context tables as plain statics, local 429s serialized once", "05d09ef", {}),
    ("+ the observer reads headers in place and skips absent provider families; no float formatter "
     "(current build)", None, {}),
    ("current build, leases off (bucket.max_lease 1)", None, {"bucket": {"max_lease": 1}}),
]
CURRENT = STEPS[-2][0]
# The current build's admission filter making the floor's host calls and deciding nothing.
FLOOR_CALLS = "current build, the admission filter making only those host calls and deciding nothing"
# The mock-provider section: (label, kind, patch, extra filter JSON); kind w is the empty filter.
MOCK_ROWS = [
    ("(w) empty wasm filter", "w", None, None),
    ("(w) making the host calls ours cannot do without, in the listener (priority header, clock, "
     "`:status`) and in the observer's place (probe and attempt-count headers; every response header "
     "and the clock)", "w", None, {"mimic": 1}),
    ("current build, every stream callback returning at once (contexts, dispatch, ticks)", "c", "module-only", {}),
    ("current build, the observer's callbacks returning at once", "c", "observer-off", {}),
    ("current build, the observer making only its floor's host calls, learning nothing", "c", "observer-floor", {}),
    ("current build", "c", None, {}),
    ("current build, `provider.style: openai` (one provider family read, not every one)", "c", None,
     {"provider": {"style": "openai"}}),
]
# The empty filter (w) making N host calls per request: what one host call costs.
CALLS = [1, 2, 4]
# The empty filter making exactly the host calls our admit path cannot do without.
MIMIC = "w mimic"
# The empty filter answering every request itself with a 429 of N headers (the filter's has 9):
# the floor of any wasm filter's reject path.
REPLIES = [0, 9]
REJECT = "current build, reject path (limit 1 token, 1/s)"
REJECT_BEFORE = f"`{BEFORE}` (each 429 formatted and its histogram sample written per refusal), reject path"
# The current source (HEAD) with one part switched off: (file, anchor, text put after it). A patch
# whose anchor is gone stops the run: update it with the code.
REQUEST = "src/host/request.rs"
ON_REQUEST = "fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {\n"
ON_REQUEST_BODY = "fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {\n"
ON_RESPONSE = "fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {\n"
ON_RESPONSE_BODY = "fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {\n"
CALLBACKS = [ON_REQUEST, ON_REQUEST_BODY, ON_RESPONSE, ON_RESPONSE_BODY]
ADMITS = "self.w.config.role.admits()"
OBSERVER = "!" + ADMITS
PATCHES = {
    # The admission filter makes the floor's host calls and decides nothing.
    "floor-calls": [
        (REQUEST, ON_REQUEST, "if " + ADMITS + " { let _ = Self::header(&self.w.config.classify.header); "
                              "let _ = abi::now_ns(); return Action::Continue; }\n"),
        (REQUEST, ON_RESPONSE, "if " + ADMITS + " { let _ = abi::response_header(\":status\"); "
                               "return Action::Continue; }\n"),
    ],
    # Every stream callback of both filters returns at once: contexts, dispatch and ticks only.
    "module-only": [(REQUEST, c, "if true { return Action::Continue; }\n") for c in CALLBACKS],
    # The observer's stream callbacks return at once; the admission filter is whole.
    "observer-off": [(REQUEST, c, f"if {OBSERVER} {{ return Action::Continue; }}\n") for c in CALLBACKS],
    # The observer reads what it cannot do without (its request reads are unchanged; on the
    # answer every header and the clock) and learns nothing.
    "observer-floor": [
        (REQUEST, ON_RESPONSE, f"if {OBSERVER} {{ let h = abi::response_headers().unwrap_or_default(); "
                               "let _ = h.get(\":status\"); let _ = abi::now_ns(); return Action::Continue; }\n"),
    ],
}
WASM_OPT = ["-Oz", "--flatten", "--rereloop", "-Oz", "--merge-similar-functions", "-Oz", "--converge",
            "--enable-bulk-memory", "--enable-sign-ext", "--enable-nontrapping-float-to-int",
            "--enable-mutable-globals", "--enable-multivalue", "--enable-reference-types"]


def build(commit, patch=None):
    """The optimized .wasm of `commit`, with PATCHES[patch] applied if given (cached by both)."""
    if commit == "HEAD":
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
    out = OUT / (f"{commit}-{patch}.wasm" if patch else f"{commit}.wasm")
    if out.is_file():
        return out
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llm-ablation-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), commit], check=True)
        try:
            for file, anchor, text in PATCHES.get(patch, []):
                path = tree / file
                source = path.read_text()
                if anchor not in source:
                    raise SystemExit(f"ablation: patch {patch!r}: {anchor.strip()!r} is not in {file}")
                path.write_text(source.replace(anchor, anchor + "        " + text, 1))
            run.log(f"building {commit}" + (f" with {patch}" if patch else ""))
            subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1", "-p", "llm-ratelimit",
                            "--target-dir", str(OUT / "target")], cwd=tree, check=True)
            raw = OUT / "target/wasm32-wasip1/release/llm_ratelimit.wasm"
            subprocess.run(["wasm-opt", *WASM_OPT, str(raw), "-o", str(out)], check=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    return out


COPIES = itertools.count()


def measure(wasm):
    """Makes the next Envoy run a copy of `wasm` (render() puts run.MEASURED in the config)."""
    copy = OUT / f"measured-{next(COPIES)}.wasm"
    copy.write_bytes(wasm.read_bytes())
    run.MEASURED = copy


def main():
    if not run.NOOP.is_file():
        subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1", "--manifest-path",
                        str(ROOT / "bench/noop-filter/Cargo.toml"), "--target-dir", str(ROOT / "target/bench-noop")],
                       check=True)
    wasms = [build(c) if c else run.WASM for _, c, _ in STEPS]
    patched = {p: build("HEAD", p) for p in ["floor-calls"] + [p for _, _, p, _ in MOCK_ROWS if p]}
    run.MEASURED.parent.mkdir(parents=True, exist_ok=True)
    lim = run.HIGH
    envoys, mocks, mock, res = [], [], None, {}
    try:
        envoys.append(("w", run.Envoy("w", "direct", 2, capacity=lim["capacity"], rate=lim["rate"])))
        for n in CALLS:
            envoys.append((f"w+{n}", run.Envoy("w", "direct", 2, capacity=lim["capacity"], rate=lim["rate"],
                                               filter_json=json.dumps({"calls": n}))))
        envoys.append((MIMIC, run.Envoy("w", "direct", 2, capacity=lim["capacity"], rate=lim["rate"],
                                         filter_json=json.dumps({"mimic": 1}))))
        for n in REPLIES:
            envoys.append((f"w reply {n}", run.Envoy("w", "direct", 2, capacity=lim["capacity"], rate=lim["rate"],
                                                     filter_json=json.dumps({"reply": n}))))
        for (label, _, extra), wasm in zip(STEPS, wasms):
            measure(wasm)
            envoys.append((label, run.Envoy("c", "direct", 2, capacity=lim["capacity"], rate=lim["rate"],
                                            filter_json=run.ours_json(lim["capacity"], lim["rate"], extra=extra))))
        measure(patched["floor-calls"])
        envoys.append((FLOOR_CALLS, run.Envoy("c", "direct", 2, capacity=lim["capacity"], rate=lim["rate"])))
        mock = run.Mock(*run.MOCK_OPENAI)
        for label, kind, patch, extra in MOCK_ROWS:
            if kind == "c":
                measure(patched[patch] if patch else run.WASM)
            fj = json.dumps(extra) if kind == "w" and extra else (
                run.ours_json(lim["capacity"], lim["rate"], extra=extra) if kind == "c" else None)
            mocks.append((label, run.Envoy(kind, "mock", 2, upstream_port=mock.port, capacity=lim["capacity"],
                                           rate=lim["rate"], filter_json=fj)))
        before = wasms[[commit for _, commit, _ in STEPS].index(BEFORE)]
        for label, wasm in ((REJECT_BEFORE, before), (REJECT, run.WASM)):
            measure(wasm)
            envoys.append((label, run.Envoy("c", "direct", 2, capacity=1, rate=1, filter_json=run.ours_json(1, 1))))
        for _, e in envoys:
            run.wrk(e.url, 1)
        for _, e in mocks:
            run.wrk(e.url, 1, post=True)
        for rep in range(run.REPS):
            run.log(f"ablation: repetition {rep + 1}/{run.REPS}")
            for label, e in envoys:
                res.setdefault(label, []).append(run.wrk(e.url, run.SECONDS)["rps"])
            for label, e in mocks:
                res.setdefault("mock " + label, []).append(run.wrk(e.url, run.SECONDS, post=True)["rps"])
    finally:
        for _, e in envoys + mocks:
            e.stop()
        if mock:
            mock.stop()
        run.cleanup()
    (ROOT / "target/bench/ablation.json").write_text(json.dumps(res, indent=1))
    report(res, wasms)


def report(res, wasms):
    """Writes the tables of `res` (req/s per row and repetition) into BENCHMARKS.md."""
    floor = run.med(res["w"])
    lines = ["## Ablation: the admit path, lever by lever\n",
             f"direct_response, `--concurrency 2`, wrk closed loop, {run.REPS} × {run.SECONDS:g} s, medians "
             "(min–max); every row measured in the same run, interleaved. Each row is the filter built at the "
             "commit that added the lever (cumulative), with today's wasm-opt flags; (w) is the empty wasm filter. "
             "÷ (w) is the median of the ratios within each repetition (configurations run back to back), which "
             "drift on this shared machine moves less than the medians of req/s.\n",
             "| build | req/s | ÷ (w) |", "|---|---|---|",
             f"| (w) empty wasm filter | {run.fmt(floor)}{run.spread(res['w'])} | 1.00 |"]

    def ratio(label, base="w"):
        return run.med([a / b for a, b in zip(res[label], res[base])])
    for n in CALLS:
        t = run.med(res[f"w+{n}"])
        lines.append(f"| (w) making {n} host call{'s' if n > 1 else ''} per request (`:path` read) | "
                     f"{run.fmt(t)}{run.spread(res[f'w+{n}'])} | {ratio(f'w+{n}'):.2f} |")
    mimic = run.med(res[MIMIC])
    lines.append("| (w) making the host calls our admit path cannot do without: the priority header read and the "
                 f"clock on the request, the `:status` read on the response | {run.fmt(mimic)}{run.spread(res[MIMIC])} "
                 f"| {ratio(MIMIC):.2f} |")
    for (label, commit, _), wasm in zip(STEPS, wasms):
        t = run.med(res[label])
        name = f"`{commit}` {label}" if commit else label
        lines.append(f"| {name} ({wasm.stat().st_size:,} bytes) | {run.fmt(t)}{run.spread(res[label])} | {ratio(label):.2f} |")
    t = run.med(res[FLOOR_CALLS])
    lines.append(f"| {FLOOR_CALLS} | {run.fmt(t)}{run.spread(res[FLOOR_CALLS])} | {ratio(FLOOR_CALLS):.2f} |")
    per_call = [(1 / run.med(res[f"w+{n}"]) - 1 / floor) * 1e6 / n for n in CALLS]
    lines.append(f"\nOne host call costs about {run.med(per_call):.2f} µs of a request's time here "
                 "(2 workers, wrk on the same cores), from the (w) rows; our admit path makes, per request: "
                 "the priority header read (and its rewrite when the client sent another value), the clock, "
                 "and the `:status` read on the response (whose value the host hands back through an allocation "
                 "in the VM: a second crossing); the provider state (once a millisecond), the bucket (once per "
                 "lease) and counters (once per tick) are not per request. The empty filter making just those "
                 f"calls stands at {ratio(MIMIC):.2f} of (w): the floor for a filter that classifies by header, "
                 "keeps time and reads the answer's status. The current build stands at "
                 f"{ratio(CURRENT, MIMIC):.2f} of that floor. Our filter with its admission switched off "
                 f"but making the same calls stands at {ratio(FLOOR_CALLS, MIMIC):.2f} of the floor: what our module "
                 "adds by itself (its dispatch, contexts, ticks, size). The rest, "
                 f"{ratio(CURRENT, FLOOR_CALLS):.2f} of that, is the decision's own wasm work: classifying, the "
                 "lease, counters (a profile of the .wasm in V8 shows it spread over them, none dominant).\n")
    base = "mock " + MOCK_ROWS[0][0]
    lines += ["## Ablation: the mock provider path\n",
              "Same run, the mock provider upstream answering as OpenAI does (its `x-ratelimit-*` headers on "
              "every answer), the real `POST`; both filters are in place, the admission filter in the listener and "
              "the observer in the cluster, sharing one VM per worker. Rows marked with a part switched off are "
              "the current source with a small patch (bench/ablation.py `PATCHES`); ÷ (w) as above.\n",
              "| build | req/s | ÷ (w) | ÷ (w) making the floor's calls |", "|---|---|---|---|"]
    for label, *_ in MOCK_ROWS:
        key = "mock " + label
        lines.append(f"| {label} | {run.fmt(run.med(res[key]))}{run.spread(res[key])} | {ratio(key, base):.2f} | "
                     f"{ratio(key, 'mock ' + MOCK_ROWS[1][0]):.2f} |")
    row = {p: "mock " + label for label, _, p, _ in MOCK_ROWS if p}
    full = "mock " + MOCK_ROWS[5][0]
    lines.append(f"\nWhat each part costs, as a share of (w)'s throughput: our module with nothing to do "
                 f"{1 - ratio(row['module-only'], base):+.2f}; the admission filter "
                 f"{ratio(row['module-only'], base) - ratio(row['observer-off'], base):+.2f}; the observer's host "
                 f"calls {ratio(row['observer-off'], base) - ratio(row['observer-floor'], base):+.2f}; its parsing "
                 f"and learning {ratio(row['observer-floor'], base) - ratio(full, base):+.2f}. The parse reads every "
                 "provider family under `auto` (the default): a family none of whose headers is present costs one "
                 "pass over the names.\n")
    lines += ["## Ablation: the reject path\n",
              "Same run. A wasm filter's local reply costs Envoy more the more headers it carries: (w) answering "
              "every request with a 429 of 0 and of 9 headers (as many as the filter's own 429) and a 200-byte body, "
              "beside the filter refusing every request (the refusal reused within 1 ms, so no shared-data read).\n",
              "| build | req/s | ÷ (w) passing | ÷ (w) 429 with 9 headers |", "|---|---|---|---|"]
    nine = run.med(res["w reply 9"])
    for label in [f"w reply {n}" for n in REPLIES] + [REJECT_BEFORE, REJECT]:
        t = run.med(res[label])
        name = f"(w) answering a 429 with {label.split()[-1]} headers" if label.startswith("w reply") else label
        lines.append(f"| {name} | {run.fmt(t)}{run.spread(res[label])} | {t / floor:.2f} | {t / nine:.2f} |")
    lines.append("\nThe filter's reject path = that floor plus two host calls, the priority header read and the "
                 "clock; the 429 is serialized once and sent again while it says the same, and its `retry_after_s` "
                 "sample is taken once per value and tick. Reject ÷ admit cannot reach 1.0 while the 429 carries "
                 "its 9 headers: Envoy's local reply with them costs more than passing the request on.\n")
    out = Path(os.environ.get("BENCH_OUT", str(ROOT / "BENCHMARKS.md")))
    text = out.read_text() if out.is_file() else ""
    marker = "## Ablation: the admit path, lever by lever"
    if marker in text:
        text = text[:text.index(marker)].rstrip() + "\n"
    out.write_text(text + "\n" + "\n".join(lines) + "\n")
    run.log(f"ablation written to {out}")


if __name__ == "__main__":
    if "--quick" in sys.argv:
        run.REPS, run.SECONDS = 1, 1
    if "--report" in sys.argv:  # the tables again from the last run's figures, without measuring
        saved = json.loads((ROOT / "target/bench/ablation.json").read_text())
        run.REPS = len(saved["w"])
        report(saved, [build(c) if c else run.WASM for _, c, _ in STEPS])
    else:
        main()
