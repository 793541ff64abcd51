#!/usr/bin/env python3
"""Runs a Fission Workflows workflow the way its engine does, for the subset the examples use,
against the Fission router (or router_standin.py): tasks start once the tasks they `require`
have finished, each `run`s a Fission function with its `inputs` as the request body, and the
workflow's `output` is the named task's output. Inputs may be a literal or an expression:
`{$.Invocation.Inputs.default}` (the workflow's input) or `{$.Tasks.<name>.Output}`.

A task's function call is the workflow engine's: a failing function (non-2xx) fails the
workflow. A task that waits on a vow promise simply takes as long as the promise does.

Usage: workflow_standin.py --router http://HOST:PORT --workflow FILE.wf.yaml [--input TEXT]
Prints {"output": ..., "tasks": {name: output}} as JSON; exits 1 if the workflow failed.
"""

import argparse
import json
import re
import sys
import urllib.error
import urllib.request

import yaml

EXPR = re.compile(r"^\{\$\.(Invocation\.Inputs\.default|Tasks\.([A-Za-z0-9_-]+)\.Output)\}$")


def resolve(expr, invocation, outputs):
    m = EXPR.match(str(expr).strip())
    if not m:
        return str(expr)
    return invocation if m.group(2) is None else outputs[m.group(2)]


def order(tasks):
    done, out = set(), []
    while len(out) < len(tasks):
        ready = [n for n, t in tasks.items() if n not in done and set(t.get("requires") or []) <= done]
        if not ready:
            raise ValueError("the workflow's requires form a cycle or name unknown tasks")
        for n in sorted(ready):
            done.add(n)
            out.append(n)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--router", required=True)
    ap.add_argument("--workflow", required=True)
    ap.add_argument("--input", default="")
    args = ap.parse_args()
    with open(args.workflow) as f:
        wf = yaml.safe_load(f)
    tasks = wf["tasks"]
    outputs = {}
    for name in order(tasks):
        task = tasks[name]
        body = resolve(task.get("inputs", ""), args.input, outputs).encode()
        req = urllib.request.Request(f"{args.router}/fission-function/{task['run']}", data=body, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                outputs[name] = resp.read().decode()
        except urllib.error.HTTPError as e:
            print(json.dumps({"failed": name, "status": e.code, "error": e.read().decode(errors="replace")}))
            return 1
    print(json.dumps({"output": outputs[wf["output"]], "tasks": outputs}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
