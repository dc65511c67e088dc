"""A tiny random-weight llama-architecture GGUF, written with the ``gguf`` package.

2 layers, width 64, 4 heads, a SentencePiece-style vocabulary (``<unk>``, ``<s>``,
``</s>`` and the 256 byte tokens ``<0x00>``..``<0xFF>``), float32 weights from a seeded
NumPy generator: about 470 KB, loaded by ``llama_cpp.Llama`` in a few milliseconds.
No download, no hub.

The output projection's rows are zero for every token but the printable ASCII bytes,
so whatever the random weights favour, greedy and sampled text is plain ASCII (never
half a UTF-8 sequence, which llama-cpp-python holds back from a stream) and never
``</s>``: a generation runs until ``max_tokens`` or a stop string.

Run it to write one: ``python tests/tiny_gguf.py out.gguf``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
N_CTX = 2048
SPECIALS = ("<unk>", "<s>", "</s>")
#: The bytes a generation can produce: printable ASCII, space included.
PRINTABLE = range(0x20, 0x7F)
#: How the tests and tests/llamacpp_app.py build a ``Llama`` on the model (the same
#: settings, so the same logits).
LLAMA_SETTINGS: dict[str, Any] = {"n_ctx": N_CTX, "n_threads": 1, "seed": 1234, "verbose": False}
#: Greedy decoding: what tests compare with ``llama_cpp.Llama`` called directly.
GREEDY: dict[str, Any] = {"temperature": 0.0, "top_k": 1, "seed": 1234}


def vocabulary() -> tuple[list[str], list[int]]:
    """Token texts and their ``gguf.TokenType`` values, in id order."""
    import gguf

    tokens = list(SPECIALS) + [f"<0x{b:02X}>" for b in range(256)]
    types = [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.CONTROL)]
    types += [int(gguf.TokenType.BYTE)] * 256
    return tokens, types


def write(path: Path | str, *, seed: int = 0) -> Path:
    """Write the model to ``path`` and return it (same ``seed``, same bytes)."""
    import gguf

    path = Path(path)
    tokens, types = vocabulary()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def weights(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("llmbridge-tiny")
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(10000.0)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    # NumPy shapes are GGML's reversed: (rows, columns) = ne[1], ne[0].
    writer.add_tensor("token_embd.weight", weights(n_vocab, N_EMBD, scale=1.0))
    for i in range(N_LAYER):
        block = f"blk.{i}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{block}.{name}.weight", weights(N_EMBD, N_EMBD))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{block}.ffn_gate.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(f"{block}.ffn_up.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(f"{block}.ffn_down.weight", weights(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    output = weights(n_vocab, N_EMBD, scale=1.0)
    allowed = np.zeros(n_vocab, dtype=bool)
    allowed[[len(SPECIALS) + b for b in PRINTABLE]] = True
    output[~allowed] = 0.0  # a zero logit never beats ~95 random ones: see the docstring
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load(path: Path | str) -> Any:
    """A ``llama_cpp.Llama`` on the model at ``path``, with :data:`LLAMA_SETTINGS`."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), **LLAMA_SETTINGS)


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf"))
