"""Runtime adapter loading (vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter bodies).

Off unless the server was started with runtime loading enabled, and then confined to one directory:
the path is resolved (symlinks followed) and must stay under `allowed_adapter_root`, and so must the
two files the engine reads from it, so a symlinked adapter_config.json cannot point elsewhere.
A malformed adapter is rejected with 400 before it is registered; the server keeps serving.
"""

from __future__ import annotations

from pathlib import Path, PurePath

from lorascope.adapters.peft import CONFIG_FILE, WEIGHTS_FILE, AdapterError
from lorascope.server import protocol as p
from lorascope.server.state import ApiError, ServerState


def confine(root: Path, lora_path: str) -> Path:
    try:
        return _confine(root, lora_path)
    except (OSError, RuntimeError) as e:  # a name too long, a symlink loop (RuntimeError on 3.11)
        raise ApiError(400, f"lora_path {lora_path[:200]!r} cannot be resolved: {e}", "BadRequestError",
                       "lora_path") from None


def _confine(root: Path, lora_path: str) -> Path:
    """The adapter directory `lora_path` names, resolved, if it lies under `root`; else ApiError.

    Relative paths are taken under the root. `..` is refused outright, even when it would land back
    inside: a client has no reason to send one."""
    raw = PurePath(lora_path)
    if ".." in raw.parts:
        raise ApiError(400, f"lora_path {lora_path!r} contains '..'; give a path under the allowed adapter root",
                       "BadRequestError", "lora_path")
    if "\x00" in lora_path:
        raise ApiError(400, "lora_path contains a NUL byte", "BadRequestError", "lora_path")
    root = root.resolve()
    path = (root / raw).resolve()
    if not path.is_relative_to(root):
        raise ApiError(403, f"lora_path {lora_path!r} resolves outside the allowed adapter root {root}",
                       "PermissionDenied", "lora_path")
    if not path.is_dir():
        raise ApiError(400, f"lora_path {lora_path!r} is not a directory under {root}; pass a PEFT adapter directory",
                       "BadRequestError", "lora_path")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if (path / name).exists() and not (path / name).resolve().is_relative_to(root):
            raise ApiError(403, f"{name} in {lora_path!r} links outside the allowed adapter root {root}",
                           "PermissionDenied", "lora_path")
    return path


async def load(state: ServerState, req: p.LoadLoRARequest) -> str:
    if not state.enable_runtime_lora:
        raise ApiError(403, "runtime adapter loading is disabled; start the server with --enable-runtime-lora "
                       "and --allowed-adapter-root DIR", "PermissionDenied")
    if state.allowed_adapter_root is None:
        raise ApiError(403, "runtime adapter loading needs --allowed-adapter-root DIR (no directory is allowed)",
                       "PermissionDenied")
    if req.lora_name == state.served_model_name:
        raise ApiError(400, f"lora_name {req.lora_name!r} is the base model's name; pick another",
                       "BadRequestError", "lora_name")
    path = confine(state.allowed_adapter_root, req.lora_path)
    try:
        await state.engine.load_adapter(req.lora_name, path)
    except (AdapterError, OSError) as e:
        raise ApiError(400, str(e), "BadRequestError") from None
    return f"Success: LoRA adapter '{req.lora_name}' added successfully."


async def unload(state: ServerState, req: p.UnloadLoRARequest) -> str:
    if not state.enable_runtime_lora:
        raise ApiError(403, "runtime adapter unloading is disabled; start the server with --enable-runtime-lora",
                       "PermissionDenied")
    if not state.engine.engine.source.has(req.lora_name):
        raise ApiError(404, f"The lora adapter '{req.lora_name}' cannot be found.", "NotFoundError", "lora_name")
    try:
        await state.engine.unload_adapter(req.lora_name)
    except AdapterError as e:
        raise ApiError(400, str(e), "BadRequestError") from None
    return f"Success: LoRA adapter '{req.lora_name}' removed successfully."
