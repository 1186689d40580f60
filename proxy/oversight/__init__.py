"""Where an override changes state: opening a request for an escalated call, votes, holding the call,
release once granted, expiry; and the limits that stop one agent flooding reviewers.

May import every core package but `cli`.
"""
