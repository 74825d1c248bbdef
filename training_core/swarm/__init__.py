"""Swarm training: many volunteers' peers train one model together over hivemind.

`manifest` describes a swarm (TOML file or a short invite string) and needs nothing heavy;
the peer code that imports hivemind and torch lives in its own modules.
"""
