"""breathcast.stream: the streaming daemon, the wire protocol, the Python client, replay and recording.

May import breathcast (core), breathcast.engine and breathcast.calibration. Nothing here yet: see the
streaming daemon issue.
"""
