"""Where something is recorded: decision rows, written in the background, and the audit log's hash chain;
and the one writer through which a state change commits with the audit events that record it
(`store.Recorder.transact`). The kinds of event are `audit.EventKind`.

May import `proxy.vocabulary`.
"""
