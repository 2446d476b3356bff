"""A Prefect automation that notifies when a dataset run ends with failed rows.

Every run emits `prefect-anthropic.run.finished` with the figures in its payload and the outcome as a label of
its resource (`prefect-anthropic.outcome`: `all-succeeded` or `failed-rows`); the flow run is a related
resource. This automation reacts to the second kind with a notification block of yours (Slack, email, ...):

    python examples/notify_on_failed_rows.py my-slack-webhook    # the name of a saved notification block
"""

from __future__ import annotations

import sys

from prefect.automations import Automation
from prefect.blocks.core import Block
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture

BODY = (
    "Dataset {{ event.resource['prefect.resource.name'] }}: {{ event.payload.failed }} of "
    "{{ event.payload.requests }} rows failed ({{ event.payload.failed_by_error_type }}), "
    "${{ event.payload.cost_usd }}."
)


def failed_rows_automation(notification_block_id: str) -> Automation:
    return Automation(
        name="prefect-anthropic: failed rows",
        description="Notify when a dataset run ends with failed rows.",
        trigger=EventTrigger(
            expect={"prefect-anthropic.run.finished"},
            match={"prefect-anthropic.outcome": "failed-rows"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=notification_block_id, subject="Dataset rows failed", body=BODY)],
    )


if __name__ == "__main__":
    block = Block.load(sys.argv[1])
    print(failed_rows_automation(str(block._block_document_id)).create().id)
