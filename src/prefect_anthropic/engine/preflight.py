"""The check before paying: a line the API would reject is an error row, never sent.

Each line is checked against its model's entry in the model table and the rules of the chosen API
version (`request_rules`). With `drop_unsupported_params`, sampling parameters that the model or the
version rejects are removed and the line is sent; anything else the API would reject stays an error row
naming the parameter and the model.
"""

from __future__ import annotations

import dataclasses

from ..api.models import ModelTable, model_table
from ..api.request_rules import FAST_MODE_BETA, drop_parameters, rejections
from .records import RequestItem, ResultRecord

__all__ = ["Preflight"]


class Preflight:
    def __init__(
        self, api_version: str, *, drop_unsupported_params: bool = False, models: ModelTable | None = None
    ) -> None:
        self.api_version = api_version
        self.models = models or model_table()
        self.drop_unsupported_params = drop_unsupported_params
        #: Lines sent without the sampling parameters their model or API version rejects.
        self.lines_with_dropped_params = 0
        #: Lines never sent because the API would reject them.
        self.lines_rejected = 0

    def problem(self, item: RequestItem) -> str | None:
        """Why the API would reject the line as it stands (None: nothing known)."""
        info = self.models.lookup(item.model)
        if info is not None and info.is_retired():
            return f"model {item.model!r} was retired on {info.retired_on}; choose a current model"
        # The client adds the fast-mode beta header itself, so a preview model's fast mode is not a problem.
        found = rejections(item.body, info, self.api_version, beta=FAST_MODE_BETA)
        if self.drop_unsupported_params:
            found = [r for r in found if not r.droppable]
        if not found:
            return None
        first = found[0]
        hint = " (--drop-unsupported-params removes it)" if first.droppable else ""
        return (
            f"the API rejects {first.parameter!r} for {item.model} under API version {self.api_version}: "
            f"{first.message}{hint}"
        )

    def __call__(self, item: RequestItem) -> RequestItem | ResultRecord:
        """The item as it will be sent, or the error row of a line the API would reject."""
        problem = self.problem(item)
        if problem is not None:
            self.lines_rejected += 1
            return ResultRecord.for_invalid_line(
                dataclasses.replace(item, invalid=f"line {item.line}: not sent: {problem}")
            )
        if not self.drop_unsupported_params:
            return item
        found = rejections(item.body, self.models.lookup(item.model), self.api_version, beta=FAST_MODE_BETA)
        if not found:
            return item
        self.lines_with_dropped_params += 1
        return dataclasses.replace(item, body=drop_parameters(item.body, found))
