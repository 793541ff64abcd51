#!/usr/bin/env python3
"""A stand-in for an external human-task marketplace (think Mechanical Turk): the kind of system
a vow promise waits on.

It knows nothing about vow. A requester posts a task with a callback URL and a bearer token; a
"worker" finishes it some time later, and the marketplace then calls the callback with a plain
HTTP POST — here, vow's HTTP gateway settling the promise with the completion token, which
allows that and nothing else.

    POST /tasks  {"title": "...", "callback_url": "...", "token": "...", "answer": "..."}
                 -> 201 {"task_id": "..."}; completed after --complete-after-ms
    GET  /tasks  -> the tasks and, for each, how its callback went

Usage: marketplace.py [--listen 127.0.0.1:0] [--complete-after-ms 500]
Prints "listening on HOST:PORT" once it serves.
"""

import argparse
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TASKS = {}
LOCK = threading.Lock()


def complete(task_id, delay_s):
    """The worker: after the delay, POST the answer to the callback, retrying while it fails."""
    time.sleep(delay_s)
    with LOCK:
        task = TASKS[task_id]
    body = json.dumps({"value": {"text": task["answer"]}, "idempotencyKey": f"task-{task_id}"}).encode()
    for attempt in range(20):
        req = urllib.request.Request(task["callback_url"], data=body, method="POST", headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {task['token']}",
        })
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                outcome = f"{resp.status}"
                break
        except urllib.error.HTTPError as e:
            outcome = f"{e.code} {e.read().decode(errors='replace')}"
            if e.code < 500:
                break  # a refusal is final (a bad or expired token, an already settled promise)
        except OSError as e:
            outcome = f"error {e}"
        time.sleep(0.2 * (attempt + 1))
    with LOCK:
        task["callback"] = outcome
        task["completed"] = True


class Handler(BaseHTTPRequestHandler):
    def reply(self, status, doc):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        if self.path != "/tasks":
            return self.reply(404, {"error": "no such route"})
        try:
            doc = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            task = {k: doc[k] for k in ("title", "callback_url", "token")}
        except (ValueError, KeyError) as e:
            return self.reply(400, {"error": f"bad task: {e}"})
        task.update(answer=doc.get("answer", "done"), completed=False, callback=None)
        task_id = uuid.uuid4().hex[:12]
        with LOCK:
            TASKS[task_id] = task
        threading.Thread(target=complete, args=(task_id, self.server.delay_s), daemon=True).start()
        self.reply(201, {"task_id": task_id})

    def do_GET(self):
        if self.path != "/tasks":
            return self.reply(404, {"error": "no such route"})
        with LOCK:
            tasks = {k: {kk: vv for kk, vv in v.items() if kk != "token"} for k, v in TASKS.items()}
        self.reply(200, tasks)

    def log_message(self, *args):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--complete-after-ms", type=int, default=500)
    args = ap.parse_args()
    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.delay_s = args.complete_after_ms / 1000
    print(f"listening on {host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
