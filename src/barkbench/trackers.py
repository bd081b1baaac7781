"""Latency, per-stage and memory trackers, and the job's hard time limit. One clock abstraction serves
the trackers: CUDA events (after a synchronize) on a GPU, perf_counter on the CPU."""
from __future__ import annotations

import functools
import signal
import threading
import time
from contextlib import contextmanager

import psutil
import torch


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start

    @contextmanager
    def measure(self, sink: list):
        """Append the seconds spent in the block to `sink`."""
        if self.cuda:
            torch.cuda.synchronize()
        start = self.mark()
        yield
        sink.append(self.seconds(start, self.mark()))


# BarkModel.generate calls these four methods in turn; (attribute path, tokens of the output).
STAGES = {
    "semantic": (("semantic", "generate"), lambda out: out.shape[-1]),
    # coarse returns (codes, output_lengths) when the caller asks for output lengths
    "coarse": (("coarse_acoustics", "generate"), lambda out: (out[0] if isinstance(out, tuple) else out).shape[-1]),
    "fine": (("fine_acoustics", "generate"), lambda out: out.shape[-1] * out.shape[-2]),
    "decode": ((None, "codec_decode"), lambda out: sum(int(a.shape[-1]) for a in out)),
}


# The autoregressive stages: their decode steps are timed apart from the prefill (DecodeSteps).
DECODING_STAGES = ("semantic", "coarse")


def starts_loop(kwargs: dict) -> bool:
    """Whether this step of a generate loop is its prefill: transformers 5 says so (`is_first_iteration` in the
    prefill, `next_sequence_length` in every step); older ones (the 2023 stack) pass a cache still empty."""
    if "is_first_iteration" in kwargs or "next_sequence_length" in kwargs:
        return bool(kwargs.get("is_first_iteration"))
    past = kwargs.get("past_key_values")
    if past is None:
        return True
    return past.get_seq_length() == 0 if hasattr(past, "get_seq_length") else len(past) == 0


class DecodeSteps:
    """Marks the start of every forward step of a sub-model's generate loops: transformers calls
    `prepare_inputs_for_generation` once per step, the first of each generate call its prefill (`starts_loop`;
    the coarse stage runs one generate call per window). A decode step's time is the interval from its start to the
    next step's start in the same loop: the whole step (forward, logits processing, sampling, stopping
    criteria). The last step of each loop has no next start and is not counted. A loop of its own (the device-side
    loop) marks its steps through its `step_marks` hook, on a CPU only. Each mark also carries the cache positions
    its step's attention reads (batch rows x sequence length so far, this step's token included): the keys and
    values a step must read besides the weights (`calibration.stage_floors`)."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.loops: list[list] = []

    def mark(self, first: bool, cache_positions: int | None = None):
        if first or not self.loops:
            self.loops.append([])
        self.loops[-1].append((self.clock.mark(), cache_positions))

    def take(self) -> tuple[float | None, int, int | None]:
        """Seconds, number and cache positions read of the decode steps marked since the last take (None, 0, None
        without any; positions None where a step's were not known)."""
        steps = [(a, b) for loop in self.loops for a, b in zip(loop[1:], loop[2:])]
        self.loops.clear()
        if not steps:
            return None, 0, None
        positions = [a[1] for a, _ in steps]
        return (float(sum(self.clock.seconds(a[0], b[0]) for a, b in steps)), len(steps),
                None if None in positions else int(sum(positions)))


class StageTracker:
    """Times each Bark stage of one generate call by wrapping the sub-model methods on the instance
    (no profiler, no change to the model). Tokens: semantic tokens, coarse tokens (both codebooks
    interleaved), fine codes (frames x codebooks), decoded audio samples. Semantic and coarse: also the
    seconds and number of their decode steps (`DecodeSteps`); the rest of the stage is its prefills."""

    def __init__(self, model, clock: Clock):
        self.model, self.clock = model, clock
        self.seconds: dict[str, list] = {s: [] for s in STAGES}
        self.tokens: dict[str, list] = {s: [] for s in STAGES}
        self.decode: dict[str, DecodeSteps] = {s: DecodeSteps(clock) for s in DECODING_STAGES}
        self.decode_seconds: dict[str, list] = {s: [] for s in DECODING_STAGES}
        self.decode_steps: dict[str, list] = {s: [] for s in DECODING_STAGES}
        self.decode_cache_positions: dict[str, list] = {s: [] for s in DECODING_STAGES}

    def _wrap(self, stage, owner, name, count):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            with self.clock.measure(self.seconds[stage]):
                out = original(*args, **kwargs)
            self.tokens[stage].append(int(count(out)))
            if stage in self.decode:
                seconds, steps, positions = self.decode[stage].take()
                self.decode_seconds[stage].append(seconds)
                self.decode_steps[stage].append(steps)
                self.decode_cache_positions[stage].append(positions)
            return out

        setattr(owner, name, timed)

    def _mark_steps(self, owner, steps: DecodeSteps):
        if hasattr(owner, "step_marks"):  # barkbench.device_decode: its own loop, its own hook
            owner.step_marks = steps.mark
            return
        original = getattr(owner, "prepare_inputs_for_generation", None)
        if original is None:  # not a transformers generate loop: no decode steps
            return

        @functools.wraps(original)  # generate reads its signature (which inputs the model accepts)
        def marked(*args, **kwargs):
            # generate hands every step the whole sequence so far (the prompt's ids, or placeholders of its length)
            ids = args[0] if args else kwargs.get("input_ids")
            steps.mark(starts_loop(kwargs), ids.shape[0] * ids.shape[-1] if ids is not None else None)
            return original(*args, **kwargs)

        owner.prepare_inputs_for_generation = marked

    def _owners(self):
        for stage, ((attr, name), count) in STAGES.items():
            yield stage, (getattr(self.model, attr) if attr else self.model), name, count

    def __enter__(self):
        for stage, owner, name, count in self._owners():
            self._wrap(stage, owner, name, count)
            if stage in self.decode:
                self._mark_steps(owner, self.decode[stage])
        return self

    def __exit__(self, *exc):
        for stage, owner, name, _ in self._owners():
            owner.__dict__.pop(name, None)  # back to the class method
            owner.__dict__.pop("prepare_inputs_for_generation", None)
            owner.__dict__.pop("step_marks", None)
        return False

    def as_dict(self, calls: int | None = None) -> dict:
        """Per stage, seconds and tokens of the first `calls` calls (all by default: a call cut short
        by the time limit may have timed some stages); semantic and coarse, their decode steps' seconds
        (None for a call whose loop marks no steps), number and the cache positions they read."""
        out = {s: {"seconds": self.seconds[s][:calls], "tokens": self.tokens[s][:calls]} for s in STAGES}
        for s in DECODING_STAGES:
            out[s].update(decode_seconds=self.decode_seconds[s][:calls], decode_steps=self.decode_steps[s][:calls],
                          decode_cache_positions=self.decode_cache_positions[s][:calls])
        return out


def anon_rss_bytes() -> int | None:
    """Resident anonymous memory (Linux RssAnon): the process's own memory, without file pages such as
    a memory-mapped checkpoint that the kernel can drop at will. None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakRSS:
    """Samples the process RSS and anonymous RSS in a background thread (CPU peak memory of the timed calls)."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.peak = 0
        self.peak_anon: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._sampling = threading.Lock()

    def _sample(self):
        with self._sampling:
            self.peak = max(self.peak, self.process.memory_info().rss)
            anon = anon_rss_bytes()
            if anon is not None:
                self.peak_anon = max(self.peak_anon or 0, anon)

    @contextmanager
    def paused(self):
        """No sample while the block runs (memory it allocates and frees again is not the calls')."""
        with self._sampling:
            yield

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        return False


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def stage_timer_cost(clock: Clock, calls: int = 2000) -> float:
    """Seconds the stage timers add to one generate call, measured directly: the four stage methods
    of a stand-in model called with and without the timers (the latency comparison of instrumented and
    plain runs is limited by run-to-run noise; this one is not)."""
    out = torch.zeros(1, 8, 8)

    class Stage:  # methods on the class, as on the real sub-models (the tracker patches instances)
        def generate(self, *args, **kwargs):
            return out

        def prepare_inputs_for_generation(self, *args, **kwargs):
            return {}

    class StandIn:
        def __init__(self):
            self.semantic, self.coarse_acoustics, self.fine_acoustics = Stage(), Stage(), Stage()

        def codec_decode(self, *args, **kwargs):
            return [out[0, 0]]

    stand_in = StandIn

    def one_call(model):
        model.semantic.generate(), model.coarse_acoustics.generate(), model.fine_acoustics.generate()
        model.codec_decode()

    plain, timed = stand_in(), stand_in()
    start = time.perf_counter()
    for _ in range(calls):
        one_call(plain)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(calls):
        with StageTracker(timed, clock):
            one_call(timed)
    timed_s = time.perf_counter() - start
    return max(0.0, (timed_s - plain_s) / calls)


class TimeLimitExceeded(Exception):
    pass


class TimeLimit:
    """Raises TimeLimitExceeded in the main thread `seconds` after entering the block (SIGALRM through
    setitimer); disarmed and the previous handler restored on exit. Outside the main thread, where
    signals cannot be handled, nothing is armed."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.armed = False

    def _fire(self, signum, frame):
        raise TimeLimitExceeded("time limit reached")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, max(self.seconds, 1e-3))
            self.armed = True
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
            self.armed = False
        return False
