"""The MPT model on mpt_kernels: Hugging Face-compatible config and checkpoints, KV-cache generation
past the training length, and a patch that swaps our kernels into transformers' MptForCausalLM.

    from mpt_kernels.model import MPTConfig, MPTForCausalLM
    model = MPTForCausalLM.from_pretrained("path/to/mpt-7b", dtype=torch.bfloat16)
    out = model.generate(ids, max_new_tokens=64, temperature=0)   # greedy
"""
from .config import MPTConfig, PRESETS
from .modeling import KVCache, MPTForCausalLM, MPTOutput, init_weights, torch_alibi_attention
from .hf_patch import apply_to_hf

__all__ = ["MPTConfig", "MPTForCausalLM", "MPTOutput", "KVCache", "PRESETS", "apply_to_hf", "init_weights",
           "torch_alibi_attention"]
