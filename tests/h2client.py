#!/usr/bin/env python3
"""A test client that sends chat completions with request trailers, for tests/trailers.rs.

HTTP/2 (default): cleartext with prior knowledge over a plain socket (Envoy's listener has
`codec_type: AUTO`, which takes the HTTP/2 preface), with the `h2` package (scripts/setup.sh
--test installs it into .venv/). Each request is HEADERS (POST), DATA (the JSON body), then a
trailers HEADERS frame with END_STREAM; with --no-trailers, HEADERS then DATA with END_STREAM.

HTTP/1.1 (--http1): each request on its own connection, `transfer-encoding: chunked`, the body
as one chunk, then the last chunk with a trailer field (or none, with --no-trailers).

The N requests go out at once: over --connections connections (N streams spread over them
round-robin; one thread a connection, all released together), or, for HTTP/1.1, one
connection each. Everything is bounded by --timeout: a request with no complete answer by then
is reported with `"error"` and no status.

Prints one JSON object on stdout:
  {"t0_ms": <epoch ms when the requests were released>,
   "results": [{"i", "connection", "stream", "status", "headers", "body", "trailers",
                "sent_ms", "response_ms", "done_ms", "error"}, ...]}   (in request order)
`*_ms` are epoch milliseconds: when the request's last frame was written, when the response
headers came, when the response ended (null if they did not happen).
"""

import argparse
import json
import socket
import sys
import threading
import time

BODY = '{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}'


def now_ms():
    return int(time.time() * 1000)


def new_result(i, connection):
    return {
        "i": i,
        "connection": connection,
        "stream": None,
        "status": None,
        "headers": {},
        "body": "",
        "trailers": {},
        "sent_ms": None,
        "response_ms": None,
        "done_ms": None,
        "error": None,
    }


def h2_connection(args, conn_no, requests, barrier, deadline):
    """Sends `requests` (result dicts) as streams of one HTTP/2 connection and fills them in."""
    import h2.config
    import h2.connection
    import h2.events

    def fail_open(msg):
        for r in requests:
            if r["done_ms"] is None and r["error"] is None:
                r["error"] = msg

    try:
        sock = socket.create_connection((args.host, args.port), timeout=5)
    except OSError as e:
        barrier.wait()
        fail_open(f"connect: {e}")
        return
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    barrier.wait()
    by_stream = {}
    try:
        for r in requests:
            sid = conn.get_next_available_stream_id()
            r["stream"] = sid
            by_stream[sid] = r
            headers = [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", f"{args.host}:{args.port}"),
                (":path", args.path),
                ("content-type", "application/json"),
            ] + args.header
            body = args.body.encode()
            conn.send_headers(sid, headers)
            if args.no_trailers:
                conn.send_data(sid, body, end_stream=True)
            else:
                conn.send_data(sid, body)
                conn.send_headers(sid, [("x-trailer", "end")], end_stream=True)
            sock.sendall(conn.data_to_send())
            r["sent_ms"] = now_ms()
        open_streams = set(by_stream)
        while open_streams:
            left = deadline - time.monotonic()
            if left <= 0:
                fail_open(f"no complete answer within {args.timeout} s")
                break
            sock.settimeout(min(left, 1.0))
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                fail_open("connection closed by the server")
                break
            for ev in conn.receive_data(data):
                r = by_stream.get(getattr(ev, "stream_id", None))
                if isinstance(ev, h2.events.ResponseReceived) and r:
                    r["response_ms"] = now_ms()
                    for k, v in ev.headers:
                        if k == ":status":
                            r["status"] = int(v)
                        else:
                            r["headers"][k] = v
                elif isinstance(ev, h2.events.DataReceived):
                    if r:
                        r["body"] += ev.data.decode("utf-8", "replace")
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.TrailersReceived) and r:
                    r["trailers"] = dict(ev.headers)
                elif isinstance(ev, h2.events.StreamEnded) and r:
                    r["done_ms"] = now_ms()
                    open_streams.discard(ev.stream_id)
                elif isinstance(ev, h2.events.StreamReset) and r:
                    r["error"] = f"stream reset by the server (error code {ev.error_code})"
                    r["done_ms"] = now_ms()
                    open_streams.discard(ev.stream_id)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    fail_open(f"GOAWAY (error code {ev.error_code})")
                    open_streams.clear()
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
    except Exception as e:  # noqa: BLE001 - any failure is reported per request
        fail_open(f"{type(e).__name__}: {e}")
    finally:
        try:
            conn.close_connection()
            sock.sendall(conn.data_to_send())
        except Exception:  # noqa: BLE001
            pass
        sock.close()


def parse_http1(raw):
    """(status, headers, body, trailers) of one HTTP/1.1 response read to EOF."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"incomplete response head: {raw[:200]!r}")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    trailers = {}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                for line in rest.decode("latin-1").split("\r\n"):
                    if line:
                        k, _, v = line.partition(":")
                        trailers[k.strip().lower()] = v.strip()
                break
            body, rest = body + rest[:size], rest[size + 2 :]
    elif "content-length" in headers:
        body = rest[: int(headers["content-length"])]
    else:
        body = rest
    return status, headers, body.decode("utf-8", "replace"), trailers


def http1_request(args, r, barrier, deadline):
    """One chunked request with (or without) a trailer on its own connection, `connection: close`."""
    body = args.body.encode()
    head = (
        f"POST {args.path} HTTP/1.1\r\nhost: {args.host}:{args.port}\r\ncontent-type: application/json\r\n"
        "transfer-encoding: chunked\r\nconnection: close\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in args.header)
        + "\r\n"
    ).encode()
    last = b"0\r\nx-trailer: end\r\n\r\n" if not args.no_trailers else b"0\r\n\r\n"
    try:
        sock = socket.create_connection((args.host, args.port), timeout=5)
    except OSError as e:
        barrier.wait()
        r["error"] = f"connect: {e}"
        return
    barrier.wait()
    try:
        sock.sendall(head + f"{len(body):x}\r\n".encode() + body + b"\r\n" + last)
        r["sent_ms"] = now_ms()
        raw = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                r["error"] = f"no complete answer within {args.timeout} s"
                return
            sock.settimeout(min(left, 1.0))
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            if data and r["response_ms"] is None:
                r["response_ms"] = now_ms()
            if not data:
                break
            raw += data
        r["done_ms"] = now_ms()
        r["status"], r["headers"], r["body"], r["trailers"] = parse_http1(raw)
    except Exception as e:  # noqa: BLE001
        r["error"] = f"{type(e).__name__}: {e}"
    finally:
        sock.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("-n", "--requests", type=int, default=10)
    p.add_argument("--connections", type=int, default=1, help="HTTP/2 connections to spread the streams over")
    p.add_argument("--http1", action="store_true", help="HTTP/1.1 chunked requests, one connection each")
    p.add_argument("--no-trailers", action="store_true", help="end the request with its body (for comparison)")
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="extra request header")
    p.add_argument("--body", default=BODY)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds for the whole run")
    args = p.parse_args()
    args.header = [(k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in args.header)]

    deadline = time.monotonic() + args.timeout
    t0 = []  # set by the barrier's action: when the last party arrives, before any is released
    if args.http1:
        results = [new_result(i, i) for i in range(args.requests)]
        barrier = threading.Barrier(args.requests + 1, action=lambda: t0.append(now_ms()))
        threads = [threading.Thread(target=http1_request, args=(args, r, barrier, deadline)) for r in results]
    else:
        conns = max(1, min(args.connections, args.requests))
        results = [new_result(i, i % conns) for i in range(args.requests)]
        barrier = threading.Barrier(conns + 1, action=lambda: t0.append(now_ms()))
        threads = [
            threading.Thread(target=h2_connection, args=(args, c, results[c::conns], barrier, deadline))
            for c in range(conns)
        ]
    for t in threads:
        t.daemon = True
        t.start()
    barrier.wait()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 2.0)
    for r in results:
        if r["status"] is None and r["error"] is None:
            r["error"] = f"no answer within {args.timeout} s"
    json.dump({"t0_ms": t0[0], "results": results}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
