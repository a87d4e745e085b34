"""Send the worker of tasks.py a long task and a short one (``python send.py [SECONDS]``)."""

from __future__ import annotations

import sys

from tasks import crunch

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 90.0
crunch.delay(seconds)  # longer than two heartbeat intervals of any broker config
crunch.delay(0.1)
print(f"sent crunch({seconds}) and crunch(0.1)")
