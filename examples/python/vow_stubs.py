"""Generates vow's gRPC stubs from proto/ with grpcio-tools and imports them.

    from vow_stubs import load
    pb, pb_grpc = load()          # vow.v1 messages and the Promises / Cluster stubs

The stubs are written to a temporary directory on first use; nothing generated is checked in.
"""

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(proto_root=os.path.join(ROOT, "proto")):
    import grpc_tools
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="vow-stubs-")
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", os.path.join(proto_root, "vow/v1/vow.proto")])
    if rc != 0:
        raise RuntimeError("protoc failed on vow.proto")
    sys.path.insert(0, out)
    from vow.v1 import vow_pb2, vow_pb2_grpc

    return vow_pb2, vow_pb2_grpc
