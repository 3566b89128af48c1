"""Helpers the tests share (ports, servers, waiting, disk images): test modules import from here, never from
each other."""
