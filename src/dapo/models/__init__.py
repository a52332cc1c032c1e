"""Models: a compact native Llama / Qwen2 / Qwen3 decoder, HF checkpoint I/O, tokenizers.

``tiny`` (the built-in default policy) is imported on its own: ``from dapo.models.tiny import ...``, and so
is the policy a config names: ``from dapo.models.load import load_policy``.
"""

from dapo.models.config import SUPPORTED_ARCHITECTURES, ModelArgs, RopeScaling, UnsupportedModelError
from dapo.models.hub import HFCausalLM, load_pretrained, resolve_dtype, save_pretrained
from dapo.models.tokenizer import apply_chat_template, load_tokenizer, pad_token_id, stop_token_ids
from dapo.models.transformer import CausalLM, KVCache, forward_responses_unshared

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "HFCausalLM",
    "KVCache",
    "ModelArgs",
    "RopeScaling",
    "UnsupportedModelError",
    "apply_chat_template",
    "forward_responses_unshared",
    "load_pretrained",
    "load_tokenizer",
    "pad_token_id",
    "resolve_dtype",
    "save_pretrained",
    "stop_token_ids",
]
