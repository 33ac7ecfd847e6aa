"""megaret: retention (RetNet) and block-recurrent language models on Megatron-style parallelism."""

import warnings

# megatron-core warns on import that TransformerEngine/Apex are absent; megaret uses its
# local fallbacks on purpose, so keep every log readable.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")
warnings.filterwarnings("ignore", message="Apex is not installed")

__version__ = "0.1.0"
