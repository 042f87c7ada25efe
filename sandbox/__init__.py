"""The trust boundary: programs that run inside isolated processes, run by path.

They import only the standard library and torch (and triton where a candidate uses it),
never evo. evo imports only `wire` from here, for the message framing.
"""
