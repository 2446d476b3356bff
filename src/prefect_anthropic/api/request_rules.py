"""What the API rejects before it generates anything: the rules of an API version and of each model.

One set of rules serves the client's pre-flight check (a line the API would reject becomes an error row and
is never sent, or, with `--drop-unsupported-params`, is sent without the offending sampling parameters),
`estimate` (which lists such lines) and the emulator (which answers them 400, as the API does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .models import ModelInfo

__all__ = [
    "API_VERSIONS",
    "API_VERSION_2023",
    "API_VERSION_2026",
    "FAST_MODE_BETA",
    "SAMPLING_PARAMETERS",
    "Rejection",
    "drop_parameters",
    "rejections",
]

API_VERSION_2023 = "2023-06-01"
API_VERSION_2026 = "2026-10-21"
API_VERSIONS = (API_VERSION_2023, API_VERSION_2026)
SAMPLING_PARAMETERS = ("temperature", "top_p", "top_k")
FAST_MODE_BETA = "fast-mode-2026-02-01"


@dataclass(frozen=True)
class Rejection:
    """Why the API would answer a request 400: the parameter at fault and the API's message."""

    parameter: str
    message: str
    #: A sampling parameter: `--drop-unsupported-params` removes it and sends the request.
    droppable: bool = False


def _uses_version_2026(version: str | None) -> bool:
    return bool(version) and str(version) >= API_VERSION_2026


def rejections(
    body: Mapping[str, Any],
    model: ModelInfo | None,
    api_version: str | None,
    *,
    beta: str = "",
) -> list[Rejection]:
    """Every reason the API would reject `body` for `model` under `api_version` (empty: none known).

    An unknown model gets only the version's rules: the API is the judge of the rest.
    """
    found: list[Rejection] = []
    sampling_present = [name for name in SAMPLING_PARAMETERS if body.get(name) is not None]
    if _uses_version_2026(api_version):
        found += [Rejection(name, f"{name}: Extra inputs are not permitted", True) for name in sampling_present]
        found += _version_2026_content_rules(body)
    if model is None:
        return found
    rejects = model.rejects
    if not _uses_version_2026(api_version):
        found += [
            Rejection(name, f"`{name}` is deprecated for this model ({model.id})", True)
            for name in sampling_present
            if name in rejects
        ]
    messages = body.get("messages")
    if "prefill" in rejects and isinstance(messages, list) and messages:
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            found.append(
                Rejection(
                    "prefill",
                    f"{model.id} does not support assistant message prefill: the conversation must end with a "
                    "user message",
                )
            )
    thinking = body.get("thinking")
    thinking_type = thinking.get("type") if isinstance(thinking, dict) else None
    if thinking_type == "enabled" and "manual_thinking" in rejects:
        found.append(
            Rejection(
                "thinking",
                f"thinking.type: 'enabled' is not supported for {model.id}; use 'adaptive' thinking instead",
            )
        )
    if thinking_type == "disabled" and "disabled_thinking" in rejects:
        found.append(Rejection("thinking", f"thinking.type: 'disabled' is not supported for {model.id}"))
    tool_choice = body.get("tool_choice")
    if "forced_tool_choice" in rejects and isinstance(tool_choice, dict) and tool_choice.get("type") in ("any", "tool"):
        found.append(
            Rejection(
                "tool_choice",
                f"tool_choice.type: '{tool_choice.get('type')}' (forced tool use) is not supported for {model.id}",
            )
        )
    if "inference_geo" in rejects and body.get("inference_geo") is not None:
        found.append(Rejection("inference_geo", f"inference_geo is not supported for {model.id}"))
    if body.get("speed") == "fast":
        if model.fast_mode is None:
            found.append(Rejection("speed", f"speed: 'fast' is not available for {model.id}"))
        elif model.fast_mode == "preview" and FAST_MODE_BETA not in beta:
            found.append(
                Rejection("speed", f"speed: 'fast' for {model.id} is in preview: it needs the beta {FAST_MODE_BETA}")
            )
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and model.max_output_tokens is not None and max_tokens > model.max_output_tokens:
        found.append(
            Rejection(
                "max_tokens",
                f"max_tokens: {max_tokens} > {model.max_output_tokens}, which is the maximum allowed number of "
                f"output tokens for {model.id}",
            )
        )
    return found


def _version_2026_content_rules(body: Mapping[str, Any]) -> list[Rejection]:
    found: list[Rejection] = []
    messages = body.get("messages")
    if not isinstance(messages, list):
        return found
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            continue
        for j, block in enumerate(message["content"]):
            if not isinstance(block, dict):
                continue
            where = f"messages.{i}.content.{j}"
            if message.get("role") == "assistant" and block.get("type") == "document":
                found.append(Rejection("document", f"{where}: document blocks are not allowed in assistant messages"))
            if message.get("role") == "user" and block.get("type") == "text" and block.get("citations"):
                found.append(Rejection("citations", f"{where}.citations: citations are not allowed in user text"))
    return found


def drop_parameters(body: dict[str, Any], found: list[Rejection]) -> dict[str, Any]:
    """`body` without the droppable parameters among `found` (a new dict; `body` is left as it is)."""
    drop = {rejection.parameter for rejection in found if rejection.droppable}
    return {key: value for key, value in body.items() if key not in drop}
