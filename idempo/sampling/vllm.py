"""The `vllm` sampler: one vLLM engine per trial, M_init loaded once, each generation its merged weights
or a LoRA request.

The engine holds the base weights for the whole trial. With `sampling.weights: merged` (the default) a
generation's weights, its adapter folded into M_init's layer by layer from the trial's policy, are loaded
into the running engine before it is sampled and M_init's are loaded back before M_init is; this is the
weight sync of TRL's colocate mode (the engine in the trial's process, `model.load_weights` on its worker),
and the engine then decodes at base-model speed with LoRA off. With `adapter` a generation's adapter
directory (as PEFT saved it) is passed with each request, so several generations can share one batch;
moving to the next cycle costs an adapter load, not an engine restart. When the trainer shares the GPUs,
`sleep()` offloads the engine's weights (merged ones included) to CPU memory and drops its KV cache while
a generation trains (`sleep(level=1)`); the next `generate` wakes it. With
`sleep_while_training: auto` it sleeps only when training would not fit beside it (`TrainingMemory`).

Prompts are rendered and tokenized by the model's own tokenizer, exactly as the trainer encodes them,
and sent as token ids; answers are decoded the same way as by the `hf` sampler. (The branching factor's
statistics need full next-token distributions, which vLLM does not return: idempo.evaluation.branching
reads them from the trial's policy module.)"""

from __future__ import annotations

import importlib.util
import os
import time

from idempo.chat import stop_token_ids
from idempo.config import ConfigError, ExperimentConfig, SamplingParams
from idempo.models import INITIAL, Generation, Policy, model_path, resolve_device, resolve_dtype
from idempo.sampling.base import Completion, PromptEncoding

# vLLM serves LoRA adapters up to these ranks; an adapter's rank is rounded up to the next one.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def engine_lora_rank(rank: int) -> int:
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ConfigError([f"training.lora.rank: got {rank}; the vllm sampler serves ranks up to {VLLM_LORA_RANKS[-1]}"])


# Free GPU memory kept beyond what the last training grew by, before the engine stays awake through the next:
# the caching allocator's fragments, cuBLAS workspaces, a longer batch than the last one.
HEADROOM_BYTES = 2 << 30


class TrainingMemory:
    """Whether the next training fits on the GPU beside the awake engine: the memory this process (policy and
    trainer) reserved at its peak since the last look, less what it holds now, plus headroom, against the
    device's free memory (which counts the engine and any trial sharing the GPU). Nothing is measured before
    the first training, so that one always asks for the memory."""

    def __init__(self):
        self.measured = False

    def short(self) -> bool:
        import torch

        need = torch.cuda.max_memory_reserved() - torch.cuda.memory_reserved() + HEADROOM_BYTES
        free, _ = torch.cuda.mem_get_info()
        torch.cuda.reset_peak_memory_stats()  # the next look measures the training that follows this one
        short, self.measured = not self.measured or free < need, True
        return short


class VLLMSampler(PromptEncoding):
    def __init__(
        self, llm, tokenizer, stop_ids: list[int], sleep_while_training: bool | str, policy: Policy | None = None
    ):
        self.llm = llm
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.sleep_while_training = sleep_while_training  # True, False or "auto"
        self.memory = TrainingMemory()
        self.policy = policy  # None: generations are LoRA requests; else merged weights are read from it
        self.serving = INITIAL  # whose weights the engine holds
        self.asleep = False
        self._adapter_ids: dict[str, int] = {}
        self.timings: dict[str, list[float]] = {"sleep": [], "wake": []}

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        """vLLM needs its package (the `gpu` extra) and a CUDA GPU; say so before any model is loaded."""
        import torch

        problems = []
        if importlib.util.find_spec("vllm") is None:
            problems.append(
                "sampling.backend: got 'vllm' but the vllm package is not installed; install idempo with "
                "the gpu extra (pip install -e '.[gpu]') on a CUDA machine, or use sampling.backend 'hf'"
            )
        if not torch.cuda.is_available():
            problems.append(
                "sampling.backend: got 'vllm' but no CUDA GPU is visible; vllm samples on GPUs only, "
                "use sampling.backend 'hf' on this machine"
            )
        elif resolve_device(config.loading.device).type != "cuda":
            problems.append(
                f"loading.device: got {config.loading.device!r}; the vllm sampler runs on a GPU, so M_init must "
                "load on one too ('auto' or 'cuda')"
            )
        if config.sampling.weights == "merged" and config.sampling.vllm.tensor_parallel_size > 1:
            problems.append(
                "sampling.weights: 'merged' loads a generation's weights into an engine in the trial's process, "
                "which spans one GPU; use sampling.weights 'adapter' with sampling.vllm.tensor_parallel_size > 1"
            )
        if problems:
            raise ConfigError(problems)

    @classmethod
    def from_config(cls, config: ExperimentConfig, tokenizer, policy: Policy | None = None) -> VLLMSampler:
        """The engine holds its own copy of M_init; `policy` (in this process) gives it merged generations."""
        merged = config.sampling.weights == "merged"
        return cls(
            start_engine(config),
            tokenizer,
            stop_token_ids(tokenizer, _generation_config(config)),
            config.sampling.vllm.sleep_while_training,
            policy if merged else None,
        )

    # -- engine memory ----------------------------------------------------------------------------

    def sleep(self) -> None:
        """Before a generation trains: free the engine's memory for it (always, never, or where it is short)."""
        auto = self.sleep_while_training == "auto"
        if self.sleep_while_training and not self.asleep and (not auto or self.memory.short()):
            started = time.perf_counter()
            self.llm.sleep(level=1)
            self.timings["sleep"].append(time.perf_counter() - started)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            started = time.perf_counter()
            self.llm.wake_up()
            self.timings["wake"].append(time.perf_counter() - started)
            self.asleep = False

    # -- sampling ---------------------------------------------------------------------------------

    def serve(self, generation: Generation) -> None:
        """Load `generation`'s weights (M_init's for INITIAL) into the awake engine, as TRL's colocate sync does:
        the worker's model maps each named tensor onto its own (fused, sharded) parameters and copies it in.
        The prefix cache is dropped, since its KV blocks were computed by the weights before."""
        if self.serving == generation:
            return
        self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(
            self.policy.named_weights(generation)
        )
        self.llm.reset_prefix_cache()
        self.serving = generation

    def lora_request(self, generation: Generation):
        """The adapter of `generation` as a request (None for M_init); ids are stable per adapter dir."""
        if generation.path is None:
            return None
        from vllm.lora.request import LoRARequest

        key = str(generation.path)
        adapter_id = self._adapter_ids.setdefault(key, len(self._adapter_ids) + 1)
        return LoRARequest(lora_name=f"{generation.name}-{adapter_id}", lora_int_id=adapter_id, lora_path=key)

    def generate_ids(
        self, prompt_ids: list[list[int]], params: SamplingParams, generation: Generation, progress=None
    ) -> list[Completion]:
        """One completion per tokenized prompt, each request with its own seed. (Draws can still change
        with what the engine batches or caches alongside: the numerics differ, near-ties flip.)"""
        from vllm import SamplingParams as EngineParams
        from vllm.inputs import TokensPrompt

        self.wake()
        if self.policy is not None:
            self.serve(generation)
        requests = [
            EngineParams(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p if params.temperature > 0 else 1.0,
                top_k=0,
                min_p=0.0,
                repetition_penalty=1.0,
                max_tokens=params.max_new_tokens,
                seed=(params.seed * 1_000_003 + index) % 2**31,
                stop_token_ids=self.stop_ids,
                detokenize=False,  # answers are decoded by the model's own tokenizer, as the hf sampler does
            )
            for index in range(len(prompt_ids))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
            requests,
            lora_request=None if self.policy is not None else self.lora_request(generation),
            use_tqdm=False,
        )
        if progress is not None:
            progress.update(len(prompt_ids))
        return [self._completion(list(out.outputs[0].token_ids), params.stop) for out in outputs]

    def _completion(self, token_ids: list[int], stop: tuple[str, ...]) -> Completion:
        finished = bool(token_ids) and token_ids[-1] in self.stop_ids
        if finished:
            token_ids = token_ids[:-1]
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=None)
        if cut is not None:  # stop strings end the answer as the hf sampler's stop_strings do
            text = text[:cut]
            token_ids = _tokens_through_stop(self.tokenizer, token_ids, stop)
            finished = True
        return Completion(text, len(token_ids), finished, tuple(token_ids))


def start_engine(config: ExperimentConfig):
    """A vLLM engine for the trial's M_init, with LoRA and (if asked) sleep mode."""
    from vllm import LLM

    engine = config.sampling.vllm
    if config.sampling.weights == "merged":  # in this process, so that its worker's model loads the policy's tensors
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        lora = {"enable_lora": False}
    else:  # max_loras: M_{j-1} and, for `rejected: j-2`, M_{j-2}
        lora = {"enable_lora": True, "max_lora_rank": engine_lora_rank(config.training.lora.rank), "max_loras": 2}
    device = resolve_device(config.loading.device)
    dtype = str(resolve_dtype(config.loading.dtype, device)).removeprefix("torch.")
    return LLM(
        model=model_path(config.model, config.loading),
        revision=config.loading.revision,
        trust_remote_code=config.loading.trust_remote_code,
        skip_tokenizer_init=True,  # prompts arrive as token ids of the model's own tokenizer
        dtype=dtype,
        seed=config.seed,
        **lora,
        enable_sleep_mode=engine.sleep_while_training is not False,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        enforce_eager=engine.enforce_eager,
        max_model_len=engine.max_model_len,
        max_num_seqs=engine.max_num_seqs,
        tensor_parallel_size=engine.tensor_parallel_size,
    )


def _generation_config(config: ExperimentConfig):
    """The model's generation config (where its end-of-turn ids are listed), None if it ships none."""
    from transformers import GenerationConfig

    try:
        path = model_path(config.model, config.loading)
        return GenerationConfig.from_pretrained(path, revision=config.loading.revision)
    except OSError:
        return None


def _tokens_through_stop(tokenizer, token_ids: list[int], stop: tuple[str, ...]) -> list[int]:
    """The shortest prefix of `token_ids` whose text contains a stop string (what an early stop keeps)."""
    for end in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:end], skip_special_tokens=True)
        if any(s in text for s in stop):
            return token_ids[:end]
    return token_ids
