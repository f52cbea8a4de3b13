"""Integration tests: the service against a real RabbitMQ (MongoDB: mongomock or --mongodb-url)."""
