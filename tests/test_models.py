import pytest
import torch

from hetlm.models import (
    FAMILIES,
    PRESETS,
    build_model,
    count_parameters,
    init_from,
    preset_parameters,
    resolve,
    scale_preset,
)
from hetlm.tokenizer import BOS_ID, EOS_ID, PAD_ID

# Parameter counts of the released checkpoints with their own vocabularies (sum of the tensors in their
# model.safetensors, a tied head counted once), as the model cards round them: OPT-350M 331M, OPT-2.7B
# 2.7B, Qwen2.5-0.5B 0.49B, Qwen2.5-7B 7.61B, SmolLM2-360M 362M.
PUBLISHED = {
    "opt-350m": (50272, 2048, 331_196_416),
    "opt-2.7b": (50272, 2048, 2_651_596_800),
    "qwen2.5-0.5b": (151936, 32768, 494_032_768),
    "qwen2.5-7b": (152064, 131072, 7_615_616_512),
    "smollm2-360m": (49152, 8192, 361_821_120),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generic_presets_build_for_every_family(family):
    torch.manual_seed(0)
    tiny = build_model("tiny", vocab_size=3000, family=family)
    assert 0.7e6 < count_parameters(tiny) < 1.3e6
    assert (tiny.config.pad_token_id, tiny.config.bos_token_id, tiny.config.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert tiny.config.vocab_size == 3000 and tiny.config.max_position_embeddings == 512
    logits = tiny(torch.tensor([[BOS_ID, 5, 6, EOS_ID]])).logits
    assert logits.shape == (1, 4, 3000)
    sizes = [preset_parameters(name, 3000, family) for name in ("tiny", "small", "base")]
    assert 3e6 < sizes[1] < 7e6 and 12e6 < sizes[2] < 28e6


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_paper_presets_match_published_sizes(name):
    vocab, positions, published = PUBLISHED[name]
    assert preset_parameters(name, vocab, max_positions=positions) == pytest.approx(published, rel=0.1)


def test_released_presets_keep_their_family():
    assert resolve("opt-350m")[1] == "opt" and resolve("smollm2-360m")[1] == "llama"
    with pytest.raises(ValueError):
        resolve("qwen2.5-0.5b", "opt")
    with pytest.raises(ValueError):
        resolve("tiny", "gpt2")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scale_preset_reaches_the_factor(family):
    base = preset_parameters("tiny", 3000, family)
    shape, n = scale_preset("tiny", 4, vocab_size=3000, family=family)
    assert shape.family == family
    assert n == preset_parameters(shape, 3000, family) and 4 * base <= n < 6 * base
    assert shape.hidden_size > PRESETS["tiny"].hidden_size and shape.num_layers > PRESETS["tiny"].num_layers


def test_scale_preset_keeps_grouped_query_attention():
    shape, _ = scale_preset("qwen2.5-0.5b", 2, vocab_size=3000)
    assert shape.num_heads % shape.num_kv_heads == 0 and shape.hidden_size % shape.num_heads == 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_init_from_loads_all_but_the_vocabulary_tensors(tmp_path, family):
    torch.manual_seed(0)
    released = build_model("tiny", vocab_size=500, family=family, max_positions=256)
    released.save_pretrained(tmp_path)
    torch.manual_seed(1)
    model = build_model("tiny", vocab_size=3000, family=family)
    report = init_from(model, tmp_path)

    embed = model.get_input_embeddings().weight
    assert embed.shape[0] == 3000 and not torch.equal(embed[:500], released.get_input_embeddings().weight)
    assert any("embed_tokens" in s for s in report.skipped)
    # OPT's learned position table is sized by max_positions: skipped for its shape; RoPE families have none.
    assert len(report.skipped) == (2 if family == "opt" else 1)
    assert len(report.loaded) == len(released.state_dict()) - 1 - len(report.skipped)  # -1: tied head
    own = model.state_dict()
    for name, tensor in released.state_dict().items():
        if name in report.loaded:
            assert torch.equal(own[name], tensor), name


def test_init_from_refuses_non_safetensors(tmp_path):
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        init_from(build_model("tiny", vocab_size=100), tmp_path)


def test_model_folders_load_with_safetensors_only(tmp_path):
    """A folder holding only a pickled checkpoint is refused, not unpickled (no pickle from untrusted paths)."""
    from hetlm.cluster.base import load_model
    from hetlm.tokenizer import build_tokenizer

    model = build_model("tiny", 40)
    model.config.save_pretrained(tmp_path)
    build_tokenizer([f"p{i}" for i in range(36)]).save_pretrained(tmp_path / "tokenizer")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        init_from(build_model("tiny", 40), tmp_path)
