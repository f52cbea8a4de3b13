"""Integration tests: the service against a real RabbitMQ (store: --mongodb or --mongodb-url)."""
