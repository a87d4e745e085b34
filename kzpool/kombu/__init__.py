"""kzpool.kombu: a kombu transport whose channels are leases of the pool (``kzpool://``).

    import kzpool.kombu                       # registers the URL scheme kzpool
    app.conf.broker_url = "kzpool://"         # Celery: the pool on this machine

or, without the import, ``kombu.Connection(transport="kzpool.kombu:Transport")`` (Celery:
``broker_transport = "kzpool.kombu:Transport"``).  Needs ``pip install 'kzpool[celery]'``.
"""

from __future__ import annotations

try:
    from kombu import transport as _kombu_transport
except ImportError as exc:  # the extra is not installed
    raise ImportError("kzpool.kombu needs kombu: pip install 'kzpool[celery]'") from exc

from .channel import Channel
from .connection import Connection
from .errors import Forked, MessageNacked
from .transport import Transport

_kombu_transport.TRANSPORT_ALIASES["kzpool"] = "kzpool.kombu:Transport"

__all__ = ["Channel", "Connection", "Forked", "MessageNacked", "Transport"]
