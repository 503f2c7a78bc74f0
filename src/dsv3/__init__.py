"""dsv3: DeepSeek-V3 in Python. The exact model, Hugging Face checkpoints (BF16 and FP8), fast
inference on a paged latent cache, an OpenAI-compatible server, and the paper's training recipe."""

from dsv3.config import ModelConfig
from dsv3.engine.config import EngineConfig
from dsv3.engine.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "EngineConfig", "ModelConfig", "SamplingParams", "load_model"]


def load_model(path=None, dtype=None, device=None, **options):
    """The causal LM of a Hugging Face checkpoint directory, as a torch.nn.Module in eval mode:
    model(input_ids (B, T)) returns logits (B, T, vocab). path None: the embedded default model; dtype: a
    torch.dtype or "bfloat16", "float16", "float32"."""
    from dsv3.checkpoint import load_model as load

    return load(path, dtype=dtype, device=device, **options)


def __getattr__(name):
    if name == "LLM":  # imported on first use: it pulls in the tokenizer and the engine
        from dsv3.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'dsv3' has no attribute {name!r}")
