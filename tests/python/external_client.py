#!/usr/bin/env python3
"""The acceptance scenario through a client generated from proto/ (grpcio), not the Rust SDK.

Starts a three-node cluster with `vow dev up`, talks to single nodes only (followers forward),
kills the leader with kill -9 in the middle, retries with the same idempotency keys as any
client would, checks that every acknowledged create and settle is still there, brings the
killed node back with `vow dev up` and checks that it caught up from its own disk.
Also lists the services through standard server reflection.

Usage: external_client.py --bin-dir TARGET/debug
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}


def generate(out_dir):
    proto_root = os.path.join(ROOT, "proto")
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out_dir}",
                      f"--grpc_python_out={out_dir}", os.path.join(proto_root, "vow/v1/vow.proto")])
    assert rc == 0, "protoc failed"
    sys.path.insert(0, out_dir)


def vow(bin_dir, *args):
    env = dict(os.environ, VOW_VOWD=os.path.join(bin_dir, "vowd"))
    return subprocess.run([os.path.join(bin_dir, "vow"), *args], env=env, capture_output=True, text=True)


class Cluster:
    """Calls one node at a time and retries like a careful client: same request, same key."""

    def __init__(self, pb, pb_grpc, addrs):
        self.pb, self.pb_grpc = pb, pb_grpc
        self.addrs = list(addrs)
        self.i = 0

    def stub(self, addr, kind="Promises"):
        channel = grpc.insecure_channel(addr)
        return getattr(self.pb_grpc, f"{kind}Stub")(channel)

    def call(self, method, request, kind="Promises", deadline_s=30):
        end = time.time() + deadline_s
        last = None
        while time.time() < end:
            addr = self.addrs[self.i % len(self.addrs)]
            try:
                return getattr(self.stub(addr, kind), method)(request, timeout=5)
            except grpc.RpcError as e:
                last = e
                if e.code() not in RETRYABLE:
                    raise
                hint = dict(e.trailing_metadata() or ()).get("vow-leader-addr")
                if hint and hint in self.addrs:
                    self.i = self.addrs.index(hint)
                else:
                    self.i += 1
                time.sleep(0.05)
        raise last


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True)
    args = ap.parse_args()
    gen = tempfile.mkdtemp(prefix="vow-pb-")
    generate(gen)
    from vow.v1 import vow_pb2 as pb, vow_pb2_grpc as pb_grpc

    work = tempfile.mkdtemp(prefix="vow-py-")
    up = vow(args.bin_dir, "dev", "up", "--nodes", "3", "--dir", work)
    assert up.returncode == 0, up.stderr
    nodes = json.load(open(os.path.join(work, "cluster.json")))["nodes"]
    by_id = {n["node_id"]: n for n in nodes}
    try:
        c = Cluster(pb, pb_grpc, [n["grpc"] for n in nodes])
        status = c.call("Status", pb.StatusRequest(), kind="Cluster")
        leader = status.shards[0].leader_id
        follower = next(i for i in by_id if i != leader)

        # A follower alone serves everything (it forwards to the leader).
        only_follower = Cluster(pb, pb_grpc, [by_id[follower]["grpc"]])
        r = only_follower.call("Create", pb.CreateRequest(id="py-0", idempotency_key="c-py-0",
                                                          param=pb.Value(data=b"p")))
        assert r.promise.state == pb.STATE_PENDING
        try:
            only_follower.call("Create", pb.CreateRequest(id="py-0", idempotency_key="other"))
            raise AssertionError("second create with another key must fail")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.ALREADY_EXISTS, e
        try:
            only_follower.call("Get", pb.GetRequest(id="nope"))
            raise AssertionError("unknown id must be NOT_FOUND")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e

        acked_create, acked_settle = ["py-0"], {}
        for n in range(1, 121):
            if n == 60:
                subprocess.run(["kill", "-9", str(by_id[leader]["pid"])], check=True)
                killed_at = time.time()
            pid = f"py-{n}"
            c.call("Create", pb.CreateRequest(id=pid, idempotency_key=f"c-{pid}", param=pb.Value(data=b"p")))
            acked_create.append(pid)
            if n % 2 == 0:
                value = f"v-{n}".encode()
                resp = c.call("Resolve", pb.SettleRequest(id=pid, idempotency_key=f"s-{pid}", value=pb.Value(data=value)))
                assert resp.promise.state == pb.STATE_RESOLVED
                acked_settle[pid] = value
        print(f"external client: {len(acked_create)} creates, {len(acked_settle)} resolves acknowledged; "
              f"leader {leader} killed, the rest took {time.time() - killed_at:.2f}s")

        for pid in acked_create:
            p = c.call("Get", pb.GetRequest(id=pid)).promise
            if pid in acked_settle:
                assert p.state == pb.STATE_RESOLVED and p.value.data == acked_settle[pid], (pid, p)
            else:
                assert p.state == pb.STATE_PENDING, (pid, p)

        # The killed node comes back from its disk and catches up.
        up = vow(args.bin_dir, "dev", "up", "--nodes", "3", "--dir", work)
        assert up.returncode == 0, up.stderr
        back = grpc.insecure_channel(by_id[leader]["grpc"])
        stub = pb_grpc.PromisesStub(back)
        end = time.time() + 30
        for pid in acked_create:
            while True:
                try:
                    p = stub.Get(pb.GetRequest(id=pid, consistency=pb.CONSISTENCY_STALE), timeout=2).promise
                    if pid not in acked_settle or p.state == pb.STATE_RESOLVED:
                        break
                except grpc.RpcError:
                    pass
                assert time.time() < end, f"restarted node {leader} never caught up on {pid}"
                time.sleep(0.1)

        # Off-the-shelf tooling works: standard server reflection lists the services.
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        refl = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(by_id[follower]["grpc"]))
        replies = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        services = {s.name for r in replies for s in r.list_services_response.service}
        assert {"vow.v1.Promises", "vow.v1.Cluster", "grpc.health.v1.Health"} <= services, services
        print("external client: all acknowledged writes present; restarted node caught up; reflection lists", sorted(services))
    finally:
        vow(args.bin_dir, "dev", "down", "--dir", work)


if __name__ == "__main__":
    main()
