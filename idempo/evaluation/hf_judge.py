"""The `hf` judge: a local Hugging Face model, read over whole numbers (`idempo.evaluation.numbers`).

Per batch: reasoning written first where the template leaves a block open (`idempo.evaluation.reasoning`);
one forward pass over the left-padded prompts, with explicit position ids so that padding is right for
any architecture; then the number trie's leaves teacher-forced on each prompt's KV cache, which gives the
full next-token distribution at every node, so p(v) is exact (docs/metrics.md). No sampling: deterministic.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from idempo.chat import stop_token_ids
from idempo.evaluation.judging import JudgeSpec, RubricJudge, numbers_answer, unclosed_reasoning_answer
from idempo.evaluation.numbers import (
    ANCHOR,
    Path,
    continues_number,
    spelling_paths,
    spelling_probabilities,
    text_after_anchor,
    trie_children,
    trie_leaves,
    trie_nodes,
)
from idempo.evaluation.reasoning import (
    PROBE,
    TEMPLATE_SETTINGS,
    WHITESPACE_AFTER_CLOSE,
    closes_reasoning,
    is_whitespace,
    leaves_reasoning_open,
)
from idempo.models import load_base_model, load_tokenizer

# Tokens decoded when looking for the closing tag: enough for a tag split into several tokens.
CLOSE_WINDOW = 16


@dataclass
class NumberTrie:
    """How one tokenizer writes the numbers 0..100, and which of its tokens continue a number."""

    paths: dict[str, Path]
    leaves: list[Path]
    children: list[int]  # every token that extends a node, in the order of the readings' columns
    continues: torch.Tensor  # bool per vocabulary entry: its text starts with a digit

    @classmethod
    def of(cls, tokenizer, vocab_size: int, device) -> NumberTrie:
        paths = spelling_paths(lambda text: tokenizer.encode(text, add_special_tokens=False))
        nodes = trie_nodes(paths.values())
        known = min(vocab_size, len(tokenizer))
        anchor_ids = tokenizer.encode(ANCHOR, add_special_tokens=False)
        options = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
        anchor = tokenizer.decode(anchor_ids, **options)
        anchored = tokenizer.batch_decode([[*anchor_ids, i] for i in range(known)], **options)
        alone = tokenizer.batch_decode([[i] for i in range(known)], **options)
        continues = torch.zeros(vocab_size, dtype=torch.bool)
        continues[:known] = torch.tensor(
            [continues_number(text_after_anchor(a, anchor, b)) for a, b in zip(anchored, alone, strict=True)]
        )
        return cls(paths, trie_leaves(nodes), trie_children(nodes), continues.to(device))


class HFJudge(RubricJudge):
    def __init__(self, spec: JudgeSpec):
        super().__init__(spec)
        self.tokenizer = load_tokenizer(spec.config.model, spec.loading)
        self._model = None  # loaded on first use: a fully cached evaluation never loads it
        self._trie: NumberTrie | None = None
        self._thinking: bool | None = None  # the template's generation prompt leaves a reasoning block open

    @property
    def model(self):
        if self._model is None:
            self._model = load_base_model(self.spec.config.model, self.spec.loading)
        return self._model

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def trie(self) -> NumberTrie:
        if self._trie is None:
            vocab_size = self.model.get_output_embeddings().weight.shape[0]
            self._trie = NumberTrie.of(self.tokenizer, vocab_size, self.device)
        return self._trie

    @property
    def thinking(self) -> bool:
        if self._thinking is None:
            self._thinking = leaves_reasoning_open(self._decode(self._render(PROBE)))
        return self._thinking

    def _answer_settings(self) -> dict:
        return {
            "numbers": "whole",
            "max_reasoning_tokens": self.config.max_reasoning_tokens,
            "template": dict(TEMPLATE_SETTINGS),
            "dtype": self.spec.loading.dtype,  # bf16 and fp32 read slightly different numbers
        }

    def _fetch(self, prompts: list[str], keys: list[str]) -> list[dict]:
        raws = []
        for start in range(0, len(prompts), self.config.batch_size):
            batch = self._fetch_batch(prompts[start : start + self.config.batch_size])
            raws += [self.remember(k, raw) for k, raw in zip(keys[start:], batch, strict=False)]
        return raws

    @torch.inference_mode()
    def _fetch_batch(self, prompts: list[str]) -> list[dict]:
        sequences = [self._render(p) for p in prompts]
        reasoning: list[str | None] = [None] * len(prompts)
        closed: list[bool | None] = [None] * len(prompts)
        thinking = list(range(len(prompts))) if self.thinking else []
        if thinking:
            for i, (written, done) in zip(thinking, self._reason([sequences[i] for i in thinking]), strict=True):
                reasoning[i], closed[i] = self._decode(written), done
                sequences[i] = sequences[i] + written
        readable = [i for i in range(len(prompts)) if closed[i] is not False]
        read = dict(zip(readable, self._read_numbers([sequences[i] for i in readable]), strict=True))
        return [
            numbers_answer(read[i], reasoning[i], closed[i]) if i in read else unclosed_reasoning_answer(reasoning[i])
            for i in range(len(prompts))
        ]

    def _render(self, prompt: str) -> list[int]:
        """The prompt's ids, thinking turned off where the template reads `enable_thinking`."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **TEMPLATE_SETTINGS,
        )["input_ids"]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _prefix(self, sequences: list[list[int]]):
        """One forward pass over the left-padded sequences, with explicit position ids: the output (the
        last position's logits and the cache) and the attention mask."""
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences], device=self.device)
        attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        return out, attention

    def _read_numbers(self, sequences: list[list[int]]) -> list[dict[str, float]]:
        """p(spelling) after each sequence, from the full next-token distribution at every trie node."""
        if not sequences:
            return []
        trie = self.trie
        out, attention = self._prefix(sequences)
        next_logprobs: list[dict[Path, dict[int, float]]] = [{} for _ in sequences]
        ends: list[dict[Path, float]] = [{} for _ in sequences]
        steps, end = self._readings(out.logits[:, -1])
        for b in range(len(sequences)):
            next_logprobs[b][()] = dict(zip(trie.children, steps[b].tolist(), strict=True))
            ends[b][()] = end[b].item()

        lengths = attention.sum(-1)
        depth = max(len(leaf) for leaf in trie.leaves)
        rows = [(b, leaf) for b in range(len(sequences)) for leaf in trie.leaves]
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(rows), self.config.continuation_batch):
            chunk = rows[start : start + self.config.continuation_batch]
            index = torch.tensor([b for b, _ in chunk], device=self.device)
            tokens = torch.tensor([list(leaf) + [pad] * (depth - len(leaf)) for _, leaf in chunk], device=self.device)
            # Padding after a leaf's last token is never read: causal attention keeps it out of the readings.
            mask = torch.cat([attention[index], torch.ones_like(tokens)], dim=-1)
            logits = self.model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=lengths[index, None] + torch.arange(depth, device=self.device),
                cache=_rows_of(out.cache, index),
                use_cache=True,
            ).logits
            steps, end = self._readings(logits)
            for r, (b, leaf) in enumerate(chunk):
                for d in range(len(leaf)):
                    node = leaf[: d + 1]
                    next_logprobs[b][node] = dict(zip(trie.children, steps[r, d].tolist(), strict=True))
                    ends[b][node] = end[r, d].item()
        return [spelling_probabilities(trie.paths, next_logprobs[b], ends[b]) for b in range(len(sequences))]

    def _readings(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of the trie's child tokens, and the probability that the number ends
        (the next token's text does not start with a digit), at every position of `logits`."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        children = torch.tensor(self.trie.children, device=logprobs.device)
        ended = logprobs.masked_fill(self.trie.continues, -torch.inf).logsumexp(dim=-1).exp()
        return logprobs[..., children].cpu(), ended.cpu()

    def _reason(self, sequences: list[list[int]]) -> list[tuple[list[int], bool]]:
        """Greedy reasoning after each sequence: (the tokens written, the closing tag and the whitespace
        after it included; whether it closed within `max_reasoning_tokens`)."""
        budget = self.config.max_reasoning_tokens
        eos = set(stop_token_ids(self.tokenizer, getattr(self.model, "generation_config", None)))
        out, attention = self._prefix(sequences)
        cache, lengths = out.cache, attention.sum(-1)
        written: list[list[int]] = [[] for _ in sequences]
        state = ["reasoning"] * len(sequences)  # reasoning -> after_close -> closed, or unclosed
        after_close = [0] * len(sequences)
        for step in range(budget + WHITESPACE_AFTER_CLOSE + 1):
            tokens = out.logits[:, -1].argmax(dim=-1)
            for b, token in enumerate(tokens.tolist()):
                if state[b] == "reasoning":
                    if token in eos:
                        state[b] = "unclosed"
                        continue
                    written[b].append(token)
                    if closes_reasoning(self._decode(written[b][-CLOSE_WINDOW:])):
                        state[b] = "after_close"
                    elif len(written[b]) >= budget:
                        state[b] = "unclosed"
                elif state[b] == "after_close":
                    whitespace = token not in eos and is_whitespace(self._decode([token]))
                    if whitespace and after_close[b] < WHITESPACE_AFTER_CLOSE:
                        written[b].append(token)
                        after_close[b] += 1
                    else:
                        state[b] = "closed"
            if all(s in ("closed", "unclosed") for s in state):
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=attention,
                position_ids=(lengths + step)[:, None],
                cache=cache,
                use_cache=True,
            )
            cache = out.cache
        return [(tokens, s != "unclosed") for tokens, s in zip(written, state, strict=True)]


def _rows_of(cache, index: torch.Tensor):
    """The prompts' cache, one row per continuation (`index` names each row's prompt), leaving the
    prompts' own cache as it is for the next chunk."""
    rows = copy.copy(cache)
    rows.layers = [copy.copy(layer) for layer in cache.layers]
    rows.reorder_cache(index)
    return rows
