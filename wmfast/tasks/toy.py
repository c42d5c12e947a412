"""A toy task: a 2-block MLP language model on a deterministic synthetic sequence rule.

Not a model anyone wants: it exercises every part of the loop (tied embeddings, position embeddings, biases,
norms, dropout, blocks for activation checkpointing, validation) in milliseconds, so the loop's tests do not
depend on a particular world model, and it shows a new track what a Task has to provide.
Rule: x[t+1] = (3 * x[t] + 1) mod V, from a random start; the model predicts the next token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from wmfast.tasks.task import Task, register_task


class _Block(nn.Module):
    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):  # [B, T, D]
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class ToyLM(nn.Module):
    def __init__(self, vocab: int = 32, seq: int = 16, d: int = 32, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(_Block(d, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok_emb.weight  # tied
        nn.init.normal_(self.tok_emb.weight, std=0.02)

    def forward(self, tokens):  # [B, T] -> [B, T, V]
        x = self.tok_emb(tokens) + self.pos_emb[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class _RuleDataset(Dataset):
    def __init__(self, n: int, vocab: int, seq: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        rows = [start]
        for _ in range(seq):
            rows.append((3 * rows[-1] + 1) % vocab)
        self.data = torch.cat(rows, 1)  # [n, seq + 1]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"tokens": self.data[i]}


class ToyTask(Task):
    name = "toy"

    def __init__(self, data_dir: str | None = None, model: str = "tiny", vocab: int = 32, seq: int = 16, d: int = 32):
        self.vocab, self.seq, self.d = vocab, seq, d
        self._train, self._val = _RuleDataset(512, vocab, seq, 1), _RuleDataset(64, vocab, seq, 2)

    def build_model(self):
        return ToyLM(self.vocab, self.seq, self.d)

    def loss(self, model, batch):
        tokens = batch["tokens"]
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, self.vocab), tokens[:, 1:].reshape(-1))

    def train_dataset(self):
        return self._train

    def val_dataset(self):
        return self._val

    def flops_per_sample(self):
        # 6 x (matmul parameters) x tokens: forward 2, backward 4 FLOPs per parameter and token
        matmul_params = 2 * (self.d * 4 * self.d) * 2 + self.d * self.vocab
        return 6.0 * matmul_params * self.seq

    def tokens_per_sample(self):
        return self.seq

    def blocks(self, model):
        return list(model.blocks)

    def model_config(self):
        return {"kind": "toy", "vocab": self.vocab, "seq": self.seq, "d": self.d}


register_task("toy", lambda data_dir, model: ToyTask(data_dir, model))
