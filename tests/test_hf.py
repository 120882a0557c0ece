"""Hugging Face Llama folders and the loss-curve picture: the RoPE row permutation, the safetensors layout, an
export that transformers loads with our logits, export -> --teacher DIR with the same numbers in both
scripts, a folder transformers itself wrote (untied, bf16, sharded) as a teacher, one-line errors for folders
that cannot be read, and the SVG. The transformers tests are skipped when it is not installed.
Run: python -m pytest tests/test_hf.py"""

import json
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from argparse import Namespace
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from model.common import UserError
from model.export import export
from model.hf import read_safetensors, rope_rows_from_hf, rope_rows_to_hf, write_safetensors
from model.model import ModelConfig, Transformer, apply_rope, rope_tables
from model.plot import LABELS, loss_svg, write_loss_plot
from model.tokenizer import get_tokenizer
from model.checkpoint import save_checkpoint
from model.teachers import get_teacher

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_chars", "60000", "--vocab_size", "320", "--teacher_layers", "2", "--teacher_dim", "32",
        "--teacher_heads", "2", "--teacher_kv_heads", "1", "--teacher_steps", "4", "--n_layer", "1",
        "--n_embd", "16", "--n_head", "2", "--n_kv_head", "1", "--steps", "3", "--batch_size", "4",
        "--block_size", "64", "--log_interval", "1", "--eval_interval", "1", "--device", "cpu"]
WHITEBOX = [*TINY, "--eval_tokens", "256", "--sample_tokens", "4", "--no_flops_matched"]
BLACKBOX = [*TINY, "--max_new_tokens", "4"]


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)


def sharp_model(tok, **kw):
    """A random model with weights far from the 0.02 init, so that a wrong layout shows in the logits."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, max_seq_len=64,
               rope_theta=500.0)
    model = Transformer(ModelConfig(**{**cfg, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model.eval()


def saved(model, tok, folder: Path) -> Path:
    """The model as a checkpoint with its tokenizer.model beside it, as the scripts leave them."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(tok.path, folder / "tokenizer.model")
    save_checkpoint(folder / "m.pt", model, None, Namespace(), 0, tok.sha256)
    return folder / "m.pt"


def teacher_from(folder, out_dir, block_size=16):
    """get_tokenizer and get_teacher as the scripts call them with --teacher folder."""
    tok = get_tokenizer(out_dir, None, 0, teacher=folder)
    args = Namespace(teacher=str(folder), out_dir=str(out_dir), device="cpu", block_size=block_size)
    return get_teacher(args, tok, None, None), tok


# ----------------------------------------------------------------------------------------------------------
# the layout

def test_rope_rows_permuted_to_halves_give_the_same_rotated_scores():
    """Our RoPE rotates dims (2i, 2i+1) of a head, Hugging Face's rotates (i, i + D/2): with q/k rows
    permuted by rope_rows_to_hf, its rotation gives the same attention scores q.k as ours."""
    H, D, C, T = 2, 8, 16, 5
    wq, wk, x = torch.randn(H * D, C), torch.randn(H * D, C), torch.randn(T, C)
    cos, sin = rope_tables(D, T, 500.0)                                                  # (T, D/2)

    def ours(w):
        return apply_rope((x @ w.T).view(1, T, H, D).transpose(1, 2), cos, sin)         # (1, H, T, D)

    def halves(w):  # transformers' rotate_half with cos/sin repeated over both halves
        q = (x @ w.T).view(1, T, H, D).transpose(1, 2)
        c, s = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        return q * c + torch.cat([-q[..., D // 2:], q[..., :D // 2]], -1) * s

    a = ours(wq) @ ours(wk).transpose(-1, -2)
    b = halves(rope_rows_to_hf(wq, H)) @ halves(rope_rows_to_hf(wk, H)).transpose(-1, -2)
    torch.testing.assert_close(a, b, msg="same scores in either layout")
    hf = rope_rows_to_hf(wq, H)
    assert torch.equal(hf[D + 1 * D // 2 + 3], wq[D + 2 * 3 + 1]), "head 1: new row c*D/2+i is old row 2i+c"
    assert torch.equal(rope_rows_from_hf(hf, H), wq), "from_hf undoes to_hf"


def test_safetensors_layout_and_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.randn(2, 2).half()}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    raw = (tmp_path / "x.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header.pop("__metadata__") == {"format": "pt"}
    assert [header[k]["dtype"] for k in "abc"] == ["F32", "BF16", "F16"] and header["a"]["shape"] == [3, 4]
    spans = sorted(h["data_offsets"] for h in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "no holes between tensors"
    assert len(raw) == 8 + n + spans[-1][1], "nothing after the last tensor"
    back = read_safetensors(tmp_path / "x.safetensors")
    for k, t in tensors.items():
        assert back[k].dtype == torch.float32 and torch.equal(back[k], t.float()), f"{k}: read back exactly"


# ----------------------------------------------------------------------------------------------------------
# export, and transformers

@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_the_export_with_our_logits(tok, tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    model = sharp_model(tok, tie_embeddings=tied)
    export(saved(model, tok, tmp_path / "ckpt"), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == tied and hf.config.num_key_value_heads == 2
    x = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(x).logits - model(x)["logits"]).abs().max().item()
    assert diff <= 1e-4, f"transformers' logits differ from ours by {diff:.2e} (the q/k RoPE rows or rope_theta?)"


def test_the_exported_tokenizer_encodes_like_ours(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model through protobuf")
    export(saved(sharp_model(tok), tok, tmp_path / "ckpt"), tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ["Once upon a time,  in Ashford\nthere lived a sailor.", " Mia's home", "日本 😀 \n\n x"]:
        assert hf_tok.encode(text) == tok.encode(text), f"{text!r}: the same ids, no BOS, no dummy prefix"
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "Where does Mia live?"}], tokenize=False,
                                      add_generation_prompt=True)
    assert chat == "<|im_start|>user\nWhere does Mia live?<|im_end|>\n<|im_start|>assistant\n"


def test_a_folder_transformers_wrote_is_a_teacher(tok, tmp_path):
    """save_pretrained of a random LlamaForCausalLM with an untied head, in bf16 and in two shards, with our
    tokenizer.model beside it: get_teacher loads it with the logits transformers computes from it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, rope_theta=500.0, tie_word_embeddings=False)
    ref = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    folder = tmp_path / "hf"
    ref.to(torch.bfloat16).save_pretrained(folder, max_shard_size="60KB")
    shutil.copy(tok.path, folder / "tokenizer.model")
    assert (folder / "model.safetensors.index.json").is_file(), "the test means to read shards"
    teacher, _ = teacher_from(folder, tmp_path / "out")
    assert not teacher.config.tie_embeddings and teacher.config.rope_theta == 500.0
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # bf16 values
    x = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ref(x).logits - teacher(x)["logits"]).abs().max().item()
    assert diff <= 1e-4, f"our logits differ from transformers' by {diff:.2e}"


# ----------------------------------------------------------------------------------------------------------
# export -> --teacher DIR, through the scripts

@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """A tiny white-box run (it pretrains its teacher), the teacher exported, and the same run again with the
    exported folder as --teacher in a fresh out_dir."""
    tmp = tmp_path_factory.mktemp("rt")
    r = run("train_distill_whitebox.py", *WHITEBOX, "--out_dir", str(tmp / "a"))
    assert r.returncode == 0, r.stderr
    export(tmp / "a" / "teacher.pt", tmp / "hf")
    r = run("train_distill_whitebox.py", *WHITEBOX, "--out_dir", str(tmp / "b"), "--teacher", str(tmp / "hf"))
    assert r.returncode == 0, r.stderr
    return tmp


def test_an_exported_teacher_is_the_same_teacher(round_trip, tok):
    a, b = (json.loads((round_trip / d / "whitebox_report.json").read_text()) for d in "ab")
    for name in ("teacher", "student", "baseline"):
        assert b[name]["val_loss"] == pytest.approx(a[name]["val_loss"], abs=1e-6), \
            f"{name}: the same val loss with the teacher read back from its Hugging Face folder"
    assert (round_trip / "b" / "tokenizer.model").read_bytes() == (round_trip / "hf" / "tokenizer.model").read_bytes()
    original = torch.load(round_trip / "a" / "teacher.pt", weights_only=True)["model"]
    teacher, _ = teacher_from(round_trip / "hf", round_trip / "b")
    assert all(torch.equal(teacher.state_dict()[k], w) for k, w in original.items()), "the very same weights"


def test_both_scripts_draw_their_curves(round_trip):
    svg = ET.parse(round_trip / "b" / "whitebox_loss.svg").getroot()
    runs = {e.get("data-run"): e for e in svg.iter() if e.get("data-run")}
    assert {"student", "baseline", "teacher"} <= runs.keys()
    assert len(runs["student"].get("points").split()) == 2, "one point per evaluation (after 2 and 3 steps)"
    r = run("train_distill_blackbox.py", *BLACKBOX, "--out_dir", str(round_trip / "bb"),
            "--teacher", str(round_trip / "hf"))
    assert r.returncode == 0, r.stderr
    assert "local:" in r.stdout and "blackbox_loss.svg" in r.stdout
    svg = ET.parse(round_trip / "bb" / "blackbox_loss.svg").getroot()
    assert {"student", "baseline"} <= {e.get("data-run") for e in svg.iter()}


# ----------------------------------------------------------------------------------------------------------
# folders that cannot be read

def broken(folder: Path, what: str):
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if what == "tokenizer.json":
        (folder / "tokenizer.model").rename(folder / "tokenizer.json")
    elif what == "shard":
        (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    else:
        cfg.update({"model_type": {"model_type": "mistral"}, "rope_scaling": {"rope_scaling": {
            "rope_type": "linear", "factor": 2.0}}, "attention_bias": {"attention_bias": True},
            "mlp_bias": {"mlp_bias": True}}[what])
        cfg_path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("what,fragment", [("model_type", "'mistral'"), ("rope_scaling", "linear"),
                                           ("attention_bias", "biases"), ("mlp_bias", "biases"),
                                           ("tokenizer.json", "only tokenizer.json"),
                                           ("shard", "model-00002-of-00002.safetensors")])
def test_folders_that_cannot_be_read_give_one_line_errors(tok, tmp_path, what, fragment):
    export(saved(sharp_model(tok), tok, tmp_path / "ckpt"), tmp_path / "hf")
    broken(tmp_path / "hf", what)
    with pytest.raises(UserError) as e:
        teacher_from(tmp_path / "hf", tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "hf") in msg and fragment in msg, msg
    assert what.split(".")[0] in msg or what == "shard", f"the message names the field: {msg}"


def test_a_bad_folder_is_one_line_from_the_script(tok, tmp_path, one_line_error):
    export(saved(sharp_model(tok), tok, tmp_path / "ckpt"), tmp_path / "hf")
    broken(tmp_path / "hf", "rope_scaling")
    one_line_error(run("train_distill_whitebox.py", *WHITEBOX, "--out_dir", str(tmp_path / "out"),
                       "--teacher", str(tmp_path / "hf")), "rope_scaling", str(tmp_path / "hf"))


def test_a_teacher_tokenizer_without_chat_tags_stops_the_black_box_script(tmp_path, one_line_error):
    """Llama 2's tokenizer.model has no chat tags and no pad piece (sentencepiece's defaults, as here): the
    black-box student's chat template cannot be written with it, which the script says before any work."""
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a tiny corpus of words"] * 50),
                                   model_prefix=str(tmp_path / "sp"), vocab_size=30, hard_vocab_limit=False,
                                   minloglevel=2)
    (tmp_path / "hf").mkdir()
    shutil.copy(tmp_path / "sp.model", tmp_path / "hf" / "tokenizer.model")
    tok = get_tokenizer(tmp_path / "out", None, 0, teacher=tmp_path / "hf")
    assert tok.special == {} and tok.pad_id == tok.eos_id, "no pad piece: padding with EOS"
    one_line_error(run("train_distill_blackbox.py", *BLACKBOX, "--out_dir", str(tmp_path / "out"),
                       "--teacher", str(tmp_path / "hf")), "<|im_start|>", "chat template")


def test_another_tokenizer_in_out_dir_is_an_error(tok, tmp_path):
    export(saved(sharp_model(tok), tok, tmp_path / "ckpt"), tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.model").write_bytes(b"another")
    with pytest.raises(UserError, match="another --out_dir"):
        get_tokenizer(tmp_path / "out", None, 0, teacher=tmp_path / "hf")


# ----------------------------------------------------------------------------------------------------------
# the picture

def test_the_svg_is_valid_and_has_every_curve(tmp_path):
    records = [{"run": "teacher", "step": 9, "loss": 1.0}] + [
        {"run": run_, "step": s, "val_loss": v} for run_, base in (("student", 1.0), ("baseline", 1.5))
        for s, v in ((24, base + 1), (49, base + 0.5), (74, base))]
    assert write_loss_plot(tmp_path / "x.svg", records, "val_loss", level=0.42)
    svg = ET.parse(tmp_path / "x.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    lines = {e.get("data-run"): e for e in svg.iter() if e.get("data-run")}
    assert lines.keys() == {"student", "baseline", "teacher"}, "the teacher level, and no curve without val_loss"
    assert len(lines["student"].get("points").split()) == 3
    texts = [e.text for e in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "step" in texts and LABELS["val_loss"][1] in texts and LABELS["val_loss"][0] in texts, "axis labels, title"
    assert "0" in texts and "80" in texts, "x ticks from 0 to a round number past the last step (75)"
    assert "student (1 at step 75)" in texts, "the legend gives each run's last value"
    assert not write_loss_plot(tmp_path / "y.svg", records, "answer_ppl"), "no run logged answer_ppl"
    assert not (tmp_path / "y.svg").exists()


def test_one_point_and_no_level_still_draw():
    svg = ET.fromstring(loss_svg({"student": [(3, 5.0)]}, "t & <title>", "loss"))
    assert "t & <title>" in [e.text for e in svg.iter("{http://www.w3.org/2000/svg}text")], "the title, escaped"
    assert [e.get("data-run") for e in svg.iter() if e.get("data-run")] == ["student"]
