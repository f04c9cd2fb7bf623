"""The console scripts exist and their ``--help`` works."""

import importlib

import pytest

ENTRY_POINTS = ["fincryptfs.cli", "storaged.cli", "mediatord.cli"]


@pytest.mark.parametrize("module_name", ENTRY_POINTS)
def test_help_exits_zero_and_prints_usage(module_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(module_name)
    with pytest.raises(SystemExit) as excinfo:
        module.main(["--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    prog = module_name.split(".")[0]
    assert out.startswith(f"usage: {prog}")


def test_console_scripts_are_declared() -> None:
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    for module_name in ENTRY_POINTS:
        assert scripts.get(module_name.split(".")[0]) == f"{module_name}:main"
