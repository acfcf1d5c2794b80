"""RabbitMQ messaging of the stack: message schemas, queue topology, connections."""
