"""The control socket (docs/CONTRACT.md): one JSON object a line in each direction.

    {"cmd": "pause", "scope": "tenant", "id": "acme"}  ->  {"ok": true, ...}
                                                       or  {"ok": false, "error": "..."}

`protocol` (pure: a line in, a request or a bad request out; replies out), `commands` (what a
request does to the running daemon), `reload` (the `reload` command, SIGHUP and the switch
between two pipelines), `server` (the Unix socket, peer credentials, connections, eviction) and
`client` (`sendd ctl`).
"""
