#!/usr/bin/env python3
"""A small stand-in for Fission's router and Python environment, on loopback, for tests.

Fission's router sends `/fission-function/<name>` to a pod of the function's environment; the
Python environment imports the function's module and calls its `main()` with Flask's `request`
describing the call, answering with what `main()` returns. This does both in one process, with
the same contract: functions written for Fission's Python environment run here unchanged (if
Flask is not installed, a minimal `flask.request` is provided: `get_data(as_text=)`, `headers`,
`method`, `get_json()`).

Usage: router_standin.py --function NAME=PATH.py [--function ...] [--listen 127.0.0.1:0]
Prints "listening on HOST:PORT" once it serves. A function's module sees the environment this
process was started with (Fission passes configuration to functions the same way).
"""

import argparse
import importlib.util
import json
import sys
import threading
import traceback
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_local = threading.local()


class _Request:
    """The part of Flask's `request` that Fission functions use, for the current call."""

    @property
    def _call(self):
        return _local.call

    @property
    def method(self):
        return self._call["method"]

    @property
    def headers(self):
        return self._call["headers"]

    def get_data(self, as_text=False):
        body = self._call["body"]
        return body.decode() if as_text else body

    def get_json(self, silent=False):
        try:
            return json.loads(self._call["body"] or b"null")
        except ValueError:
            if silent:
                return None
            raise


def _install_flask_shim():
    try:
        import flask  # noqa: F401  (the real one: Fission's environment has it)
        return False
    except ImportError:
        shim = types.ModuleType("flask")
        shim.request = _Request()
        sys.modules["flask"] = shim
        return True


def load(name, path):
    spec = importlib.util.spec_from_file_location(f"fission_fn_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def handle_call(self):
        prefix = "/fission-function/"
        name = self.path.split("?", 1)[0][len(prefix):] if self.path.startswith(prefix) else None
        function = self.server.functions.get(name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        if function is None:
            return self.answer(404, f"no function {name!r}".encode())
        if self.headers.get("Vow-Prewarm") == "1":
            return self.answer(204, b"")
        _local.call = {"method": self.command, "headers": self.headers, "body": body}
        try:
            result = function()
        except Exception:  # a failing function is a 500, as in Fission's environment
            return self.answer(500, traceback.format_exc().encode())
        status = 200
        if isinstance(result, tuple):
            result, status = result[0], result[1]
        data = result if isinstance(result, bytes) else str(result).encode()
        self.answer(status, data)

    do_POST = do_GET = do_PUT = handle_call

    def answer(self, status, data):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--function", action="append", default=[], help="NAME=PATH.py")
    args = ap.parse_args()
    _install_flask_shim()
    functions = {}
    for f in args.function:
        name, path = f.split("=", 1)
        functions[name] = load(name, path)
    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.functions = functions
    print(f"listening on {host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
