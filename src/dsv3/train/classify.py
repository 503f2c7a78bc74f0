"""Fine-tuning DeepseekV3ForSequenceClassification: "which play is this speech from?".

The backbone comes from a causal-LM checkpoint (the embedded model by default); the `score` head is new.
By default only the head trains, on the frozen backbone's pooled hidden states (computed once, so it is
fast on a CPU); train_backbone=True fine-tunes everything. Speeches are the text of one speaker's turn
with the speaker's name and stage directions removed, so the head must go by what is said.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv3.model import DeepseekV3ForSequenceClassification
from dsv3.tokenizer import Tokenizer
from dsv3.train.data import read_documents

_SPEAKER = re.compile(r"^[A-Z][A-Z' ,.-]+\.?$")        # "GONZALO.", "FIRST WITCH.", "LYSANDER"
_DIRECTION = re.compile(r"\[[^\]]*\]")


def speeches(text: str, min_chars: int = 60) -> list[str]:
    """The speeches of a play in the `shakespeare` package's modern-spelling layout: a block of lines
    after a line naming the speaker in capitals. Stage directions in [brackets] are dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if len(lines) < 2 or not _SPEAKER.match(lines[0]):
            continue
        speech = " ".join(_DIRECTION.sub("", ln) for ln in lines[1:]).strip()
        speech = re.sub(r"\s+", " ", speech)
        if len(speech) >= min_chars:
            out.append(speech)
    return out


@dataclass
class Examples:
    ids: torch.Tensor        # (N, T) right-padded with pad_token_id
    labels: torch.Tensor     # (N,)
    names: list[str]         # label -> play name


def play_examples(files: list[str | Path], tokenizer: Tokenizer, max_tokens: int = 64, per_play: int | None = None,
                  seed: int = 0) -> Examples:
    """Speeches of each play (label = the file's index), tokenized, cut to max_tokens, balanced by sampling
    `per_play` of each (default: as many as the shortest play has)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("sequence classification pools at the last non-pad token: the tokenizer needs a pad_token")
    per = [speeches("\n\n".join(read_documents([f]))) for f in files]  # a file is a label, even a .jsonl one
    empty = [str(f) for f, play in zip(files, per) if not play]
    if empty:
        raise ValueError(f"no speeches found in {', '.join(empty)}: a speech is a line naming the speaker in "
                         "capitals (\"HAMLET.\") then what they say, at least 60 characters (poems, and plays that name "
                         "speakers as \"Ham.\", have none)")
    n = min(len(s) for s in per) if per_play is None else per_play
    if n < 1:
        raise ValueError(f"per_play must be at least 1, not {n}")
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for label, play in enumerate(per):
        if len(play) < n:
            raise ValueError(f"{files[label]} has {len(play)} speeches, fewer than the {n} asked for")
        for i in torch.randperm(len(play), generator=g)[:n].tolist():
            rows.append(tokenizer.encode(play[i])[:max_tokens])
            labels.append(label)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
    names = [Path(f).name.split(".")[0].removesuffix("_gut") for f in files]
    return Examples(ids, torch.tensor(labels), names)


def classifier_from_lm(lm_dir: str | Path, num_labels: int, pad_token_id: int,
                       seed: int = 0) -> DeepseekV3ForSequenceClassification:
    """A float32 classifier whose backbone holds a causal-LM checkpoint's weights, with a fresh score head."""
    from dsv3.checkpoint import load_model

    lm = load_model(lm_dir, dtype=torch.float32, progress=False)
    cfg = lm.config
    cfg.num_labels, cfg.pad_token_id = num_labels, pad_token_id
    model = DeepseekV3ForSequenceClassification(cfg, dtype=torch.float32)
    backbone = {k: v for k, v in lm.model.state_dict().items() if k in model.model.state_dict()}
    model.model.load_state_dict(backbone)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=g) * cfg.initializer_range)
    return model


def pooled_hidden(model: DeepseekV3ForSequenceClassification, ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The backbone's hidden state at each row's last non-pad token: what the score head sees. (N, D)."""
    pad = model.config.pad_token_id
    out = []
    with torch.no_grad():
        for chunk in ids.split(batch_size):
            mask = (chunk != pad).long()
            hidden = model.model(chunk, attention_mask=mask)                     # (B, T, D)
            last = (torch.arange(chunk.shape[1], device=chunk.device) * mask).argmax(-1)
            out.append(hidden[torch.arange(len(chunk), device=chunk.device), last])
    return torch.cat(out)


def accuracy(model: DeepseekV3ForSequenceClassification, ex: Examples, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for ids, labels in zip(ex.ids.split(batch_size), ex.labels.split(batch_size)):
            logits = model(ids, attention_mask=(ids != model.config.pad_token_id).long())
            correct += (logits.argmax(-1) == labels).sum().item()
    return correct / len(ex.labels)


def split_examples(ex: Examples, test_fraction: float, seed: int) -> tuple[Examples, Examples]:
    perm = torch.randperm(len(ex.labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(perm) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return Examples(ex.ids[train], ex.labels[train], ex.names), Examples(ex.ids[test], ex.labels[test], ex.names)


def finetune_classifier(model: DeepseekV3ForSequenceClassification, train: Examples, steps: int = 300, lr: float = 1e-2,
                        batch_size: int = 32, train_backbone: bool = False, weight_decay: float = 0.01,
                        seed: int = 0) -> list[float]:
    """Train the score head (and the backbone if asked) with AdamW on cross-entropy; returns the losses."""
    torch.manual_seed(seed)
    params = list(model.parameters()) if train_backbone else list(model.score.parameters())
    for p in model.parameters():
        p.requires_grad_(train_backbone)
    model.score.weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    features = None if train_backbone else pooled_hidden(model, train.ids)
    losses = []
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(train.labels), (batch_size,))
        if features is None:
            ids = train.ids[batch]
            logits = model(ids, attention_mask=(ids != model.config.pad_token_id).long())
        else:
            logits = model.score(features[batch])
        loss = F.cross_entropy(logits.float(), train.labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
