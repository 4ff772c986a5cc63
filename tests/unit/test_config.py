"""Config files: every example loads and validates with the project's own loader, and a bad
file is refused with a line that names the key, the value and what is allowed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from crossgrad.config import RANGES, RunConfig, load
from crossgrad.errors import ConfigError, UnknownNameError
from crossgrad.security import read_security_table
from peer.builder import load_config

from procs import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLES = sorted((REPO / "examples").glob("*.toml"))


def test_the_papers_setups_have_examples() -> None:
    algorithms = {load_config({}, str(path)).algorithm for path in EXAMPLES}
    assert {"cga", "ngc", "compcga", "compngc"} <= algorithms


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_and_validates(path: Path) -> None:
    config = load_config({}, str(path), environ={})
    written = tomllib.loads(path.read_text())["run"]
    for key, value in written.items():
        assert getattr(config, key.replace("-", "_")) == value, f"{path.name}: {key}"
    assert path.name.split("-")[0] == config.algorithm, "files are named ALGORITHM-DATASET"
    assert path.stem.split("-", 1)[1] == config.dataset
    # flags still win over the file
    assert load_config({"rounds": 7}, str(path), environ={}).rounds == 7


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def refusal(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config({}, write(tmp_path, text), environ={})
    return str(info.value)


def test_unknown_key_names_the_file_the_key_the_closest_match_and_the_known_keys(
        tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError) as info:
        load({}, write(tmp_path, "[run]\nround = 10\n"), environ={})
    message = str(info.value)
    assert "run.toml" in message and "'round'" in message
    assert "did you mean 'rounds'?" in message
    for key in ("rounds", "batch_size", "algorithm", "compressor"):
        assert key in message


def test_a_far_off_key_gets_the_list_without_a_guess(tmp_path: Path) -> None:
    message = refusal(tmp_path, "zzzzzz = 1\n")
    assert "'zzzzzz'" in message and "did you mean" not in message and "rounds" in message


def test_a_setting_beside_the_run_table_is_refused_not_ignored(tmp_path: Path) -> None:
    message = refusal(tmp_path, 'rounds = 5\n[run]\nalgorithm = "ngc"\n')
    assert "rounds" in message and "under [run]" in message


def test_a_security_table_beside_top_level_settings_is_not_a_run_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'rounds = 5\n[security]\ninsecure = true\n')
    assert load_config({}, path, environ={}).rounds == 5
    assert read_security_table(path).insecure is True


@pytest.mark.parametrize(("line", "words"), [
    ('rounds = "ten"', ["rounds", "'ten'", "an integer"]),
    ("rounds = 2.5", ["rounds", "2.5", "an integer"]),
    ("lr = true", ["lr", "True", "a number"]),
    ("algorithm = 5", ["algorithm", "5", "a string"]),
])
def test_a_wrong_type_names_the_key_the_value_and_the_type(
        tmp_path: Path, line: str, words: list[str]) -> None:
    message = refusal(tmp_path, f"[run]\n{line}\n")
    for word in ["run.toml", *words]:
        assert word in message, message


@pytest.mark.parametrize(("line", "words"), [
    ("rounds = 0", ["rounds = 0", "at least 1"]),
    ("lr = -0.1", ["lr = -0.1", "positive"]),
    ("momentum = 1.0", ["momentum = 1.0", "in [0, 1)"]),
    ("lr-decay = 1.5", ["lr-decay = 1.5", "in (0, 1]"]),
    ("alpha = 2", ["alpha = 2.0", "in [0, 1]"]),
    ('device = "tpu"', ["device = 'tpu'", "auto, cpu, cuda"]),
])
def test_a_value_out_of_range_names_the_key_the_value_and_the_range(
        tmp_path: Path, line: str, words: list[str]) -> None:
    message = refusal(tmp_path, f"[run]\n{line}\n")
    for word in ["run.toml", *words]:
        assert word in message, message


def test_an_unknown_name_lists_the_registry(tmp_path: Path) -> None:
    message = refusal(tmp_path, '[run]\nalgorithm = "cgaa"\n')
    assert "'cgaa'" in message and "did you mean 'cga'?" in message and "compngc" in message


def test_environment_values_are_checked_where_they_were_written() -> None:
    with pytest.raises(ConfigError, match=r"CROSSGRAD_GAMMA = 0\.0 is out of range.*\(0, 1\]"):
        load({}, environ={"CROSSGRAD_GAMMA": "0"})


def test_flags_are_checked_against_the_same_ranges() -> None:
    assert set(RANGES) <= {f for f in RunConfig.__dataclass_fields__}
    with pytest.raises(ConfigError, match=r"--batch-size must be at least 1; got 0"):
        load({"batch_size": 0}, environ={})


@pytest.mark.parametrize(("text", "words"), [
    ('[security]\ntoken-files = "x"\n', ["'token-files'", "did you mean 'token_file'?", "cert"]),
    ("[security]\ninsecure = 1\n", ["insecure", "true or false", "got 1"]),
    ("[security]\nca = 5\n", ["ca", "a string", "got 5"]),
    ("security = 5\n", ["security", "a table", "got 5"]),
])
def test_the_security_table_refuses_with_the_key_and_what_is_allowed(
        tmp_path: Path, text: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        read_security_table(write(tmp_path, text))
    for word in ["run.toml", *words]:
        assert word in str(info.value), str(info.value)
