#!/usr/bin/env python
"""RabbitMQ tutorial 6 ("RPC"), the server, on a kzpool lease: it answers each request on
the request's ``reply_to`` queue, with its ``correlation_id``, from inside the callback."""
import pika

import kzpool

connection = kzpool.connect()  # was: pika.BlockingConnection(...)
channel = connection.channel()

channel.queue_declare(queue="rpc_queue", durable=True, arguments={"x-queue-type": "quorum"})


def fib(n):
    if n == 0:
        return 0
    if n == 1:
        return 1
    return fib(n - 1) + fib(n - 2)


def on_request(ch, method, props, body):
    n = int(body)

    print(f" [.] fib({n})")
    response = fib(n)

    ch.basic_publish(
        exchange="",
        routing_key=props.reply_to,
        properties=pika.BasicProperties(correlation_id=props.correlation_id),
        body=str(response),
    )
    ch.basic_ack(delivery_tag=method.delivery_tag)


channel.basic_qos(prefetch_count=1)
channel.basic_consume(queue="rpc_queue", on_message_callback=on_request)

print(" [x] Awaiting RPC requests")
channel.start_consuming()
