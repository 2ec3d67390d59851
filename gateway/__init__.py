"""EscalationComms: a pluggable multi-transport notification gateway for support escalations."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("escalation-comms")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
