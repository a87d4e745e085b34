#!/usr/bin/env python
"""RabbitMQ tutorial 4 ("Routing"), the emitter, on a kzpool lease."""
import sys

import kzpool

connection = kzpool.connect()  # was: pika.BlockingConnection(...)
channel = connection.channel()

channel.exchange_declare(exchange="direct_logs", exchange_type="direct")

severity = sys.argv[1] if len(sys.argv) > 1 else "info"
message = " ".join(sys.argv[2:]) or "Hello World!"
channel.basic_publish(exchange="direct_logs", routing_key=severity, body=message)
print(f" [x] Sent {severity}:{message}")
connection.close()
