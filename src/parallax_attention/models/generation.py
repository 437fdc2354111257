"""Generation on a StaticKVCache with the decode step captured once in a CUDA graph.

transformers' generate() with DynamicCache runs every decode step eagerly: for a 0.6B model each
step is hundreds of small kernel launches, and the host, not the GPU, sets the pace. Here the
prompt is prefilled eagerly, one decode step (model forward, token choice, feeding the token back)
is captured in a CUDA graph, and every further token is one replay. The graph reads its position
from the cache's device-side lengths, so it replays unchanged for every step.

    gen = StaticGenerator(model, batch_size=1, capacity=1024)
    out = gen.generate(input_ids, max_new_tokens=256)   # (batch, prompt + new) token ids
    out = gen.generate(input_ids, max_new_tokens=256, do_sample=True, temperature=0.7, top_p=0.9)

Greedy decoding gives the same tokens as ``model.generate(do_sample=False)`` up to the rounding
of the different attention paths. Sampling draws from the softmax of the filtered logits with the
Gumbel-max trick (argmax of logits / temperature plus Gumbel noise), which needs no host
synchronisation; it uses torch's default generator (seed it with torch.manual_seed), whose
state CUDA graphs advance on every replay.
"""

from __future__ import annotations

import torch

from ..nn.kv_cache import StaticKVCache

# How often (in steps) the host looks whether every sequence has produced eos.
_EOS_POLL = 32


def select_tokens(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Next token ids (batch,) from logits (batch, vocab): argmax, or a sample of
    softmax(logits / temperature) restricted to the top_k tokens and then to the smallest set
    whose probability reaches top_p (transformers' order of the two filters)."""
    if not do_sample:
        return logits.argmax(-1)
    x = logits.float() / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    u = torch.rand_like(x).clamp_(min=torch.finfo(torch.float32).tiny)
    return (x - torch.log(-torch.log(u))).argmax(-1)


def _check_sampling(do_sample, temperature, top_k, top_p):
    if not do_sample:
        return (False, 1.0, None, None)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature: expected a number > 0 with do_sample=True, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")
    return (True, float(temperature), top_k, None if top_p is None else float(top_p))


class StaticGenerator:
    """Decoder (greedy or sampling) for a ParallaxForCausalLM with a preallocated cache of
    `batch_size` x `capacity`; one CUDA graph per sampling setting, captured on first use.

    Args:
        model: a causal LM taking ``(input_ids=..., cache=StaticKVCache)`` (ParallaxForCausalLM).
        batch_size: sequences per call to generate().
        capacity: prompt + new tokens that fit in the cache.
        cuda_graph: capture the decode step (default: when the model is on a CUDA device).
        dtype: of the cache (default: the dtype of the model's parameters).
    """

    def __init__(self, model, batch_size: int, capacity: int, *, cuda_graph: bool | None = None,
                 dtype: torch.dtype | None = None):
        param = next(model.parameters())
        self.model = model
        self.device = param.device
        self.cache = StaticKVCache.for_model(model.config, batch_size, capacity, dtype=dtype or param.dtype,
                                             device=self.device)
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph: needs a model on a CUDA device, got {self.device}")
        self.cuda_graph = bool(cuda_graph)
        self._ids = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self._graphs = {}  # sampling setting -> (graph, its output tokens)

    def _step(self, sampling) -> torch.Tensor:
        """One decode step from the static input ids; feeds its token back into them."""
        logits = self.model(input_ids=self._ids, cache=self.cache, use_cache=True).logits[:, -1]
        nxt = select_tokens(logits, *sampling)
        self._ids.copy_(nxt[:, None])
        return nxt

    def _capture(self, sampling) -> None:
        cache = self.cache
        length, ids = cache.length, self._ids.clone()
        seqlens = cache.seqlens.clone()
        # Record the device-length path (the host cannot follow replays).
        cache.length = None
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        # Warm-up off the capture: compiles kernels and settles the allocator. Each step writes the
        # slot the real step will overwrite; lengths and inputs are restored after it, and so is the
        # random state, so that a seeded call samples the same whether or not it captured first.
        with torch.random.fork_rng(devices=[self.device]), torch.cuda.stream(side):
            for _ in range(2):
                self._step(sampling)
                cache.seqlens.copy_(seqlens)
                self._ids.copy_(ids)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            nxt = self._step(sampling)
        # Capture records kernels without running them; the lengths on the host side are unchanged.
        cache.seqlens.copy_(seqlens)
        self._ids.copy_(ids)
        cache.length = length
        self._graphs[sampling] = (graph, nxt)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | None = None, pad_token_id: int = 0, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
        """Prompt `input_ids` (batch, prompt_len) followed by up to `max_new_tokens` new tokens.

        attention_mask: optional (batch, prompt_len) 0/1 mask for prompts of different lengths,
            padded on the left (as transformers' generate() expects) or on the right. Each prompt
            is prefilled from position 0 and decodes from its own length; the output keeps the
            given prompt layout followed by the new tokens.
        eos_token_id: a sequence that produced it continues with pad_token_id, and generation
            stops early once every sequence has (checked every few steps, so it may run a few past).
        do_sample, temperature, top_k, top_p: greedy by default; with do_sample=True a sample of
            softmax(logits / temperature) within the top_k tokens and the top_p nucleus.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids: expected a (batch, prompt_len) int64 tensor, got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        bsz, prompt = input_ids.shape
        if bsz != self.cache.batch_size:
            raise ValueError(f"input_ids: expected batch {self.cache.batch_size} (the generator's batch_size), "
                             f"got {bsz}")
        if prompt < 1:
            raise ValueError("input_ids: expected a prompt of at least one token, got 0")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids: expected device {self.device} (the model's), got {input_ids.device}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
        if prompt + max_new_tokens > self.cache.capacity:
            raise ValueError(f"max_new_tokens: prompt {prompt} + {max_new_tokens} new tokens exceed the cache "
                             f"capacity {self.cache.capacity}; build the StaticGenerator with a larger capacity")

        sampling = _check_sampling(do_sample, temperature, top_k, top_p)
        lengths = None
        ids = input_ids
        if attention_mask is not None:
            lengths, packed = self._pack_right(input_ids, attention_mask, pad_token_id)
            if bool((lengths == prompt).all()):
                lengths = None  # no padding: the equal-length path, lengths known to the host
            else:
                ids = packed

        cache = self.cache
        cache.reset()
        if lengths is None:
            logits = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        else:
            # Causal attention: the pads after a prompt do not change it; its last real position
            # gives its first token, and its length in the cache is set back to the real one
            # (the pads' slots are overwritten by the tokens that follow).
            hidden = self.model.base_model(input_ids=ids, cache=cache, use_cache=True).last_hidden_state
            last = hidden[torch.arange(bsz, device=self.device), lengths - 1]
            logits = self.model.get_output_embeddings()(last)
            cache.seqlens.copy_(lengths.to(torch.int32))
            cache.length = None
        nxt = select_tokens(logits, *sampling)
        out = torch.empty(bsz, max_new_tokens, dtype=torch.long, device=self.device)
        out[:, 0] = nxt
        finished = nxt == eos_token_id if eos_token_id is not None else None
        self._ids.copy_(nxt[:, None])
        if self.cuda_graph and max_new_tokens > 1 and sampling not in self._graphs:
            self._capture(sampling)
        steps = 1
        if self.cuda_graph:
            cache.length = None  # replays advance the lengths on the device only
        for t in range(1, max_new_tokens):
            if self.cuda_graph:
                graph, nxt = self._graphs[sampling]
                graph.replay()
            else:
                nxt = self._step(sampling)
            steps = t + 1
            if finished is not None:
                nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
                finished |= nxt == eos_token_id
                out[:, t] = nxt
                if t % _EOS_POLL == 0 and bool(finished.all()):
                    break
            else:
                out[:, t] = nxt
        if lengths is None:
            cache.set_length(prompt + steps - 1)
        return torch.cat([input_ids, out[:, :steps]], dim=1)

    @staticmethod
    def _pack_right(input_ids, attention_mask, pad_token_id):
        """(lengths, ids): each row's masked-in tokens moved to the start, pads after them."""
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected a 0/1 tensor of the shape of input_ids "
                             f"{tuple(input_ids.shape)}, got {tuple(getattr(attention_mask, 'shape', ()))}")
        keep = attention_mask.to(device=input_ids.device).bool()
        lengths = keep.sum(1)
        width = input_ids.shape[1]
        pos = torch.arange(width, device=input_ids.device)
        # contiguous runs only: left padding (ones at the end) or right padding (ones at the start)
        first = torch.where(keep, pos, width).min(1).values
        contiguous = (keep == ((pos >= first[:, None]) & (pos < (first + lengths)[:, None]))).all()
        if not bool(contiguous) or not bool((lengths > 0).all()):
            raise ValueError("attention_mask: expected each row to keep one contiguous run of at least one token "
                             "(left or right padding)")
        src = (first[:, None] + pos).clamp(max=width - 1)
        ids = torch.where(pos < lengths[:, None], input_ids.gather(1, src), pad_token_id)
        return lengths, ids


# ------------------------------------------------------------------ `plx generate`


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a model directory (from `plx export` or `plx convert`) with tokenizer files")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat for a batch (prompts of different lengths are padded)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="auto: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA")


def run(args) -> int:
    import sys
    from pathlib import Path

    from transformers import AutoTokenizer

    from .modeling import ParallaxForCausalLM

    path = Path(args.model)
    if not (path / "config.json").is_file():
        print(f"plx generate: error: model: {path} has no config.json", file=sys.stderr)
        return 2
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        print(f"plx generate: error: model: {path} has no tokenizer files (a byte-level training run exports "
              f"none)", file=sys.stderr)
        return 2
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = ParallaxForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    enc = tok(args.prompt, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    gen = StaticGenerator(model, ids.shape[0], ids.shape[1] + args.max_new_tokens,
                          cuda_graph=False if args.no_cuda_graph else None)
    torch.manual_seed(args.seed)
    try:
        out = gen.generate(ids, args.max_new_tokens, attention_mask=mask, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, do_sample=args.do_sample, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:
        print(f"plx generate: error: {e}", file=sys.stderr)
        return 2
    for prompt, row in zip(args.prompt, out[:, ids.shape[1]:].tolist()):
        if tok.eos_token_id is not None and tok.eos_token_id in row:
            row = row[:row.index(tok.eos_token_id)]
        print(prompt + tok.decode(row))
    return 0
