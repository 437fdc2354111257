"""parallax-attention: softmax attention plus a learned covariance correction.

    o_i = sum_j p_ij (1 + tbar_i - t_ij) v_j = vbar_i - Cov_p(v, k) r_i

with p = softmax(scale * q.k), t = r.k and tbar = sum_j p_ij t_ij.
"""

__version__ = "0.1.0"

from .ops import parallax_attn, parallax_attn_varlen, parallax_attn_with_kvcache  # noqa: E402

# Register model_type "parallax_qwen3" with transformers' Auto classes once they load (no-op
# without transformers; does not import it).
from .models.registration import install as _install_hf_registration  # noqa: E402

_install_hf_registration()

__all__ = ["__version__", "parallax_attn", "parallax_attn_varlen", "parallax_attn_with_kvcache"]
