#!/usr/bin/env python3
"""The seed's integrations and the Python example, run for real on loopback (issue #16):

  - python function: examples/python/task_function.py (gRPC stubs from proto/) creates a
    promise for an external task, hands its completion token and callback URL to the task
    marketplace (examples/external-task/marketplace.py), and awaits it;
  - fission function as a continuation target: a pipeline step invokes
    examples/fission/uppercase.py (written for Fission's Python environment) through
    examples/fission/router_standin.py at the router's /fission-function/<name> path;
  - a pipeline waiting on a human step: the marketplace's worker settles the first promise with
    its completion token, and the pipeline carries on through the Fission function;
  - fission workflows: examples/fission/workflow/approval.wf.yaml run by
    examples/fission/workflow_standin.py: one task creates a promise and hands it out, the next
    awaits it through the HTTP gateway;
  - a forged token handed to the marketplace: its callback is refused (403), nothing settles.

Against a three-node `vow dev up` cluster. Each scenario prints one summary line.
Usage: integrations.py --bin-dir TARGET/debug
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples", "python"))
from vow_stubs import load  # noqa: E402

pb, pb_grpc = load()
PY = sys.executable


def start(args, env=None):
    """Starts a helper that prints "listening on HOST:PORT"; returns (process, address)."""
    p = subprocess.Popen([PY, *args], stdout=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    assert line.startswith("listening on "), f"{args[0]} said {line!r}"
    return p, line.split()[-1]


def call(method, request, timeout=5):
    for attempt in range(40):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or attempt == 39:
                raise
            time.sleep(0.25)


def await_settled(stub, pid, wait_s=60):
    deadline = time.time() + wait_s
    while True:
        p = call(stub.Await, pb.AwaitRequest(id=pid, wait_timeout_ms=5000), timeout=10).promise
        if p.state != pb.STATE_PENDING or time.time() > deadline:
            return p


def post(url, doc):
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


class Env:
    def __init__(self, bin_dir):
        self.bin_dir = bin_dir
        self.work = tempfile.mkdtemp(prefix="vow-integrations-")
        self.procs = []

    def vow(self, *args):
        env = dict(os.environ, VOW_VOWD=os.path.join(self.bin_dir, "vowd"))
        return subprocess.run([os.path.join(self.bin_dir, "vow"), *args], env=env, capture_output=True, text=True)

    def up(self):
        up = self.vow("dev", "up", "--nodes", "3", "--dir", self.work)
        assert up.returncode == 0, up.stderr
        nodes = json.load(open(os.path.join(self.work, "cluster.json")))["nodes"]
        self.grpc = nodes[0]["grpc"]
        self.http = nodes[1]["http"]  # another node's gateway: callbacks are routed like any call
        self.stub = pb_grpc.PromisesStub(grpc.insecure_channel(self.grpc))
        self.market_proc, market = start([os.path.join(ROOT, "examples/external-task/marketplace.py"),
                                          "--complete-after-ms", "300"])
        self.market = f"http://{market}"
        fission = os.path.join(ROOT, "examples", "fission")
        env = dict(os.environ, VOW_HTTP=self.http, MARKETPLACE_URL=self.market, MARKETPLACE_ANSWER="approved")
        self.router_proc, router = start([os.path.join(fission, "router_standin.py"),
                                          "--function", f"uppercase={fission}/uppercase.py",
                                          "--function", f"request-approval={fission}/workflow/request_approval.py",
                                          "--function", f"await-approval={fission}/workflow/await_approval.py"], env)
        self.router = f"http://{router}"
        self.procs = [self.market_proc, self.router_proc]

    def down(self):
        for p in self.procs:
            p.kill()
        self.vow("dev", "down", "--dir", self.work)


def scenario_python_function(env):
    out = subprocess.run([PY, os.path.join(ROOT, "examples/python/task_function.py"), "--grpc", env.grpc,
                          "--http", env.http, "--marketplace", env.market, "--title", "label image 7",
                          "--answer", "a cat"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["state"] == "STATE_RESOLVED" and result["value"] == "a cat", result
    return f"{result['id']} resolved by the marketplace with {result['value']!r}"


def scenario_fission_function(env):
    url = f"{env.router}/fission-function/uppercase"
    call(env.stub.Submit, pb.SubmitRequest(
        promises=[pb.CreateRequest(id="fission-src"), pb.CreateRequest(id="fission-dst")],
        continuations=[pb.Continuation(id="fission-step", sources=["fission-src"], target="fission-dst",
                                       invoke=pb.Invoke(url=url))],
        idempotency_key="fission-1"))
    call(env.stub.Resolve, pb.SettleRequest(id="fission-src", value=pb.Value(data=b"hello fission")))
    p = await_settled(env.stub, "fission-dst")
    assert p.state == pb.STATE_RESOLVED and p.value.data == b"HELLO FISSION", p
    return f"fission-dst = {p.value.data.decode()!r} through {url}"


def scenario_human_step(env):
    human = call(env.stub.Create, pb.CreateRequest(id="review-1", completion_token_ttl_ms=600_000,
                                                   idempotency_key="review-1"))
    call(env.stub.Submit, pb.SubmitRequest(
        promises=[pb.CreateRequest(id="review-1-shipped")],
        continuations=[pb.Continuation(id="after-review-1", sources=["review-1"], target="review-1-shipped",
                                       invoke=pb.Invoke(url=f"{env.router}/fission-function/uppercase"))],
        idempotency_key="review-1-pipeline"))
    post(f"{env.market}/tasks", {"title": "review order 1", "token": human.completion_token, "answer": "looks good",
                                 "callback_url": f"http://{env.http}/v1/promises/review-1/resolve"})
    p = await_settled(env.stub, "review-1-shipped")
    assert p.state == pb.STATE_RESOLVED and p.value.data == b"LOOKS GOOD", p
    return "the pipeline waited for the marketplace's worker, then ran the Fission step"


def scenario_workflow(env):
    out = subprocess.run([PY, os.path.join(ROOT, "examples/fission/workflow_standin.py"), "--router", env.router,
                          "--workflow", os.path.join(ROOT, "examples/fission/workflow/approval.wf.yaml"),
                          "--input", "ship order 7?"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    pid = result["tasks"]["RequestApproval"]
    assert result["output"] == "approved", result
    p = call(env.stub.Get, pb.GetRequest(id=pid)).promise
    assert p.state == pb.STATE_RESOLVED and p.param.data == b"ship order 7?", p
    return f"workflow output {result['output']!r}; {pid} resolved"


def scenario_forged_token(env):
    real = call(env.stub.Create, pb.CreateRequest(id="review-2", completion_token_ttl_ms=600_000,
                                                  idempotency_key="review-2"))
    forged = real.completion_token[:-2] + ("AA" if not real.completion_token.endswith("AA") else "BB")
    task = post(f"{env.market}/tasks", {"title": "review order 2", "token": forged, "answer": "sneaky",
                                        "callback_url": f"http://{env.http}/v1/promises/review-2/resolve"})
    deadline = time.time() + 30
    while True:
        with urllib.request.urlopen(f"{env.market}/tasks", timeout=10) as resp:
            state = json.load(resp)[task["task_id"]]
        if state["completed"] or time.time() > deadline:
            break
        time.sleep(0.1)
    assert state["callback"] and state["callback"].startswith("403"), state
    p = call(env.stub.Get, pb.GetRequest(id="review-2")).promise
    assert p.state == pb.STATE_PENDING, p
    return f"callback answered {state['callback'][:60]!r}; review-2 still pending"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True)
    args = ap.parse_args()
    env = Env(args.bin_dir)
    env.up()
    failed = []
    try:
        for name, fn in [("python function", scenario_python_function),
                         ("fission function as a continuation target", scenario_fission_function),
                         ("pipeline waiting on a human step", scenario_human_step),
                         ("fission workflow", scenario_workflow),
                         ("forged completion token", scenario_forged_token)]:
            t0 = time.time()
            try:
                summary = fn(env)
                print(f"integrations: [{name}] passed in {time.time() - t0:.1f}s: {summary}", flush=True)
            except Exception as e:  # noqa: BLE001 -- report every scenario, then fail
                print(f"integrations: [{name}] FAILED: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()
                failed.append(name)
    finally:
        env.down()
    print(f"integrations: {5 - len(failed)}/5 passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
