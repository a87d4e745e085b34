"""What the master decides for a connection worker before it forks it."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.config import Broker
from ..common.settings import PoolSettings


@dataclass(frozen=True)
class WorkerSpec:
    id: str  # "c1": the connection row's key
    broker: Broker
    index: int  # 1..connections_per_broker
    settings: PoolSettings

    def title(self, primary: bool) -> str:
        """The process title: never a password."""
        roles = [self.broker.zone] + (["primary"] if primary else [])
        suffix = f" #{self.index}" if self.settings.connections_per_broker > 1 else ""
        return f"kzpool: connection {self.broker.uri.short}{suffix} [{', '.join(roles)}]"
