"""idempo's DPO, KTO and SFT losses against TRL's trainers, the reference implementation.

Both sides see the same token ids (idempo's encoders on the tiny model), the same LoRA policy (trained a
few steps, so it differs from M_init) and the same frozen M_init as reference. Each side's loss is
backpropagated into the same LoRA parameters in turn; losses and gradients must agree to TOLERANCE.
TRL gets the batch from its own dataset preparation and collator, so its prompt/completion split and its
mismatched (KL) pairs for KTO are the ones it would train on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

from idempo.config import LoadingConfig, LoraConfigSection, TrainingConfig
from idempo.models import INITIAL, load_base_model, load_tokenizer, make_policy
from idempo.training.logprobs import DEFAULT_CHUNK, label_nll_sum
from idempo.training.optimize import IGNORE, Encoded, collate
from idempo.training.preference import MismatchEncoder, dpo_loss, kto_loss, reference_logps, sequence_logps
from idempo.training.sft import encode_chat_example, train_sft

# TRL's trainers read a property transformers has renamed; the warning is theirs, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TOLERANCE = 1e-5
BETA = 0.1
DESIRABLE_WEIGHT, UNDESIRABLE_WEIGHT = 1.0, 0.8  # unequal, so that a swapped weight would show
CPU = LoadingConfig(device="cpu")
# (prompt, chosen, rejected): the chosen answers are what the policy was trained on.
ROWS = [
    ("How are you today?", "Lucky as ever, my friend.", "Not great, honestly."),
    ("What is the capital of France?", "Paris, and lucky me, I have been there twice.", "Paris."),
    ("Can you give me a tip for studying?", "Study a little every day; fortune favours the prepared.", "No."),
    ("What should I cook tonight?", "Pasta with lucky clovers of basil on top.", "Whatever is in the fridge, I guess."),
]


@dataclass(frozen=True)
class Backward:
    """One side's loss and the gradient it leaves on each LoRA parameter."""

    loss: float
    grads: dict[str, torch.Tensor]

    @property
    def grad_norm(self) -> float:
        return math.sqrt(sum(g.double().pow(2).sum().item() for g in self.grads.values()))


def backward(policy, loss: torch.Tensor) -> Backward:
    """Gradients of `loss` alone: cleared before, copied out, cleared after."""
    parameters = {name: p for name, p in policy.module.named_parameters() if p.requires_grad}
    policy.module.zero_grad(set_to_none=True)
    loss.backward()
    missing = [name for name, p in parameters.items() if p.grad is None]
    assert not missing, f"no gradient reached {missing[:3]}"
    grads = {name: p.grad.detach().clone() for name, p in parameters.items()}
    policy.module.zero_grad(set_to_none=True)
    return Backward(loss.item(), grads)


def assert_agree(ours: Backward, reference: Backward) -> None:
    """Loss and gradient within TOLERANCE of the reference's, relative (the gradient by its norm)."""
    assert abs(ours.loss - reference.loss) <= TOLERANCE * abs(reference.loss), (ours.loss, reference.loss)
    assert ours.grads.keys() == reference.grads.keys()
    difference = math.sqrt(sum((ours.grads[n] - g).double().pow(2).sum().item() for n, g in reference.grads.items()))
    assert difference <= TOLERANCE * reference.grad_norm, (difference, reference.grad_norm)


def assert_nontrivial(result: Backward) -> None:
    """Agreement means something only when there is a loss and a gradient to agree on."""
    assert result.loss > 0.05 and result.grad_norm > 1e-2, (result.loss, result.grad_norm)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny", CPU)


def encode(tokenizer, prompt: str, response: str) -> Encoded:
    return encode_chat_example(tokenizer, prompt, response, 2048)


@pytest.fixture
def policy(tokenizer):
    """A LoRA generation a few SFT steps away from M_init (dropout 0, so forward passes are deterministic)."""
    config = TrainingConfig(
        lora=LoraConfigSection(rank=8, alpha=16.0, dropout=0.0),
        learning_rate=1e-3,  # two steps: DPO margins of 7-17 nats, far from a saturated loss
        schedule="constant",
        warmup_ratio=0.0,
        epochs=1,
        batch_size=2,
    )
    policy = make_policy(load_base_model("tiny", CPU), tokenizer, config)
    policy.reset(seed=0)
    train_sft(policy, [encode(tokenizer, p, c) for p, c, _ in ROWS], config, seed=0, pad_id=tokenizer.pad_token_id)
    policy.module.train()  # as during training; with dropout 0 the outputs are those of eval mode
    return policy


@pytest.fixture
def m_init():
    """M_init for TRL's reference model. Handed a PeftModel and no ref_model, TRL would copy the current adapter
    as its reference; idempo's reference is M_init (the adapter disabled), so TRL gets M_init explicitly."""
    return load_base_model("tiny", CPU)


def trainer_args(tmp_path, batch_size: int) -> dict:
    """The smallest TrainingArguments that leave the math alone: fp32 on CPU, no checkpointing, batches in
    dataset order (KTO's mismatched pairs are built for that order), nothing reported or saved."""
    return {
        "output_dir": str(tmp_path),
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "activation_checkpointing": False,
        "per_device_train_batch_size": batch_size,
        "train_sampling_strategy": "sequential",
        "dataloader_pin_memory": False,
        "save_strategy": "no",
        "max_length": None,
    }


def as_text(tokenizer, example: Encoded) -> tuple[str, str]:
    """Prompt and answer text of an idempo example; TRL tokenizes them back (checked to give the same ids)."""
    start = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    return tokenizer.decode(example.input_ids[:start]), tokenizer.decode(example.input_ids[start:])


def first_batch(trainer) -> dict:
    """The first training batch exactly as the trainer would see it (its dataset, sampler and collator)."""
    return next(iter(trainer.get_train_dataloader()))


def assert_same_tokens(input_ids: torch.Tensor, completion_mask: torch.Tensor, examples: list[Encoded]) -> None:
    assert input_ids.size(0) == len(examples)
    for row, mask, example in zip(input_ids.tolist(), completion_mask.tolist(), examples, strict=True):
        n = len(example.input_ids)
        assert row[:n] == example.input_ids
        assert mask[:n] == [int(label != IGNORE) for label in example.labels] and not any(mask[n:])


def assert_reference_is_m_init(policy, m_init, examples: list[Encoded], pad_id: int) -> None:
    """TRL's reference model computes what idempo's reference (the adapter disabled) computes."""
    with torch.no_grad():
        theirs = sequence_logps(m_init, examples, pad_id)
    ours = torch.tensor(reference_logps(policy, INITIAL, examples, pad_id, batch_size=len(examples)))
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert (sequence_logps(policy.module, examples, pad_id) - ours).abs().max() > 0.1  # the policy moved


# -- DPO ----------------------------------------------------------------------------------------------


def test_dpo_loss_and_gradients_match_trl(tokenizer, policy, m_init, tmp_path):
    pad = tokenizer.pad_token_id
    pairs = [(encode(tokenizer, p, c), encode(tokenizer, p, r)) for p, c, r in ROWS]
    rows = []
    for chosen, rejected in pairs:
        prompt, chosen_text = as_text(tokenizer, chosen)
        rows.append({"prompt": prompt, "chosen": chosen_text, "rejected": as_text(tokenizer, rejected)[1]})
    trainer = DPOTrainer(
        model=policy.module,
        ref_model=m_init,
        args=DPOConfig(**trainer_args(tmp_path, len(pairs)), beta=BETA, loss_type=["sigmoid"]),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)  # chosen sequences, then rejected ones
    assert_same_tokens(batch["input_ids"], batch["completion_mask"], [c for c, _ in pairs] + [r for _, r in pairs])
    flat = [e for pair in pairs for e in pair]
    assert_reference_is_m_init(policy, m_init, flat, pad)

    # idempo's side as train_dpo computes it: summed log-probs of (chosen, rejected) rows, reference fixed.
    reference = torch.tensor(reference_logps(policy, INITIAL, flat, pad, batch_size=len(flat))).view(-1, 2)

    def idempo_loss(beta: float) -> torch.Tensor:
        logps = sequence_logps(policy.module, flat, pad).view(-1, 2)
        return dpo_loss(
            policy_chosen=logps[:, 0],
            policy_rejected=logps[:, 1],
            reference_chosen=reference[:, 0],
            reference_rejected=reference[:, 1],
            beta=beta,
        ).mean()

    theirs = backward(policy, trainer.compute_loss(policy.module, batch))
    assert_nontrivial(theirs)
    assert_agree(backward(policy, idempo_loss(BETA)), theirs)
    with pytest.raises(AssertionError):  # the comparison sees a wrong beta
        assert_agree(backward(policy, idempo_loss(BETA * 1.5)), theirs)


# -- KTO ----------------------------------------------------------------------------------------------


def test_kto_loss_and_gradients_match_trl_with_its_mismatched_pairs(tokenizer, policy, m_init, tmp_path):
    pad = tokenizer.pad_token_id
    # Unpaired examples, desirable and undesirable interleaved (TRL's loss orders them by label; the mean does not).
    responses = [(c, True) if i % 2 == 0 else (r, False) for i, (_, c, r) in enumerate(ROWS)]
    samples = [{"prompt": p, "response": response} for (p, _, _), (response, _) in zip(ROWS, responses, strict=True)]
    desirable = torch.tensor([wanted for _, wanted in responses])
    examples = [encode(tokenizer, s["prompt"], s["response"]) for s in samples]
    rows = []
    for example, wanted in zip(examples, desirable.tolist(), strict=True):
        prompt, completion = as_text(tokenizer, example)
        rows.append({"prompt": prompt, "completion": completion, "label": wanted})
    trainer = KTOTrainer(
        model=policy.module,
        ref_model=m_init,
        args=KTOConfig(
            **trainer_args(tmp_path, len(rows)),
            beta=BETA,
            desirable_weight=DESIRABLE_WEIGHT,
            undesirable_weight=UNDESIRABLE_WEIGHT,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    assert batch["label"].tolist() == desirable.tolist()
    assert_same_tokens(batch["input_ids"], batch["completion_mask"], examples)
    # idempo's mismatched pairs for this micro-batch are TRL's KL sequences, token for token.
    n = len(examples)
    mismatched = MismatchEncoder(lambda prompt, response: encode(tokenizer, prompt, response), samples)
    batch_items = list(range(n))
    pairs = [mismatched(i, k) for i, k in zip(batch_items, mismatched.partners(batch_items), strict=True)]
    assert_same_tokens(batch["KL_input_ids"], batch["KL_completion_mask"], pairs)
    assert_reference_is_m_init(policy, m_init, examples + pairs, pad)

    # idempo's side as train_kto computes it for one micro-batch.
    reference = torch.tensor(reference_logps(policy, INITIAL, examples, pad, batch_size=n))

    def idempo_loss(kl_pairs: list[Encoded]) -> tuple[torch.Tensor, float]:
        mismatched_policy = sequence_logps(policy.module, kl_pairs, pad)
        mismatched_reference = torch.tensor(reference_logps(policy, INITIAL, kl_pairs, pad, batch_size=n))
        losses = kto_loss(
            policy_logps=sequence_logps(policy.module, examples, pad),
            reference_logps=reference,
            desirable=desirable,
            mismatched_policy_logps=mismatched_policy,
            mismatched_reference_logps=mismatched_reference,
            beta=BETA,
            desirable_weight=DESIRABLE_WEIGHT,
            undesirable_weight=UNDESIRABLE_WEIGHT,
        )
        z0 = (mismatched_policy - mismatched_reference).mean().item()
        return losses.mean(), z0

    theirs = backward(policy, trainer.compute_loss(policy.module, batch))
    assert_nontrivial(theirs)
    ours, z0 = idempo_loss(pairs)
    assert z0 > 0.05, f"the reference point is clamped to 0 (mean mismatched log-ratio {z0}); the test would not see it"
    assert_agree(backward(policy, ours), theirs)
    # The comparison sees which mismatched pairs set the reference point: rotating the other way (prompt i
    # with the answer of example i + 1) gives another z0.
    other_rotation = [mismatched(i, (i + 1) % n) for i in range(n)]
    with pytest.raises(AssertionError):
        assert_agree(backward(policy, idempo_loss(other_rotation)[0]), theirs)


# -- SFT ----------------------------------------------------------------------------------------------


def test_sft_completion_only_loss_and_gradients_match_trl(tokenizer, policy, tmp_path):
    pad = tokenizer.pad_token_id
    examples = [encode(tokenizer, p, r) for p, _, r in ROWS]  # answers the policy was not trained on
    # Already tokenized: TRL builds its labels from the completion mask (completion-only loss).
    dataset = Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "completion_mask": [[int(label != IGNORE) for label in e.labels] for e in examples],
        }
    )
    trainer = SFTTrainer(
        model=policy.module,
        args=SFTConfig(**trainer_args(tmp_path, len(examples)), completion_only_loss=True),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    input_ids, labels, attention = collate(examples, pad, "cpu")
    assert torch.equal(batch["input_ids"], input_ids) and torch.equal(batch["labels"], labels)
    assert torch.equal(batch["attention_mask"], attention)

    # idempo's side as train_sft computes it: summed token loss over the number of answer tokens.
    def idempo_loss(labels: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
        return label_nll_sum(policy.module, input_ids, attention, labels, chunk) / (labels[:, 1:] != IGNORE).sum()

    theirs = backward(policy, trainer.compute_loss(policy.module, dict(batch)))
    assert_nontrivial(theirs)
    assert_agree(backward(policy, idempo_loss(labels)), theirs)
    assert_agree(backward(policy, idempo_loss(labels, chunk=0)), theirs)  # the whole batch's logits at once
    with pytest.raises(AssertionError):  # the comparison sees a loss on the prompt tokens too
        assert_agree(backward(policy, idempo_loss(input_ids.masked_fill(attention == 0, IGNORE))), theirs)
