"""`triespec bench` with the adaptive budget's next candidate patched in (not shipped):
trie calibration cells below the first edge start at the trie's own score instead of
pessimistic, and trie proposals are never of the COPYING kind. docs/benchmarks.md quotes
its runs: it helped bf16 in one run of two, and in fp32 it once ran open questions at
0.90x plain decoding, so it is not the default.

    python scripts/bench_deep_prior.py bench --model qwen2.5-coder-1.5b --dtype bfloat16 ...
"""

import sys

import triespec.budget as budget
import triespec.drafters.trie as trie
from triespec.cli import main
from triespec.tree import MODEL

_init = budget.Calibration.__init__


def _deep_prior(self, bins: int = 10, prior: float = 2.0) -> None:
    _init(self, bins, prior, trie_mean=0.0)  # the candidate was measured with a depth-1 prior of nothing
    per_kind = bins * len(self.depths)
    for c in range(len(self.drafted)):
        kind, depth_class, b = c // per_kind, (c % per_kind) // bins, c % bins
        if kind != MODEL and depth_class >= 1:  # below the first edge: the trie's score
            self.accepted[c] = prior * (b + 0.5) / bins


budget.Calibration.__init__ = _deep_prior
trie.COPY_RUN = sys.maxsize  # no COPYING cells

if __name__ == "__main__":
    sys.exit(main())
