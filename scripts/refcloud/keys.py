"""Generate the cloud's key pairs (PROTOCOL §1) for development, tests and the demo backend.

Writes ``cloud_sign.key``/``.pub`` (Ed25519: signs downlink envelopes) and ``cloud_enc.key``/``.pub``
(X25519: opens uplink envelopes). The ``.pub`` files are what ``dongle provision`` takes.

    python -m scripts.refcloud.keys --out DIR [--force]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.cloud import keys

log = logging.getLogger(__name__)

FILES = ("cloud_sign.key", "cloud_sign.pub", "cloud_enc.key", "cloud_enc.pub")


def generate_cloud_keys(out_dir: str | os.PathLike[str], force: bool = False) -> dict[str, Any]:
    """Creates the cloud key pairs in ``out_dir``; returns ``kid_sign``, ``kid_enc`` and ``paths``.

    Raises :class:`FileExistsError` (writing nothing) if any file exists and ``force`` is false.
    """
    out = Path(out_dir)
    paths = {name: out / name for name in FILES}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise FileExistsError("refusing to overwrite (use --force): " + ", ".join(existing))
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    sign = Ed25519PrivateKey.generate()
    enc = X25519PrivateKey.generate()
    keys.write_private_key(paths["cloud_sign.key"], sign, force=force)
    keys.write_private_key(paths["cloud_enc.key"], enc, force=force)
    keys.write_public_key(paths["cloud_sign.pub"], sign.public_key())
    keys.write_public_key(paths["cloud_enc.pub"], enc.public_key())
    return {"kid_sign": keys.key_id(sign.public_key()), "kid_enc": keys.key_id(enc.public_key()), "paths": paths}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloud_keys", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--force", action="store_true", help="overwrite existing keys")
    args = parser.parse_args(argv)
    try:
        result = generate_cloud_keys(args.out, force=args.force)
    except (FileExistsError, keys.KeyFileError, OSError) as e:
        print(f"cloud_keys: {e}", file=sys.stderr)
        return 1
    # the key ids (PROTOCOL §1: kid) that envelopes signed or sealed with these keys carry
    print(f"kid_sign  {result['kid_sign']}")
    print(f"kid_enc   {result['kid_enc']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
