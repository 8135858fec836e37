#!/usr/bin/env python3
"""Writes the seed corpora into fuzz/seeds/<target>/ from the project's own fixtures.

Sources: the provider reference (../shared/reference/provider-rate-limit-headers.md, when it is
there), the mock provider's header names (mock-provider/src/styles.rs) and the string literals
of the unit tests next to each parser. `run.sh seed` runs this, then `cargo fuzz cmin` minimizes
the seeds into corpus/<target>/, which is what is committed.
"""
import glob
import hashlib
import os
import re
import sys

FUZZ = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(FUZZ)
REFERENCE = os.path.join(ROOT, "..", "shared", "reference", "provider-rate-limit-headers.md")
# The targets' prefix (see src/lib.rs): provider Auto, status 429, now = the reference clock, cap 1 day.
PREFIX = b"\x00\x00\x00\x00"
PROVIDERS = ["auto", "openai", "azure", "anthropic", "gemini", "groq", "mistral", "cohere", "bedrock", "generic"]


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def unescape(body):
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        n = body[i + 1] if i + 1 < len(body) else ""
        if n == "u" and body[i + 2 : i + 3] == "{":
            end = body.index("}", i)
            out.append(chr(int(body[i + 3 : end], 16)))
            i = end + 1
            continue
        if n == "\n":  # line continuation: skip the newline and the next line's indent
            i += 2
            while i < len(body) and body[i] in " \t":
                i += 1
            continue
        out.append({"n": "\n", "r": "\r", "t": "\t", "0": "\0", '"': '"', "\\": "\\", "'": "'"}.get(n, n))
        i += 2
    return "".join(out)


def literals(source):
    """Every string literal: raw (r#"..."#, br#"..."#) and plain ("...", b"...")."""
    found = []
    pattern = re.compile(r'b?r(#+)"(.*?)"\1|b?"((?:[^"\\]|\\.)*)"', re.S)
    for m in pattern.finditer(source):
        found.append(m.group(2) if m.group(1) else unescape(m.group(3)))
    return found


def tests_of(path):
    source = read(path)
    at = source.find("#[cfg(test)]")
    return source[at:] if at >= 0 else source


def pairs(source):
    """Header lists written as [("name", "value"), ...] in tests."""
    lists = []
    for m in re.finditer(r"\[((?:\s*\(\s*\"[^\"]*\"\s*,\s*\"(?:[^\"\\]|\\.)*\"\s*\)\s*,?)+)\s*\]", source):
        items = re.findall(r'\(\s*"([^"]*)"\s*,\s*"((?:[^"\\]|\\.)*)"\s*\)', m.group(1))
        lists.append([(n, unescape(v)) for n, v in items])
    return lists


seeds = {}


def add(target, data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    seeds.setdefault(target, set()).add(data)


def headers_seed(items, provider=0, status=0):
    text = "\n".join(f"{n}: {v}" for n, v in items)
    return bytes([provider, status, 0, 0]) + text.encode("utf-8")


# Provider headers: the unit tests' header lists, under Auto and under each provider.
for path in ["src/signals/mod.rs", "src/signals/providers.rs", "src/signals/ietf.rs"]:
    for items in pairs(tests_of(path)):
        add("signals_headers", headers_seed(items))
        for provider in range(1, len(PROVIDERS)):
            if any(n.lower().startswith(PROVIDERS[provider][:4]) for n, _ in items):
                add("signals_headers", headers_seed(items, provider))

# The reference's test vectors and inline `name: value` examples.
if os.path.exists(REFERENCE):
    with open(REFERENCE, encoding="utf-8") as f:
        reference = f.read()
    for row in re.findall(r"^\|([^|]*)\|([^|]*)\|([^|]*)\|", reference, re.M):
        name, values = row[1].strip(), re.findall(r"`([^`]*)`", row[2])
        if " " in name or "." in name:
            # error.message / RetryInfo rows: bodies.
            for v in values:
                add("signals_body", PREFIX + ('{"error":{"message":"%s"}}' % v).encode())
                add("signals_body", PREFIX + ('{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"%s"}]}}' % v).encode())
            continue
        for v in values:
            add("signals_headers", headers_seed([(name, v), ("date", "Fri, 29 Sep 2023 16:26:37 GMT")]))
            add("dates", v)
    for example in re.findall(r"`([A-Za-z][A-Za-z0-9-]*: [^`]+)`", reference):
        add("signals_headers", PREFIX + example.encode())
    for body in re.findall(r"`(\{[^`]*\})`", reference):
        add("signals_body", PREFIX + body.encode())

# The mock provider's header names, each style's set with typical values.
styles = read("mock-provider/src/styles.rs")
names = sorted(set(re.findall(r'"((?:x-|anthropic-|ratelimit|retry-)[a-z0-9-]*)"', styles)))
values = {"reset": "6m0s", "remaining": "0", "limit": "100", "retry-after": "3"}
for family in ["x-ratelimit-", "anthropic-", "ratelimitbysize-", "x-trial-", "ratelimit", "x-groq", "x-ms-", "retry-"]:
    items = [(n, next((v for k, v in values.items() if k in n), "1")) for n in names if n.startswith(family)]
    if items:
        add("signals_headers", headers_seed(items))

# Error bodies: the body parser's test literals that look like JSON.
for text in literals(tests_of("src/signals/body.rs")):
    if text.lstrip().startswith(("{", "[")):
        add("signals_body", PREFIX + text.encode("utf-8"))

# Configuration: JSON objects in the config tests and the envoy examples.
for path in sorted(glob.glob(os.path.join(ROOT, "src/config/*.rs"))):
    for text in literals(tests_of(os.path.relpath(path, ROOT))):
        if text.lstrip().startswith("{"):
            add("config", text)
for dirpath, _, files in os.walk(os.path.join(ROOT, "envoy")):
    for name in files:
        if name.endswith((".yaml", ".yml")):
            with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                for m in re.finditer(r'"@type": type\.googleapis\.com/google\.protobuf\.StringValue\s+value: \|\n((?:\s{10,}.*\n)+)', f.read()):
                    add("config", "\n".join(line.strip() for line in m.group(1).splitlines()))
            with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                for m in re.finditer(r"value: '(\{.*\})'", f.read()):
                    add("config", m.group(1))

# Request bodies: the estimate tests' JSON, under each path the tests name.
estimate = tests_of("src/tokens/estimate.rs")
paths = [p for p in literals(estimate) if p.startswith("/")] or ["/v1/chat/completions"]
for text in literals(estimate):
    if text.lstrip().startswith(("{", "[")):
        for path in paths[:3] + ["/v1/chat/completions"]:
            add("estimate", path.encode() + b"\n" + text.encode("utf-8"))

# Usage: SSE streams and bodies from the usage tests, with a few chunk patterns.
for text in literals(tests_of("src/tokens/usage.rs")):
    if "data:" in text or text.lstrip().startswith(("{", "[")):
        for pattern in [0, 0x0b, 0x81]:
            add("usage", bytes([pattern]) + text.encode("utf-8"))

# Values: the value parsers' test literals.
for text in literals(tests_of("src/signals/values.rs")):
    add("dates", text)

# Rate limit service answers (RateLimitResponse), encoded here by hand: OK, over limit with and
# without statuses (Limitador), a named limit, resets with and without nanos, two statuses.
def varint(v):
    out = b""
    while v >= 0x80:
        out += bytes([(v & 0x7F) | 0x80])
        v >>= 7
    return out + bytes([v])


def field(n, v):
    if isinstance(v, int):
        return varint(n << 3) + varint(v)
    return varint(n << 3 | 2) + varint(len(v)) + v


def status(code, remaining=None, reset=None):
    out = field(1, code)
    if remaining is not None:
        out += field(2, field(1, 100) + field(2, 1)) + field(3, remaining)
    if reset is not None:
        out += field(4, field(1, reset[0]) + field(2, reset[1]))
    return out


for answer in [
    field(1, 1) + field(2, status(1, 99, (1, 0))),
    field(1, 2) + field(2, status(2, 0, (0, 250_000_000))),
    field(1, 2),
    field(1, 1) + field(2, status(1, 5, (0, 1))) + field(2, status(2, 0, (59, 999_999_999))),
    field(1, 1) + field(2, status(1)) + field(5, b"raw body"),
    b"",
]:
    add("rls_answer", answer)

for target, items in sorted(seeds.items()):
    folder = os.path.join(FUZZ, "seeds", target)
    os.makedirs(folder, exist_ok=True)
    for data in items:
        with open(os.path.join(folder, hashlib.sha1(data).hexdigest()), "wb") as f:
            f.write(data)
    print(f"{target}: {len(items)} seeds", file=sys.stderr)
