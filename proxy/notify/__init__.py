"""Telling humans about override requests: webhook, Slack and email notifications, delivered from a
durable outbox read from the audit log, off the request path.

- `notices`: what a notification says (`Notice`), worked out from an audit row and its request, and
  which channels it goes to (`route`).
- `outbox`: the tables of what is owed (a cursor into the audit log, one row per event and channel,
  each channel's health) and the sweep's lease.
- `notifier`: the background sweep (`Notifier.sweep`): fan-out, delivery, retries with back-off.
- `channels`: what a channel is and how a try fails; `webhook`, `slack`, `mail`: the three channels.

May import `record`, `settings`, `oversight` and the packages beneath them (`observe` for its counters).
Only the composition of the jobs (`proxy.runtime`), the API's /status and the commands import it; nothing
in it decides a call or moves a request.
"""
