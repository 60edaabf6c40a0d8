# -*- coding: utf-8 -*-
# Copyright: Covet Agent contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The channel to one covet-agent over mutual TLS, shared by every module.

The stubs in ``pb/`` are generated from ``proto/`` by ``clients/ansible/build.sh``
(grpcio-tools) when the collection is built; they are not kept in git.
Errors are worded as covetctl words them (``ctl/src/connect.rs``).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re
import socket
import ssl
import traceback

from ansible.module_utils.basic import env_fallback, missing_required_lib

GRPC_IMPORT_ERROR = None
try:
    import grpc
except ImportError:
    grpc = None
    GRPC_IMPORT_ERROR = traceback.format_exc()

STUBS_IMPORT_ERROR = None
try:
    # Re-exported for the modules.
    from ansible_collections.covet.agent.plugins.module_utils.pb import (  # noqa: F401 pylint: disable=unused-import
        backups_pb2,
        backups_pb2_grpc,
        common_pb2,
        info_pb2,
        info_pb2_grpc,
        operations_pb2,
        operations_pb2_grpc,
        probes_pb2,
        probes_pb2_grpc,
        units_pb2,
        units_pb2_grpc,
        upgrades_pb2,
        upgrades_pb2_grpc,
    )
except ImportError:
    STUBS_IMPORT_ERROR = traceback.format_exc()
    backups_pb2 = backups_pb2_grpc = common_pb2 = info_pb2 = info_pb2_grpc = None
    operations_pb2 = operations_pb2_grpc = probes_pb2 = probes_pb2_grpc = None
    units_pb2 = units_pb2_grpc = upgrades_pb2 = upgrades_pb2_grpc = None

# Options every module takes. `endpoint` is filled in by the collection's
# action plugin (covet_endpoint, else inventory_hostname:7443) when a task
# does not set it.
COMMON_ARGS = dict(
    endpoint=dict(type="str"),
    ca=dict(type="path", fallback=(env_fallback, ["COVET_CA"])),
    cert=dict(type="path", fallback=(env_fallback, ["COVET_CERT"])),
    key=dict(type="path", no_log=False, fallback=(env_fallback, ["COVET_KEY"])),
    server_name=dict(type="str"),
    timeout=dict(type="float", default=30.0),
)

# A dry run installs the target into a scratch environment: allow minutes.
PLAN_TIMEOUT = 600.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text):
    """Seconds in "90", "90s", "500ms", "5m" or "1h"; None when malformed."""
    if text is None:
        return None
    match = _DURATION.match(str(text))
    if not match:
        return None
    return float(match.group(1)) * _SCALE[match.group(2)]


def enum_name(enum, value, prefix):
    """"OPERATION_STATE_ROLLED_BACK" -> "rolled_back"; unknown values -> "unspecified"."""
    try:
        name = enum.Name(value)
    except ValueError:
        return "unspecified"
    return name[len(prefix):].lower() if name.startswith(prefix) else name.lower()


def _camel(code_name):
    """FAILED_PRECONDITION -> FailedPrecondition, as covetctl prints a code."""
    return "".join(part.capitalize() for part in code_name.split("_"))


# What grpc's TLS (BoringSSL) reports, in covetctl's words.
_TLS_TEXTS = (
    ("CERTIFICATE_VERIFY_FAILED", "the agent's certificate is not issued by your CA (check ca)"),
    ("certificate verify failed", "the agent's certificate is not issued by your CA (check ca)"),
    ("is not in peer certificate",
     "the agent's certificate does not name this endpoint (issue it with --san, or set server_name)"),
    ("CERTIFICATE_EXPIRED", "the agent refused your certificate: it has expired"),
    ("certificate expired", "the agent refused your certificate: it has expired"),
    ("CERTIFICATE_REVOKED", "the agent refused your certificate: it is revoked"),
    ("certificate revoked", "the agent refused your certificate: it is revoked"),
    ("UNKNOWN_CA", "the agent refused your certificate: it is not issued by the agent's CA"),
    ("unknown ca", "the agent refused your certificate: it is not issued by the agent's CA"),
    ("BAD_CERTIFICATE", "the agent refused your certificate: it is not issued by the agent's CA"),
    ("bad certificate", "the agent refused your certificate: it is not issued by the agent's CA"),
    ("DECRYPT_ERROR", "the agent refused your certificate: it is not issued by the agent's CA"),
    ("decrypt error", "the agent refused your certificate: it is not issued by the agent's CA"),
    ("CERTIFICATE_REQUIRED", "the agent requires a client certificate"),
    ("certificate required", "the agent requires a client certificate"),
)


def describe_rpc_error(endpoint, error, timeout=None):
    """A failed call in words a person can act on, naming the endpoint."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    for needle, words in _TLS_TEXTS:
        if needle in details:
            return "%s: %s" % (endpoint, words)
    if code is not None and code.name == "UNAVAILABLE":
        lowered = details.lower()
        if "connection refused" in lowered:
            return "connection refused at %s: is covet-agent running and listening there?" % endpoint
        if "handshake" in lowered or "ssl" in lowered or "socket closed" in lowered:
            return ("%s: the TLS handshake failed (%s): check ca, cert and key, and that the "
                    "certificate is issued by the agent's CA" % (endpoint, details))
    if code is not None and code.name == "DEADLINE_EXCEEDED":
        if timeout:
            return "%s: no answer within %gs (raise timeout)" % (endpoint, timeout)
        return "%s: timed out" % endpoint
    name = _camel(code.name) if code is not None else "Unknown"
    return "%s: %s (%s)" % (endpoint, details, name)


def diagnose_tls(endpoint, ca, cert, key, server_name=None, timeout=5.0):
    """Words for why the agent closed a TLS connection, from a handshake made
    with Python's ssl module and the first read (under TLS 1.3 the agent's
    verdict on our certificate arrives only then, which grpc reports as a bare
    "Secure read failed"). None when the handshake and the read succeed."""
    host, port = endpoint.rsplit(":", 1) if ":" in endpoint else (endpoint, "7443")
    host = host.strip("[]")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        context.load_cert_chain(cert, key)
        context.set_alpn_protocols(["h2"])
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=server_name or host) as tls:
                if not tls.recv(1):
                    return "the agent closed the connection right after the TLS handshake"
        return None
    except ssl.SSLError as e:
        text = "%s %s" % (getattr(e, "reason", "") or "", e)
        for needle, words in _TLS_TEXTS:
            if needle in text:
                return words
        return "TLS failed: %s" % e
    except (OSError, ValueError):
        return None


def operation_to_dict(op):
    """An Operation message as the modules return it."""
    return dict(
        id=op.id,
        kind=enum_name(operations_pb2.OperationKind, op.kind, "OPERATION_KIND_"),
        app=op.app,
        state=enum_name(operations_pb2.OperationState, op.state, "OPERATION_STATE_"),
        cause=op.cause,
        needs_human=op.needs_human,
        backup_id=op.backup_id,
        params=dict(op.params),
        steps=[
            dict(
                name=s.name,
                outcome=enum_name(operations_pb2.StepOutcome, s.outcome, "STEP_OUTCOME_"),
                detail=s.detail,
            )
            for s in op.steps
        ],
    )


class CovetClient:
    """Stubs of every service over one channel; failures end the module."""

    def __init__(self, module):
        self.module = module
        if GRPC_IMPORT_ERROR:
            module.fail_json(msg=missing_required_lib("grpcio"), exception=GRPC_IMPORT_ERROR)
        if STUBS_IMPORT_ERROR:
            module.fail_json(
                msg="the covet.agent stubs are missing: build the collection with clients/ansible/build.sh",
                exception=STUBS_IMPORT_ERROR,
            )
        params = module.params
        if not params.get("endpoint"):
            module.fail_json(msg="no endpoint given: set endpoint (the action plugin sets it from "
                                 "covet_endpoint or inventory_hostname, unless the module is run without it)")
        self.endpoint = params["endpoint"]
        self.timeout = params["timeout"]
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self._read("CA", "ca", "COVET_CA"),
            private_key=self._read("key", "key", "COVET_KEY"),
            certificate_chain=self._read("certificate", "cert", "COVET_CERT"),
        )
        options = []
        if params.get("server_name"):
            options.append(("grpc.ssl_target_name_override", params["server_name"]))
        self.channel = grpc.secure_channel(self.endpoint, credentials, options=options)
        self.info = info_pb2_grpc.InfoServiceStub(self.channel)
        self.operations = operations_pb2_grpc.OperationServiceStub(self.channel)
        self.upgrades = upgrades_pb2_grpc.UpgradeServiceStub(self.channel)
        self.backups = backups_pb2_grpc.BackupServiceStub(self.channel)
        self.units = units_pb2_grpc.UnitServiceStub(self.channel)
        self.probes = probes_pb2_grpc.ProbeServiceStub(self.channel)

    def _read(self, what, option, env):
        path = self.module.params.get(option)
        if not path:
            self.module.fail_json(msg="no %s given: set the %s option or %s" % (what, option, env))
        try:
            with open(path, "rb") as f:
                return f.read()
        except (IOError, OSError) as e:
            self.module.fail_json(msg="cannot read %s %s: %s" % (what, path, e.strerror or e))

    def fail(self, msg, **result):
        self.channel.close()
        self.module.fail_json(msg=msg, **result)

    def exit(self, **result):
        self.channel.close()
        self.module.exit_json(**result)

    def call(self, method, request, timeout=None, on_error=None):
        """One unary call; on an RPC error, `on_error(error)` may return a
        value to use instead, else the module fails with the cause."""
        timeout = timeout or self.timeout
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as e:
            if on_error is not None:
                handled = on_error(e)
                if handled is not None:
                    return handled
            self.fail(self.describe(e, timeout), grpc_code=_code_name(e))

    def describe(self, error, timeout=None):
        """describe_rpc_error, and for a connection the agent closed, why it did."""
        words = describe_rpc_error(self.endpoint, error, timeout)
        details = (error.details() if hasattr(error, "details") else "") or ""
        if _code_name(error) == "UNAVAILABLE" and ("Secure read failed" in details or "handshake" in details.lower()
                                                   or "Socket closed" in details):
            p = self.module.params
            why = diagnose_tls(self.endpoint, p["ca"], p["cert"], p["key"], p.get("server_name"))
            if why:
                return "%s: %s" % (self.endpoint, why)
        return words

    def follow(self, op_id):
        """Follows an operation to its end: (final Operation, its output lines
        by step). The stream is resumed where it broke when the agent was
        briefly unreachable."""
        outputs = {}
        sequence = 1
        failures = 0
        while True:
            request = operations_pb2.WatchOperationRequest(id=op_id, from_sequence=sequence)
            try:
                for event in self.operations.WatchOperation(request):
                    sequence = event.sequence + 1
                    if event.WhichOneof("event") == "output":
                        outputs.setdefault(event.output.step, []).append(event.output.line)
                break
            except grpc.RpcError as e:
                failures += 1
                if failures >= 5 or e.code() != grpc.StatusCode.UNAVAILABLE:
                    self.fail(
                        "%s (following operation %s)" % (self.describe(e), op_id),
                        operation_id=op_id,
                    )
        final = self.call(self.operations.GetOperation, operations_pb2.GetOperationRequest(id=op_id))
        return final, outputs

    def finish(self, op, outputs=None, what="operation", **extra):
        """Ends the module with a followed operation: ok when it succeeded,
        failed with its cause otherwise (rolled_back, needs_human set)."""
        result = dict(operation=operation_to_dict(op), operation_id=op.id, **extra)
        state = result["operation"]["state"]
        result["rolled_back"] = state == "rolled_back"
        if state == "succeeded":
            result.setdefault("changed", True)
            self.exit(**result)
        result["changed"] = state == "needs_human"
        if state == "needs_human":
            result["needs_human"] = op.needs_human
            self.fail(
                "%s: %s %s NEEDS A HUMAN: %s" % (self.endpoint, what, op.id, op.needs_human or op.cause),
                **result
            )
        if state == "rolled_back":
            self.fail("%s: %s %s rolled back: %s" % (self.endpoint, what, op.id, op.cause), **result)
        self.fail("%s: %s %s ended %s: %s" % (self.endpoint, what, op.id, state, op.cause), **result)


def _code_name(error):
    try:
        return error.code().name
    except AttributeError:
        return None
