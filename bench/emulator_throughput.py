"""How many requests/second one emulator process sustains (issue 2: target >= 2,000 with latency 0 and
limits off). Load comes from wrk (Debian package `wrk`) in a separate process, 1 thread and 50
connections, POSTing a small Messages request for 10 seconds.

    python bench/emulator_throughput.py
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile

from prefect_anthropic.emulator import emulator_process

BODY = {"model": "claude-sonnet-4-6", "max_tokens": 50, "messages": [{"role": "user", "content": "What is 8 * 7?"}]}


def main() -> None:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(json.dumps(BODY))}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            'wrk.headers["x-api-key"] = "bench-key"\n'
            'wrk.headers["anthropic-version"] = "2023-06-01"\n'
        )
    with emulator_process() as emu:
        out = subprocess.run(
            [wrk, "-t1", "-c50", "-d10s", "-s", script.name, f"{emu.base_url}/v1/messages"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        stats = emu.stats()
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    ok = stats["responses_by_status"].get("200", 0) / max(1, stats["requests_total"])
    print(f"{rate:,.0f} requests/s sustained by one emulator process ({ok:.1%} answered 200)")


if __name__ == "__main__":
    main()
