#!/usr/bin/env python3
"""Upgrade an app through covet-agent over mutual TLS, printing its events.

An example for orchestrators: stubs are generated from proto/ with
grpcio-tools (into a scratch directory, at start-up), then UpgradeService/
Upgrade starts the operation and OperationService/WatchOperation follows it
to its end. Exit codes are covetctl's: 0 succeeded, 3 failed and rolled back
cleanly, 4 needs a human, 1 refused or any other error.

    python3 covet_upgrade.py 10.0.0.5:7443 ca.crt ops.crt ops.key covet 0.2.0 \\
        --env-rename DATABASE_URI=DATABASE_URL
"""

import argparse
import importlib
import importlib.resources
import pathlib
import sys
import tempfile

EXIT_OK, EXIT_OTHER, EXIT_ROLLED_BACK, EXIT_NEEDS_HUMAN = 0, 1, 3, 4

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[2] / "proto"


def generate_stubs(out_dir: pathlib.Path) -> None:
    """Compiles covet/agent/v1/*.proto into out_dir and makes it importable."""
    from grpc_tools import protoc

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    protos = sorted(str(p) for p in (PROTO_ROOT / "covet/agent/v1").glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"covet_upgrade: protoc failed on {PROTO_ROOT}")
    sys.path.insert(0, str(out_dir))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("endpoint", help="the agent, HOST:PORT")
    p.add_argument("ca", help="CA certificate that signed the agent's certificate")
    p.add_argument("cert", help="client certificate (role operator or admin)")
    p.add_argument("key", help="client key")
    p.add_argument("app")
    p.add_argument("version")
    p.add_argument("--env-rename", action="append", default=[], metavar="OLD=NEW")
    p.add_argument("--env-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--server-name", help="name to check in the agent's certificate")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    return p.parse_args()


def channel(args):
    import grpc

    read = lambda path: pathlib.Path(path).read_bytes()  # noqa: E731
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca),
        private_key=read(args.key),
        certificate_chain=read(args.cert),
    )
    options = []
    if args.server_name:
        options.append(("grpc.ssl_target_name_override", args.server_name))
    return grpc.secure_channel(args.endpoint, creds, options=options)


def env_edits(pb, args):
    edits = []
    for text in args.env_set:
        key, _, value = text.partition("=")
        edits.append(pb.EnvEdit(set=pb.EnvSet(key=key, value=value)))
    for text in args.env_rename:
        old, _, new = text.partition("=")
        # `from` is a Python keyword.
        edits.append(pb.EnvEdit(rename=pb.EnvRename(**{"from": old, "to": new})))
    return edits


def describe(ops_pb, event) -> str:
    kind = event.WhichOneof("event")
    e = getattr(event, kind)
    if kind == "step_started":
        return f"==> {e.step}" + (f": {e.description}" if e.description else "")
    if kind == "step_finished":
        outcome = ops_pb.StepOutcome.Name(e.outcome).removeprefix("STEP_OUTCOME_").lower()
        return f"    {outcome} {e.step}" + (f": {e.detail}" if e.detail else "")
    if kind == "output":
        return f"    | {e.line}"
    if kind == "state_changed":
        state = ops_pb.OperationState.Name(e.state).removeprefix("OPERATION_STATE_").lower()
        return f"state: {state}" + (f" ({e.cause})" if e.cause else "")
    if kind == "note":
        return f"    note: {e.text}"
    return f"    {kind}"


def main() -> int:
    args = parse_args()
    import grpc

    with tempfile.TemporaryDirectory(prefix="covet-stubs-") as stubs:
        generate_stubs(pathlib.Path(stubs))
        up_pb = importlib.import_module("covet.agent.v1.upgrades_pb2")
        up_grpc = importlib.import_module("covet.agent.v1.upgrades_pb2_grpc")
        ops_pb = importlib.import_module("covet.agent.v1.operations_pb2")
        ops_grpc = importlib.import_module("covet.agent.v1.operations_pb2_grpc")
        try:
            with channel(args) as ch:
                upgrades = up_grpc.UpgradeServiceStub(ch)
                operations = ops_grpc.OperationServiceStub(ch)
                request = up_pb.UpgradeRequest(
                    app=args.app, to_version=args.version, env_edits=env_edits(up_pb, args)
                )
                op = upgrades.Upgrade(request, timeout=args.timeout)
                print(f"operation {op.id}", flush=True)
                watch = ops_pb.WatchOperationRequest(id=op.id, from_sequence=1)
                # The stream ends when the operation does.
                for event in operations.WatchOperation(watch):
                    print(describe(ops_pb, event), flush=True)
                final = operations.GetOperation(
                    ops_pb.GetOperationRequest(id=op.id), timeout=args.timeout
                )
        except grpc.RpcError as e:
            print(f"covet_upgrade: {args.endpoint}: {e.details()} ({e.code().name})", file=sys.stderr)
            return EXIT_OTHER
        state = ops_pb.OperationState.Name(final.state).removeprefix("OPERATION_STATE_")
        print(f"final state: {state.lower()}" + (f" ({final.cause})" if final.cause else ""))
        if final.needs_human:
            print(f"NEEDS A HUMAN: {final.needs_human}")
        return {
            "SUCCEEDED": EXIT_OK,
            "ROLLED_BACK": EXIT_ROLLED_BACK,
            "NEEDS_HUMAN": EXIT_NEEDS_HUMAN,
        }.get(state, EXIT_OTHER)


if __name__ == "__main__":
    sys.exit(main())
