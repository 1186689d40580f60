"""The mitmproxy options cedargate's addons share, and reading settings from them."""

from __future__ import annotations

from typing import Optional

from mitmproxy import ctx, exceptions

from proxy.settings.config import ConfigError, Settings, load_settings


def add_options(loader) -> None:
    # Declared by every cedargate addon; mitmproxy accepts a repeat with the same signature.
    loader.add_option("cedargate_config", Optional[str], None, "Path to cedargate's YAML config file.")
    loader.add_option("policy_dir", Optional[str], None, "Directory of Cedar policies, schema and entities.")
    loader.add_option("database_url", Optional[str], None, "Decision store URL (default: SQLite in the state dir).")


def settings_from_options() -> Settings:
    try:
        return load_settings(
            ctx.options.cedargate_config,
            {"policy_dir": ctx.options.policy_dir, "database_url": ctx.options.database_url},
        )
    except ConfigError as exc:
        raise exceptions.OptionsError(str(exc)) from exc
