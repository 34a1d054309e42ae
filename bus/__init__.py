"""Everything that crosses a process boundary: wire schema, codecs, sockets, Redis key names."""
