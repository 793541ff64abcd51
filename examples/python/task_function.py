#!/usr/bin/env python3
"""A function in Python that waits on an external system through vow, over gRPC.

It creates a promise for a task, asks for a completion token (the right to settle that promise
and nothing else), hands the token and a callback URL — vow's HTTP gateway — to the external
system (examples/external-task/marketplace.py), and awaits the promise. The external system
never talks gRPC or holds any other credential: it POSTs its answer to the callback.

Usage:
  task_function.py --grpc HOST:PORT --http HOST:PORT --marketplace http://HOST:PORT \
                   --title "label image 7" [--answer cat] [--ttl-s 600] [--wait-s 60]

Prints the settled record as one JSON line. Uses only the documented contract: retries
UNAVAILABLE and DEADLINE_EXCEEDED with the same idempotency key, nothing else.
"""

import argparse
import json
import sys
import time
import urllib.parse
import urllib.request
import uuid

import grpc

from vow_stubs import load

RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def call(method, request, timeout=5, attempts=40):
    """One unary call, retried as the contract allows."""
    for attempt in range(attempts):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as e:
            if e.code() not in RETRY or attempt == attempts - 1:
                raise
            time.sleep(0.25)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--http", required=True, help="vow's HTTP port, as the external system reaches it")
    ap.add_argument("--marketplace", required=True)
    ap.add_argument("--title", required=True)
    ap.add_argument("--answer", default="done", help="what the stand-in marketplace's worker answers")
    ap.add_argument("--ttl-s", type=int, default=600)
    ap.add_argument("--wait-s", type=int, default=60)
    args = ap.parse_args()
    pb, pb_grpc = load()
    promises = pb_grpc.PromisesStub(grpc.insecure_channel(args.grpc))

    task_id = f"task-{uuid.uuid4().hex[:12]}"
    created = call(promises.Create, pb.CreateRequest(
        id=task_id,
        param=pb.Value(data=args.title.encode(), headers={"content-type": "text/plain"}),
        idempotency_key=f"create-{task_id}",
        completion_token_ttl_ms=args.ttl_s * 1000,
    ))
    callback = f"http://{args.http}/v1/promises/{urllib.parse.quote(task_id, safe='')}/resolve"
    task = json.dumps({"title": args.title, "callback_url": callback, "token": created.completion_token,
                       "answer": args.answer}).encode()
    req = urllib.request.Request(f"{args.marketplace}/tasks", data=task, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        posted = json.load(resp)

    deadline = time.time() + args.wait_s
    while True:
        left_ms = max(1, int((deadline - time.time()) * 1000))
        record = call(promises.Await, pb.AwaitRequest(id=task_id, wait_timeout_ms=min(left_ms, 30_000)),
                      timeout=35).promise
        if record.state != pb.STATE_PENDING or time.time() >= deadline:
            break
    print(json.dumps({
        "id": record.id,
        "state": pb.State.Name(record.state),
        "value": record.value.data.decode(errors="replace"),
        "marketplace_task": posted["task_id"],
    }), flush=True)
    return 0 if record.state == pb.STATE_RESOLVED else 1


if __name__ == "__main__":
    sys.exit(main())
