"""End-to-end tests: the service in real processes, driven over HTTP and RabbitMQ."""
