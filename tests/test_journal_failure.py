"""A journal that fails to record: 503, then the missed delivery comes back."""

from __future__ import annotations

import time

import pytest
from fixtures_daemon import WEBHOOK_SECRET, StartDaemon, fixture_payload
from fixtures_emulator import INSTALLATION_ID

from daemon.errors import JournalError
from daemon.sandbox import Emulator


async def test_failed_record_answers_503_then_redelivers(
    emulator: Emulator, start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = await start_daemon(
        jobs=[], sections={"journal": {"redeliver_missed": True}}
    )
    emulator.webhook_url = harness.webhook_url
    emulator.webhook_secret = WEBHOOK_SECRET.encode()
    journal = harness.daemon.journal
    real_record = journal.record

    async def full_disk(delivery: object) -> None:
        raise JournalError(
            "journal file 'x': writing failed (database or disk is full)"
        )

    monkeypatch.setattr(journal, "record", full_disk)
    payload = fixture_payload("push")
    payload["installation"] = {"id": INSTALLATION_ID}

    refused = await harness.post("push", payload, delivery_id="lost-1")

    assert refused.status_code == 503
    assert refused.json() == {"error": "delivery not recorded; retry later"}
    assert "Retry-After" in refused.headers

    # GitHub lists the failed delivery; the next recorded one triggers the scan.
    emulator.add_hook_delivery(
        guid="lost-1",
        event="push",
        action=None,
        installation_id=INSTALLATION_ID,
        status_code=503,
        payload=payload,
        delivered_at=time.time(),
    )
    monkeypatch.setattr(journal, "record", real_record)
    accepted = await harness.post("push", payload, delivery_id="next-1")
    assert accepted.status_code == 202

    # The emulator lists the redelivery once the daemon has responded to it.
    await harness.wait_until(
        lambda: any(item["redelivery"] for item in emulator.deliveries),
        what="redelivery",
    )
    [redelivery] = [item for item in emulator.deliveries if item["redelivery"]]
    assert redelivery["guid"] == "lost-1"
    assert redelivery["status_code"] == 202
    assert len(emulator.redelivery_attempts) == 1
    known = await journal.known(["lost-1", "next-1"])
    assert known == {"lost-1", "next-1"}
