#!/usr/bin/env python3
"""Soak test: the real Envoy (--concurrency 2) with the filter in front of the mock provider,
under mixed traffic for SOAK_MINUTES (default 10). Python 3 stdlib only; `make soak`.

Traffic, all at once for the whole run:
  - a priority mix (x-llm-priority, trusted), above the filter's bucket so requests queue;
  - a provider quota window that runs out and resets (mock --quota / --window-ms);
  - 429 storms: every STORM_EVERY_S the provider's quota drops to 1 per window for STORM_S, and
    some requests always get 429s from the provider for their first router attempts;
  - clients that give up (close the connection) while their request waits in the queue;
  - tenants rotating through many keys (tenant.key_header), a fresh key every few requests.

Every 10 s it records Envoy's RSS (/proc/<pid>/status VmRSS) and heap (admin /memory); every 2 s
the queue depth gauges. Then it stops the traffic, lets the queues drain, and FAILS (exit 1) if
  - RSS at the end of traffic is more than 5% above RSS at the end of warm-up (the first 20%);
  - any queue depth gauge is not 0 once the traffic has stopped and drained;
  - Envoy's log shows a VM failure or a panic;
  - any request was lost: no HTTP answer, other than the clients that left on purpose.
Writes reliability/soak.csv, reliability/soak.png and reliability/soak-summary.md (and the last
200 lines of Envoy's log as reliability/soak-envoy-tail.log, not committed: *.log is ignored).
"""

import argparse
import collections
import csv
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pngplot  # noqa: E402
# envoy/envoy.yaml rendered the way the demo (and tests/support/mod.rs) render it.
from demo import envoy_bin, free_port, render_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "target/wasm32-wasip1/release/llm_ratelimit.wasm"
MOCK = ROOT / "target/release/mock-provider"
OUT = ROOT / "reliability"

PROVIDER = "soak"
FILTER = {
    "name": PROVIDER,
    "bucket": {"capacity": 20, "refill_rate": 12, "burst_allowance": 5},
    "classify": {"header": "x-llm-priority", "trust_header": True},
    "priorities": {"LOW": {"max_wait_ms": 1500}, "NORMAL": {"max_wait_ms": 4000},
                   "HIGH": {"max_wait_ms": 8000}},
    "queue": {"max_waiting": 60},
    "tenant": {"key_header": "x-llm-tenant", "capacity": 6, "refill_rate": 2, "slots": 512},
}
CLASSES = ["CRITICAL", "HIGH", "NORMAL", "LOW"]
MIX = [0.05, 0.15, 0.35, 0.45]
# The provider: 40 requests per 5 s window (8/s, below the filter's 12/s): windows run out.
MOCK_ARGS = ["--quota", "40", "--window-ms", "5000", "--latency-ms", "40"]
STORM_EVERY_S, STORM_S = 120, 15
WORKERS = 16
THINK_S = (0.0, 0.4)
LEAVER_SHARE = 0.07   # requests whose client leaves after LEAVE_AFTER_S
LEAVE_AFTER_S = 0.3
FLAKY_SHARE = 0.05    # requests the provider answers 429 for their first 2 attempts
REQUEST_TIMEOUT_S = 60
KEY_REUSE = 4         # requests per tenant key before the next key
RSS_EVERY_S, DEPTH_EVERY_S = 10, 2
WARMUP_SHARE, MAX_GROWTH = 0.20, 0.05
# What Envoy prints when a Wasm VM fails or the filter panics (proxy-wasm-cpp-host's
# "Function: proxy_on_... failed: Uncaught RuntimeError", Envoy's "Wasm VM failed", Rust's
# "panicked at") and any critical log line.
FAILURE_PATTERNS = [r"panick", r"\bpanic\b", r"Wasm VM failed", r"VM failed", r"Plugin failed",
                    r"failed: Uncaught", r"RuntimeError", r"\]\[critical\]", r"wasm log.*critical"]


def admin_get(admin, path, timeout=5):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=timeout) as r:
        return r.read().decode()


def mock_config(mock_port, patch):
    req = urllib.request.Request(f"http://127.0.0.1:{mock_port}/mock/config", data=json.dumps(patch).encode(),
                                 method="POST", headers={"content-type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def heap_bytes(admin):
    m = json.loads(admin_get(admin, "/memory"))
    return int(m.get("allocated", 0)), int(m.get("heap_size", 0))


def depths(admin):
    """Queue depth gauge of each class, process-wide."""
    stats = json.loads(admin_get(admin, "/stats?format=json&filter=queue_depth"))["stats"]
    by = {s["name"]: s.get("value", 0) for s in stats if "value" in s}
    prefix = f"wasmcustom.llm_ratelimit.provider.{PROVIDER}.priority."
    return [int(by.get(f"{prefix}{c.lower()}.queue_depth", 0)) for c in CLASSES]


def filter_stats(admin):
    stats = json.loads(admin_get(admin, f"/stats?format=json&filter=llm_ratelimit.provider.{PROVIDER}"))["stats"]
    return {s["name"].split(f"provider.{PROVIDER}.", 1)[1]: s["value"] for s in stats if "value" in s}


class Traffic:
    """WORKERS threads sending chat requests until stopped; counts what each got."""

    def __init__(self, port):
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcomes = collections.Counter()   # (class, status or "left" or "lost")
        self.lost = []                            # a few examples of lost requests
        self.next_key = 0
        self.sent = 0

    def tenant(self):
        with self.lock:
            self.sent += 1
            return f"tenant-{self.sent // KEY_REUSE}"

    def one(self, rng):
        cls = rng.choices(CLASSES, MIX)[0]
        leaver = rng.random() < LEAVER_SHARE
        headers = {"content-type": "application/json", "x-llm-priority": cls, "x-llm-tenant": self.tenant()}
        if rng.random() < FLAKY_SHARE:
            headers["x-mock-fail-attempts"] = "2"
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "soak"}],
                           "max_tokens": 16})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=LEAVE_AFTER_S if leaver else REQUEST_TIMEOUT_S)
        try:
            conn.request("POST", "/v1/chat/completions", body, headers)
            r = conn.getresponse()
            r.read()
            outcome = r.status
        except (socket.timeout, TimeoutError) as e:
            outcome = "left" if leaver else "lost"
            err = e
        except OSError as e:
            outcome = "lost"
            err = e
        finally:
            conn.close()
        with self.lock:
            self.outcomes[(cls, outcome)] += 1
            if outcome == "lost" and len(self.lost) < 20:
                self.lost.append(f"{time.strftime('%H:%M:%S')} {cls}: {err!r}")

    def worker(self, seed):
        rng = random.Random(seed)
        while not self.stop.is_set():
            self.one(rng)
            time.sleep(rng.uniform(*THINK_S))

    def start(self):
        self.threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(WORKERS)]
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(REQUEST_TIMEOUT_S + 5)

    def total(self, outcome=None):
        with self.lock:
            return sum(n for (_, o), n in self.outcomes.items() if outcome is None or o == outcome)


def storms(mock_port, stop, t0, log):
    """Every STORM_EVERY_S: the provider's quota drops to 1 per window for STORM_S."""
    while not stop.wait(STORM_EVERY_S):
        mock_config(mock_port, {"quota": 1})
        log.append(time.monotonic() - t0)
        if stop.wait(STORM_S):
            break
        mock_config(mock_port, {"quota": 40})
    mock_config(mock_port, {"quota": 40})


def log_failures(log_text):
    hits = []
    for line in log_text.splitlines():
        if any(re.search(p, line, re.IGNORECASE) for p in FAILURE_PATTERNS):
            hits.append(line)
    return hits


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "10")))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    duration = args.minutes * 60
    warmup = duration * WARMUP_SHARE
    args.out.mkdir(parents=True, exist_ok=True)
    for p in (WASM, MOCK):
        if not p.is_file():
            sys.exit(f"{p} not found: run `make build` (make soak does)")

    tmp = Path(tempfile.mkdtemp(prefix="llm-soak-"))
    procs = []
    try:
        mock = subprocess.Popen([str(MOCK), "--port", "0", *MOCK_ARGS], stdout=subprocess.PIPE, text=True)
        procs.append(mock)
        mock_port = int(mock.stdout.readline().strip().rsplit(":", 1)[1])
        port, admin = free_port(), free_port()
        cfg, log = tmp / "envoy.yaml", tmp / "envoy.log"
        cfg.write_text(render_config(json.dumps(FILTER), port, admin, mock_port))
        envoy = subprocess.Popen(
            [envoy_bin(), "-c", str(cfg), "--concurrency", "2", "--disable-hot-restart", "-l", "warning",
             "--component-log-level", "wasm:info", "--log-path", str(log), "--file-flush-interval-msec", "1000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(envoy)
        deadline = time.monotonic() + 30
        while True:
            try:
                if admin_get(admin, "/ready", 1) == "LIVE\n":
                    break
            except OSError:
                pass
            if envoy.poll() is not None or time.monotonic() > deadline:
                sys.exit("Envoy did not start:\n" + (log.read_text() if log.exists() else ""))
            time.sleep(0.1)

        print(f"==> soak: {args.minutes:g} min, Envoy pid {envoy.pid} (--concurrency 2), mock on :{mock_port}; "
              f"warm-up {warmup:.0f} s; output in {args.out}")
        traffic = Traffic(port)
        t0 = time.monotonic()
        traffic.start()
        storm_log, storm_stop = [], threading.Event()
        storm_thread = threading.Thread(target=storms, args=(mock_port, storm_stop, t0, storm_log), daemon=True)
        storm_thread.start()

        rows = []          # one per RSS sample
        depth_rows = []    # (t, sum of depths), every DEPTH_EVERY_S
        max_depth = 0
        next_rss = 0.0

        def sample(phase):
            nonlocal max_depth
            t = time.monotonic() - t0
            d = depths(admin)
            depth_rows.append((t, sum(d)))
            max_depth = max(max_depth, sum(d))
            if phase == "drained" or t >= next_rss:
                alloc, heap = heap_bytes(admin)
                rows.append({"t_s": round(t, 1), "phase": phase, "rss_kib": rss_kib(envoy.pid),
                             "heap_allocated": alloc, "heap_size": heap,
                             "depth_critical": d[0], "depth_high": d[1], "depth_normal": d[2], "depth_low": d[3],
                             "max_depth_since_last": max_depth, "sent": traffic.total(),
                             "lost": traffic.total("lost"), "left": traffic.total("left")})
                max_depth = 0
                return True
            return False

        while time.monotonic() - t0 < duration:
            if envoy.poll() is not None:
                break
            if sample("warmup" if time.monotonic() - t0 < warmup else "traffic"):
                next_rss += RSS_EVERY_S
                r = rows[-1]
                print(f"    {r['t_s']:7.0f} s  RSS {r['rss_kib'] / 1024:7.1f} MiB  heap {r['heap_allocated'] / 2**20:6.1f} MiB"
                      f"  depth max {r['max_depth_since_last']:3d}  sent {r['sent']:7d}  lost {r['lost']}", flush=True)
            time.sleep(DEPTH_EVERY_S)
        end_of_traffic = rows[-1] if rows else None
        print("==> stopping traffic; waiting for the queues to drain")
        storm_stop.set()
        traffic.finish()
        storm_thread.join(10)
        drained_at = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and envoy.poll() is None:
            if sum(depths(admin)) == 0:
                drained_at = time.monotonic() - t0
                break
            time.sleep(0.5)
        time.sleep(2)  # the gauges are written on ticks: two more seconds to see any stale value
        envoy_alive = envoy.poll() is None
        if envoy_alive:
            sample("drained")
        final_depths = depths(admin) if envoy_alive else None
        stats = filter_stats(admin) if envoy_alive else {}
        time.sleep(1.5)  # the log file is flushed every second
        failures = log_failures(log.read_text() if log.exists() else "")
        (args.out / "soak-envoy-tail.log").write_text("\n".join((log.read_text() if log.exists() else "").splitlines()[-200:]) + "\n")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()

    # ---- Verdict, CSV, PNG, summary ----
    with open(args.out / "soak.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    after_warmup = next((r for r in rows if r["phase"] == "traffic"), rows[-1])
    start, end = rows[0], end_of_traffic or rows[-1]
    growth = (end["rss_kib"] - after_warmup["rss_kib"]) / after_warmup["rss_kib"]
    peak = max(r["rss_kib"] for r in rows if r["phase"] == "traffic") if any(r["phase"] == "traffic" for r in rows) else end["rss_kib"]
    lost, left, sent = traffic.total("lost"), traffic.total("left"), traffic.total()
    by_status = collections.Counter()
    for (_, o), n in traffic.outcomes.items():
        by_status[o] += n
    checks = [
        ("Envoy ran to the end", envoy_alive, "exited early" if not envoy_alive else "alive"),
        (f"RSS growth after warm-up <= {MAX_GROWTH:.0%}", growth <= MAX_GROWTH,
         f"{after_warmup['rss_kib']} -> {end['rss_kib']} KiB ({growth:+.2%})"),
        ("queue depth gauges 0 after drain", final_depths == [0, 0, 0, 0], f"{final_depths}"),
        ("no VM failure or panic in Envoy's log", not failures, f"{len(failures)} lines"),
        ("no request lost", lost == 0, f"{lost} of {sent}"),
    ]
    ok = all(c[1] for c in checks)

    rss_pts = [(r["t_s"] / 60, r["rss_kib"] / 1024) for r in rows]
    heap_pts = [(r["t_s"] / 60, r["heap_allocated"] / 2**20) for r in rows]
    depth_pts = [(t / 60, d) for t, d in depth_rows]
    limit = after_warmup["rss_kib"] * (1 + MAX_GROWTH) / 1024
    png = pngplot.chart(
        f"llm-ratelimit soak: Envoy 1.40 --concurrency 2, {args.minutes:g} min, {sent} requests",
        "minutes since traffic started",
        [
            {"ylabel": "Envoy RSS (MiB)", "series": [("RSS", rss_pts)],
             "hlines": [("limit: +5% of RSS after warm-up", limit)], "vlines": [("end of warm-up", warmup / 60)]},
            {"ylabel": "Envoy heap allocated (MiB, admin /memory)", "series": [("heap", heap_pts)], "ymin": 0},
            {"ylabel": "requests waiting in the filter (all classes, every 2 s)", "series": [("queue depth", depth_pts)],
             "vlines": [("storm", s / 60) for s in storm_log], "ymin": 0},
        ])
    (args.out / "soak.png").write_bytes(png)

    lines = [
        f"# Soak run: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"{args.minutes:g} minutes, Envoy 1.40 `--concurrency 2`, {WORKERS} client threads, "
        f"{sent} requests ({sent / duration:.1f}/s), {traffic.sent // KEY_REUSE + 1} tenant keys, "
        f"{len(storm_log)} 429 storms. Warm-up: first {warmup:.0f} s.",
        "",
        "| check | result | measured |",
        "|---|---|---|",
        *[f"| {name} | {'PASS' if passed else 'FAIL'} | {what} |" for name, passed, what in checks],
        "",
        "| RSS | KiB |",
        "|---|---|",
        f"| start (t = {start['t_s']:.0f} s) | {start['rss_kib']} |",
        f"| after warm-up (t = {after_warmup['t_s']:.0f} s) | {after_warmup['rss_kib']} |",
        f"| peak during traffic | {peak} |",
        f"| end of traffic (t = {end['t_s']:.0f} s) | {end['rss_kib']} |",
        f"| after drain | {rows[-1]['rss_kib']} |",
        "",
        f"Growth after warm-up: {growth:+.2%} (limit {MAX_GROWTH:.0%}). Heap allocated: "
        f"{after_warmup['heap_allocated']} -> {end['heap_allocated']} bytes. "
        f"Queues drained {'at t = %.0f s' % drained_at if drained_at else 'NOT within 30 s'}; "
        f"depths after drain {final_depths}.",
        "",
        "Answers: " + ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items(), key=lambda kv: str(kv[0]))) +
        f". `left` = clients that closed the connection after {LEAVE_AFTER_S} s on purpose; "
        "`lost` = no HTTP answer otherwise.",
        "",
        "Filter stats at the end: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())
                                                if k.endswith(("admitted", "rejected", "queued", "released", "cancelled",
                                                               "trips", "errors")) and v),
    ]
    if traffic.lost:
        lines += ["", "Lost requests (first 20):", *[f"- {x}" for x in traffic.lost]]
    if failures:
        lines += ["", "Failure lines in Envoy's log:", "```", *failures[:20], "```"]
    (args.out / "soak-summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"==> {'PASS' if ok else 'FAIL'}: {args.out}/soak.csv, soak.png, soak-summary.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
