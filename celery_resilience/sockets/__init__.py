"""TCP keepalive on every Redis socket a process opens, the heal, and the audit.

:mod:`.options` (what a socket gets), :mod:`.hooks` (redis-py's connect and send, the
package's only in-place patches), :mod:`.audit` (what the kernel says).
"""
