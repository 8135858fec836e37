#!/usr/bin/env python3
"""Ablation of the admit path (`make bench` runs it after bench/run.py): the filter as built at
successive commits, each adding one lever, measured in one run against the same Envoy setup
(direct_response, --concurrency 2, wrk closed loop), interleaved within each repetition so
drift hits all alike (every other repetition in the opposite order); plus the current build with
leases off (`bucket.max_lease: 1`), and the current source with one part switched off (a patch,
below) to attribute what is left, with the direct_response upstream and with the mock provider; and
the previous build (PREVIOUS) beside the current one on the admit, reject and mock paths, as ratios
within each repetition. Appends its tables to BENCHMARKS.md.
Python 3 standard library only; builds each commit in a temporary git worktree with the current
Makefile's wasm-opt flags.
"""

import hashlib
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
# The previous build: the last before the host layer's rewrite (every request's life one Phase, the
# host behind one trait), measured beside the current one on the admit, reject and mock paths.
PREVIOUS = "b02f2af"
# (label, commit or None for the working tree's build, extra filter JSON)
STEPS = [
    ("every admission a compare-and-swap, the provider state read and counters written per request",
     "6bd9eed", {}),
    ("+ the provider state cached for 1 ms (leases built in, but inert until a later fix sized them)",
     "b073d88", {}),
    ("+ counters written per tick, the priority header rewritten only when it differs", "0e9bc44", {}),
    ("+ leases sized by the traffic, refusals reused for 1 ms", BEFORE, {}),
    ("+ context tables as plain statics, local 429s serialized once", "05d09ef", {}),
    ("+ the observer reads headers in place and skips absent provider families; no float formatter",
     PREVIOUS, {}),
    ("+ every request's life one `Phase`, the host behind one trait, a client's probe header removed "
     "(current build)", None, {}),
    ("current build, leases off (bucket.max_lease 1)", None, {"bucket": {"max_lease": 1}}),
]
CURRENT = STEPS[-2][0]
PREVIOUS_STEP = next(label for label, commit, _ in STEPS if commit == PREVIOUS)
# The current build without the admission filter's read of the probe header (a client's
# forged `x-llm-ratelimit-probe` then reaches the observer): what that one host call costs.
PROBE_UNREAD = "current build, the probe header not read (a client's forged one kept)"
# The current build's admission filter making the floor's host calls and deciding nothing.
FLOOR_CALLS = "current build, the admission filter making only those host calls and deciding nothing"
# The mock-provider section: (label, kind, patch, extra filter JSON); kind w is the empty filter.
# Kind p is the previous build (PREVIOUS), c the current source, patched if a patch is named.
MOCK_W = "(w) empty wasm filter"
MOCK_MIMIC = ("(w) making the host calls ours cannot do without, in the listener (priority header, clock, "
              "`:status`) and in the observer's place (probe and attempt-count headers; every response header "
              "and the clock)")
MOCK_CURRENT = "current build"
MOCK_PREVIOUS = f"`{PREVIOUS}`, the previous build"
MOCK_ROWS = [
    (MOCK_W, "w", None, None),
    (MOCK_MIMIC, "w", None, {"mimic": 1}),
    ("current build, every stream callback returning at once (contexts, dispatch, ticks)", "c", "module-only", {}),
    ("current build, the observer's callbacks returning at once", "c", "observer-off", {}),
    ("current build, the observer making only its floor's host calls, learning nothing", "c", "observer-floor", {}),
    (MOCK_PREVIOUS, "p", None, {}),
    (MOCK_CURRENT, "c", None, {}),
    (PROBE_UNREAD, "c", "probe-unread", {}),
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
REJECT_PREVIOUS = f"`{PREVIOUS}`, the previous build, reject path"
REJECT_PROBE_UNREAD = PROBE_UNREAD + ", reject path"
# The current source (HEAD) with one part switched off: (file, anchor, text), the text put after
# the anchor, or (file, anchor, text, "replace"), the text put in the anchor's place. An anchor must
# be in the file exactly once, or the run stops: update it with the code. The callbacks are
# `Request`'s inherent methods (src/host/request.rs), one per stream callback Envoy makes. In a
# patch's text, `HOSTCALLS::` is the module of the filter's host calls, `calls::` (src/host/calls.rs)
# or, where the file does not import `calls`, `api::` (the layout of 5b6cfa5 to 70c1e17), and
# `NOW()` that module's clock, `now()` or, where it has none, `now_ns()`.
REQUEST = "src/host/request.rs"
ON_REQUEST = "pub fn on_request_headers(&mut self, end_of_stream: bool) -> Action {\n"
ON_REQUEST_BODY = "pub fn on_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {\n"
ON_REQUEST_TRAILERS = "pub fn on_request_trailers(&mut self) -> Action {\n"
ON_RESPONSE = "pub fn on_response_headers(&mut self, end_of_stream: bool) -> Action {\n"
ON_RESPONSE_BODY = "pub fn on_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {\n"
ON_RESPONSE_TRAILERS = "pub fn on_response_trailers(&mut self) -> Action {\n"
CALLBACKS = [ON_REQUEST, ON_REQUEST_BODY, ON_REQUEST_TRAILERS, ON_RESPONSE, ON_RESPONSE_BODY, ON_RESPONSE_TRAILERS]
ADMITS = "self.w.config.role.admits()"
OBSERVER = "!" + ADMITS
# The admission filter's read of a client's probe header, in `arrive`.
PROBE_READ = "if header(PROBE_HEADER).is_some() {\n"
PATCHES = {
    # The admission filter makes the floor's host calls and decides nothing.
    "floor-calls": [
        (REQUEST, ON_REQUEST, "if " + ADMITS + " { let _ = header(&self.w.config.classify.header); "
                              "let _ = HOSTCALLS::NOW(); return Action::Continue; }\n"),
        (REQUEST, ON_RESPONSE, "if " + ADMITS + " { let _ = HOSTCALLS::response_header(\":status\"); "
                               "return Action::Continue; }\n"),
    ],
    # Every stream callback of both filters returns at once: contexts, dispatch and ticks only.
    "module-only": [(REQUEST, c, "if true { return Action::Continue; }\n") for c in CALLBACKS],
    # The observer's stream callbacks return at once; the admission filter is whole.
    "observer-off": [(REQUEST, c, f"if {OBSERVER} {{ return Action::Continue; }}\n") for c in CALLBACKS],
    # The observer reads what it cannot do without (its request reads are unchanged; on the
    # answer every header and the clock) and learns nothing.
    "observer-floor": [
        (REQUEST, ON_RESPONSE, f"if {OBSERVER} {{ let h = HOSTCALLS::response_headers().unwrap_or_default(); "
                               "let _ = h.get(\":status\"); let _ = HOSTCALLS::NOW(); return Action::Continue; }\n"),
    ],
    # The admission filter does not read (nor remove) a client's probe header; all else whole.
    "probe-unread": [(REQUEST, PROBE_READ, "if false {\n", "replace")],
}
WASM_OPT = ["-Oz", "--flatten", "--rereloop", "-Oz", "--merge-similar-functions", "-Oz", "--converge",
            "--enable-bulk-memory", "--enable-sign-ext", "--enable-nontrapping-float-to-int",
            "--enable-mutable-globals", "--enable-multivalue", "--enable-reference-types"]


def head():
    """HEAD's short commit, read once: every current-source row is built from the same commit."""
    global _HEAD
    if _HEAD is None:
        _HEAD = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "Cargo.toml",
                                "Cargo.lock"], capture_output=True, text=True).stdout.strip()
        if dirty:
            run.log(f"ablation: note: the working tree's changes to src/ are not measured; the current build "
                    f"is HEAD ({_HEAD}) as committed")
    return _HEAD


_HEAD = None


def build(commit, patch=None):
    """The optimized .wasm of `commit`, with PATCHES[patch] applied if given (cached by both, and by
    the patch's text)."""
    if commit == "HEAD":
        commit = head()
    tag = f"-{patch}-{hashlib.sha256(repr(PATCHES[patch]).encode()).hexdigest()[:8]}" if patch else ""
    out = OUT / f"{commit}{tag}.wasm"
    if out.is_file():
        return out
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llm-ablation-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), commit], check=True)
        try:
            for file, anchor, text, *how in PATCHES.get(patch, []):
                path = tree / file
                source = path.read_text()
                if source.count(anchor) != 1:
                    raise SystemExit(f"ablation: patch {patch!r}: {anchor.strip()!r} is in {file} "
                                     f"{source.count(anchor)} times, not once")
                module = "calls" if "use super::calls;" in source else "api"
                clock = "now" if "pub fn now(" in (tree / f"src/host/{module}.rs").read_text() else "now_ns"
                text = text.replace("HOSTCALLS::", f"{module}::").replace("NOW()", f"{clock}()")
                new = text if how == ["replace"] else anchor + "        " + text
                path.write_text(source.replace(anchor, new, 1))
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
    # The current build: HEAD as committed (like the patched rows), built here with the same flags.
    current = build("HEAD")
    wasms = [build(c) if c else current for _, c, _ in STEPS]
    patched = {p: build("HEAD", p) for p in ["floor-calls", "probe-unread"] + [p for _, _, p, _ in MOCK_ROWS if p]}
    previous = wasms[[commit for _, commit, _ in STEPS].index(PREVIOUS)]
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
        measure(patched["probe-unread"])
        envoys.append((PROBE_UNREAD, run.Envoy("c", "direct", 2, capacity=lim["capacity"], rate=lim["rate"])))
        mock = run.Mock(*run.MOCK_OPENAI)
        for label, kind, patch, extra in MOCK_ROWS:
            if kind == "c":
                measure(patched[patch] if patch else current)
            elif kind == "p":
                measure(previous)
            fj = json.dumps(extra) if kind == "w" and extra else (
                run.ours_json(lim["capacity"], lim["rate"], extra=extra) if kind != "w" else None)
            mocks.append((label, run.Envoy("w" if kind == "w" else "c", "mock", 2, upstream_port=mock.port,
                                           capacity=lim["capacity"], rate=lim["rate"], filter_json=fj)))
        before = wasms[[commit for _, commit, _ in STEPS].index(BEFORE)]
        for label, wasm in ((REJECT_BEFORE, before), (REJECT_PREVIOUS, previous), (REJECT, current),
                            (REJECT_PROBE_UNREAD, patched["probe-unread"])):
            measure(wasm)
            envoys.append((label, run.Envoy("c", "direct", 2, capacity=1, rate=1, filter_json=run.ours_json(1, 1))))
        for _, e in envoys:
            run.wrk(e.url, 1)
        for _, e in mocks:
            run.wrk(e.url, 1, post=True)
        for rep in range(run.REPS):
            run.log(f"ablation: repetition {rep + 1}/{run.REPS}")
            # Every other repetition in the opposite order, so that drift within a repetition does not
            # always favour the rows that run first.
            order = 1 if rep % 2 == 0 else -1
            for label, e in envoys[::order]:
                res.setdefault(label, []).append(run.wrk(e.url, run.SECONDS)["rps"])
            for label, e in mocks[::order]:
                res.setdefault("mock " + label, []).append(run.wrk(e.url, run.SECONDS, post=True)["rps"])
    finally:
        for _, e in envoys + mocks:
            e.stop()
        if mock:
            mock.stop()
        run.cleanup()
    res["current commit"] = head()
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
    for label in (FLOOR_CALLS, PROBE_UNREAD):
        lines.append(f"| {label} | {run.fmt(run.med(res[label]))}{run.spread(res[label])} | {ratio(label):.2f} |")
    per_call = [(1 / run.med(res[f"w+{n}"]) - 1 / floor) * 1e6 / n for n in CALLS]
    lines.append(f"\nOne host call costs about {run.med(per_call):.2f} µs of a request's time here "
                 "(2 workers, wrk on the same cores), from the (w) rows; our admit path makes, per request: "
                 "the priority header read (and its rewrite when the client sent another value), the probe "
                 "header read (to remove a client's forged one), the clock, "
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
    base = "mock " + MOCK_W
    lines += ["## Ablation: the mock provider path\n",
              "Same run, the mock provider upstream answering as OpenAI does (its `x-ratelimit-*` headers on "
              "every answer), the real `POST`; both filters are in place, the admission filter in the listener and "
              "the observer in the cluster, sharing one VM per worker. Rows marked with a part switched off are "
              "the current source with a small patch (bench/ablation.py `PATCHES`); ÷ (w) as above.\n",
              "| build | req/s | ÷ (w) | ÷ (w) making the floor's calls |", "|---|---|---|---|"]
    for label, *_ in MOCK_ROWS:
        key = "mock " + label
        lines.append(f"| {label} | {run.fmt(run.med(res[key]))}{run.spread(res[key])} | {ratio(key, base):.2f} | "
                     f"{ratio(key, 'mock ' + MOCK_MIMIC):.2f} |")
    row = {p: "mock " + label for label, _, p, _ in MOCK_ROWS if p}
    full = "mock " + MOCK_CURRENT
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
    for label in [f"w reply {n}" for n in REPLIES] + [REJECT_BEFORE, REJECT_PREVIOUS, REJECT, REJECT_PROBE_UNREAD]:
        t = run.med(res[label])
        name = f"(w) answering a 429 with {label.split()[-1]} headers" if label.startswith("w reply") else label
        lines.append(f"| {name} | {run.fmt(t)}{run.spread(res[label])} | {t / floor:.2f} | {t / nine:.2f} |")
    lines.append("\nThe filter's reject path = that floor plus three host calls, the priority and probe header "
                 "reads and the clock; the 429 is serialized once and sent again while it says the same, and its "
                 "`retry_after_s` sample is taken once per value and tick. Reject ÷ admit cannot reach 1.0 while "
                 "the 429 carries its 9 headers: Envoy's local reply with them costs more than passing the request "
                 "on.\n")
    lines += [f"## Ablation: the current build against `{PREVIOUS}`\n",
              f"Same run; the current build is `{res.get('current commit', 'HEAD')}`. `{PREVIOUS}` is the "
              "previous build (the host layer before every request's life became one `Phase`); the current build "
              "also reads one more request header per request in the admission filter (`x-llm-ratelimit-probe`, "
              "to remove a client's forged one). The two rows of a path run back to back in every repetition (in "
              "the opposite order every other repetition); the ratio is taken within each repetition, then their "
              "median and min–max, and each in run order.\n",
              f"| path | `{PREVIOUS}` req/s | current req/s | current ÷ `{PREVIOUS}` | per repetition | "
              f"current, probe header not read, ÷ `{PREVIOUS}` |", "|---|---|---|---|---|---|"]
    for path, prev, cur, unread in (
            ("admit, direct_response", PREVIOUS_STEP, CURRENT, PROBE_UNREAD),
            ("reject, direct_response", REJECT_PREVIOUS, REJECT, REJECT_PROBE_UNREAD),
            ("admit, mock provider (OpenAI headers, POST)", "mock " + MOCK_PREVIOUS, "mock " + MOCK_CURRENT,
             "mock " + PROBE_UNREAD)):
        per = [a / b for a, b in zip(res[cur], res[prev])]
        lines.append(f"| {path} | {run.fmt(run.med(res[prev]))}{run.spread(res[prev])} | "
                     f"{run.fmt(run.med(res[cur]))}{run.spread(res[cur])} | {run.med(per):.3f}{run.spread(per, 3)} | "
                     f"{', '.join(f'{x:.3f}' for x in per)} | {ratio(unread, prev):.3f} |")
    lines.append("")
    out = Path(os.environ.get("BENCH_OUT", str(ROOT / "BENCHMARKS.md")))
    text = out.read_text() if out.is_file() else ""
    # Our sections replace the last run's, from the first to the next section that is not ours
    # (anything written after them by hand stays, after the new tables).
    marker = "## Ablation: the admit path, lever by lever"
    rest = ""
    if marker in text:
        start = text.index(marker)
        after = [i for i in range(start + 1, len(text)) if text.startswith("\n## ", i)
                 and not text.startswith("\n## Ablation: ", i)]
        if after:
            rest = "\n" + text[after[0] + 1:].rstrip() + "\n"
        text = text[:start].rstrip() + "\n"
    out.write_text(text + "\n" + "\n".join(lines) + "\n" + rest)
    run.log(f"ablation written to {out}")


if __name__ == "__main__":
    if "--quick" in sys.argv:
        run.REPS, run.SECONDS = 1, 1
    if "--report" in sys.argv:  # the tables again from the last run's figures, without measuring
        saved = json.loads((ROOT / "target/bench/ablation.json").read_text())
        run.REPS = len(saved["w"])
        report(saved, [build(c or saved.get("current commit", "HEAD")) for _, c, _ in STEPS])
    else:
        main()
