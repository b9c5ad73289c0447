"""GGUF checkpoints converted once to safetensors (`corolla convert-gguf`): a tiny Llama written as GGUF with the
`gguf` package (llama.cpp's tensor names and q/k layout) converts back to the exact same model."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla.errors import NotAModelError, UnsupportedModelError
from corolla.models.gguf import convert_gguf
from tiny_models import make_tiny

gguf = pytest.importorskip("gguf")


def _llama_cpp_qk_layout(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary pair (what its convert_hf_to_gguf.py does)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_llama_gguf(model_dir, path, name="tiny-llama"):
    """A float32 GGUF of a Llama model directory, with a small SentencePiece-style vocabulary."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"▁w{i}" for i in range(config.vocab_size - len(tokens))]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (config.vocab_size - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(config.vocab_size - 259)])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        data = tensor.numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _llama_cpp_qk_layout(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _llama_cpp_qk_layout(data, config.num_key_value_heads)
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(models_dir):
    source = make_tiny("llama", models_dir / "tiny-llama-for-gguf", seed=8)
    path = models_dir / "tiny-llama.gguf"
    if not path.is_file():
        write_llama_gguf(source, path)
    return source, path


def test_convert_gguf_cli_gives_the_same_model(tiny_gguf, tmp_path):
    source, gguf_file = tiny_gguf
    target = tmp_path / "converted"
    result = subprocess.run([sys.executable, "-m", "corolla.cli", "convert-gguf", str(gguf_file), str(target),
                             "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(target)
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".converted.converting-*"))  # no staging folder left behind

    want_model = AutoModelForCausalLM.from_pretrained(source).eval()
    got_model = AutoModelForCausalLM.from_pretrained(target).eval()
    ids = torch.randint(3, 320, (2, 10))
    with torch.no_grad():
        assert (got_model(ids).logits - want_model(ids).logits).abs().max() < 1e-5
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert len(tokenizer) == 320 and tokenizer.convert_ids_to_tokens(300) == "▁w41"


def test_converted_gguf_runs_split_like_transformers(tiny_gguf, tmp_path):
    from test_models import run_split

    target = convert_gguf(tiny_gguf[1], tmp_path / "converted", dtype=torch.bfloat16)
    from corolla.models.checkpoint import config_dtype, load_config

    assert config_dtype(load_config(target)) == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ids = torch.randint(3, 320, (1, 8))
    logits, _ = run_split(target, ids, [(0, 1), (1, 4)])
    with torch.no_grad():
        assert (logits - reference(ids).logits).abs().max() < 1e-4


def test_convert_gguf_rejects_what_is_not_a_gguf_of_a_served_family(tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"not a gguf file")
    with pytest.raises(NotAModelError, match="not a GGUF file"):
        convert_gguf(not_gguf, tmp_path / "out")
    with pytest.raises(NotAModelError, match="is not a file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    mamba = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(mamba), "mamba")
    writer.add_name("tiny-mamba")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_context_length(16)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported; supported: bloom"):
        convert_gguf(mamba, tmp_path / "out")
    assert not (tmp_path / "out").exists()
