"""``dongle provision``: the device's keys and registration request (PROTOCOL §1)."""
from __future__ import annotations

import argparse

from agent.cli.common import EXIT_FAILED, add_command, emit, fail
from agent.technician.control import ClientError


def format_provision(result: dict) -> str:
    rows = [("device_id", result["device_id"]), ("kid_sign", result["kid_sign"]), ("kid_enc", result["kid_enc"]),
            ("kid_cloud_sign", result["kid_cloud_sign"]), ("kid_cloud_enc", result["kid_cloud_enc"]),
            ("registration", result["paths"]["registration.json"])]
    if result.get("tuf_root"):
        rows.append(("tuf_root", result["tuf_root"]))
    return "\n".join(f"{k:<15} {v}" for k, v in rows)


def cmd_provision(args: argparse.Namespace) -> int:
    from agent.cloud.provision import ProvisionError, provision

    try:
        result = provision(args.device_id, args.cloud_sign_pub, args.cloud_enc_pub, args.out, force=args.force,
                           tuf_root=args.tuf_root)
    except ProvisionError as e:
        fail(args, ClientError("bad_request" if e.exit_code == 2 else "refused", f"provision: {e}"))
        return e.exit_code
    except OSError as e:
        fail(args, ClientError("failed", f"provision: {e}"))
        return EXIT_FAILED
    return emit(args, result, format_provision)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "provision", help="create this device's keys and registration request",
                    description="Create the device's Ed25519, X25519 and TLS keys, the TLS CSR and "
                                "registration.json in --out (PROTOCOL §1).")
    p.add_argument("--device-id", required=True, help="4-64 characters of [a-z0-9-]; the TLS CN")
    p.add_argument("--cloud-sign-pub", required=True, metavar="PEM", help="the cloud's Ed25519 public key")
    p.add_argument("--cloud-enc-pub", required=True, metavar="PEM", help="the cloud's X25519 public key")
    p.add_argument("--out", required=True, metavar="DIR", help="key directory, e.g. /etc/dongle/keys")
    p.add_argument("--force", action="store_true", help="overwrite existing keys")
    p.add_argument("--tuf-root", metavar="FILE", help="the update repository's TUF root metadata to pin "
                                                      "(copied to DIR/tuf_root.json; docs/updates.md)")
    p.set_defaults(func=cmd_provision)
