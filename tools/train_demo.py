"""Train offload's demo model: a small Mixtral-style MoE language model of the King James Bible.

    .venv/bin/pip install -e '.[train]'          # PyTorch (CPU) and sentencepiece, training only
    .venv/bin/python tools/train_demo.py --work /tmp/demo-train [--steps 1800]

Steps, each written into --work (rerunning skips what is there):
  1. corpus.txt  the King James Version from Debian's bible-kjv-text package (the text is
                 public domain; `apt-get download` fetches the .debs, the package's own
                 `bible` program decompresses its text). One chapter per document: a
                 "Genesis 1" heading, then one verse per line, verse numbers dropped.
                 Every 20th chapter is held out (heldout.txt), the rest is train.txt.
  2. tokenizer   sentencepiece BPE, 4096 pieces, byte fallback, no normalization, a dummy
                 prefix space: exactly what llama.cpp's SPM ("llama") tokenizer computes.
  3. training    a llama-arch MoE (8 experts, top-2, softmax router renormalized over the
                 top 2 as Mixtral; Switch-style load-balancing loss), seeded, fixed step
                 count, 2 threads; a checkpoint every 200 steps (training resumes from it).
  4. export      F32 GGUF with the conventions of llama.cpp's convert_hf_to_gguf.py (the
                 model is trained in Hugging Face's rotate-half RoPE layout and Q/K rows are
                 permuted to ggml's interleaved pairs on export, as the converter does), the
                 sentencepiece vocabulary as the converter writes it, then Q8_0 by llama.cpp's
                 own quantizer. Checked: llama.cpp's tokens equal sentencepiece's on the
                 held-out text, llama.cpp's logits on the F32 file equal PyTorch's.
  5. report      held-out perplexity (PyTorch, llama.cpp F32, offload Q8_0), expert load,
                 routing locality and next-layer predictability, as JSON (report.json).

The shipped file is offload/data/offload-demo-kjv-moe-Q8_0.gguf (--install copies it there).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DEMO_FILE = "offload-demo-kjv-moe-Q8_0.gguf"
HELDOUT_EVERY = 20  # every 20th chapter is held out


@dataclass
class ModelArgs:
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 512  # per expert
    n_experts: int = 8
    n_experts_used: int = 2
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


@dataclass
class TrainArgs:
    steps: int = 1800
    batch: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    balance_coef: float = 0.01  # Switch Transformer's alpha
    dropout: float = 0.1  # on each residual branch; 1M tokens are seen several times
    seed: int = 1234
    threads: int = 2


# --- 1. corpus ---------------------------------------------------------------------------

def fetch_corpus(work: Path) -> Path:
    """corpus.txt from Debian's bible-kjv-text (data) and bible-kjv (its reader)."""
    out = work / "corpus.txt"
    if out.exists():
        return out
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", "bible-kjv", "bible-kjv-text"], cwd=debs, check=True)
    root = debs / "root"
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    raw = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "gen1:1-rev22:21"],
                         check=True, capture_output=True, text=True).stdout
    out.write_text(format_chapters(raw))
    return out


def format_chapters(raw: str) -> str:
    """`bible`'s output (a "Book N" heading, then numbered verses wrapped at 80 columns) as
    chapters separated by blank lines: the heading, then one unnumbered verse per line."""
    chapters: list[list[str]] = []
    prev_blank = True
    for line in raw.splitlines():
        verse = re.match(r"^\s+(\d+) (.*)$", line)
        if not line.strip():
            pass
        elif verse:
            chapters[-1].append(verse.group(2).strip())
        elif prev_blank:  # a heading stands between blank lines
            chapters.append([line.strip()])
        else:  # the rest of a wrapped verse
            chapters[-1][-1] += " " + line.strip()
        prev_blank = not line.strip()
    return "\n\n".join("\n".join(c) for c in chapters) + "\n"


def split_chapters(corpus: Path) -> tuple[list[str], list[str]]:
    chapters = corpus.read_text().strip().split("\n\n")
    train = [c for i, c in enumerate(chapters) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    held = [c for i, c in enumerate(chapters) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, held


# --- 2. tokenizer ------------------------------------------------------------------------

def train_tokenizer(work: Path, train: list[str], vocab_size: int) -> Path:
    import sentencepiece as spm

    prefix = work / "tokenizer"
    model = prefix.with_suffix(".model")
    if model.exists():
        return model
    lines = work / "train-lines.txt"
    lines.write_text("\n".join(train) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(lines), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, character_coverage=1.0, num_threads=2,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=0, shuffle_input_sentence=False,
        minloglevel=2)
    return model


def verse_pairs(chapters: list[str]) -> list[str]:
    """Two consecutive verses as one short document (verses 1-2, 3-4, ... of each chapter):
    they teach the model to answer a line with the next one and then stop (EOS), which is
    what the chat template asks of it."""
    pairs = []
    for c in chapters:
        verses = c.split("\n")[1:]
        pairs += [verses[i] + "\n" + verses[i + 1] for i in range(0, len(verses) - 1, 2)]
    return pairs


def encode_documents(sp, chapters: list[str]) -> np.ndarray:
    """BOS chapter EOS, concatenated: the token stream the model trains on."""
    ids: list[int] = []
    for c in chapters:
        ids += [sp.bos_id()] + sp.encode(c) + [sp.eos_id()]
    return np.array(ids, dtype=np.int64)


# --- 3. model ----------------------------------------------------------------------------

def build_model(args: ModelArgs, dropout: float = 0.0):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, dim: int, eps: float):
            super().__init__()
            self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def rope_tables(head_dim: int, n: int, theta: float):
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        ang = torch.outer(torch.arange(n, dtype=torch.float32), inv)
        ang = torch.cat([ang, ang], dim=-1)  # Hugging Face layout: first half pairs with second half
        return ang.cos(), ang.sin()

    def rotate_half(x):
        a, b = x.chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)

    class Attention(nn.Module):
        def __init__(self, a: ModelArgs):
            super().__init__()
            self.n_heads, self.n_kv, self.hd = a.n_heads, a.n_kv_heads, a.dim // a.n_heads
            self.wq = nn.Linear(a.dim, a.n_heads * self.hd, bias=False)
            self.wk = nn.Linear(a.dim, a.n_kv_heads * self.hd, bias=False)
            self.wv = nn.Linear(a.dim, a.n_kv_heads * self.hd, bias=False)
            self.wo = nn.Linear(a.n_heads * self.hd, a.dim, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            q = self.wq(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)
            k = self.wk(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
            v = self.wv(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return self.wo(y.transpose(1, 2).reshape(b, t, -1))

    class MoE(nn.Module):
        """Mixtral's sparse FFN: softmax router, top-k, weights renormalized over the top k."""

        def __init__(self, a: ModelArgs):
            super().__init__()
            self.k = a.n_experts_used
            self.router = nn.Linear(a.dim, a.n_experts, bias=False)
            scale = a.dim ** -0.5
            self.w_gate = nn.Parameter(torch.randn(a.n_experts, a.ffn_dim, a.dim) * scale)
            self.w_up = nn.Parameter(torch.randn(a.n_experts, a.ffn_dim, a.dim) * scale)
            self.w_down = nn.Parameter(torch.randn(a.n_experts, a.dim, a.ffn_dim) * a.ffn_dim ** -0.5)

        def forward(self, x):
            shape = x.shape
            x = x.reshape(-1, shape[-1])
            probs = self.router(x).float().softmax(-1)
            top_w, top_i = probs.topk(self.k, dim=-1)
            top_w = top_w / top_w.sum(-1, keepdim=True)
            out = torch.zeros_like(x)
            for e in range(probs.shape[-1]):
                tok, slot = (top_i == e).nonzero(as_tuple=True)
                if tok.numel() == 0:
                    continue
                xe = x[tok]
                h = F.silu(xe @ self.w_gate[e].T) * (xe @ self.w_up[e].T)
                out.index_add_(0, tok, (h @ self.w_down[e].T) * top_w[tok, slot, None])
            # Switch Transformer balance loss: n_experts * sum_e (share of assignments) * (mean prob)
            share = torch.zeros(probs.shape[-1]).index_add_(0, top_i.reshape(-1), torch.ones(top_i.numel()))
            balance = probs.shape[-1] * (share / top_i.numel() * probs.mean(0)).sum()
            return out.view(shape), balance, top_i

    class Block(nn.Module):
        def __init__(self, a: ModelArgs):
            super().__init__()
            self.attn_norm, self.attn = RMSNorm(a.dim, a.norm_eps), Attention(a)
            self.ffn_norm, self.moe = RMSNorm(a.dim, a.norm_eps), MoE(a)
            self.drop = nn.Dropout(dropout)

        def forward(self, x, cos, sin):
            x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
            y, balance, top_i = self.moe(self.ffn_norm(x))
            return x + self.drop(y), balance, top_i

    class Transformer(nn.Module):
        def __init__(self, a: ModelArgs):
            super().__init__()
            self.args = a
            self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
            self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
            self.norm = RMSNorm(a.dim, a.norm_eps)
            self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
            cos, sin = rope_tables(a.dim // a.n_heads, a.max_seq_len, a.rope_theta)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)

        def forward(self, tokens, keep_hidden: bool = False):
            t = tokens.shape[1]
            x = self.tok_embeddings(tokens)
            balance, routes, hidden = 0.0, [], [x]
            for layer in self.layers:
                x, b, top_i = layer(x, self.cos[:t], self.sin[:t])
                balance, routes = balance + b, routes + [top_i]
                if keep_hidden:
                    hidden.append(x)
            logits = self.output(self.norm(x))
            return logits, balance / len(self.layers), routes, hidden

    return Transformer(args)


# --- 3b. training ------------------------------------------------------------------------

def train(work: Path, margs: ModelArgs, targs: TrainArgs, data: np.ndarray, held: np.ndarray):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(targs.seed)
    torch.set_num_threads(targs.threads)
    model = build_model(margs, targs.dropout)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": targs.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=targs.lr, betas=(0.9, 0.95))
    ckpt, step, log = work / "checkpoint.pt", 0, []
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
        print(f"resuming at step {step}", flush=True)
    rng = np.random.default_rng(targs.seed)
    # Batch offsets for every step are drawn up front, so a resumed run sees the same data.
    offsets = rng.integers(0, len(data) - targs.seq_len - 1, size=(targs.steps, targs.batch))
    t0 = time.perf_counter()
    while step < targs.steps:
        lr = lr_at(step, targs)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = offsets[step][:, None] + np.arange(targs.seq_len + 1)
        batch = torch.from_numpy(data[idx])
        logits, balance, _, _ = model(batch[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, margs.vocab_size), batch[:, 1:].reshape(-1))
        loss = ce + targs.balance_coef * balance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0 or step == targs.steps:
            el = time.perf_counter() - t0
            rec = {"step": step, "lr": lr, "ce": ce.item(), "balance": balance.item(), "seconds": el}
            if step % 200 == 0 or step == targs.steps:
                model.eval()
                rec["heldout_ppl"] = perplexity_torch(model, held, margs.max_seq_len)
                model.train()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log + [rec]},
                           ckpt)
            log.append(rec)
            print(json.dumps(rec), flush=True)
    return model, log


def lr_at(step: int, t: TrainArgs) -> float:
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    frac = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * frac))


def perplexity_torch(model, tokens: np.ndarray, window: int) -> float:
    """Perplexity over consecutive non-overlapping windows (each scored from its first token)."""
    import torch
    import torch.nn.functional as F

    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, window):
            chunk = torch.from_numpy(tokens[s:s + window + 1])[None]
            if chunk.shape[1] < 2:
                break
            logits = model(chunk[:, :-1])[0]
            nll += float(F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
            n += chunk.shape[1] - 1
    return math.exp(nll / n)


# --- 4. export ---------------------------------------------------------------------------

def hf_to_ggml_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: Hugging Face's rotate-half RoPE pairs
    dimension i with i + d/2 in each head; ggml's (rope type NORM) pairs 2i with 2i+1."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# A line in, the next line out: each message is a document of its own, as the verse pairs
# the model trained on (BOS, the user's line, a newline; the reply ends with EOS).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token }}"
    "{%- else -%}{{ bos_token }}{{ message['content'] }}\n{%- endif -%}"
    "{%- endfor -%}")


def export_gguf(model, sp_model: Path, path: Path) -> Path:
    """The trained model as an F32 GGUF that llama.cpp loads as a Mixtral-style llama."""
    import sentencepiece as spm
    from gguf import GGUFWriter, TokenType

    a: ModelArgs = model.args
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    hd = a.dim // a.n_heads
    w = GGUFWriter(path, "llama")
    w.add_name("offload-demo-kjv-moe")
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_block_count(a.n_layers)
    w.add_feed_forward_length(a.ffn_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_expert_count(a.n_experts)
    w.add_expert_used_count(a.n_experts_used)
    w.add_vocab_size(a.vocab_size)
    w.add_file_type(0)  # ALL_F32
    # The vocabulary as convert_hf_to_gguf.py's _create_vocab_sentencepiece writes it.
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode())
        scores.append(sp.get_score(i))
        types.append(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                     else TokenType.BYTE if sp.is_byte(i) else TokenType.UNUSED if sp.is_unused(i)
                     else TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_chat_template(CHAT_TEMPLATE)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["tok_embeddings.weight"])
    for i in range(a.n_layers):
        p, q = f"layers.{i}.", f"blk.{i}."
        w.add_tensor(q + "attn_norm.weight", sd[p + "attn_norm.weight"])
        w.add_tensor(q + "attn_q.weight", hf_to_ggml_rows(sd[p + "attn.wq.weight"], a.n_heads))
        w.add_tensor(q + "attn_k.weight", hf_to_ggml_rows(sd[p + "attn.wk.weight"], a.n_kv_heads))
        w.add_tensor(q + "attn_v.weight", sd[p + "attn.wv.weight"])
        w.add_tensor(q + "attn_output.weight", sd[p + "attn.wo.weight"])
        w.add_tensor(q + "ffn_norm.weight", sd[p + "ffn_norm.weight"])
        w.add_tensor(q + "ffn_gate_inp.weight", sd[p + "moe.router.weight"])
        w.add_tensor(q + "ffn_gate_exps.weight", sd[p + "moe.w_gate"])
        w.add_tensor(q + "ffn_up_exps.weight", sd[p + "moe.w_up"])
        w.add_tensor(q + "ffn_down_exps.weight", sd[p + "moe.w_down"])
    w.add_tensor("output_norm.weight", sd["norm.weight"])
    w.add_tensor("output.weight", sd["output.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- 5. checks and report ----------------------------------------------------------------

def check_tokenizer(sp_model: Path, gguf_path: Path, chapters: list[str]) -> int:
    """llama.cpp's tokenization of each held-out chapter equals sentencepiece's."""
    import sentencepiece as spm
    from offload.testing import llama_cpp_model

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    llm = llama_cpp_model(gguf_path, n_ctx=64)
    n = 0
    for c in chapters:
        ours, theirs = [sp.bos_id()] + sp.encode(c), llm.tokenize(c.encode(), add_bos=True)
        if ours != theirs:
            raise SystemExit(f"tokenizer mismatch on {c[:40]!r}: sentencepiece {ours[:12]} llama.cpp {theirs[:12]}")
        n += len(ours)
    del llm
    return n


def routing_facts(model, tokens: np.ndarray, window: int) -> dict:
    """On held-out text: expert load per layer, how often an expert chosen for token t is
    chosen again for token t+1, and the recall of predicting layer L+1's top-k by applying
    layer L+1's ffn_norm and router to the hidden state leaving layer L (what the runtime's
    lookahead predictor does)."""
    import torch

    a: ModelArgs = model.args
    load = np.zeros((a.n_layers, a.n_experts))
    repeat = np.zeros(a.n_layers)
    recall = np.zeros(a.n_layers - 1)
    n_tok = n_pairs = 0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, window):
            chunk = torch.from_numpy(tokens[s:s + window])[None]
            _, _, routes, hidden = model(chunk, keep_hidden=True)
            r = [ri.numpy() for ri in routes]  # (T, k) per layer
            T = r[0].shape[0]
            for l in range(a.n_layers):
                load[l] += np.bincount(r[l].reshape(-1), minlength=a.n_experts)
                same = (r[l][1:, :, None] == r[l][:-1, None, :]).any(-1).sum()
                repeat[l] += same / a.n_experts_used
            for l in range(a.n_layers - 1):
                nxt = model.layers[l + 1]
                # the hidden state after layer l, before layer l+1's attention
                guess = nxt.moe.router(nxt.ffn_norm(hidden[l + 1][0])).topk(a.n_experts_used, dim=-1).indices.numpy()
                recall[l] += (guess[:, :, None] == r[l + 1][:, None, :]).any(-1).sum() / a.n_experts_used
            n_tok += T
            n_pairs += T - 1
    share = load / load.sum(1, keepdims=True)
    return {
        "tokens": n_tok,
        "expert_share_per_layer": share.round(4).tolist(),
        "expert_share_min_max": [float(share.min()), float(share.max())],
        "repeat_rate_per_layer": (repeat / n_pairs).round(4).tolist(),
        "repeat_rate_random": a.n_experts_used / a.n_experts,
        "next_layer_recall_per_layer": (recall / n_tok).round(4).tolist(),
        "next_layer_recall_random": a.n_experts_used / a.n_experts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/offload-demo-train"))
    ap.add_argument("--steps", type=int, default=TrainArgs.steps)
    ap.add_argument("--install", action="store_true", help=f"copy the Q8_0 file to offload/data/{DEMO_FILE}")
    opts = ap.parse_args()
    work = opts.work
    work.mkdir(parents=True, exist_ok=True)
    margs, targs = ModelArgs(), TrainArgs(steps=opts.steps)

    import sentencepiece as spm
    import torch

    train_ch, held_ch = split_chapters(fetch_corpus(work))
    sp_model = train_tokenizer(work, train_ch, margs.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    data, held = encode_documents(sp, train_ch + verse_pairs(train_ch)), encode_documents(sp, held_ch)
    (work / "heldout.txt").write_text("\n\n".join(held_ch) + "\n")
    print(f"corpus: {len(train_ch)} train chapters and their verse pairs ({len(data)} tokens), {len(held_ch)} held out "
          f"({len(held)} tokens)", flush=True)

    final = work / "model.pt"
    if final.exists():
        model = build_model(margs)
        state = torch.load(final, weights_only=False)
        model.load_state_dict(state["model"])
        log = state["log"]
    else:
        model, log = train(work, margs, targs, data, held)
        torch.save({"model": model.state_dict(), "log": log}, final)
    model.eval()

    f32 = export_gguf(model, sp_model, work / "demo-F32.gguf")
    n_checked = check_tokenizer(sp_model, f32, held_ch)
    from offload.testing import llama_cpp_logits, quantize_model

    window = margs.max_seq_len
    sample = held[:window]
    with torch.no_grad():
        ref = model(torch.from_numpy(sample)[None])[0][0].numpy()
    theirs = llama_cpp_logits(f32, sample.tolist(), n_ctx=window)
    f32_rel = float(np.linalg.norm(theirs - ref) / np.linalg.norm(ref))
    q8 = quantize_model(f32, work / DEMO_FILE, "Q8_0")

    import offload

    m = offload.Model.load(q8, n_ctx=window)
    report = {
        "corpus": "King James Version (Debian bible-kjv-text 4.38), public domain",
        "model": asdict(margs), "train": asdict(targs),
        "train_tokens": int(len(data)), "heldout_tokens": int(len(held)),
        "tokens_seen": targs.steps * targs.batch * targs.seq_len,
        "train_seconds": log[-1]["seconds"] if log else None,
        "final_train_ce": log[-1]["ce"] if log else None,
        "tokenizer_checked_tokens": n_checked,
        "llama_cpp_f32_vs_torch_rel_l2": f32_rel,
        "heldout_ppl_torch": perplexity_torch(model, held, window),
        "heldout_ppl_offload_q8_0": perplexity_offload(m, held, window),
        "gguf_bytes": q8.stat().st_size,
        "routing": routing_facts(model, held, window),
        "log": log,
    }
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("log", "routing")}, indent=1))
    print(json.dumps(report["routing"], indent=1))
    if opts.install:
        dst = Path(__file__).resolve().parent.parent / "offload" / "data" / DEMO_FILE
        shutil.copy(q8, dst)
        print(f"installed {dst}")


def perplexity_offload(m, tokens: np.ndarray, window: int) -> float:
    """The same windows as perplexity_torch, scored by offload (logits of every position)."""
    nll, n = 0.0, 0
    for s in range(0, len(tokens) - 1, window):
        chunk = tokens[s:s + window + 1]
        if len(chunk) < 2:
            break
        logits = m.logits(chunk[:-1].tolist()).astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        nll += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
        n += len(chunk) - 1
    return math.exp(nll / n)


if __name__ == "__main__":
    sys.exit(main())
