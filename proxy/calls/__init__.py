"""What an agent's call is: an HTTP or MCP call mapped to a Cedar request, and the calls refused before
that because a server could read them otherwise (ambiguity, tunnels, limits of a connection).

May import `proxy.vocabulary` and `proxy.cedar`.
"""
