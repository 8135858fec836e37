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
import resource
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
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
    ("current build, `in_flight.max` set (a slot taken and given back per request, never binding)", "c", None,
     {"in_flight": {"max": 1000000}}),
    ("current build, a `failover` target configured (never used)", "c", None,
     {"failover": [{"provider": {"name": "backup"}}]}),
]
# Token limits, mock provider, POST (bench/run.py's (t) against (c), same body): (t) with one part
# of its work switched off at a time (a patch), to see where the difference goes. (label, patch,
# token limit on). With `--tree`, the same (c) and (t) built from HEAD as committed are added.
TOKEN_C = "(c) the request limit only"
TOKEN_T = "(t) with a token limit (never binding)"
TOKEN_ROWS = [
    (TOKEN_C, None, False),
    (TOKEN_T, None, True),
    ("(t), both bodies read into a serde_json `Value` (the reading before the in-place one)", "parse-by-value", True),
    ("(t), the answer's usage not parsed (the same usage given)", "usage-unparsed", True),
    ("(t), the answer read from its start, in place (the reading before the one from its end)", "usage-from-start",
     True),
    ("(t), the answer's body not read (so not parsed either): settled at the estimate, the same", "answer-unread",
     True),
    ("(t), the request body read but not parsed (the same estimate given)", "request-unparsed", True),
    ("(t), the request body not read (its headers still held until it is in; the same estimate given)",
     "body-unread", True),
    ("(t), the request not held (decided at its headers, with the same estimate)", "not-held", True),
    ("(t), no sample of the estimate's error per request (one host call)", "no-error-sample", True),
    ("(t), the body held, read and estimated, no LLM tokens reserved (so no answer read, nothing settled)",
     "tokens-untaken", True),
]
TOKEN_HEAD = {False: "(c), HEAD as committed", True: "(t), HEAD as committed"}
# `--base REV`: (c) and (t) built at REV are added too (say, the commit before a change).
BASE = None
# `--rows patch,...`: only those of the patched rows (and (c) and (t)).
PICK = None
# `--at REV`: the token rows built at REV instead of HEAD (the patches must fit its source).
AT = "HEAD"
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
# Token limits: the request body's read and estimate (`Request::body_read`), the hold
# (`Request::arrive`), the estimate and the answer's usage (src/tokens/).
BODY_READ = """        let body = if whole && size <= max { calls::request_body(size).unwrap_or_default() } else { Vec::new() };
        let e = if !body.is_empty() {
            estimate::from_body(rules, &self.path, &body)
        } else {
            estimate::from_unread(rules, &self.path, content_length().unwrap_or(size as u64))
        };
"""
HOLD = "if w.holds.bodies() != Bodies::Withheld && w.holds.hold_request(self.id, max_wait) {\n"
RESERVATION = "src/host/reservation.rs"
ERROR_SAMPLE = "t.estimate_error_pct.record(meter::error_pct(need.tokens, used.total()));\n"
NEED = "self.estimate = self.w.need(e, path);\n"
ESTIMATE = "src/tokens/estimate.rs"
ESTIMATE_FROM_BODY = "pub fn from_body(rules: &EstimateRules, path: &str, body: &[u8]) -> Estimate {\n"
USAGE = "src/tokens/usage.rs"
USAGE_FROM_BODY = "pub fn from_body(body: &[u8]) -> Option<Usage> {\n"
METER = "src/tokens/meter.rs"
WANTS_BODY = "pub fn wants_body(&self) -> bool {\n"
# What the estimate and the usage of bench/chat.json and of the mock provider's answer to it are
# (its `usage`): a row that skips reading either is given them, so that it reserves and settles
# the same tokens (leases refilled as often) and differs only by the work skipped.
FROM_UNREAD = "pub fn from_unread(rules: &EstimateRules, path: &str, bytes: u64) -> Estimate {\n"
SAME_ESTIMATE = (ESTIMATE, FROM_UNREAD, 'if bytes > 0 { return Estimate { input: 198, output: 256, '
                 'model: Some("gpt-4o-mini".to_owned()), stream: false }; }\n')
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
    # Token limits, part by part (the TOKEN_ROWS): the answer's usage not parsed (a reported
    # usage of 0 settled, as a parsed one would be).
    "usage-unparsed": [(USAGE, USAGE_FROM_BODY,
                        "if !body.is_empty() { return Some(Usage { input: 198, output: 256, ..Usage::default() }); }\n")],
    # The answer's body neither read nor parsed: the meter settles the estimate.
    "answer-unread": [(METER, WANTS_BODY, "if true { return false; }\n")],
    # The request body read, not parsed: estimated from its size (and the path's model).
    "request-unparsed": [(ESTIMATE, ESTIMATE_FROM_BODY, "if true { return from_unread(rules, path, body.len() as u64); }\n"),
                         SAME_ESTIMATE],
    # The request held until its body is in, the body not read: estimated from its size.
    # (No body kept, so none for a failover target's model map either.)
    "body-unread": [(REQUEST, BODY_READ, "        let _ = (whole, max);\n        let body: Vec<u8> = Vec::new();\n"
                     "        let e = estimate::from_unread(rules, &self.path, size as u64);\n", "replace"), SAME_ESTIMATE],
    # Both bodies read into a serde_json `Value` whole, as before the in-place readings
    # (`estimate::Fields::scan`; `usage::from_end`, then `usage::pruned`): what they save.
    # (`if false`: the in-place readings still compiled, so nothing is reported unused.)
    "parse-by-value": [(ESTIMATE, "let fields = match Fields::scan(body) {",
                        "let fields = match if false { Fields::scan(body) } else { None } {", "replace"),
                       (USAGE, "if let Some(read) = from_end(body) {",
                        "if let Some(read) = if false { from_end(body) } else { None } {", "replace"),
                       (USAGE, "let json = match pruned(body) {",
                        "let json = match if false { pruned(body) } else { None } {", "replace")],
    # The answer read from its start (in place), as before the reading from its end.
    "usage-from-start": [(USAGE, "if let Some(read) = from_end(body) {",
                          "if let Some(read) = if false { from_end(body) } else { None } {", "replace")],
    # The request not held: estimated from its content-length at the headers, as a body too
    # large to hold is.
    "not-held": [(REQUEST, HOLD, "if false && " + HOLD[len("if "):], "replace"), SAME_ESTIMATE],
    # No sample of the estimate's error per settled request (one host call).
    "no-error-sample": [(RESERVATION, ERROR_SAMPLE, "let _ = meter::error_pct(need.tokens, used.total());\n",
                         "replace")],
    # The body held, read and estimated, but no LLM tokens reserved: no meter, so neither the
    # answer's reading nor a settlement (against answer-unread: what reserving and settling cost).
    "tokens-untaken": [(REQUEST, NEED, "self.estimate = None;\n")],
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
            also = f", but for those to {', '.join(TREE)} (--tree)" if TREE else ""
            run.log(f"ablation: note: the working tree's changes to src/ are not measured{also}; the current build "
                    f"is HEAD ({_HEAD}) as committed")
    return _HEAD


_HEAD = None


# `--tree PATH,...` (or BENCH_TREE): the current source is HEAD plus the working tree's changes
# to those paths (e.g. `src/tokens`), so that work not committed yet is measured against HEAD
# (whose rows are then added as such) while changes others are making elsewhere are left out.
TREE = []
_DIFF = None


def tree_diff():
    """The working tree's diff against HEAD of the TREE paths (tracked files), or '': read once, so
    that every row of a run is built from the same source whatever is edited meanwhile."""
    global _DIFF
    if _DIFF is None:
        _DIFF = subprocess.run(["git", "-C", str(ROOT), "diff", "--binary", "HEAD", "--", *TREE], check=True,
                               capture_output=True, text=True).stdout if TREE else ""
    return _DIFF


def build(commit, patch=None, diff=""):
    """The optimized .wasm of `commit`, with the working tree's `diff` (tree_diff()) and then
    PATCHES[patch] applied if given (cached by all three, and by the patch's text)."""
    if commit == "HEAD":
        commit = head()
    tag = f"-{patch}-{hashlib.sha256(repr(PATCHES[patch]).encode()).hexdigest()[:8]}" if patch else ""
    if diff:
        tag = f"-tree-{hashlib.sha256(diff.encode()).hexdigest()[:8]}{tag}"
    out = OUT / f"{commit}{tag}.wasm"
    if out.is_file():
        return out
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llm-ablation-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), commit], check=True)
        try:
            if diff:
                subprocess.run(["git", "-C", str(tree), "apply", "--whitespace=nowarn", "-"], input=diff, text=True,
                               check=True)
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
            run.log(f"building {commit}" + (" + the working tree's " + ",".join(TREE) if diff else "")
                    + (f" with {patch}" if patch else ""))
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


def token_envoys(mock):
    """The token-limit rows' Envoys against `mock`: (label, Envoy), (c) first."""
    lim, diff, out = run.HIGH, tree_diff(), []
    rows = [(label, build(AT, patch, diff), tokens) for label, patch, tokens in TOKEN_ROWS
            if patch is None or PICK is None or patch in PICK]
    if diff:
        rows += [(TOKEN_HEAD[tokens], build("HEAD"), tokens) for tokens in (False, True)]
    if BASE:
        rows += [(f"({'t' if tokens else 'c'}), `{BASE}`", build(BASE), tokens) for tokens in (False, True)]
    for label, wasm, tokens in rows:
        measure(wasm)
        fj = run.ours_json(lim["capacity"], lim["rate"], extra=run.TOKENS if tokens else None)
        out.append((label, run.Envoy("c", "mock", 2, upstream_port=mock.port, capacity=lim["capacity"],
                                     rate=lim["rate"], filter_json=fj)))
    return out


def cpu_ns(pid):
    """CPU time of every thread of `pid` so far, in ns (schedstat: finer than /proc/<pid>/stat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def children_cpu_ns():
    """CPU time of the children waited for (each wrk run, once it is over), in ns."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((r.ru_utime + r.ru_stime) * 1e9)


def wrk_cpu(e, mock):
    """One wrk run (POST) against `e`, with the CPU each process spent per request in it, in µs:
    Envoy's (every thread), the mock provider's and wrk's. CPU time per request is what the filter
    costs, and unlike req/s it hardly moves with other work on the machine."""
    before = (cpu_ns(e.proc.pid), cpu_ns(mock.proc.pid), children_cpu_ns())
    r = run.wrk(e.url, run.SECONDS, post=True)
    after = (cpu_ns(e.proc.pid), cpu_ns(mock.proc.pid), children_cpu_ns())
    n = max(r["requests"], 1)
    envoy, upstream, client = ((b - a) / n / 1e3 for a, b in zip(before, after))
    return {"rps": r["rps"], "requests": r["requests"], "envoy_us": envoy, "mock_us": upstream, "wrk_us": client}


def oha_cpu(e, mock, rate):
    """As wrk_cpu, with oha's open loop at `rate` requests/s instead (`--rate`): at a fixed rate
    below the maximum, Envoy handles each request alike whatever else runs, so its CPU time per
    request is the filter's cost with little of the batching a saturated loop changes with load."""
    before = (cpu_ns(e.proc.pid), cpu_ns(mock.proc.pid))
    r = run.oha(e.url, run.SECONDS, rate, post=True)
    after = (cpu_ns(e.proc.pid), cpu_ns(mock.proc.pid))
    n = max(sum(r["codes"].values()), 1)
    envoy, upstream = ((b - a) / n / 1e3 for a, b in zip(before, after))
    return {"rps": r["rps"], "requests": n, "envoy_us": envoy, "mock_us": upstream, "wrk_us": 0.0,
            "p50_us": r["p50_us"], "p99_us": r["p99_us"]}


def together(e, c):
    """wrk against `e` and against `c` at the same time (`--together`; each 1 thread, 16
    connections): both under the same load from the rest of the machine at the same instants, so
    that the ratio of their req/s moves far less with it than that of runs taken one after the
    other. Their req/s and Envoy's CPU time per request, in µs."""
    before = (cpu_ns(e.proc.pid), cpu_ns(c.proc.pid))
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run.wrk, x.url, run.SECONDS, True, 1, 16) for x in (e, c)]
        (re, rc) = (f.result() for f in runs)
    after = (cpu_ns(e.proc.pid), cpu_ns(c.proc.pid))
    cpu = [(b - a) / max(r["requests"], 1) / 1e3 for a, b, r in zip(before, after, (re, rc))]
    return {"rps": re["rps"], "rps_c": rc["rps"], "envoy_us": cpu[0], "envoy_c_us": cpu[1]}


RATE = None
TOGETHER = False
CONTROL = "(c) again, a second Envoy alike (the method's own error)"
# `--together`: the floor of any filter that estimates from the request body and settles from the
# answer's, measured as its own pair: the empty filter holding each request's headers until its
# body is in, reading it and each answer's last body chunk (bench/noop-filter `{"bodies":1}`),
# beside the empty filter.
FLOOR = "(w) holding the request for its body and reading both bodies, beside (w) (the floor of any token limit)"
# `--append`: the table is also appended to BENCHMARKS.md (`make bench`, after main()'s tables).
APPEND = False


def tokens_main():
    """`--tokens`: the token-limit rows alone (BENCH_REPS, default 10), interleaved as in main();
    the table goes to target/bench/ablation-tokens.md (or BENCH_OUT), and with `--append` to the end
    of BENCHMARKS.md too."""
    run.MEASURED.parent.mkdir(parents=True, exist_ok=True)
    mock, envoys, floor, res = None, [], [], {}
    try:
        mock = run.Mock(*run.MOCK_OPENAI)
        envoys = token_envoys(mock)
        if TOGETHER:
            lim = run.HIGH
            measure(build(AT, None, tree_diff()))
            envoys.append((CONTROL, run.Envoy("c", "mock", 2, upstream_port=mock.port, capacity=lim["capacity"],
                                              rate=lim["rate"], filter_json=run.ours_json(lim["capacity"], lim["rate"]))))
            floor = [run.Envoy("w", "mock", 2, upstream_port=mock.port, filter_json=json.dumps(j))
                     for j in ({"bodies": 1}, {})]
        for e in [e for _, e in envoys] + floor:
            run.wrk(e.url, 1, post=True)
        for rep in range(run.REPS):
            run.log(f"ablation (token limits): repetition {rep + 1}/{run.REPS}")
            if TOGETHER:
                c = envoys[0][1]
                pairs = [(label, e, c) for label, e in envoys[1:]] + [(FLOOR, *floor)]
                for label, e, beside in pairs[::1 if rep % 2 == 0 else -1]:
                    res.setdefault("together " + label, []).append(together(e, beside))
                continue
            for label, e in envoys[::1 if rep % 2 == 0 else -1]:
                r = oha_cpu(e, mock, RATE) if RATE else wrk_cpu(e, mock)
                res.setdefault("mock " + label, []).append(r["rps"])
                res.setdefault("cpu " + label, []).append(r)
    finally:
        for e in [e for _, e in envoys] + floor:
            e.stop()
        if mock:
            mock.stop()
        run.cleanup()
    res["current commit"] = head() if AT == "HEAD" else AT
    res["tree"] = ",".join(TREE)
    res["rate"] = RATE
    res["together"] = TOGETHER
    res["wasm bytes"] = {label: build(AT, patch, tree_diff()).stat().st_size for label, patch, _ in TOKEN_ROWS[:2]}
    if BASE:
        res["wasm bytes"][BASE] = build(BASE).stat().st_size
    (ROOT / "target/bench/ablation-tokens.json").write_text(json.dumps(res, indent=1))
    out = Path(os.environ.get("BENCH_OUT", str(ROOT / "target/bench/ablation-tokens.md")))
    out.write_text("\n".join(token_report(res)) + "\n")
    run.log(f"token-limit ablation written to {out}")
    if APPEND:
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write("\n" + "\n".join(token_report(res)) + "\n")
        run.log("token-limit ablation appended to BENCHMARKS.md")


def token_report(res):
    """The token-limit tables of `res`: per row, its req/s and ratios to (c) and (t) within each
    repetition; with CPU figures (`--tokens`), Envoy's CPU time per request against (c) and (t)."""
    if res.get("together"):
        return together_report(res)
    base, t = "mock " + TOKEN_C, "mock " + TOKEN_T
    if base not in res or t not in res:
        return []
    keys = ["mock " + label for label, _, _ in TOKEN_ROWS if "mock " + label in res] + [
        key for key in res if key.startswith(("mock (c), ", "mock (t), ")) and key[len("mock "):] not in
        [label for label, _, _ in TOKEN_ROWS]]
    name = lambda key: key[len("mock "):]
    per = lambda key, ref, f: [f(a, b) for a, b in zip(res[key], res[ref])]
    cell = lambda xs, digits, sign="": f"{run.med(xs):{sign},.{digits}f}{run.spread(xs, digits)}"
    tree, rate = res.get("tree"), res.get("rate")
    source = f"`{res.get('current commit', 'HEAD')}`" + (f" plus the working tree's changes to {tree}" if tree else "")
    load = f"oha open loop at {rate} requests/s" if rate else "wrk closed loop"
    lines = ["## Ablation: token limits, part by part\n",
             f"Mock provider (OpenAI style), the real `POST` of `bench/chat.json`, `--concurrency 2`, {load}, "
             f"{len(res[base])} × {run.SECONDS:g} s, every row in the same run, interleaved (every other repetition in "
             "the opposite order); figures against (c) or (t) are taken within each repetition, then their median "
             "(min–max). (c) is the filter with its request limit only; (t) adds a token limit that never binds (as in "
             "bench/run.py); the rows below (t) are (t) with one part switched off (a patch in `bench/ablation.py`). "
             f"Source: {source}.\n"]
    if not rate:
        lines += ["| build | req/s | ÷ (c) | ÷ (t) |", "|---|---|---|---|"]
        for key in keys:
            lines.append(f"| {name(key)} | {cell(res[key], 0)} | {cell(per(key, base, lambda a, b: a / b), 3)} | "
                         f"{cell(per(key, t, lambda a, b: a / b), 3)} |")
        lines.append("")
    cpu = lambda key: res.get("cpu " + name(key))
    if not all(cpu(key) for key in keys):
        return lines
    envoy = lambda key: [r["envoy_us"] for r in cpu(key)]
    minus = lambda key, ref: [a - b for a, b in zip(envoy(key), envoy(ref))]
    lines += ["Envoy's CPU time per request in the same runs (every thread's, from `/proc/<pid>/task/*/schedstat`), "
              "which other work on the machine moves less than req/s" + (
                  "; and oha's latency (with `--latency-correction`)." if rate else
                  "; predicted ÷ (c): (c)'s CPU per request (Envoy + mock provider + wrk, from `getrusage`) over the "
                  "row's, per repetition, the throughput ratio of a closed loop bound by the CPU they share.") + "\n"]
    if rate:
        lines += ["| build | Envoy µs/request | − (c), µs | − (t), µs | p50 µs | p99 µs |", "|---|---|---|---|---|---|"]
        for key in keys:
            lat = lambda f: [r[f] for r in cpu(key)]
            lines.append(f"| {name(key)} | {cell(envoy(key), 1)} | {cell(minus(key, base), 1, '+')} | "
                         f"{cell(minus(key, t), 1, '+')} | {cell(lat('p50_us'), 0)} | {cell(lat('p99_us'), 0)} |")
    else:
        total = lambda key: [r["envoy_us"] + r["mock_us"] + r["wrk_us"] for r in cpu(key)]
        lines += ["| build | Envoy µs/request | − (c), µs | − (t), µs | predicted ÷ (c) |", "|---|---|---|---|---|"]
        for key in keys:
            pred = [b / a for a, b in zip(total(key), total(base))]
            lines.append(f"| {name(key)} | {cell(envoy(key), 1)} | {cell(minus(key, base), 1, '+')} | "
                         f"{cell(minus(key, t), 1, '+')} | {cell(pred, 3)} |")
    return lines + [""]


def together_report(res):
    """The `--together` table: each row run at the same time as (c)."""
    floor = "together " + FLOOR
    keys = [key for key in res if key.startswith("together ") and key != floor]
    tree = res.get("tree")
    source = f"`{res.get('current commit', 'HEAD')}`" + (f" plus the working tree's changes to {tree}" if tree else "")
    lines = ["## Ablation: token limits, part by part, each beside (c)\n",
             "Mock provider (OpenAI style), the real `POST` of `bench/chat.json`, `--concurrency 2`. Each row's Envoy "
             "and (c)'s are loaded at the same time, each by its own wrk (1 thread, 16 connections, closed loop, "
             f"{run.SECONDS:g} s), so that both share whatever else the machine runs; {len(res[keys[0]])} repetitions, "
             "the rows in the opposite order every other one; the ratio of the two req/s and the difference of "
             "Envoy's CPU time per request (every thread's, `/proc/<pid>/task/*/schedstat`) are taken within each "
             "run, then their median (min–max). (c) is the filter with its request limit only; (t) adds a token "
             "limit that never binds (as in bench/run.py); the rows below (t) are (t) with one part switched off (a "
             f"patch in `bench/ablation.py`). Source: {source}.\n",
             "| build | req/s beside (c) | ÷ (c) | ÷ (t) | Envoy µs/request − (c)'s | − (t)'s |",
             "|---|---|---|---|---|---|"]
    t = "together " + TOKEN_T
    ratio = lambda key: [r["rps"] / r["rps_c"] for r in res[key]]
    diff = lambda key: [r["envoy_us"] - r["envoy_c_us"] for r in res[key]]
    for key in keys:
        rps = [r["rps"] for r in res[key]]
        # Against (t): both measured against (c) in the same repetition.
        over_t = [a / b for a, b in zip(ratio(key), ratio(t))] if t in res else []
        minus_t = [a - b for a, b in zip(diff(key), diff(t))] if t in res else []
        lines.append(f"| {key[len('together '):]} | {run.fmt(run.med(rps))}{run.spread(rps)} | "
                     f"{run.med(ratio(key)):.3f}{run.spread(ratio(key), 3)} | "
                     f"{run.med(over_t) or 0:.3f}{run.spread(over_t, 3)} | "
                     f"{run.med(diff(key)):+.1f}{run.spread(diff(key), 1)} | "
                     f"{run.med(minus_t) or 0:+.1f}{run.spread(minus_t, 1)} |")
    if floor in res and t in res:
        ratio_w = [r["rps"] / r["rps_c"] for r in res[floor]]
        diff_w = [r["envoy_us"] - r["envoy_c_us"] for r in res[floor]]
        lines.append(f"\nThe floor of any token limit, measured as its own pair in the same repetitions: the empty "
                     f"filter (w) holding each request's headers until its body is in, reading it and each answer's "
                     f"last body chunk (bench/noop-filter `{{\"bodies\":1}}`), beside (w): "
                     f"{run.med(ratio_w):.3f}{run.spread(ratio_w, 3)} of its req/s, "
                     f"{run.med(diff_w):+.1f}{run.spread(diff_w, 1)} µs of Envoy's CPU per request. (t)'s own token "
                     f"work beyond that floor: {run.med(diff(t)) - run.med(diff_w):+.1f} µs per request.")
    control = "together " + CONTROL
    if control in res:
        lines.append(f"\nThe control, (c) beside another (c), is the method's own error: its ratio "
                     f"({run.med(ratio(control)):.3f}) would be 1.000 and its difference 0 without it.")
    return lines + [""]


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
        mocks += token_envoys(mock)
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
    lines += token_report(res)
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
    if {"-h", "--help"} & set(sys.argv):
        sys.exit(print(__doc__ + "\nOptions: see bench/README.md."))
    if "--quick" in sys.argv:
        run.REPS, run.SECONDS = 1, 1
    if "--tree" in sys.argv[:-1]:
        TREE = sys.argv[sys.argv.index("--tree") + 1].split(",")
    elif os.environ.get("BENCH_TREE"):
        TREE = os.environ["BENCH_TREE"].split(",")
    if "--at" in sys.argv[:-1]:
        AT = sys.argv[sys.argv.index("--at") + 1]
    if "--rows" in sys.argv[:-1]:
        PICK = sys.argv[sys.argv.index("--rows") + 1].split(",")
    if "--base" in sys.argv[:-1]:
        BASE = sys.argv[sys.argv.index("--base") + 1]
    TOGETHER = "--together" in sys.argv
    APPEND = "--append" in sys.argv
    if "--rate" in sys.argv[:-1]:
        RATE = int(sys.argv[sys.argv.index("--rate") + 1])
    if "--tokens" in sys.argv:
        if "BENCH_REPS" not in os.environ and "--quick" not in sys.argv:
            run.REPS = 10
        tokens_main()
    elif "--report" in sys.argv:  # the tables again from the last run's figures, without measuring
        saved = json.loads((ROOT / "target/bench/ablation.json").read_text())
        run.REPS = len(saved["w"])
        report(saved, [build(c or saved.get("current commit", "HEAD")) for _, c, _ in STEPS])
    else:
        main()
