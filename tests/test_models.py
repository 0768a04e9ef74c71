import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from mismatch.model.loading import ModelNotFound, resolve_model


def test_local_folder_is_used_as_is(tiny_model):
    assert resolve_model(str(tiny_model)) == tiny_model


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(str(tmp_path))


def test_unknown_hub_id_offline_names_what_was_tried():
    with pytest.raises(ModelNotFound) as info:
        resolve_model("nobody/no-such-model")
    assert "no local folder nobody/no-such-model" in str(info.value) and "hub download failed" in str(info.value)


def test_unknown_builtin():
    with pytest.raises(ModelNotFound, match="known: builtin:smollm2-135m"):
        resolve_model("builtin:gpt5")


@pytest.mark.slow  # converts the 135M-parameter GGUF (~1 min here)
def test_builtin_smollm2_is_built_from_the_packaged_gguf_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MISMATCH_HOME", str(tmp_path))
    folder = resolve_model("builtin:smollm2-135m")
    assert folder == tmp_path / "models" / "smollm2-135m"
    assert (folder / "model.safetensors").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("builtin:smollm2-135m") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
