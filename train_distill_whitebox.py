"""
White-box distillation: a small student learns from a bigger teacher's logits and hidden states.

    loss = alpha * CE(y, z_S) + (1 - alpha) * T^2 * D(p_T || p_S) + lambda_h * L_hidden + lambda_a * L_attn

With no arguments it runs the whole story on a 2-core CPU in 11-13 minutes the first time (most of it the
teacher's pretraining) and 4 once the teacher is cached: generate the embedded story corpus, train a
tokenizer, pretrain a teacher (once; later runs reuse out/teacher.pt), distil a student, train the same
student with CE only as a baseline (same init, same batches, same steps) and once more for as many FLOPs as
distillation spent, and print a comparison table (also written to out/whitebox_report.json; the
validation-loss curves go to out/whitebox_loss.svg).

    python train_distill_whitebox.py
    python train_distill_whitebox.py --divergence reverse_kl --temperature 2 --hidden_weight 1
    python train_distill_whitebox.py --device cuda --dtype bf16 --data my_corpus.jsonl
    python train_distill_whitebox.py --cache_teacher_topk 32 --attn_weight 0   # offline KD, top-32 cache
    python train_distill_whitebox.py --teacher ~/TinyLlama-1.1B --device cuda   # a Hugging Face Llama folder
"""

import json
import time
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn as nn

from model.common import ArgumentParser, UserError, atomic_write_bytes, pick_device, pick_dtype, run_main
from model.data import eval_batches, get_batch, load_corpus, tokenize_split
from model.losses import (DIVERGENCES, attention_relation_loss, cross_entropy, hidden_loss, kd_loss,
                          layer_map, topk_kd_loss)
from model.model import ModelConfig, Transformer, generate
from model.plot import write_loss_plot
from model.tokenizer import get_tokenizer
from model.topk_cache import get_cached_batch, get_topk_cache
from model.train import (Logger, add_data_args, add_optim_args, add_teacher_args, check_optim_args, evaluate,
                         get_teacher, train)


def parse_args():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    # data, output and hardware (shared with the black-box script)
    add_data_args(p)
    # teacher
    add_teacher_args(p)
    # student
    p.add_argument("--n_layer", type=int, default=2, help="student layers")
    p.add_argument("--n_embd", type=int, default=128, help="student width C")
    p.add_argument("--n_head", type=int, default=4, help="student query heads")
    p.add_argument("--n_kv_head", type=int, default=2, help="student key/value heads")
    p.add_argument("--init", default="random", choices=["random", "teacher"],
                   help="student init: random, or every other teacher layer (DistilBERT; needs the "
                        "teacher's shape in all but depth)")
    # distillation
    p.add_argument("--alpha", type=float, default=0.1, help="weight of the hard-label CE; 1-alpha goes to KD")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T of the KD term")
    p.add_argument("--divergence", default="forward_kl", choices=DIVERGENCES, help="D in the KD term")
    p.add_argument("--jsd_beta", type=float, default=0.5, help="beta of the generalized JSD (0 = forward KL)")
    p.add_argument("--skew", type=float, default=0.1, help="mixing weight of skew_kl, 0 < skew < 1")
    p.add_argument("--hidden_weight", type=float, default=0.0, help="lambda_h, weight of the hidden-state loss")
    p.add_argument("--hidden_loss", default="mse", choices=["mse", "cosine"], help="hidden-state distance")
    p.add_argument("--layer_map", default=None,
                   help="student:teacher block pairs, e.g. '1:2,2:4'; default evenly spaced")
    p.add_argument("--attn_weight", type=float, default=1.0,
                   help="lambda_a, weight of the MiniLM attention/value relation loss (last layer)")
    p.add_argument("--attn_heads", type=int, default=4, help="relation heads of the attention loss")
    p.add_argument("--no_baseline", action="store_true", help="skip the CE-only baseline student")
    p.add_argument("--no_flops_matched", action="store_true",
                   help="skip the CE-only baseline trained for as many FLOPs as distillation spent: steps * "
                        "(student training + teacher forward FLOPs) / student training FLOPs (offline KD: the same "
                        "steps)")
    p.add_argument("--cache_teacher_topk", type=int, default=0,
                   help="offline KD: cache the teacher's top-K log-probs of every train position once "
                        "(out_dir/topk_kK), then train with no teacher in memory; 0 = online KD")
    p.add_argument("--kd_chunk_size", type=int, default=0,
                   help="compute the online KD loss this many positions at a time (less memory at large V); "
                        "0 = all at once")
    p.add_argument("--compile", action="store_true", help="torch.compile the student and teacher forwards")
    # optimization
    add_optim_args(p, steps=250, lr=1e-2, log_interval=50, eval_interval=25)
    p.add_argument("--eval_tokens", type=int, default=32768, help="validation tokens per evaluation")
    p.add_argument("--sample_tokens", type=int, default=48, help="tokens to sample from each model at the end")
    args = p.parse_args()
    check_optim_args(p, args)
    if not 0 <= args.alpha <= 1 or args.temperature <= 0 or not 0 <= args.jsd_beta <= 1:
        p.error("need 0 <= --alpha <= 1, --temperature > 0 and 0 <= --jsd_beta <= 1")
    if not 0 < args.skew < 1:  # 1 would make skew_kl KL(p || p) = 0; above 1, log(1 - skew) fails
        p.error(f"--skew {args.skew:g}: need 0 < --skew < 1")
    if args.cache_teacher_topk and (args.hidden_weight > 0 or args.attn_weight > 0):
        p.error("--cache_teacher_topk caches logits only: add --attn_weight 0 (the attention term is on by default) "
                "and --hidden_weight 0; both need the teacher online")
    return args


def parse_layer_map(spec, n_student: int, n_teacher: int):
    """'1:2,2:4' -> [(1, 2), (2, 4)]; None -> evenly spaced. Blocks are numbered from 1."""
    if spec is None:
        return layer_map(n_student, n_teacher)
    try:
        pairs = [tuple(int(n) for n in item.split(":")) for item in spec.split(",")]
    except ValueError:
        raise UserError(f"--layer_map {spec!r}: expected pairs like '1:2,2:4'") from None
    for pair in pairs:
        if len(pair) != 2 or not (1 <= pair[0] <= n_student and 1 <= pair[1] <= n_teacher):
            raise UserError(f"--layer_map {spec!r}: student blocks are 1..{n_student}, teacher 1..{n_teacher}")
    return pairs


def init_from_teacher(student, teacher):
    """DistilBERT's init: student block i copies teacher block 2i; embeddings and final norm copied too.
    The configs must match in everything but depth and max_seq_len (RoPE tables are not weights): other
    head counts can give the very same weight shapes (4 heads of 8 vs 2 heads of 16), which would load
    silently into a different function, and other sizes would fail in load_state_dict."""
    s, t = student.config, teacher.config
    diffs = [f"{f.name} {getattr(s, f.name)} (teacher {getattr(t, f.name)})" for f in fields(ModelConfig)
             if f.name not in ("n_layer", "max_seq_len") and getattr(s, f.name) != getattr(t, f.name)]
    if diffs:
        raise UserError(f"--init teacher copies the teacher's blocks, so the student must match it in all but "
                        f"depth: {', '.join(diffs)} (use the teacher's shape or --init random)")
    student.embed_tokens.load_state_dict(teacher.embed_tokens.state_dict())
    student.norm.load_state_dict(teacher.norm.state_dict())
    for i, block in enumerate(student.layers):
        block.load_state_dict(teacher.layers[min(2 * i, teacher.config.n_layer - 1)].state_dict())


def main():
    args = parse_args()
    t_start = time.perf_counter()
    # ------------------------------------------------------------------------------------------------------
    # device
    args.device = pick_device(args.device)
    args.dtype = pick_dtype(args.dtype, args.device)
    out_dir = Path(args.out_dir)
    logger = Logger(out_dir / "whitebox_log.jsonl")
    print(f"device {args.device} | dtype {args.dtype} | out_dir {out_dir}")

    # ------------------------------------------------------------------------------------------------------
    # data
    docs = load_corpus(args.data, args.data_seed, args.n_chars)
    tok = get_tokenizer(out_dir, docs, args.vocab_size, args.teacher)  # a Hugging Face teacher's, if one
    train_tokens, val_tokens = tokenize_split(docs, tok, args.block_size, args.val_fraction)
    val_batches = eval_batches(val_tokens, args.batch_size, args.block_size, args.eval_tokens)
    print(f"data: {len(docs)} documents | {len(train_tokens):,} train tokens | {len(val_tokens):,} val tokens "
          f"| vocab {tok.vocab_size}")

    # ------------------------------------------------------------------------------------------------------
    # teacher and student
    teacher = get_teacher(args, tok, train_tokens, logger)
    torch.manual_seed(args.seed)
    student = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=args.n_layer, n_embd=args.n_embd,
                                      n_head=args.n_head, n_kv_head=args.n_kv_head,
                                      max_seq_len=args.block_size)).to(args.device)
    if args.init == "teacher":
        init_from_teacher(student, teacher)
    init_state = {k: v.clone() for k, v in student.state_dict().items()}  # the baseline starts here too
    pairs = parse_layer_map(args.layer_map, args.n_layer, teacher.config.n_layer)
    # One learned map d_s -> d_t per matched layer. It lives only during training: not in the saved student.
    projector = nn.ModuleList(nn.Linear(args.n_embd, teacher.config.n_embd, bias=False) for _ in pairs)
    projector.to(args.device)
    use_hidden, use_attn = args.hidden_weight > 0, args.attn_weight > 0
    if use_attn and (args.n_embd % args.attn_heads or teacher.config.n_embd % args.attn_heads):
        raise UserError(f"--attn_heads {args.attn_heads} must divide both widths "
                        f"({args.n_embd}, {teacher.config.n_embd})")
    print(f"teacher {teacher.num_params() / 1e6:.2f}M params | student {student.num_params() / 1e6:.2f}M params "
          f"| layer map {pairs if use_hidden else 'unused'}")
    if args.cache_teacher_topk:  # offline KD: the teacher runs once, then leaves memory until the report
        teacher_path = args.teacher or out_dir / "teacher.pt"
        cache = get_topk_cache(args, teacher, train_tokens, teacher_path, tok.sha256)
        teacher.to("meta")  # frees the weights; the config stays

    # torch.compile wraps the modules; training and checkpoints keep using the plain ones (same weights).
    student_fwd, teacher_fwd = (torch.compile(student), torch.compile(teacher)) if args.compile else (student, teacher)

    def kd_step(x, labels, *cached):
        s_out = student_fwd(x, output_hidden_states=use_hidden, output_qkv=use_attn)
        ce = cross_entropy(s_out["logits"], labels)
        if cached:  # offline: the (ids, logp, tail) cache rows of these windows stand in for the teacher
            kd = topk_kd_loss(s_out["logits"], *cached, labels, args.divergence, args.temperature,
                              args.jsd_beta, args.skew)
        else:  # inference_mode: no autograd bookkeeping and no kept activations for the frozen teacher
            with torch.inference_mode():
                t_out = teacher_fwd(x, output_hidden_states=use_hidden, output_qkv=use_attn)
            kd = kd_loss(s_out["logits"], t_out["logits"], labels, args.divergence, args.temperature,
                         args.jsd_beta, args.skew, args.kd_chunk_size)
        loss = args.alpha * ce + (1 - args.alpha) * kd
        parts = {"ce": ce, "kd": kd}
        if use_hidden:
            s_states = [proj(s_out["hidden_states"][i]) for proj, (i, _) in zip(projector, pairs)]
            t_states = [t_out["hidden_states"][j] for _, j in pairs]
            parts["hid"] = hidden_loss(s_states, t_states, labels, args.hidden_loss)
            loss = loss + args.hidden_weight * parts["hid"]
        if use_attn:
            parts["attn"] = attention_relation_loss(s_out["qkv"][-1], t_out["qkv"][-1], labels, args.attn_heads)
            loss = loss + args.attn_weight * parts["attn"]
        return loss, {"loss": loss, **parts}

    # ------------------------------------------------------------------------------------------------------
    # distil, then the CE-only baseline from the same init on the same batches
    def batch_fn(step):
        if args.cache_teacher_topk:
            return get_cached_batch(train_tokens, cache, step, args.batch_size, args.block_size, args.seed)
        return get_batch(train_tokens, step, args.batch_size, args.block_size, args.seed)

    student_s = train(student, kd_step, batch_fn, args, name="student", steps=args.steps, lr=args.lr,
                      ckpt_path=out_dir / "student.pt", logger=logger, tokenizer_sha256=tok.sha256,
                      aux=projector if use_hidden else None,
                      eval_fn=lambda: evaluate(student, val_batches, args.device, args.dtype))
    models = {"teacher": teacher, "student": student}
    train_s, train_steps = {"student": student_s}, {"student": args.steps}

    def train_baseline(name: str, steps: int):
        """CE only, from the student's initial weights, on the same (seed, step) batches."""
        model = Transformer(student.config).to(args.device)
        model.load_state_dict(init_state)
        model_fwd = torch.compile(model) if args.compile else model

        def ce_step(x, labels, *_):  # ignores the cache rows of an offline run
            loss = cross_entropy(model_fwd(x)["logits"], labels)
            return loss, {"loss": loss}

        train_s[name] = train(model, ce_step, batch_fn, args, name=name, steps=steps, lr=args.lr,
                              ckpt_path=out_dir / f"{name}.pt", logger=logger, tokenizer_sha256=tok.sha256,
                              eval_fn=lambda: evaluate(model, val_batches, args.device, args.dtype))
        models[name], train_steps[name] = model, steps

    if not args.no_baseline:
        train_baseline("baseline", args.steps)
    if not args.no_flops_matched:
        # Equal compute: a KD step also pays for the teacher's forward pass (none per step when offline: the
        # cache was paid for once). The losses' own FLOPs are small next to the models' and are not counted.
        teacher_flops = 0 if args.cache_teacher_topk else teacher.flops_per_token(args.block_size, training=False)
        student_flops = student.flops_per_token(args.block_size)
        fm_steps = round(args.steps * (student_flops + teacher_flops) / student_flops)
        print(f"FLOPs-matched baseline: {fm_steps} CE steps = {args.steps} KD steps x "
              f"{(student_flops + teacher_flops) / student_flops:.2f} (student + teacher forward FLOPs / student's)")
        train_baseline("baseline_flops_matched", fm_steps)

    # ------------------------------------------------------------------------------------------------------
    # evaluate: the same validation windows for all three
    if args.cache_teacher_topk:  # back from the checkpoint, for the comparison
        teacher = models["teacher"] = get_teacher(args, tok, train_tokens, logger)
    report = {}
    for name, model in models.items():
        report[name] = evaluate(model, val_batches, args.device, args.dtype, teacher=teacher)
        report[name]["params"] = model.num_params()
        report[name]["train_s"] = train_s.get(name)
        report[name]["steps"] = train_steps.get(name)
    if "baseline" in report:
        l_t, l_s, l_b = (report[k]["val_loss"] for k in ("teacher", "student", "baseline"))
        report["gap_closed"] = (l_b - l_s) / (l_b - l_t) if l_b != l_t else None
    # Steps to match: the student's steps at its first evaluation (every --eval_interval) at or below a
    # baseline's final val loss; None if it never got there.
    student_curve = [(r["step"] + 1, r["val_loss"]) for r in logger.records
                     if r["run"] == "student" and "val_loss" in r]
    report["steps_to_match"] = {name: next((n for n, v in student_curve if v <= report[name]["val_loss"]), None)
                                for name in ("baseline", "baseline_flops_matched") if name in report}
    report["wall_s"] = time.perf_counter() - t_start
    report["args"] = vars(args)

    w = max(9, *map(len, models))  # the name column fits "baseline_flops_matched" when it is there
    print(f"\n{'model':<{w}} {'params':>8} {'val loss':>9} {'val ppl':>8} {'top1 agr':>9} {'KL(T||m)':>9} "
          f"{'fwd tok/s':>10}")
    for name in models:
        r = report[name]
        print(f"{name:<{w}} {r['params'] / 1e6:>7.2f}M {r['val_loss']:>9.4f} {r['val_ppl']:>8.2f} "
              f"{r['top1_agreement']:>9.3f} {r['kl_from_teacher']:>9.4f} {r['fwd_tok_s']:>10,.0f}")
    if report.get("gap_closed") is not None:
        print(f"share of the teacher gap closed by distillation: {report['gap_closed']:.1%} "
              f"(baseline - student) / (baseline - teacher) in val loss")
    for name, n in report["steps_to_match"].items():
        print(f"steps to match {name} ({report[name]['val_loss']:.4f} after {train_steps[name]} steps): "
              + (f"the student got there after {n} of its {args.steps} steps" if n else "the student never got there")
              + f" (evaluated every {args.eval_interval})")

    prompt = val_batches[0][0][:1, :16].to(args.device)  # the first 16 validation tokens
    print(f"\nsamples (temperature 0.8, top-k 50) after the prompt {tok.decode(prompt[0].tolist())!r}:")
    for name, model in models.items():
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        ids = generate(model, prompt, args.sample_tokens, temperature=0.8, top_k=50, generator=g)
        print(f"--- {name}: {tok.decode(ids[0, prompt.size(1):].tolist())!r}")

    report_path, plot_path = out_dir / "whitebox_report.json", out_dir / "whitebox_loss.svg"
    atomic_write_bytes(report_path, json.dumps(report, indent=2).encode())
    plotted = write_loss_plot(plot_path, logger.records, "val_loss", "white-box distillation: validation loss",
                              "validation loss (CE, nats/token)", level=report["teacher"]["val_loss"])
    print(f"\nreport -> {report_path}" + (f" | loss curves -> {plot_path}" if plotted else "")
          + f" | wall time {report['wall_s']:.0f} s")


if __name__ == "__main__":
    run_main(main)
