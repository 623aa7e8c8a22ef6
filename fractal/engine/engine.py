"""LLMEngine: admits requests, runs scheduler -> runner -> sampler steps, and reports RequestOutputs.

One `step()`:
  scheduler.schedule()               which sequences, how many tokens each (SchedulerOutput)
  runner.execute(...)                tensors, model forward, logits of sampling rows, Sampler
  scheduler.update_from_output(...)  computed counts advance, sampled tokens appended, prefix blocks cached
  per new token: logprobs, token-level stops (EOS, stop_token_ids, max_tokens, context length),
  detokenizer (text delta, stop strings), finish -> blocks freed
  -> a RequestOutput (cumulative) for each request that got tokens or finished.
"""
from __future__ import annotations

import itertools
import json
import os
import time

from fractal.engine.config import EngineConfig, SchedulerConfig
from fractal.engine.request import Request, Sequence, check_token_stop
from fractal.engine.runner import ModelRunner
from fractal.engine.scheduler import Scheduler
from fractal.engine.stats import EngineStats, StepShape
from fractal.engine.tokenizer import load_tokenizer
from fractal.errors import FractalError
from fractal.models.loader import load_hf_config
from fractal.outputs import RequestMetrics, RequestOutput
from fractal.sampling_params import SamplingParams

OUTPUT_KINDS = ("cumulative", "final")
DEFAULT_CUDA_SWAP_GIB = 4.0  # EngineConfig.swap_space=None on CUDA


def _generation_eos_ids(model_dir: str) -> set[int]:
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return set()
    try:
        with open(path, encoding="utf-8") as handle:
            eos = json.load(handle).get("eos_token_id")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise FractalError(f"could not read {path}: {exc}") from exc
    if isinstance(eos, int):
        return {eos}
    return {t for t in eos if isinstance(t, int)} if isinstance(eos, list) else set()


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        hf_config = load_hf_config(config.model)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.runner = ModelRunner(config, hf_config)
        model_config = self.runner.model.config
        self.vocab_size = model_config.vocab_size
        if self.tokenizer is not None:
            self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        else:
            self.eos_token_ids = frozenset(model_config.eos_token_ids) | _generation_eos_ids(config.model)

        max_positions = model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > max_positions:
            raise FractalError(
                f"max_model_len={config.max_model_len} exceeds the model's max_position_embeddings={max_positions}"
            )
        wanted_len = config.max_model_len or max_positions
        num_blocks = self.runner.size_kv_pool(wanted_len)
        capacity = num_blocks * config.block_size
        if config.max_model_len is None:
            wanted_len = min(wanted_len, capacity)
            if not config.enable_chunked_prefill:
                wanted_len = min(wanted_len, config.max_num_batched_tokens)
        self.max_model_len = wanted_len
        self.runner.allocate_kv_cache(num_blocks, self.max_model_len)
        # after the KV pool: its sizing leaves out the swap-ins' device staging buffer, which taken first could fail it
        swap_space = config.swap_space if config.swap_space is not None else (
            DEFAULT_CUDA_SWAP_GIB if self.runner.is_cuda else 0.0)
        num_host_blocks = self.runner.init_swap_space(
            int(swap_space * 2**30) // self.runner.kv_spec.bytes_per_block(config.block_size), self.max_model_len)
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_blocks=num_blocks,
                block_size=config.block_size,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                enable_chunked_prefill=config.enable_chunked_prefill,
                prefill_chunk_size=config.prefill_chunk_size,
                enable_prefix_caching=config.enable_prefix_caching,
                prefill_order=config.prefill_order,
                preemption_balance=config.preemption_balance,
                num_host_blocks=num_host_blocks,
            )
        )
        self.warm_up_s = self.runner.warm_up(config.max_num_batched_tokens, self.max_model_len)
        self.runner.capture_cuda_graphs()
        self.async_scheduling = (
            config.async_scheduling if config.async_scheduling is not None else self.runner.device.type == "cuda"
        )
        self._inflight = None  # (SchedulerOutput, StepHandle, StepShape, needs_sync, launch time) in overlap mode
        self._parked: list[Sequence] = []  # running sequences kept out of scheduling until _inflight resolves
        self._last_done = 0.0
        self.step_log: list | None = None  # set to [] to keep (StepShape, seconds) of every step
        self.floor_model = None
        if config.floor_gpu is not None:
            from fractal.engine.step_floor import StepFloorModel

            self.floor_model = StepFloorModel(config.model, config.floor_gpu, str(self.runner.dtype).removeprefix("torch."))

        self.requests: dict[str, Request] = {}  # unfinished requests
        self._pending: list[RequestOutput] = []  # aborted outputs, handed back by the next step()
        self._ids = itertools.count()
        self._stats = EngineStats(kv_blocks_total=num_blocks)

    @classmethod
    def from_args(cls, model: str, **kwargs) -> "LLMEngine":
        return cls(EngineConfig.from_kwargs(model, **kwargs))

    # --- requests ------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids"}
            if unknown or len(prompt) != 1:
                raise FractalError(
                    f"prompt dict keys {sorted(prompt)} are invalid: give exactly one of 'prompt' or 'prompt_token_ids'"
                )
            prompt = prompt.get("prompt", prompt.get("prompt_token_ids"))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise FractalError(
                    f"a text prompt needs a tokenizer, and {self.config.model} has no tokenizer.json; "
                    "pass {'prompt_token_ids': [...]}"
                )
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
            if bad:
                raise FractalError(
                    f"prompt token id {bad[0]!r} is invalid: ids must be integers in [0, {self.vocab_size})"
                )
            return None, ids
        raise FractalError(
            f"prompt of type {type(prompt).__name__} is invalid: give a string, a list of token ids, "
            "{'prompt': str} or {'prompt_token_ids': [...]}"
        )

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | dict,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        output_kind: str = "cumulative",
    ) -> None:
        """Validate and queue a request; on bad input raise FractalError and change nothing.

        output_kind "cumulative" makes step() return the request's output every step it gets tokens (for
        streaming); "final" only once, when it finishes (offline generation: no per-step copies)."""
        if output_kind not in OUTPUT_KINDS:
            raise FractalError(f"output_kind={output_kind!r} is invalid; valid: {', '.join(OUTPUT_KINDS)}")
        if not isinstance(request_id, str) or not request_id:
            raise FractalError(f"request_id={request_id!r} is invalid: must be a non-empty string")
        if request_id in self.requests:
            raise FractalError(f"request_id={request_id!r} is already in use by an unfinished request")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise FractalError(f"sampling params of type {type(params).__name__} are invalid: pass a SamplingParams")
        params.validate()
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise FractalError(f"request {request_id!r}: the prompt is empty; give at least one token")
        if len(ids) + 1 > self.max_model_len:
            raise FractalError(
                f"request {request_id!r}: prompt of {len(ids)} tokens leaves no room to generate within "
                f"max_model_len={self.max_model_len}; shorten it to at most {self.max_model_len - 1} tokens"
            )
        if params.stop and self.tokenizer is None:
            raise FractalError(f"stop={params.stop!r} needs a tokenizer; {self.config.model} has none")

        metrics = RequestMetrics(arrival_time=time.time() if arrival_time is None else arrival_time,
                                 num_prompt_tokens=len(ids))
        seqs: list[Sequence] = []
        for index in range(params.n):
            seq_id = next(self._ids)
            seq = Sequence(
                seq_id=seq_id, request_id=request_id, index=index, order=seq_id, token_ids=list(ids),
                num_prompt_tokens=len(ids), params=params, parent=seqs[0] if index else None,
                logprobs=[] if params.logprobs is not None else None,
            )
            if self.tokenizer is not None:
                from fractal.engine.detokenizer import IncrementalDetokenizer

                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, list(ids), params, set(self.eos_token_ids))
            seqs.append(seq)
        self.requests[request_id] = Request(request_id, text, list(ids), params, seqs, metrics, output_kind)
        for seq in seqs:
            self.scheduler.add(seq)
        self._stats.num_prompt_tokens_total += len(ids)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks; its final output (finish_reason "abort") comes from the next step()."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        if self._parked:  # parked sequences must be in the running list to be finished
            from fractal.engine import overlap

            overlap.unpark(self.scheduler, [s for s in self._parked if s in request.seqs])
            self._parked = [s for s in self._parked if s not in request.seqs]
        for seq in request.seqs:
            if not seq.is_finished:
                while seq.num_output_tokens and seq.token_ids[-1] < 0:
                    seq.token_ids.pop()  # a placeholder of a step still in flight (overlap): never reported
                self.scheduler.finish(seq, "abort")
                self.runner.free(seq.seq_id)
                if seq.detokenizer is not None:
                    seq.detokenizer.flush()
        request.metrics.finished_time = time.time()
        self._pending.append(request.to_output())

    def discard_outputs(self, request_ids: set[str]) -> None:
        """Drop the pending (aborted) outputs of these requests, for callers that do not want them."""
        self._pending = [o for o in self._pending if o.request_id not in request_ids]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    # --- the loop ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduling step; returns the outputs of requests that got tokens or finished.

        With async_scheduling the tokens returned are those of the step launched by the previous call (this
        call's step runs on the device meanwhile); see fractal/engine/overlap.py."""
        if self.async_scheduling:
            return self._step_async()
        sched_out = self.scheduler.schedule()
        self.runner.apply_swaps(sched_out)
        if sched_out.is_empty:
            outputs, self._pending = self._pending, []
            return outputs
        self._note_scheduled(sched_out)
        shape = self._step_shape(sched_out)
        t0 = time.perf_counter()
        results = self.runner.execute(sched_out, self.scheduler.seqs, self.eos_token_ids)
        self._record_step(shape, time.perf_counter() - t0)

        outputs, self._pending = self._pending, []  # aborted since the last step (kept if execute raised)
        grown = self.scheduler.update_from_output(sched_out, {sid: r.token_id for sid, r in results.items()})
        self._emit(grown, results, outputs)
        return outputs

    def _step_async(self) -> list[RequestOutput]:
        from fractal.engine import overlap

        produced: list[RequestOutput] = []
        if self._inflight is not None and self._inflight[3]:
            produced += self._finish_inflight()  # penalties read every output token: resolve first
        sched_out = self.scheduler.schedule()
        self.runner.apply_swaps(sched_out)
        launched = None
        if not sched_out.is_empty:
            self._note_scheduled(sched_out)
            shape = self._step_shape(sched_out)
            t0 = time.perf_counter()
            handle = self.runner.launch(sched_out, self.scheduler.seqs, self.eos_token_ids)
            needs_sync = any(
                overlap.needs_host_tokens(self.scheduler.seqs[c.seq_id].params) for c in sched_out.chunks if c.sample
            )
            launched = (sched_out, handle, shape, needs_sync, t0)
        if self._inflight is not None:
            produced += self._finish_inflight()
        if launched is not None:
            overlap.advance(self.scheduler, launched[0])
            self._parked = overlap.park(self.scheduler, launched[0], self.max_model_len)
            self._inflight = launched
            if not self.scheduler.has_unfinished():  # everything stopped: nothing can use this step
                produced += self._finish_inflight()
        outputs, self._pending = self._pending, []
        return outputs + produced

    def _finish_inflight(self) -> list[RequestOutput]:
        from fractal.engine import overlap

        sched_out, handle, shape, _, t_launch = self._inflight
        self._inflight = None
        results = handle.result()
        overlap.unpark(self.scheduler, self._parked)
        self._parked = []
        t_done = time.perf_counter()
        self._record_step(shape, t_done - max(t_launch, self._last_done))
        self._last_done = t_done
        grown = overlap.resolve(self.scheduler, sched_out, {sid: r.token_id for sid, r in results.items()})
        outputs: list[RequestOutput] = []
        self._emit(grown, results, outputs)
        return outputs

    def _note_scheduled(self, sched_out) -> None:
        now = time.time()
        for seq_id in sched_out.preempted_seq_ids:
            seq = self.scheduler.seqs[seq_id]
            self.requests[seq.request_id].metrics.num_preemptions += 1
        for chunk in sched_out.chunks:
            metrics = self.requests[self.scheduler.seqs[chunk.seq_id].request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
                metrics.num_cached_tokens = self.scheduler.seqs[chunk.seq_id].num_cached_tokens

    def _emit(self, grown, results, outputs: list[RequestOutput]) -> None:
        """Per new token: stats, stops, text; then one cumulative output per touched request."""
        now = time.time()
        touched: dict[str, Request] = {}
        for seq in grown:
            request = self.requests.get(seq.request_id)
            if request is None:
                continue
            touched[request.request_id] = request
            self._on_token(seq, results[seq.seq_id], request, now)
        for request in touched.values():
            if request.finished:
                request.metrics.finished_time = now
                del self.requests[request.request_id]
            elif request.output_kind == "final":
                continue
            outputs.append(request.to_output())

    def _on_token(self, seq: Sequence, result, request: Request, now: float) -> None:
        metrics = request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        metrics.num_generated_tokens += 1
        self._stats.num_generated_tokens_total += 1
        seq.cumulative_logprob += result.logprob
        if seq.logprobs is not None:
            seq.logprobs.append(result.top or {result.token_id: result.logprob})

        stop = check_token_stop(seq, self.eos_token_ids, self.max_model_len)
        if seq.detokenizer is not None:
            # the detokenizer keeps EOS / stop ids out of the text and flushes at max_tokens itself
            _, stop_string = seq.detokenizer.append(result.token_id)
            if stop_string is not None:
                stop = ("stop", stop_string)
            elif stop is not None:
                seq.detokenizer.flush()  # context length: release any held-back text
        if stop is not None:
            self.scheduler.finish(seq, *stop)
            self.runner.free(seq.seq_id)

    def _step_shape(self, sched_out) -> StepShape:
        shape = StepShape(num_seqs=len(sched_out.chunks), num_batched_tokens=sched_out.num_batched_tokens)
        for chunk in sched_out.chunks:
            if chunk.num_tokens == 1 and chunk.sample and chunk.start_pos > 0 and (
                chunk.start_pos >= self.scheduler.seqs[chunk.seq_id].num_prompt_tokens
            ):
                shape.num_decode_seqs += 1
            else:
                shape.num_prefill_tokens += chunk.num_tokens
            shape.sum_context_len += chunk.seq_len
            shape.new_tokens.append(chunk.num_tokens)
            shape.context_lens.append(chunk.start_pos)
            shape.max_context_len = max(shape.max_context_len, chunk.seq_len)
            shape.num_sampled += int(chunk.sample)
        return shape

    def _record_step(self, shape: StepShape, elapsed: float) -> None:
        self._stats.last_step = shape
        self._stats.last_step_time_s = elapsed
        if self.step_log is not None:
            self.step_log.append((shape, elapsed))
        if self.floor_model is not None:
            floor = self.floor_model(shape)
            self._stats.last_step_floor_s = floor.floor_s
            self._stats.last_step_bound = floor.bound
            self._stats.step_floor_total_s += floor.floor_s
        self._stats.step_time_total_s += elapsed
        self._stats.num_steps_total += 1

    def get_stats(self) -> EngineStats:
        s = self._stats
        kv = self.scheduler.kv
        s.num_running = self.scheduler.num_running
        s.num_waiting = self.scheduler.num_waiting
        s.num_preempted_total = self.scheduler.num_preempted_total
        s.num_balance_swaps_total = self.scheduler.num_balance_swaps
        s.num_swapped_out_total = self.scheduler.num_swapped_out_total
        s.kv_blocks_used = kv.num_used_blocks
        s.prefix_cache_queries = kv.prefix_queries
        s.prefix_cache_hits = kv.prefix_hits
        s.prefix_hit_rate = kv.hit_rate
        return EngineStats(**{k: getattr(s, k) for k in s.__dataclass_fields__})
