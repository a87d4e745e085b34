#!/usr/bin/env python
"""RabbitMQ tutorial 2 ("Work queues"), a worker, on a kzpool lease: fair dispatch with a
prefetch of one, and a manual ack once the work is done."""
import time

import kzpool

connection = kzpool.connect()  # was: pika.BlockingConnection(...)
channel = connection.channel()

channel.queue_declare(queue="task_queue", durable=True, arguments={"x-queue-type": "quorum"})
print(" [*] Waiting for messages. To exit press CTRL+C")


def callback(ch, method, properties, body):
    print(f" [x] Received {body.decode()}")
    time.sleep(body.count(b"."))
    print(f" [x] Done {body.decode()}")
    ch.basic_ack(delivery_tag=method.delivery_tag)


channel.basic_qos(prefetch_count=1)
channel.basic_consume(queue="task_queue", on_message_callback=callback)

channel.start_consuming()
