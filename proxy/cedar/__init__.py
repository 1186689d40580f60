"""Cedar: the description of a request's context, the policy bundle (policies, schema, entities, the
action manifest), escalation annotations, entities no file lists, and the engine that evaluates a Cedar
request against a sliced policy set.

May import `proxy.vocabulary`.
"""
