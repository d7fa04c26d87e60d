"""Settings precedence and errors that name the setting."""

from __future__ import annotations

import subprocess

import pytest

from pipeline.settings import Settings, SettingsError, load_settings
from tests.helpers import STREAMFIT


def test_precedence_flags_over_env_over_yaml_over_defaults(tmp_path, monkeypatch):
    config = tmp_path / "streamfit.yaml"
    config.write_text("ps_port: 6000\nserve_port: 9000\nworkers: 3\n")
    monkeypatch.setenv("STREAMFIT_CONFIG", str(config))
    monkeypatch.setenv("STREAMFIT_SERVE_PORT", "9100")
    settings = load_settings(workers=4, model=None)
    assert (settings.ps_port, settings.serve_port, settings.workers, settings.model) == (6000, 9100, 4, "higgs")


def test_bad_value_names_the_setting(monkeypatch):
    monkeypatch.setenv("STREAMFIT_PS_PORT", "seventy")
    with pytest.raises(SettingsError, match="ps_port.*STREAMFIT_PS_PORT"):
        load_settings()


def test_unknown_environment_setting_is_refused(monkeypatch):
    monkeypatch.setenv("STREAMFIT_KAFKA_BOOTSTAP", "x:1")
    with pytest.raises(SettingsError, match="STREAMFIT_KAFKA_BOOTSTAP"):
        load_settings()


def test_bootstrap_shape_and_yaml_unknown_key(tmp_path, monkeypatch):
    with pytest.raises(SettingsError, match="kafka_bootstrap"):
        load_settings(kafka_bootstrap="nohost")
    config = tmp_path / "c.yaml"
    config.write_text("not_a_setting: 1\n")
    monkeypatch.setenv("STREAMFIT_CONFIG", str(config))
    with pytest.raises(SettingsError, match="not_a_setting"):
        load_settings()


def test_cli_reports_bad_setting_without_traceback(cli_env):
    done = subprocess.run(
        [*STREAMFIT, "topics"],
        env={**cli_env, "STREAMFIT_EVENTS_PARTITIONS": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "events_partitions" in done.stderr and "Traceback" not in done.stderr


def test_checkpoint_directories_default_under_home_and_follow_their_settings(tmp_path):
    settings = load_settings(home=tmp_path)
    assert settings.predict_checkpoint_dir == str(tmp_path / "checkpoints" / "inference")
    assert settings.train_checkpoint_dir == str(tmp_path / "checkpoints" / "training")
    moved = load_settings(home=tmp_path, predict_checkpoint="/ck/p", train_checkpoint="/ck/t")
    assert (moved.predict_checkpoint_dir, moved.train_checkpoint_dir) == ("/ck/p", "/ck/t")


def test_cli_help_shows_the_settings_defaults(capsys):
    from pipeline.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    defaults = Settings.model_fields
    for name in ("serve_host", "serve_port", "max_batch_size", "max_batch_wait_ms"):
        assert f"(default {defaults[name].default})" in shown, name
