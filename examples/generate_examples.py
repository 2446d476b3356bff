"""Write the example request files shipped in this folder (run from the repository root)."""

import json
from pathlib import Path

HERE = Path(__file__).parent
MODEL = "claude-sonnet-5-5"
FAST_MODEL = "claude-haiku-5-5"

with open(HERE / "requests.jsonl", "w") as f:
    for x in range(200):
        job = {
            "model": MODEL,
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": f"How much is 8 * {x}? Return only the result.\n Result:"}],
            "metadata": {"row_id": x},
        }
        f.write(json.dumps(job) + "\n")

blog = " ".join(
    f"Paragraph {i}: the author reflects on travel, cooking and the craft of writing, and on what makes a "
    "story worth telling to strangers."
    for i in range(150)
)
with open(HERE / "caching_requests.jsonl", "w") as f:
    for i, question in enumerate(["main themes", "tone", "structure", "audience", "strongest paragraph"] * 10):
        job = {
            "model": MODEL,
            "max_tokens": 1024,
            "system": [
                {"type": "text", "text": "You are an AI assistant tasked with analyzing blogs.\n"},
                {"type": "text", "text": blog, "cache_control": {"type": "ephemeral"}},
            ],
            "messages": [{"role": "user", "content": f"Question {i}: describe the {question} of this blog."}],
        }
        f.write(json.dumps(job) + "\n")

with open(HERE / "batch_format_requests.jsonl", "w") as f:
    for i in range(20):
        question = [{"role": "user", "content": f"Name a color, #{i}"}]
        params = {"model": FAST_MODEL, "max_tokens": 256, "messages": question}
        f.write(json.dumps({"custom_id": f"color-{i}", "params": params}) + "\n")
