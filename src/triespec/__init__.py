"""triespec: lossless speculative decoding for Hugging Face causal language models."""

from .drafters import MergedDrafter, ModelDrafter, NoDraft, Trie, TrieDrafter
from .engine import Engine, Generation, Stats
from .tree import TokenTree
from .verify import Verdict, verify_greedy

__version__ = "0.1.0"
__all__ = ["Engine", "Generation", "Stats", "TokenTree", "Trie", "TrieDrafter", "NoDraft", "ModelDrafter", "MergedDrafter", "Verdict", "verify_greedy"]
