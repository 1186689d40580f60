"""Assembling the core from settings: engine, recorder, gate and agent directory, started and stopped together.

Both fronts use this: `cedargate run` builds one `Runtime` and hands it to the addons and the API, and
the enforcer addon builds its own when it runs under stock mitmproxy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from proxy.agents import AgentDirectory
from proxy.config import Settings
from proxy.engine import Engine
from proxy.gate import Gate
from proxy.mapping import MappingOptions
from proxy.store import Recorder, make_engine

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    recorder: Recorder
    gate: Gate
    agents: AgentDirectory

    @classmethod
    def start(cls, settings: Settings) -> Runtime:
        """Load and validate everything, or raise; nothing half-started is left running."""
        # The state dir holds the CA key and the record: only its owner may enter.
        settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        engine = Engine(settings.policy_dir)
        recorder = Recorder(make_engine(settings.effective_database_url))
        mapping = MappingOptions(context_headers=settings.context_headers, max_body_bytes=settings.max_body_bytes)
        engine.watch(settings.policy_reload_interval)
        log.info(
            "policies loaded from %s: revision %s, %d policies",
            settings.policy_dir, engine.status.revision[:12], len(engine.snapshot.bundle.policies),
        )
        return cls(settings, engine, recorder, Gate(engine, recorder, mapping), AgentDirectory(settings.agents))

    def close(self) -> None:
        self.engine.close()
        self.recorder.close()
