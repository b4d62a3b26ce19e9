"""A daemon's poll loop in the test process: the features and readers `sockscope run` would
build from a configuration (features.build, service.make_reader), polled on demand.

    p = InProcessPoller({"poll": {"netns": ns.name}, "units": {"enabled": True}}, source="tcp")
    samples = p.poll()      # one poll; asserts it succeeded and `source` was up
    p.poller.poll()         # the PollStatus itself, unchecked
    p.close()
"""

from __future__ import annotations

from sockscope import config, features
from sockscope.poller import Poller, merge_needs
from sockscope.service import make_reader


class InProcessPoller:
    def __init__(self, mapping: dict, *, source: str) -> None:
        cfg = config.from_mapping(mapping)
        self.source = source
        self.feats = features.build(cfg)
        self.readers = {p: make_reader(cfg, need) for p, need in merge_needs(self.feats).items()}
        self.poller = Poller(self.feats, self.readers, 1.0)

    def poll(self):
        status = self.poller.poll()
        assert status.last_error is None and status.sources[self.source].up
        return status.samples

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
