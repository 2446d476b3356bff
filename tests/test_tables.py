"""Dataset in, dataset out (issue 13): a table and a prompt template instead of hand-written request JSONL.
Through the CLI and Python, against the emulator; outputs read back with pandas and pyarrow."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefect_anthropic import ClientSettings
from prefect_anthropic.cli import main
from prefect_anthropic.orchestration.flows import generate_dataset_from_table

pytestmark = pytest.mark.usefixtures("prefect_server")
MODEL = "claude-haiku-5-5"
CITIES = pd.DataFrame(
    {
        "city": ["Lyon", "Oslo", "Lima", "Kyoto", "Perth"],
        "country": ["France", "Norway", "Peru", "Japan", "Australia"],
        "population": [522_000, 709_000, 10_000_000, 1_460_000, 2_300_000],
        "text": ["a", "b", "c", "d", "e"],  # collides with the result column `text`
    }
)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-fake-tables")


def write_table(frame: pd.DataFrame, path):
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in frame.to_dict(orient="records")))
    return path


def run_table(table, out, emulator, *flags) -> int:
    args = ["run", str(table), "--output-dir", str(out), "--base-url", emulator.base_url, "--no-progress"]
    args += ["--template", "Describe {{ city }}, {{ country }} ({{ population }} people).", "--model", MODEL]
    return main([*args, "--max-tokens", "100", *flags])


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_a_table_renders_into_requests_and_keeps_its_columns_in_order(emulator, tmp_path, suffix):
    table = write_table(CITIES, tmp_path / f"cities{suffix}")
    assert run_table(table, tmp_path / "out", emulator, "--system", "You write about {{ country }}.") == 0
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(frame["city"]) == list(CITIES["city"])  # the table's row order
    assert list(frame.columns[:4]) == ["city", "country", "population", "input_text"]  # collision renamed
    assert list(frame["input_text"]) == list(CITIES["text"])
    assert frame["text"].tolist() == [
        f"echo: Describe {c}, {k} ({p} people)." for c, k, p in CITIES[["city", "country", "population"]].values
    ]
    assert str(pq.read_schema(tmp_path / "out" / "results.parquet").field("population").type) == "int64"
    assert frame["custom_id"].str.startswith("row-").all() and frame["custom_id"].is_unique
    first = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    assert first["city"] == "Lyon" and first["input_text"] == "a" and first["status"] == "succeeded"


def test_an_undefined_column_is_refused_before_anything_is_sent(emulator, tmp_path, capsys):
    table = write_table(CITIES, tmp_path / "cities.csv")
    args = ["run", str(table), "--output-dir", str(tmp_path / "out"), "--base-url", emulator.base_url]
    args += ["--template", "Tell me about {{ city }} in {{ region }}", "--model", MODEL, "--max-tokens", "50"]
    assert main([*args, "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "region" in error and "row 1" in error and "nothing was sent" in error
    assert emulator.stats()["requests_total"] == 0


def test_editing_one_row_resends_only_that_row(emulator, tmp_path):
    table = tmp_path / "cities.parquet"
    write_table(CITIES, table)
    flags = ("--id-column", "city", "--columns", "city,population")
    assert run_table(table, tmp_path / "out", emulator, *flags) == 0
    assert emulator.stats()["billed_requests"] == 5
    edited = CITIES.copy()
    edited.loc[2, "population"] = 11_000_000
    write_table(edited, table)
    assert run_table(table, tmp_path / "out", emulator, *flags) == 0
    assert emulator.stats()["billed_requests"] == 6  # the edited row only
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(frame.columns[:2]) == ["city", "population"] and "country" not in frame.columns
    assert list(frame["custom_id"]) == list(CITIES["city"])
    assert frame.loc[2, "text"] == "echo: Describe Lima, Peru (11000000 people)."

    more = pd.concat([edited, pd.DataFrame([{"city": "Quito", "country": "Ecuador", "population": 1, "text": "f"}])])
    write_table(more, table)  # rows added at the end: only they are sent
    assert run_table(table, tmp_path / "out", emulator, *flags) == 0
    assert emulator.stats()["billed_requests"] == 7


def test_a_template_may_render_a_whole_request_body(emulator, tmp_path):
    table = write_table(CITIES, tmp_path / "cities.jsonl")
    template = tmp_path / "body.j2"
    template.write_text(
        '{"model": "claude-sonnet-5-5", "max_tokens": 60, "messages": ['
        '{"role": "user", "content": "Where is {{ city }}?"}, {"role": "assistant", "content": "In {{ country }}."},'
        '{"role": "user", "content": "And how many people live there?"}]}'
    )
    args = ["run", str(table), "--output-dir", str(tmp_path / "out"), "--base-url", emulator.base_url]
    assert main([*args, "--template", str(template), "--no-progress"]) == 0
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert (frame["model"] == "claude-sonnet-5-5").all()
    assert (frame["text"] == "echo: And how many people live there?").all()


async def test_a_dataframe_in_a_dataset_out_with_a_prompt_function(emulator, tmp_path):
    settings = ClientSettings(base_url=emulator.base_url)

    def prompt(row):
        return [{"role": "user", "content": f"Population of {row['city']}?"}]

    summary = await generate_dataset_from_table(
        CITIES, tmp_path / "out", prompt, model=MODEL, max_tokens=40, settings=settings, id_column="city"
    )
    assert summary["succeeded"] == 5
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(frame["city"]) == list(CITIES["city"]) and list(frame["custom_id"]) == list(CITIES["city"])
    assert frame.loc[0, "text"] == "echo: Population of Lyon?"

    arrow = pa.Table.from_pandas(CITIES.head(2), preserve_index=False)
    summary = await generate_dataset_from_table(
        arrow, tmp_path / "out-arrow", "Hello {{ city }}", model=MODEL, max_tokens=40, settings=settings
    )
    assert summary["succeeded"] == 2
