"""The standalone status worker: consumes orchestrator and IAM events into the flow store."""
