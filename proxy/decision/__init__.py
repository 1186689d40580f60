"""Where a call gets decided: `decisions.decide_call` reads a call once and returns its complete
decision (each message's verdict, and what to answer once they are final); the gate maps one call,
evaluates it and records the decision; and what an upstream's failure means for a forwarded call.

May import `proxy.vocabulary`, `proxy.record`, `proxy.cedar` and `proxy.calls`.
"""
