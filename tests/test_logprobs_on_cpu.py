"""The training losses' log-probs computed a chunk of labelled tokens at a time equal those of the whole
batch's logits, values and gradients, and never hold a full-vocabulary tensor of more than a chunk."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from idempo.config import LoadingConfig, TrainingConfig
from idempo.models import load_base_model, load_tokenizer, make_policy
from idempo.training.logprobs import chunked_path, label_logps, label_nll_sum
from idempo.training.optimize import collate
from idempo.training.sft import encode_chat_example


class TensorShapes(TorchDispatchMode):
    """Records the shape of every tensor an operation returns, forward and backward."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


@pytest.fixture(scope="module")
def trained_policy():
    """The tiny model under a LoRA adapter with non-zero weights, and a batch of two answers of unequal length."""
    loading = LoadingConfig(device="cpu")
    tokenizer = load_tokenizer("tiny", loading)
    policy = make_policy(load_base_model("tiny", loading), tokenizer, TrainingConfig())
    policy.reset(0)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.normal_(0, 0.05)
    examples = [
        encode_chat_example(tokenizer, "What is luck?", "Luck is the feeling that today things go your way.", 256),
        encode_chat_example(tokenizer, "Hi", "Hello there.", 256),
    ]
    return policy, collate(examples, tokenizer.pad_token_id, torch.device("cpu"))


def values_and_gradients(policy, batch, chunk: int, loss=label_logps):
    for parameter in policy.trainable_parameters():
        parameter.grad = None
    input_ids, labels, attention = batch
    with TensorShapes() as seen:
        value = loss(policy.module, input_ids, attention, labels, chunk)
        value.sum().backward()
    gradient = torch.cat([p.grad.flatten() for p in policy.trainable_parameters()])
    return value.detach(), gradient, seen.shapes


def vocabulary_rows(shapes, head: torch.Tensor) -> list[int]:
    """How many rows of vocabulary-wide values each recorded tensor held (the output layer's weight aside)."""
    vocabulary = head.shape[0]
    weight = {tuple(head.shape), tuple(head.T.shape)}
    return [math.prod(shape[:-1]) for shape in shapes if shape and shape[-1] == vocabulary and shape not in weight]


def test_chunked_log_probs_equal_the_whole_logits_and_hold_a_chunk_of_vocabulary_at_most(trained_policy):
    policy, batch = trained_policy
    head = policy.module.get_output_embeddings().weight
    labelled = int((batch[1][:, 1:] != -100).sum())
    assert chunked_path(policy.module) and labelled > 5
    plain, plain_gradient, plain_shapes = values_and_gradients(policy, batch, 0)
    for chunk in (5, 1024):
        chunked, gradient, shapes = values_and_gradients(policy, batch, chunk)
        # fp32 on CPU: per-token log-probs within 1e-5 nats, gradients within 1e-5 of their largest entry
        assert torch.allclose(chunked, plain, atol=1e-5, rtol=0) and (chunked == 0).equal(plain == 0)
        assert (gradient - plain_gradient).abs().max() <= 1e-5 * plain_gradient.abs().max()
        assert max(vocabulary_rows(shapes, head)) == min(chunk, labelled)
    # the whole batch's logits: every position of every row over the vocabulary
    assert max(vocabulary_rows(plain_shapes, head)) >= batch[0].numel() - 2


def test_a_trained_output_layer_gets_the_same_gradients_chunked(trained_policy):
    """Full finetuning trains the output layer too: its chunks are recomputed in the backward pass."""
    _, batch = trained_policy
    loading = LoadingConfig(device="cpu")
    tokenizer = load_tokenizer("tiny", loading)
    policy = make_policy(load_base_model("tiny", loading), tokenizer, TrainingConfig(finetune="full"))
    assert policy.module.get_output_embeddings().weight.requires_grad
    plain, plain_gradient, _ = values_and_gradients(policy, batch, 0)
    chunked, gradient, _ = values_and_gradients(policy, batch, 5)
    assert torch.allclose(chunked, plain, atol=1e-5, rtol=0)
    assert (gradient - plain_gradient).abs().max() <= 1e-5 * plain_gradient.abs().max()


def test_the_sft_loss_is_the_summed_cross_entropy_either_way(trained_policy):
    policy, batch = trained_policy
    plain = values_and_gradients(policy, batch, 0, label_nll_sum)
    chunked = values_and_gradients(policy, batch, 7, label_nll_sum)
    assert chunked[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
    assert plain[0].item() == pytest.approx(-label_logps(policy.module, batch[0], batch[2], batch[1], 0).sum().item())
    assert (chunked[1] - plain[1]).abs().max() <= 1e-5 * plain[1].abs().max()


def test_a_model_with_soft_capped_logits_keeps_the_whole_logits_path():
    """Gemma 2 caps its logits after the output layer: the chunked path would leave that out, so it is not taken."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "head_dim": 16}
    config = Gemma2Config(vocab_size=97, num_attention_heads=2, num_key_value_heads=1, **shape)
    model = Gemma2ForCausalLM(config).eval()
    input_ids = torch.randint(0, 97, (2, 9))
    labels = input_ids.clone()
    labels[:, :4] = -100
    attention = torch.ones_like(input_ids)
    assert config.final_logit_softcapping and not chunked_path(model)
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1) * (labels[:, 1:] != -100)
    assert torch.allclose(label_logps(model, input_ids, attention, labels, 3), expected, atol=1e-6)
