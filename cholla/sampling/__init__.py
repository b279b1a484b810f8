"""From logits to tokens: per-request parameters, the batched sampler, stop strings."""

from cholla.sampling.params import SamplingParams
from cholla.sampling.sampler import SamplerOutput, SamplingBatch, sample
from cholla.sampling.stop import find_stop, safe_prefix_len
