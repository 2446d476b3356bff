"""Configuration resolved at the edge: the command line's `main` is the one place that writes the environment
(for the command's life), the model table reads it or an explicit path, the test servers say what reaches them
without setting it, and what an account's shared state depends on is read off the settings' declarations."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_anthropic.api.models import MODELS_FILE_ENV, ModelsFileError, lookup_model, model_table, use_models_file
from prefect_anthropic.cli import DEMO_API_KEY, build_parser, command_environment, main
from prefect_anthropic.engine.account import _SHARED_FIELDS
from prefect_anthropic.settings import API_KEY_ENV, account_wide_fields
from prefect_anthropic.storage import STORAGE_OPTIONS_ENV

SRC = Path(__file__).resolve().parents[1] / "src" / "prefect_anthropic"
NEW_MODEL = "claude-edge-9"
PRICED = (
    f'[[model]]\nid = "{NEW_MODEL}"\nsource = "test"\n'
    "[model.prices]\ninput = 1.0\noutput = 2.0\ncache_write_5m = 1.25\ncache_write_1h = 2.0\ncache_read = 0.1\n"
)
LOGGING_LEVELS = ("PREFECT_LOGGING_LEVEL", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL")
WRITES = {"update", "pop", "popitem", "setdefault", "clear", "__setitem__", "__delitem__"}


@pytest.fixture
def clean_environment(monkeypatch):
    for name in (API_KEY_ENV, MODELS_FILE_ENV, STORAGE_OPTIONS_ENV, *LOGGING_LEVELS):
        monkeypatch.delenv(name, raising=False)


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and getattr(node.value, "id", None) == "os"


def _environment_writes(tree: ast.AST) -> list[ast.AST]:
    found: list[ast.AST] = []
    for node in ast.walk(tree):
        call = node.func if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
        if call is not None and (
            (_is_environ(call.value) and call.attr in WRITES)
            or (getattr(call.value, "id", None) == "os" and call.attr in ("putenv", "unsetenv"))
        ):
            found.append(node)
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else []
        if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        found += [t for t in targets if isinstance(t, ast.Subscript) and _is_environ(t.value)]
    return found


def test_only_the_command_line_writes_the_environment():
    writers = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for write in _environment_writes(tree):
            owner = [f.name for f in functions if f.lineno <= write.lineno <= (f.end_lineno or f.lineno)]
            writers.append((path.relative_to(SRC).as_posix(), owner[-1] if owner else "<module>"))
    assert set(writers) == {("cli.py", "environment_set")}, writers
    cli = ast.parse((SRC / "cli.py").read_text())
    callers = {
        f.name
        for f in ast.walk(cli)
        if isinstance(f, ast.FunctionDef)
        for call in ast.walk(f)
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "environment_set"
    }
    assert callers == {"main"}


def test_the_account_shares_state_by_the_fields_marked_in_the_settings():
    assert set(account_wide_fields()) == {
        "base_url",
        "anthropic_version",
        "tier",
        "requests_per_minute",
        "input_tokens_per_minute",
        "output_tokens_per_minute",
        "limit_share",
        "max_concurrency",
        "adaptive_concurrency",
        "give_up_after_s",
        "timeout_s",
        "limiter_url",
        "limiter_block",
        "shared_max_concurrency",
    }
    assert account_wide_fields() == _SHARED_FIELDS


def test_the_model_table_reads_an_explicit_file_or_the_environment_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(MODELS_FILE_ENV, raising=False)
    extra = tmp_path / "models.toml"
    extra.write_text(PRICED)
    before = dict(os.environ)
    assert use_models_file(extra).lookup(NEW_MODEL) is not None
    assert dict(os.environ) == before
    assert lookup_model(NEW_MODEL) is None and lookup_model(NEW_MODEL, models_file=extra) is not None
    monkeypatch.setenv(MODELS_FILE_ENV, str(extra))
    assert model_table() is model_table(extra)  # one parsed table per file
    extra.write_text(PRICED.replace("output = 2.0", "output = 3.0"))
    assert lookup_model(NEW_MODEL).prices.output == 2.0  # read once...
    use_models_file(extra)
    assert lookup_model(NEW_MODEL).prices.output == 3.0  # ...until read afresh
    with pytest.raises(ModelsFileError, match=r"missing\.toml"):
        use_models_file(tmp_path / "missing.toml")


def _args(*argv: str):
    return build_parser().parse_args(list(argv))


def test_each_command_says_what_it_puts_in_the_environment(clean_environment, tmp_path):
    requests = str(tmp_path / "requests.jsonl")
    run = _args(
        "run", requests, "--output-dir", "out", "--api-key", "sk-1", "--models-file", "m.toml",
        "--storage-options", "{}", "--log-level", "debug", "--verbose",
    )  # fmt: skip
    assert command_environment(run) == {
        API_KEY_ENV: "sk-1",
        MODELS_FILE_ENV: "m.toml",
        STORAGE_OPTIONS_ENV: "{}",
        "PREFECT_LOGGING_LEVEL": "DEBUG",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "DEBUG",
    }
    assert command_environment(_args("run", requests, "--output-dir", "out")) == {
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    }
    assert command_environment(_args("estimate", requests, "--api-key", "sk-2")) == {API_KEY_ENV: "sk-2"}
    assert command_environment(_args("cancel-batches", "--output-dir", "out", "--models-file", "m.toml")) == {
        MODELS_FILE_ENV: "m.toml"
    }
    demo = {"PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING"}
    assert command_environment(_args("demo")) == {**demo, API_KEY_ENV: DEMO_API_KEY}
    os.environ[API_KEY_ENV] = "sk-user"  # the fixture takes it out again
    assert command_environment(_args("demo")) == demo  # the user's key stays
    assert command_environment(_args("emulator", "--models-file", "m.toml")) == {}  # the emulator's own table


def test_a_command_run_in_process_uses_its_environment_and_leaves_nothing_behind(clean_environment, tmp_path, capsys):
    models = tmp_path / "models.toml"
    models.write_text(PRICED)
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        json.dumps({"model": NEW_MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]})
    )
    before = dict(os.environ)
    argv = ["estimate", str(requests), "--api-key", "sk-ant-edge", "--models-file", str(models), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["cost_usd_min"] > 0  # priced from the models file
    assert dict(os.environ) == before
    assert main(["estimate", str(requests), "--models-file", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err  # fails now, naming the file
    assert dict(os.environ) == before


def test_prefect_finds_the_logging_levels_set_when_it_is_imported(tmp_path):
    """In a fresh process: a run that loads Prefect (on a work pool) sees the levels at Prefect's import; a command
    stopped early (a table without --template) leaves none of them behind."""
    table = tmp_path / "rows.csv"
    table.write_text("question\nwhat is 2 + 2?\n")
    argv = ["run", str(table), "--output-dir", str(tmp_path / "out"), "--work-pool", "a-pool", "--log-level", "DEBUG"]
    probe = f"""
import json, os, sys
levels = {LOGGING_LEVELS!r}
seen = {{}}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "prefect" and not seen:
            seen.update({{name: os.environ.get(name) for name in levels}})
        return None

sys.meta_path.insert(0, Watch())
from prefect_anthropic.cli import main
code = main({argv!r})
print(json.dumps({{"code": code, "seen": seen, "left": {{name: os.environ.get(name) for name in levels}}}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 2 and "give --template" in done.stderr
    assert result["seen"] == {"PREFECT_LOGGING_LEVEL": "DEBUG", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING"}
    assert result["left"] == {"PREFECT_LOGGING_LEVEL": None, "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": None}


def test_the_s3_server_says_what_reaches_it_and_sets_nothing():
    pytest.importorskip("moto")
    from prefect_anthropic.testing import s3_server

    before = dict(os.environ)
    with s3_server() as store:
        assert dict(os.environ) == before
        assert store.environment["AWS_ENDPOINT_URL"] == store.endpoint
        assert store.storage_options["client_kwargs"] == {"endpoint_url": store.endpoint}
