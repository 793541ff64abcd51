"""Fission Workflows task: wait for the promise the previous task created, through vow's HTTP
gateway, and return its value. A rejected promise fails the task (HTTP 500), which fails the
workflow.

Each await is a long poll of at most 25 s (shorter than the function's own timeout); the loop
ends when the promise settles. Configuration: VOW_HTTP (host:port of a vow node's HTTP port).
"""

import base64
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

from flask import request


def main():
    vow = os.environ["VOW_HTTP"]
    promise_id = request.get_data(as_text=True).strip()
    url = f"http://{vow}/v1/promises/{urllib.parse.quote(promise_id, safe='')}/await?timeout=25s"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=35) as resp:
                record = json.load(resp)["promise"]
        except urllib.error.HTTPError as e:
            if e.code != 503:
                raise
            time.sleep(float(e.headers.get("Retry-After", "1")))
            continue
        if record["state"] == "STATE_PENDING":
            continue
        value = base64.b64decode(record["value"]["data"]).decode()
        if record["state"] != "STATE_RESOLVED":
            raise RuntimeError(f"{promise_id} ended {record['state']}: {value}")
        return value
