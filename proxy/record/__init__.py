"""Where something is recorded: decision rows, written in the background, the audit log's hash chain,
and the schema's migrations (`migrations`), which every process that opens the record applies at start.

May import `proxy.vocabulary`.
"""
