#!/usr/bin/env python3
"""The acceptance scenarios through a client generated from proto/ (grpcio), not the Rust SDK.

Starts a three-node cluster with `vow dev up` at its default shard count and talks to single
nodes only (followers forward), at grpcio's default channel options. Every id a scenario uses
(but the placement scenario's, which cover every shard) carries the hash tag `{py}`, so all of
them live on one shard (README.md, "Placement"); "the leader" a scenario kills is that shard's
leader, so it leads every id the scenario uses, and "a follower" is a node that does not lead
that shard. The shard is computed here from the shard count Status reports, and its leader
picked once every node names the same leaders and leader balancing has settled. The client
uses only the error contract in the header comment of proto/vow/v1/vow.proto: it retries
UNAVAILABLE and DEADLINE_EXCEEDED (and nothing else) with the same idempotency key, and follows
the `vow-leader-addr` hint.

Scenarios, each a function, each printing one summary line with its time:
  - kill -9 during writes: kills the leader in the middle of a stream of creates and resolves,
    checks that every acknowledged write is there, restarts the node with `vow dev up` and checks
    that it caught up from its own disk;
  - reflection: standard server reflection lists the services;
  - forward to a dead leader (item 0): kills the leader and at once sends single-attempt calls
    through a follower; every answer is a contract code (never UNKNOWN or INTERNAL), five times;
  - large records (item 6): conflicts on a record of ~40 KB carry it (whole, or trimmed and
    marked `vow-current-trimmed: true`) in `vow-current-bin`; a search over 5 MB of records pages
    within grpcio's default 4 MiB receive limit;
  - placement: the shard computed here (README.md, "Placement": FNV-1a 64 of the placement key,
    modulo the shard count from ShardMap) equals Locate's for ~200 ids (hash tags, non-ASCII,
    `{}` and unclosed `{`), and a Create sent to the leader ShardMap names is answered without a
    leader hint (it was not forwarded).
Every scenario runs even when an earlier one failed; the exit status is 1 if any failed.

Usage: external_client.py --bin-dir TARGET/debug
"""

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What a standard gRPC retry policy retries, and what the contract says to retry.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
C = grpc.StatusCode

pb = pb_grpc = None  # the generated modules, set by main()

# The hash tag on every id the scenarios use (the placement ids excepted): the placement key of
# `{py}/dead-3` is `py`, so all of them share one shard at any shard count, and killing that
# shard's leader kills the leader of every id a scenario uses.
TAG = "{py}"


def tagged(name):
    return f"{TAG}/{name}"


def generate(out_dir):
    proto_root = os.path.join(ROOT, "proto")
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out_dir}",
                      f"--grpc_python_out={out_dir}", os.path.join(proto_root, "vow/v1/vow.proto")])
    assert rc == 0, "protoc failed"
    sys.path.insert(0, out_dir)


def trailers(call_or_error):
    """Trailing metadata as a dict (binary `-bin` entries as bytes)."""
    return dict(call_or_error.trailing_metadata() or ())


def show(md):
    """Metadata for a message: keys with short values."""
    out = {}
    for k, v in md.items():
        out[k] = f"<{len(v)} bytes>" if isinstance(v, bytes) else v
    return out


def describe(e):
    return f"{e.code().name} {e.details()!r} trailers={show(trailers(e))}"


class Cluster:
    """Calls one node at a time and retries like a careful client: same request, same key.

    Retries only UNAVAILABLE and DEADLINE_EXCEEDED; on those it goes to the node named by a
    `vow-leader-addr` hint when that is one of its addresses, else to the next address. Every
    attempt uses a fresh channel at default options, so a node that was killed and restarted is
    not held back by the reconnect backoff of an old channel.
    """

    def __init__(self, addrs):
        self.addrs = list(addrs)
        self.i = 0

    def call(self, method, request, kind="Promises", deadline_s=30, attempt_s=5):
        end = time.time() + deadline_s
        last = None
        while time.time() < end:
            addr = self.addrs[self.i % len(self.addrs)]
            try:
                with grpc.insecure_channel(addr) as channel:
                    stub = getattr(pb_grpc, f"{kind}Stub")(channel)
                    return getattr(stub, method)(request, timeout=attempt_s)
            except grpc.RpcError as e:
                last = e
                if e.code() not in RETRYABLE:
                    raise
                hint = trailers(e).get("vow-leader-addr")
                if hint and hint in self.addrs and hint != addr:
                    self.i = self.addrs.index(hint)
                else:
                    self.i += 1
                time.sleep(0.05)
        raise last


class Dev:
    """The `vow dev up` cluster in one directory, at `vow dev up`'s default shard count."""

    def __init__(self, bin_dir, work):
        self.bin_dir, self.work = bin_dir, work
        self.by_id = {}
        self.shards = None  # the shard count, from Status (set by wait_leaders)

    def vow(self, *args):
        env = dict(os.environ, VOW_VOWD=os.path.join(self.bin_dir, "vowd"))
        return subprocess.run([os.path.join(self.bin_dir, "vow"), *args], env=env, capture_output=True, text=True)

    def up(self):
        """Starts the cluster, or restarts its dead nodes (same ports, same data)."""
        up = self.vow("dev", "up", "--nodes", "3", "--dir", self.work)
        assert up.returncode == 0, up.stderr
        nodes = json.load(open(os.path.join(self.work, "cluster.json")))["nodes"]
        self.by_id = {n["node_id"]: n for n in nodes}

    def down(self):
        self.vow("dev", "down", "--dir", self.work)

    def addr(self, node_id):
        return self.by_id[node_id]["grpc"]

    def client(self):
        return Cluster([self.addr(i) for i in sorted(self.by_id)])

    def kill(self, node_id):
        os.kill(self.by_id[node_id]["pid"], signal.SIGKILL)

    def tag_shard(self):
        """The shard of every tagged id (known once wait_leaders has run)."""
        return shard_of(tagged(""), self.shards)

    def wait_leader(self, timeout_s=30):
        """Waits as wait_leaders does; returns the leader of the tagged ids' shard."""
        return self.wait_leaders(timeout_s)[self.tag_shard()]

    def wait_leaders(self, timeout_s=30):
        """Waits until every node answers Status, all name the same leader for every shard, and no
        node leads more than its share of the shards; returns the leaders in shard order.

        The share, ceil(shards / voters), is where vowd's leader balancing (on by default) stops
        moving leaderships: before that, a leader picked here could hand its shard over before a
        scenario kills it or talks to "a follower"."""
        end = time.time() + timeout_s
        while True:
            views, voters = {}, set()
            for i in sorted(self.by_id):
                try:
                    with grpc.insecure_channel(self.addr(i)) as channel:
                        s = pb_grpc.ClusterStub(channel).Status(pb.StatusRequest(), timeout=2)
                    by_shard = {sh.shard_id: sh.leader_id for sh in s.shards}
                    assert sorted(by_shard) == list(range(len(s.shards))), \
                        f"node {i}'s Status lists shards {sorted(by_shard)}"
                    views[i] = tuple(by_shard[n] for n in range(len(by_shard)))
                    voters.update(v for sh in s.shards for v in sh.voters)
                except grpc.RpcError as e:
                    views[i] = e.code().name
            seen = set(views.values())
            if len(seen) == 1:
                (leaders,) = seen
                if isinstance(leaders, tuple) and leaders and all(leaders):
                    share = -(-len(leaders) // max(len(voters), 1))
                    if max(collections.Counter(leaders).values()) <= share:
                        self.shards = len(leaders)
                        return leaders
            assert time.time() < end, \
                f"no balanced leaders agreed by every node within {timeout_s}s (leaders by shard): {views}"
            time.sleep(0.1)

    def heal(self):
        self.up()
        return self.wait_leader()


def scenario_kill_during_writes(dev):
    """kill -9 of the leader during writes; every acknowledged write survives; catch-up."""
    c = dev.client()
    leader = dev.wait_leader()
    follower = next(i for i in sorted(dev.by_id) if i != leader)

    # A follower alone serves everything (it forwards to the leader).
    only_follower = Cluster([dev.addr(follower)])
    first = tagged("write-0")
    req = pb.CreateRequest(id=first, idempotency_key=f"c-{first}", param=pb.Value(data=b"p"))
    r = only_follower.call("Create", req)
    assert r.promise.state == pb.STATE_PENDING
    try:
        only_follower.call("Create", pb.CreateRequest(id=first, idempotency_key="other"))
        raise AssertionError("second create with another key must fail")
    except grpc.RpcError as e:
        assert e.code() == C.ALREADY_EXISTS, describe(e)
    try:
        only_follower.call("Get", pb.GetRequest(id=tagged("nope")))
        raise AssertionError("unknown id must be NOT_FOUND")
    except grpc.RpcError as e:
        assert e.code() == C.NOT_FOUND, describe(e)

    acked_create, acked_settle = [first], {}
    killed_at = None
    for n in range(1, 121):
        if n == 60:
            dev.kill(leader)
            killed_at = time.time()
        pid = tagged(f"write-{n}")
        c.call("Create", pb.CreateRequest(id=pid, idempotency_key=f"c-{pid}", param=pb.Value(data=b"p")))
        acked_create.append(pid)
        if n % 2 == 0:
            value = f"v-{n}".encode()
            resp = c.call("Resolve", pb.SettleRequest(id=pid, idempotency_key=f"s-{pid}", value=pb.Value(data=value)))
            assert resp.promise.state == pb.STATE_RESOLVED
            acked_settle[pid] = value
    after_kill = time.time() - killed_at

    for pid in acked_create:
        p = c.call("Get", pb.GetRequest(id=pid)).promise
        if pid in acked_settle:
            assert p.state == pb.STATE_RESOLVED and p.value.data == acked_settle[pid], (pid, p)
        else:
            assert p.state == pb.STATE_PENDING, (pid, p)

    # The killed node comes back from its disk and catches up (stale reads of its own replica).
    dev.up()
    t0 = time.time()
    end = t0 + 30
    with grpc.insecure_channel(dev.addr(leader)) as back:
        stub = pb_grpc.PromisesStub(back)
        for pid in acked_create:
            while True:
                try:
                    p = stub.Get(pb.GetRequest(id=pid, consistency=pb.CONSISTENCY_STALE), timeout=2).promise
                    if pid not in acked_settle or p.state == pb.STATE_RESOLVED:
                        break
                except grpc.RpcError as e:
                    # Not up yet, or not caught up yet; nothing else is a contract answer here.
                    if e.code() not in RETRYABLE | {C.NOT_FOUND}:
                        raise AssertionError(f"restarted node {leader}, Get {pid}: {describe(e)}")
                assert time.time() < end, f"restarted node {leader} never caught up on {pid}"
                time.sleep(0.1)
    return (f"{len(acked_create)} creates, {len(acked_settle)} resolves acknowledged and present; leader {leader} "
            f"of shard {dev.tag_shard()} of {dev.shards} (every id's) killed, the rest took {after_kill:.2f}s; "
            f"restarted node caught up in {time.time() - t0:.2f}s")


def scenario_reflection(dev):
    """Off-the-shelf tooling works: standard server reflection lists the services."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    leader = dev.wait_leader()
    follower = next(i for i in sorted(dev.by_id) if i != leader)
    with grpc.insecure_channel(dev.addr(follower)) as channel:
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        services = {s.name for r in replies for s in r.list_services_response.service}
    assert {"vow.v1.Promises", "vow.v1.Cluster", "grpc.health.v1.Health"} <= services, services
    return f"reflection lists {sorted(services)}"


# When the probes go out, in seconds after the kill: at once, then spread over ~3 s.
PROBE_OFFSETS = [0, 0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0]
PROBE_TIMEOUT_S = 8  # well above the server's own wait for an election (3 s)


def scenario_dead_leader(dev, cycles=5):
    """Item 0: a follower forwarding to a leader that was just killed answers by the contract.

    Each cycle kills the leader of the tagged ids' shard with kill -9 and at once sends
    single-attempt calls (no retry) through a follower of that shard: Gets of an existing id,
    Creates of fresh ids and Gets of those fresh ids. Allowed answers: Get of an existing id OK
    or UNAVAILABLE; Get of a fresh id also NOT_FOUND; Create OK, UNAVAILABLE (with or without
    `vow-outcome-unknown`) or ALREADY_EXISTS. An UNAVAILABLE Get never carries
    `vow-outcome-unknown` (a read has no outcome to be unsure of). UNKNOWN, INTERNAL,
    DEADLINE_EXCEEDED (no answer at all) and anything else are violations.
    Then `vow dev up` restarts the node. After the cycles every Create answered OK is readable.
    """
    c = dev.client()
    existing = tagged("dead-existing")
    c.call("Create", pb.CreateRequest(id=existing, idempotency_key=f"c-{existing}", param=pb.Value(data=b"e")))
    acked = {existing: b"e"}  # id -> param of every create answered OK
    unavailable_creates = {}  # id -> (param, had the outcome-unknown marker, had a leader id)
    violations, counts = [], collections.Counter()
    first_answer = []

    for cycle in range(cycles):
        leader = dev.wait_leader()
        follower = next(i for i in sorted(dev.by_id) if i != leader)
        faddr = dev.addr(follower)
        # A forwarded write first, so that the follower holds a live connection to the leader.
        warm = tagged(f"dead-{cycle}-warm")
        Cluster([faddr]).call("Create", pb.CreateRequest(id=warm, idempotency_key=f"c-{warm}", param=pb.Value(data=b"w")))
        acked[warm] = b"w"

        with grpc.insecure_channel(faddr) as channel:
            grpc.channel_ready_future(channel).result(timeout=5)
            stub = pb_grpc.PromisesStub(channel)
            probes = []  # (what, id, future, seconds after the kill)
            dev.kill(leader)
            killed = time.time()
            fresh = []
            for k, offset in enumerate(PROBE_OFFSETS):
                wait = killed + offset - time.time()
                if wait > 0:
                    time.sleep(wait)
                at = time.time() - killed
                probes.append(("get-existing", existing, stub.Get.future(pb.GetRequest(id=existing), timeout=PROBE_TIMEOUT_S), at))
                pid = tagged(f"dead-{cycle}-{k}")
                param = f"param-{pid}".encode()
                req = pb.CreateRequest(id=pid, idempotency_key=f"c-{pid}", param=pb.Value(data=param))
                probes.append(("create", pid, stub.Create.future(req, timeout=PROBE_TIMEOUT_S), at))
                if fresh:
                    prev = fresh[-1]
                    probes.append(("get-fresh", prev, stub.Get.future(pb.GetRequest(id=prev), timeout=PROBE_TIMEOUT_S), at))
                fresh.append(pid)

            for what, pid, fut, at in probes:
                code = fut.code()
                counts[(what, code.name)] += 1
                md = trailers(fut)
                where = f"cycle {cycle} (leader {leader} killed, via {follower}) +{at:.2f}s {what} {pid}"
                if code == C.OK:
                    p = fut.result().promise
                    if p.id != pid:
                        violations.append(f"{where}: OK with the record of {p.id!r}")
                    elif what == "create":
                        if p.state != pb.STATE_PENDING:
                            violations.append(f"{where}: create answered OK with state {p.state}")
                        acked[pid] = f"param-{pid}".encode()
                    continue
                allowed = {
                    "get-existing": {C.UNAVAILABLE},
                    "get-fresh": {C.UNAVAILABLE, C.NOT_FOUND},
                    "create": {C.UNAVAILABLE, C.ALREADY_EXISTS},
                }[what]
                if code not in allowed:
                    violations.append(f"{where}: {code.name} {fut.details()!r} trailers={show(md)}")
                elif code == C.UNAVAILABLE and what != "create" and "vow-outcome-unknown" in md:
                    violations.append(f"{where}: UNAVAILABLE read marked vow-outcome-unknown: {fut.details()!r}")
                elif code == C.UNAVAILABLE and what == "create":
                    unavailable_creates[pid] = (f"param-{pid}".encode(), md.get("vow-outcome-unknown") == "true",
                                                "vow-leader-id" in md)
            answered = [at for what, _, fut, at in probes if fut.code() == C.OK and what == "create"]
            first_answer.append(min(answered) if answered else float("nan"))

        dev.up()  # brings the killed node back (same ports, same data)

    # Every create answered OK is there; the unsure ones are either there (as sent) or absent.
    dev.wait_leader()
    for pid, param in acked.items():
        try:
            p = c.call("Get", pb.GetRequest(id=pid)).promise
            if p.param.data != param or p.state != pb.STATE_PENDING:
                violations.append(f"acknowledged create {pid} reads back as state {p.state} param {p.param.data!r}")
        except grpc.RpcError as e:
            violations.append(f"acknowledged create {pid} cannot be read: {describe(e)}")
    took_effect = collections.Counter()
    for pid, (param, marked, led) in unavailable_creates.items():
        try:
            p = c.call("Get", pb.GetRequest(id=pid)).promise
            if p.param.data != param or p.idempotency_key_create != f"c-{pid}":
                violations.append(f"create {pid} answered UNAVAILABLE reads back with another param or key: {p}")
            took_effect[("marked" if marked else "unmarked") + (", leader-id" if led else "")] += 1
        except grpc.RpcError as e:
            if e.code() != C.NOT_FOUND:
                violations.append(f"create {pid} answered UNAVAILABLE cannot be read: {describe(e)}")
    marks = collections.Counter(("marked" if m else "unmarked") + (", leader-id" if led else "")
                                for _, m, led in unavailable_creates.values())

    summary = (f"{cycles} kill/probe/restart cycles (the leader of shard {dev.tag_shard()} of {dev.shards}), "
               f"{sum(counts.values())} single-attempt calls: "
               + ", ".join(f"{w} {c_}={n}" for (w, c_), n in sorted(counts.items()))
               + f"; UNAVAILABLE creates {dict(marks)}, of which took effect {dict(took_effect)}"
               + f"; first create OK at +{', +'.join(f'{t:.2f}' for t in first_answer)}s"
               + f"; {len(acked)} acknowledged creates read back")
    assert not violations, f"{len(violations)} violation(s) ({summary}):\n  " + "\n  ".join(violations)
    return summary


def check_current(e, want, pid, state, revision, param, value, follower):
    """The conflict `e` is `want` and carries the current record, whole or trimmed."""
    assert e.code() == want, f"want {want.name}, got {describe(e)}"
    md = trailers(e)
    raw = md.get("vow-current-bin")
    assert raw is not None, f"{want.name} without vow-current-bin: {describe(e)}"
    rec = pb.Promise.FromString(raw)
    assert rec.id == pid and rec.state == state and rec.revision == revision, \
        f"vow-current-bin holds id {rec.id!r} state {rec.state} revision {rec.revision}, want {pid!r} {state} {revision}"
    trimmed = md.get("vow-current-trimmed")
    if trimmed == "true":
        # The record was too large for a trailer: the full one is a Get away.
        full = follower.call("Get", pb.GetRequest(id=pid)).promise
        assert full.value.data == value and full.param.data == param, "Get after a trimmed trailer lacks the data"
        return f"trimmed ({len(raw)} bytes)"
    assert trimmed is None, f"vow-current-trimmed is {trimmed!r}"
    assert rec.value.data == value and rec.param.data == param, \
        f"untrimmed vow-current-bin has value of {len(rec.value.data)} bytes, param of {len(rec.param.data)} bytes"
    return f"whole ({len(raw)} bytes)"


def scenario_large_records(dev):
    """Item 6: conflicts on large records, and a search over more than 4 MiB, through a follower."""
    c = dev.client()
    leader = dev.wait_leader()
    follower_id = next(i for i in sorted(dev.by_id) if i != leader)
    follower = Cluster([dev.addr(follower_id)])

    pid = tagged("large-1")
    param = (b"large-param-" * 2000)[:20_000]
    value = (b"large-value-" * 2000)[:20_000]
    c.call("Create", pb.CreateRequest(id=pid, idempotency_key=f"c-{pid}", param=pb.Value(data=param)))
    resolved = c.call("Resolve", pb.SettleRequest(id=pid, idempotency_key=f"s-{pid}", value=pb.Value(data=value)))
    assert resolved.promise.state == pb.STATE_RESOLVED
    revision = resolved.promise.revision
    try:
        follower.call("Reject", pb.SettleRequest(id=pid, idempotency_key="another-settle", value=pb.Value(data=b"no")))
        raise AssertionError("reject of a resolved promise with another key must fail")
    except grpc.RpcError as e:
        reject = check_current(e, C.FAILED_PRECONDITION, pid, pb.STATE_RESOLVED, revision, param, value, follower)
    try:
        follower.call("Create", pb.CreateRequest(id=pid, idempotency_key="another-create", param=pb.Value(data=b"x")))
        raise AssertionError("second create with another key must fail")
    except grpc.RpcError as e:
        create = check_current(e, C.ALREADY_EXISTS, pid, pb.STATE_RESOLVED, revision, param, value, follower)

    # 100 records of 50 KB: 5 MB, over grpcio's default 4 MiB receive limit for one page.
    t0 = time.time()
    ids = [tagged(f"big-{i:03d}") for i in range(100)]
    big = {i: (f"{i}:".encode() * 25_000)[:50_000] for i in ids}
    for i in ids:
        c.call("Create", pb.CreateRequest(id=i, idempotency_key=f"c-{i}", param=pb.Value(data=big[i])))
    created_s = time.time() - t0
    seen, sizes, token = [], [], ""
    while True:
        try:
            page = follower.call("Search", pb.SearchRequest(id_prefix=tagged("big-"), limit=100, page_token=token))
        except grpc.RpcError as e:
            raise AssertionError(f"search page {len(sizes) + 1} (after {len(seen)} records): {describe(e)}")
        sizes.append(len(page.promises))
        for p in page.promises:
            assert p.param.data == big.get(p.id), f"search returned {p.id} with a param of {len(p.param.data)} bytes"
        seen.extend(p.id for p in page.promises)
        if not page.next_page_token:
            break
        assert page.next_page_token != token, f"page {len(sizes)} repeats its page_token"
        assert len(sizes) < 200, "search does not end"
        token = page.next_page_token
    assert seen == ids, f"search saw {len(seen)} ids ({len(set(seen))} distinct), in order: {seen == sorted(seen)}"
    assert len(sizes) > 1, "5 MB of records came in one page"
    return (f"conflicts on a 40 KB record: FAILED_PRECONDITION {reject}, ALREADY_EXISTS {create}; "
            f"100 x 50 KB created in {created_s:.2f}s, searched through node {follower_id} "
            f"in {len(sizes)} pages of {sizes}")


# Placement, as README.md ("Placement") specifies it.
FNV_OFFSET_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def fnv1a_64(data):
    h = FNV_OFFSET_BASIS
    for byte in data:
        h ^= byte
        h = (h * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def placement_key(pid):
    """The text inside the id's first `{` and the first `}` after it, when that is not empty;
    otherwise the whole id."""
    start = pid.find("{")
    if start >= 0:
        end = pid.find("}", start + 1)
        if end > start + 1:
            return pid[start + 1:end]
    return pid


def shard_of(pid, shards):
    return fnv1a_64(placement_key(pid).encode("utf-8")) % shards


# The README's worked example, and the published FNV-1a 64 test vector for "a".
assert fnv1a_64(b"a") == 0xAF63DC4C8601EC8C
assert placement_key("{user-42}:order-7") == "user-42"
assert fnv1a_64(b"user-42") == 0x32C6D7A54D35DACB and shard_of("{user-42}:order-7", 8) == 3
assert shard_of("caf\u00e9", 8) == 1 and fnv1a_64("caf\u00e9".encode("utf-8")) == 0x48E8823ACFA40D89
assert placement_key("{}x") == "{}x" and fnv1a_64(b"{}x") == 0xC735DB1983DCCC07 and shard_of("{}x", 8) == 7


def placement_ids():
    """~200 ids: plain, hash-tagged, non-ASCII, and the edges of the hash-tag rule."""
    ids = [f"place-{n}" for n in range(80)]
    ids += [f"{{user-{n % 7}}}:order-{n}" for n in range(40)]  # seven tags, shared by several ids
    ids += [f"order-{n}-{{tenant-{n % 3}}}-x" for n in range(15)]
    ids += [f"caf\u00e9-{n}" for n in range(10)] + [f"\u65e5\u672c-{{\u6771\u4eac}}-{n}" for n in range(5)]
    ids += [f"\U0001f389-{n}" for n in range(5)] + [f"{{\u043a\u043b\u044e\u0447-{n % 2}}}-{n}" for n in range(6)]
    ids += [
        "{}", "{}x", "x{}", "x{}y", "{}{tag}",  # an empty first tag: the whole id, even with a later tag
        "{", "x{", "{x", "x{y", "}", "}{", "}x{y}",  # unclosed or backwards: the whole id ("}x{y}" has tag y)
        "{{}}", "{a{b}", "a}b{c}d", "{x}}", "{ }", "{\u00e9}", "a{b}c{d}",  # first `{`, first `}` after it
        "x" * 256, "{" + "y" * 254 + "}", "\u00e9" * 128,  # the longest ids (256 bytes)
    ]
    ids += [f"edge-{{{n}" for n in range(5)] + [f"edge-{{}}{n}" for n in range(5)]
    assert len(set(ids)) == len(ids) and all(len(i.encode("utf-8")) <= 256 for i in ids)
    return ids


def scenario_placement(dev):
    """Placement computed here equals the cluster's; a Create at the ShardMap leader is not forwarded."""
    c = dev.client()
    dev.wait_leaders()
    smap = c.call("ShardMap", pb.ShardMapRequest(), kind="Cluster")
    assert smap.shards > 1, f"ShardMap says {smap.shards} shard(s): every id would be placed on shard 0"
    assert [l.shard_id for l in smap.leaders] == list(range(smap.shards)), smap

    ids = placement_ids()
    mismatches, per_shard = [], collections.Counter()
    for pid in ids:
        want = shard_of(pid, smap.shards)
        got = c.call("Locate", pb.LocateRequest(id=pid), kind="Cluster")
        per_shard[got.shard_id] += 1
        if got.shard_id != want:
            mismatches.append(f"{pid!r} (key {placement_key(pid)!r}): computed {want}, Locate {got.shard_id}")
    assert not mismatches, f"{len(mismatches)} of {len(ids)} placements differ:\n  " + "\n  ".join(mismatches)
    assert len(per_shard) == smap.shards, f"the ids cover only shards {sorted(per_shard)}"

    # One Create per shard sent straight to the leader ShardMap names: not forwarded, so no hint.
    # As a control, the same through a node that does not lead the shard does carry the hint.
    addrs = {n: dev.addr(n) for n in dev.by_id}
    direct, control = 0, 0
    for shard in range(smap.shards):
        pid = next(f"direct-{shard}-{n}" for n in range(10_000) if shard_of(f"direct-{shard}-{n}", smap.shards) == shard)
        for attempt in range(50):
            smap = c.call("ShardMap", pb.ShardMapRequest(), kind="Cluster")
            leader = smap.leaders[shard]
            if not leader.leader_id:
                time.sleep(0.1)
                continue
            try:
                with grpc.insecure_channel(leader.leader_grpc_addr) as channel:
                    req = pb.CreateRequest(id=pid, idempotency_key=f"c-{pid}", param=pb.Value(data=b"d"))
                    resp, call = pb_grpc.PromisesStub(channel).Create.with_call(req, timeout=5)
                break
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    raise
                time.sleep(0.1)
        else:
            raise AssertionError(f"no answer from the leader of shard {shard}")
        assert resp.promise.id == pid and resp.promise.state == pb.STATE_PENDING, resp
        md = dict(call.initial_metadata() or ()) | trailers(call)
        assert "vow-leader-addr" not in md, \
            f"Create of {pid} at shard {shard}'s leader {leader.leader_grpc_addr} was forwarded: {show(md)}"
        direct += 1

        other = next(a for n, a in sorted(addrs.items()) if n != leader.leader_id)
        cid = f"{pid}-control"
        try:
            with grpc.insecure_channel(other) as channel:
                req = pb.CreateRequest(id=cid, idempotency_key=f"c-{cid}", param=pb.Value(data=b"d"))
                _, call = pb_grpc.PromisesStub(channel).Create.with_call(req, timeout=5)
            md = dict(call.initial_metadata() or ()) | trailers(call)
            if "vow-leader-addr" in md:
                control += 1
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE:
                raise
    assert control > 0, "no Create through a non-leader carried a leader hint: the check above proves nothing"
    example = "{user-42}:order-7"
    return (f"{len(ids)} ids over {len(per_shard)} shards ({dict(sorted(per_shard.items()))}) placed as Locate "
            f"places them; {direct} Creates at the ShardMap leaders answered without a hint "
            f"({control}/{smap.shards} through a non-leader carried one); "
            f"{example!r} -> key {placement_key(example)!r}, FNV-1a 64 {fnv1a_64(placement_key(example).encode()):#018x}, "
            f"shard {shard_of(example, smap.shards)} of {smap.shards}")


def run(name, fn, dev):
    t0 = time.time()
    try:
        summary = fn(dev)
        print(f"external client: [{name}] passed in {time.time() - t0:.1f}s: {summary}", flush=True)
        return True
    except Exception as e:  # noqa: BLE001 -- report every scenario, then fail
        print(f"external client: [{name}] FAILED after {time.time() - t0:.1f}s: {type(e).__name__}: "
              f"{describe(e) if isinstance(e, grpc.RpcError) else e}", flush=True)
        traceback.print_exc()
        return False


def main():
    global pb, pb_grpc
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True)
    args = ap.parse_args()
    gen = tempfile.mkdtemp(prefix="vow-pb-")
    generate(gen)
    from vow.v1 import vow_pb2, vow_pb2_grpc

    pb, pb_grpc = vow_pb2, vow_pb2_grpc

    started = time.time()
    dev = Dev(args.bin_dir, tempfile.mkdtemp(prefix="vow-py-"))
    dev.up()
    results = {}
    try:
        for name, fn in [("kill -9 during writes", scenario_kill_during_writes),
                         ("reflection", scenario_reflection),
                         ("forward to a dead leader (item 0)", scenario_dead_leader),
                         ("large records (item 6)", scenario_large_records),
                         ("placement", scenario_placement)]:
            if results:
                dev.heal()  # a failed scenario may have left a node down
            results[name] = run(name, fn, dev)
    finally:
        dev.down()
    failed = [n for n, ok in results.items() if not ok]
    print(f"external client: {len(results) - len(failed)}/{len(results)} scenarios passed in "
          f"{time.time() - started:.1f}s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
