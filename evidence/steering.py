"""Steering beyond refusal in the tiny world: the French-vs-German direction, added and removed.

    python evidence/steering.py [--model SFT_RUN] [--out DIR]

Two contrastive prompt sets differ only in the target language: "Translate cheese from
English to French." vs the same request for German (every core word, three phrasings).
`posttrain steer` finds the direction between them and
- mode=add puts it into German requests: the report gives the share of held-out German
  requests answered with the exact French word (from the world's lexicon), before and after;
- mode=remove erases the same direction (pinned to the layer `add` chose) from the weights:
  the share of French requests still answered in French, and of German requests still
  answered in German. The contrast is symmetric, so erasing it costs both languages; the
  default search (KL on German requests under 0.1) would keep both and change little.

Without `--model` it first trains the demo's SFT model (LoRA, 10 epochs, a few minutes on
CPU) into `DIR/sft` (kept between runs). Prints a Markdown table, writes `DIR/results.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TEMPLATES = (
    "Translate {word} from English to {lang}.",
    "What is the {lang} word for {word}?",
    "How do you say {word} in {lang}?",
)
SFT = {
    "adapter": "lora", "lora": {"r": 16, "alpha": 32}, "packing": False, "max_length": 512,
    "batch_size": 16, "epochs": 10, "lr": 1e-3, "warmup": 0.05, "log_every": 50, "offline": True,
}  # fmt: skip


def language_sets(out: Path) -> dict[str, dict]:
    """{lang: {prompt: answer}} for French and German; each written as a text file."""
    from posttrain.world.lexicon import CORE

    sets = {}
    for lang in ("French", "German"):
        pairs = {t.format(word=e.english, lang=lang): e.word(lang) for e in CORE for t in TEMPLATES}
        (out / f"{lang.lower()}.txt").write_text("\n".join(pairs) + "\n")
        sets[lang] = pairs
    return sets


def sft_model(out: Path) -> str:
    """The demo's SFT run, trained once into out/sft."""
    run = out / "sft"
    if not (run / "final").is_dir():
        from posttrain.train.sft import sft
        from posttrain.world.datasets import write_world_data

        write_world_data(out / "data", overwrite=True)
        sft({**SFT, "model": "posttrain/world/base", "output_dir": str(run),
             "data": {"train": str(out / "data" / "sft_train.jsonl")}})  # fmt: skip
    return str(run)


def answered_in(model, tok, prompts: list[str], answers: list[str]) -> float:
    """Share of greedy replies that are exactly the expected word."""
    from posttrain.evaluate.generate import generate
    from posttrain.evaluate.text import exact_match

    replies = generate(model, tok, prompts, max_new_tokens=12)
    return sum(exact_match(r, a) for r, a in zip(replies, answers)) / max(len(prompts), 1)


def rates(model, tok, prompts: list[str], sets: dict) -> dict:
    """Exact French / German answers to `prompts` (their word, in either language)."""

    def word(prompt: str, lang: str) -> str:
        return sets[lang][prompt.replace("German", lang).replace("French", lang)]

    return {
        lang.lower(): answered_in(model, tok, prompts, [word(p, lang) for p in prompts])
        for lang in ("French", "German")
    }


def run_steer(model: str, out: Path, mode: str, layer: int = -1) -> dict:
    from posttrain.steer.steer_cli import steer

    return steer({"model": model, "positive": str(out / "french.txt"),
                  "negative": str(out / "german.txt"), "mode": mode, "layer": layer,
                  "output_dir": str(out / f"steer_{mode}")})  # fmt: skip


def added(model_path: str, report: dict, sets: dict, out: Path) -> dict:
    """French/German answer rates on held-out German requests, before and with the addition."""
    from posttrain.modeling.inference import load_for_inference
    from posttrain.steer.directions import load_directions
    from posttrain.steer.interventions import activation_addition

    model, tok = load_for_inference(model_path)
    german = read_test(out, "negative", report)
    r = load_directions(out / "steer_add" / "directions.safetensors")["direction"]
    before = rates(model, tok, german, sets)
    with activation_addition(model, r, report["chosen"]["coeff"], report["chosen"]["layer"]):
        after = rates(model, tok, german, sets)
    return {"prompts": "held-out German requests", "before": before, "after": after}


def removed(model_path: str, report: dict, sets: dict, out: Path) -> dict:
    """Answer rates on held-out French and German requests, original vs orthogonalised."""
    from posttrain.modeling.inference import load_for_inference

    rows = {}
    for name, path in (("before", model_path), ("after", str(out / "steer_remove" / "final"))):
        model, tok = load_for_inference(path)
        rows[name] = {
            "french_requests": rates(model, tok, read_test(out, "positive", report), sets),
            "german_requests": rates(model, tok, read_test(out, "negative", report), sets),
        }
    return rows


def read_test(out: Path, kind: str, report: dict) -> list[str]:
    """The held-out part of one set, exactly as `posttrain steer` split it for this run."""
    from posttrain.steer.steer_cli import SteerConfig, read_sets

    cfg = SteerConfig(model=report["model"], positive=str(out / "french.txt"),
                      negative=str(out / "german.txt"))  # fmt: skip
    return read_sets(cfg)[f"{kind}_test"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="SFT run or model folder (default: train one)")
    ap.add_argument("--out", default="evidence-steering")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = language_sets(out)
    model = args.model or sft_model(out)
    add_report = run_steer(model, out, "add")
    remove_report = run_steer(model, out, "remove", add_report["chosen"]["layer"])
    results = {
        "add": {"chosen": add_report["chosen"], **added(model, add_report, sets, out)},
        "remove": {"chosen": remove_report["chosen"], **removed(model, remove_report, sets, out)},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    a, rm = results["add"], results["remove"]
    print("| edit | prompts | answered in French | answered in German |\n|---|---|---|---|")
    for name in ("before", "after"):
        print(
            f"| add ({name}) | German requests | {a[name]['french']:.2f} | {a[name]['german']:.2f} |"
        )
    for name in ("before", "after"):
        for req in ("french_requests", "german_requests"):
            r = rm[name][req]
            print(f"| remove ({name}) | {req.split('_')[0]} requests | {r['french']:.2f} | "
                  f"{r['german']:.2f} |")  # fmt: skip
    print(
        f"add: layer {a['chosen']['layer']}, coeff {a['chosen']['coeff']:.2f}; "
        f"remove: layer {rm['chosen']['layer']}"
    )


if __name__ == "__main__":
    main()
