"""A wire-compatible xenstore daemon: dom0 clients on a unix socket, guests on their ring page.

Modules: core (request handling), tree, perms, paths, watches, transactions, quotas, domains, connection
(protocol state), daemon (selectors loop, socket transport), ring (ring transport, both ends),
ring_provider (how INTRODUCE maps a page), client, cli (`xenpv xs`), bench (`xenpv bench xenstore`),
echo (the bench baseline), launch (start it as a supervised process).

Where this daemon knowingly differs from cxenstored:
- Queued-but-unsent identical watch events are not coalesced; every event is delivered.
- Within a transaction, events are coalesced per (path, kind) and fired after a successful commit.
- A transaction that accesses a node changed after it started reads the snapshot state and is doomed
  to EAGAIN (the generation rule would fail it anyway); one that would need more than its bound of
  snapshot pre-images is doomed too. Both are spurious-EAGAIN cases the protocol allows.
- No per-domain memory quota; node count x node size quotas bound a domain's store instead.
- SET_FEATURE, GET_QUOTA and SET_QUOTA are not implemented (ENOSYS for dom0, EACCES for guests).
- CONTROL understands only `print`; other commands are EINVAL.
- Failed operations inside a transaction do not doom it (cxenstored only does that on internal
  failures such as ENOMEM, which cannot happen here).
- An unexpected internal error fails the request with EIO and is logged, instead of ending the daemon.
- A guest ring whose replies pile up beyond `Quotas.output_bytes` loses further replies/events (logged);
  the outstanding-request quota is applied as back-pressure (requests stay in the ring) not as an error.
"""
