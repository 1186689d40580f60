"""Where an override changes state: opening a request for an escalated call, votes, holding the call,
release once granted, expiry; and the limits that stop one agent flooding reviewers.

- `workflow`: the one owner of every state change (`OverrideWorkflow`: open, vote, release, expire),
  each committed with its audit event in one transaction; the API's routes and the held call call it.
- `jobs`: the workflow's background jobs (expiry, wake-ups), started and stopped by whoever composes the program.
- `wakeups`: how a decision made by another process on the same database wakes this process's holds.
- `held_calls`: holding an escalated call until the request is decided, and answering it (`Oversight`).
- `changes`: approve with changes: a call's editable values, checking a change, the changed call.
- `overrides`: the override tables, statuses and ballots, the fingerprint, plain operations on rows.
- `holds`: where held calls wait to be woken. `limits`: what stops one agent flooding reviewers.

May import every core package but `cli`.
"""
