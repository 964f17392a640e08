#!/usr/bin/env python3
"""A loopback S3 server for saeflow's remote-cache tests and benchmarks: moto's S3 (PyPI `moto[server]`), with

- requests handled one at a time, so a conditional write (If-None-Match / If-Match) is atomic, as on S3;
- faults a test switches on through `POST /__faults` with a JSON body (all optional, all off by default):
    {"status": 503, "count": 3, "method": "PUT"}  answer the next 3 PUTs with 503 SlowDown (a transient error)
    {"delay_ms": 3000, "count": 2}                 hold the next 2 responses for 3 s before answering
    {"expired": true}                              answer everything with 400 ExpiredToken (expired credentials)
    {"status": 403, "code": "AccessDenied"}        answer every request with 403 AccessDenied (a denied write)
    {"freeze_after": 5, "method": "PUT"}           stop the whole process (SIGSTOP) on the 6th PUT, before
                                                   answering it: the server is gone mid-upload until the test
                                                   sends SIGCONT
  Both return the counters (requests seen, faults injected) since the previous POST, which starts new ones;
  `POST /__faults` with `{}` switches faults off. `GET /__faults` only reads the counters.

Prints `port N` on stdout once it listens on 127.0.0.1 (port 0 = any free port). Only ever binds loopback.
"""

import json
import os
import signal
import sys
import threading
import time

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

_serial = threading.Lock()
_faults = {}
_seen = {"requests": 0, "injected": 0}

EXPIRED = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>ExpiredToken</Code><Message>The provided token has expired.</Message></Error>"""
SLOWDOWN = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"""


def _matches(method):
    wanted = _faults.get("method")
    return wanted is None or wanted == method


def _take(counter):
    """Whether a counted fault applies to this request (and counts it down)."""
    left = _faults.get(counter)
    if left is None:
        return True
    if left <= 0:
        return False
    _faults[counter] = left - 1
    return True


def app_with_faults(moto_app):
    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "")
        if path == "/__faults":
            with _serial:
                if method == "POST":
                    length = int(environ.get("CONTENT_LENGTH") or 0)
                    body = environ["wsgi.input"].read(length) if length else b"{}"
                    _faults.clear()
                    _faults.update(json.loads(body or b"{}"))
                    if "count" in _faults:
                        _faults["left"] = _faults["count"]
                out = json.dumps({**_seen, "faults": _faults}).encode()
                if method == "POST":
                    _seen.update(requests=0, injected=0)
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))])
            return [out]
        with _serial:
            _seen["requests"] += 1
            if _faults.get("expired"):
                _seen["injected"] += 1
                start_response("400 Bad Request", [("Content-Type", "application/xml"), ("Content-Length", str(len(EXPIRED)))])
                return [EXPIRED]
            if "freeze_after" in _faults and _matches(method):
                if _faults["freeze_after"] <= 0:
                    del _faults["freeze_after"]
                    os.kill(os.getpid(), signal.SIGSTOP)
                else:
                    _faults["freeze_after"] -= 1
            if "status" in _faults and _matches(method) and _take("left"):
                _seen["injected"] += 1
                # Read the body, as a real server does before it answers.
                length = int(environ.get("CONTENT_LENGTH") or 0)
                if length:
                    environ["wsgi.input"].read(length)
                status = int(_faults["status"])
                code = _faults.get("code", "SlowDown")
                out = SLOWDOWN.replace(b"SlowDown", code.encode())
                start_response(f"{status} Injected", [("Content-Type", "application/xml"), ("Content-Length", str(len(out)))])
                return [out]
            delay = 0.0
            if "delay_ms" in _faults and _matches(method) and _take("left"):
                _seen["injected"] += 1
                delay = _faults["delay_ms"] / 1000.0
            body = b"".join(moto_app(environ, start_response))
        if delay:
            time.sleep(delay)
        return [body]

    return app


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    moto_app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", port, app_with_faults(moto_app), threaded=True)
    print(f"port {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
