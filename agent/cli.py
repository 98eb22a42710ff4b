"""``dongle``: the technician / operator command line.

Each subcommand is an ``add_<name>_parser(subparsers)`` function that registers its arguments
and sets ``func`` to a ``cmd_<name>(args) -> int`` handler. Exit codes: 0 success, 1 the
operation was refused or failed, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

log = logging.getLogger(__name__)


def cmd_provision(args: argparse.Namespace) -> int:
    from agent.provision import ProvisionError, provision

    try:
        result = provision(args.device_id, args.cloud_sign_pub, args.cloud_enc_pub, args.out, force=args.force)
    except ProvisionError as e:
        print(f"dongle provision: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"dongle provision: {e}", file=sys.stderr)
        return 1
    print(f"device_id       {result['device_id']}")
    print(f"kid_sign        {result['kid_sign']}")
    print(f"kid_enc         {result['kid_enc']}")
    print(f"kid_cloud_sign  {result['kid_cloud_sign']}")
    print(f"kid_cloud_enc   {result['kid_cloud_enc']}")
    print(f"registration    {result['paths']['registration.json']}")
    return 0


def add_provision_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("provision", help="create this device's keys and registration request",
                       description="Create the device's Ed25519, X25519 and TLS keys, the TLS CSR and "
                                   "registration.json in --out (PROTOCOL §1).")
    p.add_argument("--device-id", required=True, help="4-64 characters of [a-z0-9-]; the TLS CN")
    p.add_argument("--cloud-sign-pub", required=True, metavar="PEM", help="the cloud's Ed25519 public key")
    p.add_argument("--cloud-enc-pub", required=True, metavar="PEM", help="the cloud's X25519 public key")
    p.add_argument("--out", required=True, metavar="DIR", help="key directory, e.g. /etc/dongle/keys")
    p.add_argument("--force", action="store_true", help="overwrite existing keys")
    p.set_defaults(func=cmd_provision)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dongle", description="In-car telematics dongle tools.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_provision_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad arguments, 0 for --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not logging.getLogger().handlers:
        level = logging.WARNING - 10 * min(args.verbose, 2)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
