"""Training data as batches: documents as one seeded token stream (plain text), or chat
examples one per row with only the assistant's tokens as targets.

The data order is a pure function of (seed, step): batch m is drawn from the m-th slots
of a chain of seeded permutations of the training chunks, so a resumed run retraces the
uninterrupted one."""

from __future__ import annotations

import torch

from smoe.errors import SmoeError


def tokenize_documents(docs: list[dict], tokenizer) -> list[list[int]]:
    encoded = tokenizer.encode_batch([d["text"] for d in docs])
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return [bos + e + eos for e in encoded]


class SeededOrder:
    """An infinite order over num_chunks items: a chain of seeded permutations, one per
    epoch, so the item at any slot is a pure function of (seed, slot)."""

    def __init__(self, num_chunks: int, seed: int) -> None:
        self.num_chunks, self.seed = num_chunks, seed
        self._perm_epoch: int | None = None  # the epoch whose permutation is held
        self._perm_cached = torch.empty(0, dtype=torch.long)

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_epoch, self._perm_cached = epoch, torch.randperm(self.num_chunks, generator=g)
        return self._perm_cached

    def item_at(self, slot: int) -> int:
        epoch, pos = divmod(slot, self.num_chunks)
        return int(self._perm(epoch)[pos])


class TokenStream(SeededOrder):
    """Documents shuffled once (seeded) and concatenated; served as seq_len+1 windows."""

    def __init__(self, token_docs: list[list[int]], seq_len: int, seed: int) -> None:
        order = torch.randperm(len(token_docs), generator=torch.Generator().manual_seed(seed)).tolist()
        self.tokens = torch.tensor([t for i in order for t in token_docs[i]], dtype=torch.long)
        self.seq_len = seq_len
        num_chunks = (len(self.tokens) - 1) // seq_len
        if num_chunks < 1:
            raise SmoeError(f"not enough training tokens ({len(self.tokens)}) for one sequence of {seq_len}; "
                            "add data or lower the sequence length")
        super().__init__(num_chunks, seed)

    def batch(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        """The index-th batch of the infinite seeded order: inputs and targets [B, T]
        (every position is a real token: no padding mask)."""
        rows = []
        for slot in range(index * batch_size, (index + 1) * batch_size):
            start = self.item_at(slot) * self.seq_len
            rows.append(self.tokens[start : start + self.seq_len + 1])
        chunk = torch.stack(rows)  # [B, T+1]
        return chunk[:, :-1], chunk[:, 1:], None


class ExampleStream(SeededOrder):
    """Chat examples, one per row, right-padded to the longest row of the batch.

    Targets are -100 (ignored by cross-entropy) except where the next token is trained
    (an assistant token); `valid` [B, T] marks real tokens, so padding stays out of the
    load-balancing loss. Examples longer than seq_len+1 tokens are truncated.
    """

    def __init__(self, examples: list[tuple[list[int], list[bool]]], seq_len: int, seed: int, pad_id: int) -> None:
        kept = [(ids[: seq_len + 1], trained[: seq_len + 1]) for ids, trained in examples]
        self.truncated = sum(len(ids) > seq_len + 1 for ids, _ in examples)
        self.examples = [(ids, trained) for ids, trained in kept if any(trained[1:])]
        if not self.examples:
            raise SmoeError("no example has an assistant token within the sequence length; "
                            "raise --seq-len or shorten the prompts")
        super().__init__(len(self.examples), seed)
        self.pad_id = pad_id

    def rows(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = max(len(self.examples[i][0]) for i in indices) - 1
        x = torch.full((len(indices), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(indices), T), -100, dtype=torch.long)
        valid = torch.zeros((len(indices), T), dtype=torch.bool)
        for row, i in enumerate(indices):
            ids, trained = self.examples[i]
            n = len(ids) - 1
            x[row, :n] = torch.tensor(ids[:-1])
            y[row, :n] = torch.where(torch.tensor(trained[1:]), torch.tensor(ids[1:]), -100)
            valid[row, :n] = True
        return x, y, valid

    def batch(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.rows([self.item_at(slot) for slot in range(index * batch_size, (index + 1) * batch_size)])


def domain_streams(token_docs: list[list[int]], docs: list[dict]) -> dict[str, torch.Tensor]:
    by_domain: dict[str, list[int]] = {}
    for doc, tokens in zip(docs, token_docs, strict=True):
        by_domain.setdefault(doc.get("domain", "all"), []).extend(tokens)
    return {d: torch.tensor(t, dtype=torch.long) for d, t in sorted(by_domain.items())}
