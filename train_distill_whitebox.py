"""
White-box distillation: a small student learns from a bigger teacher's logits and hidden states.

    loss = alpha * CE(y, z_S) + (1 - alpha) * T^2 * D(p_T || p_S) + lambda_h * L_hidden + lambda_a * L_attn

With no arguments it runs the whole story on a 2-core CPU in 3-8 minutes (less with out/teacher.pt cached):
the embedded story corpus, a tokenizer, the teacher's pretraining, a distilled student, the same student
trained with CE only (same init, batches, steps) and for as many FLOPs as distillation spent, and a table.

    python train_distill_whitebox.py
    python train_distill_whitebox.py --divergence reverse_kl --temperature 2 --hidden_weight 1
    python train_distill_whitebox.py --device cuda --dtype bf16 --data my_corpus.jsonl
    python train_distill_whitebox.py --cache_teacher_topk 32 --attn_weight 0   # offline KD, top-32 cache
    python train_distill_whitebox.py --on_policy 0.5   # half the steps on the student's own samples (GKD)
"""

import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from model import dist
from model.cli import (add_data_args, add_optim_args, add_student_args, add_teacher_args, check_optim_args,
                       resolve_device)
from model.common import ArgumentParser, UserError, atomic_write_bytes, compiled, run_main
from model.data import eval_batches, get_batch, load_corpus, tokenize_split
from model.evaluate import evaluate, whitebox_report
from model.losses import DIVERGENCES, attention_relation_loss, cross_entropy, hidden_loss, kd_loss, topk_kd_loss
from model.model import Transformer, generate
from model.on_policy import add_on_policy_args, check_on_policy_args, on_policy_batches
from model.student import init_from_teacher, new_student, parse_layer_map
from model.teachers import get_teacher, teacher_path
from model.plot import write_loss_plot
from model.tokenizer import get_tokenizer
from model.topk_cache import get_cached_batch, get_topk_cache
from model.train import Logger, TrainConfig, ce_loss, train


def parse_args():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    # data, output and hardware (shared with the black-box script)
    add_data_args(p)
    # teacher and student
    add_teacher_args(p)
    add_student_args(p)
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
                   help="student:teacher block pairs (hidden, attention terms), e.g. '1:2,2:4'; default evenly spaced")
    p.add_argument("--attn_weight", type=float, default=1.0,
                   help="lambda_a, weight of the MiniLM attention/value relation loss (on the --layer_map pairs)")
    p.add_argument("--attn_heads", type=int, default=4, help="relation heads of the attention loss")
    p.add_argument("--no_baseline", action="store_true", help="skip the CE-only baseline student")
    p.add_argument("--no_flops_matched", action="store_true",
                   help="skip the CE-only baseline trained for as many FLOPs as distillation spent (a KD step: "
                        "the student's training + the teacher's forward FLOPs; offline KD: the same steps)")
    p.add_argument("--cache_teacher_topk", type=int, default=0,
                   help="offline KD: cache the teacher's top-K log-probs of every train position once "
                        "(out_dir/topk_kK), then train with no teacher in memory; 0 = online KD")
    p.add_argument("--kd_chunk_size", type=int, default=0,
                   help="online KD loss this many positions at a time (less memory at large V); 0 = all at once")
    add_on_policy_args(p)
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
    check_on_policy_args(p, args)
    if args.cache_teacher_topk and (args.hidden_weight > 0 or args.attn_weight > 0):
        p.error("--cache_teacher_topk caches logits only: add --attn_weight 0 (the attention term is on by default) "
                "and --hidden_weight 0; both need the teacher online")
    return args


def fit(args, name: str, model, loss_fn, batch_fn, steps: int, val_batches, logger, tok, aux=None) -> float:
    """train() for `steps` steps with the flags' settings, into out_dir/<name>.pt, evaluating val loss."""
    return train(model, loss_fn, batch_fn, TrainConfig.from_args(args, steps=steps), name=name,
                 ckpt_path=Path(args.out_dir) / f"{name}.pt", logger=logger, saved_args=args,
                 tokenizer_sha256=tok.sha256, aux=aux,
                 eval_fn=lambda: evaluate(model, val_batches, args.device, args.dtype))


def print_report(report: dict, models: dict, tok, prompt, args):
    """The comparison table, then what each model writes after the prompt (the same sampling for all)."""
    w = max(9, *map(len, models))  # the name column fits "baseline_flops_matched" when it is there
    print(f"\n{'model':<{w}} {'params':>8} {'val loss':>9} {'val ppl':>8} {'top1 agr':>9} {'KL(T||m)':>9} "
          f"{'gen KL':>7} {'facts':>6} {'fwd tok/s':>10}")
    for name in models:
        r = report[name]
        facts = "-" if r["fact_accuracy"] is None else f"{r['fact_accuracy']:.1%}"
        print(f"{name:<{w}} {r['params'] / 1e6:>7.2f}M {r['val_loss']:>9.4f} {r['val_ppl']:>8.2f} "
              f"{r['top1_agreement']:>9.3f} {r['kl_from_teacher']:>9.4f} {r['gen_kl']:>7.4f} {facts:>6} "
              f"{r['fwd_tok_s']:>10,.0f}")
    if report.get("gap_closed") is not None:
        print(f"share of the teacher gap closed by distillation: {report['gap_closed']:.1%} "
              f"(baseline - student) / (baseline - teacher) in val loss")
    for name, n in report["steps_to_match"].items():
        print(f"steps to match {name} ({report[name]['val_loss']:.4f} after {report[name]['steps']} steps): "
              + (f"the student got there after {n} of its {args.steps} steps" if n else "the student never got there")
              + f" (evaluated every {args.eval_interval})")
    print(f"\nsamples (temperature 0.8, top-k 50) after the prompt {tok.decode(prompt[0].tolist())!r}:")
    for name, model in models.items():
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        ids = generate(model, prompt, args.sample_tokens, temperature=0.8, top_k=50, generator=g)
        print(f"--- {name}: {tok.decode(ids[0, prompt.size(1):].tolist())!r}")


def main():
    args = parse_args()
    t_start = time.perf_counter()
    # ------------------------------------------------------------------------------------------------------
    # device and data: every run below trains on the same windows for the same (seed, step)
    resolve_device(args)
    out_dir, logger = Path(args.out_dir), Logger(Path(args.out_dir) / "whitebox_log.jsonl")
    docs = load_corpus(args.data, args.data_seed, args.n_chars)
    tok = get_tokenizer(out_dir, docs, args.vocab_size, args.teacher)  # a Hugging Face teacher's, if one
    train_tokens, val_tokens = tokenize_split(docs, tok, args.block_size, args.val_fraction)
    val_batches = eval_batches(val_tokens, args.batch_size, args.block_size, args.eval_tokens)
    print(f"data: {len(docs)} documents | {len(train_tokens):,} train tokens | {len(val_tokens):,} val tokens "
          f"| vocab {tok.vocab_size}")

    def batch(step):
        return get_batch(train_tokens, step, args.batch_size, args.block_size, args.seed)

    # ------------------------------------------------------------------------------------------------------
    # teacher and student
    teacher = get_teacher(args, tok, train_tokens, logger)
    student = new_student(args, tok.vocab_size)
    if args.init == "teacher":
        init_from_teacher(student, teacher)
    init_state = {k: v.clone() for k, v in student.state_dict().items()}  # the baselines start here too
    pairs = parse_layer_map(args.layer_map, args.n_layer, teacher.config.n_layer)
    # One learned map d_s -> d_t per matched layer. It lives only during training: not in the saved student.
    projector = nn.ModuleList(nn.Linear(args.n_embd, teacher.config.n_embd, bias=False) for _ in pairs).to(args.device)
    use_hidden, use_attn = args.hidden_weight > 0, args.attn_weight > 0
    if use_attn and (args.n_embd % args.attn_heads or teacher.config.n_embd % args.attn_heads):
        raise UserError(f"--attn_heads {args.attn_heads} must divide n_embd ({args.n_embd}, {teacher.config.n_embd})")
    print(f"teacher {teacher.num_params() / 1e6:.2f}M params | student {student.num_params() / 1e6:.2f}M params "
          f"| layer map {pairs if use_hidden or use_attn else 'unused'}")

    # ------------------------------------------------------------------------------------------------------
    # the teacher's side of the KD term: online, a teacher forward pass per step; or offline, its top-k
    # log-probs computed once (model/topk_cache.py), with no teacher in memory while the student trains
    if args.cache_teacher_topk:
        cache = get_topk_cache(args, teacher, train_tokens, teacher_path(args), tok.sha256)
        teacher.to("meta")  # frees the weights (the config stays); the evaluation loads them again
        extra_flops = 0     # per token, beyond the student's training: the cache was paid for once

        def kd_batch(step):  # batch(step)'s windows, plus their cache rows (ids, logp, tail)
            return get_cached_batch(train_tokens, cache, step, args.batch_size, args.block_size, args.seed)

        def kd_term(x, labels, s_logits, *cached):
            return topk_kd_loss(s_logits, *cached, labels, args.divergence, args.temperature, args.jsd_beta,
                                args.skew), None
    else:
        kd_batch, teacher_fwd = batch, compiled(teacher, args.compile)
        # per token: the teacher's forward, and on (the expected share of) on-policy steps the student's sampling
        extra_flops = (teacher.flops_per_token(args.block_size, training=False) + args.on_policy
                       * (1 - args.on_policy_start) * student.flops_per_token(args.block_size, training=False))
        if args.on_policy:  # on a share of the steps, the student's own continuations of the windows' starts
            kd_batch = on_policy_batches(batch, student, args.on_policy, round(args.on_policy_start * args.steps),
                                         args.prompt_len, tok.eos_id, args.seed, args.device, args.dtype)

        def kd_term(x, labels, s_logits, sampled=None):
            with torch.inference_mode():  # no autograd bookkeeping, no kept activations: the teacher is frozen
                t_out = teacher_fwd(x, output_hidden_states=use_hidden, output_qkv=use_attn)
            kind = args.on_policy_divergence if sampled is not None and sampled[0] else args.divergence
            return kd_loss(s_logits, t_out["logits"], labels, kind, args.temperature, args.jsd_beta,
                           args.skew, args.kd_chunk_size), t_out

    # ------------------------------------------------------------------------------------------------------
    # the loss: alpha * CE + (1 - alpha) * KD, plus the hidden-state and attention-relation terms
    student_fwd = compiled(student, args.compile)

    def kd_step(x, labels, *extra):  # extra: the cache's rows (offline), or the on-policy flags
        s_out = student_fwd(x, output_hidden_states=use_hidden, output_qkv=use_attn)
        ce = cross_entropy(s_out["logits"], labels)
        kd, t_out = kd_term(x, labels, s_out["logits"], *extra)
        alpha = 0.0 if args.on_policy and extra[0][0] else args.alpha  # own samples: no ground truth for CE
        loss = alpha * ce + (1 - alpha) * kd
        parts = {"ce": ce, "kd": kd}
        if use_hidden:
            s_states = [proj(s_out["hidden_states"][i]) for proj, (i, _) in zip(projector, pairs)]
            t_states = [t_out["hidden_states"][j] for _, j in pairs]
            parts["hid"] = hidden_loss(s_states, t_states, labels, args.hidden_loss)
            loss = loss + args.hidden_weight * parts["hid"]
        if use_attn:
            s_qkvs, t_qkvs = [s_out["qkv"][i - 1] for i, _ in pairs], [t_out["qkv"][j - 1] for _, j in pairs]
            parts["attn"] = attention_relation_loss(s_qkvs, t_qkvs, labels, args.attn_heads)
            loss = loss + args.attn_weight * parts["attn"]
        return loss, {"loss": loss, **parts}

    # ------------------------------------------------------------------------------------------------------
    # distil, then the CE-only baselines from the same init on the same batches
    models, train_s = {"teacher": teacher, "student": student}, {}
    train_s["student"] = fit(args, "student", student, kd_step, kd_batch, args.steps, val_batches, logger, tok,
                             aux=projector if use_hidden else None)
    steps = {"student": args.steps} | ({} if args.no_baseline else {"baseline": args.steps})
    if not args.no_flops_matched:
        # Equal compute: a KD step also pays for the teacher's forward (none offline) and the student's sampling
        # (on-policy). The losses' own FLOPs are small next to the models' and are not counted.
        student_flops = student.flops_per_token(args.block_size)
        steps["baseline_flops_matched"] = round(args.steps * (student_flops + extra_flops) / student_flops)
        print(f"FLOPs-matched baseline: {steps['baseline_flops_matched']} CE steps = {args.steps} KD steps x "
              f"{(student_flops + extra_flops) / student_flops:.2f} (a KD step's FLOPs / a CE step's)")
    for name in list(steps)[1:]:
        model = models[name] = Transformer(student.config).to(args.device)
        model.load_state_dict(init_state)
        train_s[name] = fit(args, name, model, ce_loss(compiled(model, args.compile)), batch, steps[name],
                            val_batches, logger, tok)

    # ------------------------------------------------------------------------------------------------------
    # evaluate: the same validation windows for all, against the teacher (under torchrun, rank 0 alone)
    if not dist.is_main():
        return
    if args.cache_teacher_topk:  # offline KD freed the teacher's weights: back from its checkpoint
        teacher = models["teacher"] = get_teacher(args, tok, train_tokens, logger)
    report = whitebox_report(models, teacher, val_batches, logger.records, tok, train_s, steps,
                             None if args.data else args.data_seed, args.device, args.dtype)
    report.update(wall_s=time.perf_counter() - t_start, args=vars(args))
    report_path, plot_path = out_dir / "whitebox_report.json", out_dir / "whitebox_loss.svg"
    atomic_write_bytes(report_path, json.dumps(report, indent=2).encode())  # first: printing cannot lose it
    plotted = write_loss_plot(plot_path, logger.records, "val_loss", level=report["teacher"]["val_loss"])
    print_report(report, models, tok, val_batches[0][0][:1, :16].to(args.device), args)  # 16 validation tokens
    print(f"\nreport -> {report_path}" + (f" | loss curves -> {plot_path}" if plotted else "")
          + f" | wall time {report['wall_s']:.0f} s")


if __name__ == "__main__":
    run_main(main)
