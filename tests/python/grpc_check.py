#!/usr/bin/env python3
"""Checks the coordinator with a gRPC client that is not ours (grpcio): the standard health
service answers SERVING, and server reflection (v1 and v1alpha) lists the services and serves
their descriptors.

Usage: grpc_check.py HOST:PORT [--expect SERVICE]...
Prints one JSON object with what it found; exits 1 when a check fails.
"""

import argparse
import json
import sys

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
# v1 and v1alpha reflection messages are the same on the wire; grpcio-reflection ships v1alpha.
from grpc_reflection.v1alpha import reflection_pb2

ALBEF_SERVICES = ["albef.v1.Coordinator", "albef.v1.Control"]


def reflect(channel, version, request):
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = list(call(iter([request]), timeout=10))
    if len(responses) != 1:
        raise RuntimeError(f"reflection {version}: {len(responses)} responses to one request")
    response = responses[0]
    if response.HasField("error_response"):
        raise RuntimeError(f"reflection {version}: {response.error_response.error_message}")
    return response


def services(channel, version):
    response = reflect(channel, version, reflection_pb2.ServerReflectionRequest(list_services=""))
    return sorted(s.name for s in response.list_services_response.service)


def methods(channel, version, service):
    """The methods of `service`, from the file descriptors reflection returns for it."""
    response = reflect(channel, version, reflection_pb2.ServerReflectionRequest(file_containing_symbol=service))
    package, _, name = service.rpartition(".")
    for raw in response.file_descriptor_response.file_descriptor_proto:
        fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
        if fd.package == package:
            for s in fd.service:
                if s.name == name:
                    return [m.name for m in s.method]
    raise RuntimeError(f"reflection {version}: no descriptor of {service}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", help="HOST:PORT of the coordinator (plaintext)")
    parser.add_argument("--expect", action="append", default=[], help="a service reflection must list")
    args = parser.parse_args()
    expected = set(args.expect or ALBEF_SERVICES + ["grpc.health.v1.Health"])

    failures = []
    found = {"health": {}, "reflection": {}, "methods": {}}
    with grpc.insecure_channel(args.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        health = health_pb2_grpc.HealthStub(channel)
        for service in [""] + ALBEF_SERVICES:
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            found["health"][service] = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            if status != health_pb2.HealthCheckResponse.SERVING:
                failures.append(f"health of {service!r}: {found['health'][service]}")
        for version in ["v1", "v1alpha"]:
            listed = services(channel, version)
            found["reflection"][version] = listed
            missing = sorted(expected - set(listed))
            if missing:
                failures.append(f"reflection {version} does not list {missing}")
        for service in ALBEF_SERVICES:
            found["methods"][service] = methods(channel, "v1", service)
            if not found["methods"][service]:
                failures.append(f"reflection: {service} has no methods")

    found["failures"] = failures
    print(json.dumps(found, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
