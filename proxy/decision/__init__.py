"""Where a call gets decided: the gate maps a call, evaluates it and records the decision; and what an
upstream's failure means for a forwarded call.

May import `proxy.vocabulary`, `proxy.record`, `proxy.cedar` and `proxy.calls`.
"""
