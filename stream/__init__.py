"""breathcast.stream: the streaming daemon, the wire protocol, the Python client, replay and recording.

May import breathcast (core), breathcast.engine and breathcast.calibration. docs/protocol.md is the wire contract.

Modules: ``protocol`` (message encoding and checks), ``config`` (TOML + flags -> frozen dataclasses), ``window``
(rolling 448-sample window and the input fail-safe rules), ``forecast`` (latency compensation), ``targets`` (target
points without the whole field), ``field_coefficients`` (fields without bytes: the polynomial shipped once, the field
made from the per-frame state), ``shm_ring`` (the same-host field ring file), ``recording`` (the session log), ``plans`` (planning CTs), ``daemon``
(``breathcast serve``), ``client`` (a Python client), ``replay`` (trace sources and pacing), ``demo`` (the streaming
demo), ``cli`` (``serve``, ``replay``, ``listen``, ``keys``, ``stream-demo``).
"""
