"""The mitmproxy options cedargate's addons share, and reading cedargate's settings from them.

Every option cedargate adds to mitmproxy's namespace starts with `cedargate_`, so none can shadow or be
taken for one of mitmproxy's (`--set cedargate_policy_dir=policies/`). Each sets the cedargate setting
of the same name on top of the `cedargate_config` file, as `cedargate run`'s flags do; unset, the file's
value (or the default) stands.
"""

from __future__ import annotations

from pathlib import Path

from mitmproxy import ctx, exceptions

from proxy.settings.config import ConfigError, Settings, load_settings

# Option -> (the setting it overrides, its type, help). Their changes rebuild what was built from settings.
SETTINGS_OPTIONS: dict[str, tuple[str, object, str]] = {
    "cedargate_policy_dir": ("policy_dir", str | None, "Directory of Cedar policies, schema and entities "
                             "(default: policy_dir in cedargate_config, else ./policies)."),
    "cedargate_state_dir": ("state_dir", str | None, "Directory of cedargate's state: the CA mitmproxy "
                            "signs with (unless confdir is set) and the SQLite record (default: state_dir "
                            "in cedargate_config, else ./.cedargate)."),
    "cedargate_database_url": ("database_url", str | None, "SQLAlchemy URL of the decision store "
                               "(default: SQLite in the state directory)."),
    "cedargate_api_host": ("api.host", str | None, "Address of the override API that reviewers use "
                           "(default: 127.0.0.1; another needs allow_non_loopback in cedargate_config)."),
    # A string, checked in configure: mitmproxy parses a script's option from `--set` when it registers
    # the script, and a value that does not parse there leaves the script unloaded, mitmdump running on.
    "cedargate_api_port": ("api.port", str | None, "Port of the override API (default: 8081; 0 = any "
                           "free port, logged at start)."),
}
CONFIG = "cedargate_config"
RELEVANT = frozenset({CONFIG, *SETTINGS_OPTIONS})


def add_options(loader) -> None:
    # Declared by every cedargate addon; mitmproxy accepts a repeat with the same signature.
    loader.add_option(CONFIG, str | None, None,
                      "Path to cedargate's YAML config file (agents, approvers, limits); the other "
                      "cedargate_ options win over it.")
    for name, (_, typespec, help_text) in SETTINGS_OPTIONS.items():
        loader.add_option(name, typespec, None, help_text)


def settings_from_options() -> Settings:
    """cedargate's settings from its config file and options, or `OptionsError` saying which to mend."""
    config = ctx.options.cedargate_config
    if config is not None and not Path(config).is_file():
        raise exceptions.OptionsError(
            f"cedargate_config: {config} is not a file; set it to the path of cedargate's YAML config "
            "(--set cedargate_config=cedargate.yaml), or leave it unset for the defaults"
        )
    for name in SETTINGS_OPTIONS:
        if getattr(ctx.options, name) == "":
            raise exceptions.OptionsError(
                f"{name} is empty; give it a value, or leave it unset for the default"
            )
    overrides = {setting: getattr(ctx.options, name) for name, (setting, _, _) in SETTINGS_OPTIONS.items()}
    port = ctx.options.cedargate_api_port
    if port is not None:
        if not (port.strip().isdigit() and int(port) <= 65535):
            raise exceptions.OptionsError(
                f"cedargate_api_port: {port!r} is not a TCP port; set it to 1-65535, or 0 for any free port"
            )
        overrides["api.port"] = int(port)
    try:
        return load_settings(config, overrides)
    except ConfigError as exc:
        set_here = [name for name in SETTINGS_OPTIONS if getattr(ctx.options, name) is not None]
        where = f" (with {', '.join(set_here)} set by option)" if set_here else ""
        raise exceptions.OptionsError(f"{exc}{where}") from exc
