"""Discovery: a Kademlia DHT over UDP (BEP 5 style) whose node ids are Ed25519 identities.

Pure modules: :mod:`.codec` (datagrams), :mod:`.records` (signed peer records), :mod:`.routing` (k-buckets),
:mod:`.lookup` (iterative lookup), :mod:`.tokens` (announce tokens), :mod:`.peerstore` (announced values),
:mod:`.ratelimit` (per-source token buckets). The trio UDP edge is :mod:`.node`; daemons call
:func:`fincryptfs.dht.node.run_dht`. See docs/dht.md.
"""
