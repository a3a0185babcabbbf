"""Wall time of `python -m tasks.hf_import` and `python -m tasks.export` on Pythia-160m-sized models.

    python -m benchmarks.hf_io [--rounds 3] [--workdir /tmp/hfbench-io] [--quick]

Two HF checkpoints are built locally with random weights (nothing is downloaded) and saved as
the Hub stores these families: `pythia-160m`, EleutherAI/pythia-160m's GPT-NeoX config as is
(hidden 768, 12 layers, 12 heads, intermediate 3072, vocab 50304, rotary_pct 0.25, 2048
positions, untied embeddings: 162,322,944 params), in float16; and `llama-160m`, a Llama config of
the same width, depth and vocabulary (SwiGLU intermediate 2048, so its MLP has the same 3 x 768 x
2048 = 4.7M weights a layer; 162,220,800 params), in bfloat16. Building and saving them is timed
once, apart.

Each round, for each model in turn (interleaved): the import CLI's start-up alone (`startup`:
python with tasks.hf_import and transformers' auto classes imported, no checkpoint read); the import CLI end
to end as a subprocess (HF directory -> archflow model directory, float32); the same import in
this process, split into transformers' from_pretrained, building the archflow model (its random
init), the state-dict conversion and load, and save_model_dir; the export CLI end to end (archflow
directory -> HF directory, float32). Peak RSS is each CLI process's own (getrusage). After the first
round, parity: archflow's logits vs transformers' (the checkpoint read in float32) on 2 x 16
tokens, and the exported tensors vs the stored ones upcast (must be equal). Prints the medians.
`--quick`: 2-layer, width-64 versions of both, one round (a check that it runs).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import host_line
from components.artifacts import load_model_dir, save_model_dir, tied_head
from components.hf import config_from_hf, state_from_hf
from components.model import TransformerLM

# EleutherAI/pythia-160m's config.json (architecture fields), and a Llama of the same shape
PYTHIA_160M = dict(model_type="gpt_neox", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, vocab_size=50304, rotary_pct=0.25, rotary_emb_base=10000,
                   max_position_embeddings=2048, use_parallel_residual=True, tie_word_embeddings=False,
                   hidden_act="gelu", layer_norm_eps=1e-5)
LLAMA_160M = dict(model_type="llama", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=2048, vocab_size=50304, max_position_embeddings=2048,
                  tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0)
QUICK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
MODELS = {"pythia-160m": (PYTHIA_160M, torch.float16), "llama-160m": (LLAMA_160M, torch.bfloat16)}
ENV = dict(os.environ, DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1",
           HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")


def build_checkpoint(path: Path, fields: dict, dtype: torch.dtype) -> int:
    """Save a random HF model of `fields` in dtype to path; its parameter count."""
    import transformers
    fields = dict(fields)
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    n = model.num_parameters()
    model.to(dtype).save_pretrained(path)
    return n


# Runs `python <args>` as its child and writes (wall seconds, the child's peak RSS in KiB) to a file.
# A small process in between because Linux counts in a child's peak RSS the RSS of the process it
# was forked from: this one, after its in-process imports, holds GBs.
MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); rc = subprocess.call(sys.argv[2:]); "
           "s = time.perf_counter() - t; kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
           "open(sys.argv[1], 'w').write(f'{s} {kib}'); sys.exit(rc)")


def run_cli(args: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of `python <args>` run from the project root; its output to log."""
    with open(log, "w") as out:
        rc = subprocess.call([sys.executable, "-c", MEASURE, f"{log}.measure", sys.executable, *args],
                             stdout=out, stderr=subprocess.STDOUT, env=ENV)
    if rc:
        raise SystemExit(f"python {' '.join(args)} failed (exit {rc}): see {log}")
    seconds, kib = Path(f"{log}.measure").read_text().split()
    return float(seconds), int(kib) / 1024                 # Linux: ru_maxrss in KiB


def import_in_process(hf_dir: Path, out: Path) -> dict[str, float]:
    """tasks.hf_import's steps, each timed: transformers' load, building the archflow model,
    converting and loading the state dict, saving the model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM
    t = [time.perf_counter()]
    hf = AutoConfig.from_pretrained(hf_dir, local_files_only=True).to_dict()
    source = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32,
                                                  use_safetensors=True)
    t.append(time.perf_counter())
    cfg = config_from_hf(hf)
    model = TransformerLM(cfg)
    t.append(time.perf_counter())
    missing, unexpected = model.load_state_dict(state_from_hf(cfg, hf["model_type"], source.state_dict()), strict=False)
    assert not unexpected and set(missing) == tied_head(model), (missing, unexpected)
    del source
    t.append(time.perf_counter())
    save_model_dir(out, model.eval(), {"stage": "import", "method": "hf", "parents": []})
    t.append(time.perf_counter())
    return dict(zip(("load", "build", "convert", "save"), (b - a for a, b in zip(t, t[1:]))))


@torch.no_grad()
def parity(hf_dir: Path, model_dir: Path, export_dir: Path) -> tuple[float, bool]:
    """(max abs logit diff archflow vs transformers on 2 x 16 tokens, exported tensors == stored ones upcast)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    ours, _ = load_model_dir(model_dir)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    idx = torch.randint(0, ours.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    diff = (ours(idx) - theirs(idx).logits).abs().max().item()
    del ours, theirs
    stored = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        stored |= load_file(f)
    back = load_file(export_dir / "model.safetensors")
    equal = back.keys() == stored.keys() and all(torch.equal(back[k], stored[k].float()) for k in back)
    return diff, equal


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/hfbench-io"))
    p.add_argument("--quick", action="store_true", help="2-layer, width-64 models, one round: checks it runs")
    args = p.parse_args()
    rounds = 1 if args.quick else args.rounds
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    print(host_line())
    info, times = {}, {name: {} for name in MODELS}
    for name, (fields, dtype) in MODELS.items():
        t0 = time.perf_counter()
        n = build_checkpoint(args.workdir / name / "hf", fields | (QUICK if args.quick else {}), dtype)
        info[name] = dict(params=n, dtype=str(dtype).removeprefix("torch."), build_save=time.perf_counter() - t0)
        print(f"{name}: {n:,} params, built and saved in {info[name]['dtype']} in {info[name]['build_save']:.1f} s")

    startup = ["-c", "import tasks.hf_import; from transformers import AutoConfig, AutoModelForCausalLM"]
    for r in range(rounds):
        for name in MODELS:
            d, got = args.workdir / name, times[name]
            got.setdefault("startup", []).append(run_cli(startup, d / "startup.log")[0])
            s, rss = run_cli(["-m", "tasks.hf_import", str(d / "hf"), str(d / "model")], d / "import.log")
            got.setdefault("import", []).append(s)
            got.setdefault("import_rss", []).append(rss)
            for step, s in import_in_process(d / "hf", d / "model-inproc").items():
                got.setdefault(step, []).append(s)
            s, rss = run_cli(["-m", "tasks.export", str(d / "model"), str(d / "export")], d / "export.log")
            got.setdefault("export", []).append(s)
            got.setdefault("export_rss", []).append(rss)
            if r == 0:
                info[name]["diff"], info[name]["equal"] = parity(d / "hf", d / "model", d / "export")
            print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in got.items()), flush=True)

    med = {name: {k: statistics.median(v) for k, v in got.items()} for name, got in times.items()}
    print(f"\nmedians of {rounds} interleaved rounds (seconds; RSS in MiB):")
    print("| model | params | stored | build+save | startup | import CLI | load | build | convert | save | "
          "export CLI | import RSS | export RSS | max abs logit diff | export == stored |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, m in med.items():
        i = info[name]
        print(f"| {name} | {i['params']:,} | {i['dtype']} | {i['build_save']:.1f} | {m['startup']:.1f} | "
              f"{m['import']:.1f} | {m['load']:.1f} | {m['build']:.1f} | {m['convert']:.1f} | {m['save']:.1f} | "
              f"{m['export']:.1f} | {m['import_rss']:,.0f} | {m['export_rss']:,.0f} | {i['diff']:.1e} | "
              f"{'yes' if i['equal'] else 'NO'} |")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
