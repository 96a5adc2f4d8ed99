"""What every command needs: the validated config and the migrated store, opened once per invocation."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tuneloop.config import Config, load_config
from tuneloop.store import Store


@dataclass
class CliState:
    """Options given before the command name (`tuneloop --config X train ...`)."""

    config_path: Path | None = None
    verbose: bool = False
    _config: Config | None = field(default=None, repr=False)
    _store: Store | None = field(default=None, repr=False)

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def use_config(self, config: Config) -> None:
        """Run the rest of this invocation with `config` (the demo's sized copy); the store stays the same."""
        self._config = config

    @property
    def store(self) -> Store:
        """The store, with the embedded tasks' datasets registered on first use."""
        if self._store is None:
            self._store = Store(self.config.resolved_database_url)
            from tuneloop.challenger_sets.embedded import ensure_embedded_datasets

            ensure_embedded_datasets(self._store, self.config.data_path, list(self.config.tasks))
        return self._store


STATE = CliState()


def configure_logging(verbose: bool) -> None:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        for noisy in ("httpx", "alembic", "transformers", "peft"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
