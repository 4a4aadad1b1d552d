"""Named contexts (a server and the certificates for it), like kubectl's: ~/.config/jobctl/config.toml.

    current_context = "local"

    [contexts.local]
    target = "127.0.0.1:50051"
    ca_cert = "/home/me/.jobsvc/pki/ca.pem"
    client_cert = "/home/me/.jobsvc/pki/alice.pem"
    client_key = "/home/me/.jobsvc/pki/alice-key.pem"

Flags and JOBCTL_* variables win over the context, which wins over the built-in defaults.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEYS = ("target", "ca_cert", "client_cert", "client_key", "timeout")


class ConfigError(Exception):
    pass


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "jobctl" / "config.toml"


@dataclass(frozen=True)
class Config:
    path: Path
    current: str | None
    contexts: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, path: Path | None = None) -> Config:
        path = path or config_path()
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls(path, None, {})
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from None
        import tomllib  # only when there is a file: most runs have none, and startup time counts

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
        contexts = data.get("contexts", {})
        if not isinstance(contexts, dict) or not all(isinstance(v, dict) for v in contexts.values()):
            raise ConfigError(f"{path}: [contexts.NAME] tables expected")
        for name, ctx in contexts.items():
            unknown = set(ctx) - set(KEYS)
            if unknown:
                raise ConfigError(f"{path}: context {name!r} has unknown keys: {', '.join(sorted(unknown))}")
            for key, value in ctx.items():
                if key == "timeout":
                    ok = isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool))
                    want = 'a number of seconds or a duration such as "90s"'
                else:
                    ok, want = isinstance(value, str) and value != "", "a non-empty string"
                if not ok:
                    raise ConfigError(f"{path}: context {name!r}: {key} must be {want}, got {value!r}")
        current = data.get("current_context")
        if current is not None and not isinstance(current, str):
            raise ConfigError(f"{path}: current_context must be a string (a context's name), got {current!r}")
        return cls(path, current, contexts)

    def context(self, name: str) -> dict[str, Any]:
        try:
            return self.contexts[name]
        except KeyError:
            known = ", ".join(sorted(self.contexts)) or "none"
            raise ConfigError(f"no context {name!r} in {self.path} (known: {known})") from None

    def use(self, name: str) -> None:
        """Make name the current context, editing only the current_context line of the file."""
        self.context(name)
        text = self.path.read_text()
        line = f'current_context = "{name}"'
        if re.search(r"(?m)^current_context\s*=.*$", text):
            text = re.sub(r"(?m)^current_context\s*=.*$", line, text, count=1)
        else:
            text = line + "\n" + text
        self.path.write_text(text)
