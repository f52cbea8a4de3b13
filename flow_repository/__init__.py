"""Flow Repository: stores, validates, starts and stops OIH integration flows."""
