#!/usr/bin/env python
"""RabbitMQ tutorial 3 ("Publish/Subscribe"), a subscriber, on a kzpool lease: a
server-named exclusive queue bound to a fanout exchange."""
import kzpool

connection = kzpool.connect()  # was: pika.BlockingConnection(...)
channel = connection.channel()

channel.exchange_declare(exchange="logs", exchange_type="fanout")

result = channel.queue_declare(queue="", exclusive=True)
queue_name = result.method.queue

channel.queue_bind(exchange="logs", queue=queue_name)

print(" [*] Waiting for logs. To exit press CTRL+C")


def callback(ch, method, properties, body):
    print(f" [x] {body.decode()}")


channel.basic_consume(queue=queue_name, on_message_callback=callback, auto_ack=True)

channel.start_consuming()
