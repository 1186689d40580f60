"""The HTTP API humans use: health and status now, override review and grants next."""
