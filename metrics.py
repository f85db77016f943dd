# The engine's counters for GET /metrics, in Prometheus' text format through prometheus_client. Each Engine has a
# registry of its own (several engines in one process, as the tests make, do not share counts).
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from model import PAGE

LATENCY = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)   # seconds


class Metrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("zoofast_requests", "Requests ended, by finish reason", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("zoofast_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.cached_tokens = Counter("zoofast_prompt_tokens_cached",
                                     "Prompt tokens whose keys and values were found in a cache (not prefilled)",
                                     registry=r)
        self.generated = Counter("zoofast_generation_tokens", "Tokens generated", registry=r)
        self.prefill_seconds = Counter("zoofast_prefill_seconds", "Time spent in prefill forwards", registry=r)
        self.decode_seconds = Counter("zoofast_decode_seconds", "Time spent in decode steps", registry=r)
        self.ttft = Histogram("zoofast_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=LATENCY, registry=r)
        self.itl = Histogram("zoofast_inter_token_latency_seconds", "Between two tokens of one request",
                             buckets=LATENCY, registry=r)
        Gauge("zoofast_waiting_requests", "Requests waiting for a slot", registry=r).set_function(
            lambda: engine.waiting.qsize() + len(engine.pending))
        Gauge("zoofast_busy_slots", "Slots holding a request", registry=r).set_function(
            lambda: sum(s is not None for s in engine.slots))
        Gauge("zoofast_slots", "Slots (requests decoded together at most)", registry=r).set(engine.max_batch_size)
        Gauge("zoofast_kv_cache_bytes", "Memory of the KV cache", registry=r).set(engine.kv_bytes)
        Gauge("zoofast_kv_cache_positions", "Positions the KV cache holds (all slots share them)",
              registry=r).set(engine.pages * PAGE)
        Gauge("zoofast_kv_cache_reserved_positions", "KV cache positions reserved by requests in flight",
              registry=r).set_function(lambda: PAGE * sum(len(p) for p, s in zip(engine.row_pages, engine.slots)
                                                          if s is not None))

    def token(self, request):
        """A token of `request` has been sampled."""
        now = time.monotonic()
        if request.last_token_at is None:
            self.ttft.observe(now - request.created)
        else:
            self.itl.observe(now - request.last_token_at)
        request.last_token_at = now
        self.generated.inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
