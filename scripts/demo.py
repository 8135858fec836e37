#!/usr/bin/env python3
"""llm-ratelimit demo: Envoy with the filter in front of the mock LLM provider, hit by a
mixed-priority burst well above the quota. Shows who got through at once, who waited, who got a
local 429 and why, what the provider actually received, and the filter's own Envoy stats. Then:
act 2, the provider's own quota runs out; act 3, a token-heavy batch beside interactive traffic;
act 4, two Envoys held to one limit by the rate limit service (rls/, Redis); act 5, two tenants
under token limits and daily budgets in that service, settled from the answers' usage; act 6, HIGH
fails over to a backup provider while the primary's quota is out; act 7, the adaptive in-flight
limit finds a self-hosted server's hidden capacity from cold, and follows it down.

Run with `make demo` (builds first) or `python3 scripts/demo.py`. Python 3 stdlib only.
`make demo DEMO_ARGS=--monitoring` (or `--monitoring`) also starts Prometheus and Alertmanager
natively (Debian packages; deploy/prometheus, deploy/alertmanager), turns the filter's alerts on,
trips the breaker once and prints the alert that arrived. `--act N` (or `--act 2,5`) runs only
those acts, e.g. `make demo DEMO_ARGS="--act 5"`. Acts 4 and 5 need redis-server and
target/release/llm-ratelimit-rls, and are skipped without them.
Everything it starts is stopped on exit, also on Ctrl-C.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "target/wasm32-wasip1/release/llm_ratelimit.wasm"
MOCK = ROOT / "target/release/mock-provider"

# The filter configuration for the demo: 20 tokens for everyone + 5 only HIGH/CRITICAL may spend,
# refilled at 10/s. LOW may wait 1.5 s, NORMAL 5 s; at most 8 requests wait at once, so a full
# queue makes HIGH/CRITICAL arrivals shed LOW/NORMAL waiters (and refuses the rest: queue_full).
FILTER = {
    "name": "demo",
    "bucket": {"capacity": 20, "refill_rate": 10, "burst_allowance": 5},
    "classify": {"header": "x-llm-priority", "trust_header": True},
    "priorities": {"LOW": {"max_wait_ms": 1500}, "NORMAL": {"max_wait_ms": 5000}},
    "queue": {"max_waiting": 8},
}
PRIORITIES = ["CRITICAL", "HIGH", "NORMAL", "LOW"]
MIX = {"CRITICAL": 0.05, "HIGH": 0.15, "NORMAL": 0.20, "LOW": 0.60}  # share of the traffic
RATE = 3 * FILTER["bucket"]["refill_rate"]  # arrivals per second: 3x the refill rate
DURATION_S = 10.0
REQUEST_TIMEOUT_S = 15.0
REASONS = ["no_token", "queue_full", "shed", "expired"]


# ---- Processes -------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envoy_bin():
    for p in (os.environ.get("ENVOY_BIN"), ROOT / ".venv/bin/envoy"):
        if p and Path(p).is_file():
            return str(p)
    sys.exit("envoy not found: run `make demo` or `make soak` (scripts/setup.sh installs it) or set ENVOY_BIN")


ALERTMANAGER_PORT = None  # set by --monitoring
RLS_PORT = None  # set by act 4
BACKUP_PORT = None  # set by the failover act


def render_config(filter_json, port, admin, upstream):
    """envoy/envoy.yaml with our ports, the built .wasm and the demo filter config on each
    filter line, keeping that line's "role" (exactly the substitution tests/support/mod.rs
    makes), so the demo runs the file users run."""
    out = []
    for line in (ROOT / "envoy/envoy.yaml").read_text().splitlines():
        body = line.lstrip()
        if body.startswith("value: '{") and body.endswith("'"):
            indent = line[: len(line) - len(body)]
            own = json.loads(body[len("value: '"):-1])
            config = json.loads(filter_json)
            # A failover target's observer runs with that target's own configuration.
            config = next((t["provider"] for t in config.get("failover", [])
                           if t.get("provider", {}).get("name") == own.get("name")), config)
            config = dict(config, role=own["role"])
            line = f"{indent}value: '{json.dumps(config)}'"
        else:
            line = (line.replace("port_value: 10000", f"port_value: {port}")
                        .replace("port_value: 9901", f"port_value: {admin}")
                        .replace("port_value: 9000", f"port_value: {upstream}")
                        .replace("port_value: 9002", f"port_value: {BACKUP_PORT or 9002}")
                        .replace("port_value: 9093", f"port_value: {ALERTMANAGER_PORT or 9093}")
                        .replace("port_value: 8081", f"port_value: {RLS_PORT or 8081}")
                        .replace("target/wasm32-wasip1/release/llm_ratelimit.wasm", str(WASM)))
        out.append(line)
    return "\n".join(out)


def start_mock(procs, *args):
    """The mock provider on a free port, answering after 50 ms unless `args` (its flags) say
    otherwise; returns its port."""
    p = subprocess.Popen([str(MOCK), "--port", "0", "--latency-ms", "50", *args],
                         stdout=subprocess.PIPE, text=True)
    procs.append(p)
    banner = p.stdout.readline().strip()  # "listening on 127.0.0.1:PORT"
    if not banner.startswith("listening on"):
        raise SystemExit(f"mock-provider did not start (said {banner!r})")
    return int(banner.rsplit(":", 1)[1])


def start_envoy(procs, tmp, upstream, filter_config=None, tag=""):
    """Envoy with the rendered config; returns (listener port, admin port, log path)."""
    filter_config = filter_config or FILTER
    port, admin = free_port(), free_port()
    name = filter_config["name"] + tag
    cfg, log = tmp / f"envoy-{name}.yaml", tmp / f"envoy-{name}.log"
    cfg.write_text(render_config(json.dumps(filter_config), port, admin, upstream))
    p = subprocess.Popen(
        [envoy_bin(), "-c", str(cfg), "--concurrency", "2", "--disable-hot-restart",
         "-l", "warning", "--component-log-level", "wasm:info", "--log-path", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(p)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and p.poll() is None:
        try:
            if http_get(admin, "/ready") == "LIVE\n":
                return port, admin, log
        except OSError:
            pass
        time.sleep(0.1)
    print("Envoy did not become ready. Its log:\n" + (log.read_text() if log.exists() else "(none)"))
    raise SystemExit(1)


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---- HTTP ------------------------------------------------------------------------------------

def http_get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()


def post_chat(port, body, headers):
    """POSTs a chat completion through Envoy; (status, headers) whatever the status. Raises
    OSError on a timeout or a connection error."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            r.read()
            return r.status, r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers


def chat(port, priority):
    """One chat completion through Envoy; returns what the client saw."""
    try:
        status, headers = post_chat(port, BODY, {"x-llm-priority": priority})
    except OSError as e:  # timeout or connection error
        return {"priority": priority, "status": None, "error": str(e)}
    queued = headers.get("x-ratelimit-queued-ms")
    return {"priority": priority, "status": status,
            "reason": headers.get("x-llm-ratelimit-reason"),
            "queued_ms": int(queued) if queued is not None else None}


# ---- Traffic ---------------------------------------------------------------------------------

def drive(port):
    """Open-loop Poisson arrivals at RATE/s for DURATION_S, each request in its own thread, with
    a progress line per second. Returns every result once all requests have finished, and the
    seconds that took."""
    rng = random.Random(42)  # same traffic every run
    results, lock = [], threading.Lock()

    def one(priority):
        r = chat(port, priority)
        with lock:
            results.append(r)

    threads, start, next_report, t = [], time.monotonic(), 1.0, 0.0
    while True:
        t += rng.expovariate(RATE)
        if t >= DURATION_S:
            break
        priority = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        while (now := time.monotonic() - start) < t:
            if now >= next_report:
                progress(now, len(threads), results, lock)
                next_report += 1
            time.sleep(min(0.01, t - now))
        th = threading.Thread(target=one, args=(priority,), daemon=True)
        th.start()
        threads.append(th)
    # Arrivals are over; queued requests are still being released or expiring.
    deadline = time.monotonic() + REQUEST_TIMEOUT_S + 2
    while any(th.is_alive() for th in threads) and time.monotonic() < deadline:
        now = time.monotonic() - start
        if now >= next_report:
            progress(now, len(threads), results, lock)
            next_report += 1
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    progress(elapsed, len(threads), results, lock, final=True)
    with lock:
        unanswered = [{"priority": "?", "status": None, "error": "no answer"}] * (len(threads) - len(results))
        return results + unanswered, elapsed


def progress(now, sent, results, lock, final=False):
    with lock:
        ok = sum(r["status"] == 200 for r in results)
        limited = sum(r["status"] == 429 for r in results)
        done = len(results)
    label = "done" if final else f"t={now:4.1f}s"
    print(f"  {label:>8}  sent {sent:4d}   200 {ok:4d}   429 {limited:4d}   in flight {sent - done:3d}",
          flush=True)


# ---- Report ----------------------------------------------------------------------------------

def pct(values, q):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(results, provider):
    """One row per priority: what the clients got, and what the provider received."""
    cols = ["sent", "200", "at once", "waited", "wait p50", "wait p99", *REASONS, "other", "provider"]
    print(f"{'priority':<9}" + "".join(f"{c:>11}" for c in cols))
    for p in PRIORITIES + ["total"]:
        rs = [r for r in results if p in (r["priority"], "total")]
        ok = [r for r in rs if r["status"] == 200]
        waits = [r["queued_ms"] for r in ok if r["queued_ms"] is not None]
        rejected = [sum(r["status"] == 429 and r["reason"] == why for r in rs) for why in REASONS]
        other = len(rs) - len(ok) - sum(rejected)  # timeouts, errors, other statuses
        received = sum(provider.values()) if p == "total" else provider.get(p, 0)
        p50, p99 = (pct(waits, 0.5), pct(waits, 0.99)) if p != "total" else ("", "")
        cells = [len(rs), len(ok), len(ok) - len(waits), len(waits), p50, p99, *rejected, other, received]
        print(f"{p:<9}" + "".join(f"{'-' if c is None else c:>11}" for c in cells))
    print("  200 = admitted: 'at once' or 'waited' (had x-ratelimit-queued-ms; p50/p99 of it in ms).")
    print("  no_token..expired = local 429s by x-llm-ratelimit-reason. "
          "provider = requests the mock received (GET /mock/stats by_priority).")


def envoy_stats(admin):
    """The filter's counters and gauges per priority, a few raw lines, and their Prometheus form.
    Returns the parsed stats."""
    text = http_get(admin, "/stats?filter=llm_ratelimit").splitlines()
    stats = {}
    for line in text:
        name, _, value = line.partition(": ")
        if value.isdigit():  # skips the queue_wait_ms histogram's summary line
            stats[name] = int(value)
    base = f"wasmcustom.llm_ratelimit.provider.{FILTER['name']}"
    cols = ["admitted", "queued", "released", "rejected", "shed", "expired", "cancelled", "queue_depth"]
    print(f"{'priority':<9}" + "".join(f"{c:>12}" for c in cols))
    for p in PRIORITIES:
        vals = [stats.get(f"{base}.priority.{p.lower()}.{c}", 0) for c in cols]
        print(f"{p:<9}" + "".join(f"{v:>12}" for v in vals))
    print("  raw lines:")
    for suffix in (".bucket.tokens", ".errors", ".critical.admitted", ".low.shed", ".low.queue_depth"):
        print("    " + next((l for l in text if l.startswith(base) and l.split(":")[0].endswith(suffix)), "?"))
    print("  the same stats in GET /stats/prometheus, labelled by envoy.yaml's stats_tags:")
    prom = http_get(admin, "/stats/prometheus").splitlines()
    for metric, label in (("admitted", 'priority="critical"'), ("rejected", 'priority="low"'),
                          ("queue_depth", 'priority="normal"'), ("bucket_tokens", "")):
        line = next((l for l in prom if l.startswith(f"llm_ratelimit_{metric}{{") and label in l), None)
        if line:
            print("    " + line)
    return {k[len(base) + 1:]: v for k, v in stats.items() if k.startswith(base)}


def explain(results, provider, stats, elapsed):
    """The closing paragraph, built from what actually happened in this run."""
    def count(p=None, status=None, reason=None, waited=None):
        return sum(1 for r in results
                   if p in (None, r["priority"]) and status in (None, r["status"])
                   and reason in (None, r.get("reason"))
                   and waited in (None, r.get("queued_ms") is not None))

    b, low_wait = FILTER["bucket"], FILTER["priorities"]["LOW"]["max_wait_ms"]
    ok = count(status=200)
    budget = b["capacity"] + b["burst_allowance"] + b["refill_rate"] * elapsed
    why = {
        "no_token": f"the expected wait was longer than the class allows, {low_wait} ms for LOW",
        "queue_full": "the queue was full and held nothing less important to evict",
        "shed": "evicted while waiting, to make room for a more important arrival",
        "expired": "waited the class's max_wait_ms without getting a token",
    }
    reasons = [f"{n} {r} ({why[r]})" for r in REASONS if (n := count(status=429, reason=r))]
    admitted = sum(v for k, v in stats.items() if k.endswith(".admitted"))
    print(
        f"{len(results)} requests arrived at ~{RATE}/s for {DURATION_S:.0f} s, against a bucket of "
        f"{b['capacity']} tokens (+{b['burst_allowance']} that only HIGH/CRITICAL may spend) refilled "
        f"at {b['refill_rate']}/s. {count(status=200, waited=False)} went straight through while "
        f"the bucket had tokens; after that, requests waited inside Envoy and freed tokens went to "
        f"the waiting classes by weight: {count(status=200, waited=True)} were released later "
        f"(their responses carry x-ratelimit-queued-ms). CRITICAL got "
        f"{count('CRITICAL', 200)} of {count('CRITICAL')} through, HIGH {count('HIGH', 200)} of "
        f"{count('HIGH')}, NORMAL {count('NORMAL', 200)} of {count('NORMAL')}, LOW only "
        f"{count('LOW', 200)} of {count('LOW')}. The others got a local 429 from the proxy, with "
        f"retry-after/retry-after-ms and the reason in x-llm-ratelimit-reason, and never reached "
        f"the provider: " + "; ".join(reasons) + ". "
        f"The provider received {sum(provider.values())} requests in {elapsed:.1f} s, what the "
        f"bucket allows in that time is {budget:.0f}; Envoy's stats count {admitted} admitted for "
        f"the {ok} 200s the clients saw.")


# ---- Act 2: the provider's own quota runs out ------------------------------------------------

PROVIDER_QUOTA, PROVIDER_WINDOW_S, ACT2_RATE, ACT2_S = 10, 6, 6, 7


def http_post(port, path, payload):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(payload).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read().decode()


def provider_exhaustion(port, admin, mock):
    """NORMAL traffic against a provider allowing PROVIDER_QUOTA requests per window (OpenAI-style
    headers): the filter reads `x-ratelimit-remaining-requests: 0` and holds the rest until the
    reset, instead of letting them hit the exhausted provider."""
    http_post(mock, "/mock/config", {"quota": PROVIDER_QUOTA, "window_ms": PROVIDER_WINDOW_S * 1000,
                                     "style": "openai", "latency_ms": 50})
    http_post(mock, "/mock/reset", {})
    print(f"\n==> act 2: the provider allows {PROVIDER_QUOTA} requests per {PROVIDER_WINDOW_S} s window "
          f"(OpenAI-style headers); sending {ACT2_RATE}/s NORMAL for {ACT2_S} s")
    results, lock, threads = [], threading.Lock(), []

    def one():
        r = chat(port, "NORMAL")
        with lock:
            results.append(r)

    for _ in range(ACT2_RATE * ACT2_S):
        th = threading.Thread(target=one, daemon=True)
        th.start()
        threads.append(th)
        time.sleep(1 / ACT2_RATE)
    for th in threads:
        th.join(REQUEST_TIMEOUT_S + 2)
    mock_stats = json.loads(http_get(mock, "/mock/stats"))
    waited = [r["queued_ms"] for r in results if r["status"] == 200 and r["queued_ms"] is not None]
    stats = {line.split(": ")[0].rsplit(".", 1)[-1]: line.split(": ")[1]
             for line in http_get(admin, "/stats?filter=llm_ratelimit.provider.demo.(throttled|upstream_429|breaker)")
             .splitlines() if ": " in line}
    sent = len(results)
    print(f"   sent {sent}: {sum(r['status'] == 200 for r in results)} answered 200 "
          f"({len(waited)} of them after waiting for the provider's reset, p50 {pct(waited, 0.5)} ms), "
          f"{sum(r['status'] == 429 for r in results)} refused at once "
          f"({refusals(results)}), each with a Retry-After")
    print(f"   the provider received {mock_stats['requests']} requests and answered {mock_stats['rate_limited']} "
          f"of them with 429; without the filter all {sent} would have reached it, "
          f"at least {max(0, sent - 2 * PROVIDER_QUOTA)} of them into an exhausted window")
    print(f"   filter stats: throttled {stats.get('throttled', '?')}, upstream_429 {stats.get('upstream_429', '?')}, "
          f"breaker.trips {stats.get('trips', '?')}")
    return [r for r in results if r["status"] not in (200, 429)]


# ---- Act 3: a token-heavy batch beside interactive traffic ----------------------------------

# A token limit scaled down from a tokens-per-minute quota: 20000 tokens refilled at 2000/s, of
# which the last 3000 only HIGH/CRITICAL may spend. Requests are plentiful (100, 50/s): here the
# tokens are what runs out.
TOKENS_FILTER = {
    "name": "tokens",
    "bucket": {"capacity": 100, "refill_rate": 50},
    "classify": {"header": "x-llm-priority", "trust_header": True},
    "tokens": {"capacity": 20000, "refill_rate": 2000, "burst_allowance": 3000},
    "priorities": {"LOW": {"max_wait_ms": 4000}},
}
BATCH = {"priority": "LOW", "rate": 4, "prompt_chars": 16000, "max_tokens": 1000}  # ~5000 tokens each
INTERACTIVE = {"priority": "HIGH", "rate": 5, "prompt_chars": 200, "max_tokens": 200}  # ~250 each
ACT3_S = 6


def llm_call(port, kind):
    """One chat completion of the given kind; the mock answers with 100 tokens."""
    body = json.dumps({"model": "gpt-4o", "max_tokens": kind["max_tokens"],
                       "messages": [{"role": "user", "content": "x" * kind["prompt_chars"]}]}).encode()
    sent = time.monotonic()
    try:
        status, headers = post_chat(port, body, {"x-llm-priority": kind["priority"], "x-mock-output-tokens": "100"})
    except OSError as e:
        return {"status": None, "error": str(e)}
    return {"status": status, "reason": headers.get("x-llm-ratelimit-reason"),
            "ms": int((time.monotonic() - sent) * 1000)}


def refusals(rs):
    """The local 429s' reasons among results `rs`, as "12 expired, 3 queue_full" (or "none")."""
    reasons = {}
    for r in rs:
        if r["status"] == 429:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(reasons.items())) or "none"


def on_schedule(schedule):
    """Calls each `(at_s, fn, args)` of `schedule` (in time order) on its own thread at `at_s`
    seconds from now, waits for them all, and returns the seconds it took."""
    threads, start = [], time.monotonic()
    for at, fn, args in schedule:
        time.sleep(max(0.0, at - (time.monotonic() - start)))
        th = threading.Thread(target=fn, args=args, daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(REQUEST_TIMEOUT_S + 2)
    return time.monotonic() - start


def token_limits(procs, tmp, mock):
    """A batch job of large prompts (LOW) beside interactive requests (HIGH) against a token
    limit: the batch is held to what the token bucket allows, interactive traffic keeps flowing."""
    http_post(mock, "/mock/config", {"quota": 0, "token_quota": 0, "latency_ms": 50})
    http_post(mock, "/mock/reset", {})
    port, admin, log = start_envoy(procs, tmp, mock, TOKENS_FILTER)
    t = TOKENS_FILTER["tokens"]
    print(f"\n==> act 3: a token limit of {t['capacity']} tokens refilled at {t['refill_rate']}/s "
          f"(the last {t['burst_allowance']} for HIGH/CRITICAL only); for {ACT3_S} s, a batch job sends "
          f"{BATCH['rate']}/s LOW requests of ~5000 tokens and an app sends {INTERACTIVE['rate']}/s HIGH "
          f"requests of ~250")
    print(f"    {json.dumps(TOKENS_FILTER)}")
    results = {"batch": [], "interactive": []}
    lock = threading.Lock()

    def one(name, kind):
        r = llm_call(port, kind)
        with lock:
            results[name].append(r)

    elapsed = on_schedule(sorted([(i / BATCH["rate"], one, ("batch", BATCH)) for i in range(BATCH["rate"] * ACT3_S)]
                                 + [(i / INTERACTIVE["rate"], one, ("interactive", INTERACTIVE))
                                    for i in range(INTERACTIVE["rate"] * ACT3_S)], key=lambda x: x[0]))
    for name in ("interactive", "batch"):
        rs = results[name]
        ok = [r["ms"] for r in rs if r["status"] == 200]
        print(f"   {name:11} sent {len(rs)}: {len(ok)} answered 200 (latency p50 {pct(ok, 0.5)} ms, "
              f"p99 {pct(ok, 0.99)} ms), {sum(r['status'] == 429 for r in rs)} refused "
              f"({refusals(rs)})")
    served = json.loads(http_get(mock, "/mock/stats"))
    tokens = served["tokens_input"] + served["tokens_output"]
    allowed = t["capacity"] + t["burst_allowance"] + t["refill_rate"] * elapsed
    stats = {line.split(": ")[0].rsplit(".", 1)[-1]: line.split(": ")[1]
             for line in http_get(admin, "/stats?filter=llm_ratelimit.provider.tokens.tokens").splitlines()
             if ": " in line}
    print(f"   the provider served {tokens} tokens in {elapsed:.1f} s; the bucket allows at most "
          f"{allowed:.0f} (capacity + burst + refill x time). Without the filter the batch alone "
          f"would have sent ~{BATCH['rate'] * ACT3_S * 4100} tokens")
    print(f"   filter stats: tokens.estimated {stats.get('estimated', '?')}, tokens.actual {stats.get('actual', '?')} "
          f"(reserved by estimate, settled from each answer's usage), tokens.bucket {stats.get('bucket', '?')}")
    failed = [r for rs in results.values() for r in rs if r["status"] not in (200, 429)]
    if not failed and tokens > allowed:
        print(f"FAILED: the provider served more tokens ({tokens}) than the token bucket allows ({allowed:.0f})")
        failed = [{"status": None}]
    return failed


# ---- Act 4: two Envoys, one limit --------------------------------------------------------

SHARED_LIMIT = 10  # requests per second, for both Envoys together
SHARED_FILTER = {
    "name": "shared",
    # Each Envoy's own bucket alone would let 10/s through: 20/s for the two.
    "bucket": {"capacity": 10, "refill_rate": 10, "burst_allowance": 0},
    "queue": {"enabled": False},
    "global": {"cluster": "ratelimit", "timeout_ms": 100},
}
ACT4_S, ACT4_RATE = 6, 25  # seconds; requests per second offered to each Envoy


def start_rls(procs, tmp, limits_yaml, tag):
    """redis-server and our rate limit service (rls/) with `limits_yaml`, on free ports; returns
    the service's (gRPC port, HTTP port), or None when either binary is missing."""
    rls = ROOT / "target/release/llm-ratelimit-rls"
    if not shutil.which("redis-server") or not rls.is_file():
        return None
    redis = free_port()
    procs.append(subprocess.Popen(["redis-server", "--port", str(redis), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL))
    limits = tmp / f"limits-{tag}.yaml"
    limits.write_text(limits_yaml)
    for _ in range(50):
        try:
            socket.create_connection(("127.0.0.1", redis), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    p = subprocess.Popen([str(rls), "--config", str(limits), "--redis", f"redis://127.0.0.1:{redis}",
                          "--grpc-host", "127.0.0.1", "--grpc-port", "0", "--http-host", "127.0.0.1",
                          "--http-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(p)
    line = p.stdout.readline()
    banner = line.split()  # listening on grpc HOST:PORT http HOST:PORT
    if len(banner) != 6 or banner[:3] != ["listening", "on", "grpc"]:
        raise SystemExit(f"llm-ratelimit-rls did not start (said {line.strip()!r})")
    return int(banner[3].rsplit(":", 1)[1]), int(banner[5].rsplit(":", 1)[1])


def shared_limit(procs, tmp, mock):
    """Two Envoys in front of one provider, each with its own bucket, held to one limit by the
    rate limit service: the provider sees the limit, not twice it."""
    global RLS_PORT
    ports = start_rls(procs, tmp, "domain: llm-ratelimit\ndescriptors:\n  - key: provider\n    value: shared\n"
                      "    descriptors:\n      - key: unit\n        value: requests\n"
                      f"        rate_limit: {{unit: second, requests_per_unit: {SHARED_LIMIT}}}\n", "shared")
    if ports is None:
        print("\n==> act 4 skipped: redis-server or target/release/llm-ratelimit-rls missing (make build)")
        return []
    RLS_PORT = ports[0]
    http_post(mock, "/mock/config", {"quota": 0, "token_quota": 0, "latency_ms": 50})
    http_post(mock, "/mock/reset", {})
    envoys = [start_envoy(procs, tmp, mock, SHARED_FILTER, tag) for tag in ("-a", "-b")]
    print(f"\n==> act 4: two Envoys, each with its own bucket of {SHARED_FILTER['bucket']['refill_rate']}/s, "
          f"asking one rate limit service (rls/, Redis sliding window) that allows {SHARED_LIMIT}/s for both; "
          f"{ACT4_RATE}/s sent to each for {ACT4_S} s")
    print(f"    {json.dumps(SHARED_FILTER)}")
    results = {0: [], 1: []}
    lock = threading.Lock()

    def one(i, port):
        r = llm_call(port, INTERACTIVE)
        with lock:
            results[i].append(r)

    elapsed = on_schedule([(n / ACT4_RATE, one, (i, port)) for n in range(ACT4_RATE * ACT4_S)
                           for i, (port, _, _) in enumerate(envoys)])
    for i, rs in results.items():
        print(f"   Envoy {'ab'[i]}: sent {len(rs)}, {sum(r['status'] == 200 for r in rs)} admitted, refused: "
              f"{refusals(rs)}")
    received = json.loads(http_get(mock, "/mock/stats"))["requests"]
    most = SHARED_LIMIT * (int(elapsed) + 1)
    print(f"   the provider received {received} in {elapsed:.1f} s: at most {most} allowed "
          f"({SHARED_LIMIT}/s in every 1 s window); each Envoy's bucket alone would have let "
          f"~{2 * SHARED_FILTER['bucket']['refill_rate'] * elapsed + 20:.0f} through")
    failed = [r for rs in results.values() for r in rs if r["status"] not in (200, 429)]
    if not failed and received > most * 1.02:
        print(f"FAILED: the provider received {received}, more than the shared limit allows ({most})")
        failed = [{"status": None}]
    return failed


# ---- Act 5: quotas that follow real usage -------------------------------------------------

# Two tenants, each with its own token limit in this Envoy and a daily budget in the rate limit
# service (Redis: it holds across restarts and instances). Every call sends a 160-character
# prompt (40 tokens) asking for up to 1260 tokens, so ~1300 are reserved; the mock answers 90
# (x-mock-output-tokens): 130 used, a tenth of the estimate, and at gpt-4o's $2.50 / $10 per
# million tokens, 40 x 2.5 + 90 x 10 = 1000 micro-dollars, $0.001 an answer.
PACIFIC = "PST8PDT,M3.2.0,M11.1.0"  # Los Angeles: midnight there is when the budgets reset
TENANT_TOKENS = 3000  # each tenant's LLM tokens per minute, in this Envoy
QUOTAS_FILTER = {
    "name": "quotas",
    "bucket": {"capacity": 100, "refill_rate": 50},
    "tokens": {"capacity": 90000},
    "tenant": {"key_header": "x-llm-tenant", "capacity": 20, "refill_rate": 10,
               "tokens": {"capacity": TENANT_TOKENS}},
    "prices": {"models": {"gpt-4o": {"input": 2.5, "output": 10}}},
    "global": {"cluster": "ratelimit", "descriptors": ["provider", "tenant", "unit"], "timeout_ms": 500,
               "failure_mode": "deny"},
}
BUDGETS = {"team-a": 5000, None: 1_000_000}  # micro-dollars a day: team-a $0.005, every other tenant $1
SERVICE_TOKENS = 20000  # per tenant and minute, in the service too: counted there as used, not as estimated
QUOTA_CALL = {"prompt_chars": 160, "max_tokens": 1260, "output_tokens": 90}
TENANT_RATES = {"team-a": 2, "team-b": 4}  # requests per second
ACT5_S = 8


def quotas_limits():
    """The service's limits file: [provider=quotas, tenant, unit] with a daily cost budget
    (team-a's own, else the default) and a token limit per tenant."""
    def tenant(value, budget):
        head = "      - key: tenant\n" + (f"        value: {value}\n" if value else "")
        return (head + "        descriptors:\n"
                "          - key: unit\n            value: cost\n"
                f"            rate_limit: {{unit: day, requests_per_unit: {budget}, time_zone: \"{PACIFIC}\", "
                "name: daily_budget_usd_micros}\n"
                "          - key: unit\n            value: tokens\n"
                f"            rate_limit: {{unit: minute, requests_per_unit: {SERVICE_TOKENS}}}\n")
    return ("domain: llm-ratelimit\ndescriptors:\n  - key: provider\n    value: quotas\n    descriptors:\n"
            + "".join(tenant(t, b) for t, b in BUDGETS.items()))


def tenant_call(port, tenant):
    """One gpt-4o call of QUOTA_CALL for `tenant`; what the client saw, with a 429's body."""
    body = json.dumps({"model": "gpt-4o", "max_tokens": QUOTA_CALL["max_tokens"],
                       "messages": [{"role": "user", "content": "x" * QUOTA_CALL["prompt_chars"]}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={
        "content-type": "application/json", "x-llm-tenant": tenant,
        "x-mock-output-tokens": str(QUOTA_CALL["output_tokens"])})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            usage = json.loads(r.read()).get("usage", {})
            return {"status": r.status, "tokens": usage.get("total_tokens", 0)}
    except urllib.error.HTTPError as e:
        h = e.headers
        return {"status": e.code, "reason": h.get("x-llm-ratelimit-reason"), "retry_after": h.get("retry-after"),
                "retry_after_ms": h.get("retry-after-ms"), "should_retry": h.get("x-should-retry"),
                "body": e.read().decode(errors="replace"), "at": time.time()}
    except OSError as e:
        return {"status": None, "error": str(e)}


def local_time(epoch_s, rule):
    """`epoch_s` as "YYYY-MM-DD HH:MM ZONE" under the POSIX TZ `rule` (Python's time.tzset, which
    reads the same rules the service does)."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = rule
    time.tzset()
    try:
        return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(epoch_s))
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


def error_message(body):
    """The `error.message` of an OpenAI-style error body, else the body."""
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body


def usd(micros):
    return f"${micros / 1e6:.3f}"


def tenant_quotas(procs, tmp, mock):
    """Two tenants under token limits and a daily budget: team-a spends its budget and is told
    when it resets, team-b goes on, held by its own token limit, which follows what it uses."""
    global RLS_PORT
    started = time.monotonic()
    ports = start_rls(procs, tmp, quotas_limits(), "quotas")
    if ports is None:
        print("\n==> act 5 skipped: redis-server or target/release/llm-ratelimit-rls missing (make build)")
        return []
    RLS_PORT, rls_http = ports
    http_post(mock, "/mock/config", {"quota": 0, "token_quota": 0, "latency_ms": 50})
    http_post(mock, "/mock/reset", {})
    port, admin, log = start_envoy(procs, tmp, mock, QUOTAS_FILTER)
    print(f"\n==> act 5: quotas that follow real usage. Two tenants (x-llm-tenant), each with "
          f"{TENANT_TOKENS} tokens/min in this Envoy and a daily budget in the rate limit service "
          f"(team-a {usd(BUDGETS['team-a'])}, others {usd(BUDGETS[None])}, midnight to midnight Pacific, "
          f"time_zone \"{PACIFIC}\"); for {ACT5_S} s, team-a sends {TENANT_RATES['team-a']}/s and team-b "
          f"{TENANT_RATES['team-b']}/s gpt-4o calls: a {QUOTA_CALL['prompt_chars']}-character prompt, max_tokens "
          f"{QUOTA_CALL['max_tokens']}, answered with {QUOTA_CALL['output_tokens']} tokens")
    print(f"    {json.dumps(QUOTAS_FILTER)}")
    results = {t: [] for t in TENANT_RATES}
    lock = threading.Lock()

    def one(tenant):
        r = tenant_call(port, tenant)
        with lock:
            results[tenant].append(r)

    elapsed = on_schedule(sorted([(i / rate, one, (t,)) for t, rate in TENANT_RATES.items()
                                  for i in range(rate * ACT5_S)], key=lambda x: x[0]))
    time.sleep(1.5)  # leased tokens expire (global.lease_ms) and are refunded; the stats are written on the tick
    for t, rs in results.items():
        ok = [r for r in rs if r["status"] == 200]
        print(f"   {t} ({TENANT_RATES[t]}/s) sent {len(rs)}: {len(ok)} answered 200 "
              f"({sum(r['tokens'] for r in ok)} tokens used), {sum(r['status'] == 429 for r in rs)} refused "
              f"({refusals(rs)})")
    stats = {}
    for line in http_get(admin, f"/stats?filter=llm_ratelimit.provider.{QUOTAS_FILTER['name']}.").splitlines():
        name, _, value = line.partition(": ")
        if value.isdigit():
            stats[name.split(f".{QUOTAS_FILTER['name']}.", 1)[1]] = int(value)

    served = sum(r["status"] == 200 for rs in results.values() for r in rs)
    spent = stats.get("cost.spent_micro_usd", 0)
    budget = [r for r in results["team-a"] if r.get("reason") == "budget_exceeded"]
    if budget:
        first = budget[0]
        wait_s = int(first["retry_after_ms"] or 0) / 1000 or float(first["retry_after"] or 0)
        reset = first["at"] + wait_s
        a_ok = sum(r["status"] == 200 for r in results["team-a"])
        print(f"   team-a spent its {usd(BUDGETS['team-a'])} in {a_ok} answers of {usd(spent / max(served, 1))}, "
              f"then got 429 budget_exceeded with Retry-After {first['retry_after']} s "
              f"({int(wait_s // 3600)} h {int(wait_s % 3600 // 60):02d} min: the budget resets at "
              f"{local_time(reset, PACIFIC)} = {local_time(reset, 'UTC0')[11:]}), x-should-retry: "
              f"{first['should_retry']}, and the message \"{error_message(first['body'])}\"")
    team_b = results["team-b"]
    b_ok = sum(r["status"] == 200 for r in team_b)
    est, act = stats.get("tokens.estimated", 0), stats.get("tokens.actual", 0)
    per_call = est / max(served, 1)  # the estimate each call reserved
    by_estimate = int((TENANT_TOKENS + TENANT_TOKENS / 60 * elapsed) // per_call)
    waits = sorted(int(r["retry_after_ms"] or 0) for r in team_b if r.get("reason") == "tenant_limit")
    told = f"; its tenant_limit 429s said when: retry-after-ms {waits[0]} to {waits[-1]}" if waits else ""
    print(f"   team-b, its budget far from spent, was held by its token limit instead: {b_ok} answers in "
          f"{elapsed:.1f} s from {TENANT_TOKENS} tokens + {TENANT_TOKENS / 60:.0f}/s, each reservation of "
          f"{per_call:.0f} settled to the tokens its answer used (on estimates alone: {by_estimate}){told}")
    print(f"   filter stats: tokens.estimated {est}, tokens.actual {act} "
          f"(estimates {est / act if act else 0:.1f}x usage), tenants.limited {stats.get('tenants.limited', '?')}, "
          f"cost.spent_micro_usd {spent}, cost.budget_refused {stats.get('cost.budget_refused', '?')}, "
          f"global.refunded_tokens {stats.get('global.refunded_tokens', '?')} (estimates and leases unspent), "
          f"global.charged_cost {stats.get('global.charged_cost', '?')} (+1 each check counted)")
    usage = {}
    for t, unit in (("team-a", "cost"), ("team-b", "cost"), ("team-b", "tokens")):
        path = f"/usage?domain=llm-ratelimit&descriptor=provider={QUOTAS_FILTER['name']},tenant={t},unit={unit}"
        try:
            usage[t, unit] = json.loads(http_get(rls_http, path))
        except (OSError, ValueError) as e:
            usage[t, unit] = {"error": str(e)}
        if (t, unit) == ("team-a", "cost"):
            print(f"   the service's count: GET http://127.0.0.1:{rls_http}{path}\n     {json.dumps(usage[t, unit])}")
    b_cost, b_tokens = usage["team-b", "cost"], usage["team-b", "tokens"]
    print(f"   and team-b's: {usd(b_cost.get('used', 0))} spent of {usd(b_cost.get('limit', 0))} today; "
          f"{b_tokens.get('used', '?')} tokens of {b_tokens.get('limit', '?')} in the last minute "
          f"(reserved by estimate and never settled: {b_ok * per_call:.0f}). Act 5 took "
          f"{time.monotonic() - started:.1f} s")

    failed = [r for rs in results.values() for r in rs if r["status"] not in (200, 429)]
    if not failed and not budget:
        print("FAILED: team-a's budget never ran out")
        failed = [{"status": None}]
    if not failed and any(r.get("reason") == "budget_exceeded" for r in team_b):
        print("FAILED: team-b was refused for a budget it had not spent")
        failed = [{"status": None}]
    return failed


# ---- Act 6: failover by priority ----------------------------------------------------------

# The primary's quota runs out; HIGH goes to a backup provider (a second mock, on its own cluster
# llm_backup in envoy/envoy.yaml) while LOW waits for the primary's reset. The backup takes at
# most 10/s (its own bucket, and the backup mock's quota of 10 per second), HIGH is 9/s of it.
FAILOVER_FILTER = {
    "name": "primary",
    "bucket": {"capacity": 1000, "refill_rate": 1000},
    "classify": {"header": "x-llm-priority", "trust_header": True},
    "failover": [{"provider": {"name": "backup", "bucket": {"capacity": 2, "refill_rate": 10, "burst_allowance": 0}},
                  "classes": ["CRITICAL", "HIGH"]}],
}
# The primary allows ACT6_QUOTA requests per ACT6_WINDOW_S window: enough that the LOW held during
# the window all fit in the next one.
ACT6_QUOTA, ACT6_WINDOW_S, ACT6_RATE, ACT6_S = 120, 8, 30, 5


def filter_stats(admin, name, pattern=""):
    """The filter's stats of provider `name` whose names match `pattern` (a regex, after the
    provider's prefix), as {"priority.high.failover": 3, ...}."""
    stats = {}
    prefix = f"llm_ratelimit.provider.{name}."
    for line in http_get(admin, "/stats?filter=" + urllib.parse.quote(prefix + pattern)).splitlines():
        key, _, value = line.partition(": ")
        if value.isdigit() and prefix in key:
            stats[key.split(prefix, 1)[1]] = int(value)
    return stats


def failover(procs, tmp, mock):
    """HIGH fails over to a backup provider while the primary's quota is out; LOW waits for the
    primary's reset, and nothing reaches the exhausted primary meanwhile."""
    global BACKUP_PORT
    started = time.monotonic()
    BACKUP_PORT = backup = start_mock(procs, "--quota", "10", "--window-ms", "1000")
    port, admin, log = start_envoy(procs, tmp, mock, FAILOVER_FILTER)
    print(f"\n==> act 6: failover by priority. The primary allows {ACT6_QUOTA} requests per {ACT6_WINDOW_S} s "
          f"(OpenAI-style headers) and is used up first; a backup mock (127.0.0.1:{backup}, 10 requests/s) "
          f"takes CRITICAL and HIGH meanwhile. Then {ACT6_RATE}/s for {ACT6_S} s, 3 in 10 HIGH, the rest LOW")
    print(f"    {json.dumps(FAILOVER_FILTER)}")
    http_post(mock, "/mock/config", {"quota": ACT6_QUOTA, "window_ms": ACT6_WINDOW_S * 1000, "style": "openai",
                                     "latency_ms": 50, "token_quota": 0})
    http_post(mock, "/mock/reset", {})
    window_start = time.monotonic()

    # Use the primary's quota up, in parallel batches no larger than what the last answer said
    # remains, until an answer says x-ratelimit-remaining-requests: 0.
    remaining, exhausting, lock = ACT6_QUOTA, [], threading.Lock()

    def spend():
        try:
            status, headers = post_chat(port, BODY, {"x-llm-priority": "NORMAL"})
        except OSError:
            status, headers = None, {}
        with lock:
            exhausting.append((status, headers.get("x-ratelimit-remaining-requests")))

    while remaining > 0 and len(exhausting) < 2 * ACT6_QUOTA:
        batch = [threading.Thread(target=spend, daemon=True) for _ in range(min(20, remaining))]
        for th in batch:
            th.start()
        for th in batch:
            th.join(REQUEST_TIMEOUT_S)
        left = [int(r) for s, r in exhausting[-len(batch):] if s == 200 and r is not None and r.isdigit()]
        if not left:
            print(f"   FAILED: the primary's answers carry no x-ratelimit-remaining-requests: {exhausting[-3:]}")
            return [{"status": None}]
        remaining = min(left)
    before = json.loads(http_get(mock, "/mock/stats"))["requests"]
    reset_in = ACT6_WINDOW_S - (time.monotonic() - window_start)
    print(f"   {len(exhausting)} NORMAL requests used the primary's quota up: the last answer said "
          f"x-ratelimit-remaining-requests: 0, reset in {reset_in:.1f} s")

    results = []

    def one(priority):
        sent = time.monotonic()
        try:
            status, headers = post_chat(port, BODY, {"x-llm-priority": priority})
        except OSError:
            status, headers = None, {}
        queued = headers.get("x-ratelimit-queued-ms")
        with lock:
            results.append({"priority": priority, "status": status, "provider": headers.get("x-llm-ratelimit-provider", "primary"),
                            "reason": headers.get("x-llm-ratelimit-reason"),
                            "queued_ms": int(queued) if queued is not None else None,
                            "ms": int((time.monotonic() - sent) * 1000)})

    elapsed = on_schedule([(i / ACT6_RATE, one, ("HIGH" if i % 10 in (0, 3, 6) else "LOW",))
                           for i in range(ACT6_RATE * ACT6_S)])
    after = json.loads(http_get(mock, "/mock/stats"))
    backup_stats = json.loads(http_get(backup, "/mock/stats"))
    stats = filter_stats(admin, "primary", "(priority.high.failover|failover.backup.sent)")

    high = [r for r in results if r["priority"] == "HIGH"]
    low = [r for r in results if r["priority"] == "LOW"]
    high_backup = [r for r in high if r["status"] == 200 and r["provider"] == "backup"]
    low_after = [r for r in low if r["status"] == 200 and r["provider"] == "primary" and r["queued_ms"] is not None]
    waits = [r["queued_ms"] for r in low_after]
    during_hold = after["requests"] - before - len(low_after)
    print(f"   sent {ACT6_RATE * ACT6_S}, answered {len(high)} HIGH and {len(low)} LOW, {elapsed:.1f} s from the "
          f"first request to the last answer")
    print(f"   HIGH: {len(high_backup)} of {len(high)} answered 200 by the backup "
          f"(x-llm-ratelimit-provider: backup), slowest {max((r['ms'] for r in high_backup), default=0)} ms; "
          f"other answers: {len(high) - len(high_backup)}")
    print(f"   LOW: {len(low_after)} of {len(low)} answered 200 by the primary after its reset, having waited "
          f"{min(waits, default=0)} to {max(waits, default=0)} ms (p50 {pct(waits, 0.5)} ms); "
          f"refused: {refusals(low)}; "
          f"other answers: {len(low) - len(low_after) - sum(r['status'] == 429 for r in low)}")
    print(f"   the backup mock received {backup_stats['requests']} requests and answered "
          f"{backup_stats['rate_limited']} of them with 429")
    print(f"   the exhausted primary received {during_hold} requests during the hold ({after['requests']} in all, "
          f"{before} before the traffic, {len(low_after)} LOW after its reset); it answered "
          f"{after['rate_limited']} with 429")
    print(f"   filter stats: priority.high.failover {stats.get('priority.high.failover', '?')}, "
          f"failover.backup.sent {stats.get('failover.backup.sent', '?')}. Act 6 took "
          f"{time.monotonic() - started:.1f} s")
    http_post(mock, "/mock/config", {"quota": 0})

    failed = [r for r in results if r["status"] not in (200, 429)]
    if not failed and len(high_backup) != len(high):
        print(f"FAILED: {len(high) - len(high_backup)} HIGH requests were not answered 200 by the backup")
        failed = [{"status": None}]
    if not failed and backup_stats["rate_limited"]:
        print(f"FAILED: the backup answered {backup_stats['rate_limited']} requests with 429")
        failed = [{"status": None}]
    if not failed and during_hold:
        print(f"FAILED: {during_hold} requests reached the exhausted primary during its hold")
        failed = [{"status": None}]
    return failed


# ---- Act 7: a self-hosted server's capacity, found from cold ------------------------------

# A self-hosted server (vLLM, TGI) publishes no quota: it serves K at once, queues some more and
# answers 503 beyond that. The adaptive in-flight limit starts at 1 and finds K from the answers.
ADAPTIVE_FILTER = {
    "name": "selfhosted",
    "bucket": {"capacity": 100000, "refill_rate": 100000},
    "in_flight": {"max": 64, "adaptive": {}},
}
ACT7_CAPACITY, ACT7_SERVICE_MS, ACT7_CLIENTS = 8, 200, 24
ACT7_S, ACT7_LOWER_AT_S, ACT7_LOWERED, ACT7_DIRECT_S = 18, 12, 4, 3


def closed_loop(port, clients, seconds, on_second=None):
    """`clients` threads each sending one request after the other to `port` for `seconds`;
    `on_second(t, results, lock)` is called at 0.1 s and then every second. Returns
    [(t, status)] of every request: t, seconds from the start to its answer."""
    results, lock, stop_at = [], threading.Lock(), threading.Event()

    def client():
        while not stop_at.is_set():
            try:
                status, _ = post_chat(port, BODY, {})
            except OSError:
                status = None
            with lock:
                results.append((time.monotonic() - start, status))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.monotonic()
    for th in threads:
        th.start()
    # 0.1 s: the first requests are out, none answered yet.
    for second in [0.1] + list(range(1, int(seconds) + 1)):
        time.sleep(max(0.0, second - (time.monotonic() - start)))
        if on_second:
            on_second(second, results, lock)
    stop_at.set()
    for th in threads:
        th.join(REQUEST_TIMEOUT_S + 2)
    return results


def adaptive_capacity(procs, tmp):
    """24 closed-loop clients against a server that serves 8 at once (hidden): the filter's
    adaptive in-flight limit climbs from 1 to about 8, then follows the capacity down to 4."""
    started = time.monotonic()
    server = start_mock(procs, "--capacity", str(ACT7_CAPACITY), "--latency-ms", str(ACT7_SERVICE_MS))
    port, admin, log = start_envoy(procs, tmp, server, ADAPTIVE_FILTER)
    k_rate = ACT7_CAPACITY * 1000 / ACT7_SERVICE_MS
    print(f"\n==> act 7: a self-hosted server's capacity, found from cold. The mock serves {ACT7_CAPACITY} "
          f"at once for {ACT7_SERVICE_MS} ms each ({k_rate:.0f}/s), queues {ACT7_CAPACITY} more and answers "
          f"503 beyond, with no rate-limit headers; {ACT7_CLIENTS} closed-loop clients, and at "
          f"{ACT7_LOWER_AT_S} s its capacity drops to {ACT7_LOWERED}")
    print(f"    {json.dumps(ADAPTIVE_FILTER)}")
    print(f"  {'t':>5} {'limit':>6} {'in flight':>10} {'queued':>7} {'503s':>6} {'200s':>6}   (limit: the filter's "
          f"in_flight.limit gauge; in flight, queued, 503s so far: the server's capacity stats; 200s: answers "
          f"to the clients since the row before)")
    seen, marks = {}, {"ok": 0}

    def on_second(t, results, lock):
        limit = filter_stats(admin, "selfhosted", "in_flight.limit").get("in_flight.limit")
        cap = json.loads(http_get(server, "/mock/stats"))["capacity"]
        with lock:
            ok = sum(s == 200 for _, s in results)
        seen[t] = {"limit": limit}
        note = ""
        if t == ACT7_LOWER_AT_S:
            http_post(server, "/mock/config", {"capacity": ACT7_LOWERED})
            note = f"   <- capacity set to {ACT7_LOWERED} (POST /mock/config)"
        print(f"  {t:>4}s {limit if limit is not None else '?':>6} {cap['in_flight']:>10} {cap['waiting']:>7} "
              f"{cap['overflowed']:>6} {ok - marks['ok']:>6}{note}", flush=True)
        marks["ok"] = ok

    results = closed_loop(port, ACT7_CLIENTS, ACT7_S, on_second)
    mock_stats = json.loads(http_get(server, "/mock/stats"))
    stats = filter_stats(admin, "selfhosted", "in_flight")
    ok_k = sum(s == 200 for t, s in results if t < ACT7_LOWER_AT_S)
    found_at = min((t for t in range(1, ACT7_LOWER_AT_S) if (seen[t]["limit"] or 0) >= ACT7_CAPACITY - 1),
                   default=ACT7_LOWER_AT_S - 1)
    ok_found = sum(s == 200 for t, s in results if found_at <= t < ACT7_LOWER_AT_S)
    # From a second after the drop: the requests answered just after it were let in before.
    ok_low = sum(s == 200 for t, s in results if ACT7_LOWER_AT_S + 1 <= t < ACT7_S)
    low_s = ACT7_S - ACT7_LOWER_AT_S - 1
    limit_10 = seen[10]["limit"]
    share = mock_stats["capacity"]["overflowed"] / max(mock_stats["requests"], 1)
    others = [s for t, s in results if s != 200]
    print(f"   the limit after 10 s: {limit_10} (the server's capacity: {ACT7_CAPACITY}); after the drop: "
          f"{seen[ACT7_S]['limit']} (capacity {ACT7_LOWERED})")
    print(f"   served: {ok_k / ACT7_LOWER_AT_S:.1f}/s over the first {ACT7_LOWER_AT_S} s (from cold), "
          f"{ok_found / (ACT7_LOWER_AT_S - found_at):.1f}/s from {found_at} s (the limit near {ACT7_CAPACITY}), of the "
          f"{k_rate:.0f}/s {ACT7_CAPACITY} slots allow; {ok_low / low_s:.1f}/s from a second after the drop, of "
          f"{ACT7_LOWERED * 1000 / ACT7_SERVICE_MS:.0f}/s; {len(results)} answers to the clients, "
          f"{len(others)} not 200{' (' + ', '.join(sorted({str(s) for s in others})) + ')' if others else ''}")
    print(f"   the server received {mock_stats['requests']} requests (Envoy's retries included) and answered "
          f"{mock_stats['capacity']['overflowed']} with 503: {100 * share:.1f}%; most in flight at once "
          f"{mock_stats['capacity']['max_in_flight_seen']}")
    print(f"   filter stats: in_flight.raised {stats.get('in_flight.raised', '?')}, in_flight.cut "
          f"{stats.get('in_flight.cut', '?')}")

    # For contrast: the same clients straight at the server, without the filter.
    http_post(server, "/mock/config", {"capacity": ACT7_CAPACITY})
    deadline = time.monotonic() + 5
    while json.loads(http_get(server, "/mock/stats"))["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    http_post(server, "/mock/reset", {})
    direct = closed_loop(server, ACT7_CLIENTS, ACT7_DIRECT_S)
    d_ok, d_503 = sum(s == 200 for _, s in direct), sum(s == 503 for _, s in direct)
    d_rate = sum(s == 200 for t, s in direct if t < ACT7_DIRECT_S) / ACT7_DIRECT_S
    d_share = d_503 / max(len(direct), 1)
    print(f"   without the filter, the same {ACT7_CLIENTS} clients straight at the server (capacity "
          f"{ACT7_CAPACITY}) for {ACT7_DIRECT_S} s: {len(direct)} requests, {d_ok} served "
          f"({d_rate:.1f}/s), {d_503} answered 503: {100 * d_share:.1f}%. Act 7 took "
          f"{time.monotonic() - started:.1f} s")

    failed = [{"status": s} for _, s in results if s is None]
    if not failed and (limit_10 is None or not 6 <= limit_10 <= 10):
        print(f"FAILED: the limit after 10 s is {limit_10}, not within [6, 10]")
        failed = [{"status": None}]
    return failed


# ---- Monitoring: Prometheus and Alertmanager, natively ------------------------------------

def start_monitoring(procs, tmp):
    """Alertmanager and Prometheus (Debian packages) on free ports; returns their ports."""
    global ALERTMANAGER_PORT
    for binary in ("prometheus-alertmanager", "prometheus"):
        if not shutil.which(binary):
            sys.exit(f"{binary} not found: apt-get install prometheus prometheus-alertmanager")
    am, am_cluster, prom = free_port(), free_port(), free_port()
    (tmp / "am.yml").write_text((ROOT / "deploy/alertmanager/alertmanager.yml").read_text())
    procs.append(subprocess.Popen(
        ["prometheus-alertmanager", f"--config.file={tmp / 'am.yml'}", f"--storage.path={tmp / 'am-data'}",
         f"--web.listen-address=127.0.0.1:{am}", f"--cluster.listen-address=127.0.0.1:{am_cluster}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    ALERTMANAGER_PORT = am
    FILTER["alert"] = {"cluster": "alertmanager", "min_interval_s": 60}
    return am, prom


def start_prometheus(procs, tmp, prom, admin, am):
    """Prometheus scraping Envoy's admin every second, with the project's alert rules."""
    rules = tmp / "alerts.yaml"
    rules.write_text((ROOT / "deploy/prometheus/alerts.yaml").read_text())
    (tmp / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{rules}]\n"
        f"alerting: {{alertmanagers: [{{static_configs: [{{targets: ['127.0.0.1:{am}']}}]}}]}}\n"
        "scrape_configs:\n- job_name: envoy\n  metrics_path: /stats/prometheus\n"
        f"  static_configs: [{{targets: ['127.0.0.1:{admin}']}}]\n")
    procs.append(subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'prom-data'}",
         f"--web.listen-address=127.0.0.1:{prom}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def show_alert(port, am, prom):
    """Trips the breaker with one 429 that gives no timing, and prints the alert that arrived."""
    print("\n==> monitoring: one provider 429 with no timing trips the breaker; the filter alerts")
    try:
        post_chat(port, BODY, {"x-mock-status": "429", "x-envoy-max-retries": "0"})
    except OSError as e:
        print(f"   the request failed: {e}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alerts = json.loads(http_get(am, "/api/v2/alerts"))
        ours = [a for a in alerts if a["labels"].get("source") == "llm-ratelimit"]
        if ours:
            a = ours[0]
            print(f"   Alertmanager (http://127.0.0.1:{am}) received: {a['labels']['alertname']} "
                  f"provider={a['labels']['provider']} severity={a['labels']['severity']} "
                  f"startsAt={a['startsAt']} endsAt={a['endsAt']}")
            print(f"   \"{a['annotations']['summary']}\"")
            break
        time.sleep(0.2)
    else:
        print("   FAILED: no alert arrived in Alertmanager")
        return False
    q = urllib.parse.quote("sum by (priority) (llm_ratelimit_admitted)")
    try:
        r = json.loads(http_get(prom, f"/api/v1/query?query={q}"))
        rows = ", ".join(f"{x['metric'].get('priority', '?')} {x['value'][1]}" for x in r["data"]["result"])
        print(f"   Prometheus (http://127.0.0.1:{prom}) answers sum by (priority) (llm_ratelimit_admitted): {rows}")
    except (OSError, ValueError, KeyError) as e:
        print(f"   Prometheus query failed: {e}")
    return True


# ---- Main ------------------------------------------------------------------------------------

ACTS = {1: "a mixed-priority burst", 2: "the provider's quota runs out", 3: "a token-heavy batch",
        4: "two Envoys, one limit", 5: "quotas that follow real usage", 6: "failover by priority",
        7: "a self-hosted server's capacity, found from cold"}


def parse_args(argv):
    """`--monitoring`, and `--act N` (repeatable, or `--act 2,5`): run only those acts."""
    monitoring, acts, args = False, set(), list(argv)
    while args:
        a = args.pop(0)
        if a == "--monitoring":
            monitoring = True
        elif a == "--act" or a.startswith("--act="):
            value = a.partition("=")[2] if "=" in a else (args.pop(0) if args else "")
            try:
                acts |= {int(n) for n in value.split(",")}
            except ValueError:
                acts.add(0)
            if not acts <= set(ACTS):
                sys.exit(f"--act: expected act numbers 1 to {len(ACTS)}, got {value!r}")
        else:
            sys.exit(f"unknown argument {a!r}: scripts/demo.py [--monitoring] [--act N[,N...]]\n"
                     + "\n".join(f"  act {n}: {what}" for n, what in ACTS.items()))
    return monitoring, acts or set(ACTS)


def main():
    monitoring, acts = parse_args(sys.argv[1:])
    for f, hint in ((WASM, "the filter"), (MOCK, "the mock provider")):
        if not f.is_file():
            sys.exit(f"{f} not found: build {hint} first with `make build`")
    procs = []
    with tempfile.TemporaryDirectory(prefix="llm-ratelimit-demo-") as tmp:
        try:
            mock = start_mock(procs)
            if monitoring:
                am, prom = start_monitoring(procs, Path(tmp))
            # Acts 1 and 2 and the monitoring share the first Envoy.
            if acts & {1, 2} or monitoring:
                port, admin, log = start_envoy(procs, Path(tmp), mock)
                if monitoring:
                    start_prometheus(procs, Path(tmp), prom, admin, am)
                envoy = procs[-1]
                print(f"==> mock provider on 127.0.0.1:{mock} (50 ms latency); Envoy on 127.0.0.1:{port} "
                      f"(admin {admin}, 2 workers) with envoy/envoy.yaml and this filter config:")
                print(f"    {json.dumps(FILTER)}")
            if 1 in acts:
                mix = ", ".join(f"{int(v * 100)}% {k}" for k, v in MIX.items())
                print(f"==> sending ~{RATE}/s for {DURATION_S:.0f} s ({mix}), "
                      f"{RATE / FILTER['bucket']['refill_rate']:.0f}x the refill rate")
                results, elapsed = drive(port)
                if envoy.poll() is not None:
                    print("Envoy exited during the run. Its log:\n" + log.read_text())
                    return 1
                provider = json.loads(http_get(mock, "/mock/stats")).get("by_priority", {})
                print("\n==> what the clients saw, per priority")
                summary(results, provider)
                print("\n==> the filter's Envoy stats (GET /stats?filter=llm_ratelimit)")
                stats = envoy_stats(admin)
                failed = [r for r in results if r["status"] not in (200, 429)]
                if failed:
                    kinds = sorted({r.get("error") or f"HTTP {r['status']}" for r in failed})
                    print(f"\nFAILED: {len(failed)} requests got neither a 200 nor a 429: {', '.join(kinds)}."
                          f"\nEnvoy log (last 40 lines):\n" + "\n".join(log.read_text().splitlines()[-40:]))
                    return 1
                print("\n==> what you just saw")
                explain(results, provider, stats, elapsed)
            later = ((2, lambda: provider_exhaustion(port, admin, mock)),
                     (3, lambda: token_limits(procs, Path(tmp), mock)),
                     (4, lambda: shared_limit(procs, Path(tmp), mock)),
                     (5, lambda: tenant_quotas(procs, Path(tmp), mock)),
                     (6, lambda: failover(procs, Path(tmp), mock)),
                     (7, lambda: adaptive_capacity(procs, Path(tmp))))
            for n, act in later:
                if n not in acts:
                    continue
                failed = act()
                if failed:
                    print(f"\nFAILED: {len(failed)} requests in act {n} got neither a 200 nor a 429, "
                          f"or the act's own check failed")
                    return 1
            # Last, on the first Envoy, whose act-2 hold has long ended.
            if monitoring and not show_alert(port, am, prom):
                return 1
            return 0
        except KeyboardInterrupt:
            print("\ninterrupted")
            return 130
        finally:
            stop(procs)


if __name__ == "__main__":
    sys.exit(main())
