"""Why a TUF check or download failed: named reasons and :class:`TufError`.

Apart from :mod:`agent.update.tuf_client` so that the updater can name and catch them without
importing python-tuf and urllib3 (about 3 MB of the agent's memory) until a release arrives.
"""
from __future__ import annotations

# Named rejection reasons (the ``reason`` of an ``update`` event starts with one of these).
HASH_MISMATCH = "hash_mismatch"          # bytes differ from the signed length/hash
OVERSIZE = "oversize"                    # server sent more than the signed length
EXPIRED = "expired_metadata"             # freeze attack or a repository not re-signed in time
UNTRUSTED = "untrusted_signature"        # metadata not signed by the keys the root names
METADATA_MISMATCH = "metadata_mismatch"  # rollback, or mixed/inconsistent metadata versions
BAD_METADATA = "bad_metadata"            # anything else ngclient refuses
TARGET_MISSING = "target_missing"        # the release names a target the metadata lacks
DOWNLOAD_FAILED = "download_failed"      # network/HTTP trouble: retried, not a rejection
RETRYABLE = frozenset({DOWNLOAD_FAILED})


class TufError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def retryable(self) -> bool:
        return self.reason in RETRYABLE
