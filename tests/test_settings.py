"""Settings refuse values that could only fail later, naming the variable."""

from __future__ import annotations

import pytest

from orbital.errors import ConfigError
from orbital.settings import Settings


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("lease_s", "nan", "finite"),
        ("job_timeout_s", "inf", "finite"),
        ("lease_s", "0", "must be positive"),
        ("lease_s", "-5", "must be positive"),
        ("max_attempts", "zero", "invalid literal"),
        ("prefix", "a b:*", "expected 1-64 letters"),
        ("prefix", "", "expected 1-64 letters"),
        ("redis_url", "garbage", "redis://"),
        ("nightly_cron", "at two", "not a cron expression"),
    ],
)
def test_bad_setting_is_refused_by_name(name: str, value: str, message: str) -> None:
    """Each refused value names ORBITAL_<NAME>, the value and the rule."""
    with pytest.raises(ConfigError) as err:
        Settings.from_env(environ={f"ORBITAL_{name.upper()}": value})
    assert f"ORBITAL_{name.upper()}" in str(err.value)
    assert message in str(err.value)


def test_zero_stagger_is_allowed() -> None:
    """No gap between nightly enqueues is a valid choice (the demo uses it)."""
    assert Settings.from_env(environ={"ORBITAL_NIGHTLY_STAGGER_S": "0"}).nightly_stagger_s == 0


def test_config_file_with_unknown_keys_is_refused(tmp_path: pytest.TempPathFactory) -> None:
    """A typo in the TOML file is an error, not a silently ignored key."""
    path = tmp_path / "orbital.toml"  # type: ignore[operator]
    path.write_text('redis_urll = "redis://x"\n')
    with pytest.raises(ConfigError, match="unknown settings redis_urll"):
        Settings.from_env(environ={"ORBITAL_CONFIG": str(path)})
