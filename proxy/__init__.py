"""cedargate's core: plain Python on plain data, knowing nothing of mitmproxy or FastAPI."""
