"""rbf-lite: attention and classification by Euclidean distance instead of dot products."""
from .rbf import rbf_attention, rbf_attention_reference, rbf_decode, triton_available

__version__ = "0.1.0"
__all__ = ["rbf_attention", "rbf_attention_reference", "rbf_decode", "triton_available", "__version__"]
