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

# A table and templates: the usual way in (`prefect-anthropic run examples/products.csv --template ...`).
products = [
    ("P-001", "Trail running shoes", "footwear", 129.0),
    ("P-002", "Insulated water bottle", "outdoor", 34.5),
    ("P-003", "Merino wool socks", "apparel", 19.9),
    ("P-004", "Ultralight rain jacket", "apparel", 189.0),
    ("P-005", "Headlamp, 400 lumens", "outdoor", 45.0),
    ("P-006", "Compression tights", "apparel", 64.0),
    ("P-007", "Hydration vest, 5 l", "outdoor", 99.0),
    ("P-008", "Recovery sandals", "footwear", 59.0),
]
with open(HERE / "products.csv", "w") as f:
    f.write("sku,name,category,price_eur\n")
    for sku, name, category, price in products:
        f.write(f'{sku},"{name}",{category},{price}\n')
(HERE / "templates").mkdir(exist_ok=True)
(HERE / "templates" / "describe.j2").write_text(
    "Write a two-sentence product description for {{ name }} ({{ category }}, {{ price_eur }} EUR).\n"
)
(HERE / "templates" / "system.j2").write_text(
    "You write concise, factual copy for an outdoor shop's {{ category }} page.\n"
)
(HERE / "templates" / "body.json.j2").write_text(
    '{"model": "claude-sonnet-5-5", "max_tokens": 300,\n'
    ' "system": "You answer as the shop\'s product expert.",\n'
    ' "messages": [\n'
    '  {"role": "user", "content": "Is {{ name }} good for a first marathon?"},\n'
    '  {"role": "assistant", "content": "It is a {{ category }} item priced at {{ price_eur }} EUR."},\n'
    '  {"role": "user", "content": "Give me one reason to buy it and one not to."}\n'
    " ]}\n"
)
(HERE / "templates" / "listing.schema.json").write_text(
    json.dumps(
        {
            "type": "object",
            "properties": {
                "headline": {"type": "string", "maxLength": 80},
                "bullets": {"type": "array", "items": {"type": "string"}},
                "audience": {"type": "string", "enum": ["beginner", "enthusiast", "pro"]},
            },
            "required": ["headline", "bullets", "audience"],
        },
        indent=2,
    )
    + "\n"
)
