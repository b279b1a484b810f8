"""Per-channel statistics for the calibrated KV types (``q4_0_cal``, ``kv/kv_types.py``).

Once, when the cache is made, a fixed text goes through the model into a throwaway
fp32 cache; each layer's keys and values then give, per head and channel, their mean
(the offset every token shares) and spread (standard deviation). The calibrated
cache stores ``(x - mean) / spread`` and undoes it on reading. The text mixes prose,
dialogue, code, numbers and a few languages so the statistics are not those of one
genre; it is fixed, so the same model always gets the same statistics (a cached
prefix, a restarted server and a batched or lone request all read alike).
"""

from __future__ import annotations

import torch

from cholla.kv.kv_types import ScaledKV

CALIBRATION_TEXT = """\
The river rose through the night, and by morning the lower fields were under a sheet of brown water. \
Farmers gathered at the bridge to decide what could still be saved.
"We move the cattle first," said Ana. "Then the seed, if the road holds."
def merge_sorted(a, b):
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]
In 1905 Albert Einstein published four papers: on the photoelectric effect, on Brownian motion, on special \
relativity, and on the equivalence of mass and energy, E = mc^2.
Quarterly revenue grew 12.4% to $3.81 billion, while operating costs fell by 2%; the board approved a dividend \
of 0.45 per share, payable on 15 March 2024.
Q: What is the capital of Australia? A: Canberra, not Sydney, although Sydney is the largest city.
La lluvia en Sevilla es una maravilla. Der schnelle braune Fuchs springt über den faulen Hund. 東京は日本の首都です。
SELECT name, COUNT(*) AS orders FROM customers JOIN orders USING (customer_id) GROUP BY name ORDER BY orders DESC LIMIT 10;
Photosynthesis converts light energy into chemical energy: carbon dioxide and water become glucose and oxygen \
inside the chloroplasts of plant cells.
"""

# A channel that barely varies keeps a spread of at least this fraction of its head's mean
# spread, so dividing by it cannot blow rounding noise up.
MIN_SPREAD = 0.01


def needs_calibration(layers: list[tuple]) -> bool:
    return any(isinstance(side, ScaledKV) and side.shift is not None for layer in layers for side in layer)


def fill_statistics(layers: list[tuple], probe_layers: list[tuple], num_tokens: int) -> None:
    """Set every calibrated side's shift and spread from the fp32 probe cache that holds the
    calibration text's ``num_tokens`` tokens from slot 0 on. The first token is left out: it is
    the attention sink, whose keys and values are unlike every other token's."""
    for layer, probe in zip(layers, probe_layers):
        for side, seen in zip(layer, probe):
            if not (isinstance(side, ScaledKV) and side.shift is not None):
                continue
            rows = seen.flatten(0, 1)[1:num_tokens].float()  # [tokens, kv_heads, head_dim]
            spread = rows.std(dim=0)
            floor = spread.mean(dim=-1, keepdim=True) * MIN_SPREAD + torch.finfo(torch.float32).tiny
            side.shift.copy_(rows.mean(dim=0))
            side.spread.copy_(torch.maximum(spread, floor))
