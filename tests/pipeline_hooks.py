"""Every transformer call of one diffusers pipeline run, read with a forward hook (the flow-family tests)."""

from __future__ import annotations


def capture(pipe, **kwargs) -> list[dict]:
    """Run ``pipe(**kwargs)``; return each transformer call's input latents, timestep and velocity."""
    calls = []

    def hook(mod, args, kw, out):
        calls.append({"x": kw["hidden_states"], "t": kw["timestep"], "v": out[0] if isinstance(out, tuple) else out.sample})

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(**kwargs)
    finally:
        handle.remove()
    return calls
