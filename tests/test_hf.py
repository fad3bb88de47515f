"""Hugging Face export / import / generation (transformers runs offline on tiny models)."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from flm_lightning.checkpoint import model_from_checkpoint, save_weights_checkpoint
from flm_lightning.data.tokenizer import train_byte_level_bpe
from flm_lightning.errors import ConfigError
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
        theirs = hf.generate(
            prompt, max_new_tokens=24, do_sample=False, repetition_penalty=penalty, eos_token_id=None, pad_token_id=0
        )
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
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
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
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
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
    for overrides, feature in (
        (dict(num_key_value_heads=2), "grouped-query"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_"),
    ):
        src, _ = _llama_dir(tmp_path / feature, tokenizer_text, **overrides)
        out = _cli("import-hf", "--model", str(src), "--out", str(tmp_path / f"{feature}.ckpt"))
        assert out.returncode == 2 and feature in out.stderr and "Traceback" not in out.stderr
    # Pickled weights that need code execution are refused (weights-only loading), and nothing runs.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": VOCAB,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
            }
        )
    )
    marker = tmp_path / "code-ran"
    torch.save(
        {"model.embed_tokens.weight": torch.zeros(VOCAB, 32), "x": _RunsCode(str(marker))},
        pickled / "pytorch_model.bin",
    )
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


# ---- the Tele-FLM release format -------------------------------------------------------------------
MUP = dict(use_mup=True, input_mult=2.0, output_mult=0.5, mup_scale_factor=4.0)  # hidden 64 -> base width 16
TELEFLM_VOCAB = 256


def _teleflm_dir(root, layout, tokenizer_text=None, **config_overrides):
    """A tiny folder in the Tele-FLM release format (Llama tensors + μP keys), built from transformers'
    LlamaForCausalLM; returns (folder, the Llama model) for the reference computation."""
    torch.manual_seed(5)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=TELEFLM_VOCAB,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            initializer_range=0.1,
        )
    ).eval()
    out = root / f"teleflm-{layout}"
    llama.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="TeleFLM", architectures=["TeleFLMForCausalLM"], **MUP)
    config.update(config_overrides)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in llama.state_dict().items()}
    if layout == "bin":  # as older releases ship: pickled, with transformers < 4.31's rotary buffers
        (out / "model.safetensors").unlink()
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.int64).float() / 16)
        state.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq for i in range(2)})
        torch.save(state, out / "pytorch_model.bin")
    elif layout == "sharded":
        (out / "model.safetensors").unlink()
        names = sorted(state)
        shards = {
            "model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2 :],
        }
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys}, out / shard, metadata={"format": "pt"})
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer_text is not None:
        (out / "tokenizer.json").write_text(tokenizer_text)
    return out, llama


def _teleflm_reference(llama, tokens, input_mult=2.0, output_mult=0.5, mup_scale_factor=4.0):
    """What Tele-FLM's μP means (vLLM's TeleFLM model): Llama with the embeddings x input_mult and the
    logits x output_mult / mup_scale_factor."""
    with torch.no_grad():
        h = llama.model.embed_tokens(tokens) * input_mult
        return llama(inputs_embeds=h).logits * (output_mult / mup_scale_factor)


@pytest.mark.parametrize("layout", ["safetensors", "bin", "sharded"])
def test_import_teleflm_keeps_mup_and_matches_the_reference(layout, tmp_path):
    src, llama = _teleflm_dir(tmp_path, layout)
    arch = import_hf(str(src), str(tmp_path / "imported.ckpt"))
    assert (arch.input_mult, arch.output_mult, arch.base_hidden_size, arch.width_mult) == (2.0, 0.5, 16, 4.0)
    model, _ = model_from_checkpoint(tmp_path / "imported.ckpt")
    tokens = torch.randint(0, TELEFLM_VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = _teleflm_reference(llama, tokens)
    with torch.no_grad():
        ours = model(tokens)[..., :TELEFLM_VOCAB]
    diff = (ours - reference).abs().max().item()
    print(f"teleflm {layout}: max |logit diff| = {diff:.3g}, logit std {reference.std().item():.3g}")
    assert diff <= 1e-5
    # Dropping the multipliers (what a plain Llama import did) is far off: the check has teeth.
    assert (llama(tokens).logits - reference).abs().max().item() > 0.5


def test_import_refuses_what_it_cannot_honour(tmp_path):
    # A Llama config carrying μP keys: Llama has no multipliers, so the weights would compute something else.
    src, _ = _teleflm_dir(tmp_path / "a", "safetensors", model_type="llama", architectures=["LlamaForCausalLM"])
    cases = [(src, "'use_mup' = True has no meaning for model_type 'llama'")]
    # A key the converter does not know.
    src, _ = _teleflm_dir(tmp_path / "b", "safetensors", apply_residual_connection_post_layernorm=True)
    cases.append((src, "key 'apply_residual_connection_post_layernorm' = True is not understood"))
    # A μP scale the trainer's width_mult cannot reproduce exactly (64 / 3 is not a whole width).
    src, _ = _teleflm_dir(tmp_path / "c", "safetensors", mup_scale_factor=3.0)
    cases.append((src, "mup_scale_factor 3.0 is not hidden_size 64 divided by a whole base width"))
    # use_mup without its multipliers.
    src, _ = _teleflm_dir(tmp_path / "d", "safetensors")
    config = json.loads((src / "config.json").read_text())
    del config["output_mult"]
    (src / "config.json").write_text(json.dumps(config))
    cases.append((src, "use_mup is true but the key 'output_mult' is missing"))
    # An unknown model type, and weights in no supported layout: both say what is supported.
    src, _ = _teleflm_dir(tmp_path / "e", "safetensors", model_type="flm101b_release")
    cases.append((src, "supported layouts: llama (Llama tensor names), TeleFLM"))
    src, _ = _teleflm_dir(tmp_path / "f", "safetensors")
    (src / "model.safetensors").rename(src / "consolidated.00.pth")
    cases.append((src, "holds no weights in a supported layout (model.safetensors; model.safetensors.index.json"))
    for i, (folder, message) in enumerate(cases):
        out = _cli("import-hf", "--model", str(folder), "--out", str(tmp_path / f"{i}.ckpt"))
        assert out.returncode == 2 and message in out.stderr, (message, out.stderr)
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
        assert not (tmp_path / f"{i}.ckpt").exists()


def test_teleflm_round_trips_are_bit_exact(tmp_path, tokenizer_text):
    # Tele-FLM -> trainer -> Tele-FLM: the same tensors, bit for bit, and the same config (multipliers included).
    src, llama = _teleflm_dir(tmp_path, "safetensors", tokenizer_text)
    import_hf(str(src), str(tmp_path / "imported.ckpt"))
    assert (
        _cli(
            "export-hf",
            "--ckpt",
            str(tmp_path / "imported.ckpt"),
            "--out",
            str(tmp_path / "again"),
            "--format",
            "teleflm",
        ).returncode
        == 0
    )
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    c0, c1 = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "again"))
    assert c1["model_type"] == "TeleFLM" and c1["architectures"] == ["TeleFLMForCausalLM"]
    for key in (
        "use_mup",
        "input_mult",
        "output_mult",
        "mup_scale_factor",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "hidden_act",
    ):
        assert c0[key] == c1[key], key
    # The export loads in transformers (its own TeleFLM modeling file) and computes the reference.
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True).eval()
    assert type(hf).__name__ == "TeleFLMForCausalLM"
    tokens = torch.randint(0, TELEFLM_VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(tokens).logits - _teleflm_reference(llama, tokens)).abs().max().item()
    print(f"exported TeleFLM under transformers: max |logit diff| = {diff:.3g}")
    assert diff <= 1e-5

    # Trainer -> Tele-FLM -> trainer: a trained μP model comes back with the same weights, multipliers
    # and base width, so continued training (μP learning rates per role) is the same run.
    cfg = tiny_config("teleflm", vocab_size=VOCAB, **MULTIPLIERS["teleflm"])
    model = _train(FLMTransformer(cfg))
    state = model.state_dict()
    for name in ("tok_embeddings.weight", "output.weight"):  # rows past the vocabulary are not exported
        state[name][VOCAB:] = 0
    save_weights_checkpoint(tmp_path / "trained.ckpt", cfg, state, tokenizer_text)
    assert export_hf(str(tmp_path / "trained.ckpt"), str(tmp_path / "tf"), format="teleflm") == "teleflm"
    config = json.loads((tmp_path / "tf" / "config.json").read_text())
    assert {k: config[k] for k in ("use_mup", "input_mult", "output_mult", "mup_scale_factor")} == {
        "use_mup": True,
        "input_mult": 2.0,
        "output_mult": 0.5,
        "mup_scale_factor": 2.0,
    }
    arch = import_hf(str(tmp_path / "tf"), str(tmp_path / "back.ckpt"))
    assert arch.function_fields() == cfg.function_fields()
    back, _ = model_from_checkpoint(tmp_path / "back.ckpt")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in state.items())
    tokens = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))


def test_teleflm_export_needs_the_llama_network(tmp_path, tokenizer_text):
    cfg = tiny_config("flm101b", vocab_size=VOCAB)
    save_weights_checkpoint(tmp_path / "m.ckpt", cfg, FLMTransformer(cfg).state_dict(), tokenizer_text)
    out = _cli("export-hf", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "x"), "--format", "teleflm")
    assert out.returncode == 2 and "--format teleflm needs RMSNorm" in out.stderr and out.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()


# ---- xPos far from position 0 ---------------------------------------------------------------------
def _xpos_model(max_seq_len, scale_base):
    """FLM-101B style, head size 128 (the steepest decay zeta = 0.4/1.4), sharp attention so xPos shows."""
    torch.manual_seed(2)
    cfg = tiny_config(
        "flm101b", vocab_size=VOCAB, hidden_size=128, n_heads=1, max_seq_len=max_seq_len, xpos_scale_base=scale_base
    )
    model = FLMTransformer(cfg).eval()
    with torch.no_grad():
        for layer in model.layers.values():
            layer.attention.wq.weight.mul_(40)
            layer.attention.wk.weight.mul_(40)
    return cfg, model


def _export_flm(cfg, model, tokenizer_text, tmp_path):
    save_weights_checkpoint(tmp_path / "x.ckpt", cfg, model.state_dict(), tokenizer_text)
    export_hf(str(tmp_path / "x.ckpt"), str(tmp_path / "hf"))
    return AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()


def test_xpos_export_is_finite_far_past_the_old_fixed_centre(tmp_path, tokenizer_text):
    # FLM-101B's numbers: head 128, scale base 512, 2048 positions. The old export centred xPos at
    # position 1024; at position 65,535 its key scale zeta^((65535 - 1024) / 512) is 0 in fp32, and k / 0 = inf.
    cfg, model = _xpos_model(2048, 512.0)
    old_key_scale = (torch.tensor(0.4 / 1.4, dtype=torch.float64) ** ((65535 - 1024) / 512)).float()
    assert old_key_scale.item() == 0.0 and torch.isinf(1.0 / old_key_scale)
    hf = _export_flm(cfg, model, tokenizer_text, tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    far = torch.arange(65536 - 8, 65536)[None].expand(2, -1)
    with torch.no_grad():
        theirs = hf(tokens, position_ids=far).logits
        ours = model(tokens, position_ids=torch.arange(8))[..., :VOCAB]  # xPos and RoPE see only n - m
    diff = (theirs - ours).abs().max().item()
    print(f"xPos export at positions 65528..65535 vs trainer at 0..7: max |logit diff| = {diff:.3g}")
    assert torch.isfinite(theirs).all() and diff <= 1e-5
    rope = FLMTransformer(dataclasses.replace(cfg, position="rope")).eval()
    rope.load_state_dict(model.state_dict())
    with torch.no_grad():  # xPos matters in these logits (far more than the difference above)
        assert (rope(tokens, position_ids=torch.arange(8))[..., :VOCAB] - ours).abs().max().item() > 1e-2


def test_xpos_export_equals_the_trainer_up_to_its_limit(tmp_path, tokenizer_text):
    # 65,600 positions need a large scale base (ModelConfig refuses 512 there: scales past e^80).
    with pytest.raises(ConfigError, match=r"max_seq_len \(65600\) is too long for xPos .* xpos_scale_base >= 514"):
        tiny_config("flm101b", hidden_size=128, n_heads=1, max_seq_len=65600, xpos_scale_base=512.0)
    cfg, model = _xpos_model(65600, 4096.0)
    hf = _export_flm(cfg, model, tokenizer_text, tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for start in (0, 32796, 65536, 65600 - 8):  # the trainer's centre, 64k, the last positions allowed
            positions = torch.arange(start, start + 8)
            ours = model(tokens, position_ids=positions)[..., :VOCAB]
            theirs = hf(tokens, position_ids=positions[None].expand(2, -1)).logits
            diff = (theirs - ours).abs().max().item()
            print(f"xPos at positions {start}..{start + 7}: trainer vs export max |logit diff| = {diff:.3g}")
            assert torch.isfinite(ours).all() and torch.isfinite(theirs).all() and diff <= 1e-5
            if start == 0:
                at_zero = ours
            else:  # relative positions: the same logits anywhere in the window
                assert (ours - at_zero).abs().max().item() <= 1e-5
