"""Where something is recorded: decision rows, written in the background, and the audit log's hash chain;
the one writer through which a state change commits with the audit events that record it
(`store.Recorder.transact`; the kinds of event are `audit.EventKind`); and the schema's migrations
(`migrations`), which every process that opens the record applies at start.

May import `proxy.vocabulary`.
"""
