# Load a checkpoint, prefill, then a compiled decode loop. The CLI is at the bottom.
import json
from pathlib import Path

import torch

from model import ModelArgs, Transformer


def load_model(checkpoint_path, device="cpu", precision=torch.bfloat16) -> Transformer:
    """checkpoint_path: a model*.pth inside a checkpoint folder that holds config.json."""
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}; run scripts/prepare.sh REPO_ID")
    config_path = checkpoint_path.parent / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json beside {checkpoint_path}; convert it with convert_hf_checkpoint.py")
    config = ModelArgs.from_dict(json.loads(config_path.read_text()))
    with torch.device("meta"):
        model = Transformer(config)
    try:
        state_dict = torch.load(checkpoint_path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {checkpoint_path}: {str(e).splitlines()[0]}") from None
    model.load_state_dict(state_dict, assign=True, strict=not config.tie_embeddings)
    model = model.to(device=device, dtype=precision)
    model.after_load()
    return model.eval()
