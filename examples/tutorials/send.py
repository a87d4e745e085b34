#!/usr/bin/env python
"""RabbitMQ tutorial 1 ("Hello World"), the sender, on a kzpool lease: the only change from
the pika version is where the connection comes from."""
import kzpool

connection = kzpool.connect()  # was: pika.BlockingConnection(...)
channel = connection.channel()

channel.queue_declare(queue="hello", durable=True, arguments={"x-queue-type": "quorum"})

channel.basic_publish(exchange="", routing_key="hello", body="Hello World!")
print(" [x] Sent 'Hello World!'")
connection.close()
