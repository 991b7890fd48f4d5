"""Turn a Llama / Mistral / Qwen2 checkpoint into a Multi-head Latent Attention (hf_mla) model.

One module per idea, each a plain function API under the `hf-mla` command line: `sources` (reading checkpoints),
`data` (text), `rope` (which frequencies keep RoPE), `factorize` (low-rank latent), `attention` (one layer into MLA
form), `calibrate` (layer-by-layer statistics), `convert` (the whole model), `evaluate`, `export` (writing).
"""

from .convert import convert, plan_attention
from .evaluate import perplexity
from .sources import SourceError, embedded_default_source, open_source


__all__ = ["convert", "plan_attention", "perplexity", "open_source", "embedded_default_source", "SourceError"]
