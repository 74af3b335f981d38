"""A vLLM plugin that lets seeded requests be prefilled in chunks on vLLM's CPU build.

A seeded request gets its own torch.Generator. When its prompt is prefilled in several
steps (longer than --max-num-batched-tokens, or beside other work), every step but the last
samples a token that is thrown away, and vLLM rewinds the generator "as if the token was
not sampled" with `set_offset(get_offset() - 4)`: Philox offsets, which only CUDA
generators have. On CPU the call raises "CPU Generator does not use offset" in the worker,
and the engine core dies with every request on it: one tenant's `seed` and long prompt
failed every other tenant's stream (found by lorag's `rag.cite` test, n = 3 seeded choices
on a RAG prompt; vLLM 0.32, where the GPU runner's code is what the CPU runner inherits).

The rewind is done here the CPU way, exactly: the state of each such generator is saved
before the sampler draws and put back after it, so the final chunk samples from the state
the first one saw, as an unchunked prefill would; vLLM's own rewind then skips CPU
generators. Loaded by vLLM in each of its processes (pyproject.toml's
`vllm.general_plugins`); elsewhere it does nothing.
"""

import functools

import numpy as np

FIXED = "lorag_rewinds_cpu_generators"


def register() -> None:
    """Patch the CPU model runner (idempotent: vLLM may load plugins more than once)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # what the CPU runner runs

    if getattr(GPUModelRunner._sample, FIXED, False):
        return
    GPUModelRunner._sample = restore_discarded_draws(GPUModelRunner._sample)
    GPUModelRunner._bookkeeping_sync = without_cpu_generators(
        GPUModelRunner._bookkeeping_sync)


def _discarded(runner) -> dict:
    """{row: generator} of this step's rows whose sampled token is thrown away (a prompt
    chunk before the last) and that sample with a CPU generator of their own."""
    rows = np.nonzero(runner.discard_request_mask.np[:runner.input_batch.num_reqs])[0]
    generators = runner.input_batch.generators
    return {int(row): generator for row in rows
            if (generator := generators.get(int(row))) is not None
            and generator.device.type == "cpu"}


def restore_discarded_draws(sample):
    """`sample(runner, ...)`, with each discarded row's CPU generator put back to its state
    before the draw."""
    @functools.wraps(sample)
    def fixed(runner, *args, **kwargs):
        saved = {row: generator.get_state() for row, generator in _discarded(runner).items()}
        try:
            return sample(runner, *args, **kwargs)
        finally:
            for row, state in saved.items():
                runner.input_batch.generators[row].set_state(state)

    setattr(fixed, FIXED, True)
    return fixed


def without_cpu_generators(bookkeeping):
    """`bookkeeping(runner, ...)` seeing only non-CPU generators: its offset rewind would
    raise on a CPU one (already rewound by `restore_discarded_draws`)."""
    @functools.wraps(bookkeeping)
    def fixed(runner, *args, **kwargs):
        generators = runner.input_batch.generators
        runner.input_batch.generators = {row: generator for row, generator
                                         in generators.items()
                                         if generator.device.type != "cpu"}
        try:
            return bookkeeping(runner, *args, **kwargs)
        finally:
            runner.input_batch.generators = generators

    setattr(fixed, FIXED, True)
    return fixed
