"""The generation engine, one concern per module:

  config.py     EngineConfig: every setting, and the `serve` flags made from it
  sequence.py   requests and sequences: tokens in, text out (detokenizer, stop strings)
  scheduler.py  who runs each step: the waiting queue, admission into KV-cache blocks,
                chunked prefill, and the state changes a step's outcome makes
  kv_cache.py   the blocks of the paged KV cache: who holds which, what is promised
  runner.py     the execution path chosen at load: a scheduled step -> sampled tokens
  sampler.py    one batched sampling pass over a step's logits
  outbox.py     the hand-over of a step's events to the asyncio side
  loop.py       Engine: the step thread and the asyncio API
"""

from .config import EngineConfig
from .loop import Engine
from .scheduler import EngineError, EngineStopped, QueueFull, RequestTimeout
from .sequence import Completion, Prompt, Request, TokenEvent

__all__ = ["Completion", "Engine", "EngineConfig", "EngineError", "EngineStopped", "Prompt",
           "QueueFull", "Request", "RequestTimeout", "TokenEvent"]
