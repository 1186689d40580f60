"""Where something is recorded: decision rows, written in the background, and the audit log's hash chain.

May import `proxy.vocabulary`.
"""
