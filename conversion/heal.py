"""`heal`: recover a converted model's quality with LoRA (peft) and distillation from the model it was converted from.

The student is the hf_mla checkpoint with LoRA on its attention projections and the new latent down-projection
(`kv_a_proj_with_mqa`, plus `kv_a_layernorm` where the model has one) trained in full: they are small (hidden x
(d_c + RoPE) per layer) and they are exactly what the conversion approximated. The teacher is the source model, run
in inference mode on the same batch. The loss is the KL divergence of the next-token distributions, plus, by
default, a per-layer match of hidden states (the teacher's layer outputs are the targets every student layer should
reproduce: a far denser signal per token than the final distribution alone).

The loop runs on `accelerate.Accelerator`, so the same command runs under `accelerate launch` (DDP / FSDP).
Checkpoints (`accelerator.save_state` + the step and data order) go to OUTPUT.checkpoints/; `resume=True` continues
from the last one. The output is written to a temporary folder and renamed at the end.
"""

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging


logger = logging.get_logger(__name__)

LOSSES = ("kd", "lm", "kd+lm")
ATTENTION_TARGETS = ["q_proj", "q_a_proj", "q_b_proj", "kv_b_proj", "o_proj"]
MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class HealSettings:
    tokens: int = 200_000
    seq_len: int = 512
    batch_size: int = 1  # per micro-batch: on CPU, larger transient tensors cost more than they save (measured)
    grad_accum: int = 1  # more, smaller steps heal more per token (measured: 2.47x vs 2.95x the source ppl)
    lr: float = 1e-3
    max_grad_norm: float = 1.0  # clip the gradient's global norm (0: off)
    lora_rank: int = 32
    lora_alpha: float | None = None  # None: 2 * rank
    mlp: bool = False  # LoRA on the MLP too
    full_latent: bool = True  # train kv_a_proj_with_mqa (and kv_a_layernorm) in full instead of with LoRA
    full_lr_scale: float = 0.1  # learning rate of the fully trained weights, relative to the LoRA one
    loss: str = "kd"
    hidden_weight: float = 1.0  # weight of the per-layer hidden-state match (0: logits only)
    temperature: float = 1.0
    warmup: float = 0.05  # fraction of steps with linear warm-up, then cosine decay
    eval_every: int = 25
    eval_sequences: int = 4
    checkpoint_every: int = 50
    mixed_precision: str = "auto"  # "auto" (bf16 where the hardware computes it natively) | "bf16" | "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    targets: list[str] = field(default_factory=list)  # filled from the model's modules


def _load_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    import hf_mla  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _load_teacher(teacher, allow_pickle=False, trust_remote_code=False):
    from .evaluate import load_for_eval

    return load_for_eval(teacher, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def _mixed_precision(choice: str) -> str:
    """"auto": bf16 autocast where bf16 matmuls are native (CUDA with bf16, CPUs with AVX512-BF16 / AMX: ~1.4x the
    tokens/s of fp32 on the reference 2-core machine), else fp32. Weights and optimizer state stay fp32 either way."""
    from .calibrate import native_bf16

    if choice != "auto":
        return choice
    return "bf16" if native_bf16() else "no"


def _lora_model(model, s: HealSettings):
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in ATTENTION_TARGETS + (MLP_TARGETS if s.mlp else []) if t in names]
    full = [m for m in ("kv_a_proj_with_mqa", "kv_a_layernorm") if m in names] if s.full_latent else []
    if not s.full_latent:
        targets.append("kv_a_proj_with_mqa")
    s.targets = targets
    config = LoraConfig(
        r=s.lora_rank, lora_alpha=s.lora_alpha or 2 * s.lora_rank, lora_dropout=0.0, target_modules=targets,
        modules_to_save=full or None, bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, config)


def _kd_loss(student_logits, teacher_logits, temperature):
    """KL(teacher || student) per token, mean over every position (the last one too: the teacher's distribution
    there needs no label). Written as cross-entropy against the teacher's probabilities minus the teacher's entropy,
    a constant, so that the student side is one log-softmax and a weighted sum over (B*T, vocab) tensors that are
    views, never sliced copies: at a 49k vocabulary these passes cost as much as the transformer layers."""
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V).float()  # (B*T, V)
    t = teacher_logits.reshape(-1, V).float()  # (B*T, V)
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    with torch.no_grad():
        log_pt = F.log_softmax(t, -1)  # (B*T, V)
        pt = log_pt.exp_()  # in place: log_pt is not needed again
        entropy = torch.special.entr(pt).sum() / pt.shape[0]
    return (F.cross_entropy(s, pt) - entropy) * temperature**2


def _hidden_loss(student_hidden, teacher_hidden):
    """Mean over layers of ||h_s - h_t||^2 / ||h_t||^2 per token: each layer's output pulled toward the teacher's,
    scale-free so that layers with large activations do not dominate."""
    losses = []
    for hs, ht in zip(student_hidden[1:], teacher_hidden[1:]):  # [0] is the embedding output: the same in both
        num = (hs.float() - ht.float()).pow(2).sum(-1)
        den = ht.float().pow(2).sum(-1).clamp(min=1e-6)
        losses.append((num / den).mean())
    return torch.stack(losses).mean()


def _perplexity(model, ids, batch_size):
    """Held-out perplexity of the packed rows (each row one window), in eval mode, back to training after."""
    from .evaluate import perplexity

    model.eval()
    try:
        return perplexity(model, ids, context=ids.shape[1], batch_size=batch_size)
    finally:
        model.train()


def _latest_checkpoint(folder: Path) -> Path | None:
    steps = sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if folder.is_dir() else []
    return steps[-1] if steps else None


def heal(
    model_dir,
    output_dir,
    *,
    teacher=None,
    data=None,
    text_field: str = "text",
    resume: bool = False,
    adapter_only: bool = False,
    overwrite: bool = False,
    keep_checkpoints: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    _stop_after: int | None = None,
    **settings,
) -> dict:
    """Heal the hf_mla checkpoint in `model_dir` and write the result to `output_dir`; returns the healing report.

    `teacher`: the source model (folder, .gguf, Hub id, "default"); `data`: text files / folders / dataset names, or
    None to train on text the teacher samples. `settings`: the fields of HealSettings (tokens, lr, lora_rank, loss,
    hidden_weight, ...). `_stop_after`: tests only, stop (as if killed) after that many optimizer steps.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from .data import load_texts, pack_tokens, sample_texts_from_model
    from .export import check_output_dir, require_hf_mla

    unknown = set(settings) - set(HealSettings.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown heal settings {sorted(unknown)}; see HealSettings.")
    s = HealSettings(**settings)
    if s.loss not in LOSSES:
        raise ValueError(f"loss is {s.loss!r}; choose one of {LOSSES}.")
    if s.loss != "lm" and teacher is None:
        raise ValueError(f"loss {s.loss!r} distils from a teacher: pass --teacher SOURCE (the model you converted), "
                         "or use --loss lm.")  # fmt: skip
    if data is None and teacher is None:
        raise ValueError("no training data: pass --data FILES, or --teacher to train on text the teacher samples.")
    model_dir = require_hf_mla(model_dir, "heal a converted model (`hf-mla convert` first) and pass the original as "
                               "--teacher.")  # fmt: skip
    out = check_output_dir(output_dir, overwrite)
    ckpt_root = out.parent / f"{out.name}.checkpoints"
    if not resume and _latest_checkpoint(ckpt_root) is not None:
        raise FileExistsError(f"{ckpt_root} holds checkpoints of an earlier run; pass --resume to continue it, "
                              "or delete that folder to start over.")  # fmt: skip

    # accelerate keeps its state per process and refuses another precision once one run set it (a notebook or test
    # session that heals twice, "auto" then "no"); start each run from a fresh state, as transformers' Trainer does.
    # The process group, if any, is kept.
    AcceleratorState._reset_state()
    # cpu=True where there is no accelerator, so that processes started by torchrun / `accelerate launch --multi_gpu`
    # on a CPU-only machine join one gloo process group instead of each training alone.
    accelerator = Accelerator(mixed_precision=_mixed_precision(s.mixed_precision), gradient_accumulation_steps=s.grad_accum,
                              cpu=not torch.accelerator.is_available())  # fmt: skip
    set_seed(s.seed)
    t0 = time.time()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    teacher_model = None
    if teacher is not None:
        teacher_model, teacher_tok = _load_teacher(teacher, allow_pickle, trust_remote_code)
        if teacher_tok is not None and teacher_tok.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"the teacher {teacher} and the student {model_dir} use different tokenizers, so their next-token "
                "distributions cannot be compared; pass the model the conversion started from as --teacher."
            )
        teacher_model.requires_grad_(False).eval().to(accelerator.device)

    # Data: packed once, in the same order on every process and on resume (the permutation is seeded).
    need = (s.tokens // s.seq_len) + s.eval_sequences
    if data is not None:
        ids = pack_tokens(tokenizer, load_texts(data, text_field=text_field), seq_len=s.seq_len, max_tokens=need * s.seq_len)
        data_desc = [str(d) for d in ([data] if isinstance(data, (str, os.PathLike)) else data)]
    else:
        ids = sample_texts_from_model(teacher_model, tokenizer, n_sequences=need, seq_len=s.seq_len, seed=s.seed)
        data_desc = "sampled from the teacher"
    if ids.shape[0] <= s.eval_sequences:
        raise ValueError(f"the data gives only {ids.shape[0]} sequences of {s.seq_len} tokens, and {s.eval_sequences} "
                         "are held out for evaluation; pass more text or lower --seq-len / --eval-sequences.")  # fmt: skip
    eval_ids, train_ids = ids[: s.eval_sequences], ids[s.eval_sequences :]
    order = torch.randperm(train_ids.shape[0], generator=torch.Generator().manual_seed(s.seed))
    train_ids = train_ids[order]
    per_step = s.batch_size * s.grad_accum * accelerator.num_processes
    if train_ids.shape[0] < per_step:
        raise ValueError(f"{train_ids.shape[0]} training sequences of {s.seq_len} tokens are fewer than one optimizer step "
                         f"takes ({s.batch_size} x {s.grad_accum} accumulation x {accelerator.num_processes} processes); "
                         "raise --tokens or pass more text.")  # fmt: skip
    total_steps = train_ids.shape[0] // per_step
    train_ids = train_ids[: total_steps * per_step]
    loader = torch.utils.data.DataLoader(train_ids, batch_size=s.batch_size, shuffle=False)

    model = _load_model(model_dir)
    model.config.use_cache = False
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = _lora_model(model, s)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # LoRA starts from zero (B = 0) and needs a large step; the full weights are already close to right.
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    full = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    groups = [{"params": lora, "lr": s.lr}] + ([{"params": full, "lr": s.lr * s.full_lr_scale}] if full else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = max(1, int(s.warmup * total_steps))

    def schedule(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # The scheduler is stepped by hand once per optimizer step: a prepared one would step once per process.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)

    step, history, tokens_seen, train_seconds = 0, {"loss": [], "eval": []}, 0, 0.0
    latest = _latest_checkpoint(ckpt_root) if resume else None
    if latest is not None:
        accelerator.load_state(str(latest))
        meta = json.loads((latest / "heal_state.json").read_text())
        if meta["settings"] != asdict(s):
            raise ValueError(f"{latest} was written with other settings ({meta['settings']}); resume with the same "
                             "options, or delete the checkpoints to start over.")  # fmt: skip
        step, history, tokens_seen, train_seconds = meta["step"], meta["history"], meta["tokens_seen"], meta["seconds"]
        logger.info(f"Resuming from {latest} (step {step} of {total_steps})")
    elif resume:
        logger.warning(f"--resume: no checkpoint in {ckpt_root}; starting from the beginning.")

    if step == 0:
        base_ppl = _perplexity(accelerator.unwrap_model(model), eval_ids, s.batch_size)
        history["eval"].append({"step": 0, "tokens": 0, "perplexity": base_ppl})
    bar = tqdm(total=total_steps, initial=step, desc="Healing", unit="step",
               disable=not (progress and accelerator.is_main_process))  # fmt: skip
    skip = loader if step == 0 else accelerator.skip_first_batches(loader, step * s.grad_accum)
    batches = iter(skip)
    t_start = time.time()
    while step < total_steps:
        for _ in range(s.grad_accum):
            batch = next(batches)  # (b, T)
            with accelerator.accumulate(model):
                loss, parts = _loss(model, teacher_model, batch, s, accelerator.autocast)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm or math.inf)
                    parts["grad_norm"] = float(norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            tokens_seen += batch.numel() * accelerator.num_processes
        step += 1
        elapsed = train_seconds + time.time() - t_start
        history["loss"].append({"step": step, "tokens": tokens_seen, **parts})
        bar.update()
        bar.set_postfix(loss=f"{parts['loss']:.4f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}")
        if step % s.eval_every == 0 or step == total_steps:
            ppl = _perplexity(accelerator.unwrap_model(model), eval_ids, s.batch_size)
            history["eval"].append({"step": step, "tokens": tokens_seen, "perplexity": ppl})
            if accelerator.is_main_process:
                bar.write(f"step {step}: held-out perplexity {ppl:.3f}")
        if (step % s.checkpoint_every == 0 and step < total_steps) or step == _stop_after:
            _save_checkpoint(accelerator, ckpt_root / f"step-{step}", step, history, tokens_seen, elapsed, s)
        if step == _stop_after:
            bar.close()
            return {"stopped_at": step}
    bar.close()
    train_seconds += time.time() - t_start

    report = {
        "model": str(model_dir), "teacher": None if teacher is None else str(teacher), "data": data_desc,
        "settings": asdict(s), "trainable_parameters": trainable, "steps": total_steps, "tokens_seen": tokens_seen,
        "train_seconds": round(train_seconds, 1), "tokens_per_s": round(tokens_seen / max(train_seconds, 1e-9), 1),
        "processes": accelerator.num_processes, "held_out_perplexity": history["eval"], "loss_curve": history["loss"],
        "total_seconds": round(time.time() - t0, 1), "adapter_only": adapter_only,
    }  # fmt: skip
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_output(accelerator.unwrap_model(model), tokenizer, model_dir, out, report, adapter_only, overwrite)
        if not keep_checkpoints:
            shutil.rmtree(ckpt_root, ignore_errors=True)
    accelerator.wait_for_everyone()
    return report


def _loss(model, teacher, batch, s: HealSettings, autocast=contextlib.nullcontext):
    """(loss, its parts as floats) of one micro-batch. `autocast`: the accelerator's, so the teacher (not prepared)
    computes in the same precision as the student."""
    want_hidden = teacher is not None and s.hidden_weight > 0 and s.loss != "lm"
    out = model(input_ids=batch, output_hidden_states=want_hidden, use_cache=False)
    loss = out.logits.new_zeros((), dtype=torch.float32)
    parts = {}
    if "lm" in s.loss.split("+"):
        labels = F.pad(batch[:, 1:], (0, 1), value=-100)  # (b, T): position t predicts token t + 1; none after the last
        lm = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), labels.reshape(-1))
        parts["lm"] = lm.item()
        loss = loss + lm
    if teacher is not None and s.loss != "lm":
        with torch.no_grad(), autocast():
            t_out = teacher(input_ids=batch, output_hidden_states=want_hidden, use_cache=False)
        kd = _kd_loss(out.logits, t_out.logits, s.temperature)
        parts["kd"] = kd.item()
        loss = loss + kd
        if want_hidden:
            hid = _hidden_loss(out.hidden_states, t_out.hidden_states)
            parts["hidden"] = hid.item()
            loss = loss + s.hidden_weight * hid
    parts["loss"] = loss.item()
    return loss, parts


def _save_checkpoint(accelerator, path: Path, step, history, tokens_seen, seconds, s):
    """accelerate state (model, optimizer, scheduler, RNG) + where the run was; written to a temp name and renamed
    so that a kill during the save leaves the previous checkpoint as the latest."""
    tmp = path.parent / f".{path.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        meta = {"step": step, "history": history, "tokens_seen": tokens_seen, "seconds": seconds, "settings": asdict(s)}
        (tmp / "heal_state.json").write_text(json.dumps(meta))
        os.replace(tmp, path)
    accelerator.wait_for_everyone()


def _write_output(peft_model, tokenizer, model_dir: Path, out: Path, report: dict, adapter_only: bool, overwrite: bool):
    from .card import write_model_card
    from .export import atomic_output_dir

    with atomic_output_dir(out, overwrite) as tmp:
        if adapter_only:
            peft_model.save_pretrained(tmp)
        else:
            merged = peft_model.merge_and_unload()
            merged.config.use_cache = True
            merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in ("generation_config.json", "conversion_report.json"):
            if (model_dir / name).is_file() and not (tmp / name).exists():
                shutil.copy2(model_dir / name, tmp / name)
        (tmp / "healing_report.json").write_text(json.dumps(report, indent=2) + "\n")
        if not adapter_only and (tmp / "conversion_report.json").is_file():
            write_model_card(tmp)
