"""The generation engine, one concern per module:

  sequence.py   requests and sequences: tokens in, text out (detokenizer, stop strings)
  scheduler.py  the waiting queue, admission into KV-cache slots, retirement
  sampler.py    one batched sampling pass over a step's logits
  loop.py       the step thread that ties them to the model, and the asyncio API
"""

from .loop import Engine
from .scheduler import EngineStopped, QueueFull, RequestTimeout
from .sequence import Completion, Prompt, Request, TokenEvent

__all__ = ["Completion", "Engine", "EngineStopped", "Prompt", "QueueFull", "Request",
           "RequestTimeout", "TokenEvent"]
