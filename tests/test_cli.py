from __future__ import annotations

import tomllib

from stackwatch.daemon.cli import main
from stackwatch.daemon.config import Config, config_from_mapping, defaults_toml, load_config


def test_help_and_bad_usage(capsys) -> None:
    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2
    assert main([]) == 2


def test_config_defaults_roundtrip(tmp_path, capsys) -> None:
    assert main(["config", "--defaults"]) == 0
    text = capsys.readouterr().out
    parsed = tomllib.loads(text)
    assert config_from_mapping(parsed) == Config()
    # every key is documented by a comment line right above it
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#") and not lines[i - 1].startswith("["):
            assert lines[i - 1].startswith("#") or "=" in lines[i - 1], line
    assert defaults_toml() == text


def test_config_unknown_key_is_named(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[live]\nkappa_hgih = 3.0\n")
    assert main(["config", "--check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "live.kappa_hgih" in err and "Traceback" not in err
    good = tmp_path / "good.toml"
    good.write_text("[live]\nkappa_high = 2.5\n[gates.rules]\nfew_stars = 'stars < 5'\n")
    cfg = load_config(good)
    assert cfg.live.kappa_high == 2.5 and cfg.gates.rules["few_stars"] == "stars < 5"
    assert "trailed" in cfg.gates.rules  # tables merge over the defaults
    drop = tmp_path / "drop.toml"
    drop.write_text("[gates.rules]\ntrailed = ''\n")
    assert "trailed" not in load_config(drop).gates.rules
