"""torch.compile for a training run (JobSpec.compile): each transformer layer compiled in place.

Regional compilation (PyTorch's recipe for transformers): the layers are compiled one by one with
`nn.Module.compile()`, not the whole model. All layers share one code object, so the compile costs
about one layer's worth (the FX graph cache makes the others quick), the embedding and head stay
eager, and the state dict keeps its names (no `_orig_mod.` prefix), so checkpoints, exports and
resumes read as for an eager run.

Compiling can fail where the toolchain is missing (no C++ compiler for Inductor's CPU code, a GPU
older than Triton supports): `probe()` finds out on a tiny function first, and the run goes on
uncompiled with a warning. Whatever still fails in the model's forward runs eagerly (dynamo's
`suppress_errors`), and the engine says so once after the first step (`compiled_graphs() == 0`). Sampling at checkpoints runs
eagerly (`eager()`): generation grows its sequence one token at a time, a recompile each length.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import exception_line

TRITON_MIN_CAPABILITY = (7, 0)   # Triton (Inductor's GPU code) needs Volta or newer


def unsupported_reason(device: torch.device) -> str | None:
    """Why compiling cannot help on `device` (None: try it)."""
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        if tuple(cc) < TRITON_MIN_CAPABILITY:
            return (f"this GPU (compute capability {cc[0]}.{cc[1]}) is older than torch.compile's GPU code "
                    f"supports ({TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]} or newer)")
    elif device.type not in ("cpu",):
        return f"torch.compile is not used on {device.type}"
    return None


def probe(device: torch.device) -> str | None:
    """Compile a tiny forward and backward on `device` first; why it failed, in one line (None: it works).

    The model's own compile cannot be left to fail over by itself: its backward graph is compiled at the
    first backward, outside dynamo's error handling, so a missing compiler would end the run there."""
    import torch._dynamo
    torch._dynamo.config.suppress_errors = False
    lin = torch.nn.Linear(8, 8).to(device)

    def tiny(x):
        return torch.nn.functional.silu(lin(x)).square().mean()

    try:
        torch.compile(tiny, fullgraph=True)(torch.randn(4, 8, device=device, requires_grad=True)).backward()
    except Exception as exc:
        return exception_line(exc)
    finally:
        torch._dynamo.reset()
    return None


def layer_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated transformer layers: the classes transformers lists as never split across
    devices (`_no_split_modules`, e.g. LlamaDecoderLayer), found through LoRA wrappers too."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_layers(model: torch.nn.Module) -> int:
    """Compile each layer in place; how many. Frames that fail to compile run eagerly (see module doc)."""
    import torch._dynamo
    torch._dynamo.config.suppress_errors = True
    torch._dynamo.utils.counters.clear()
    layers = layer_modules(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def compiled_graphs() -> int:
    """Graphs compiled so far in this process (0 after a first step: compiling failed everywhere)."""
    import torch._dynamo.utils
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def eager():
    """A context in which compiled modules run their eager code (generation)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
