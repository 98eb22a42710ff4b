"""Over-the-air updates of the agent and the MCU (PROTOCOL §7, docs/updates.md).

Modules: :mod:`.tuf_client` (verification with python-tuf ngclient, resumable downloads; its
reasons and error in :mod:`.tuf_errors`),
:mod:`.bundle` and :mod:`.delta` (what is shipped), :mod:`.slots` (install layout, two slots,
atomic ``current``), :mod:`.state` (persistent counters), :mod:`.trial` (trial and rollback),
:mod:`.updater` (the ``down/release`` handler and worker), :mod:`.cli` (``dongle-update``, run by
systemd around every start).
"""
