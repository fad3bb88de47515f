"""Hugging Face export / import / generation (transformers runs offline on tiny models)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from flm_lightning.checkpoint import model_from_checkpoint, save_weights_checkpoint
from flm_lightning.data.tokenizer import train_byte_level_bpe
from flm_lightning.generation import SamplingConfig, apply_repetition_penalty, generate, top_p_filter
from flm_lightning.hf.convert import export_hf, import_hf
from flm_lightning.model import FLMTransformer
from flm_lightning.objective import freelm_loss
from tests.conftest import tiny_config

VOCAB = 300
MULTIPLIERS = {
    "teleflm": dict(input_mult=2.0, output_mult=0.5, base_hidden_size=16, rope_theta=500.0),
    "flm101b": dict(output_mult=0.7, xpos_scale_base=64.0),
}


@pytest.fixture(scope="module")
def tokenizer_text():
    return train_byte_level_bpe(["The if statement selects exactly one of the suites. " * 30], VOCAB).to_str()


def _train(model, steps=20):
    torch.manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, VOCAB, (4, 17))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(4, 16)}
    for _ in range(steps):
        freelm_loss(model(batch["input_ids"]), batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
def test_export_matches_logits_and_greedy_generation(family, trained, tokenizer_text, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(family, vocab_size=VOCAB, **MULTIPLIERS[family])
    model = FLMTransformer(cfg)
    model = _train(model) if trained else model.eval()
    ckpt = tmp_path / "m.ckpt"
    save_weights_checkpoint(ckpt, cfg, model.state_dict(), tokenizer_text)
    kind = export_hf(str(ckpt), str(tmp_path / "hf"))
    assert kind == ("llama" if family == "teleflm" else "flm")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=kind == "flm").eval()
    if kind == "llama":
        assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens)[..., :VOCAB], rtol=0, atol=1e-4)
    prompt = tokens[:1, :6]
    for penalty in (1.0, 1.3):
        ours = generate(model, prompt, SamplingConfig(max_new_tokens=24, repetition_penalty=penalty))
        theirs = hf.generate(prompt, max_new_tokens=24, do_sample=False, repetition_penalty=penalty,
                             eos_token_id=None, pad_token_id=0)
        assert torch.equal(ours, theirs), penalty


def test_export_is_safetensors_only(tokenizer_text, tmp_path):
    cfg = tiny_config("flm101b", vocab_size=VOCAB)
    ckpt = tmp_path / "m.ckpt"
    save_weights_checkpoint(ckpt, cfg, FLMTransformer(cfg).state_dict(), tokenizer_text)
    export_hf(str(ckpt), str(tmp_path / "hf"))
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert tensors["tok_embeddings.weight"].shape == (VOCAB, 32)  # padding rows dropped
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_flm.FLMForCausalLM"


def _llama_dir(tmp_path, tokenizer_text, **overrides):
    torch.manual_seed(3)
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
    values.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**values))
    out = tmp_path / "llama"
    model.save_pretrained(out)
    (out / "tokenizer.json").write_text(tokenizer_text)
    return out, model.eval()


def test_import_then_export_round_trips_bit_exactly(tmp_path, tokenizer_text):
    src, llama = _llama_dir(tmp_path, tokenizer_text)
    import_hf(str(src), str(tmp_path / "imported.ckpt"))
    model, _ = model_from_checkpoint(tmp_path / "imported.ckpt")
    tokens = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[..., :VOCAB], llama(tokens).logits, rtol=0, atol=1e-4)
    export_hf(str(tmp_path / "imported.ckpt"), str(tmp_path / "again"))
    before = load_file(src / "model.safetensors")
    after = load_file(tmp_path / "again" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    c0, c1 = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "again"))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert c0[key] == c1[key], key


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flm_lightning", *args], capture_output=True, text=True)


def test_bad_inputs_exit_2(tmp_path, tokenizer_text):
    # A checkpoint of an unknown family.
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, tmp_path / "other.ckpt")
    out = _cli("export-hf", "--ckpt", str(tmp_path / "other.ckpt"), "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "not a model of a known family" in out.stderr
    # A non-empty target directory is refused without --force and kept intact.
    cfg = tiny_config("teleflm", vocab_size=VOCAB)
    save_weights_checkpoint(tmp_path / "m.ckpt", cfg, FLMTransformer(cfg).state_dict(), tokenizer_text)
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    out = _cli("export-hf", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(target))
    assert out.returncode == 2 and "--force" in out.stderr and (target / "notes.txt").read_text() == "keep me"
    assert _cli("export-hf", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(target), "--force").returncode == 0
    assert (target / "model.safetensors").is_file() and not (target / "notes.txt").exists()
    # Llama features the trainer does not support.
    for overrides, feature in ((dict(num_key_value_heads=2), "grouped-query"),
                               (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_")):
        src, _ = _llama_dir(tmp_path / feature, tokenizer_text, **overrides)
        out = _cli("import-hf", "--model", str(src), "--out", str(tmp_path / f"{feature}.ckpt"))
        assert out.returncode == 2 and feature in out.stderr and "Traceback" not in out.stderr
    # Pickled weights that need code execution are refused (weights-only loading), and nothing runs.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32,
                                                     "intermediate_size": 64, "num_hidden_layers": 2,
                                                     "num_attention_heads": 4}))
    marker = tmp_path / "code-ran"
    torch.save({"model.embed_tokens.weight": torch.zeros(VOCAB, 32), "x": _RunsCode(str(marker))},
               pickled / "pytorch_model.bin")
    out = _cli("import-hf", "--model", str(pickled), "--out", str(tmp_path / "p.ckpt"))
    assert out.returncode == 2 and "needs code execution" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and not marker.exists() and not (tmp_path / "p.ckpt").exists()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80")  # not a torch file at all
    out = _cli("import-hf", "--model", str(pickled), "--out", str(tmp_path / "p.ckpt"))
    assert out.returncode == 2 and "not a readable PyTorch weights file" in out.stderr, out.stderr


class _RunsCode:
    """Pickles as a call of os.system: what a malicious .bin holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_generate_cli(tmp_path, tokenizer_text):
    cfg = tiny_config("teleflm", vocab_size=VOCAB, max_seq_len=128)
    save_weights_checkpoint(tmp_path / "m.ckpt", cfg, _train(FLMTransformer(cfg)).state_dict(), tokenizer_text)
    args = ["generate", "--ckpt", str(tmp_path / "m.ckpt"), "--prompt", "The if statement", "--max-new-tokens", "12"]
    greedy = _cli(*args)
    assert greedy.returncode == 0, greedy.stderr
    assert greedy.stdout.startswith("The if statement")
    sampled = [_cli(*args, "--temperature", "1.0", "--top-p", "0.9", "--seed", "7").stdout for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded
    too_long = _cli(*args[:-1], "500")
    assert too_long.returncode == 2 and "max_seq_len" in too_long.stderr


def test_sampling_helpers():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    penalised = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert penalised.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    kept = top_p_filter(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), 0.8)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(torch.tensor([[9.0, 0.0, 0.0]]), 0.5)).sum() == 1
