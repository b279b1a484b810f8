"""Speculative decoding: draft several tokens cheaply, verify them in one forward pass.

``config.py`` (the method and K, checked), ``ngram.py`` (prompt lookup: drafts
from the sequence's own tokens), ``speculator.py`` (who speculates this step,
and the back-off), ``tree.py`` (several candidates as one token tree, verified
with a tree attention mask), ``verify.py`` (greedy acceptance), ``draft_model.py`` (a
second model drafts, batched, on its own KV cache), ``layer_skip.py`` (the model
drafts for itself without some layers, in its own KV cache). The scheduler asks the
speculator for drafts, the runner scores every drafted position in the packed
batch, and the engine keeps the accepted run and rolls back the rest.
"""
