"""Training checkpoints without pickle: a Hugging Face style model dir plus optimizer/scheduler
state in safetensors + JSON, so a restarted worker or a resubmitted driver continues exactly."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "train_state.json"
OPT_FILE = "optimizer.safetensors"


def save_training_state(directory: str | Path, optimizer, scheduler, scaler, progress: dict) -> None:
    d = Path(directory)
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars[f"{pid}.{k}"] = v
    save_file(tensors, str(d / OPT_FILE))
    state = {"progress": progress, "param_groups": sd["param_groups"], "scalars": scalars,
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    (d / STATE_FILE).write_text(json.dumps(state, default=float))


def load_training_state(directory: str | Path, optimizer, scheduler, scaler) -> dict:
    d = Path(directory)
    state = json.loads((d / STATE_FILE).read_text())
    tensors = load_file(str(d / OPT_FILE))
    opt_state: dict = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        opt_state.setdefault(int(pid), {})[name] = v
    for key, v in state["scalars"].items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state["progress"]
