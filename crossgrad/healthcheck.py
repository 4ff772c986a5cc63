"""`python -m crossgrad.healthcheck HOST:PORT [--service NAME]`: is a crossgrad server SERVING?

The probe of the compose file's healthchecks (and of any orchestrator): one grpc.health.v1
Check through the one channel factory, exit code 0 when the answer is SERVING and 1 otherwise
(NOT_SERVING, unknown service, nothing listening, deadline), with one line on stderr saying why.
It imports neither the CLI nor torch, so a probe every few seconds stays cheap.

    python -m crossgrad.healthcheck 127.0.0.1:50051 --tls-ca ca.pem --tls-cert node-0.pem \
        --tls-key node-0.key                                           # the server as a whole
    python -m crossgrad.healthcheck 127.0.0.1:50050 --insecure --service crossgrad.v1.Bootstrap

Like every command that connects, it needs TLS material or --insecure (docs/security.md); with
mutual TLS it presents a certificate (the node's own, in a container).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crossgrad.errors import ConfigError
from crossgrad.rpc import make_channel
from crossgrad.security import Role, Security, add_security_flags, security_from_args

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1
EXIT_USAGE = 2


def check(address: str, service: str = "", timeout: float = 3.0, *,
          security: Security | None = None, server_name: str | None = None) -> tuple[bool, str]:
    """(True, "") when `address` reports SERVING for `service`; else (False, the reason).
    `security`: the probe's TLS material (None: plaintext)."""
    channel = make_channel(address, security=security, server_name=server_name)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as err:
        code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = err.details() if isinstance(err, grpc.Call) else str(err)
        return False, f"health check of {address} failed with {code.name}: {details}"
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return False, f"{address} is {status} for service {service or '(the server)'!r}"
    return True, ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crossgrad.healthcheck",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="HOST:PORT of a crossgrad peer or bootstrap")
    parser.add_argument("--service", default="",
                        help="service to ask about, e.g. crossgrad.v1.Peer (default: the server)")
    parser.add_argument("--timeout", type=float, default=3.0,
                        help="deadline of the check, in seconds (default 3)")
    parser.add_argument("--server-name", default=None,
                        help="the name to verify on the server's certificate (default: the "
                        "host of ADDRESS)")
    add_security_flags(parser, serves=False)
    args = parser.parse_args(argv)
    try:
        security = security_from_args(args, Role.CLIENT, "healthcheck")
    except ConfigError as exc:
        print(f"healthcheck: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    serving, reason = check(args.address, args.service, args.timeout, security=security,
                            server_name=args.server_name)
    if not serving:
        print(reason, file=sys.stderr)
        return EXIT_NOT_SERVING
    return EXIT_SERVING


if __name__ == "__main__":
    sys.exit(main())
