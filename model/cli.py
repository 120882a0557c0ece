"""
The flags both scripts share, so that the two build the same tokenizer and the same teacher from the same
values and train with the same loop: data, output and hardware; the student's size; the teacher's
pretraining; the training loop. Also where --device/--dtype auto become what this machine has.
"""

from pathlib import Path

from model import dist
from model.common import CPU_BF16_MIN_WIDTH, UserError, cpu_has_native_bf16, pick_device, pick_dtype


def add_data_args(parser):
    """Data, output folder and hardware."""
    parser.add_argument("--data", default=None,
                        help="text the tokenizer and the teacher (and the white-box student) train on: .txt, "
                             "pretrain JSONL ({'text'}) or SFT JSONL ({'conversations'}); default: the embedded "
                             "story corpus")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the embedded story world and corpus")
    parser.add_argument("--n_chars", type=int, default=2_000_000, help="size of the embedded corpus in characters")
    parser.add_argument("--val_fraction", type=float, default=0.05,
                        help="share of the corpus's tokens held out for validation (never trained on)")
    parser.add_argument("--vocab_size", type=int, default=2048, help="BPE vocabulary size when a tokenizer is trained")
    parser.add_argument("--out_dir", default="out", help="tokenizer, checkpoints, caches, logs and reports go here")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast dtype (fp16 trains with loss scaling); auto = bf16 on CUDA, and on a CPU "
                             "with native bf16 (AVX512-BF16/AMX) for a student of --n_embd >= 128; else fp32")


def add_student_args(parser):
    """The student's size (when it is built from scratch)."""
    parser.add_argument("--n_layer", type=int, default=2, help="student layers")
    parser.add_argument("--n_embd", type=int, default=128, help="student width C")
    parser.add_argument("--n_head", type=int, default=4, help="student query heads")
    parser.add_argument("--n_kv_head", type=int, default=2, help="student key/value heads")


def resolve_device(args):
    """--device and --dtype auto -> this machine's, written back into args (the reports record them). On a
    CPU, auto decides by the student's width (--n_embd), the model both scripts train (model/common.py).
    Under torchrun this joins the job first (model/dist.py): each rank gets its own GPU, or the CPU."""
    device = pick_device(args.device)
    if dist.world_size() > 1 and not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device {device}: under torchrun, use cuda (NCCL) or cpu (gloo)")
    args.device = dist.init(device)
    auto = args.dtype == "auto"
    args.dtype = pick_dtype(args.dtype, args.device, args.n_embd)
    why = ""
    if auto and args.device == "cpu":
        why = (f" (auto: {'native' if cpu_has_native_bf16() else 'no native'} bf16, student width {args.n_embd}, "
               f"bf16 from {CPU_BF16_MIN_WIDTH})")
    print(f"device {args.device} | dtype {args.dtype}{why} | out_dir {Path(args.out_dir)}"
          + (f" | {dist.world_size()} ranks (torchrun)" if dist.world_size() > 1 else ""))


TEACHER_FLAGS = ("teacher_layers", "teacher_dim", "teacher_heads", "teacher_kv_heads", "teacher_steps", "teacher_lr",
                 "teacher_seed")


def add_teacher_args(parser):
    """The teacher flags, shared by both scripts so that they load or build the same teacher."""
    parser.add_argument("--teacher", default=None,
                        help="teacher checkpoint, or a Hugging Face Llama folder (config.json, *.safetensors, "
                             "tokenizer.model: the student then uses its tokenizer); default <out_dir>/teacher.pt, "
                             "pretrained first if missing")
    parser.add_argument("--teacher_layers", type=int, default=2, help="teacher pretraining: layers")
    parser.add_argument("--teacher_dim", type=int, default=256, help="teacher pretraining: width C")
    parser.add_argument("--teacher_heads", type=int, default=4, help="teacher pretraining: query heads")
    parser.add_argument("--teacher_kv_heads", type=int, default=2, help="teacher pretraining: key/value heads")
    parser.add_argument("--teacher_steps", type=int, default=1200, help="teacher pretraining: optimizer steps")
    parser.add_argument("--teacher_lr", type=float, default=2e-3, help="teacher pretraining: peak learning rate")
    parser.add_argument("--teacher_seed", type=int, default=1337,
                        help="teacher pretraining: seed of its init and batch order (--seed is the student's)")


def add_optim_args(parser, *, steps: int, lr: float, log_interval: int, eval_interval: int):
    """The training loop's flags; the defaults that differ between the scripts are arguments."""
    parser.add_argument("--seed", type=int, default=1337, help="seed of the inits, the batch order and sampling")
    parser.add_argument("--steps", type=int, default=steps, help="student (and baseline) optimizer steps")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="sequences per optimizer step, over all torchrun ranks (also the teacher's "
                             "pretraining batch)")
    parser.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step (batch_size splits)")
    parser.add_argument("--block_size", type=int, default=128,
                        help="sequence length T (also the teacher's pretraining T)")
    parser.add_argument("--lr", type=float, default=lr, help="student peak learning rate")
    parser.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine floor as a share of the peak lr")
    parser.add_argument("--warmup_steps", type=int, default=50, help="linear warmup steps")
    parser.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    parser.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this")
    parser.add_argument("--log_interval", type=int, default=log_interval, help="steps between log lines")
    parser.add_argument("--eval_interval", type=int, default=eval_interval, help="steps between validation passes")
    parser.add_argument("--ckpt_interval", type=int, default=250, help="steps between checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in out_dir")


def check_optim_args(parser, args):
    """Reject step counts and intervals below 1 and a batch that does not split into --grad_accum
    micro-batches (on each of torchrun's ranks)."""
    for flag in ("steps", "batch_size", "grad_accum", "block_size", "teacher_steps", "log_interval",
                 "eval_interval", "ckpt_interval"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    n = dist.world_size()  # under torchrun the batch is split across the ranks, then into micro-batches
    if args.batch_size % (args.grad_accum * n):
        parser.error(f"--batch_size {args.batch_size} must be a multiple of --grad_accum {args.grad_accum}"
                     + (f" x {n} torchrun processes" if n > 1 else ""))
